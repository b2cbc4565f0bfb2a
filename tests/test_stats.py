"""The statistics of the verdicts: interval coverage, decisions, paired tests, FDR."""

from __future__ import annotations

import math

import numpy as np
import pytest

from saliaudit.stats import ALPHA, Interval, adjust, decide, images_to_decide, mean_interval, paired_better


@pytest.mark.parametrize(
    "draw,true_mean",
    [
        (lambda rng, n: rng.normal(0.3, 0.2, n), 0.3),
        (lambda rng, n: rng.exponential(0.5, n), 0.5),  # skewed: where BCa earns its keep
        (lambda rng, n: rng.uniform(-1, 1, n), 0.0),
    ],
)
def test_interval_covers_a_known_mean_at_about_the_nominal_rate(draw, true_mean):
    rng = np.random.default_rng(0)
    trials, n = 300, 25
    covered = 0
    for t in range(trials):
        iv = mean_interval(draw(rng, n), seed=t)
        assert iv.lo <= iv.mean <= iv.hi and iv.n == n
        covered += iv.lo <= true_mean <= iv.hi
    rate = covered / trials
    se = math.sqrt(0.95 * 0.05 / trials)
    assert 0.95 - 4 * se - 0.02 <= rate <= 0.95 + 4 * se, rate  # BCa undercovers a little at n=25


def test_interval_edge_cases_are_defined():
    assert mean_interval([]) is None
    assert mean_interval([float("nan"), float("inf")]) is None
    one = mean_interval([0.4], bounds=(-1.0, 1.0))
    assert (one.n, one.lo, one.hi) == (1, -1.0, 1.0) and "n = 1" in one.method
    one = mean_interval([0.4])
    assert one.lo == one.hi == 0.4
    same = mean_interval([0.2, 0.2, 0.2])
    assert (same.lo, same.hi, same.mean) == (0.2, 0.2, 0.2) and "exact" in same.method
    with_nan = mean_interval([0.1, float("nan"), 0.3, 0.2])
    assert with_nan.n == 3 and with_nan.lo <= 0.2 <= with_nan.hi
    # seeded: the same values and seed give the same interval
    vals = np.random.default_rng(1).normal(size=20)
    assert mean_interval(vals, seed=3) == mean_interval(vals, seed=3)
    clipped = mean_interval([0.99, 1.0, 0.98, 1.0], bounds=(-1.0, 1.0))
    assert clipped.hi <= 1.0


def _iv(lo: float, hi: float, mean: float | None = None) -> Interval:
    return Interval(10, (lo + hi) / 2 if mean is None else mean, lo, hi, 0.1, "test")


@pytest.mark.parametrize(
    "lo,hi,expected",
    [
        (0.1, 0.3, ("pass", False)),
        (0.3, 0.5, ("warn", True)),  # across warn
        (0.45, 0.6, ("warn", False)),  # between warn and fail
        (0.6, 0.8, ("warn", True)),  # across fail
        (0.7, 0.9, ("fail", False)),
        (0.2, 0.9, ("warn", True)),  # across both
    ],
)
def test_decide_lower_is_better(lo, hi, expected):
    assert decide(_iv(lo, hi), fail=0.7, warn=0.4, higher_is_better=False) == expected


@pytest.mark.parametrize(
    "lo,hi,expected",
    [
        (0.3, 0.5, ("pass", False)),
        (0.05, 0.15, ("warn", True)),
        (-0.2, 0.05, ("fail", False)),
    ],
)
def test_decide_higher_is_better(lo, hi, expected):
    assert decide(_iv(lo, hi), fail=0.1, warn=None, higher_is_better=True) == expected


def test_images_to_decide_from_the_spread():
    iv = Interval(10, 0.5, 0.3, 0.7, 0.3, "test")
    need = images_to_decide(iv, [0.4, 0.7])
    # 1.96 · 0.3 / 0.1 ≈ 5.9 → 35 images
    assert need == 35
    assert images_to_decide(Interval(10, 0.5, 0.5, 0.5, 0.0, "t"), [0.4]) is None


def test_paired_test_detects_a_real_difference_and_holds_its_level_under_the_null():
    rng = np.random.default_rng(0)
    control = rng.normal(0.8, 0.1, 30)
    method = control - 0.2 + rng.normal(0, 0.05, 30)  # lower is better: the method is better
    n, p = paired_better(method, control, higher_is_better=False)
    assert n == 30 and p < 1e-4
    n, p = paired_better(method, control, higher_is_better=True)
    assert p > 0.5  # the other direction is not significant
    assert paired_better([0.1, 0.2], [0.1, 0.2], higher_is_better=True) == (2, 1.0)
    assert paired_better([0.1], [0.5], higher_is_better=True) == (1, None)
    false = 0
    trials = 400
    for _t in range(trials):
        a, b = rng.normal(size=(2, 20))
        false += paired_better(a, b, higher_is_better=True)[1] < ALPHA
    assert false / trials <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / trials)


def test_benjamini_hochberg_adjustment():
    p = [0.01, 0.04, 0.03, 0.2]
    adj = adjust(p)
    # BH: sorted 0.01,0.03,0.04,0.2 → 0.04, 0.0533, 0.0533, 0.2
    assert adj == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    assert adjust([]) == []
