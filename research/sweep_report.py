"""What a study found, and how sure it is: configurations ranked by their mean over seeds, against the default.

A single seed's ranking is mostly noise at this scale (the baseline's own seeds span 0.15 in
validation loss), so the study trains its best configurations and the recipe's default again at
extra seeds (research/sweep.py queues those "confirm" trials), and the answer is the best mean.
This module reads the finished trials; it writes nothing to the study.
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
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from mlflow.entities import Metric, RunTag
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from research.config import flatten, resolve_path
from research.names import END_REASON

STAGE_ATTR = "stage"  # trial user attr: default | search | grid | confirm
SEED_ATTR = "seed"  # trial user attr: the seed the trial trains with
CONFIRM_RANK_ATTR = "confirm_rank"  # confirm trials: which candidate they retrain (0 = the default when it was queued)
STEPS_ATTR = "steps"  # trial user attr: optimizer steps it trained (pruned trials stop early)
SEARCHED = ("default", "search", "grid")  # the stages whose trials rank configurations
NOISE_Z = 2.0  # a gain counts as real when it exceeds this many standard errors of the difference of means


@dataclass
class Configuration:
    """One setting of the searched parameters and its final validation losses, one per seed."""

    params: dict[str, float]
    role: str  # "default", "search" or "grid"
    losses: dict[int, float] = field(default_factory=dict)  # seed -> final val loss
    trial_numbers: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.losses)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.losses.values())

    @property
    def sd(self) -> float:
        return statistics.stdev(self.losses.values()) if self.n > 1 else math.nan

    def describe(self) -> str:
        spread = f" ± {self.sd:.3f}" if self.n > 1 else ""
        return f"{self.mean:.4f}{spread} (n={self.n})"


def config_key(params: dict) -> tuple:
    return tuple(sorted((k, round(float(v), 12)) for k, v in params.items()))


def candidates(trials: list[FrozenTrial], top_k: int) -> list[dict]:
    """The parameters confirm trials retrain: the default first (if it was queued), then the `top_k` best other searched ones."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get(STAGE_ATTR) in SEARCHED]
    defaults = [t.params for t in done if t.user_attrs.get(STAGE_ATTR) == "default"]
    ranked, seen = [], {config_key(p) for p in defaults}
    for trial in sorted(done, key=lambda t: t.value):
        if config_key(trial.params) not in seen:
            seen.add(config_key(trial.params))
            ranked.append(trial.params)
    return defaults[:1] + ranked[:top_k]


def configurations(trials: list[FrozenTrial], recipe_default: dict | None = None) -> list[Configuration]:
    """Every configuration with a completed trial, its losses grouped by seed, in order of first appearance.

    The default is the configuration of the trials queued as such, or (a grid) the one whose values are the recipe's own.
    """
    found: dict[tuple, Configuration] = {}
    for trial in trials:
        if trial.state != TrialState.COMPLETE or not trial.params:
            continue
        stage = trial.user_attrs.get(STAGE_ATTR, "search")
        config = found.setdefault(config_key(trial.params), Configuration(dict(trial.params), stage if stage in SEARCHED else "search"))
        if stage == "default":
            config.role = "default"
        config.losses[trial.user_attrs.get(SEED_ATTR, 0)] = trial.value
        config.trial_numbers.append(trial.number)
    if recipe_default and not any(c.role == "default" for c in found.values()):
        for config in found.values():
            if all(math.isclose(float(v), float(recipe_default.get(k, math.nan))) for k, v in config.params.items()):
                config.role = "default"
    return list(found.values())


def best_configuration(configs: list[Configuration]) -> Configuration | None:
    """The lowest mean among the configurations trained at the most seeds (the confirmed ones, when there are any)."""
    if not configs:
        return None
    most = max(c.n for c in configs)
    return min((c for c in configs if c.n == most), key=lambda c: c.mean)


def verdict(best: Configuration, default: Configuration | None) -> str:
    """One sentence: the best configuration's gain over the default, and whether it exceeds the seed noise."""
    if default is None:
        return "no default configuration was trained, so there is no reference to compare with"
    if best is default:
        return f"the default is the best configuration found: {default.describe()}"
    gain = default.mean - best.mean
    if best.n < 2 or default.n < 2:
        return f"gain over the default {gain:+.4f} from a single seed: the noise is unknown, so this is not evidence of a better setting"
    se = math.sqrt(best.sd ** 2 / best.n + default.sd ** 2 / default.n)
    if gain > NOISE_Z * se:
        return f"gain over the default {gain:+.4f} exceeds the seed noise ({NOISE_Z:g} standard errors = {NOISE_Z * se:.4f})"
    return f"gain over the default {gain:+.4f} does NOT exceed the seed noise ({NOISE_Z:g} standard errors = {NOISE_Z * se:.4f}): treat them as equal"


def total_steps(trials: list[FrozenTrial]) -> int:
    """Optimizer steps trained by all trials of the study (pruned ones up to where they stopped)."""
    return sum(int(t.user_attrs.get(STEPS_ATTR, 0)) for t in trials)


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


def summarise(study, cfg: DictConfig, recipe_cfg: DictConfig, space: dict[str, str], storage_text: str, client, parent_run_id: str | None, console) -> None:
    """Every trial, every configuration's mean ± sd, the answer and its command: printed, written to
    <out_dir>/<study>/summary.md with Optuna's plots, and logged to the parent run."""
    trials = study.get_trials(deepcopy=False)
    t = cfg.train
    configs = configurations(trials, {"train.lr": t.lr, "train.warmup_steps": t.warmup_steps, "train.min_lr_ratio": t.min_lr_ratio})
    best = best_configuration(configs)
    default = next((c for c in configs if c.role == "default"), None)
    steps = total_steps(trials)
    importances = param_importances(study)
    paragraphs = [f"storage: `{storage_text}`; {len(trials)} trials ({state_counts(trials)}); {steps:,} training steps in all; "
                  "search space: " + "; ".join(f"{k} {v}" for k, v in space.items())]
    command = ""
    if best is not None:
        command = retrain_command(cfg, recipe_cfg, best.params)
        paragraphs += [f"**best**: {format_params(best.params)}: final val loss {best.describe()}",
                       "**default**: " + (f"{format_params(default.params)}: {default.describe()}" if default else "not trained"),
                       f"**verdict**: {verdict(best, default)}", f"train it: `{command}`"]
    if importances:
        paragraphs.append("parameter importance (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
    tables = [(["configuration", "role", "mean ± sd (n)", "trials"],
               [[format_params(c.params), c.role, c.describe(), ", ".join(map(str, c.trial_numbers))] for c in configs], {configs.index(best)} if best else set()),
              (["trial", "stage", "seed", *space, "val loss", "steps", "state", "note"], [trial_row(t, space) for t in trials],
               {i for i, t in enumerate(trials) if best and t.number in best.trial_numbers})]
    console.print("\n\n".join(paragraphs))
    write_report(study, f"Study {study.study_name}", paragraphs, tables, report_folders(cfg, study.study_name), client, parent_run_id, console)
    if client and parent_run_id:
        log_answer(client, parent_run_id, best, default, steps, importances, command, len(trials))


def trial_row(trial: FrozenTrial, space: dict[str, str]) -> list[str]:
    values = [f"{trial.params[k]:.4g}" if k in trial.params else "" for k in space]
    loss = f"{trial.value:.4f}" if trial.value is not None and trial.state == TrialState.COMPLETE else ""
    return [str(trial.number), trial.user_attrs.get(STAGE_ATTR, ""), str(trial.user_attrs.get(SEED_ATTR, "")), *values, loss,
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


def log_answer(client, parent_run_id: str, best: Configuration | None, default: Configuration | None, steps: int,
               importances: dict[str, float], command: str, step: int) -> None:
    """Metrics and tags, not params: the answer changes as the study grows, and MLflow params cannot."""
    metrics = {"sweep/total_steps": float(steps), **{f"importance/{k}": v for k, v in importances.items()}}
    tags = {}
    if best is not None:
        metrics.update({"best/val_loss": best.mean, "best/val_loss_n": float(best.n), **{f"best/{k}": float(v) for k, v in best.params.items()}})
        if best.n > 1:
            metrics["best/val_loss_sd"] = best.sd
        tags.update({f"best.{k}": f"{v:.6g}" for k, v in best.params.items()})
        tags.update({"best.retrain_command": command, "best.trial_numbers": ",".join(map(str, best.trial_numbers)), "best.verdict": verdict(best, default)})
    if default is not None:
        metrics["default/val_loss"] = default.mean
        if default.n > 1:
            metrics["default/val_loss_sd"] = default.sd
    now_ms = int(time.time() * 1000)
    client.log_batch(parent_run_id, metrics=[Metric(k, v, now_ms, step) for k, v in metrics.items()], tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
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
