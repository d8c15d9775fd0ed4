"""Does the lr transfer across widths: lr grid studies at widths 64, 128, 256, SP and μP, then one report (results/lr_transfer/).

Each width and parametrization is a grid study of this recipe (5 lrs x 3 seeds, research/sweep.py)
with its own parent run in MLflow; rerun the same command to resume them. μP's base width is the
smallest width, where μP is SP, so the two share that study. The recipe is the baseline's model
(4 layers, 4 heads) at 128-token sequences for 100 steps: the whole study took 34 minutes with two
workers on a busy 2-core machine. The report (research/lr_transfer.py) gives each width's optimal lr
with a bootstrap interval, the shift between widths, and, at the largest width, the smallest width's
optimum against its own, paired by seed.

    python run.py exp=lr_transfer          # in two terminals: two workers share each study
    python run.py exp=lr_transfer sweep.grid_seeds=5 sweep.n_trials=25   # two more seeds everywhere
"""

from research.search_space import Float

BASE = "baseline"

WIDTHS = [64, 128, 256]  # hidden sizes; 4 heads each
REPORT_DIR = "results/lr_transfer"  # where the report is written (committed)

SEARCH_SPACE = {"train.lr": Float(1e-3, 1.6e-2, log=True, grid=(1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2))}  # factors of 2

OVERRIDES = {
    "model.base_width": 64,  # μP's base: the smallest width
    "data.seq_len": 128,
    "train.max_steps": 100,
    "train.warmup_steps": 10,
    "train.eval_every": 0,  # no pruning: one evaluation at the end
    "train.eval_batches": 10,
    "train.test_batches": 10,
    "train.sample_tokens": 0,
    "train.threads": 1,  # models this small: one thread per worker, a second worker (the same command) on a second core
    "tracking.log_hf_model": False,
    "sweep.sampler": "grid",
    "sweep.grid_seeds": 3,
    "sweep.n_trials": 15,  # 5 lrs x 3 seeds
    "sweep.pruner": "none",
    "sweep.enqueue_default": False,
    "sweep.eval_seeds": 0,  # the report's comparison is its own (research/lr_transfer.py)
}


def main(cfg):
    from research.lr_transfer import run

    return run(cfg, WIDTHS, REPORT_DIR)
