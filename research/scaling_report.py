"""The scaling study's report: both fits, where they disagree, the held-out prediction against what the run reached, and what it cost.

Written as summary.md and summary.html with three plots (loss against compute with the fitted
frontier, the IsoFLOP curves, predicted against actual) to <out_dir>/sweeps/<study>/ and
sweep.report_dir, logged to the parent run with the fitted constants as metrics. It reads the
study's finished cells and the stored prediction; it writes nothing to the study.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from mlflow.entities import Metric, RunTag
from omegaconf import DictConfig

from research import scaling_fit as fits
from research.hardware import machine_summary
from research.scaling_plan import FIT_STAGE, HOLDOUT_STAGE, LEVEL, Plan, Result, Size
from research.sweep_report import publish, report_folders, report_html, report_markdown

ACCEPTED_ERROR_PCT = 2.0  # the held-out prediction passes when its interval covers the actual loss and it is off by at most this


def law_from(values) -> fits.Law:
    return fits.Law(*(float(v) for v in (values.values() if isinstance(values, dict) else values)))


def interval_text(values, level: float = LEVEL) -> str:
    if len(values) < 2:
        return "n/a"
    low, high = fits.percentile_interval(values, level)
    return f"[{low:.4g}, {high:.4g}]"


def report(study, cfg: DictConfig, plan: Plan, results: list[Result], prediction: dict, client, parent: str | None, storage_text: str, console) -> None:
    """Fit, compare, tabulate, plot; print the verdict, write the files, log the parent run's metrics."""
    fitted = [r for r in results if r.cell.stage == FIT_STAGE]
    held = [r for r in results if r.cell.stage == HOLDOUT_STAGE]
    n, d, loss, budget = (np.array(v, float) for v in zip(*[(r.n, r.tokens, r.test_loss, r.cell.budget) for r in fitted]))
    law, laws = law_from(prediction["law"]), [law_from(b) for b in prediction["bootstrap"]]
    fpt_of = fits.flops_per_token_curve([s.n for s in plan.candidates], [s.fpt for s in plan.candidates])
    iso = fits.isoflop_fit(budget, n, loss, fpt_of)
    iso_boot = fits.bootstrap_isoflop(budget, n, loss, fpt_of, cfg.scaling.bootstrap, cfg.seed)
    shapes = plan.candidates  # the law's optimum is sought among the shapes, each with its own FLOPs per token
    budgets = sorted(set(budget.tolist()))
    law_best = [best_shape(law, c, shapes) for c in budgets]
    law_a, law_b = law_exponents(law)  # the shapes are few and discrete: their best one moves in jumps, the law's exponents do not
    actual = statistics.fmean(r.test_loss for r in held) if held else math.nan
    covered = prediction["low"] <= actual <= prediction["high"]
    error_pct = 100.0 * (prediction["loss"] - actual) / actual
    passed = covered and abs(error_pct) <= ACCEPTED_ERROR_PCT

    paragraphs = [
        cost_text(study, results, cfg, storage_text),
        design_text(plan, cfg),
        f"**prediction**, stored before the held-out run was queued: {prediction['shape']} (N = {prediction['n']:,}) trained on "
        f"{prediction['tokens']:,} tokens at {prediction['budget']:.3g} FLOPs ({cfg.scaling.holdout_factor:g}x the largest fitted budget) reaches "
        f"test loss **{prediction['loss']:.4f}**, {LEVEL:.0%} prediction interval [{prediction['low']:.4f}, {prediction['high']:.4f}] "
        f"(bootstrap of {len(laws)} refits over the {prediction['cells']} cells, each times a resampled log residual of the fit). "
        "Predicted at that budget for every shape it could take: " + ", ".join(f"{k} {v:.4f}" for k, v in prediction["choices"].items()) + ".",
        (f"**actual**: test loss {actual:.4f} (mean of {len(held)} seed(s): " + ", ".join(f"{r.test_loss:.4f}" for r in held) + f"); the interval "
         f"{'covers' if covered else 'does not cover'} it; the prediction is off by {error_pct:+.2f}% of the actual loss. "
         f"**Verdict: {'passed' if passed else 'failed'}** (interval covers and |error| <= {ACCEPTED_ERROR_PCT:g}%).") if held else
        "**actual**: the held-out run has not finished",
        agreement_text(iso, law_a, law_b, iso_boot, law, prediction, shapes),
    ]
    tables = [constants_table(law, laws, iso, iso_boot, law_a, law_b), optimum_table(iso, budgets, law_best, shapes),
              cells_table(results, plan, law)]
    console.print("\n\n".join(paragraphs[2:4]))
    with tempfile.TemporaryDirectory() as tmp:
        plots = save_plots(Path(tmp), fitted, held, law, laws, iso, prediction, shapes, machine_summary(cfg.train))
        title = f"Scaling study {study.study_name}"
        (Path(tmp) / "summary.md").write_text(report_markdown(title, paragraphs, tables, plots))
        (Path(tmp) / "summary.html").write_text(report_html(title, paragraphs, tables, plots))
        if client and parent:
            client.log_artifacts(parent, tmp)
        folders = report_folders(cfg, study.study_name)
        for folder in folders:
            publish(Path(tmp), folder)
    console.print("summary: " + ", ".join(str(folder / "summary.md") for folder in folders))
    if client and parent:
        metrics = {**{f"law/{k}": v for k, v in law.as_dict().items()}, "isoflop/a": iso["a"], "isoflop/b": iso["b"], "law/a": law_a, "law/b": law_b,
                   "holdout/test_loss": actual, "holdout/error_pct": error_pct, "holdout/covered": float(covered), "holdout/passed": float(passed)}
        now = int(time.time() * 1000)
        client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(v)],
                         tags=[RunTag("scaling.verdict", paragraphs[3][:5000])])


def cost_text(study, results: list[Result], cfg: DictConfig, storage_text: str) -> str:
    """The machine, and what the study cost in runs, steps, FLOPs and wall time."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete]
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds() if trials else 0.0
    own = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"**machine**: {machine_summary(cfg.train)} ({platform.machine()}). **cost**: {len(results)} runs, {sum(r.cell.steps for r in results):,} steps, "
            f"{sum(r.flops for r in results):.3g} FLOPs; {span / 60:.1f} minutes from the first trial's start to the last one's end "
            f"({own / 60:.1f} minutes inside trials); load average when the report was written (1, 5, 15 min): {load}. storage: `{storage_text}`")


def design_text(plan: Plan, cfg: DictConfig) -> str:
    s = cfg.scaling
    span = plan.sizes[-1].n / plan.sizes[0].n
    return (f"**design**: {len(plan.sizes)} shapes ({', '.join(f'{z.name} N={z.n:,}' for z in plan.sizes)}; {span:.1f}x in non-embedding "
            f"parameters) x budgets {', '.join(f'{c:.3g}' for c in sorted(set(c.budget for c in plan.fit)))} FLOPs x {s.seeds} seed(s); "
            f"held-out budget {plan.holdout_budget:.3g} FLOPs at {s.holdout_seeds} seed(s). A cell of budget C trains C / FLOPs per token tokens, "
            "FLOPs per token = 6 N' + 12 L H Q T (accounting.flops_per_token: N' counts the weights of every matmul, the output head included). "
            f"lr = {cfg.train.lr:g} x sqrt({s.lr_width} / width), warmup {s.warmup_share:.0%} of the steps, cosine to {cfg.train.min_lr_ratio:g} x lr; "
            f"{plan.train_tokens:,} training tokens, the most-repeated cell sees them {max(plan.epochs(c) for c in plan.fit):.2f} times. "
            "Metric: **test loss** (nats per token on data.test_fraction's documents, which nothing selects on). N in every fit is the "
            "non-embedding parameter count; D the tokens trained.")


def law_exponents(law: fits.Law) -> tuple[float, float]:
    """N_opt ~ C^a and D_opt ~ C^b of L(N, D) when C is proportional to N * D (Hoffmann et al. 2022): a = beta / (alpha + beta), b = 1 - a."""
    a = law.beta / (law.alpha + law.beta)
    return a, 1.0 - a


def best_shape(law: fits.Law, budget: float, shapes: list[Size]) -> Size:
    """The shape whose L(N, budget / its FLOPs per token) is lowest: the law's compute-optimal size among those it can name."""
    return min(shapes, key=lambda shape: float(law.loss(shape.n, budget / shape.fpt)))


def agreement_text(iso: dict, law_a: float, law_b: float, iso_boot: dict, law: fits.Law, prediction: dict, shapes: list[Size]) -> str:
    """Where the IsoFLOP and parametric fits agree on the compute-optimal size, and where not."""
    law_n = best_shape(law, prediction["budget"], shapes).n
    edge = [p for p in iso["parabolas"] if not p.interior]
    text = (f"**the two fits**: the parametric law's optimum grows as N_opt ~ C^{law_a:.3f} and D_opt ~ C^{law_b:.3f} "
            "(beta / (alpha + beta), taking C proportional to N x D; the 6400-token head makes C grow slower than N here)")
    if math.isfinite(iso["a"]) and len(iso_boot["a"]) > 1:
        iso_n = iso["k_n"] * prediction["budget"] ** iso["a"]
        low, high = fits.percentile_interval(iso_boot["a"], LEVEL)
        agree = low <= law_a <= high
        text += (f"; the IsoFLOP minima as N_opt ~ C^{iso['a']:.3f} ({LEVEL:.0%} {interval_text(iso_boot['a'])}) and D_opt ~ C^{iso['b']:.3f} "
                 f"({interval_text(iso_boot['b'])}). The law's exponent lies {'inside' if agree else 'outside'} the IsoFLOP interval: the two fits "
                 f"{'agree' if agree else 'disagree'} on how fast the optimal size grows. At the held-out budget the IsoFLOP power law puts N_opt at "
                 f"{iso_n:,.0f} and the law at {law_n:,.0f} ({law_n / iso_n:.2f}x)")
    else:
        inside = sum(p.interior for p in iso["parabolas"])
        text += (f"; the IsoFLOP minima give no power law: {inside} of {len(iso['parabolas'])} parabolas have their minimum inside the sizes "
                 f"trained, and a line needs two. At the held-out budget the law puts N_opt at {law_n:,.0f}")
    text += f"; the shape trained there has N = {prediction['n']:,} (the best of the shapes it could take). "
    if edge:
        return text + "Parabolas whose minimum lies outside the sizes trained, an extrapolation: " + ", ".join(f"{p.budget:.3g} FLOPs" for p in edge) + "."
    return text + "Every parabola's minimum lies inside the sizes trained."


def constants_table(law: fits.Law, laws: list[fits.Law], iso: dict, iso_boot: dict, law_a: float, law_b: float):
    rows = [[k, f"{v:.4g}", interval_text([b.as_dict()[k] for b in laws])] for k, v in law.as_dict().items()]
    rows += [["IsoFLOP a (N_opt ~ C^a)", f"{iso['a']:.4g}", interval_text(iso_boot["a"])], ["IsoFLOP b (D_opt ~ C^b)", f"{iso['b']:.4g}", interval_text(iso_boot["b"])],
             ["law a = beta / (alpha + beta)", f"{law_a:.4g}", interval_text([law_exponents(b)[0] for b in laws])],
             ["law b = alpha / (alpha + beta)", f"{law_b:.4g}", interval_text([law_exponents(b)[1] for b in laws])]]
    return ["constant", "fit", f"{LEVEL:.0%} bootstrap interval"], rows, set()


def optimum_table(iso: dict, budgets: list[float], law_best: list[Size], shapes: list[Size]):
    by_budget = {p.budget: (p, d) for p, d in zip(iso["parabolas"], iso["d_opt"])}
    rows = []
    for c, best in zip(budgets, law_best):
        p, d = by_budget.get(c, (None, math.nan))
        law_n, law_d = best.n, c / best.fpt
        iso_n = ("no minimum" if not math.isfinite(p.n_opt) else f"{p.n_opt:,.0f}" + ("" if p.interior else " (outside the sizes)")) if p else ""
        at_edge = " (the smallest shape)" if best is shapes[0] else " (the largest shape)" if best is shapes[-1] else ""
        rows.append([f"{c:.3g}", iso_n, f"{d:,.0f}" if p and p.interior else "", f"{best.name}, {law_n:,}{at_edge}", f"{law_d:,.0f}", f"{law_d / law_n:.1f}"])
    return ["budget (FLOPs)", "IsoFLOP N_opt", "IsoFLOP D_opt", "law's best shape, N", "law D_opt", "law D/N"], rows, set()


def cells_table(results: list[Result], plan: Plan, law: fits.Law):
    rows = []
    for r in sorted(results, key=lambda r: (r.cell.stage != FIT_STAGE, r.cell.budget, r.n, r.cell.seed)):
        predicted = float(law.loss(r.n, r.tokens))
        rows.append([str(r.trial), r.cell.stage, r.cell.size.name, f"{r.n:,}", f"{r.cell.size.fpt:.3g}", f"{r.cell.budget:.3g}", f"{r.cell.steps:,}",
                     f"{r.tokens:,}", f"{plan.epochs(r.cell):.2f}", f"{r.cell.lr:.3g}", str(r.cell.seed), f"{r.val_loss:.4f}", f"{r.test_loss:.4f}",
                     f"{predicted:.4f}", f"{100 * (predicted - r.test_loss) / r.test_loss:+.2f}%"])
    header = ["trial", "stage", "shape", "N", "FLOPs/token", "budget", "steps", "tokens", "epochs", "lr", "seed", "val loss", "test loss", "law", "law error"]
    return header, rows, {i for i, row in enumerate(rows) if row[1] == HOLDOUT_STAGE}


def save_plots(folder: Path, fitted: list[Result], held: list[Result], law: fits.Law, laws: list[fits.Law], iso: dict, prediction: dict,
               shapes: list[Size], machine: str) -> list[Path]:
    import matplotlib  # only here: a backend is chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r.cell.size.name for r in fitted + held}, key=lambda name: min(r.n for r in fitted + held if r.cell.size.name == name))
    colours = dict(zip(names, plt.cm.viridis(np.linspace(0, 0.9, len(names)))))
    saved = []

    figure, ax = plt.subplots(figsize=(7, 4.5))  # loss against compute, the frontier, the prediction
    for r in fitted:
        ax.scatter(r.flops, r.test_loss, color=colours[r.cell.size.name], s=22, label=r.cell.size.name)
    budgets = np.geomspace(min(r.flops for r in fitted) / 1.5, prediction["budget"] * 1.5, 60)
    n, fpt = np.array([z.n for z in shapes], float), np.array([z.fpt for z in shapes])
    frontier = [law.loss(n, c / fpt).min() for c in budgets]
    band = np.array([[b.loss(n, c / fpt).min() for c in budgets] for b in laws[:100]])
    ax.plot(budgets, frontier, color="black", lw=1.2, label="law: best shape at each C")
    ax.fill_between(budgets, *np.percentile(band, [5, 95], axis=0), color="grey", alpha=0.25, label=f"{LEVEL:.0%} bootstrap band")
    ax.errorbar([prediction["budget"]], [prediction["loss"]], yerr=[[prediction["loss"] - prediction["low"]], [prediction["high"] - prediction["loss"]]],
                fmt="o", color="tab:red", capsize=4, label=f"predicted ({prediction['shape']})")
    if held:
        ax.scatter([r.flops for r in held], [r.test_loss for r in held], marker="*", s=140, color="tab:red", edgecolor="black", label="held-out actual", zorder=5)
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="test loss (nats/token)", title="Loss against compute")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    saved.append(save(figure, folder / "loss_vs_compute.png", plt, machine))

    figure, ax = plt.subplots(figsize=(7, 4.5))  # IsoFLOP curves
    budget_colours = plt.cm.plasma(np.linspace(0, 0.8, max(1, len(iso["parabolas"]))))
    for p, colour in zip(iso["parabolas"], budget_colours):
        at = [r for r in fitted if r.cell.budget == p.budget]
        ax.scatter([r.n for r in at], [r.test_loss for r in at], color=colour, s=22)
        grid = np.geomspace(p.n_range[0] / 1.5, p.n_range[1] * 1.5, 100)
        ax.plot(grid, p.loss(grid), color=colour, lw=1.2, label=f"C = {p.budget:.2g}: parabola")
        at = sorted(at, key=lambda r: r.n)
        ax.plot([r.n for r in at], [law.loss(r.n, r.tokens) for r in at], color=colour, lw=1, ls="--", marker="x", ms=4)
        if p.interior:  # a minimum outside the sizes is the parabola's extrapolation: the table lists it
            ax.axvline(p.n_opt, color=colour, lw=0.8, ls=":")
    ax.plot([], [], color="grey", ls="--", label="parametric law")
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="test loss (nats/token)", title="IsoFLOP curves (dotted: a minimum inside the sizes)")
    ax.legend(fontsize=7)
    saved.append(save(figure, folder / "isoflop.png", plt, machine))

    figure, ax = plt.subplots(figsize=(5, 5))  # predicted against actual
    ax.scatter([law.loss(r.n, r.tokens) for r in fitted], [r.test_loss for r in fitted], s=18, color="tab:blue", label="fitted cells (in sample)")
    if held:
        actual = statistics.fmean(r.test_loss for r in held)
        ax.errorbar([prediction["loss"]], [actual], xerr=[[prediction["loss"] - prediction["low"]], [prediction["high"] - prediction["loss"]]],
                    fmt="*", ms=12, color="tab:red", capsize=4, label=f"held-out (predicted, {LEVEL:.0%} interval)")
    low, high = ax.get_xlim()
    ax.plot([low, high], [low, high], color="black", lw=0.8)
    ax.set(xlabel="predicted test loss", ylabel="actual test loss", title="Predicted against actual")
    ax.legend(fontsize=7)
    saved.append(save(figure, folder / "predicted_vs_actual.png", plt, machine))
    return saved


def save(figure, path: Path, plt, machine: str) -> Path:
    figure.text(0.01, -0.02, f"measured on {machine}", fontsize=6, color="grey")  # every committed figure says where it was measured
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
