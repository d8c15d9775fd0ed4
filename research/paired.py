"""Two configurations compared the way their runs were trained: paired by seed, with a Student-t interval.

A seed fixes the initial weights and the data order, and at this scale those move the final loss
more than most settings do. Pairing by seed removes the part of that noise the two share, so a
difference of means is judged by the spread of the per-seed differences, not of the losses. Every
comparison the project reports (a sweep's answer against its default, `run.py compare`) is one
`Paired`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95  # two-sided interval of the mean difference
POWER = 0.80  # the detectable difference is the one found at this power, at the same confidence


@dataclass
class Paired:
    """Per-seed values of A and B (lower is better, like a loss); `diffs` are A - B, so negative means A is lower."""

    a: dict[int, float]  # seed -> value of A
    b: dict[int, float]  # seed -> value of B
    lower_is_better: bool = True

    @property
    def seeds(self) -> list[int]:
        """Seeds both sides ran, sorted; any other seed is left out of the comparison."""
        return sorted(set(self.a) & set(self.b))

    @property
    def diffs(self) -> list[float]:
        return [self.a[s] - self.b[s] for s in self.seeds]

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs) if self.n else math.nan

    @property
    def sd(self) -> float:
        return statistics.stdev(self.diffs) if self.n > 1 else math.nan

    @property
    def half_width(self) -> float:
        """Half the width of the interval: t(1 - (1 - CONFIDENCE) / 2, n - 1) x sd / sqrt(n)."""
        if self.n < 2:
            return math.nan
        return stats.t.ppf(1 - (1 - CONFIDENCE) / 2, self.n - 1) * self.sd / math.sqrt(self.n)

    @property
    def interval(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width

    @property
    def detectable(self) -> float:
        """The smallest true mean difference these n seeds find with probability POWER, at this sd:
        (t(1 - alpha/2) + t(POWER)) x sd / sqrt(n), both with n - 1 degrees of freedom."""
        if self.n < 2:
            return math.nan
        df = self.n - 1
        return (stats.t.ppf(1 - (1 - CONFIDENCE) / 2, df) + stats.t.ppf(POWER, df)) * self.sd / math.sqrt(self.n)

    @property
    def verdict(self) -> str:
        """'better' or 'worse' (A against B) when the interval excludes 0, else 'not distinguishable at n = N'."""
        low, high = self.interval
        if self.n >= 2 and (high < 0 or low > 0):
            a_lower = high < 0
            return "better" if a_lower == self.lower_is_better else "worse"
        return f"not distinguishable at n = {self.n}"

    def summary(self, digits: int = 4) -> str:
        """One line about A - B: 'mean ± sd (n = N), 95% CI [lo, hi]: verdict; detectable at this n: d'."""
        if self.n < 2:
            return f"{self.mean:+.{digits}f} (n = {self.n}): {self.verdict}; an interval needs two seeds that both sides ran"
        low, high = self.interval
        return (f"{self.mean:+.{digits}f} ± {self.sd:.{digits}f} (n = {self.n}), {CONFIDENCE:.0%} CI [{low:+.{digits}f}, {high:+.{digits}f}]: "
                f"{self.verdict}; detectable at this n: {self.detectable:.{digits}f}")
