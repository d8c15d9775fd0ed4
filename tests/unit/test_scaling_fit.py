"""The scaling-law fits recover the constants of data generated from a known law, with noise like a run's seed noise."""

import math

import numpy as np
import pytest

from research.scaling_fit import (
    Law, bootstrap_laws, fit_law, flops_per_token_curve, isoflop_fit, law_optimum, log_residuals, percentile_interval, power_law,
    predictive_samples,
)

TRUE = Law(e=2.0, a=60.0, b=300.0, alpha=0.35, beta=0.40)  # constants of the order the CPU study finds
NOISE = 0.003  # sd of ln(loss): 0.3%, the spread of the baseline's test loss over seeds
TOLERANCE = {"E": 0.05, "A": 0.5, "B": 0.3, "alpha": 0.05, "beta": 0.05}  # relative for E, A, B; absolute for the exponents


def noisy_cells(seed: int):
    """6 sizes x 5 token counts, each loss off the law by a lognormal factor."""
    rng = np.random.default_rng(seed)
    n = np.repeat(np.geomspace(1e5, 3e6, 6), 5)
    d = np.tile(np.geomspace(2e5, 1e7, 5), 6)
    return n, d, TRUE.loss(n, d) * np.exp(rng.normal(0.0, NOISE, n.size))


def test_the_parametric_fit_recovers_known_constants():
    n, d, loss = noisy_cells(0)
    law = fit_law(n, d, loss)
    for key, true in TRUE.as_dict().items():
        found = law.as_dict()[key]
        off = abs(found - true) if key in ("alpha", "beta") else abs(found / true - 1)
        assert off <= TOLERANCE[key], (key, found, true)
    assert np.abs(log_residuals(law, n, d, loss)).max() < 4 * NOISE


def test_bootstrap_intervals_cover_the_truth_and_the_prediction_interval_covers_a_new_run():
    n, d, loss = noisy_cells(2)
    law = fit_law(n, d, loss)
    laws = bootstrap_laws(law, n, d, loss, resamples=40, seed=0)
    for key in ("B", "alpha", "beta"):
        low, high = percentile_interval([b.as_dict()[key] for b in laws])
        assert low <= TRUE.as_dict()[key] <= high, key
    big_n, big_d = 6e6, 4e7  # beyond every cell in N and in D: an extrapolation
    samples = predictive_samples(laws, big_n, big_d, log_residuals(law, n, d, loss), seed=0)
    low, high = percentile_interval(samples)
    assert low <= TRUE.loss(big_n, big_d) <= high and high - low < 0.05 * TRUE.loss(big_n, big_d)


def test_isoflop_parabolas_find_the_laws_compute_optimal_size():
    """Cells on IsoFLOP slices of the true law: each parabola's minimum is near the law's own optimum, and N_opt grows as a power of C."""
    fpt_of = flops_per_token_curve([1e4, 1e7], [6e4 + 2e5, 6e7 + 2e5 * 30])  # 6N plus a head that grows slower
    budgets, sizes = [1e12, 4e12, 1.6e13], np.geomspace(2e4, 2e6, 7)
    budget = np.repeat(budgets, sizes.size)
    n = np.tile(sizes, len(budgets))
    loss = TRUE.loss(n, budget / fpt_of(n))
    found = isoflop_fit(budget, n, loss, fpt_of)
    for parabola in found["parabolas"]:
        best = law_optimum(TRUE, parabola.budget, fpt_of, (1e3, 1e8))
        assert parabola.interior and abs(math.log(parabola.n_opt / best)) < 0.15
    assert 0.3 < found["a"] < 0.9 and abs(found["a"] + found["b"] - 1) < 0.2  # N_opt and D_opt share the growth of C
    assert power_law([1, 10, 100], [3, 30, 300]) == pytest.approx((3.0, 1.0))
