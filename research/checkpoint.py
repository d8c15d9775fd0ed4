"""Checkpoints on disk: atomic writes, a rolling window, and reading one back.

A checkpoint is `TrainState.state_dict()` plus the resolved config, written to a
temporary file and renamed into place, so a crash during a save never damages the
checkpoint before it. `StopSignal` turns Ctrl-C / SIGTERM into "finish the step,
checkpoint, stop" while the training loop runs. Which checkpoint a resumed run continues
from is `reproduce.resume_point`'s choice.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from research.errors import UserError

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.pt"


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint file was written after (from its name)."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if not match:
        raise ValueError(f"not a checkpoint file name: {path}")
    return int(match.group(1))


def save_checkpoint(payload: dict, path: Path) -> Path:
    """Write atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in a folder, oldest first (temporary files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; also clear temporaries left by a killed save."""
    for stale in Path(folder).glob(".step_*.pt.tmp-*"):
        stale.unlink(missing_ok=True)
    if keep > 0:
        for old in list_checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as err:  # a damaged file: say which one
        raise UserError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); use an earlier one") from None


class StopSignal:
    """SIGINT / SIGTERM handling for one call of `train()`: installed on entry, the previous handlers restored on exit.

    Outside `at_step_boundaries()` a signal stops at once (KeyboardInterrupt, which the
    tracker records as KILLED). Inside it the first signal is only noted in `received`,
    so the loop can finish the step in flight and checkpoint before stopping; a second
    signal stops at once. Handlers can only be set from the main thread, so when `train()` is called
    from another thread this does nothing (a sweep runs its trials one after another on the main thread).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferring = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous.clear()

    def handle(self, signum: int, frame) -> None:
        if not self.deferring or self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    @contextmanager
    def at_step_boundaries(self):
        self.deferring = True
        try:
            yield self
        finally:
            self.deferring = False

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
