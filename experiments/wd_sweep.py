"""Optuna study of the baseline's AdamW weight decay and beta2, run like lr_sweep: searched, confirmed and evaluated on separate seeds.

The learning-rate schedule stays the recipe's. Weight decay acts on the weights' scale and beta2 on
how fast Adam's second moment forgets a loss spike, so the pair matters most where a run is close to
unstable. The same budget as lr_sweep: 10 searched trials (the default first), the top 2 at two new
seeds, then the answer and the default at three evaluation seeds, on test loss.

    python run.py exp=wd_sweep
    python run.py exp=wd_sweep sweep.n_trials=20   # a larger search in the same study
"""

from research.search_space import Float

BASE = "lr_sweep"

SEARCH_SPACE = {
    "train.weight_decay": Float(0.0, 0.3, grid=(0.0, 0.1, 0.2)),  # AdamW decoupled weight decay
    "train.beta2": Float(0.9, 0.999, grid=(0.95, 0.99)),  # Adam's second-moment decay
}
