"""What a sweep searches, declared once by the recipe: `SEARCH_SPACE = {"train.lr": Float(1e-3, 8e-3, log=True), ...}`.

An experiment module may define `SEARCH_SPACE`, a {config key: dimension} dict (inherited from its
`BASE` like the overrides). Everything about the space reads that one declaration: Optuna's sampler
(`suggest`), the grid sampler (each dimension's `grid` values; a dimension without them keeps the
recipe's value), the report and the parent run's tags (`describe`), and the retrain command (which
sets every key of the space). A recipe without one sweeps `DEFAULT_SPACE`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import optuna

from research.errors import UserError


@dataclass(frozen=True)
class Float:
    """A real-valued setting in [low, high], log-uniform when `log`; `grid` lists the values a grid sampler takes."""

    low: float
    high: float
    log: bool = False
    grid: tuple[float, ...] = field(default=())

    def suggest(self, trial: optuna.Trial, key: str) -> float:
        return trial.suggest_float(key, self.low, self.high, log=self.log)

    def describe(self) -> str:
        text = f"{'log-uniform' if self.log else 'uniform'} [{self.low:g}, {self.high:g}]"
        return text + (f", grid {list(self.grid)}" if self.grid else "")

    def check(self, key: str) -> None:
        if not (self.low <= self.high and (not self.log or self.low > 0)):
            raise UserError(f"search space of {key}: need low <= high{' and low > 0 (log scale)' if self.log else ''}, got {self.low:g} and {self.high:g}")


@dataclass(frozen=True)
class Int:
    """An integer setting in [low, high] (clipped to `upper` when the recipe bounds it, e.g. warmup by max_steps)."""

    low: int
    high: int
    grid: tuple[int, ...] = field(default=())

    def suggest(self, trial: optuna.Trial, key: str) -> int:
        return trial.suggest_int(key, self.low, self.high)

    def describe(self) -> str:
        return f"int [{self.low}, {self.high}]" + (f", grid {list(self.grid)}" if self.grid else "")

    def check(self, key: str) -> None:
        if self.low > self.high:
            raise UserError(f"search space of {key}: need low <= high, got {self.low} and {self.high}")


Dimension = Float | Int

DEFAULT_SPACE: dict[str, Dimension] = {  # the schedule around any recipe's peak lr: what `exp=NAME sweep.n_trials=N` searches
    "train.lr": Float(1e-4, 1e-2, log=True),  # peak learning rate
    "train.warmup_steps": Int(0, 100),  # linear warmup, in steps (clipped to train.max_steps)
    "train.min_lr_ratio": Float(0.0, 1.0),  # floor of the cosine decay, as a share of the peak
}


def bounded(space: dict[str, Dimension], max_steps: int) -> dict[str, Dimension]:
    """The space with warmup clipped to the run's length: a warmup longer than the run is no schedule at all."""
    out = dict(space)
    if isinstance(warmup := out.get("train.warmup_steps"), Int) and warmup.high > max_steps:
        out["train.warmup_steps"] = Int(min(warmup.low, max_steps), max_steps, tuple(g for g in warmup.grid if g <= max_steps))
    return out


def check(space: dict[str, Dimension], known_keys: set[str]) -> None:
    """Every key is a config key, and every dimension is well-formed: one line otherwise."""
    if not space:
        raise UserError("the search space is empty: declare SEARCH_SPACE in the experiment (see research/search_space.py)")
    for key, dim in space.items():
        if key not in known_keys:
            raise UserError(f"search space names '{key}', which is not a config key (python run.py keys)")
        if not isinstance(dim, (Float, Int)):
            raise UserError(f"search space of {key}: expected Float(...) or Int(...), got {dim!r}")
        dim.check(key)


def suggest(trial: optuna.Trial, space: dict[str, Dimension]) -> dict[str, float | int]:
    """The trial's values for every key of the space (a queued trial gets its fixed values back)."""
    return {key: dim.suggest(trial, key) for key, dim in space.items()}


def describe(space: dict[str, Dimension]) -> dict[str, str]:
    return {key: dim.describe() for key, dim in space.items()}


def grid_points(space: dict[str, Dimension]) -> list[dict[str, float | int]]:
    """Every combination of the dimensions that list grid values, in declaration order; the others keep the recipe's value."""
    gridded = {key: dim.grid for key, dim in space.items() if dim.grid}
    if not gridded:
        raise UserError("sweep.sampler=grid needs grid values: give some dimensions of SEARCH_SPACE grid=(...)")
    return [dict(zip(gridded, values)) for values in itertools.product(*gridded.values())]
