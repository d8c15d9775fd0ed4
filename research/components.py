"""What a run builds before its first step, from its config: tokenizer, data, model, optimizer, state, step function.

`train` and the benchmark both start from `build(cfg, env)`, so the benchmark times exactly the
step a training run takes.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from research import distributed
from research.checkpoint import load_checkpoint
from research.config import resolve_path
from research.data import DataInfo
from research.errors import UserError
from research.hardware import autocast_dtype, resolve_compile, resolve_precision
from research.accounting import num_params
from research.mixture import build_sources, combined_info, make_sampler
from research.model import MiniMindConfig, MiniMindForCausalLM, model_config
from research.state import TrainState, seed_everything
from research.step import SkippedSteps, StepRunner, build_optimizer
from research.tokenizer import load_tokenizer, token_byte_lengths


@dataclass
class Components:
    """The parts of one run, ready for its first (or resumed) step."""

    tokenizer: Any
    train_ds: Any  # the first source's (the benchmark times one source)
    val_sets: dict[str, Any]  # validation set of each source ("" names data.path's)
    test_sets: dict[str, Any]  # test set of each source; empty without a test split
    token_bytes: torch.Tensor  # UTF-8 bytes of each token id, on the device: bits per byte (research/evaluate.py)
    data_info: DataInfo
    model_config: MiniMindConfig
    state: TrainState
    step: StepRunner  # `step.advance(lr)`: one optimizer step on the sampler's next micro-batches
    precision: str  # fp32 | bf16 | fp16, resolved for the device
    amp: Callable[[], Any]  # a fresh autocast context (or nullcontext) per use
    compiled: bool  # the transformer blocks run through torch.compile


def build(cfg: DictConfig, env: distributed.DistEnv) -> Components:
    """Everything for `cfg` on `env`; a `train.resume_from` checkpoint is loaded, so the state is where the run left off."""
    if cfg.train.threads > 0 and env.device.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    precision = resolve_precision(cfg.train.precision, env.device)
    amp_dtype = autocast_dtype(precision)

    def amp():
        return torch.autocast(env.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if len(tokenizer) > cfg.model.vocab_size:
        raise UserError(f"tokenizer at {cfg.data.tokenizer} has {len(tokenizer)} tokens but model.vocab_size={cfg.model.vocab_size}; set model.vocab_size>={len(tokenizer)}")
    with distributed.rank_zero_first(env, "preparing the token cache"):  # rank 0 builds it (if needed), the others then read it
        sources = build_sources(cfg.data, tokenizer)
    sampler = make_sampler(sources, cfg.train.batch_size, seed=cfg.seed, rank=env.rank, world_size=env.world_size)
    val_sets, test_sets = {s.name: s.val for s in sources}, {s.name: s.test for s in sources if s.test is not None}
    token_bytes = torch.tensor(token_byte_lengths(tokenizer), dtype=torch.float32, device=env.device)

    seed_everything(cfg.seed)  # every rank starts from the same weights
    config = model_config(cfg.model, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = MiniMindForCausalLM(config).to(env.device)
    optimizer = build_optimizer(model, cfg.train, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
    state = TrainState(model=model, optimizer=optimizer, scaler=scaler, sampler=sampler)
    if cfg.train.resume_from:
        state.load_state_dict(load_checkpoint(resolve_path(cfg.train.resume_from))["state"], env.rank)  # each rank its own RNG
    else:
        seed_everything(cfg.seed + env.rank)  # dropout differs per rank; data order comes from the sampler

    compiled = resolve_compile(cfg.train.compile, env.device, num_params(model))
    if compiled:  # regional compilation: one graph for the block, compiled once and reused by every layer
        for block in model.model.layers:
            block.compile()
    forward_model = model
    if env.is_distributed:
        forward_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    step = StepRunner(state, forward_model, amp, cfg.train.grad_clip, env, SkippedSteps(cfg.train.max_skipped_steps), cfg.train.grad_accum)
    return Components(tokenizer, sources[0].train, val_sets, test_sets, token_bytes, combined_info(sources), config, state, step, precision, amp,
                      compiled)
