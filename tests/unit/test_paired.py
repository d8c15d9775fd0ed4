"""Paired comparisons: the interval, verdict and detectable difference against hand-computed Student-t figures."""

import math

import pytest

from research.paired import Paired


def test_interval_matches_a_hand_computed_student_t_interval():
    a = {1: 4.80, 2: 4.90, 3: 4.70, 4: 4.85}
    b = {1: 4.90, 2: 4.95, 3: 4.85, 4: 4.90, 9: 1.0}  # seed 9 has no partner: left out
    p = Paired(a, b)
    diffs = [-0.10, -0.05, -0.15, -0.05]
    mean = sum(diffs) / 4  # -0.0875
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)  # 0.04787
    t_975_df3 = 3.182446305284263  # from a t table: P(T <= 3.1824) = 0.975 at 3 degrees of freedom
    half = t_975_df3 * sd / 2
    assert p.seeds == [1, 2, 3, 4] and p.n == 4
    assert p.mean == pytest.approx(mean) and p.sd == pytest.approx(sd)
    assert p.interval == pytest.approx((mean - half, mean + half))  # about [-0.1637, -0.0113]
    assert p.verdict == "better"  # the whole interval is below 0: A's loss is lower
    t_80_df3 = 0.9784723
    assert p.detectable == pytest.approx((t_975_df3 + t_80_df3) * sd / 2, rel=1e-6)


def test_verdicts_follow_the_interval_and_the_direction():
    assert Paired({1: 5.0, 2: 5.1, 3: 5.2}, {1: 4.9, 2: 4.95, 3: 5.0}).verdict == "worse"
    assert Paired({1: 5.0, 2: 5.1, 3: 5.2}, {1: 4.9, 2: 4.95, 3: 5.0}, lower_is_better=False).verdict == "better"
    noisy = Paired({1: 4.8, 2: 5.0, 3: 4.9}, {1: 4.9, 2: 4.85, 3: 4.95})
    low, high = noisy.interval
    assert low < 0 < high and noisy.verdict == "not distinguishable at n = 3"
    one = Paired({1: 4.0}, {1: 5.0})
    assert one.n == 1 and math.isnan(one.half_width) and one.verdict == "not distinguishable at n = 1"
    assert "an interval needs two seeds" in one.summary()
