"""The benchmark's candidates: ours as train() builds it, and transformers' Llama as a user trains it, plain and tuned.

Every candidate is the same model shape on the same data, precision, AdamW hyperparameters and
parameter groups (weight decay on matrices only), stepped by the same driver (`StepRunner`):

    ours                   the trainer's own step, built by `components.build` as train() builds it
    ours, a document per row   the same with data.packing=false (bench.padded)
    ours [, torch.compile]     the same with train.compile switched the other way (bench.compile)
    PLAIN_LLAMA            LlamaForCausalLM as the script a user writes: `model(input_ids=x, labels=x).loss`,
                           eager, torch.optim.AdamW with no implementation asked for
    TUNED_LLAMA            the same with the knobs a user can turn: torch.compile(model) and fused AdamW

Which process-wide settings (allocator, OpenMP) a candidate runs under is the phase's business.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from research import distributed
from research.bench_timing import Candidate
from research.components import Components, build
from research.config import apply_overrides
from research.data import BatchSampler
from research.state import TrainState
from research.step import SkippedSteps, StepRunner, build_optimizer, describe_adamw


PLAIN_LLAMA = "llama: eager, torch's default AdamW"
TUNED_LLAMA = "llama: torch.compile, fused AdamW"


class LlamaLoss:
    """Llama's own loss, as a user calls it: transformers shifts `labels=x` inside, so each row has one target fewer.

    `num_items_in_batch` makes it the sum over the step's targets divided by their count, as ours and
    transformers' Trainer both normalize over accumulated micro-batches."""

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        rows, seq = batch["input_ids"].shape
        return rows * (seq - 1)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], normalizer: torch.Tensor) -> torch.Tensor:
        x = batch["input_ids"]
        return model(input_ids=x, labels=x, num_items_in_batch=normalizer).loss


def ours(cfg: DictConfig, env: distributed.DistEnv, name: str = "ours", **overrides) -> tuple[Candidate, Components]:
    """The trainer's own step, built exactly as `train` builds it (overrides: dotted config keys)."""
    cfg = apply_overrides(cfg.copy(), overrides)
    run = build(cfg, env)
    knobs = {"torch.compile": "each block" if run.compiled else "no", "AdamW": describe_adamw(run.state.optimizer)}
    return Candidate(name + (", torch.compile" if run.compiled else ""), run.step, cfg.train.lr, knobs), run


def llama(cfg: DictConfig, env: distributed.DistEnv, run: Components, tuned: bool) -> Candidate:
    """transformers' LlamaForCausalLM of `run`'s shape on `run`'s data: plain, or tuned (compiled whole, fused AdamW)."""
    from transformers import LlamaForCausalLM

    from research.export import to_llama_config

    torch.manual_seed(cfg.seed)
    llama_config = to_llama_config(run.model_config)
    llama_config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(llama_config).to(env.device).train()
    optimizer = build_optimizer(model, cfg.train, env.device, kind="fused" if tuned else "default")
    scaler = torch.amp.GradScaler(env.device.type, enabled=run.precision == "fp16")
    state = TrainState(model=model, optimizer=optimizer, scaler=scaler, sampler=BatchSampler(run.train_ds, cfg.train.batch_size, seed=cfg.seed))
    forward = torch.compile(model) if tuned else model
    runner = StepRunner(state, forward, run.amp, cfg.train.grad_clip, env, SkippedSteps(cfg.train.max_skipped_steps), cfg.train.grad_accum, LlamaLoss())
    knobs = {"torch.compile": "whole model" if tuned else "no", "AdamW": describe_adamw(optimizer)}
    return Candidate(TUNED_LLAMA if tuned else PLAIN_LLAMA, runner, cfg.train.lr, knobs)


def build_candidates(cfg: DictConfig, env: distributed.DistEnv) -> tuple[list[Candidate], Components]:
    """Our step first (the one `train()` runs), then the variants and references the bench section asks for."""
    main, run = ours(cfg, env)
    candidates = [main]
    if cfg.bench.padded:
        candidates.append(ours(cfg, env, "ours, a document per row (data.packing=false)", **{"data.packing": False})[0])
    if cfg.bench.compile:  # the trainer with torch.compile switched the other way from what train.compile picks here
        candidates.append(ours(cfg, env, **{"train.compile": str(not run.compiled).lower()})[0])
    if cfg.bench.llama:
        candidates += [llama(cfg, env, run, tuned=False), llama(cfg, env, run, tuned=True)]
    return candidates, run


def plain_candidates(cfg: DictConfig, env: distributed.DistEnv) -> list[Candidate]:
    """What the plain phase times: ours as train() builds it, and the plain Llama script."""
    main, run = ours(cfg, env)
    return [main, llama(cfg, env, run, tuned=False)]
