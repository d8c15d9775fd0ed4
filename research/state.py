"""The trainer's state: everything the next optimizer step depends on, in one serializable object.

A checkpoint is `TrainState.state_dict()` and a resume is `load_state_dict(...)`: model, optimizer,
gradient scaler, data position, step, tokens seen and every RNG of every rank, so a resumed run
continues bitwise where it stopped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from research.data import BatchSampler


@dataclass
class TrainState:
    """Everything the next optimizer step depends on."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: BatchSampler  # the data position: a BatchSampler, or a mixture.MixtureSampler (the same methods; each source's position)
    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0  # training tokens consumed, all ranks

    def state_dict(self, rank_rngs: list[dict] | None = None) -> dict:
        """rank_rngs: every rank's `rng_state()`, indexed by rank (see `distributed.gather_to_main`); default, this process's alone."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": self.sampler.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "rng": rank_rngs if rank_rngs is not None else [rng_state()],
        }

    def load_state_dict(self, state: dict, rank: int = 0) -> None:
        """Restore `state`; `rank` takes its own RNG state (dropout masks differ per rank)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["data"])
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        restore_rank_rng(state["rng"], rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rank_rng(saved: list[dict] | dict, rank: int) -> None:
    """Set this rank's RNG state from a checkpoint's: a list, one state per rank, or a single dict (rank 0's alone,
    as checkpoints held before each rank's state was kept).

    A rank the checkpoint has no state for (resumed on more ranks than it was written on, or from a single dict)
    takes rank 0's state and reseeds from a draw of it plus its rank, so the ranks' dropout masks still differ.
    """
    states = saved if isinstance(saved, list) else [saved]
    if rank < len(states):
        set_rng_state(states[rank])
        return
    set_rng_state(states[0])
    seed_everything(int(torch.randint(2**31, ())) + rank)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
