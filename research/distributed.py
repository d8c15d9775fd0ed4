"""Rank awareness, in one place.

Under `torchrun` the environment carries RANK / LOCAL_RANK / WORLD_SIZE; without it
we are rank 0 of 1 and nothing here touches torch.distributed. Everything else in
the project asks this module who it is instead of reading the environment itself.
"""

from __future__ import annotations

import itertools
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from research.errors import UserError
from research.progress import PLAIN_EVERY_S, format_seconds, relayed_to


@dataclass(frozen=True)
class DistEnv:
    rank: int  # global rank of this process
    local_rank: int  # rank on this node (picks the GPU)
    world_size: int  # processes in the job
    device: torch.device  # where this rank computes

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, tracks and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={preference} but no CUDA device is available; use train.device=cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


PROCESS_GROUP_TIMEOUT_S: float | None = None  # how long a collective waits for the other ranks; None: torch's default (30 min with gloo)


def setup(device_preference: str = "auto") -> DistEnv:
    """Join the process group when launched by torchrun; a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=PROCESS_GROUP_TIMEOUT_S) if PROCESS_GROUP_TIMEOUT_S else None
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def teardown(env: DistEnv) -> None:
    if env.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Average a tensor over ranks (identity for one process)."""
    if env.is_distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def broadcast_object(obj, env: DistEnv):
    """Send a picklable object from rank 0 to every rank (identity for one process)."""
    if not env.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj, env: DistEnv) -> list | None:
    """Every rank's picklable `obj`, indexed by rank, on rank 0 (None on the others); [obj] for one process."""
    if not env.is_distributed:
        return [obj]
    gathered = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


@contextmanager
def rank_zero_first(env: DistEnv, what: str = "preparing the run"):
    """Rank 0 runs the block first (building a shared cache, say); the others run it once it is done,
    so they find the result instead of racing to build it too.

    `what` names rank 0's work for the waiting ranks ("preparing the token cache"). They poll the job's
    store rather than wait in a barrier, so a build of any length cannot time out while rank 0 works,
    and they print rank 0's progress (relayed from its WorkProgress). If rank 0 fails in the block, each
    of them stops with a one-line UserError that quotes rank 0's.
    """
    if not env.is_distributed:
        yield
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # keys of its own for each (re)start of the job and each call
    store = dist.PrefixStore(f"minilm/rank_zero_first/{attempt}/{next(_rank_zero_turns)}/", dist.distributed_c10d._get_default_store())
    if env.is_main:
        try:
            with relayed_to(lambda line: store.set("progress", line)):
                yield
        except BaseException as err:
            report_failure(store, err, env)
            raise
        store.set("done", "1")
    else:
        wait_for_rank_zero(store, what, env)
        yield


_rank_zero_turns = itertools.count()  # every rank calls rank_zero_first in the same order: the n-th call's keys are its own
WAIT_POLL_S = 0.2  # how often a waiting rank looks at the store
WAIT_REPORT_EVERY_S = PLAIN_EVERY_S  # how often it prints rank 0's progress
FAILURE_READ_S = 10.0  # how long a failing rank 0 waits for the others to read why, and they for it to exit


def wait_for_rank_zero(store: dist.Store, what: str, env: DistEnv) -> None:
    """Poll until rank 0 is done; print its progress line every WAIT_REPORT_EVERY_S (one waiting rank per node prints)."""
    started = last_report = time.monotonic()
    prints = env.local_rank == (1 if env.rank == env.local_rank else 0)  # torchrun numbers node 0's ranks 0..n-1
    while True:
        try:
            failed, done = store.check(["failed"]), store.check(["done"])
            if failed:
                message = store.get("failed").decode()
                store.add("read", 1)
            line = store.get("progress").decode() if prints and store.check(["progress"]) else ""
        except (RuntimeError, dist.DistError) as err:  # the store is gone: so is the job's launcher, or rank 0 hosting it
            raise UserError(f"rank {env.rank} lost rank 0 while it was {what} ({type(err).__name__}: {err}); see rank 0's output") from None
        if failed:
            try:  # rank 0 reports first; its exit makes torchrun stop this rank (SIGTERM, a KeyboardInterrupt in train())
                time.sleep(FAILURE_READ_S)
            except KeyboardInterrupt:
                pass
            raise UserError(f"rank 0 failed while {what}: {message}")
        if done:
            return
        now = time.monotonic()
        if prints and now - last_report >= WAIT_REPORT_EVERY_S:
            last_report = now
            print(f"rank {env.rank} waits for rank 0, {what} ({format_seconds(now - started)} so far){': ' + line if line else ''}", flush=True)
        time.sleep(WAIT_POLL_S)


def report_failure(store: dist.Store, err: BaseException, env: DistEnv) -> None:
    """Tell the waiting ranks why rank 0 failed, and give them up to FAILURE_READ_S to read it (before torchrun stops them)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    reason = "interrupted" if isinstance(err, KeyboardInterrupt) else text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"
    try:
        store.set("failed", reason)
        deadline = time.monotonic() + FAILURE_READ_S
        while store.add("read", 0) < env.world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    except (RuntimeError, dist.DistError):
        pass  # the store is gone too; rank 0's own error says it all


def launched_rank() -> int:
    """This process's rank as torchrun set it, before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """How many processes torchrun started for this job (1 without torchrun), before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))
