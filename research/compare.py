"""`run.py compare A B`: two sets of logged runs, paired by seed, with an interval, a verdict and what else differs.

A selector names a set of runs in the tracking store:

    <run id>                      one run; a sweep's parent run stands for its answer's evaluation runs,
                                  and alone (no B) compares them with the default's
    <id>,<id>,...                 those runs
    <experiment>                  every finished run of that MLflow experiment
    <experiment>:<filter>         ... that matches an MLflow search filter, e.g. "baseline:params.train.lr = '0.002'"

The figures are `research.paired.Paired`'s; the same table goes to the terminal and, with out=FILE, to Markdown.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from rich.console import Console
from rich.table import Table

from research import names
from research.errors import UserError
from research.paired import Paired

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
PER_RUN_KEYS = {"seed", "tracking.run_name", "train.checkpoint_dir", "train.resume_from"}  # differ between any two runs: not a confound


@dataclass
class RunSet:
    """The runs a selector named, and how to call them in the table."""

    label: str
    runs: list[Run]


def select(client, selector: str, role: str = "answer") -> RunSet:
    """The runs a selector names (see the module docstring); one line when it names none."""
    selector = selector.strip()
    if "," in selector or RUN_ID.match(selector):
        ids = [part.strip() for part in selector.split(",") if part.strip()]
        runs = [get_run(client, run_id) for run_id in ids]
        if len(runs) == 1 and is_sweep_parent(runs[0]):
            return sweep_side(client, runs[0], role)
        return RunSet(short(selector), runs)
    name, _, filter_string = selector.partition(":")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise UserError(f"no run id or MLflow experiment named '{name}' in this store; give a 32-hex run id, id,id,..., or an experiment name")
    try:
        runs = client.search_runs([experiment.experiment_id], filter_string=filter_string, max_results=5000)
    except MlflowException as err:
        raise UserError(f"bad filter '{filter_string}': {str(err).splitlines()[0]} (MLflow search syntax, e.g. params.train.lr = '0.002')") from None
    runs = [r for r in runs if r.info.status == "FINISHED" and not is_sweep_parent(r)]
    if not runs:
        raise UserError(f"no finished run in experiment '{name}'" + (f" matches {filter_string}" if filter_string else ""))
    return RunSet(selector, runs)


def get_run(client, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run {run_id} in this store (set tracking.uri= or out_dir= to the store that has it)") from None


def is_sweep_parent(run: Run) -> bool:
    return names.SWEEP_STUDY_NAME in run.data.tags and names.PARENT_RUN not in run.data.tags


def sweep_side(client, parent: Run, role: str) -> RunSet:
    """A study's evaluation runs of its answer (or of its default): the children at the evaluation stage with those parameters."""
    tags = parent.data.tags
    answer = {key.removeprefix("best."): float(value) for key, value in tags.items()
              if key.startswith("best.") and key.removeprefix("best.") in parent.data.params}
    if not answer:
        raise UserError(f"sweep {parent.info.run_id} has no answer yet (its study has not finished)")
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.{names.PARENT_RUN} = '{parent.info.run_id}'", max_results=5000)
    evaluated = [r for r in children if r.data.tags.get(names.SWEEP_STAGE) == "evaluate" and r.info.status == "FINISHED"]

    def is_answer(run: Run) -> bool:
        return all(math.isclose(float(run.data.params[k]), v, rel_tol=1e-5) for k, v in answer.items() if k in run.data.params)

    chosen = [r for r in evaluated if is_answer(r) == (role == "answer")]
    if not chosen:
        raise UserError(f"sweep {parent.info.run_id} has no finished evaluation runs of its {role} (sweep.eval_seeds=0?)")
    return RunSet(f"{tags.get(names.SWEEP_STUDY_NAME, 'sweep')} {role}", chosen)


def short(selector: str) -> str:
    return ",".join(part[:8] for part in selector.split(","))


def by_seed(side: RunSet, metric: str) -> dict[int, float]:
    """{seed: the metric's value}; one line when a run lacks the metric or two runs share a seed."""
    values: dict[int, float] = {}
    for run in side.runs:
        if metric not in run.data.metrics:
            raise UserError(f"run {run.info.run_id} ({side.label}) has no metric {metric}"
                            + (" (logged before the test split existed: try metric=final/val_loss)" if metric.startswith("test/") else ""))
        seed = int(run.data.params.get("seed", -1))
        if seed in values:
            raise UserError(f"{side.label} has two runs at seed {seed}: narrow the selection so each seed has one run")
        values[seed] = run.data.metrics[metric]
    return values


def differing_keys(a: RunSet, b: RunSet) -> list[tuple[str, str, str]]:
    """(key, A's values, B's values) for every param that is not the same single value on both sides: what is compared, and what is confounded."""
    keys = {k for run in a.runs + b.runs for k in run.data.params} - PER_RUN_KEYS
    rows = []
    for key in sorted(keys):
        va = sorted({run.data.params.get(key, "(unset)") for run in a.runs})
        vb = sorted({run.data.params.get(key, "(unset)") for run in b.runs})
        if va != vb or len(va) > 1:
            rows.append((key, ", ".join(va), ", ".join(vb)))
    return rows


def compare(client, a_selector: str, b_selector: str | None, metric: str, lower_is_better: bool, out: str | None, console: Console) -> Paired:
    """Print (and with `out`, write as Markdown) the seed-paired comparison of A against B."""
    if b_selector is None and not (RUN_ID.match(a_selector.strip()) and is_sweep_parent(get_run(client, a_selector.strip()))):
        raise UserError("compare needs two selectors (A B), or one sweep parent run id (its answer against its default)")
    a = select(client, a_selector, "answer")
    b = select(client, a_selector if b_selector is None else b_selector, "default")
    paired = Paired(by_seed(a, metric), by_seed(b, metric), lower_is_better)
    if paired.n == 0:
        raise UserError(f"no seed is in both: A has seeds {sorted(paired.a)}, B has {sorted(paired.b)}; train the missing seeds or pick other runs")
    lines = markdown(a, b, paired, metric)
    render(a, b, paired, metric, console)
    if out:
        Path(out).expanduser().write_text("\n".join(lines) + "\n")
        console.print(f"written to {out}")
    return paired


def summary_rows(paired: Paired) -> list[tuple[str, str]]:
    low, high = paired.interval
    return [("mean difference (A - B)", f"{paired.mean:+.4f}"), ("sd of the differences", f"{paired.sd:.4f}"), ("n (paired seeds)", str(paired.n)),
            ("95% interval (Student t)", f"[{low:+.4f}, {high:+.4f}]"), ("verdict (A against B)", paired.verdict),
            ("smallest difference n can detect (80% power)", f"{paired.detectable:.4f}")]


def render(a: RunSet, b: RunSet, paired: Paired, metric: str, console: Console) -> None:
    console.print(f"A: {a.label} ({len(a.runs)} runs)\nB: {b.label} ({len(b.runs)} runs)", soft_wrap=True, markup=False)
    table = Table(title=f"{metric}, paired by seed")
    for column in ("seed", "A", "B", "A - B"):
        table.add_column(column, justify="right")
    for seed in paired.seeds:
        table.add_row(str(seed), f"{paired.a[seed]:.4f}", f"{paired.b[seed]:.4f}", f"{paired.a[seed] - paired.b[seed]:+.4f}")
    console.print(table)
    for name, value in summary_rows(paired):
        console.print(f"{name}: [bold]{value}[/]")
    unpaired = sorted(set(paired.a) ^ set(paired.b))
    if unpaired:
        console.print(f"left out, run on one side only: seeds {unpaired}")
    differ = differing_keys(a, b)
    if differ:
        keys = Table(title="config keys that differ (or vary within a side)")
        for column in ("key", "A", "B"):
            keys.add_column(column)
        for row in differ:
            keys.add_row(*row)
        console.print(keys)


def markdown(a: RunSet, b: RunSet, paired: Paired, metric: str) -> list[str]:
    lines = [f"# {metric}: A = {a.label}, B = {b.label}", "", "| seed | A | B | A - B |", "|---|---|---|---|"]
    lines += [f"| {s} | {paired.a[s]:.4f} | {paired.b[s]:.4f} | {paired.a[s] - paired.b[s]:+.4f} |" for s in paired.seeds]
    lines += ["", *(f"- {name}: **{value}**" for name, value in summary_rows(paired))]
    differ = differing_keys(a, b)
    if differ:
        lines += ["", "| config key that differs | A | B |", "|---|---|---|", *(f"| {k} | {va} | {vb} |" for k, va, vb in differ)]
    return lines
