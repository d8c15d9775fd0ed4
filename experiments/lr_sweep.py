"""Optuna study of the baseline's lr, warmup and min-lr ratio at its full budget, confirmed on new seeds: about 30 minutes on 2 CPU cores.

Every trial trains the baseline's own 340 steps, so the best trial's settings are the ones to use
as they are (warmup is in steps: keep it when training longer). The first trial is the recipe's
default (lr 3e-3, warmup 20, min-lr ratio 0.1), the reference of the report. Nine more are chosen
by TPE, and the median pruner stops a trial whose validation loss is worse than the median of
earlier trials at the same step (checked every 60 steps from step 60). Then the two best
configurations and the default train again at two more seeds, and the answer is the best mean
over three seeds, with its gain over the default and whether that gain exceeds the seed noise.
Compute: 10 searched trials, the pruned ones stopped early, plus 6 confirmations; against a 5 x 3 grid
at three seeds (exp=lr_grid) in results/lr_sweep_vs_default.md.

    python run.py exp=lr_sweep                         # the study; rerun the same command to resume it
    python run.py exp=lr_sweep sweep.n_trials=20       # a larger search (10 more trials into the same study)
    python run.py exp=lr_sweep sweep.confirm_seeds=0   # smaller: no confirmation, best of one seed
"""

BASE = "baseline"

OVERRIDES = {
    "sweep.n_trials": 10,  # the default and 9 searched
    "sweep.pruner": "median",
    "sweep.prune_after_steps": 60,
    "sweep.prune_after_trials": 2,
    "sweep.confirm_top_k": 2,
    "sweep.confirm_seeds": 2,
    "sweep.lr_min": 1e-3,  # around the baseline's 3e-3
    "sweep.lr_max": 8e-3,
    "sweep.warmup_min": 0,
    "sweep.warmup_max": 40,
    "sweep.min_lr_ratio_min": 0.0,
    "sweep.min_lr_ratio_max": 0.9,
    "train.eval_every": 60,  # the points where the pruner compares trials; the final evaluation is the baseline's
    "train.sample_tokens": 0,  # trials generate no samples; train the best one for those
}
