"""One optimizer step: the masked loss, AdamW, and the step function the loop and the benchmark both time.

The step never waits for the device: the loss and the gradient norm come back as tensors,
and the loop reads them once per log interval.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from research import distributed
from research.errors import UserError
from research.state import TrainState


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, normalizer: float | torch.Tensor) -> torch.Tensor:
    """Sum of per-token cross-entropy where the mask keeps a token, divided by `normalizer` (tokens kept)."""
    per_token = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), reduction="none")
    return (per_token * loss_mask.view(-1).to(per_token.dtype)).sum() / normalizer


def build_optimizer(model: torch.nn.Module, train_cfg: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms and biases).

    Fused: one kernel reads each parameter, gradient and moment once, where foreach makes several passes over
    them (results/bench/profile.md). Foreach is kept for CPU runs logged before it became the default."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda" or train_cfg.adamw == "fused"
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), fused=fused, foreach=None if fused else True)


class StepRunner:
    """Forward and backward over the step's micro-batches, unscale, clip, AdamW: `step(micro_batches, lr) -> (loss, grad_norm)`."""

    def __init__(self, state: TrainState, forward_model: torch.nn.Module, amp: Callable[[], Any], grad_clip: float,
                 env: distributed.DistEnv, skipped: "SkippedSteps"):
        self.state, self.forward_model, self.amp, self.grad_clip, self.env, self.skipped = state, forward_model, amp, grad_clip, env, skipped
        self.pin = env.device.type == "cuda"  # page-locked host memory: the copy to the GPU overlaps compute

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.pin_memory() if self.pin else v).to(self.env.device, non_blocking=True) for k, v in batch.items()}

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        state, env = self.state, self.env
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        # the loss is the sum over every kept token of the step divided by their count, on all ranks; DDP
        # averages gradients over ranks, so each rank divides by the mean count (a tensor: no wait for it)
        kept_tokens = torch.tensor(float(sum(int(b["loss_mask"].sum()) for b in micro_batches)), device=env.device)
        kept_tokens = distributed.mean_over_ranks(kept_tokens, env).clamp(min=1.0)
        step_loss = torch.zeros((), device=env.device)
        for i, batch in enumerate(micro_batches):
            batch = self.to_device(batch)
            last_micro = i == len(micro_batches) - 1
            sync = self.forward_model.no_sync() if env.is_distributed and not last_micro else nullcontext()
            with sync, self.amp():
                logits = self.forward_model(batch["input_ids"]).logits
                loss = masked_cross_entropy(logits, batch["labels"], batch["loss_mask"], kept_tokens)
            state.scaler.scale(loss).backward()
            step_loss += loss.detach()
        state.scaler.unscale_(state.optimizer)
        params = [p for p in state.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, grad_norm, foreach=True)
        optimizer_step(state.scaler, state.optimizer, self.skipped, state.step + 1)
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        return step_loss, grad_norm.detach()


def optimizer_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, skipped: "SkippedSteps", step: int) -> None:
    """One (possibly scaled) optimizer step; with fp16, count the steps the scaler skipped."""
    scale_before = scaler.get_scale() if scaler.is_enabled() else 0.0
    scaler.step(optimizer)
    scaler.update()
    if scaler.is_enabled():  # get_scale() syncs, but an fp16 step already waited for its overflow check
        skipped.update(scale_before, scaler.get_scale(), step)


class SkippedSteps:
    """fp16: GradScaler skips a step whose gradients overflowed and lowers its scale; many in a row means the run diverged."""

    def __init__(self, limit: int):
        self.limit = limit  # consecutive skipped steps that stop the run; 0 = never stop
        self.in_a_row = 0
        self.total = 0

    def update(self, scale_before: float, scale_after: float, step: int) -> None:
        if scale_after >= scale_before:  # the step was taken (the scale only drops on overflow)
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.limit > 0 and self.in_a_row >= self.limit:
            raise UserError(
                f"fp16 gradients overflowed {self.in_a_row} steps in a row (up to step {step}, loss scale now {scale_after:g}); "
                "lower train.lr, use train.precision=bf16 or fp32, or raise train.max_skipped_steps"
            )
