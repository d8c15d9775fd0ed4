"""Training throughput side by side, in one process: is our step fast, and what is it fast against?

Candidates, on the same model shape, data and precision:

    ours                       the trainer's own step (`StepRunner`) on packed windows, as train() builds it
    ours, a document per row   the same with data.packing=false (bench.padded=true)
    ours [, torch.compile]     the same with train.compile switched the other way (bench.compile=true)
    llama                      transformers' LlamaForCausalLM in a plain loop: model(x, labels=x).loss, AdamW
    llama, torch.compile       the same under torch.compile (bench.compile=true)

and the machine's fp32 and bf16 matmul ceilings. Candidates run round-robin, one step each per
round, so a noisy neighbour slows them all alike; the first `bench.warmup_steps` rounds are
dropped and medians reported. "Useful" tokens are the ones that carry loss (not padding). On a
CPU the rounds run twice: under glibc's allocator defaults, then with the memory setting train()
applies (`hardware.keep_freed_memory`), which cannot be undone within the process.
The report goes to results/bench/<machine>.md and to MLflow like any run.
"""

from __future__ import annotations

import datetime
import re
import resource
import statistics
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from research import background_load, distributed
from research.data import BatchSampler
from research.errors import UserError
from research.config import apply_overrides, resolve_path, validate
from research.hardware import (
    FREED_MEMORY_KEPT, autocast_dtype, cpu_features, cpu_name, device_name, resolve_precision, threading_summary, keep_freed_memory, matmul_sizes, measure_matmul_flops, peak_flops, release_free_memory,
)
from research.model import flops_per_token, num_params
from research.components import Components, build
from research.trainer import RunInfo, derived_quantities


PROFILE_ROWS = 12  # operators listed per profiled step in the report
DEFAULT_ALLOCATOR = "glibc's default allocator"  # how a plain script runs
TRAINER_ALLOCATOR = "freed memory kept for reuse (what train() sets on a CPU)"
AS_TRAINED = "as train() runs it"
LOADED = "beside"  # phase name prefix of a timing under background load


@dataclass
class Timing:
    """The measured (post-warm-up) steps of one candidate in one phase."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    useful: list[int] = field(default_factory=list)
    data_wait: list[float] = field(default_factory=list)
    page_faults: list[int] = field(default_factory=list)  # minor page faults of the process during the step

    def add(self, seconds: float, tokens: int, useful: int, data_wait: float, page_faults: int) -> None:
        self.seconds.append(seconds)
        self.tokens.append(tokens)
        self.useful.append(useful)
        self.data_wait.append(data_wait)
        self.page_faults.append(page_faults)

    def median(self) -> float:
        return statistics.median(self.seconds)

    def range(self) -> tuple[float, float]:
        return min(self.seconds), max(self.seconds)

    def tokens_per_sec(self) -> float:
        return statistics.median(self.tokens) / self.median()

    def useful_tokens_per_sec(self) -> float:
        return statistics.median(self.useful) / self.median()


@dataclass
class Candidate:
    """One way of training the same model: `step()` runs one optimizer step and says what it did."""

    name: str
    precision: str
    step: Callable[[], tuple[int, int, float]]  # -> (tokens processed, loss-bearing tokens, seconds waiting for data)
    static_bytes_of: Callable[[], int]  # weights and optimizer state, alive between steps (the state exists after step 1)
    last: dict = field(default_factory=dict)  # the latest step's loss and gradient norm, where the candidate reports them
    timings: dict[str, Timing] = field(default_factory=dict)  # phase -> its measured steps
    profile: list[tuple[str, float, int]] = field(default_factory=list)  # (operator, self seconds, calls) of one profiled step
    peak_step_bytes: int = 0  # high-water mark of memory during a step, above what was in use before it

    def peak_mib(self) -> float:
        return (self.static_bytes_of() + self.peak_step_bytes) / 2**20


@dataclass
class BenchResult:
    label: str
    device: str
    device_type: str  # cpu | cuda
    shape: dict
    candidates: list[Candidate]
    phases: list[str]  # allocator settings the candidates were timed under, in order; the last is the trainer's
    load_phases: list[str]  # then our step and the Llama loops beside each background load (CPU only), with the trainer's allocator
    matmul_flops: dict[str, tuple[float, int]]  # precision -> (median FLOP/s of the best size, that size)
    table_peak_flops: float  # what training runs compute MFU against (a known table on GPUs, the measured ceiling on CPUs)
    tracking_share: float  # MLflow logging + progress display, as a share of step time at train.log_every
    tracking_ms_per_flush: float
    flops_per_token: float
    rounds: int


class MemoryWatch:
    """High-water mark of memory during a block, above its level at entry.

    CUDA: the allocator's own peak. CPU: resident set size sampled every 2 ms by a thread
    (torch releases the GIL inside its kernels), so brief spikes between samples are missed.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.base, self.high, self.running = rss_bytes(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.high = max(self.high, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(0, max(self.high, rss_bytes()) - self.base)
        return False


def minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def tensor_bytes(*tensor_groups) -> int:
    seen, total = set(), 0
    for group in tensor_groups:
        for t in group:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def optimizer_tensors(optimizer: torch.optim.Optimizer):
    return [v for state in optimizer.state.values() for v in state.values()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- candidates


def ours(cfg: DictConfig, env: distributed.DistEnv, name: str, **overrides) -> tuple[Candidate, Components]:
    """The trainer's own step, built exactly as `train` builds it (overrides: dotted config keys)."""
    cfg = apply_overrides(cfg.copy(), overrides)
    run = build(cfg, env)
    state = run.state

    def step() -> tuple[int, int, float]:
        start = time.perf_counter()
        micro_batches = [state.sampler.next_batch() for _ in range(cfg.train.grad_accum)]
        data_wait = time.perf_counter() - start
        candidate.last["train/loss"], candidate.last["train/grad_norm"] = run.step(micro_batches, cfg.train.lr)
        tokens = sum(b["input_ids"].numel() for b in micro_batches)
        return tokens, int(sum(b["loss_mask"].sum() for b in micro_batches)), data_wait

    candidate = Candidate(
        name + (", torch.compile" if run.compiled else ""), run.precision, step,
        lambda: tensor_bytes(state.model.parameters(), optimizer_tensors(state.optimizer)),
    )
    return candidate, run


def llama(cfg: DictConfig, env: distributed.DistEnv, run, compiled: bool) -> Candidate:
    """transformers' LlamaForCausalLM of the same shape, trained the way its documentation shows:
    `model(input_ids=x, labels=x).loss` (the model shifts the labels, so each row loses one target),
    `torch.optim.AdamW` with its defaults for the device, gradient clipping, same data and precision."""
    from transformers import LlamaForCausalLM

    from research.export import to_llama_config

    torch.manual_seed(cfg.seed)
    llama_config = to_llama_config(run.model_config)
    llama_config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(llama_config).to(env.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), weight_decay=cfg.train.weight_decay)
    scaler = torch.amp.GradScaler(env.device.type, enabled=run.precision == "fp16")
    sampler = BatchSampler(run.train_ds, cfg.train.batch_size, seed=cfg.seed)
    dtype = autocast_dtype(run.precision)
    forward = torch.compile(model) if compiled else model

    def step() -> tuple[int, int, float]:
        start = time.perf_counter()
        micro_batches = [sampler.next_batch() for _ in range(cfg.train.grad_accum)]
        data_wait = time.perf_counter() - start
        for batch in micro_batches:
            x = batch["input_ids"].to(env.device, non_blocking=True)
            with torch.autocast(env.device.type, dtype=dtype) if dtype else nullcontext():
                loss = forward(input_ids=x, labels=x).loss / len(micro_batches)
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        rows, seq = micro_batches[0]["input_ids"].shape
        return rows * seq * len(micro_batches), rows * (seq - 1) * len(micro_batches), data_wait

    return Candidate(
        "llama" + (", torch.compile" if compiled else ""), run.precision, step, lambda: tensor_bytes(model.parameters(), optimizer_tensors(optimizer)),
    )


def profile_step(candidate: Candidate, device: torch.device) -> list[tuple[str, float, int]]:
    """Where one step's time goes: torch.profiler's operators by self time (untimed; the profiler slows the step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        candidate.step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    return [(e.key, getattr(e, key) / 1e6, e.count) for e in events if getattr(e, key) > 0]


# ----------------------------------------------------------------------------- the run


def run_benchmark(cfg: DictConfig, label: str = "", tracker=None) -> BenchResult:
    """Time every candidate for `cfg`'s shape and precision, interleaved; `tracker` (an MLflowHook) logs our steps."""
    env = distributed.setup(cfg.train.device)
    if env.is_distributed:
        raise UserError("the benchmark runs in one process: start it with python run.py, not torchrun")
    candidates, run = build_candidates(cfg, env)
    precision = run.precision
    ceilings = {p: {size: [] for size in matmul_sizes(p, env.device)} for p in dict.fromkeys(("fp32", "bf16", precision))}
    phases = [TRAINER_ALLOCATOR if env.device.type == "cpu" else AS_TRAINED]
    if env.device.type == "cpu" and cfg.bench.default_allocator_first and not FREED_MEMORY_KEPT.is_set():  # glibc's defaults, while this process still has them
        phases.insert(0, DEFAULT_ALLOCATOR)
    if tracker is not None:
        tracker.on_start(RunInfo(cfg, run.state.model, run.tokenizer, run.data_info, derived_quantities(cfg, run, env), run.compiled))

    with Progress(console=Console(), transient=True) as progress:
        rounds = cfg.bench.warmup_steps + cfg.bench.steps
        loaded_steps = len(cfg.bench.load) * rounds * (1 + sum(c.name.startswith("llama") for c in candidates)) if env.device.type == "cpu" else 0
        task = progress.add_task("bench", total=len(phases) * rounds * len(candidates) + loaded_steps)
        hook_times = time_rounds(cfg, env, candidates, phases, ceilings, progress, task, tracker, run.state)
        if cfg.bench.profile:  # in the trainer's steady state, before the memory pass hands memory back to the OS
            for candidate in candidates:
                if candidate.name.startswith("ours") and "packing" not in candidate.name:
                    progress.update(task, description=f"profile: {candidate.name}")
                    candidate.profile = profile_step(candidate, env.device)
        for candidate in candidates:  # memory in a separate, untimed step each: watching it costs time
            progress.update(task, description=f"memory: {candidate.name}")
            with MemoryWatch(env.device) as memory:
                candidate.step()
            candidate.peak_step_bytes = memory.peak
        load_phases = time_under_load(cfg, env, candidates, progress, task) if env.device.type == "cpu" else []

    matmul = {}
    for p, sizes in ceilings.items():
        best = max(sizes, key=lambda s: statistics.median(sizes[s]))
        matmul[p] = (statistics.median(sizes[best]), best)
    step_seconds = candidates[0].timings[phases[-1]].median()
    flush_seconds = statistics.median(hook_times) if hook_times else 0.0
    m = run.model_config
    shape = {"parameters": num_params(run.state.model), "vocab": m.vocab_size, "hidden": m.hidden_size, "layers": m.num_hidden_layers,
             "heads": m.num_attention_heads, "kv heads": m.num_key_value_heads, "intermediate": m.intermediate_size,
             "seq": cfg.data.seq_len, "batch": cfg.train.batch_size, "grad accum": cfg.train.grad_accum, "precision": precision}
    threads = f", {torch.get_num_threads()} threads" if env.device.type == "cpu" else ""
    return BenchResult(
        label=label or f"{shape['parameters'] / 1e6:.1f}M, {precision}",
        device=f"{device_name(env.device)}{threads}",
        device_type=env.device.type,
        shape=shape,
        candidates=candidates,
        phases=phases,
        load_phases=load_phases,
        matmul_flops=matmul,
        table_peak_flops=peak_flops(env.device, precision, resolve_path(cfg.out_dir) / "cache"),
        tracking_share=flush_seconds / (cfg.train.log_every * step_seconds) if hook_times else float("nan"),  # timed with the first variant only
        tracking_ms_per_flush=flush_seconds * 1e3 if hook_times else float("nan"),
        flops_per_token=flops_per_token(run.model_config, cfg.data.seq_len),
        rounds=cfg.bench.steps,
    )


def build_candidates(cfg: DictConfig, env: distributed.DistEnv) -> tuple[list[Candidate], Components]:
    """Our step first (the one `train()` runs), then the variants and references the bench section asks for."""
    main, run = ours(cfg, env, "ours")
    candidates = [main]
    if cfg.bench.padded:
        candidates.append(ours(cfg, env, "ours, a document per row (data.packing=false)", **{"data.packing": False})[0])
    if cfg.bench.compile:  # the trainer with torch.compile switched the other way from what train.compile picks here
        candidates.append(ours(cfg, env, "ours", **{"train.compile": str(not run.compiled).lower()})[0])
    if cfg.bench.llama:
        candidates.append(llama(cfg, env, run, compiled=False))
        if cfg.bench.compile:
            candidates.append(llama(cfg, env, run, compiled=True))
    return candidates, run


def time_rounds(cfg: DictConfig, env: distributed.DistEnv, candidates: list[Candidate], phases: list[str], ceilings: dict,
                progress: Progress, task, tracker, state) -> list[float]:
    """Round-robin steps of every candidate in each phase, the matmul ceilings between rounds; returns the tracking times."""
    hook_times: list[float] = []

    def between_rounds(round_index: int) -> None:
        if tracker is not None:  # what a log interval costs the trainer: reading the values, the hook, a round trip to the store, the display
            start = time.perf_counter()
            row = {name: value.item() for name, value in candidates[0].last.items()} | {"train/lr": cfg.train.lr}
            tracker.on_metrics([(state.step, row)])
            tracker.flush(force=True)
            progress.update(task, description=f"round {round_index + 1}: loss {row['train/loss']:.3f}")
            hook_times.append(time.perf_counter() - start)
        for p, sizes in ceilings.items():
            for size in sizes:
                sizes[size].append(measure_matmul_flops(autocast_dtype(p) or torch.float32, env.device, size=size, repeats=3))

    for phase in phases:
        if phase == TRAINER_ALLOCATOR and env.device.type == "cpu":
            keep_freed_memory()  # what train() does on a CPU; it cannot be undone, so this phase comes last
        time_phase(cfg, env, candidates, phase, progress, task, between_rounds)
    return hook_times


def time_phase(cfg: DictConfig, env: distributed.DistEnv, candidates: list[Candidate], phase: str, progress: Progress, task,
               between_rounds: Callable[[int], None] = lambda round_index: None) -> None:
    """`bench.warmup_steps` + `bench.steps` rounds of one step per candidate; the rounds after the warm-up are kept under `phase`."""
    rounds = cfg.bench.warmup_steps + cfg.bench.steps
    for round_index in range(rounds):
        for candidate in candidates:
            progress.update(task, description=f"{phase}, round {round_index + 1}/{rounds}: {candidate.name}")
            sync(env.device)
            faults, start = minor_page_faults(), time.perf_counter()
            tokens, useful, data_wait = candidate.step()
            sync(env.device)
            if round_index >= cfg.bench.warmup_steps:
                candidate.timings.setdefault(phase, Timing()).add(time.perf_counter() - start, tokens, useful, data_wait, minor_page_faults() - faults)
            progress.advance(task)
        between_rounds(round_index)


def time_under_load(cfg: DictConfig, env: distributed.DistEnv, candidates: list[Candidate], progress: Progress, task) -> list[str]:
    """Our step as trained and the Llama loops again, beside each `bench.load`; returns the phase names, one per load."""
    timed = [candidates[0]] + [c for c in candidates if c.name.startswith("llama")]
    phases = []
    for kind in cfg.bench.load:
        progress.update(task, description=f"starting the {kind} load")
        with background_load.running(kind, cfg) as processes:
            phase = f"{LOADED} {kind}: {processes} process{'es' if processes > 1 else ''}"
            time_phase(cfg, env, timed, phase, progress, task)
        phases.append(phase)
    return phases


# ----------------------------------------------------------------------------- the report


def reference(result: BenchResult) -> Timing | None:
    """The plain transformers Llama loop as a script runs it (the first phase: glibc's allocator defaults on a CPU)."""
    llama_plain = next((c for c in result.candidates if c.name == "llama"), None)
    return llama_plain.timings[result.phases[0]] if llama_plain else None


def rows(result: BenchResult, phase: str | None = None) -> list[dict]:
    """One row per candidate for `phase` (default: the trainer's allocator), ratios against `reference`."""
    phase = phase or result.phases[-1]
    ref = reference(result)
    ceiling = result.matmul_flops[result.shape["precision"]][0]
    out = []
    for c in result.candidates:
        t = c.timings[phase]
        out.append({
            "candidate": c.name,
            "step_s": t.median(),
            "step_range": t.range(),
            "tokens_per_sec": t.tokens_per_sec(),
            "useful_tokens_per_sec": t.useful_tokens_per_sec(),
            "vs_llama": t.useful_tokens_per_sec() / ref.useful_tokens_per_sec() if ref else float("nan"),
            "mfu_measured": t.tokens_per_sec() * result.flops_per_token / ceiling,
            "mfu_table": t.tokens_per_sec() * result.flops_per_token / result.table_peak_flops,
            "peak_mib": c.peak_mib(),
            "data_wait_share": sum(t.data_wait) / sum(t.seconds),
            "useful_share": sum(t.useful) / sum(t.tokens),
            "page_faults": statistics.median(t.page_faults),
        })
    return out


def load_rows(result: BenchResult) -> list[dict]:
    """Per candidate timed under load: its median alone (the trainer's allocator) and, per load, median, min, max and slowdown."""
    out = []
    for c in result.candidates:
        if not result.load_phases or not all(phase in c.timings for phase in result.load_phases):
            continue
        alone = c.timings[result.phases[-1]]
        loads = {phase: {"step_s": c.timings[phase].median(), "step_range": c.timings[phase].range(),
                         "slowdown": c.timings[phase].median() / alone.median()} for phase in result.load_phases}
        out.append({"candidate": c.name, "alone_s": alone.median(), "alone_range": alone.range(), "loads": loads})
    return out


def load_kind(phase: str) -> str:
    """'beside spinners: 2 processes' -> 'spinners'."""
    return phase.removeprefix(LOADED).strip().split(":")[0]


def load_table(result: BenchResult) -> list[str]:
    """The report's table of step times beside each background load, with the slowdowns."""
    if not result.load_phases:
        return []
    header = " | ".join(f"{phase}: step s, median (min–max) | slowdown" for phase in result.load_phases)
    lines = [
        "**Beside background load** (started before and stopped after each table column; freed memory kept for reuse). "
        "Slowdown: the median step under load over the median alone; lower is more graceful:",
        "",
        f"| candidate | alone: step s, median (min–max) | {header} |",
        "|---|---|" + "---|---|" * len(result.load_phases),
    ]
    for r in load_rows(result):
        lo, hi = r["alone_range"]
        cells = " | ".join(f"{v['step_s']:.3f} ({v['step_range'][0]:.3f}–{v['step_range'][1]:.3f}) | {v['slowdown']:.2f}×" for v in r["loads"].values())
        lines.append(f"| {r['candidate']} | {r['alone_s']:.3f} ({lo:.3f}–{hi:.3f}) | {cells} |")
    return lines + [""]


def precision_line(results: list[BenchResult]) -> list[str]:
    """Where the report covers several precisions: does `train.precision=auto` pick the faster one for our step?"""
    step = {r.shape["precision"]: r.candidates[0].timings[r.phases[-1]].median() for r in results}
    if len(step) < 2:
        return []
    auto = resolve_precision("auto", torch.device(results[0].device_type))
    times = ", ".join(f"{seconds:.3f} s in {p}" for p, seconds in sorted(step.items(), key=lambda kv: kv[1]))
    verdict = "the faster" if step.get(auto) == min(step.values()) else "NOT the faster"
    return [f"`train.precision=auto` picks {auto} here, {verdict} one for our step: {times}.", ""]


def phase_table(result: BenchResult, phase: str) -> list[str]:
    """The report's table of every candidate under one allocator setting."""
    lines = [
        f"**{phase}**" + (" (peak memory: measured after the timed rounds, with the trainer's setting)" if phase == DEFAULT_ALLOCATOR else "") + ":",
        "",
        "| candidate | step s: median (min–max) | tokens/s | useful tokens/s | × llama | MFU (measured ceiling) | MFU (train/mfu peak) | peak memory MiB | data wait | page faults |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(result, phase):
        lo, hi = r["step_range"]
        lines.append(
            f"| {r['candidate']} | {r['step_s']:.3f} ({lo:.3f}–{hi:.3f}) | {r['tokens_per_sec']:,.0f} | {r['useful_tokens_per_sec']:,.0f} ({r['useful_share']:.0%}) "
            f"| {r['vs_llama']:.2f} | {r['mfu_measured']:.1%} | {r['mfu_table']:.1%} | {r['peak_mib']:,.0f} | {r['data_wait_share']:.2%} | {r['page_faults']:,.0f} |"
        )
    return lines + [""]


def profile_table(candidate: Candidate) -> list[str]:
    """The report's torch.profiler breakdown of one step of `candidate`, where it was profiled."""
    if not candidate.profile:
        return []
    total = sum(seconds for _, seconds, _ in candidate.profile)
    lines = ["", f"Profile of one step of **{candidate.name}** (torch.profiler, self time; {total:.2f} s in all, profiler overhead included):", "",
             "| operator | self s | share | calls |", "|---|---|---|---|"]
    lines += [f"| {name[:70]} | {seconds:.3f} | {seconds / total:.1%} | {calls} |" for name, seconds, calls in candidate.profile[:PROFILE_ROWS]]
    rest = sum(seconds for _, seconds, _ in candidate.profile[PROFILE_ROWS:])
    return lines + [f"| everything else | {rest:.3f} | {rest / total:.1%} | |"]


def cpu_line() -> str:
    """Which instruction sets decide the precision on this CPU, what `auto` picks, and how the threads are set up."""
    features = ", ".join(name + (" yes" if present else " no") for name, present in cpu_features().items())
    return f"CPU: {cpu_name()}; {features}; `train.precision=auto` picks {resolve_precision('auto', torch.device('cpu'))} on it. {threading_summary()}"


def markdown(results: list[BenchResult], command: str, notes: str = "") -> str:
    first = results[0]
    lines = [
        f"# Training throughput on {first.device}",
        "",
        f"Measured {datetime.date.today().isoformat()} with torch {torch.__version__} by `{command}`.",
        cpu_line() if first.device_type == "cpu" else f"Host CPU: {cpu_name()}.",
        "Candidates ran round-robin in one process; each figure is the median of the measured rounds (warm-up rounds dropped).",
        "MFU counts 6N + 12·L·H·Q·T FLOPs per token (N: matmul weights, L layers, H heads, Q head dim, T sequence) over all tokens processed.",
        "Useful tokens are those that carry loss. × llama: useful tokens/s over those of the plain `llama` loop as a script runs it "
        "(on a CPU, in the first table: glibc's default allocator). On a CPU every candidate is timed twice: first under glibc's "
        "defaults, then with freed memory kept for reuse, the setting `train()` applies (it is process-wide, so the Llama candidates get it too).",
        "",
    ]
    for result in results:
        s = result.shape
        ceilings = ", ".join(f"{p} {flops / 1e12:.3f} TFLOP/s (size {size})" for p, (flops, size) in result.matmul_flops.items())
        lines += [
            f"## {result.label}",
            "",
            f"Shape: {s['parameters'] / 1e6:.1f}M parameters (vocab {s['vocab']}, hidden {s['hidden']}, {s['layers']} layers, "
            f"{s['heads']} heads / {s['kv heads']} kv, intermediate {s['intermediate']}), seq {s['seq']}, batch {s['batch']} x {s['grad accum']} accumulation, "
            f"{s['precision']}; {result.flops_per_token / 1e6:.1f} MFLOP per token; {result.rounds} measured rounds.",
            f"Matmul ceiling (median, best size): {ceilings}. Peak used by training runs for train/mfu: {result.table_peak_flops / 1e12:.3f} TFLOP/s.",
            "",
        ]
        if result.device_type == "cpu" and result.phases[0] != DEFAULT_ALLOCATOR:
            lines += ["× llama here is against the plain Llama loop WITH the trainer's memory setting: glibc's defaults can only be timed "
                      "first in a fresh process (run this precision alone, e.g. `python run.py exp=bench train.precision=fp32`).", ""]
        for phase in result.phases:
            lines += phase_table(result, phase)
        lines += load_table(result)
        for c in result.candidates:
            lines += profile_table(c)
        if result.tracking_share == result.tracking_share:  # timed with the report's first variant
            lines += [
                "",
                f"Tracking: one log interval's MLflow logging (hook, forced round trip to the store) and progress update took "
                f"{result.tracking_ms_per_flush:.1f} ms: {result.tracking_share:.3%} of the time of the train.log_every steps it covers.",
                "",
            ]
    lines += precision_line(results)
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)


def print_table(result: BenchResult, console: Console) -> None:
    table = Table(title=f"{result.device}: {result.label}")
    console.print(f"[dim]{result.phases[-1]}; × llama: against the plain llama loop under {result.phases[0]}[/]")
    for column in ("candidate", "step s", "useful tok/s", "× llama", "MFU", "peak MiB", "data wait"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for r in rows(result):
        table.add_row(r["candidate"], f"{r['step_s']:.3f}", f"{r['useful_tokens_per_sec']:,.0f}", f"{r['vs_llama']:.2f}", f"{r['mfu_measured']:.1%}",
                      f"{r['peak_mib']:,.0f}", f"{r['data_wait_share']:.2%}")
    console.print(table)
    ceilings = ", ".join(f"{p} {flops / 1e12:.3f} TFLOP/s" for p, (flops, _) in result.matmul_flops.items())
    tracking = f"; tracking + progress: {result.tracking_share:.3%} of step time" if result.tracking_share == result.tracking_share else ""
    console.print(f"matmul ceiling: {ceilings}{tracking}")


def slug(text: str, separator: str = "_") -> str:
    """'AMD EPYC, 2 threads' -> 'amd_epyc_2_threads': for file and metric names."""
    return re.sub(r"[^a-z0-9]+", separator, text.lower()).strip(separator)


def metrics_of(result: BenchResult, prefix: str = "bench") -> dict[str, float]:
    """Flat {name: value} for MLflow: bench/<candidate>/<figure> for the trainer's allocator setting, and
    bench/default_allocator/<candidate>/<figure> for glibc's defaults where that was timed too."""
    out = {f"{prefix}/matmul_{p}_tflops": flops / 1e12 for p, (flops, _) in result.matmul_flops.items()}
    if result.tracking_share == result.tracking_share:  # not NaN: timed in this variant
        out[f"{prefix}/tracking_share"] = result.tracking_share
    for phase in result.phases:
        phase_prefix = prefix if phase == result.phases[-1] else f"{prefix}/default_allocator"
        for r in rows(result, phase):
            key = slug(r["candidate"])
            for name in ("step_s", "tokens_per_sec", "useful_tokens_per_sec", "vs_llama", "mfu_measured", "peak_mib", "data_wait_share"):
                if r[name] == r[name]:  # not NaN
                    out[f"{phase_prefix}/{key}/{name}"] = r[name]
    for r in load_rows(result):
        for phase, figures in r["loads"].items():
            out[f"{prefix}/load_{load_kind(phase)}/{slug(r['candidate'])}/step_s"] = figures["step_s"]
            out[f"{prefix}/load_{load_kind(phase)}/{slug(r['candidate'])}/slowdown"] = figures["slowdown"]
    return out


# ----------------------------------------------------------------------------- the experiment


def run_bench(cfg: DictConfig, variants: list[tuple[str, dict]] | None = None, notes: str = "") -> list[BenchResult]:
    """`python run.py exp=bench`: benchmark each (label, overrides) variant of `cfg`, write the report
    to <bench.out>/<machine>.md and log it, with every figure as a metric, to one MLflow run."""
    from research.tracking import MLflowHook, log_file_as, mlflow_run

    variants = variants or [("", {})]
    console = Console()
    command = "python run.py exp=" + cfg.exp
    results = []
    tracking = mlflow_run(cfg) if cfg.tracking.enabled else nullcontext((None, None))
    with tracking as (client, run_id):
        if run_id:
            console.print(f"[bold]{cfg.exp}[/] run [cyan]{run_id}[/]")
        for index, (label, overrides) in enumerate(variants):
            variant = apply_overrides(cfg.copy(), overrides)
            validate(variant)
            tracker = MLflowHook(client, run_id, log_artifacts=False) if client and index == 0 else None
            result = run_benchmark(variant, label, tracker)
            results.append(result)
            print_table(result, console)
            if client:
                prefix = "bench" if len(variants) == 1 else f"bench/{slug(result.label)}"
                tracker = tracker or MLflowHook(client, run_id, log_artifacts=False)
                tracker.on_metrics([(0, metrics_of(result, prefix))])
                tracker.flush(force=True)
        out_dir = resolve_path(cfg.bench.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{cfg.bench.machine or slug(results[0].device, '-')}.md"
        path.write_text(markdown(results, command, notes))
        console.print(f"report: {path}")
        if client:
            log_file_as(client, run_id, path, f"bench/{path.name}")
    return results
