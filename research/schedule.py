"""Learning-rate schedule: linear warmup, then cosine down to a floor.

minimind decays to lr/10; `min_lr_ratio` makes that floor a knob (0.1 by default)
so sweeps can search it. The baseline recipe sets 0.5: at half an epoch the last steps
still learn (results/baseline.md).
"""

import math


def lr_at(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based).

    step < warmup_steps: lr * (step + 1) / warmup_steps  (never 0, so step 0 already learns)
    then cosine from lr (at step == warmup_steps) to lr * min_lr_ratio (at step == max_steps - 1).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    min_lr = lr * min_lr_ratio
    decay_steps = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
