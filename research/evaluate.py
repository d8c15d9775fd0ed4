"""Validation loss over a fixed set of batches, the same on one process or many."""

from __future__ import annotations

from typing import Any, Callable

import torch

from research import distributed
from research.data import eval_batches
from research.step import masked_cross_entropy


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # compiled blocks would recompile for each new shape; validation is a small share
def evaluate(model: torch.nn.Module, val_ds, train_cfg, device: torch.device, amp: Callable[[], Any], env: distributed.DistEnv | None = None,
             max_batches: int | None = None) -> float:
    """Mean masked loss over the first `max_batches` (default `train.eval_batches`) batches of `val_ds` (a fixed set); 0 = all of it.

    Like training batches, a validation batch is global: batch_size sequences per rank. Rank r takes
    micro-batches r, r + world_size, ... and the sums are combined, so 2 ranks of batch_size b see the
    same sequences, and compute the same loss, as 1 process of batch_size 2b.
    """
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    rank, world_size = (env.rank, env.world_size) if env else (0, 1)
    max_batches = train_cfg.eval_batches if max_batches is None else max_batches
    max_batches = max_batches * world_size if max_batches > 0 else len(val_ds)
    for i, batch in enumerate(eval_batches(val_ds, train_cfg.batch_size, max_batches)):
        if i % world_size != rank:
            continue
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with amp():
            logits = model(batch["input_ids"]).logits
        total += masked_cross_entropy(logits, batch["labels"], batch["loss_mask"], 1.0)
        count += batch["loss_mask"].sum()
    model.train(was_training)
    if env is not None:  # mean over ranks of the sums: the ratio is that of the global sums
        total, count = distributed.mean_over_ranks(torch.stack([total, count]), env)
    return (total / count.clamp(min=1)).item()
