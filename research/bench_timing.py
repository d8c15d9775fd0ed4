"""The benchmark's timing harness: candidates, the settings they are timed under, and interleaved rounds.

A phase is one setting of the process-wide knobs (the allocator, OpenMP's waiting); every ratio
the report gives is between candidates timed in the same phase. Within a phase the candidates
step round-robin, one step each per round, so drift and noisy neighbours hit them all alike;
the first warm-up rounds are dropped.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from research.bench_memory import optimizer_tensors, tensor_bytes
from research.step import StepDone, StepRunner


@dataclass(frozen=True)
class Phase:
    """Process-wide settings that every candidate timed in it shares."""

    name: str
    allocator: str
    openmp: str


@dataclass
class Timing:
    """The measured (post-warm-up) steps of one candidate in one phase."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    useful: list[int] = field(default_factory=list)  # tokens that carry loss
    data_wait: list[float] = field(default_factory=list)
    page_faults: list[int] = field(default_factory=list)  # minor page faults of the process during the step

    def add(self, seconds: float, done: StepDone, page_faults: int) -> None:
        self.seconds.append(seconds)
        self.tokens.append(done.tokens)
        self.useful.append(done.targets)
        self.data_wait.append(done.data_seconds)
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
    """One way of training the same model: its step driver, the learning rate it steps at, and what it was measured doing."""

    name: str
    runner: StepRunner
    lr: float
    knobs: dict[str, str]  # the settings a user picks per script: torch.compile, AdamW (the phase holds the process-wide ones)
    timings: dict[str, Timing] = field(default_factory=dict)  # phase name -> its measured steps
    last: StepDone | None = None  # the latest step
    profile: list[tuple[str, float, int]] = field(default_factory=list)  # (operator, self seconds, calls) of one profiled step
    peak_step_bytes: int = 0  # high-water mark of memory during a step, above what was in use before it

    def step(self) -> StepDone:
        self.last = self.runner.advance(self.lr)
        return self.last

    def static_bytes(self) -> int:
        """Weights and optimizer state, alive between steps (the state exists after the first step)."""
        return tensor_bytes(self.runner.state.model.parameters(), optimizer_tensors(self.runner.state.optimizer))

    def peak_mib(self) -> float:
        return (self.static_bytes() + self.peak_step_bytes) / 2**20


@dataclass
class BenchResult:
    label: str
    device: str
    device_type: str  # cpu | cuda
    shape: dict
    candidates: list[Candidate]  # ours as train() runs it first
    phases: list[Phase]  # in the order timed; the last is the one train() runs under
    load_phases: list[Phase]  # then ours and the Llama loops beside each background load (CPU only), with train()'s settings
    references: dict[str, tuple[str, str]]  # reference label -> (candidate name, phase name)
    matmul_flops: dict[str, tuple[float, int]]  # precision -> (median FLOP/s of the best size, that size)
    table_peak_flops: float  # what training runs compute MFU against (a known table on GPUs, the measured ceiling on CPUs)
    tracking_share: float  # MLflow logging + progress display, as a share of step time at train.log_every
    tracking_ms_per_flush: float
    flops_per_token: float
    rounds: int
    load_average: dict[str, tuple[float, float]] = field(default_factory=dict)  # phase name -> the 1-minute load average at its start and end
    cores: int = 0  # cores the process may use

    @property
    def main_phase(self) -> Phase:
        return self.phases[-1]

    def candidate(self, name: str) -> Candidate | None:
        return next((c for c in self.candidates if c.name == name), None)


class Ticker:
    """Progress of the timed steps: `starting(what)` before each, `finished()` after it (silent without a progress bar)."""

    def __init__(self, progress=None, task=None):
        self.progress, self.task = progress, task

    def starting(self, description: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=description)

    def finished(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)


def time_phase(candidates: list[Candidate], phase: str, warmup: int, steps: int, device: torch.device, ticker: Ticker,
               between_rounds: Callable[[int], None] = lambda round_index: None) -> None:
    """`warmup` + `steps` rounds of one step per candidate, in turn; the rounds after the warm-up are kept under `phase`."""
    rounds = warmup + steps
    for round_index in range(rounds):
        for candidate in candidates:
            ticker.starting(f"{phase}, round {round_index + 1}/{rounds}: {candidate.name}")
            sync(device)
            faults, start = minor_page_faults(), time.perf_counter()
            done = candidate.step()
            sync(device)
            if round_index >= warmup:
                candidate.timings.setdefault(phase, Timing()).add(time.perf_counter() - start, done, minor_page_faults() - faults)
            ticker.finished()
        between_rounds(round_index)


@contextmanager
def load_average(record: dict[str, tuple[float, float]], phase: str):
    """Note the machine's 1-minute load average at the start and the end of the block, under `phase`."""
    start = os.getloadavg()[0]
    yield
    record[phase] = (start, os.getloadavg()[0])


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


def minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
