"""Progress of long data work (tokenizing a corpus, sampling it): visible wherever the output goes.

On a terminal, a rich bar with bytes done, a rate and an ETA. Anywhere else (CI, nohup, a log
file) a plain line when the work starts and then every `every` seconds, so a log shows the work
is alive without filling up with redraws. Inside `relayed_to(send)` the same line also goes to `send`
about once a second: under torchrun, rank 0 hands it to the ranks waiting for its work.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

PLAIN_EVERY_S = 10.0  # seconds between plain progress lines when stdout is not a terminal
RELAY_EVERY_S = 1.0  # seconds between lines handed to a relay
_relays: list[Callable[[str], None]] = []


@contextmanager
def relayed_to(send: Callable[[str], None]) -> Iterator[None]:
    """Within the block, every WorkProgress also hands its progress line to `send` (at most every RELAY_EVERY_S)."""
    _relays.append(send)
    try:
        yield
    finally:
        _relays.remove(send)


class WorkProgress:
    """`with WorkProgress("tokenizing", total_bytes, "tokens") as p: p.update(bytes_done, count)`."""

    def __init__(self, label: str, total_bytes: int, count_name: str, every: float = PLAIN_EVERY_S, console: Console | None = None):
        self.label, self.total, self.count_name, self.every = label, max(int(total_bytes), 1), count_name, every
        self.console = console or Console()
        self.start = self.last_line = self.last_relay = time.time()
        self.done = self.count = 0
        self.bar: Progress | None = None

    def __enter__(self) -> WorkProgress:
        if self.console.is_terminal:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[rate]}"),
                TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total, rate="")
        else:
            self._line()
        self._relay()
        return self

    def update(self, done_bytes: int, count: int) -> None:
        self.done, self.count = done_bytes, count
        if self.bar is not None:
            self.bar.update(self.task, completed=min(done_bytes, self.total), rate=f"{self._rate():,.0f} {self.count_name}/s")
        elif time.time() - self.last_line >= self.every:
            self._line()
        if _relays and time.time() - self.last_relay >= RELAY_EVERY_S:
            self._relay()

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _rate(self) -> float:
        return self.count / max(time.time() - self.start, 1e-9)

    def _line(self) -> None:
        self.last_line = time.time()
        self.console.print(self.summary(), highlight=False, soft_wrap=True)

    def _relay(self) -> None:
        self.last_relay = time.time()
        for send in _relays:
            send(self.summary())

    def summary(self) -> str:
        """`label: done of total MB (share), count (rate/s), ETA`: the plain progress line."""
        share = self.done / self.total
        eta = f", ETA {format_seconds((time.time() - self.start) * (1 - share) / share)}" if share > 0 else ""
        return (f"{self.label}: {self.done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB ({share:.0%}), "
                f"{self.count:,} {self.count_name} ({self._rate():,.0f}/s){eta}")


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
