"""The statistics behind every verdict: intervals, paired tests, multiple-testing control.

A verdict is a claim about the model from a sample of images, so each judged number carries
its sample size ``n`` and a 95 % confidence interval, and a method is compared with the
must-fail controls on the same images. Everything here calls ``scipy.stats``:

- :func:`mean_interval`: the mean with a seeded bootstrap interval (BCa; Efron 1987), via
  :func:`scipy.stats.bootstrap`; percentile where BCa is undefined.
- :func:`decide`: PASS/WARN/FAIL from an interval and thresholds: PASS or FAIL only when the
  whole interval lies on that side; an interval across a threshold is WARN, inconclusive.
- :func:`images_to_decide`: how many images would make an inconclusive interval decisive,
  from the measured spread (normal approximation).
- :func:`paired_better`: a one-sided Wilcoxon signed-rank test (Wilcoxon 1945) that a
  method's per-image values are better than a control's on the same images.
- :func:`adjust`: Benjamini–Hochberg adjusted p-values over all tests of an audit (false
  discovery rate; Benjamini & Hochberg 1995) via :func:`scipy.stats.false_discovery_control`.
- :func:`difference_interval`: the change of a mean between two audits with a 95 % t interval,
  paired by image (Student) or unpaired (Welch 1947), used by ``saliaudit compare``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "Interval",
    "mean_interval",
    "decide",
    "images_to_decide",
    "paired_better",
    "adjust",
    "difference_interval",
    "CONFIDENCE",
    "ALPHA",
    "INTERVAL_METHOD",
    "TEST_METHOD",
    "ADJUST_METHOD",
]

CONFIDENCE = 0.95
ALPHA = 0.05
RESAMPLES = 2000
INTERVAL_METHOD = "BCa bootstrap (2000 resamples, seeded), 95 %"
TEST_METHOD = "one-sided Wilcoxon signed-rank test, paired by image"
ADJUST_METHOD = "Benjamini-Hochberg"


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` finite values with its confidence interval ``[lo, hi]``.

    ``method`` says how the interval was obtained: the bootstrap, ``exact`` (all values
    equal), or ``range`` (n = 1: the interval is the metric's whole range, or the value
    itself when the metric has none, and the verdict is inconclusive).
    """

    n: int
    mean: float
    lo: float
    hi: float
    sd: float
    method: str

    def as_list(self) -> list[float]:
        return [self.lo, self.hi]


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def mean_interval(
    values: Sequence[float] | np.ndarray, *, seed: int = 0, bounds: tuple[float, float] | None = None
) -> Interval | None:
    """The mean of the finite ``values`` with a 95 % BCa bootstrap interval (seeded).

    ``bounds``: the metric's range (e.g. ``(-1, 1)`` for a correlation), used for n = 1 and to
    clip the interval. ``None`` when no value is finite.
    """
    a = _finite(values)
    if a.size == 0:
        return None
    mean = float(a.mean())
    sd = float(a.std(ddof=1)) if a.size > 1 else 0.0
    if a.size == 1:
        lo, hi = bounds if bounds is not None else (mean, mean)
        return Interval(1, mean, min(lo, mean), max(hi, mean), 0.0, "range (n = 1)")
    if float(np.ptp(a)) == 0.0:
        v = float(a[0])
        return Interval(int(a.size), v, v, v, 0.0, "exact (all values equal)")
    method = "BCa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(
            (a,),
            np.mean,
            confidence_level=CONFIDENCE,
            n_resamples=RESAMPLES,
            method="BCa",
            vectorized=True,
            random_state=np.random.default_rng(seed),
        )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            method = "percentile"
            res = stats.bootstrap(
                (a,),
                np.mean,
                confidence_level=CONFIDENCE,
                n_resamples=RESAMPLES,
                method="percentile",
                vectorized=True,
                random_state=np.random.default_rng(seed),
            )
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    lo, hi = min(lo, mean), max(hi, mean)  # the interval always holds the estimate
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return Interval(int(a.size), mean, lo, hi, sd, method)


def decide(
    iv: Interval, *, fail: float | None, warn: float | None, higher_is_better: bool
) -> tuple[str, bool]:
    """``(status, inconclusive)`` from an interval and thresholds.

    For a lower-is-better value (e.g. a similarity that should be low): FAIL when the whole
    interval is ≥ ``fail``, PASS when it is below ``warn`` (or ``fail`` when there is no warn
    threshold), WARN when it lies between them; an interval across a threshold is WARN with
    ``inconclusive`` True. Mirrored for higher-is-better values (FAIL below ``fail``).
    """
    sign = -1.0 if higher_is_better else 1.0
    lo, hi = sorted((sign * iv.lo, sign * iv.hi))
    f = None if fail is None else sign * float(fail)
    w = None if warn is None else sign * float(warn)
    ok = w if w is not None else f
    if f is not None and lo >= f:
        return "fail", False
    if ok is None or hi < ok:
        return "pass", False
    if w is not None and lo >= w and (f is None or hi < f):
        return "warn", False
    return "warn", True


def images_to_decide(iv: Interval, thresholds: Sequence[float | None]) -> int | None:
    """About how many images in all would put the interval on one side of the nearest
    threshold, with the measured spread (normal approximation); ``None`` without spread."""
    near = [abs(iv.mean - float(t)) for t in thresholds if t is not None]
    if not near or iv.sd <= 0 or iv.n < 2:
        return None
    d = min(near)
    if d == 0:
        return None
    z = stats.norm.ppf(0.5 + CONFIDENCE / 2)
    return max(iv.n + 1, int(math.ceil((z * iv.sd / d) ** 2)))


def paired_better(
    method: Sequence[float], control: Sequence[float], *, higher_is_better: bool
) -> tuple[int, float | None]:
    """``(n, p)``: one-sided Wilcoxon signed-rank test that ``method`` is better than
    ``control`` on the same images (pairs with a non-finite side are dropped). ``p`` is 1.0
    when every difference is zero and ``None`` with fewer than 2 pairs."""
    m = np.asarray(method, dtype=np.float64)
    c = np.asarray(control, dtype=np.float64)
    keep = np.isfinite(m) & np.isfinite(c)
    m, c = m[keep], c[keep]
    if m.size < 2:
        return int(m.size), None
    d = (m - c) if higher_is_better else (c - m)  # > 0: the method is better
    if not np.any(d != 0):
        return int(m.size), 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.wilcoxon(d, alternative="greater", zero_method="wilcox")
    p = float(res.pvalue)
    return int(m.size), (p if math.isfinite(p) else 1.0)


def adjust(pvalues: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values (same order)."""
    if len(pvalues) == 0:
        return []
    return [float(p) for p in stats.false_discovery_control(np.asarray(pvalues, dtype=float), method="bh")]


def difference_interval(
    old: Sequence[float] | np.ndarray, new: Sequence[float] | np.ndarray, *, paired: bool
) -> Interval | None:
    """The change ``mean(new) − mean(old)`` with a 95 % t interval.

    ``paired``: ``old[i]`` and ``new[i]`` are the same image; the interval is Student's t
    interval of the mean per-image difference (pairs with a non-finite side are dropped).
    Unpaired: Welch's t interval for two means with unequal variances (Welch 1947). A t
    interval rather than the bootstrap of :func:`mean_interval`: two audits often share only
    the few images of a sampled check, and at n = 4 the bootstrap interval covers the true
    change about 75 % of the time, the t interval about 93 % (tests/test_compare.py).
    ``None`` with fewer than 2 pairs, or fewer than 2 finite values on a side: there is then no
    interval to decide a change with. ``n`` is the number of pairs, or of values in both
    samples together; ``sd`` the standard error of the change.
    """
    o = np.asarray(old, dtype=np.float64).ravel()
    w = np.asarray(new, dtype=np.float64).ravel()
    if paired:
        if o.size != w.size:
            raise ValueError(f"paired samples differ in length ({o.size} and {w.size})")
        keep = np.isfinite(o) & np.isfinite(w)
        d = w[keep] - o[keep]
        if d.size < 2:
            return None
        est, se, df, n = float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)), d.size - 1.0, int(d.size)
        method = "Student t, paired"
    else:
        o, w = _finite(o), _finite(w)
        if o.size < 2 or w.size < 2:
            return None
        vo, vw = float(o.var(ddof=1)) / o.size, float(w.var(ddof=1)) / w.size
        est, se, n = float(w.mean() - o.mean()), math.sqrt(vo + vw), int(o.size + w.size)
        df = (vo + vw) ** 2 / (vo**2 / (o.size - 1) + vw**2 / (w.size - 1)) if se > 0 else 1.0
        method = "Welch t"
    if se == 0.0:
        return Interval(n, est, est, est, 0.0, "exact (all values equal)")
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df)) * se
    return Interval(n, est, est - half, est + half, se, method)
