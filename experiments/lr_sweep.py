"""Optuna study of the baseline's lr, warmup and min-lr ratio at its full budget: searched, confirmed and evaluated on separate seeds.

Every trial trains the baseline's own 340 steps, so the answer's settings are the ones to use as
they are (warmup is in steps: keep it when training longer). The first trial is the recipe's
default, then TPE proposes seven more at the search seed, and once three have finished the median
pruner stops a trial whose validation loss is worse than the median of earlier trials at the same
step (checked every 60 steps from step 180: at step 60 the loss ranks early speed, i.e. high learning
rates, not where a run ends; results/lr_sweep_vs_default.md). The two best train again at two new seeds, where the answer is chosen by its
worst seed; then the answer and the default train at three further seeds, and the report gives
their test losses paired by seed, with a 95% interval and a verdict (research/study_plan.py).

    python run.py exp=lr_sweep                         # the study; rerun the same command to resume it
    python run.py exp=lr_sweep sweep.n_trials=16       # a larger search in the same study: new top k confirmed and evaluated
    python run.py exp=lr_sweep sweep.eval_seeds=5      # a sharper comparison with the default

To search other bounds or settings, copy this file under a new name and edit SEARCH_SPACE.
"""

from research.search_space import Float, Int

BASE = "baseline"

SEARCH_SPACE = {  # around the baseline's values; grid= is what exp=lr_grid trains
    "train.lr": Float(1e-3, 8e-3, log=True, grid=(1e-3, 2e-3, 3e-3, 5e-3, 8e-3)),
    "train.warmup_steps": Int(0, 40),
    "train.min_lr_ratio": Float(0.0, 0.9, grid=(0.0, 0.1, 0.5)),
}

OVERRIDES = {
    "sweep.n_trials": 8,  # the default and 7 searched
    "sweep.pruner": "median",
    "sweep.prune_after_steps": 180,
    "sweep.prune_after_trials": 3,
    "sweep.confirm_top_k": 2,
    "sweep.confirm_seeds": 2,
    "sweep.eval_seeds": 3,
    "train.eval_every": 60,  # the points where the pruner compares trials; the final evaluation is the baseline's
    "train.sample_tokens": 0,  # trials generate no samples; train the answer for those
}
