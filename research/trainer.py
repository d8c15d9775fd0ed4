"""The pretraining loop: `train(cfg, hooks) -> TrainResult`.

No module-level state: a sweep calls `train` many times in one process. Everything
the next step depends on lives in one `TrainState` (model, optimizer, scaler, step,
tokens seen, data position, RNG), so a checkpoint is `state.state_dict()` and a
resume is `state.load_state_dict(...)`. Tracking, pruning and anything else that
watches a run plugs in through `Hooks`; rank awareness comes from `distributed`.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from research import distributed
from research.checkpoint import StopSignal, checkpoint_path, load_checkpoint, prune_checkpoints, save_checkpoint
from research.config import resolve_path, to_yaml
from research.data import BatchSampler, build_datasets, eval_batches
from research.errors import UserError
from research.hardware import autocast_dtype, cpu_has_fast_bf16, device_name, keep_freed_memory, peak_flops, resolve_compile, resolve_precision
from research.model import MiniMindForCausalLM, config_from, flops_per_token, num_params
from research.schedule import lr_at
from research.tokenizer import load_tokenizer


class Hooks:
    """Callbacks a run calls on rank 0; subclass and override what you need.

    A hook may raise to stop training (a sweep raises `optuna.TrialPruned` from
    `on_eval`); the trainer saves nothing further and lets the exception through.
    """

    def on_start(self, run: "RunInfo") -> None: ...

    def on_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Per-step metrics, delivered in batches every `train.log_every` steps and before each checkpoint: [(step, {name: value})]."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def on_end(self, result: "TrainResult") -> None: ...


@dataclass
class RunInfo:
    """What a run is, known before the first step: handed to hooks and printed."""

    config: DictConfig
    model: MiniMindForCausalLM
    tokenizer: Any
    data_info: Any
    derived: dict[str, Any]
    start_step: int


@dataclass
class TrainResult:
    final_val_loss: float
    steps: int
    tokens_seen: int
    wall_time_s: float
    history: list[tuple[int, dict[str, float]]]  # every logged (step, metrics) row, train and val
    samples: list[tuple[str, str]]  # (prompt, generated text)
    model: MiniMindForCausalLM
    tokenizer: Any
    checkpoint: Path | None
    derived: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None  # the MLflow run, when tracked

    def curve(self, name: str = "train/loss") -> list[tuple[int, float]]:
        return [(step, row[name]) for step, row in self.history if name in row]


@dataclass
class TrainState:
    """Everything the next optimizer step depends on."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: BatchSampler  # the data position
    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0  # training tokens consumed, all ranks

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": self.sampler.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["data"])
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        set_rng_state(state["rng"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, normalizer: float | torch.Tensor) -> torch.Tensor:
    """Sum of per-token cross-entropy where the mask keeps a token, divided by `normalizer` (tokens kept)."""
    per_token = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), reduction="none")
    return (per_token * loss_mask.view(-1).to(per_token.dtype)).sum() / normalizer


def build_optimizer(model: torch.nn.Module, cfg: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), fused=fused, foreach=None if fused else True)


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # compiled blocks would recompile for each new shape; validation is a small share
def evaluate(model: torch.nn.Module, val_ds, cfg: DictConfig, device: torch.device, amp, env: distributed.DistEnv | None = None) -> float:
    """Mean masked loss over the first `train.eval_batches` validation batches (a fixed set).

    Like training batches, a validation batch is global: batch_size sequences per rank. Rank r takes
    micro-batches r, r + world_size, ... and the sums are combined, so 2 ranks of batch_size b see the
    same sequences, and compute the same loss, as 1 process of batch_size 2b.
    """
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    rank, world_size = (env.rank, env.world_size) if env else (0, 1)
    for i, batch in enumerate(eval_batches(val_ds, cfg.train.batch_size, cfg.train.eval_batches * world_size)):
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


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # a growing KV cache would recompile compiled blocks at every new length
def generate_samples(
    model: MiniMindForCausalLM, tokenizer, prompts: Sequence[str], max_new_tokens: int, seed: int, device: torch.device,
    temperature: float = 0.8, top_k: int = 50, streamer=None,
) -> list[tuple[str, str]]:
    """A few seeded samples, generated without touching the training RNG (`streamer`: transformers' TextStreamer)."""
    if max_new_tokens <= 0:
        return []
    was_training = model.training
    model.eval()
    samples = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for prompt in prompts:
            ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
            out = model.generate(
                torch.tensor([ids], device=device),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_k=top_k,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                streamer=streamer,
            )
            samples.append((prompt, tokenizer.decode(out[0, 1:], skip_special_tokens=True)))
    model.train(was_training)
    return samples


def describe(derived: dict[str, Any], console: Console) -> None:
    table = Table(title="run", show_header=False, box=None)
    for key, value in derived.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else (f"{value:.3g}" if isinstance(value, float) else str(value)))
    console.print(table)


@dataclass
class Setup:
    """What a run builds before its first step; `train` and the benchmark both start from it."""

    tokenizer: Any
    train_ds: Any
    val_ds: Any
    data_info: Any
    model_config: Any
    state: TrainState
    step: "StepRunner"
    precision: str  # fp32 | bf16 | fp16, resolved for the device
    amp: Callable[[], Any]  # a fresh autocast context (or nullcontext) per use
    compiled: bool  # the forward/backward runs through torch.compile


def setup(cfg: DictConfig, env: distributed.DistEnv) -> Setup:
    """Tokenizer, datasets, seeded model, optimizer, scaler, sampler and the step function, for `cfg` on `env`.

    A `train.resume_from` checkpoint is loaded here, so the state is exactly where the run left off.
    """
    if cfg.train.threads > 0 and env.device.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    precision = resolve_precision(cfg.train.precision, env.device)
    amp_dtype = autocast_dtype(precision)

    def amp():
        return torch.autocast(env.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if len(tokenizer) > cfg.model.vocab_size:
        raise UserError(f"tokenizer at {cfg.data.tokenizer} has {len(tokenizer)} tokens but model.vocab_size={cfg.model.vocab_size}; set model.vocab_size>={len(tokenizer)}")
    with distributed.rank_zero_first(env):  # rank 0 builds the token cache, the others then read it
        train_ds, val_ds, data_info = build_datasets(cfg.data, tokenizer)
    sampler = BatchSampler(train_ds, cfg.train.batch_size, seed=cfg.seed, rank=env.rank, world_size=env.world_size)

    # seeded, so every rank starts from the same weights
    seed_everything(cfg.seed)
    model_config = config_from(cfg.model, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = MiniMindForCausalLM(model_config).to(env.device)
    optimizer = build_optimizer(model, cfg, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
    state = TrainState(model=model, optimizer=optimizer, scaler=scaler, sampler=sampler)
    resume_from = cfg.train.get("resume_from", "")
    if resume_from:
        state.load_state_dict(load_checkpoint(resolve_path(resume_from))["state"])
    else:
        seed_everything(cfg.seed + env.rank)  # dropout differs per rank; data order comes from the sampler

    compiled = resolve_compile(cfg.train.compile, env.device, num_params(model))
    if compiled:  # regional compilation: one graph for the block, compiled once and reused by every layer
        for block in model.model.layers:
            block.compile()
    forward_model = model
    if env.is_distributed:
        forward_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    step = StepRunner(state, forward_model, amp, cfg.train.grad_clip, env, SkippedSteps(cfg.train.max_skipped_steps))
    return Setup(tokenizer, train_ds, val_ds, data_info, model_config, state, step, precision, amp, compiled)


class StepRunner:
    """One optimizer step: forward and backward over the step's micro-batches, unscale, clip, AdamW.

    The training loop and the benchmark time exactly this. It never waits for the device: the
    loss and the gradient norm come back as tensors, and the loop reads them once per log interval.
    """

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


def train(cfg: DictConfig, hooks: Sequence[Hooks] = ()) -> TrainResult:
    """Pretrain a model as `cfg` says; hooks watch (and may stop) the run.

    Ctrl-C or SIGTERM during the loop: the step in flight finishes, a checkpoint is written
    and KeyboardInterrupt is raised. The signal handlers exist only during this call.
    """
    with StopSignal() as stop:
        return run_training(cfg, hooks, stop)


def run_training(cfg: DictConfig, hooks: Sequence[Hooks], stop: StopSignal) -> TrainResult:
    started = time.perf_counter()
    env = distributed.setup(cfg.train.device)
    is_main = env.is_main
    # rank 0 alone opened the MLflow run and chose where checkpoints go (and what to resume): share it
    chosen_by_rank_zero = (cfg.train.checkpoint_dir, cfg.train.resume_from)
    cfg.train.checkpoint_dir, cfg.train.resume_from = distributed.broadcast_object(chosen_by_rank_zero, env)
    hooks = list(hooks) if is_main else []
    checkpoint_dir = resolve_path(cfg.train.checkpoint_dir) if cfg.train.get("checkpoint_dir") else None
    if checkpoint_dir is not None and is_main:  # find out now, not after hours of training
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the checkpoint folder {checkpoint_dir} ({err.strerror}); set out_dir or train.checkpoint_dir to a writable folder") from None
    console = Console(quiet=not is_main)
    if env.device.type == "cpu":
        keep_freed_memory()  # the next step's activations reuse this step's memory instead of page-faulting it in again
    run = setup(cfg, env)
    state, model, precision = run.state, run.state.model, run.precision

    # ---- derived quantities, printed once ----
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum * env.world_size
    flops_token = flops_per_token(run.model_config, cfg.data.seq_len)
    with distributed.rank_zero_first(env):  # one CPU measurement, cached, rather than one per rank at once
        peak = peak_flops(env.device, precision, resolve_path(cfg.out_dir) / "cache")
    derived = {
        "experiment": cfg.exp,
        "device": f"{device_name(env.device)} ({env.device.type}, {torch.get_num_threads() if env.device.type == 'cpu' else 1} threads) x {env.world_size} rank(s)",
        "precision": precision + (", torch.compile" if run.compiled else ""),
        "parameters": num_params(model),
        "non-embedding parameters": num_params(model, non_embedding=True),
        "tokens per step": tokens_per_step,
        "FLOPs per token": int(flops_token),
        "total tokens": tokens_per_step * cfg.train.max_steps,
        "epochs over train split": tokens_per_step * cfg.train.max_steps / max(1, run.data_info.train_tokens),
        "train / val tokens": f"{run.data_info.train_tokens:,} / {run.data_info.val_tokens:,}",
        "peak FLOP/s (for MFU)": peak,
    }
    describe(derived, console)
    if env.device.type == "cpu" and precision == "bf16" and not cpu_has_fast_bf16():
        console.print("warning: this CPU has no AMX or AVX-512 BF16, so bf16 matrix products are emulated (~100x slower than fp32 here); "
                      "train.precision=auto picks fp32", soft_wrap=True, markup=False)
    for hook in hooks:
        hook.on_start(RunInfo(cfg, model, run.tokenizer, run.data_info, derived, state.step))

    last_checkpoint: Path | None = None

    def save(step: int) -> None:
        nonlocal last_checkpoint
        flush_metrics(step)  # hooks have every row up to `step` before a checkpoint of it exists
        if checkpoint_dir is None or not is_main or last_checkpoint == checkpoint_path(checkpoint_dir, step):  # none wanted, or saved already
            return
        path = save_checkpoint({"state": state.state_dict(), "config": to_yaml(cfg)}, checkpoint_path(checkpoint_dir, step))
        prune_checkpoints(checkpoint_dir, cfg.train.keep_checkpoints)
        last_checkpoint = path
        for hook in hooks:
            hook.on_checkpoint(step, path)

    def run_eval() -> float:
        value = evaluate(model, run.val_ds, cfg, env.device, run.amp, env)
        row = {"val/loss": value, "val/perplexity": math.exp(min(value, 50.0))}
        history.append((state.step, row))
        for hook in hooks:
            hook.on_metrics([(state.step, row)])
            hook.on_eval(state.step, row)
        return value

    # ---- the loop ----
    history: list[tuple[int, dict[str, float]]] = []
    pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # (step, lr, loss, grad_norm), read once per log interval
    val_loss = float("nan")
    interval = IntervalClock()
    model.train()
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
        console=console, disable=not is_main, transient=False,
    )

    # a non-finite loss, or (without fp16, whose scaler skips such steps) gradient norm: the weights are broken from here on
    watched = [("loss", "train/loss")] + ([] if state.scaler.is_enabled() else [("gradient norm", "train/grad_norm")])

    def flush_metrics(step: int) -> None:
        if not pending:
            return
        losses = distributed.mean_over_ranks(torch.stack([p[2] for p in pending]), env).tolist()  # the one device sync of the interval
        norms = torch.stack([p[3] for p in pending]).tolist()
        elapsed, tokens, data_s, tracking_s = interval.lap()
        tokens_per_sec = tokens / max(elapsed, 1e-9)
        rows = [(s, {"train/loss": loss, "train/lr": lr, "train/grad_norm": norm}) for (s, lr, _, _), loss, norm in zip(pending, losses, norms)]
        rows[-1][1].update({
            "train/tokens_per_sec": tokens_per_sec,
            "train/mfu": tokens_per_sec * flops_token / peak,
            "train/data_wait_share": data_s / max(elapsed, 1e-9),  # of the interval's wall time
            "train/tracking_share": tracking_s / max(elapsed, 1e-9),  # hooks and progress display, the previous flush's included
        })
        pending.clear()
        bad = [(s, name, r[key]) for s, r in rows for name, key in watched if not math.isfinite(r[key])]
        history.extend(rows)
        with interval.timing("tracking"):
            for hook in hooks:
                hook.on_metrics(rows)
            if bad:
                raise NonFiniteLoss(*bad[0], last_checkpoint, precision)
            progress.update(task, completed=step, status=f"loss {losses[-1]:.3f}  lr {rows[-1][1]['train/lr']:.2e}  {tokens_per_sec:,.0f} tok/s" + (f"  val {val_loss:.3f}" if math.isfinite(val_loss) else ""))

    def stop_requested() -> bool:
        """A signal arrived. With several ranks, on any of them, so that all stop after the same step; asked
        once per log interval, as it costs an all-reduce and a device sync."""
        if not env.is_distributed:
            return stop.received is not None
        if state.step % cfg.train.log_every != 0:
            return False
        return distributed.mean_over_ranks(torch.tensor(float(stop.received is not None), device=env.device), env).item() > 0

    start_step = state.step
    with progress, stop.at_step_boundaries(), out_of_memory_advice(cfg):
        task = progress.add_task("train", total=cfg.train.max_steps, completed=state.step, status="")
        while state.step < cfg.train.max_steps and not stop_requested():
            lr = lr_at(state.step, cfg.train.lr, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio)
            with interval.timing("data"):
                micro_batches = [state.sampler.next_batch() for _ in range(cfg.train.grad_accum)]
            loss, grad_norm = run.step(micro_batches, lr)
            state.tokens_seen += tokens_per_step
            interval.tokens += tokens_per_step
            pending.append((state.step, lr, loss, grad_norm))
            # on CPU reading the loss costs nothing: stop at the first bad step (on a GPU it would sync every step; the flush checks)
            if env.device.type == "cpu" and not env.is_distributed and not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())):
                flush_metrics(state.step)  # raises NonFiniteLoss

            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
                flush_metrics(state.step)
            if (cfg.train.eval_every > 0 and state.step % cfg.train.eval_every == 0) or state.step == cfg.train.max_steps:
                flush_metrics(state.step)
                val_loss = run_eval()
                interval.restart()  # eval time is not training throughput
            if cfg.train.checkpoint_every > 0 and state.step % cfg.train.checkpoint_every == 0 and state.step < cfg.train.max_steps:
                save(state.step)
        if start_step == state.step == cfg.train.max_steps:  # resumed from the final checkpoint: the end still wants a val loss
            val_loss = evaluate(model, run.val_ds, cfg, env.device, run.amp, env)
        save(state.step)
    if state.step < cfg.train.max_steps:  # stopped by a signal, at a step boundary
        saved = f"checkpoint {last_checkpoint}" if last_checkpoint else "no checkpoint (train.checkpoint_dir is empty)"
        console.print(f"{stop.name}: stopped after step {state.step} of {cfg.train.max_steps}; {saved}", soft_wrap=True, markup=False)
        raise KeyboardInterrupt

    samples = generate_samples(model, run.tokenizer, list(cfg.train.samples), cfg.train.sample_tokens, cfg.seed, env.device) if is_main else []
    result = TrainResult(
        final_val_loss=val_loss,
        steps=state.step,
        tokens_seen=state.tokens_seen,
        wall_time_s=time.perf_counter() - started,
        history=history,
        samples=samples,
        model=model,
        tokenizer=run.tokenizer,
        checkpoint=last_checkpoint,
        derived=derived,
    )
    for hook in hooks:
        hook.on_end(result)
    del run  # the DDP reducer holds the process group: freeing it after the group is destroyed can deadlock gloo
    distributed.teardown(env)
    return result


class IntervalClock:
    """Wall time of the current log interval, and how much of it went to fetching data and to tracking.

    Every second lands in exactly one interval: `lap()` starts the next one before the flush calls the
    hooks, so tracking time is charged to the interval it delays.
    """

    def __init__(self):
        self.restart()

    def restart(self, now: float | None = None) -> None:
        self.start, self.spent, self.tokens = now or time.perf_counter(), {"data": 0.0, "tracking": 0.0}, 0

    @contextmanager
    def timing(self, what: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spent[what] += time.perf_counter() - start

    def lap(self) -> tuple[float, int, float, float]:
        """(seconds, tokens, data seconds, tracking seconds) of the interval now ending; the next begins."""
        now = time.perf_counter()
        elapsed, tokens, spent = now - self.start, self.tokens, self.spent
        self.restart(now)
        return elapsed, tokens, spent["data"], spent["tracking"]


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


@contextmanager
def out_of_memory_advice(cfg: DictConfig):
    """Turn an out-of-memory error of the accelerator into one line saying which knobs to turn."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of accelerator memory at train.batch_size={cfg.train.batch_size}, data.seq_len={cfg.data.seq_len}; "
            "lower train.batch_size or data.seq_len (raise train.grad_accum to keep the tokens per step)"
        ) from None


class NonFiniteLoss(UserError):
    """The loss (or gradient norm) became NaN or inf: training stops rather than burn compute on garbage.

    On CPU both are checked after every step; on an accelerator at each metrics flush
    (every train.log_every steps, and before any checkpoint), so no checkpoint holds a
    diverged model and at most log_every - 1 steps run past the first bad one.
    """

    def __init__(self, step: int, what: str, value: float, last_checkpoint: Path | None, precision: str = "fp32"):
        self.step = step
        kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written before it"
        fix = "lower train.lr or train.grad_clip" + (f", or use train.precision=fp32 instead of {precision}" if precision != "fp32" else "")
        super().__init__(f"{what} became {value} at step {step}; {fix} ({kept})")
