"""The reference for lr_sweep: every lr x min-lr ratio of its 5 x 3 grid at the baseline's full budget and three seeds, then evaluated like it.

lr_sweep's SEARCH_SPACE lists the grid values; warmup has none, so it stays at the recipe's value.
45 runs of 340 steps, nothing pruned; the answer is chosen over seeds 1337-1339 by its worst seed,
then it and the default train at the evaluation seeds (seed + 1000, ...), as in lr_sweep.

    python run.py exp=lr_grid
    python run.py exp=lr_grid sweep.grid_seeds=1 sweep.n_trials=15   # one seed per point: a third of the time
"""

BASE = "lr_sweep"

OVERRIDES = {
    "sweep.sampler": "grid",
    "sweep.grid_seeds": 3,
    "sweep.n_trials": 45,
    "sweep.pruner": "none",
    "sweep.enqueue_default": False,  # the default is trained at the evaluation seeds in any case
}
