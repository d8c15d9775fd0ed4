"""Does the learning rate transfer across widths (`exp=lr_transfer`): one lr grid study per width and parametrization, one report.

Each (parametrization, width) is an ordinary study of the recipe (research/sweep.py, `sweep.sampler=grid`
over its SEARCH_SPACE's lr grid at `sweep.grid_seeds` seeds), named `<exp>-<sp|mup>-w<width>`, with a
parent run of its own; rerunning resumes them. μP at its base width is SP (tests/integration/test_mup_training.py),
so there the two share the SP study. The report then gives, per width:

- the optimal lr: the vertex of a parabola through the final validation loss (mean over seeds) against
  log lr at the best grid point and its two neighbours, with a 95% interval from a bootstrap over seeds
  (seeds resampled together at every lr, as they pair the runs: same init, same batches). Where the best
  point is on an edge of the grid, the grid is extended one step beyond it (a study of its own,
  `<study>-lr<value>`, at the same seeds), up to MAX_EXTENSIONS times; a best point still on the edge
  gives no vertex, only that bound;
- the shift factor of each width's optimum against the smallest width's, and the exponent a of
  lr* ~ width^-a fitted over the widths (SP's rule of thumb: a = 1; μP's claim: a = 0);
- at the largest width, the test loss (documents no run selected on) of the smallest width's best grid lr
  against the largest width's own, paired by seed (research/paired.py);
- at the largest width, μP at the smallest width's best lr against SP at its own: whether what transfers is good.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from research.config import apply_overrides
from research.paired import Paired
from research.study_plan import SEED_ATTR, TEST_LOSS_ATTR

LR_KEY = "train.lr"
BOOTSTRAP = 2000  # resamples of the seeds
MAX_EXTENSIONS = 2  # lrs added, one grid step at a time, beyond an edge of the grid that holds a width's best point
PARAMETRIZATIONS = ("sp", "mup")


def study_config(cfg: DictConfig, parametrization: str, width: int) -> DictConfig:
    """The recipe at this width and parametrization, under its own study name; μP at the base width is the SP study."""
    if parametrization == "mup" and width == cfg.model.base_width:
        parametrization = "sp"
    return apply_overrides(cfg.copy(), {"model.hidden_size": width, "model.parametrization": parametrization,
                                        "sweep.study_name": f"{cfg.exp}-{parametrization}-w{width}"})


def grid_losses(study) -> dict[float, dict[int, tuple[float, float]]]:
    """{lr: {seed: (final val loss, test loss)}} of a study's completed trials."""
    from optuna.trial import TrialState

    out: dict[float, dict[int, tuple[float, float]]] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        out.setdefault(float(trial.params[LR_KEY]), {})[int(trial.user_attrs[SEED_ATTR])] = (
            float(trial.value), float(trial.user_attrs.get(TEST_LOSS_ATTR, math.nan)))
    return dict(sorted(out.items()))


def vertex(log_lrs: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log lr of the minimum, inside the grid?) per column of `losses` (lrs, draws): the vertex of the parabola through
    the best point and its two neighbours, or, where the best point is on the grid's edge, that point."""
    best = np.argmin(losses, axis=0)
    inside = (best > 0) & (best < len(log_lrs) - 1)
    i = np.clip(best, 1, len(log_lrs) - 2)
    cols = np.arange(losses.shape[1])
    (x1, x2, x3), (y1, y2, y3) = log_lrs[[i - 1, i, i + 1]], losses[[i - 1, i, i + 1], cols]
    num = (x2 - x1) ** 2 * (y2 - y3) - (x2 - x3) ** 2 * (y2 - y1)
    den = (x2 - x1) * (y2 - y3) - (x2 - x3) * (y2 - y1)
    with np.errstate(divide="ignore", invalid="ignore"):
        top = x2 - 0.5 * num / den
    return np.where(inside & (den != 0), top, log_lrs[best]), inside


def optimum(losses: dict[float, dict[int, tuple[float, float]]], rng: np.random.Generator) -> dict:
    """The optimal lr of one study, with its bootstrap over seeds: {lr, low, high, inside, best_grid_lr, draws}."""
    lrs = list(losses)
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in losses.values())))
    val = np.array([[losses[lr][s][0] for s in seeds] for lr in lrs])  # (lrs, seeds)
    log_lrs = np.log(lrs)
    mean = val.mean(axis=1)
    centre, inside = vertex(log_lrs, mean[:, None])
    resampled = val[:, rng.integers(0, len(seeds), (BOOTSTRAP, len(seeds)))].mean(axis=2)  # (lrs, BOOTSTRAP)
    draws, _ = vertex(log_lrs, resampled)
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"lr": math.exp(centre[0]), "low": math.exp(low), "high": math.exp(high), "inside": bool(inside[0]), "seeds": seeds,
            "best_grid_lr": lrs[int(np.argmin(mean))], "draws": draws}


def exponent(widths: list[int], optima: list[dict]) -> tuple[float, float, float]:
    """a of lr* ~ width^-a (least squares on logs) and its 95% bootstrap interval (each width's draws independent)."""
    log_w = np.log(widths)
    point = -np.polyfit(log_w, [math.log(o["lr"]) for o in optima], 1)[0]
    draws = -np.polyfit(log_w, np.array([o["draws"] for o in optima]), 1)[0]
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(point), float(low), float(high)


def transfer_comparison(smallest: dict, largest: dict, losses: dict) -> Paired:
    """Test loss at the largest width: trained at the smallest width's best grid lr (A) against at its own (B), by seed."""
    by_seed = lambda lr: {s: test for s, (_, test) in losses.get(lr, {}).items()}  # noqa: E731  (none: n = 0)
    return Paired(by_seed(smallest["best_grid_lr"]), by_seed(largest["best_grid_lr"]))


def analyse(widths: list[int], losses: dict[str, dict[int, dict]], seed: int) -> dict:
    """Per parametrization: each width's optimum, the shift factors, the exponent and the paired comparison."""
    rng = np.random.default_rng(seed)
    out = {}
    for parametrization, by_width in losses.items():
        optima = [optimum(by_width[w], rng) for w in widths]
        paired = transfer_comparison(optima[0], optima[-1], by_width[widths[-1]])
        out[parametrization] = {"optima": optima, "exponent": exponent(widths, optima), "paired": paired,
                                "shift": [o["lr"] / optima[0]["lr"] for o in optima]}
    return out


def mup_against_sp(widths: list[int], losses: dict, analysis: dict) -> Paired:
    """At the largest width, test loss: μP at the smallest width's best lr (A) against SP at its own best lr (B), by seed.

    Transfer is worth having only if what it transfers to is good: this is μP, tuned small, against SP tuned at the size itself."""
    top = widths[-1]
    mup_lr, sp_lr = analysis["mup"]["optima"][0]["best_grid_lr"], analysis["sp"]["optima"][-1]["best_grid_lr"]
    return Paired({s: t for s, (_, t) in losses["mup"][top].get(mup_lr, {}).items()}, {s: t for s, (_, t) in losses["sp"][top].get(sp_lr, {}).items()})


def verdict(widths: list[int], result: dict) -> str:
    """Sentences from the numbers: how the optimum moves, and whether the smallest width's lr serves the largest width."""
    a, low, high = result["exponent"]
    paired, optima = result["paired"], result["optima"]
    text = f"lr* ~ width^-a with a = {a:.2f} (95% [{low:.2f}, {high:.2f}])"
    edges = [str(w) for w, o in zip(widths, optima) if not o["inside"]]
    if edges:
        text += f", but the optimum of width {', '.join(edges)} is on the grid's edge, so a is only a bound: extend the grid"
    if optima[0]["best_grid_lr"] == optima[-1]["best_grid_lr"]:
        text += f"; width {widths[-1]}'s best grid lr is width {widths[0]}'s: it transfers at the grid's resolution (factor 2)"
    else:
        text += (f"; at width {widths[-1]}, width {widths[0]}'s best lr gives {paired.mean:+.4f} test loss against its own best "
                 f"(paired, n = {paired.n}: {paired.verdict})")
    if edges and low <= 0.5:
        return text + ". The grid does not bracket every optimum, so these runs cannot say how it moves."
    if low > 0.5:
        return text + f". The optimum falls with width: scale the lr by ({widths[0]} / width)^{a:.2f}, or sweep at the target width."
    if high < 0.5:
        return text + ". The optimum does not move measurably with width: the small width's lr transfers as it is."
    return text + ". These widths and seeds cannot tell whether the optimum moves."


def plot(widths: list[int], losses: dict, analysis: dict, machine: str, path: Path) -> Path:
    """Final validation loss against lr, a line per width (mean over seeds, dots per seed), a panel per parametrization."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(losses), figsize=(5.2 * len(losses), 4), sharey=True)
    colors = plt.cm.plasma(np.linspace(0, 0.8, len(widths)))
    for ax, (parametrization, by_width) in zip(np.atleast_1d(axes), losses.items()):
        for color, width, best in zip(colors, widths, analysis[parametrization]["optima"]):
            lrs = list(by_width[width])
            ax.plot(lrs, [np.mean([v for v, _ in by_width[width][lr].values()]) for lr in lrs], "o-", color=color, label=f"width {width}")
            for lr in lrs:
                ax.plot([lr] * len(by_width[width][lr]), [v for v, _ in by_width[width][lr].values()], ".", color=color, alpha=0.4)
            ax.axvspan(best["low"], best["high"], color=color, alpha=0.12)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title("SP" if parametrization == "sp" else "μP", fontsize=10)
        ax.legend(fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("final validation loss")
    fig.suptitle(f"lr transfer across widths (shaded: 95% interval of each optimum); {machine}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lr_text(o: dict) -> str:
    if not o["inside"]:
        return f"at the grid's edge ({o['lr']:.2e})"
    return f"{o['lr']:.2e} [{o['low']:.2e}, {o['high']:.2e}]"


def transfer_text(widths: list[int], result: dict) -> str:
    """The paired comparison at the largest width of the smallest width's best lr against its own; nothing to pair when they are one lr."""
    small, large = result["optima"][0]["best_grid_lr"], result["optima"][-1]["best_grid_lr"]
    if small == large:
        return f"Width {widths[-1]}'s best grid lr is width {widths[0]}'s ({small:.2e}): the same runs, nothing to pair.\n"
    return (f"Width {widths[-1]}, test loss at width {widths[0]}'s best grid lr ({small:.2e}) minus at its own ({large:.2e}), "
            f"paired by seed: {result['paired'].summary()}\n")


def report_markdown(title: str, setup: str, widths: list[int], analysis: dict, losses: dict) -> str:
    """The report: the optima table per parametrization, the paired comparison, the verdict, every grid point."""
    lines = [f"# {title}\n", setup + "\n", "![validation loss against lr per width](lr_transfer.png)\n"]
    for parametrization, result in analysis.items():
        name = "SP" if parametrization == "sp" else "μP"
        a, low, high = result["exponent"]
        lines += [f"## {name}\n", f"| width | best grid lr | its val loss (mean) | optimal lr [95% interval] | shift vs width {widths[0]} |",
                  "|---|---|---|---|---|"]
        lines += [f"| {w} | {o['best_grid_lr']:.2e} | {np.mean([v for v, _ in losses[parametrization][w][o['best_grid_lr']].values()]):.4f} "
                  f"| {lr_text(o)} | ×{s:.2f} |" for w, o, s in zip(widths, result["optima"], result["shift"])]
        lines += ["", f"Exponent a of lr* ~ width^-a: {a:.2f}, 95% bootstrap interval [{low:.2f}, {high:.2f}].\n",
                  transfer_text(widths, result), f"**Verdict ({name}):** {verdict(widths, result)}\n"]
    if set(analysis) == set(PARAMETRIZATIONS):
        versus = mup_against_sp(widths, losses, analysis)
        lines += [f"## μP tuned at width {widths[0]} against SP tuned at width {widths[-1]}\n",
                  f"Width {widths[-1]}, test loss of μP at width {widths[0]}'s best grid lr ({analysis['mup']['optima'][0]['best_grid_lr']:.2e}) "
                  f"minus SP at width {widths[-1]}'s own ({analysis['sp']['optima'][-1]['best_grid_lr']:.2e}), paired by seed: {versus.summary()}\n",
                  f"**Verdict (μP against SP):** at width {widths[-1]}, μP with the lr tuned at width {widths[0]} is "
                  + {"better": "better than", "worse": "worse than"}.get(versus.verdict, "not distinguishable from")
                  + f" SP tuned at width {widths[-1]} itself: a transferred lr is only worth as much as the loss it reaches.\n"]
    lines += ["## Every grid point (final validation loss / test loss per seed)\n", "| parametrization | width | lr | seeds: val / test |", "|---|---|---|---|"]
    for parametrization, by_width in losses.items():
        for width in widths:
            for lr, by_seed in by_width[width].items():
                cells = ", ".join(f"{s}: {v:.4f} / {t:.4f}" for s, (v, t) in sorted(by_seed.items()))
                lines.append(f"| {parametrization} | {width} | {lr:.2e} | {cells} |")
    return "\n".join(lines) + "\n"


def summary_json(widths: list[int], analysis: dict) -> str:
    rows = {p: {"widths": widths, "optimal_lr": [o["lr"] for o in r["optima"]], "low": [o["low"] for o in r["optima"]],
                "high": [o["high"] for o in r["optima"]], "inside_grid": [o["inside"] for o in r["optima"]],
                "best_grid_lr": [o["best_grid_lr"] for o in r["optima"]], "shift": r["shift"], "exponent": list(r["exponent"]),
                "paired_mean": r["paired"].mean, "paired_ci": list(r["paired"].interval), "paired_verdict": r["paired"].verdict}
            for p, r in analysis.items()}
    return json.dumps(rows, indent=1)


def minutes(study) -> tuple[float, object, object]:
    """(minutes of its completed trials added up, first start, last end): a study's cost, from Optuna's times."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return (sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done) / 60,
            min(t.datetime_start for t in done), max(t.datetime_complete for t in done))


def run(cfg: DictConfig, widths: list[int], report_dir: str) -> dict:
    """Every study (resumed where it stopped), then the report in `report_dir` and an MLflow run holding it."""
    from research.config import resolve_path
    from research.hardware import machine_summary

    losses: dict[str, dict[int, dict]] = {p: {} for p in PARAMETRIZATIONS}
    cost: dict[str, tuple] = {}
    for parametrization in PARAMETRIZATIONS:
        for width in widths:
            losses[parametrization][width] = bracketed(study_config(cfg, parametrization, width), cost)
    analysis = analyse(widths, losses, cfg.seed)
    machine = machine_summary(cfg.train)
    setup = (f"Widths {widths} ({cfg.model.num_hidden_layers} layers, {cfg.model.num_attention_heads} heads), μP base width "
             f"{cfg.model.base_width}; {cfg.train.max_steps} steps of {cfg.train.batch_size} x {cfg.data.seq_len} tokens, warmup "
             f"{cfg.train.warmup_steps}, cosine to lr x {cfg.train.min_lr_ratio}; lr grid of `exp={cfg.exp}`'s SEARCH_SPACE at "
             f"{cfg.sweep.grid_seeds} seeds ({cfg.seed}, ...). Optimum: parabola through the best grid point and its neighbours in "
             f"log lr, on the mean final validation loss; interval: {BOOTSTRAP} bootstrap resamples of the seeds. Studies: "
             + ", ".join(f"`{name}` {m:.1f} min" for name, (m, _, _) in cost.items())
             + f"; {sum(m for m, _, _ in cost.values()):.0f} minutes of training added up, "
             f"{(max(e for _, _, e in cost.values()) - min(b for _, b, _ in cost.values())).total_seconds() / 60:.0f} minutes from the "
             f"first run's start to the last one's end with the workers that ran them, on {machine} (a machine shared with other work).")
    out = resolve_path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [plot(widths, losses, analysis, machine, out / "lr_transfer.png")]
    (out / "lr_transfer.md").write_text(report_markdown("Learning-rate transfer across widths: SP and μP", setup, widths, analysis, losses))
    (out / "lr_transfer.json").write_text(summary_json(widths, analysis))
    files += [out / "lr_transfer.md", out / "lr_transfer.json"]
    if cfg.tracking.enabled:
        log_report(cfg, analysis, files)
    for parametrization, result in analysis.items():
        print(f"{parametrization}: {verdict(widths, result)}")
    print(f"report: {out / 'lr_transfer.md'}")
    return analysis


def bracketed(study_cfg: DictConfig, cost: dict[str, tuple]) -> dict[float, dict[int, tuple[float, float]]]:
    """The study's grid losses, extended one grid step at a time beyond an edge that holds the best mean validation loss."""
    from research.search_space import Float
    from research.sweep import run_sweep

    study = run_sweep(study_cfg)
    losses, cost[study_cfg.sweep.study_name] = grid_losses(study), minutes(study)
    lrs = list(losses)
    step = lrs[1] / lrs[0]
    for _ in range(MAX_EXTENSIONS):
        lrs = list(losses)
        means = [np.mean([v for v, _ in losses[lr].values()]) for lr in lrs]
        best = int(np.argmin(means))
        if 0 < best < len(lrs) - 1:
            break
        lr = float(f"{(lrs[0] / step if best == 0 else lrs[-1] * step):.3g}")
        name = f"{study_cfg.sweep.study_name}-lr{lr:g}"
        extension = run_sweep(apply_overrides(study_cfg.copy(), {"sweep.study_name": name, "sweep.n_trials": study_cfg.sweep.grid_seeds}),
                              {LR_KEY: Float(lr, lr, log=True, grid=(lr,))})
        losses = dict(sorted({**losses, **grid_losses(extension)}.items()))
        cost[name] = minutes(extension)
    return losses


def log_report(cfg: DictConfig, analysis: dict, files: list[Path]) -> None:
    """The report's figures as metrics, its files as artifacts, on one MLflow run of the experiment."""
    from research.tracking import mlflow_run

    with mlflow_run(apply_overrides(cfg.copy(), {"tracking.run_name": f"{cfg.exp}-report"})) as (client, run_id):
        for parametrization, result in analysis.items():
            client.log_metric(run_id, f"{parametrization}/lr_exponent", result["exponent"][0])
            client.log_metric(run_id, f"{parametrization}/paired_test_loss_diff", result["paired"].mean)
            for width_index, o in enumerate(result["optima"]):
                client.log_metric(run_id, f"{parametrization}/optimal_lr", o["lr"], step=width_index)
        for path in files:
            client.log_artifact(run_id, str(path))
