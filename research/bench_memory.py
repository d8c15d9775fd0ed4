"""The benchmark's memory watcher: what a step adds to memory, and what stays alive between steps."""

from __future__ import annotations

import threading
import time

import torch

from research.hardware import release_free_memory


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


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def tensor_bytes(*tensor_groups) -> int:
    """Bytes held by the distinct tensors of the groups (a tensor in two groups counts once)."""
    seen, total = set(), 0
    for group in tensor_groups:
        for t in group:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values()]
