"""One optimizer step, and the one driver of it that the trainer, the benchmark and the training load all run.

`StepRunner.advance(lr)` draws the step's micro-batches from the state's sampler and takes the
step: forward and backward per micro-batch, unscale, clip, AdamW. What the loss is comes from an
objective: ours (`NextTokenLoss`), or a reference model's own (the benchmark's Llama), so every
candidate the benchmark times is driven by the same code as training.

The step never waits for the device: the loss and the gradient norm come back as tensors,
and the loop reads them once per log interval.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from research import distributed, mup
from research.errors import UserError
from research.state import TrainState


ADAMW_KINDS = ("fused", "foreach", "default")  # default: what torch.optim.AdamW picks when told nothing


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, normalizer: float | torch.Tensor) -> torch.Tensor:
    """Sum of per-token cross-entropy where the mask keeps a token, divided by `normalizer` (tokens kept)."""
    per_token = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), reduction="none")
    return (per_token * loss_mask.view(-1).to(per_token.dtype)).sum() / normalizer


class Objective(Protocol):
    """What a step minimizes: how many targets a batch has, and the loss of a batch (on the device) over `normalizer` targets."""

    def targets(self, batch: dict[str, torch.Tensor]) -> int: ...

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], normalizer: torch.Tensor) -> torch.Tensor: ...


class NextTokenLoss:
    """Ours: the logits against `labels` at the same positions (the data pipeline shifted them), where `loss_mask` keeps a token."""

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["loss_mask"].sum())

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], normalizer: torch.Tensor) -> torch.Tensor:
        logits = model(batch["input_ids"]).logits
        return masked_cross_entropy(logits, batch["labels"], batch["loss_mask"], normalizer)


def adamw_kind(train_cfg: DictConfig, device: torch.device) -> str:
    """The AdamW implementation a training run uses: fused on CUDA, else as `train.adamw` says."""
    return "fused" if device.type == "cuda" or train_cfg.adamw == "fused" else "foreach"


def build_optimizer(model: torch.nn.Module, train_cfg: DictConfig, device: torch.device, kind: str | None = None) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms and biases); under μP the hidden matrices have a group of their own at lr / m.

    `kind`: fused (one kernel reads each parameter, gradient and moment once, where foreach makes several passes: results/bench/profile.md), foreach (kept for CPU runs
    logged before fused became the default) or default (torch's own choice); None = what training uses."""
    kind = kind or adamw_kind(train_cfg, device)
    if kind not in ADAMW_KINDS:
        raise ValueError(f"AdamW kind must be one of {ADAMW_KINDS}, got {kind!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr_scale = mup.hidden_lr_scale(model.config) if hasattr(model, "hidden_matrices") else 1.0  # μP: Adam lr / m (research/mup.py)
    if lr_scale != 1.0:
        hidden = {id(p) for p in model.hidden_matrices()}
        groups = [{"params": [p for p in decay if id(p) in hidden], "weight_decay": train_cfg.weight_decay, "lr_scale": lr_scale},
                  {"params": [p for p in decay if id(p) not in hidden], "weight_decay": train_cfg.weight_decay}, groups[1]]
    implementation = {"fused": {"fused": True, "foreach": None}, "foreach": {"fused": False, "foreach": True}, "default": {}}[kind]
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), **implementation)


def describe_adamw(optimizer: torch.optim.Optimizer) -> str:
    """'fused', 'foreach', or, where the optimizer was left to choose, what torch picked for its parameters."""
    if optimizer.defaults.get("fused"):
        return "fused"
    if optimizer.defaults.get("foreach"):
        return "foreach"
    from torch.optim.optimizer import _default_to_fused_or_foreach  # how AdamW resolves foreach=None at its first step

    params = [p for group in optimizer.param_groups for p in group["params"]]
    _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return ("foreach" if foreach else "for-loop") + " (torch's default)"


@dataclass
class StepDone:
    """What one optimizer step did (this rank's figures)."""

    loss: torch.Tensor  # mean loss over the step's targets, on the device (reading it syncs)
    grad_norm: torch.Tensor  # global gradient norm before clipping, on the device
    tokens: int  # tokens through the model
    targets: int  # of them, tokens that carry loss
    data_seconds: float  # time spent drawing the micro-batches


class StepRunner:
    """Draws a step's micro-batches and takes the step: forward and backward over each, unscale, clip, AdamW."""

    def __init__(self, state: TrainState, forward_model: torch.nn.Module, amp: Callable[[], Any], grad_clip: float,
                 env: distributed.DistEnv, skipped: "SkippedSteps", grad_accum: int = 1, objective: Objective | None = None):
        self.state, self.forward_model, self.amp, self.grad_clip, self.env, self.skipped = state, forward_model, amp, grad_clip, env, skipped
        self.grad_accum, self.objective = grad_accum, objective or NextTokenLoss()
        self.pin = env.device.type == "cuda"  # page-locked host memory: the copy to the GPU overlaps compute

    def advance(self, lr: float) -> StepDone:
        """One optimizer step at learning rate `lr` on the next `grad_accum` micro-batches of the state's sampler."""
        start = time.perf_counter()
        micro_batches = [self.state.sampler.next_batch() for _ in range(self.grad_accum)]
        data_seconds = time.perf_counter() - start
        targets = [self.objective.targets(batch) for batch in micro_batches]
        loss, grad_norm = self.take(micro_batches, targets, lr)
        return StepDone(loss, grad_norm, sum(b["input_ids"].numel() for b in micro_batches), sum(targets), data_seconds)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.pin_memory() if self.pin else v).to(self.env.device, non_blocking=True) for k, v in batch.items()}

    def take(self, micro_batches: list[dict[str, torch.Tensor]], targets: list[int], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The step on these micro-batches (`targets`: each one's loss-bearing tokens): (loss, gradient norm)."""
        state, env = self.state, self.env
        for group in state.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # lr_scale: μP's hidden matrices
        # the loss is the sum over every target of the step divided by their count, on all ranks; DDP
        # averages gradients over ranks, so each rank divides by the mean count (a tensor: no wait for it)
        kept_tokens = torch.tensor(float(sum(targets)), device=env.device)
        kept_tokens = distributed.mean_over_ranks(kept_tokens, env).clamp(min=1.0)
        step_loss = torch.zeros((), device=env.device)
        for i, batch in enumerate(micro_batches):
            batch = self.to_device(batch)
            last_micro = i == len(micro_batches) - 1
            sync = self.forward_model.no_sync() if env.is_distributed and not last_micro else nullcontext()
            with sync, self.amp():
                loss = self.objective(self.forward_model, batch, kept_tokens)
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
