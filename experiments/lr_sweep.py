"""Optuna study of the baseline's lr, warmup and min-lr ratio: 20 short trials with Hyperband pruning, about 15 minutes on 2 CPU cores.

Budget: the baseline trains 340 steps in about 3 minutes (0.45-0.55 s a step on 2 cores), so 20
full-length trials would take an hour. Trials here train 100 steps (~1 minute with their five
evaluations), enough to tell good learning rates from bad ones, and Hyperband stops the
clearly worse trials at step 20 or 60. Simulated on synthetic loss curves, a 20-trial study
trains ~1,200 steps in all (7 trials to the end): ~14 minutes with evaluation and per-trial
start-up, ~22 if nothing were pruned. Short runs favour slightly higher learning rates, and
their warmup is a share of 100 steps: scale warmup by 3.4 when retraining at 340 steps.

    python run.py exp=lr_sweep                     # the study; rerun the same command to resume it
    python run.py exp=lr_sweep sweep.n_trials=40   # 20 more trials into the same study
"""

BASE = "baseline"

OVERRIDES = {
    "sweep.n_trials": 20,
    "sweep.pruner": "hyperband",
    "sweep.lr_min": 3e-4,  # a decade either side of the baseline's 3e-3
    "sweep.lr_max": 3e-2,
    "sweep.warmup_min": 0,
    "sweep.warmup_max": 30,
    "sweep.min_lr_ratio_min": 0.0,
    "sweep.min_lr_ratio_max": 1.0,
    "train.max_steps": 100,
    "train.warmup_steps": 0,  # sampled per trial
    "train.eval_every": 20,  # the points where the pruner compares trials
    "train.eval_batches": 10,  # half the baseline's validation set: enough to rank trials, half the time
    "train.sample_tokens": 0,  # trials generate no samples; retrain the best one for those
}
