"""Training throughput side by side, in one command: is our step fast, and what is it fast against?

The candidates (research/bench_candidates.py) are our step as train() builds it, its variants,
and transformers' Llama as the script a user writes (**plain Llama**) and with every knob a user
can turn set as ours are (**tuned Llama**). On a CPU they are timed in two phases
(research/bench_phases.py): plain settings, in a fresh process (ours and plain Llama), then our
settings, in this one (every candidate), and then beside each background load; on a GPU in one.
Between rounds of our settings the machine's matmul ceilings are measured. The report
(research/bench_report.py) goes to results/bench/<machine>.md, and every figure to MLflow
(research/bench_metrics.py) like any run.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import Progress

from research import background_load, distributed
from research.bench_candidates import PLAIN_LLAMA, TUNED_LLAMA, build_candidates
from research.bench_memory import MemoryWatch
from research.bench_metrics import metrics_of, slug
from research.bench_phases import AS_TRAINED, PLAIN, our_settings, time_plain_phase
from research.bench_report import markdown, print_table
from research.bench_timing import BenchResult, Candidate, Phase, Ticker, load_average, profile_step, time_phase
from research.config import apply_overrides, resolve_path, validate
from research.errors import UserError
from research.hardware import autocast_dtype, device_name, keep_freed_memory, matmul_sizes, measure_matmul_flops, peak_flops, usable_cores
from research.accounting import flops_per_token, num_params
from research.trainer import RunInfo, derived_quantities


def run_benchmark(cfg: DictConfig, label: str = "", tracker=None) -> BenchResult:
    """Time every candidate for `cfg`'s shape and precision, phase by phase; `tracker` (an MLflowHook) logs our steps."""
    env = distributed.setup(cfg.train.device)
    if env.is_distributed:
        raise UserError("the benchmark runs in one process: start it with python run.py, not torchrun")
    cpu = env.device.type == "cpu"
    plain_phase = cpu and cfg.bench.llama and cfg.bench.plain_phase
    main = our_settings() if cpu else AS_TRAINED
    rounds = cfg.bench.warmup_steps + cfg.bench.steps
    llamas = 2 * cfg.bench.llama
    steps = rounds * (2 * plain_phase + 1 + cfg.bench.padded + cfg.bench.compile + llamas + cpu * len(cfg.bench.load) * (1 + llamas))
    with Progress(console=Console(), transient=True) as progress:
        task = progress.add_task("bench", total=steps)
        ticker = Ticker(progress, task)
        loads: dict[str, tuple[float, float]] = {}
        with load_average(loads, PLAIN.name):
            plain_timings = time_plain_phase(cfg, ticker) if plain_phase else {}
        if cpu:
            keep_freed_memory()  # what train() does on a CPU, before it builds anything; it lasts for the process
        candidates, run = build_candidates(cfg, env)
        for candidate in candidates:
            if candidate.name in plain_timings:
                candidate.timings[PLAIN.name] = plain_timings[candidate.name]
        under_load = [c for c in candidates if c is candidates[0] or c.name in (PLAIN_LLAMA, TUNED_LLAMA)] if cpu else []
        if tracker is not None:
            tracker.on_start(RunInfo(cfg, run.state.model, run.tokenizer, run.data_info, derived_quantities(cfg, run, env), run.compiled))
        precisions = dict.fromkeys(("fp32", "bf16", run.precision))
        ceilings = {p: {size: [] for size in matmul_sizes(p, env.device)} for p in precisions}
        with load_average(loads, main.name):
            hook_times = time_main_phase(cfg, env, candidates, main, ceilings, ticker, tracker)
        measure_untimed(cfg, env, candidates, ticker)
        load_phases = time_under_load(cfg, env, under_load, main, ticker, loads) if cpu else []
    phases = ([PLAIN] if plain_phase else []) + [main]
    references = {}
    if cfg.bench.llama:  # on a CPU, plain Llama only with plain settings: our allocator and OpenMP setting would tune it
        references = ({"plain Llama": (PLAIN_LLAMA, phases[0].name)} if plain_phase or not cpu else {}) | {"tuned Llama": (TUNED_LLAMA, main.name)}
    return BenchResult(
        label=label or f"{num_params(run.state.model) / 1e6:.1f}M, {run.precision}",
        device=device_name(env.device) + (f", {torch.get_num_threads()} threads" if cpu else ""),
        device_type=env.device.type,
        shape=shape_of(cfg, run),
        candidates=candidates,
        phases=phases,
        load_phases=load_phases,
        references=references,
        matmul_flops={p: best_ceiling(sizes) for p, sizes in ceilings.items()},
        table_peak_flops=peak_flops(env.device, run.precision, resolve_path(cfg.out_dir) / "cache"),
        tracking_share=statistics.median(hook_times) / (cfg.train.log_every * candidates[0].timings[main.name].median()) if hook_times else float("nan"),
        tracking_ms_per_flush=statistics.median(hook_times) * 1e3 if hook_times else float("nan"),
        flops_per_token=flops_per_token(run.model_config, cfg.data.seq_len),
        rounds=cfg.bench.steps,
        load_average={phase.name: loads[phase.name] for phase in phases + load_phases},
        cores=usable_cores(),
    )


def shape_of(cfg: DictConfig, run) -> dict:
    m = run.model_config
    return {"parameters": num_params(run.state.model), "vocab": m.vocab_size, "hidden": m.hidden_size, "layers": m.num_hidden_layers,
            "heads": m.num_attention_heads, "kv heads": m.num_key_value_heads, "intermediate": m.intermediate_size,
            "seq": cfg.data.seq_len, "batch": cfg.train.batch_size, "grad accum": cfg.train.grad_accum, "precision": run.precision}


def best_ceiling(sizes: dict[int, list[float]]) -> tuple[float, int]:
    """(median FLOP/s, size) of the matmul size with the highest median."""
    best = max(sizes, key=lambda s: statistics.median(sizes[s]))
    return statistics.median(sizes[best]), best


def time_main_phase(cfg: DictConfig, env: distributed.DistEnv, candidates: list[Candidate], phase: Phase, ceilings: dict,
                    ticker: Ticker, tracker) -> list[float]:
    """Every candidate under train()'s settings, round-robin; between rounds the matmul ceilings and a log interval's tracking."""
    hook_times: list[float] = []

    def between_rounds(round_index: int) -> None:
        if tracker is not None:  # what a log interval costs the trainer: reading the values, the hook, a round trip to the store, the display
            start = time.perf_counter()
            last = candidates[0].last
            row = {"train/loss": last.loss.item(), "train/grad_norm": last.grad_norm.item(), "train/lr": cfg.train.lr}
            tracker.on_metrics([(candidates[0].runner.state.step, row)])
            tracker.flush(force=True)
            ticker.starting(f"round {round_index + 1}: loss {row['train/loss']:.3f}")
            hook_times.append(time.perf_counter() - start)
        for p, sizes in ceilings.items():
            for size in sizes:
                sizes[size].append(measure_matmul_flops(autocast_dtype(p) or torch.float32, env.device, size=size, repeats=3))

    time_phase(candidates, phase.name, cfg.bench.warmup_steps, cfg.bench.steps, env.device, ticker, between_rounds)
    return hook_times


def measure_untimed(cfg: DictConfig, env: distributed.DistEnv, candidates: list[Candidate], ticker: Ticker) -> None:
    """A profiled step of ours (each compile setting), then each candidate's peak memory in a step of its own: both cost time."""
    if cfg.bench.profile:  # in the trainer's steady state, before the memory pass hands memory back to the OS
        for candidate in candidates:
            if candidate.name.startswith("ours") and "packing" not in candidate.name:
                ticker.starting(f"profile: {candidate.name}")
                candidate.profile = profile_step(candidate, env.device)
    for candidate in candidates:
        ticker.starting(f"memory: {candidate.name}")
        with MemoryWatch(env.device) as memory:
            candidate.step()
        candidate.peak_step_bytes = memory.peak


def time_under_load(cfg: DictConfig, env: distributed.DistEnv, candidates: list[Candidate], main: Phase, ticker: Ticker,
                    loads: dict[str, tuple[float, float]]) -> list[Phase]:
    """`candidates` again beside each `bench.load`, with train()'s settings; returns the phases, one per load."""
    phases = []
    for kind in cfg.bench.load:
        ticker.starting(f"starting the {kind} load")
        with background_load.running(kind, cfg) as processes:
            phase = Phase(f"beside {kind}: {processes} process{'es' if processes > 1 else ''}", main.allocator, main.openmp)
            with load_average(loads, phase.name):
                time_phase(candidates, phase.name, cfg.bench.warmup_steps, cfg.bench.steps, env.device, ticker)
        phases.append(phase)
    return phases


def run_bench(cfg: DictConfig, variants: list[tuple[str, dict]] | None = None, notes: str = "") -> list[BenchResult]:
    """`python run.py exp=bench`: benchmark each (label, overrides) variant of `cfg`, write the report
    to <bench.out>/<machine>.md and log it, with every figure as a metric, to one MLflow run."""
    from research.tracking import MLflowHook, log_file_as, mlflow_run

    variants = variants or [("", {})]
    console = Console()
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
        path.write_text(markdown(results, "python run.py exp=" + cfg.exp, notes))
        console.print(f"report: {path}")
        if client:
            log_file_as(client, run_id, path, f"bench/{path.name}")
    return results
