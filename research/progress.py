"""Progress of long data work (tokenizing a corpus, sampling it): visible wherever the output goes.

On a terminal, a rich bar with bytes done, a rate and an ETA. Anywhere else (CI, nohup, a log
file) a plain line when the work starts and then every `every` seconds, so a log shows the work
is alive without filling up with redraws.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

PLAIN_EVERY_S = 10.0  # seconds between plain progress lines when stdout is not a terminal


class WorkProgress:
    """`with WorkProgress("tokenizing", total_bytes, "tokens") as p: p.update(bytes_done, count)`."""

    def __init__(self, label: str, total_bytes: int, count_name: str, every: float = PLAIN_EVERY_S, console: Console | None = None):
        self.label, self.total, self.count_name, self.every = label, max(int(total_bytes), 1), count_name, every
        self.console = console or Console()
        self.start = self.last_line = time.time()
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
        return self

    def update(self, done_bytes: int, count: int) -> None:
        self.done, self.count = done_bytes, count
        if self.bar is not None:
            self.bar.update(self.task, completed=min(done_bytes, self.total), rate=f"{self._rate():,.0f} {self.count_name}/s")
        elif time.time() - self.last_line >= self.every:
            self._line()

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _rate(self) -> float:
        return self.count / max(time.time() - self.start, 1e-9)

    def _line(self) -> None:
        self.last_line = now = time.time()
        share = self.done / self.total
        eta = f", ETA {format_seconds((now - self.start) * (1 - share) / share)}" if share > 0 else ""
        self.console.print(f"{self.label}: {self.done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB ({share:.0%}), "
                           f"{self.count:,} {self.count_name} ({self._rate():,.0f}/s){eta}", highlight=False, soft_wrap=True)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
