"""Per-step metrics: buffered on the device, read once per log interval, checked, handed to hooks, shown in the progress bar.

On an accelerator nothing reads a value back during a step; `MetricLog.flush` does, once per
`train.log_every` steps (and before every checkpoint), and stops the run at a NaN or inf.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from research import distributed
from research.errors import UserError
from research.names import TEST_LOSS, TEST_PERPLEXITY, TRAIN_GRAD_NORM, TRAIN_LOSS, TRAIN_LR, VAL_LOSS, VAL_PERPLEXITY


class IntervalClock:
    """Wall time of the current log interval, and how much of it went to fetching data and to tracking.

    Every second lands in exactly one interval: `lap()` starts the next one before the flush calls the
    hooks, so tracking time is charged to the interval it delays.
    """

    def __init__(self):
        self.restart()

    def restart(self, now: float | None = None) -> None:
        self.start, self.spent, self.tokens = now or time.perf_counter(), {"data": 0.0, "tracking": 0.0}, 0

    @contextmanager
    def timing(self, what: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spent[what] += time.perf_counter() - start

    def add(self, what: str, seconds: float) -> None:
        self.spent[what] += seconds

    def lap(self) -> tuple[float, int, float, float]:
        """(seconds, tokens, data seconds, tracking seconds) of the interval now ending; the next begins."""
        now = time.perf_counter()
        elapsed, tokens, spent = now - self.start, self.tokens, self.spent
        self.restart(now)
        return elapsed, tokens, spent["data"], spent["tracking"]


class NonFiniteLoss(UserError):
    """The loss (or gradient norm) became NaN or inf: training stops rather than burn compute on garbage.

    On CPU both are checked after every step; on an accelerator at each metrics flush
    (every train.log_every steps, and before any checkpoint), so no checkpoint holds a
    diverged model and at most log_every - 1 steps run past the first bad one.
    """

    def __init__(self, step: int, what: str, value: float, last_checkpoint: Path | None, precision: str = "fp32"):
        self.step = step
        kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written before it"
        fix = "lower train.lr or train.grad_clip" + (f", or use train.precision=fp32 instead of {precision}" if precision != "fp32" else "")
        super().__init__(f"{what} became {value} at step {step}; {fix} ({kept})")


class MetricLog:
    """The run's metric history and the rows still on the device; delivers both to the hooks and the progress bar."""

    def __init__(self, env: distributed.DistEnv, hooks: Sequence[Any], console: Console, flops_per_token: float, peak_flops: float,
                 precision: str, check_grad_norm: bool, max_steps: int, start_step: int):
        self.env, self.hooks, self.precision = env, hooks, precision
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        # a non-finite loss, or (without fp16, whose scaler skips such steps) gradient norm: the weights are broken from here on
        self.watched = [("loss", TRAIN_LOSS)] + ([("gradient norm", TRAIN_GRAD_NORM)] if check_grad_norm else [])
        self.history: list[tuple[int, dict[str, float]]] = []  # every delivered (step, metrics) row, train and val
        self.pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # (step, lr, loss, grad_norm), read once per interval
        self.clock = IntervalClock()
        self.val_loss = float("nan")  # the latest validation loss, for the progress display
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
            console=console, disable=not env.is_main, transient=False,
        )
        self.task = self.progress.add_task("train", total=max_steps, completed=start_step, status="")
        self.check_every_step = env.device.type == "cpu" and not env.is_distributed  # reading a CPU tensor costs nothing

    def record(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor, tokens: int, last_checkpoint: Path | None) -> None:
        """Keep a step's values on the device; on one CPU process, stop at the first bad step at once."""
        self.pending.append((step, lr, loss, grad_norm))
        self.clock.tokens += tokens
        if self.check_every_step and not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())):
            self.flush(step, last_checkpoint)  # raises NonFiniteLoss

    def flush(self, step: int, last_checkpoint: Path | None) -> None:
        """Read the interval's values (the one device sync), hand them to the hooks, update the bar; NaN or inf stops the run."""
        if not self.pending:
            return
        losses = distributed.mean_over_ranks(torch.stack([p[2] for p in self.pending]), self.env).tolist()
        norms = torch.stack([p[3] for p in self.pending]).tolist()
        elapsed, tokens, data_s, tracking_s = self.clock.lap()
        tokens_per_sec = tokens / max(elapsed, 1e-9)
        rows = [(s, {TRAIN_LOSS: loss, TRAIN_LR: lr, TRAIN_GRAD_NORM: norm}) for (s, lr, _, _), loss, norm in zip(self.pending, losses, norms)]
        rows[-1][1].update({
            "train/tokens_per_sec": tokens_per_sec,
            "train/mfu": tokens_per_sec * self.flops_per_token / self.peak_flops,
            "train/data_wait_share": data_s / max(elapsed, 1e-9),  # of the interval's wall time
            "train/tracking_share": tracking_s / max(elapsed, 1e-9),  # hooks and progress display, the previous flush's included
        })
        self.pending.clear()
        bad = [(s, name, r[key]) for s, r in rows for name, key in self.watched if not math.isfinite(r[key])]
        self.history.extend(rows)
        with self.clock.timing("tracking"):
            for hook in self.hooks:
                hook.on_metrics(rows)
            if bad:
                raise NonFiniteLoss(*bad[0], last_checkpoint, self.precision)
            status = f"loss {losses[-1]:.3f}  lr {rows[-1][1][TRAIN_LR]:.2e}  {tokens_per_sec:,.0f} tok/s"
            self.progress.update(self.task, completed=step, status=status + (f"  val {self.val_loss:.3f}" if math.isfinite(self.val_loss) else ""))

    def record_test(self, step: int, metrics: dict[str, float]) -> None:
        """The test metrics at the end: into the history and to the hooks' metrics, never to `on_eval` (nothing selects or prunes on it)."""
        row = {**metrics, TEST_PERPLEXITY: math.exp(min(metrics[TEST_LOSS], 50.0))}
        self.history.append((step, row))
        for hook in self.hooks:
            hook.on_metrics([(step, row)])

    def record_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Validation metrics (val/loss, val/bpb, ...): into the history, to the hooks (which may stop the run: a pruned trial), and the clock restarts."""
        self.val_loss = metrics[VAL_LOSS]
        row = {VAL_LOSS: self.val_loss, VAL_PERPLEXITY: math.exp(min(self.val_loss, 50.0)), **metrics}
        self.history.append((step, row))
        for hook in self.hooks:
            hook.on_metrics([(step, row)])
            hook.on_eval(step, row)
        self.clock.restart()  # eval time is not training throughput
