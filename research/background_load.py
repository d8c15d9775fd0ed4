"""Background load for the benchmark: what else runs on a researcher's machine while a model trains.

Two kinds, each started before a timed phase and stopped after it:

    spinners   one busy-looping process per core the benchmark may use (a compile job, a data build)
    training   a second training process of the same shape and precision: the trainer's own step,
               built as train() builds it, stepping until stopped (a sweep worker beside a run)

Each runs in its own process (spawned, so it starts a fresh interpreter with torch's default
threads, as a second `python run.py` would), and `running(...)` returns only once the load is
really running: the spinners have started and the training process has finished its first step.
"""

from __future__ import annotations

import itertools
import multiprocessing
import signal
import sys
from contextlib import contextmanager

from omegaconf import DictConfig

from research.errors import UserError


READY_TIMEOUT_S = 600  # the training load builds its data, model and compiled graphs before its first step
STOP_TIMEOUT_S = 60  # ... and finishes the step in flight when stopped


def spin() -> None:
    while True:
        pass


def train_forever(cfg_yaml: str, ready) -> None:
    """The training load: our step at the benchmark's shape, forever; one message on the `ready` pipe after the first step."""
    from research import distributed
    from research.components import build
    from research.config import from_yaml
    from research.hardware import keep_freed_memory

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # stopped: exit through Python, so its resources are released
    cfg = from_yaml(cfg_yaml)
    keep_freed_memory()  # as train() runs on a CPU
    run = build(cfg, distributed.setup(cfg.train.device))
    for step in itertools.count():
        run.step.advance(cfg.train.lr)
        if step == 0:
            ready.send("stepping")


@contextmanager
def running(kind: str, cfg: DictConfig):
    """Run the `kind` of load beside the block; stopped when the block ends, however it ends."""
    from research.config import to_yaml
    from research.hardware import usable_cores  # here, not at the top: a spinner process need not load torch

    context = multiprocessing.get_context("spawn")
    processes = []
    try:
        if kind == "spinners":
            processes = [context.Process(target=spin, daemon=True) for _ in range(usable_cores())]
            for process in processes:
                process.start()
        else:
            ready, child_end = context.Pipe(duplex=False)
            processes = [context.Process(target=train_forever, args=(to_yaml(cfg), child_end), daemon=True)]
            processes[0].start()
            child_end.close()
            if not ready.poll(READY_TIMEOUT_S):  # a message, or the end of the pipe when the process died
                raise UserError(f"the training load took over {READY_TIMEOUT_S} s to reach its first step; run the benchmark with bench.load=[spinners] to leave it out")
            try:
                ready.recv()
            except EOFError:
                processes[0].join()
                raise UserError(f"the training load stopped before its first step (exit code {processes[0].exitcode}); "
                                "run the benchmark with bench.load=[spinners] to leave it out") from None
        yield len(processes)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(STOP_TIMEOUT_S)  # the training load exits after the step in flight
            if process.is_alive():
                process.kill()
                process.join()
