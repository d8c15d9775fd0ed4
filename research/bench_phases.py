"""The phases of the benchmark: which process-wide settings the candidates are timed under, and where.

    plain settings   glibc's allocator defaults and libgomp's default OpenMP waiting: what a fresh
                     `python script.py` gets. Timed in a process of its own, started for it, since
                     neither setting can be undone in a process that has changed it.
    our settings     freed memory kept for reuse (`hardware.keep_freed_memory`) and the OpenMP waiting
                     run.py sets: what train() runs under on a CPU. Timed in the benchmark's own process.
    as train() runs it   on a GPU: one phase; the CUDA allocator is the same for everyone.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from contextlib import contextmanager

from omegaconf import DictConfig

from research.bench_timing import Phase, Ticker, Timing
from research.errors import UserError


OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# libgomp's own spin count when OMP_WAIT_POLICY is unset, written out so that run.py's shorter default does not apply
LIBGOMP_DEFAULT_SPINCOUNT = "300000"
PLAIN_ALLOCATOR = "glibc's defaults"
OUR_ALLOCATOR = "freed memory kept for reuse"
PLAIN = Phase("plain settings", PLAIN_ALLOCATOR, "libgomp's defaults")
AS_TRAINED = Phase("as train() runs it", "the CUDA caching allocator", "–")


def our_settings() -> Phase:
    """What train() runs under on a CPU, with this process's OpenMP variables."""
    settings = [f"{name}={os.environ[name]}" for name in OPENMP_VARIABLES if name in os.environ]
    return Phase("our settings", OUR_ALLOCATOR, ", ".join(settings) or "libgomp's defaults")


@contextmanager
def plain_environment():
    """os.environ without this process's OpenMP settings, for a child started inside the block."""
    saved = {name: os.environ.get(name) for name in OPENMP_VARIABLES}
    try:
        for name in OPENMP_VARIABLES:
            os.environ.pop(name, None)
        os.environ["GOMP_SPINCOUNT"] = LIBGOMP_DEFAULT_SPINCOUNT
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def time_plain_phase(cfg: DictConfig, ticker: Ticker) -> dict[str, Timing]:
    """Ours and the plain Llama script, interleaved, in a fresh process under plain settings: {candidate name: timing}."""
    from research.config import to_yaml

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: glibc's and libgomp's defaults
    messages, child_end = context.Pipe(duplex=False)
    process = context.Process(target=plain_phase_worker, args=(to_yaml(cfg), child_end))  # not a daemon: it may build the token cache with workers
    with plain_environment():
        process.start()
    child_end.close()
    try:
        while True:
            try:
                kind, payload = messages.recv()
            except EOFError:
                process.join()
                raise UserError(f"the plain-settings phase stopped without its timings (exit code {process.exitcode}); "
                                "run the benchmark with bench.plain_phase=false to leave it out") from None
            if kind == "starting":
                ticker.starting(f"{PLAIN.name} (own process), {payload}")
            elif kind == "finished":
                ticker.finished()
            elif kind == "error":
                raise UserError(f"the plain-settings phase failed: {payload}")
            else:
                return payload
    finally:
        process.join(60)
        if process.is_alive():
            process.kill()
            process.join()


class PipeTicker(Ticker):
    """A ticker in the plain phase's process: each tick goes to the benchmark's process."""

    def __init__(self, connection):
        super().__init__()
        self.connection = connection

    def starting(self, description: str) -> None:
        self.connection.send(("starting", description.removeprefix(f"{PLAIN.name}, ")))

    def finished(self) -> None:
        self.connection.send(("finished", None))


def plain_phase_worker(cfg_yaml: str, connection) -> None:
    """The plain phase's process: build ours and the plain Llama, time them, send back {name: timing} (or the error)."""
    try:
        from research import distributed
        from research.bench_candidates import plain_candidates
        from research.bench_timing import time_phase
        from research.config import from_yaml

        cfg = from_yaml(cfg_yaml)
        env = distributed.setup(cfg.train.device)
        candidates = plain_candidates(cfg, env)
        time_phase(candidates, PLAIN.name, cfg.bench.warmup_steps, cfg.bench.steps, env.device, PipeTicker(connection))
        connection.send(("timings", {c.name: c.timings[PLAIN.name] for c in candidates}))
    except Exception as err:  # noqa: BLE001 - reported to the benchmark's process, which raises it there
        connection.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-3)}"))
    finally:
        connection.close()
