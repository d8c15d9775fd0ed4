"""Validation and test metrics over a fixed set of batches, the same on one process or many: loss, and bits per byte.

Loss is nats per token, so it depends on the tokenizer: a tokenizer with longer tokens has fewer,
harder targets. Bits per byte divides the same nats by the UTF-8 bytes those targets stand for
(`tokenizer.token_byte_lengths`; special tokens count 0 bytes, their nats are kept), so runs with
different tokenizers compare on the same text: bpb × bytes = loss × tokens / ln 2.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from research import distributed
from research.data import eval_batches
from research.step import masked_cross_entropy


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # compiled blocks would recompile for each new shape; validation is a small share
def eval_sums(model: torch.nn.Module, ds, train_cfg, device: torch.device, amp: Callable[[], Any], env: distributed.DistEnv | None = None,
              max_batches: int | None = None, token_bytes: torch.Tensor | None = None) -> torch.Tensor:
    """[nats, targets, bytes] over the first `max_batches` (default `train.eval_batches`) batches of `ds` (a fixed set); 0 = all of it.

    Like training batches, an evaluation batch is global: batch_size sequences per rank. Rank r takes
    micro-batches r, r + world_size, ... and the sums are averaged over ranks, so 2 ranks of batch_size b
    give the same ratios as 1 process of batch_size 2b. bytes is 0 without `token_bytes` (bytes per token id).
    """
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)  # float32, as runs logged before bpb existed
    n_bytes = torch.zeros((), device=device, dtype=torch.float64)
    rank, world_size = (env.rank, env.world_size) if env else (0, 1)
    max_batches = train_cfg.eval_batches if max_batches is None else max_batches
    max_batches = max_batches * world_size if max_batches > 0 else len(ds)
    for i, batch in enumerate(eval_batches(ds, train_cfg.batch_size, max_batches)):
        if i % world_size != rank:
            continue
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with amp():
            logits = model(batch["input_ids"]).logits
        total += masked_cross_entropy(logits, batch["labels"], batch["loss_mask"], 1.0)
        count += batch["loss_mask"].sum()
        if token_bytes is not None:
            n_bytes += (token_bytes[batch["labels"]] * batch["loss_mask"]).sum()
    model.train(was_training)
    if env is not None and env.is_distributed:  # mean over ranks of the sums: the ratios are those of the global sums
        total, count = distributed.mean_over_ranks(torch.stack([total, count]), env)
        n_bytes = distributed.mean_over_ranks(n_bytes, env)
    return torch.stack([total.double(), count.double(), n_bytes])


def evaluate_sets(model: torch.nn.Module, sets: dict[str, Any], split: str, train_cfg, device: torch.device, amp: Callable[[], Any],
                  env: distributed.DistEnv | None, token_bytes: torch.Tensor, max_batches: int | None = None) -> dict[str, float]:
    """{split/loss, split/bpb} over every set's batches together, and split/loss/<name>, split/bpb/<name> per set when there are several."""
    sums = {name: eval_sums(model, ds, train_cfg, device, amp, env, max_batches, token_bytes).tolist() for name, ds in sets.items()}
    metrics = ratios(split, [sum(column) for column in zip(*sums.values())])
    if len(sets) > 1:
        for name, values in sums.items():
            metrics.update({f"{key}/{name}": value for key, value in ratios(split, values).items()})
    return metrics


def ratios(split: str, sums: list[float]) -> dict[str, float]:
    """Loss as the float32 ratio that runs logged before bpb existed computed; bpb from the same nats."""
    nats, targets, n_bytes = sums
    return {f"{split}/loss": (torch.tensor(nats, dtype=torch.float32) / max(targets, 1)).item(), f"{split}/bpb": nats / math.log(2) / n_bytes if n_bytes > 0 else math.nan}
