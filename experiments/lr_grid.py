"""The reference for lr_sweep: every lr x min-lr ratio of a 5 x 3 grid at the baseline's full budget and three seeds (about 47 minutes on 2 AMX cores in bf16).

45 runs of 340 steps (15,300 steps), nothing pruned; the report ranks the 15 configurations by
their mean over seeds 1337, 1338, 1339 against the default (lr 3e-3, min-lr ratio 0.1, which is
one of the grid's points). Warmup stays at the baseline's 20 steps.

    python run.py exp=lr_grid
    python run.py exp=lr_grid sweep.grid_seeds=1 sweep.n_trials=15   # one seed: a third of the time
"""

BASE = "baseline"

OVERRIDES = {
    "sweep.sampler": "grid",
    "sweep.grid_lr": [1e-3, 2e-3, 3e-3, 5e-3, 8e-3],
    "sweep.grid_min_lr_ratio": [0.0, 0.1, 0.5],
    "sweep.grid_seeds": 3,
    "sweep.n_trials": 45,
    "sweep.pruner": "none",
    "sweep.enqueue_default": False,  # the default is a grid point
    "sweep.confirm_seeds": 0,  # every point has its three seeds already
    "train.sample_tokens": 0,
}
