"""research/lr_transfer.py's analysis on losses whose answer is known: optima, intervals, the exponent, the paired comparison."""

import math

import numpy as np
import pytest

from research import registry
from research.lr_transfer import analyse, mup_against_sp, optimum, study_config, verdict

LRS = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)
SEEDS = (1, 2, 3)


def bowl(best_lr: float, noise: float = 0.0, test_offset: float = 0.0) -> dict:
    """{lr: {seed: (val, test)}}: a parabola in log lr with its minimum at best_lr, plus a per-seed wobble."""
    rng = np.random.default_rng(int(best_lr * 1e6))
    return {lr: {s: ((math.log(lr / best_lr)) ** 2 + noise * rng.standard_normal(), 5.0 + (math.log(lr / best_lr)) ** 2 + test_offset)
                 for s in SEEDS} for lr in LRS}


def test_the_optimum_is_the_parabola_vertex_with_an_interval_that_holds_it():
    found = optimum(bowl(3e-3, noise=0.01), np.random.default_rng(0))
    assert found["inside"] and found["best_grid_lr"] == 4e-3
    assert found["lr"] == pytest.approx(3e-3, rel=0.1)
    assert found["low"] <= found["lr"] <= found["high"] and found["high"] / found["low"] < 2
    edge = optimum(bowl(5e-4), np.random.default_rng(0))
    assert not edge["inside"] and edge["lr"] == pytest.approx(1e-3)


def test_an_optimum_that_halves_per_doubling_has_exponent_one_and_a_cost_when_carried_over():
    widths = [64, 128, 256]
    sp = {64: bowl(8e-3), 128: bowl(4e-3), 256: bowl(2e-3)}
    mup = {64: bowl(4e-3, noise=0.001), 128: bowl(4e-3, noise=0.001), 256: bowl(4e-3, noise=0.001)}
    result = analyse(widths, {"sp": sp, "mup": mup}, seed=0)
    a, low, high = result["sp"]["exponent"]
    assert a == pytest.approx(1.0, abs=0.01) and low > 0.5
    assert result["sp"]["shift"] == pytest.approx([1.0, 0.5, 0.25], rel=0.01)
    paired = result["sp"]["paired"]  # at width 256: lr 8e-3 against 2e-3, two factors of 2 off the bowl's bottom
    assert paired.mean == pytest.approx(math.log(4) ** 2) and paired.verdict == "worse"
    assert "scale the lr by (64 / width)^1.00" in verdict(widths, result["sp"])
    versus = mup_against_sp(widths, {"sp": sp, "mup": mup}, result)  # μP at 4e-3 against SP at its own 2e-3, both at the bottom of their bowls
    assert versus.n == 3 and versus.mean == pytest.approx(0.0)
    assert abs(result["mup"]["exponent"][0]) < 0.05 and result["mup"]["exponent"][2] < 0.5
    assert "transfers at the grid's resolution" in verdict(widths, result["mup"])


def test_mup_at_its_base_width_is_the_sp_study():
    cfg = registry.build("lr_transfer")
    assert study_config(cfg, "mup", 64).sweep.study_name == study_config(cfg, "sp", 64).sweep.study_name == "lr_transfer-sp-w64"
    wide = study_config(cfg, "mup", 256)
    assert (wide.sweep.study_name, wide.model.parametrization, wide.model.hidden_size) == ("lr_transfer-mup-w256", "mup", 256)
    assert cfg.sweep.n_trials == len(registry.search_space("lr_transfer")["train.lr"].grid) * cfg.sweep.grid_seeds
