"""Which trials a study still needs, read from the trials it has: search, then confirm, then evaluate.

A study's answer is only worth what the runs that were never used to choose it say. So a study
has three stages, each on seeds the earlier ones never used:

- **search** (stages `default`, `search`; or `grid`): the sampler proposes settings, trained at
  `seed`, judged (and pruned) on validation loss. The recipe's own values train first: the default.
- **confirm**: the `sweep.confirm_top_k` best searched configurations train again at
  `sweep.confirm_seeds` new seeds (`seed + 1`, ...). The answer is chosen there, on validation
  loss, by `sweep.choose_by` (default: the worst seed, so a setting next to a cliff loses). A grid
  has its seeds already: it chooses on them.
- **evaluate**: the answer and the default train at `sweep.eval_seeds` further seeds
  (`seed + EVAL_SEED_OFFSET`, ...), and their test losses, paired by seed, are the figures the
  report gives. Nothing was chosen on those runs.

`plan` is a pure function of the trials, so any worker can call it at any time, a rerun with nothing
new adds nothing, a configuration and seed that already ran is reused, and a study grown with more
search trials confirms and evaluates its new top k.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

STAGE_ATTR = "stage"  # trial user attr: default | search | grid | confirm | evaluate
SEED_ATTR = "seed"  # trial user attr: the seed the trial trains with
STEPS_ATTR = "steps"  # trial user attr: optimizer steps it trained (pruned trials stop early)
TEST_LOSS_ATTR = "test_loss"  # trial user attr: final test value of sweep.objective, test loss or test bpb (read only by the evaluation stage's report)
BPB_ATTRS = ("val_bpb", "test_bpb")  # trial user attrs: final val/bpb and test/bpb, shown beside the losses in the report's trial table
SEARCHED = ("default", "search", "grid")  # the stages whose trials are proposed by the sampler (or the recipe)
EVAL_SEED_OFFSET = 1000  # evaluation seeds start here above `seed`: apart from the search and confirm seeds, whatever their number
CHOOSE_RULES = ("worst", "mean_plus_sd", "mean")


def config_key(params: dict) -> tuple:
    return tuple(sorted((k, round(float(v), 12)) for k, v in params.items()))


def trial_params(trial: FrozenTrial) -> dict:
    """A trial's parameters, or, while it waits in the queue, the ones it was queued with."""
    return trial.params or dict(trial.system_attrs.get("fixed_params", {}))


def default_params(cfg: DictConfig, space: dict) -> dict:
    """The recipe's own values of the searched keys: the default configuration, the reference of every comparison."""
    return {key: OmegaConf.select(cfg, key) for key in space}


def confirm_seeds(cfg: DictConfig) -> list[int]:
    return [cfg.seed + 1 + i for i in range(cfg.sweep.confirm_seeds)]


def eval_seeds(cfg: DictConfig) -> list[int]:
    return [cfg.seed + EVAL_SEED_OFFSET + i for i in range(cfg.sweep.eval_seeds)]


def grid_seeds(cfg: DictConfig) -> list[int]:
    return [cfg.seed + i for i in range(cfg.sweep.grid_seeds)]


def choice_seeds(cfg: DictConfig) -> list[int]:
    """The seeds the answer is chosen on: the grid's, the confirmation's, or (neither) the search seed alone."""
    if cfg.sweep.sampler == "grid":
        return grid_seeds(cfg)
    return confirm_seeds(cfg) or [cfg.seed]


@dataclass
class Configuration:
    """One setting of the searched parameters and its completed trials, one per seed."""

    params: dict[str, float]
    is_default: bool = False
    trials: dict[int, FrozenTrial] = field(default_factory=dict)  # seed -> completed trial

    def val(self, seeds: list[int]) -> dict[int, float]:
        """Final validation losses at those of `seeds` it completed."""
        return {s: self.trials[s].value for s in seeds if s in self.trials}

    def test(self, seeds: list[int]) -> dict[int, float]:
        """Final test losses at those of `seeds` it completed (NaN where the run had no test split)."""
        return {s: float(self.trials[s].user_attrs.get(TEST_LOSS_ATTR, math.nan)) for s in seeds if s in self.trials}

    def trial_numbers(self, seeds: list[int]) -> list[int]:
        return [self.trials[s].number for s in seeds if s in self.trials]


def configurations(trials: list[FrozenTrial], default_params: dict) -> list[Configuration]:
    """Every configuration with a completed trial, in order of first appearance; the default is the one with the recipe's values."""
    found: dict[tuple, Configuration] = {}
    default_key = config_key(default_params)
    for trial in trials:
        if trial.state != TrialState.COMPLETE or not trial.params:
            continue
        key = config_key(trial.params)
        config = found.setdefault(key, Configuration(dict(trial.params), is_default=key == default_key))
        config.trials.setdefault(trial.user_attrs.get(SEED_ATTR, 0), trial)
    return list(found.values())


def score(values: list[float], rule: str) -> float:
    """Lower is better. worst: the highest loss over the seeds; mean_plus_sd: mean + sd (mean alone at one seed); mean."""
    if not values:
        return math.inf
    if rule == "worst":
        return max(values)
    if rule == "mean_plus_sd":
        return statistics.fmean(values) + (statistics.stdev(values) if len(values) > 1 else 0.0)
    return statistics.fmean(values)


def searched_ranking(configs: list[Configuration], cfg: DictConfig) -> list[Configuration]:
    """The configurations the search proposed (not the default), best search-seed validation loss first."""
    found = [c for c in configs if not c.is_default and cfg.seed in c.trials and c.trials[cfg.seed].user_attrs.get(STAGE_ATTR) == "search"]
    return sorted(found, key=lambda c: c.trials[cfg.seed].value)


def candidates(configs: list[Configuration], cfg: DictConfig) -> list[Configuration]:
    """What the answer is chosen among: every grid point, or the search's top k."""
    if cfg.sweep.sampler == "grid":
        return [c for c in configs if any(t.user_attrs.get(STAGE_ATTR) == "grid" for t in c.trials.values())]
    return searched_ranking(configs, cfg)[: max(1, cfg.sweep.confirm_top_k)]


def choose(configs: list[Configuration], cfg: DictConfig) -> Configuration | None:
    """The candidate with the best score over the choice seeds; a candidate missing some of them is judged on those it has."""
    seeds = choice_seeds(cfg)
    scored = [c for c in candidates(configs, cfg) if c.val(seeds)]
    return min(scored, key=lambda c: score(list(c.val(seeds).values()), cfg.sweep.choose_by), default=None)


def plan(trials: list[FrozenTrial], cfg: DictConfig, default_params: dict) -> tuple[str, list[tuple[dict, dict]]]:
    """(stage, trials to enqueue as (params, user attrs)): what the study needs next once no searched trial is left to run.

    The stage is the first of confirm, evaluate, done that is not finished. Nothing is enqueued for a
    (configuration, seed) that any trial already has, whatever its state, so a failed one is not retried
    here (a dead worker's trial is, by Optuna's heartbeat callback) and two workers planning at once
    queue at most a duplicate, which `duplicate_of` then skips.
    """
    configs = configurations(trials, default_params)
    taken = {(config_key(trial_params(t)), t.user_attrs.get(SEED_ATTR)) for t in trials if trial_params(t)}
    pending = [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]

    def missing(stage: str, params: dict, seeds: list[int]) -> list[tuple[dict, dict]]:
        return [(dict(params), {STAGE_ATTR: stage, SEED_ATTR: s}) for s in seeds if (config_key(params), s) not in taken]

    if cfg.sweep.sampler != "grid":
        needed = [item for c in candidates(configs, cfg) for item in missing("confirm", c.params, confirm_seeds(cfg))]
        if needed or any(t.user_attrs.get(STAGE_ATTR) == "confirm" for t in pending):
            return "confirm", needed
    answer = choose(configs, cfg)
    if answer is None or not cfg.sweep.eval_seeds:
        return "done", []
    needed = missing("evaluate", answer.params, eval_seeds(cfg))
    if not answer.is_default:
        needed += missing("evaluate", default_params, eval_seeds(cfg))
    if needed or pending:
        return "evaluate", needed
    return "done", []


def duplicate_of(trial: FrozenTrial, trials: list[FrozenTrial]) -> FrozenTrial | None:
    """An earlier trial of the same configuration and seed that completed or is running: this one need not train.

    Only a trial queued with its parameters can be one: a search trial's are sampled when it starts.
    """
    if not trial_params(trial):
        return None
    key, seed = config_key(trial_params(trial)), trial.user_attrs.get(SEED_ATTR)
    for other in trials:
        if other.number < trial.number and other.state in (TrialState.COMPLETE, TrialState.RUNNING) \
                and other.user_attrs.get(SEED_ATTR) == seed and config_key(trial_params(other)) == key:
            return other
    return None


def total_steps(trials: list[FrozenTrial]) -> int:
    """Optimizer steps trained by all trials of the study (pruned ones up to where they stopped)."""
    return sum(int(t.user_attrs.get(STEPS_ATTR, 0)) for t in trials)
