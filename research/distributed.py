"""Rank awareness, in one place.

Under `torchrun` the environment carries RANK / LOCAL_RANK / WORLD_SIZE; without it
we are rank 0 of 1 and nothing here touches torch.distributed. Everything else in
the project asks this module who it is instead of reading the environment itself.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from research.errors import UserError


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


def setup(device_preference: str = "auto") -> DistEnv:
    """Join the process group when launched by torchrun; a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
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
def rank_zero_first(env: DistEnv):
    """Rank 0 runs the block first (building a shared cache, say); the others run it once it is done,
    so they find the result instead of racing to build it too."""
    if env.is_distributed and not env.is_main:
        dist.barrier()
    yield
    if env.is_distributed and env.is_main:
        dist.barrier()


def launched_rank() -> int:
    """This process's rank as torchrun set it, before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """How many processes torchrun started for this job (1 without torchrun), before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))
