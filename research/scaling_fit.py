"""Scaling laws fitted to a study's cells: IsoFLOP parabolas with power laws, and the parametric L(N, D) with bootstrap intervals.

The two fits of Hoffmann et al. 2022 (Chinchilla), approaches 2 and 3:

- **IsoFLOP**: per compute budget C, a parabola of the loss against ln N; its minimum is N_opt(C), and
  D_opt(C) = C / FLOPs per token at N_opt. Power laws N_opt = k C^a and D_opt = k' C^b are straight
  lines through those minima in log-log.
- **Parametric**: L(N, D) = E + A / N^alpha + B / D^beta, fitted to every cell by minimising a Huber
  loss (delta 1e-3) of the log residuals, ln L_pred - ln L, with L-BFGS from a grid of starting
  points. The parameters are ln A, ln B, ln E (so the prediction is a log-sum-exp and stays positive).

Intervals come from the bootstrap over cells: resample the cells with replacement, refit, and take
percentiles. N is the non-embedding parameter count (accounting.num_params(non_embedding=True)), D
the training tokens. Pure numpy and scipy: nothing here knows about runs or studies.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3  # Chinchilla's: residuals beyond 0.1% of the loss count linearly, so one odd cell moves the fit little
START_GRID = {  # starting points of the parametric fit (Chinchilla's grid, thinned): every combination is tried
    "ln_a": (0.0, 6.0, 12.0),
    "ln_b": (0.0, 6.0, 12.0),
    "ln_e": (0.0, 1.0),
    "alpha": (0.3, 0.7),
    "beta": (0.3, 0.7),
}
EXPONENT_BOUNDS = (0.01, 3.0)  # alpha and beta are kept in here: beyond, a term is a step, not a power law


@dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    e: float
    a: float
    b: float
    alpha: float
    beta: float

    def loss(self, n, d):
        return self.e + self.a / np.power(n, self.alpha) + self.b / np.power(d, self.beta)

    def as_dict(self) -> dict[str, float]:
        return {"E": self.e, "A": self.a, "B": self.b, "alpha": self.alpha, "beta": self.beta}


def _huber_objective(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, ln_loss: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber(ln L_pred - ln L) and its gradient in (ln A, ln B, ln E, alpha, beta)."""
    ln_a, ln_b, ln_e, alpha, beta = theta
    terms = np.stack([ln_a - alpha * ln_n, ln_b - beta * ln_d, np.full_like(ln_n, ln_e)])
    residual = logsumexp(terms, axis=0) - ln_loss
    small = np.abs(residual) <= delta
    value = np.where(small, 0.5 * residual ** 2, delta * (np.abs(residual) - 0.5 * delta)).sum()
    slope = np.clip(residual, -delta, delta)  # dHuber / dresidual
    w = softmax(terms, axis=0) * slope  # dresidual / dterm_k = softmax weight k
    grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * ln_n).sum(), -(w[1] * ln_d).sum()])
    return float(value), grad


def _minimise(start: np.ndarray, args: tuple) -> tuple[float, np.ndarray]:
    bounds = [(None, None)] * 3 + [EXPONENT_BOUNDS] * 2
    result = minimize(_huber_objective, start, args=args, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 2000})
    return float(result.fun), result.x


def _law(theta: np.ndarray) -> Law:
    ln_a, ln_b, ln_e, alpha, beta = (float(v) for v in theta)
    return Law(e=math.exp(ln_e), a=math.exp(ln_a), b=math.exp(ln_b), alpha=alpha, beta=beta)


def _theta(law: Law) -> np.ndarray:
    return np.array([math.log(law.a), math.log(law.b), math.log(law.e), law.alpha, law.beta])


@threadpool_limits.wrap(limits=1)  # tiny arrays: BLAS threads only spin, and on busy cores they cost 4-10x
def fit_law(n, d, loss, starts: list[np.ndarray] | None = None, delta: float = HUBER_DELTA) -> Law:
    """The parametric law with the lowest Huber objective over the starting points (by default every point of START_GRID)."""
    args = (np.log(np.asarray(n, float)), np.log(np.asarray(d, float)), np.log(np.asarray(loss, float)), delta)
    if starts is None:
        starts = [np.array(point, float) for point in itertools.product(*START_GRID.values())]
    best = min((_minimise(start, args) for start in starts), key=lambda found: found[0])
    return _law(best[1])


def log_residuals(law: Law, n, d, loss) -> np.ndarray:
    return np.log(law.loss(np.asarray(n, float), np.asarray(d, float))) - np.log(np.asarray(loss, float))


def bootstrap_laws(law: Law, n, d, loss, resamples: int, seed: int) -> list[Law]:
    """The law refitted to `resamples` resamples of the cells (with replacement), each started from the full fit and a few grid points."""
    n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
    rng = np.random.default_rng(seed)
    grid = [np.array(point, float) for point in itertools.product(*START_GRID.values())]
    extra = [grid[i] for i in rng.choice(len(grid), size=min(4, len(grid)), replace=False)]
    laws = []
    for _ in range(resamples):
        pick = rng.integers(0, len(loss), len(loss))
        laws.append(fit_law(n[pick], d[pick], loss[pick], starts=[_theta(law), *extra]))
    return laws


def percentile_interval(values, level: float = 0.90) -> tuple[float, float]:
    """The central `level` interval of the values (the bootstrap percentile interval)."""
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(np.asarray(values, float), [tail, 100.0 - tail])
    return float(low), float(high)


def predictive_samples(laws: list[Law], n: float, d: float, residuals: np.ndarray, seed: int) -> np.ndarray:
    """Losses a new run at (n, d) may reach: each bootstrap law's prediction times exp(a log residual of the full fit drawn at random).

    The laws carry the uncertainty of the fit; the residuals carry what one run adds to it (seed noise, and
    whatever the law does not capture). Their percentiles are a prediction interval, not only a confidence
    interval of the mean.
    """
    rng = np.random.default_rng(seed)
    predictions = np.array([law.loss(n, d) for law in laws])
    return predictions * np.exp(rng.choice(np.asarray(residuals, float), size=len(predictions)))


# ---- IsoFLOP: approach 2 ----


@dataclass(frozen=True)
class Parabola:
    """loss = c0 + c1 x + c2 x^2 in x = ln N, at one budget; its minimum is N_opt."""

    budget: float
    c0: float
    c1: float
    c2: float
    n_range: tuple[float, float]  # the smallest and largest N it was fitted to

    @property
    def n_opt(self) -> float:
        """exp(-c1 / 2 c2); NaN when the parabola opens downward (no minimum)."""
        return math.exp(-self.c1 / (2.0 * self.c2)) if self.c2 > 0 else math.nan

    @property
    def interior(self) -> bool:
        """Whether the minimum lies inside the sizes trained: outside, N_opt is an extrapolation of the parabola."""
        return self.n_range[0] <= self.n_opt <= self.n_range[1]

    def loss(self, n):
        x = np.log(n)
        return self.c0 + self.c1 * x + self.c2 * x ** 2


def isoflop_parabolas(budget, n, loss) -> list[Parabola]:
    """One parabola per budget that has cells of at least three sizes (several seeds of a size all count)."""
    budget, n, loss = (np.asarray(v, float) for v in (budget, n, loss))
    found = []
    for c in sorted(set(budget.tolist())):
        at = budget == c
        if len(set(n[at].tolist())) < 3:
            continue
        c2, c1, c0 = np.polyfit(np.log(n[at]), loss[at], 2)
        found.append(Parabola(c, float(c0), float(c1), float(c2), (float(n[at].min()), float(n[at].max()))))
    return found


def power_law(x, y) -> tuple[float, float]:
    """(k, exponent) of y = k x^exponent, a least-squares line in log-log; NaN with fewer than two finite points."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < 2:
        return math.nan, math.nan
    slope, intercept = np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)
    return math.exp(intercept), float(slope)


def flops_per_token_curve(n, fpt):
    """FLOPs per token as a function of N, a line in log-log through the model shapes: D = C / FLOPs per token for an N between them."""
    k, exponent = power_law(n, fpt)
    return lambda size: k * np.power(size, exponent)


def isoflop_fit(budget, n, loss, fpt_of) -> dict:
    """Parabolas, their N_opt and D_opt per budget, and the power laws a (of N_opt) and b (of D_opt).

    The power laws go through the minima that lie inside the sizes trained: a minimum outside them is the
    parabola's extrapolation, not a measurement, and one such point sets the slope of a two-point line.
    """
    parabolas = isoflop_parabolas(budget, n, loss)
    budgets = np.array([p.budget for p in parabolas])
    n_opt = np.array([p.n_opt for p in parabolas])
    d_opt = budgets / fpt_of(n_opt) if len(parabolas) else np.array([])
    inside = np.array([p.interior for p in parabolas], bool)
    k_n, a = power_law(budgets[inside], n_opt[inside]) if len(parabolas) else (math.nan, math.nan)
    k_d, b = power_law(budgets[inside], d_opt[inside]) if len(parabolas) else (math.nan, math.nan)
    return {"parabolas": parabolas, "n_opt": n_opt, "d_opt": d_opt, "k_n": k_n, "a": a, "k_d": k_d, "b": b}


def bootstrap_isoflop(budget, n, loss, fpt_of, resamples: int, seed: int) -> dict[str, np.ndarray]:
    """The exponents a and b refitted on resamples of the cells within each budget (a resample with under three sizes at a budget drops
    that budget, one with under two interior minima gives no exponent)."""
    budget, n, loss = (np.asarray(v, float) for v in (budget, n, loss))
    rng = np.random.default_rng(seed)
    a, b = [], []
    for _ in range(resamples):
        pick = np.concatenate([rng.choice(np.flatnonzero(budget == c), size=int((budget == c).sum())) for c in set(budget.tolist())])
        found = isoflop_fit(budget[pick], n[pick], loss[pick], fpt_of)
        if math.isfinite(found["a"]):
            a.append(found["a"])
            b.append(found["b"])
    return {"a": np.array(a), "b": np.array(b)}


def law_optimum(law: Law, budget: float, fpt_of, n_range: tuple[float, float]) -> float:
    """The N in n_range (searched on a fine log grid) with the lowest L(N, budget / FLOPs per token(N)): the parametric N_opt(C)."""
    sizes = np.geomspace(n_range[0], n_range[1], 2000)
    return float(sizes[np.argmin(law.loss(sizes, budget / fpt_of(sizes)))])
