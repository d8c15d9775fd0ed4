"""The trainer's state: everything the next optimizer step depends on, in one serializable object.

A checkpoint is `TrainState.state_dict()` and a resume is `load_state_dict(...)`: model, optimizer,
gradient scaler, data position, step, tokens seen and every RNG, so a resumed run continues bitwise
where it stopped.
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
