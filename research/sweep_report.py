"""What a study found, and how sure it is: the answer against the default, paired by seed on runs nobody chose on.

The stages and the choice are research/study_plan.py's; this module reads the finished trials and
writes the report (printed, summary.md and summary.html with Optuna's plots under
<out_dir>/sweeps/<study>/ and sweep.report_dir, and the parent run's metrics and tags). It writes
nothing to the study.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
import shlex
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import optuna
from mlflow.entities import Metric, RunTag
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from research.config import flatten, resolve_path
from research.names import END_REASON
from research.paired import Paired
from research.search_space import describe
from research.study_plan import (
    BPB_ATTRS, SEED_ATTR, STAGE_ATTR, STEPS_ATTR, TEST_LOSS_ATTR, Configuration, candidates, choice_seeds, choose, configurations, default_params, eval_seeds,
    score, total_steps,
)


def spread(values: list[float]) -> str:
    """'mean ± sd (n)' of a list of losses; the sd only from two values on."""
    if not values:
        return "none"
    sd = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.4f}{sd} (n={len(values)})"


def retrain_command(cfg: DictConfig, recipe_cfg: DictConfig, params: dict) -> str:
    """The command that trains `params` exactly as the study's trials did: every override it ran with, then the parameters.

    `recipe_cfg` is the experiment as `run.py exp=NAME` builds it with no overrides; the study's own
    sweep.* settings are left out (sweep.n_trials=0 makes it a plain run).
    """
    ours, recipe = flatten(cfg), flatten(recipe_cfg)
    overrides = {k: v for k, v in ours.items() if recipe.get(k) != v and not k.startswith(("sweep.", "tracking.run_name")) and k != "exp"}
    overrides.update({k: f"{float(v):.6g}" if isinstance(v, float) else v for k, v in params.items()})
    args = [f"exp={cfg.exp}", "sweep.n_trials=0"] + [f"{k}={format_value(v)}" for k, v in overrides.items()]
    return "python run.py " + " ".join(shlex.quote(a) for a in args)


def format_value(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


# ---- the report: printed, written beside the study, logged to the parent run ----


def summarise(study, cfg: DictConfig, recipe_cfg: DictConfig, space: dict, storage_text: str, client, parent_run_id: str | None, console) -> None:
    """The answer, how it was chosen, and its paired comparison with the default at the evaluation seeds:
    printed, written to <out_dir>/sweeps/<study>/ (and sweep.report_dir) with Optuna's plots, and logged to the parent run."""
    trials = study.get_trials(deepcopy=False)
    configs = configurations(trials, default_params(cfg, space))
    answer, default = choose(configs, cfg), next((c for c in configs if c.is_default), None)
    paired = Paired(answer.test(eval_seeds(cfg)), default.test(eval_seeds(cfg))) if answer and default else None
    steps, importances = total_steps(trials), param_importances(study)
    paragraphs = [f"storage: `{storage_text}`; {len(trials)} trials ({state_counts(trials)}); {steps:,} training steps in all; "
                  "search space: " + "; ".join(f"{k} {v}" for k, v in describe(space).items()), how_chosen(cfg)]
    command = ""
    if answer is not None:
        command = retrain_command(cfg, recipe_cfg, answer.params)
        paragraphs += [f"**answer**: {format_params(answer.params)}" + (" (the default)" if answer.is_default else ""),
                       evaluation_text(answer, default, paired, cfg), f"train it: `{command}`"]
    if importances:
        paragraphs.append(f"parameter importance (fANOVA, search-seed validation {cfg.sweep.objective}): " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
    tables = [t for t in (evaluation_table(answer, default, cfg), choice_table(configs, answer, cfg)) if t]
    shown = answer_trials(answer, cfg)
    bpb_columns = ["val bpb", "test bpb"] if cfg.sweep.objective == "loss" else []  # with objective=bpb the val and test columns are bpb
    tables.append((["trial", "stage", "seed", *space, f"val {cfg.sweep.objective}", f"test {cfg.sweep.objective}", *bpb_columns, "steps", "state", "note"],
                   [trial_row(t, space, bool(bpb_columns)) for t in trials],
                   {i for i, t in enumerate(trials) if t.number in shown}))
    console.print("\n\n".join(paragraphs))
    write_report(study, f"Study {study.study_name}", paragraphs, tables, report_folders(cfg, study.study_name), client, parent_run_id, console)
    if client and parent_run_id:
        log_answer(client, parent_run_id, answer, default, paired, cfg, steps, importances, command, len(trials))


def answer_trials(answer: Configuration | None, cfg: DictConfig) -> list[int]:
    """The answer's trials the report points at: its evaluation runs, or without them the runs it was chosen on."""
    if answer is None:
        return []
    return answer.trial_numbers(eval_seeds(cfg)) or answer.trial_numbers(choice_seeds(cfg))


def how_chosen(cfg: DictConfig) -> str:
    s, o = cfg.sweep, cfg.sweep.objective
    if s.sampler == "grid":
        chosen = f"every grid point at seeds {choice_seeds(cfg)}, chosen by {s.choose_by} validation {o} over those seeds"
    elif s.confirm_seeds:
        chosen = (f"searched at seed {cfg.seed} on validation {o}; the top {s.confirm_top_k} trained again at seeds {choice_seeds(cfg)} "
                  f"and chosen there by {s.choose_by} validation {o}")
    else:
        chosen = f"searched at seed {cfg.seed} and chosen there on validation {o} (no confirmation: the best of one seed)"
    evaluated = (f"then the answer and the default trained at seeds {eval_seeds(cfg)}, which nothing was chosen on: their test {o}, "
                 "paired by seed, are the figures below" if s.eval_seeds else "no evaluation seeds (sweep.eval_seeds=0): no figure here is free of selection")
    return f"**how**: {chosen}; {evaluated}"


def evaluation_text(answer: Configuration, default: Configuration | None, paired: Paired | None, cfg: DictConfig) -> str:
    if not cfg.sweep.eval_seeds:
        return "**evaluation**: none"
    if default is None or paired is None:
        return "**evaluation**: no default configuration was trained, so there is no reference to compare with"
    if answer is default:
        return f"**evaluation**: the answer is the default: test {cfg.sweep.objective} {spread(list(default.test(eval_seeds(cfg)).values()))}"
    return (f"**evaluation** (test {cfg.sweep.objective} at seeds {paired.seeds}): answer {spread(list(paired.a.values()))}, default {spread(list(paired.b.values()))}; "
            f"answer - default {paired.summary()}")


def evaluation_table(answer: Configuration | None, default: Configuration | None, cfg: DictConfig):
    if answer is None or default is None or answer is default or not cfg.sweep.eval_seeds:
        return None
    a, b = answer.test(eval_seeds(cfg)), default.test(eval_seeds(cfg))
    rows = [[str(s), f"{a[s]:.4f}", f"{b[s]:.4f}", f"{a[s] - b[s]:+.4f}"] for s in sorted(set(a) & set(b))]
    o = cfg.sweep.objective
    return ["seed", f"answer test {o}", f"default test {o}", "answer - default"], rows, set()


def choice_table(configs: list[Configuration], answer: Configuration | None, cfg: DictConfig):
    seeds = choice_seeds(cfg)
    shown = candidates(configs, cfg)
    if not shown:
        return None
    rows = []
    for c in shown:
        values = c.val(seeds)
        rows.append([format_params(c.params) + (" (default)" if c.is_default else ""), *(f"{values[s]:.4f}" if s in values else "" for s in seeds),
                     spread(list(values.values())), f"{score(list(values.values()), cfg.sweep.choose_by):.4f}"])
    header = ["candidate", *(f"val, seed {s}" for s in seeds), "mean ± sd (n)", cfg.sweep.choose_by]
    return header, rows, {shown.index(answer)} if answer in shown else set()


def trial_row(trial: FrozenTrial, space: dict, with_bpb: bool = False) -> list[str]:
    values = [f"{trial.params[k]:.4g}" if k in trial.params else "" for k in space]
    done = trial.value is not None and trial.state == TrialState.COMPLETE
    loss = f"{trial.value:.4f}" if done else ""
    test = f"{trial.user_attrs[TEST_LOSS_ATTR]:.4f}" if done and TEST_LOSS_ATTR in trial.user_attrs else ""
    bpb = [f"{trial.user_attrs[a]:.4f}" if done and a in trial.user_attrs else "" for a in BPB_ATTRS] if with_bpb else []
    return [str(trial.number), trial.user_attrs.get(STAGE_ATTR, ""), str(trial.user_attrs.get(SEED_ATTR, "")), *values, loss, test, *bpb,
            str(trial.user_attrs.get(STEPS_ATTR, "")), trial.state.name, trial.user_attrs.get(END_REASON, "")]


def format_params(params: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def state_counts(trials: list[FrozenTrial]) -> str:
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)
    return ", ".join(f"{sum(t.state == s for t in trials)} {s.name.lower()}" for s in states if any(t.state == s for t in trials))


def param_importances(study) -> dict[str, float]:
    """Optuna's fANOVA importances over the completed trials; empty while fewer than two configurations finished."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return dict(optuna.importance.get_param_importances(study))
        except (RuntimeError, ValueError):
            return {}


def report_folders(cfg: DictConfig, name: str) -> list[Path]:
    """The study's own report folder, <out_dir>/sweeps/<study>/, and `sweep.report_dir` when set (e.g. a committed copy under results/)."""
    folders = [resolve_path(cfg.out_dir) / "sweeps" / name]
    if cfg.sweep.report_dir:
        folders.append(resolve_path(cfg.sweep.report_dir))
    return folders


def write_report(study, title: str, paragraphs: list[str], tables: list, folders: list[Path], client, parent_run_id: str | None, console) -> None:
    """summary.md, summary.html and the plots, written whole then copied into each folder (other workers may write at once), and to the parent run."""
    folders[0].mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folders[0]) as tmp:
        plots = save_plots(study, Path(tmp))
        (Path(tmp) / "summary.md").write_text(report_markdown(title, paragraphs, tables, plots))
        (Path(tmp) / "summary.html").write_text(report_html(title, paragraphs, tables, plots))
        if client and parent_run_id:
            client.log_artifacts(parent_run_id, tmp)
        for folder in folders:
            publish(Path(tmp), folder)
    console.print("summary: " + ", ".join(str(folder / "summary.md") for folder in folders))


def report_markdown(title: str, paragraphs: list[str], tables: list, plots: list[Path]) -> str:
    lines = [f"# {title}", ""] + [line for text in paragraphs for line in (text, "")]
    for header, rows, _ in tables:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows] + [""]
    lines += [f"![{p.stem.replace('_', ' ')}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


REPORT_STYLE = """body { font: 14px system-ui, sans-serif; margin: 16px; color: #1f2328; }
table { border-collapse: collapse; font-size: 13px; margin: 12px 0; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: right; }
th { background: #f6f8fa; } td:first-child, td:last-child { text-align: left; }
tr.best { background: #dafbe1; font-weight: 600; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 3px; }
figure { margin: 16px 0; } img { max-width: 100%; }"""


def report_html(title: str, paragraphs: list[str], tables: list, plots: list[Path]) -> str:
    """The summary as one self-contained page (plots embedded as data URIs): MLflow's artifact viewer renders it, images included."""

    def text(value: str) -> str:
        value = re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(value))
        return re.sub(r"\*\*([^*]*)\*\*", r"<b>\1</b>", value)

    parts = [f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>\n{REPORT_STYLE}\n</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", *(f"<p>{text(p)}</p>" for p in paragraphs)]
    for header, rows, best_rows in tables:
        parts.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr></thead><tbody>")
        parts += [('<tr class="best">' if i in best_rows else "<tr>") + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for i, row in enumerate(rows)]
        parts.append("</tbody></table>")
    for plot in plots:
        data = base64.b64encode(plot.read_bytes()).decode("ascii")
        caption = html.escape(plot.stem.replace("_", " "))
        parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{caption}\"><figcaption>{caption}</figcaption></figure>")
    return "\n".join(parts + ["</body></html>"]) + "\n"


def publish(source: Path, folder: Path) -> None:
    """Copy the report's files into `folder`, each written whole and then renamed into place."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        fd, partial = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
        os.close(fd)
        shutil.copyfile(path, partial)
        os.replace(partial, folder / path.name)


def log_answer(client, parent_run_id: str, answer: Configuration | None, default: Configuration | None, paired: Paired | None, cfg: DictConfig,
               steps: int, importances: dict[str, float], command: str, step: int) -> None:
    """Metrics and tags, not params: the answer changes as the study grows, and MLflow params cannot."""
    metrics = {"sweep/total_steps": float(steps), **{f"importance/{k}": v for k, v in importances.items()}}
    tags = {}
    seeds, o = eval_seeds(cfg), cfg.sweep.objective
    for name, config in (("best", answer), ("default", default)):
        values = list(config.test(seeds).values()) if config else []
        if values:
            metrics.update({f"{name}/test_{o}": statistics.fmean(values), f"{name}/test_{o}_n": float(len(values))})
            if len(values) > 1:
                metrics[f"{name}/test_{o}_sd"] = statistics.stdev(values)
    if answer is not None:
        metrics.update({f"best/{k}": float(v) for k, v in answer.params.items()})
        tags.update({f"best.{k}": f"{v:.6g}" for k, v in answer.params.items()})
        tags.update({"best.retrain_command": command, "best.trial_numbers": ",".join(map(str, answer_trials(answer, cfg)))})
        metrics["best/choice_score"] = score(list(answer.val(choice_seeds(cfg)).values()), cfg.sweep.choose_by)  # what it was chosen on
    if paired is not None and paired.n:
        low, high = paired.interval
        metrics.update({f"paired/test_{o}_diff": paired.mean, "paired/n": float(paired.n)})
        if paired.n > 1:
            metrics.update({"paired/diff_sd": paired.sd, "paired/ci_low": low, "paired/ci_high": high, "paired/detectable": paired.detectable})
        tags["best.verdict"] = f"answer - default on test {o}: {paired.summary()}"
    now_ms = int(time.time() * 1000)
    client.log_batch(parent_run_id, metrics=[Metric(k, v, now_ms, step) for k, v in metrics.items() if math.isfinite(v)],
                     tags=[RunTag(k, v[:5000]) for k, v in tags.items()])


def save_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's optimization history, parameter importances and intermediate values as PNGs (those it can draw yet)."""
    import matplotlib  # only here: a backend is chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    saved = []
    for name, plot in [("optimization_history", optuna_plots.plot_optimization_history),
                       ("param_importances", optuna_plots.plot_param_importances),
                       ("intermediate_values", optuna_plots.plot_intermediate_values)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = plot(study)
            except Exception:  # e.g. importances need two finished trials
                plt.close("all")
                continue
        figure = axes.figure
        figure.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        saved.append(folder / f"{name}.png")
    return saved
