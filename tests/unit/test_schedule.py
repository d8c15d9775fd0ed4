import math

import pytest

from research.schedule import lr_at

LR, WARMUP, STEPS, FLOOR = 1e-3, 10, 111, 0.1  # 100 decay steps: the midpoint is a whole step


def test_warmup_is_linear_and_starts_above_zero():
    assert lr_at(0, LR, WARMUP, STEPS, FLOOR) == pytest.approx(LR / WARMUP)
    assert lr_at(4, LR, WARMUP, STEPS, FLOOR) == pytest.approx(LR * 5 / WARMUP)
    assert lr_at(WARMUP - 1, LR, WARMUP, STEPS, FLOOR) == pytest.approx(LR)


def test_peak_at_end_of_warmup():
    assert lr_at(WARMUP, LR, WARMUP, STEPS, FLOOR) == pytest.approx(LR)


def test_cosine_midpoint_is_halfway_between_peak_and_floor():
    middle = WARMUP + (STEPS - 1 - WARMUP) // 2
    assert lr_at(middle, LR, WARMUP, STEPS, FLOOR) == pytest.approx((LR + LR * FLOOR) / 2, rel=1e-9)


def test_last_step_reaches_the_floor_and_never_goes_below():
    assert lr_at(STEPS - 1, LR, WARMUP, STEPS, FLOOR) == pytest.approx(LR * FLOOR)
    values = [lr_at(s, LR, WARMUP, STEPS, FLOOR) for s in range(STEPS + 20)]
    assert min(values) == pytest.approx(LR * FLOOR)
    assert all(a >= b - 1e-15 for a, b in zip(values[WARMUP:], values[WARMUP + 1 :]))  # monotone decay


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_floor_follows_min_lr_ratio(ratio):
    assert lr_at(STEPS - 1, LR, WARMUP, STEPS, ratio) == pytest.approx(LR * ratio)


def test_no_warmup():
    assert lr_at(0, LR, 0, STEPS, FLOOR) == pytest.approx(LR)
    assert math.isfinite(lr_at(0, LR, 0, 1, FLOOR))
