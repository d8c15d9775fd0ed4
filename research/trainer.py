"""The pretraining loop: `train(cfg, hooks) -> TrainResult`, read top to bottom in `run_training`.

No module-level state: a sweep calls `train` many times in one process. Everything the next
step depends on lives in one `TrainState` (research/state.py), so a checkpoint is
`state.state_dict()`. The loop calls named functions for what happens between steps:
metrics (research/metrics.py), evaluation, checkpoints, samples. Tracking, pruning and
anything else that watches a run plugs in through `Hooks`; rank awareness comes from `distributed`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from research import distributed
from research.checkpoint import StopSignal, checkpoint_path, prune_checkpoints, save_checkpoint
from research.components import Components, build
from research.config import resolve_path, to_yaml
from research.data import DataInfo
from research.errors import UserError
from research.evaluate import evaluate_sets
from research.hardware import cpu_has_fast_bf16, device_name, keep_freed_memory, peak_flops
from research.metrics import MetricLog
from research.accounting import flops_per_token, num_params
from research.model import MiniMindForCausalLM
from research.mixture import mixture_shares, source_lines
from research.names import TEST_LOSS, TRAIN_LOSS, VAL_LOSS
from research.sample import generate_samples
from research.schedule import lr_at
from research.state import TrainState, rng_state


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
    data_info: DataInfo
    derived: dict[str, Any]
    compiled: bool = False  # what train.compile resolved to for this model and device


@dataclass
class TrainResult:
    final_val_loss: float
    final_test_loss: float  # NaN without a test split (data.test_fraction=0)
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
    run_page: str = ""  # its page in the MLflow UI, when the store is a tracking server
    final_metrics: dict[str, float] = field(default_factory=dict)  # the last validation and the test metrics: val/loss, val/bpb, test/..., per source

    def curve(self, name: str = TRAIN_LOSS) -> list[tuple[int, float]]:
        return [(step, row[name]) for step, row in self.history if name in row]


def train(cfg: DictConfig, hooks: Sequence[Hooks] = ()) -> TrainResult:
    """Pretrain a model as `cfg` says; hooks watch (and may stop) the run.

    Ctrl-C or SIGTERM during the loop: the step in flight finishes, a checkpoint is written
    and KeyboardInterrupt is raised. The signal handlers exist only during this call.
    """
    with StopSignal() as stop:
        return run_training(cfg, hooks, stop)


def run_training(cfg: DictConfig, hooks: Sequence[Hooks], stop: StopSignal) -> TrainResult:
    started = time.perf_counter()
    t = cfg.train
    env = distributed.setup(t.device)
    share_rank_zero_choices(cfg, env)
    hooks = list(hooks) if env.is_main else []
    checkpoints = Checkpoints(cfg, env, hooks)
    console = Console(quiet=not env.is_main)
    if env.device.type == "cpu":
        keep_freed_memory()  # the next step's activations reuse this step's memory instead of page-faulting it in again
    run = build(cfg, env)
    state = run.state
    derived = derived_quantities(cfg, run, env)
    describe(derived, run.precision, env, console)
    for hook in hooks:
        hook.on_start(RunInfo(cfg, state.model, run.tokenizer, run.data_info, derived, run.compiled))
    log = MetricLog(env, hooks, console, derived["FLOPs per token"], derived["peak FLOP/s (for MFU)"], run.precision,
                    check_grad_norm=not state.scaler.is_enabled(), max_steps=t.max_steps, start_step=state.step)

    start_step, val = state.step, {VAL_LOSS: float("nan")}
    state.model.train()
    with log.progress, stop.at_step_boundaries(), out_of_memory_advice(cfg):
        while state.step < t.max_steps and not stop_requested(stop, state.step, t.log_every, env):
            lr = lr_at(state.step, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio)
            done = run.step.advance(lr)
            log.clock.add("data", done.data_seconds)
            state.tokens_seen += derived["tokens per step"]
            log.record(state.step, lr, done.loss, done.grad_norm, derived["tokens per step"], checkpoints.last)

            last_step = state.step == t.max_steps
            if state.step % t.log_every == 0 or last_step:
                log.flush(state.step, checkpoints.last)
            if (t.eval_every > 0 and state.step % t.eval_every == 0) or last_step:
                log.flush(state.step, checkpoints.last)
                val = evaluate_sets(state.model, run.val_sets, "val", t, env.device, run.amp, env, run.token_bytes)
                log.record_eval(state.step, val)
            if t.checkpoint_every > 0 and state.step % t.checkpoint_every == 0 and not last_step:
                checkpoints.save(state, log)
        if start_step == state.step == t.max_steps:  # resumed from the final checkpoint: the end still wants a val loss
            val = evaluate_sets(state.model, run.val_sets, "val", t, env.device, run.amp, env, run.token_bytes)
        checkpoints.save(state, log)
    if state.step < t.max_steps:  # stopped by a signal, at a step boundary
        saved = f"checkpoint {checkpoints.last}" if checkpoints.last else "no checkpoint (train.checkpoint_dir is empty)"
        console.print(f"{stop.name}: stopped after step {state.step} of {t.max_steps}; {saved}", soft_wrap=True, markup=False)
        raise KeyboardInterrupt

    test = {TEST_LOSS: float("nan")}
    if run.test_sets:  # once, after training: nothing during the run (nor a sweep's selection) sees it
        test = evaluate_sets(state.model, run.test_sets, "test", t, env.device, run.amp, env, run.token_bytes, max_batches=t.test_batches)
        log.record_test(state.step, test)
    samples = generate_samples(state.model, run.tokenizer, list(t.samples), t.sample_tokens, cfg.seed, env.device) if env.is_main else []
    result = TrainResult(val[VAL_LOSS], test[TEST_LOSS], state.step, state.tokens_seen, time.perf_counter() - started, log.history, samples,
                         state.model, run.tokenizer, checkpoints.last, derived, final_metrics={**val, **test, **mixture_shares(state.sampler)})
    for hook in hooks:
        hook.on_end(result)
    del run  # the DDP reducer holds the process group: freeing it after the group is destroyed can deadlock gloo
    distributed.teardown(env)
    return result


def share_rank_zero_choices(cfg: DictConfig, env: distributed.DistEnv) -> None:
    """Rank 0 alone opened the MLflow run and chose where checkpoints go (and what to resume): tell the other ranks."""
    chosen = (cfg.train.checkpoint_dir, cfg.train.resume_from)
    cfg.train.checkpoint_dir, cfg.train.resume_from = distributed.broadcast_object(chosen, env)


def derived_quantities(cfg: DictConfig, run: Components, env: distributed.DistEnv) -> dict[str, Any]:
    """What the config implies, printed once at the start and handed to the hooks."""
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum * env.world_size
    threads = torch.get_num_threads() if env.device.type == "cpu" else 1
    with distributed.rank_zero_first(env, "measuring peak FLOP/s"):  # one CPU measurement, cached, rather than one per rank at once
        peak = peak_flops(env.device, run.precision, resolve_path(cfg.out_dir) / "cache")
    model = run.state.model
    return {
        "experiment": cfg.exp,
        "device": f"{device_name(env.device)} ({env.device.type}, {threads} threads) x {env.world_size} rank(s)",
        "precision": run.precision + (", torch.compile" if run.compiled else ""),
        "parameters": num_params(model),
        "non-embedding parameters": num_params(model, non_embedding=True),
        "tokens per step": tokens_per_step,
        "FLOPs per token": int(flops_per_token(run.model_config, cfg.data.seq_len)),
        "total tokens": tokens_per_step * cfg.train.max_steps,
        "epochs over train split": tokens_per_step * cfg.train.max_steps / max(1, run.data_info.train_tokens),
        "train / val / test tokens": f"{run.data_info.train_tokens:,} / {run.data_info.val_tokens:,} / {run.data_info.test_tokens:,}",
        "peak FLOP/s (for MFU)": peak,
        **source_lines(run.data_info, tokens_per_step * cfg.train.max_steps),
    }


def describe(derived: dict[str, Any], precision: str, env: distributed.DistEnv, console: Console) -> None:
    table = Table(title="run", show_header=False, box=None)
    for key, value in derived.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else (f"{value:.3g}" if isinstance(value, float) else str(value)))
    console.print(table)
    if env.device.type == "cpu" and precision == "bf16" and not cpu_has_fast_bf16():
        console.print("warning: this CPU has no AMX or AVX-512 BF16, so bf16 matrix products are emulated (~100x slower than fp32 here); "
                      "train.precision=auto picks fp32", soft_wrap=True, markup=False)


class Checkpoints:
    """Where a run's checkpoints go, and the newest one written; rank 0 alone writes, with every rank's RNG state."""

    def __init__(self, cfg: DictConfig, env: distributed.DistEnv, hooks: Sequence[Hooks]):
        self.cfg, self.env, self.hooks, self.last = cfg, env, hooks, None
        self.wanted = bool(cfg.train.checkpoint_dir)  # the same on every rank: rank 0's choice, shared
        self.saved_step: int | None = None
        self.folder = resolve_path(cfg.train.checkpoint_dir) if self.wanted and env.is_main else None
        if self.folder is not None:  # find out now, not after hours of training
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"cannot create the checkpoint folder {self.folder} ({err.strerror}); set out_dir or train.checkpoint_dir to a writable folder") from None

    def save(self, state: TrainState, log: MetricLog) -> None:
        """Flush the metrics (hooks have every row up to this step before a checkpoint of it exists), then write it once.

        Every rank calls this at the same steps: each hands rank 0 its RNG state, so a resume restores each rank's own."""
        log.flush(state.step, self.last)
        if not self.wanted or self.saved_step == state.step:  # none wanted, or saved already
            return
        self.saved_step = state.step
        rank_rngs = distributed.gather_to_main(rng_state(), self.env)
        if self.folder is None:  # not rank 0
            return
        self.last = save_checkpoint({"state": state.state_dict(rank_rngs), "config": to_yaml(self.cfg)}, checkpoint_path(self.folder, state.step))
        prune_checkpoints(self.folder, self.cfg.train.keep_checkpoints)
        for hook in self.hooks:
            hook.on_checkpoint(state.step, self.last)


def stop_requested(stop: StopSignal, step: int, log_every: int, env: distributed.DistEnv) -> bool:
    """A signal arrived. With several ranks, on any of them, so that all stop after the same step; asked
    once per log interval, as it costs an all-reduce and a device sync."""
    if not env.is_distributed:
        return stop.received is not None
    if step % log_every != 0:
        return False
    return distributed.mean_over_ranks(torch.tensor(float(stop.received is not None), device=env.device), env).item() > 0


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
