"""Similarity of two saliency maps, as the sanity-check papers measure it.

Adebayo et al., *Sanity Checks for Saliency Maps* (NeurIPS 2018) compare a map with the map of
a randomized model by the Spearman rank correlation with and without absolute values, by SSIM
and by the Spearman correlation of HOG features; Khakzar et al. and the FullGrad reviews use
the same measures for class sensitivity. Every function here takes two batches of 2-D maps
``a, b`` of shape ``(B, H, W)`` (torch tensors on any device, or arrays; a single ``(H, W)``
map is a batch of one) and returns ``(values, degenerate)``: a float64 array ``(B,)`` and a
bool array ``(B,)`` marking the pairs where a map is constant.

Definitions:

* ``spearman(a, b, absolute)``: Pearson correlation of the ranks of the flattened maps; ties
  get their average rank (``scipy.stats.rankdata(method="average")``, so the value equals
  ``scipy.stats.spearmanr``). ``absolute=True`` ranks ``|a|`` and ``|b|`` (Adebayo's
  "Spearman rank correlation (ABS)"); ``False`` ranks the signed values ("no ABS").
* ``ssim(a, b)``: ``skimage.metrics.structural_similarity`` of the two maps after each is
  rescaled to [0, 1] by its own min–max, with ``data_range=1`` and the default 7×7 uniform
  window (``win_size`` shrinks to the largest odd size ≤ the short side for maps under 7 px);
  computed with skimage's arithmetic vectorized over the batch (equal to skimage to 1e-12).
* ``hog_spearman(a, b)``: Spearman correlation of the ``skimage.feature.hog`` descriptors of
  the two maps (each min–max rescaled to [0, 1] as for SSIM) with :data:`HOG_ORIENTATIONS`
  orientations, :data:`HOG_CELLS_PER_BLOCK` cells per block, ``L2-Hys`` block norm and square
  cells of ``max(1, min(H, W) // HOG_CELLS_PER_SIDE)`` pixels (8×8 cells on a square map,
  from 4 px cells at 32 px to 28 px cells at 224 px).

Degenerate maps. A map is *constant* when its range ``max − min`` is at most
:data:`CONSTANT_RTOL` times the larger absolute value found in either map of the pair (for
``absolute=True`` the range of ``|map|``); an all-zero Grad-CAM map for a class without positive
evidence is the common case. Correlations and SSIM are undefined for a constant map, so the
similarity is *defined* instead: both maps constant -> 1.0 (identical maps carry the same
information: none), exactly one constant -> 0.0; the pair is flagged ``degenerate`` so the check
can say how many there were. HOG descriptors that come out constant (a map whose only
variation is on its border row) follow the same rule. No function returns NaN or Inf; maps
containing NaN/Inf raise :class:`~saliaudit.errors.SaliauditError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import SaliauditError, UsageError

__all__ = [
    "METRICS",
    "METRIC_NAMES",
    "CONSTANT_RTOL",
    "HOG_ORIENTATIONS",
    "HOG_CELLS_PER_SIDE",
    "HOG_CELLS_PER_BLOCK",
    "HOG_BLOCK_NORM",
    "SSIM_WIN_SIZE",
    "Maps",
    "spearman",
    "ssim",
    "hog_spearman",
    "similarity",
    "rank_average",
    "minmax",
    "hog_cell_size",
    "hog_features",
    "ssim_win_size",
]

#: Relative tolerance under which a map counts as constant (see the module docstring).
CONSTANT_RTOL = 1e-6
#: HOG parameters (``skimage.feature.hog``).
HOG_ORIENTATIONS = 9
HOG_CELLS_PER_SIDE = 8  # cells along the map's shorter side
HOG_CELLS_PER_BLOCK = (2, 2)
HOG_BLOCK_NORM = "L2-Hys"
#: SSIM window (skimage's default) for maps of at least 7 px.
SSIM_WIN_SIZE = 7

#: Metric names accepted by :func:`similarity`, in report order.
METRICS = ("spearman_abs", "spearman", "ssim", "hog")
#: Human-readable names (for messages and the ``metric`` field of results).
METRIC_NAMES = {
    "spearman_abs": "Spearman rank correlation of |map| (ABS)",
    "spearman": "Spearman rank correlation of the signed maps (no ABS)",
    "ssim": "SSIM of min-max normalized maps",
    "hog": "Spearman of HOG features",
}


def _as_batch(t: Any) -> np.ndarray:
    """A ``(B, H, W)`` float64 array from a tensor (any device) or array."""
    if isinstance(t, torch.Tensor):
        arr = t.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(t, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise UsageError(
            f"similarity expects (B, H, W) maps, got shape {arr.shape}", hint="pass 2-D maps, one per image"
        )
    if not np.isfinite(arr).all():
        raise SaliauditError(
            "a saliency map contains NaN or Inf, so its similarity is undefined",
            hint="the method produced non-finite values on this model; "
            "check the method or the model's numerics",
        )
    return arr


class _Ranked:
    """Rows of values ``(B, N)`` with their average ranks, range and largest |value|."""

    def __init__(self, values: np.ndarray):
        self.values = values
        self.ranks = rank_average(values)
        self.range = values.max(1) - values.min(1) if values.shape[1] else np.zeros(len(values))
        self.maxabs = np.abs(values).max(1) if values.shape[1] else np.zeros(len(values))


class Maps:
    """A batch of 2-D maps with the per-map quantities the measures need (ranks, min–max
    normalized maps, HOG features), computed once when first needed. Pass it instead of a
    tensor when one batch of maps is compared many times (the randomization check compares
    the original maps with every step's maps)."""

    def __init__(self, maps: Any):
        self.x = _as_batch(maps)
        self.flat = self.x.reshape(self.x.shape[0], -1)
        self._ranked: dict[str, _Ranked] = {}
        self._mm: np.ndarray | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.x.shape

    def ranked(self, kind: str) -> _Ranked:
        """``signed`` or ``abs`` flattened maps, or ``hog`` features, with their ranks."""
        if kind not in self._ranked:
            if kind == "signed":
                values = self.flat
            elif kind == "abs":
                values = np.abs(self.flat)
            else:
                values = _hog_batch(self.normalized())
            self._ranked[kind] = _Ranked(values)
        return self._ranked[kind]

    def normalized(self) -> np.ndarray:
        """Each map min–max rescaled to [0, 1] (a map with zero range: all zeros)."""
        if self._mm is None:
            lo = self.x.min(axis=(1, 2), keepdims=True)
            span = self.x.max(axis=(1, 2), keepdims=True) - lo
            self._mm = np.where(span > 0, (self.x - lo) / np.where(span > 0, span, 1.0), 0.0)
        return self._mm


def _prepare(a: Any, b: Any) -> tuple[Maps, Maps]:
    x = a if isinstance(a, Maps) else Maps(a)
    y = b if isinstance(b, Maps) else Maps(b)
    if x.shape != y.shape:
        raise UsageError(
            f"cannot compare maps of shapes {x.shape} and {y.shape}",
            hint="compare maps of the same images at the same resolution",
        )
    return x, y


def _constant(x: _Ranked, y: _Ranked) -> tuple[np.ndarray, np.ndarray]:
    """Per row: is ``x`` constant, is ``y`` constant (range ≤ CONSTANT_RTOL × the larger
    absolute value in the pair)."""
    tol = CONSTANT_RTOL * np.maximum(x.maxabs, y.maxabs)
    return x.range <= tol, y.range <= tol


def _defined(cx: np.ndarray, cy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values for degenerate pairs (1 both constant, 0 one constant) and the degenerate mask."""
    return np.where(cx & cy, 1.0, 0.0), cx | cy


def rank_average(x: np.ndarray) -> np.ndarray:
    """Ranks (1-based) along axis 1 of a ``(B, N)`` array, ties averaged: row by row the same
    as ``scipy.stats.rankdata(row, method="average")``, vectorized over the batch."""
    x = np.asarray(x, dtype=np.float64)
    b, n = x.shape
    if n == 0 or b == 0:
        return np.zeros_like(x)
    order = np.argsort(x, axis=1)  # any order within ties: they all get the average rank
    xs = np.take_along_axis(x, order, axis=1)
    new = np.ones((b, n), dtype=bool)
    new[:, 1:] = xs[:, 1:] != xs[:, :-1]
    flat_new = new.ravel()
    gid = np.cumsum(flat_new) - 1  # group id of each sorted element, unique across rows
    starts = np.flatnonzero(flat_new)  # flat index of each group's first element
    counts = np.diff(np.append(starts, b * n))
    avg = starts % n + (counts + 1) / 2.0  # 1-based average rank of the group
    ranks = np.empty((b, n), dtype=np.float64)
    np.put_along_axis(ranks, order, avg[gid].reshape(b, n), axis=1)
    return ranks


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc = x - x.mean(1, keepdims=True)
    yc = y - y.mean(1, keepdims=True)
    num = (xc * yc).sum(1)
    den = np.sqrt((xc * xc).sum(1) * (yc * yc).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    return np.clip(r, -1.0, 1.0)


def _spearman_ranked(
    x: _Ranked, y: _Ranked, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Spearman per row with the degenerate-map rule (rows outside ``valid`` are skipped)."""
    cx, cy = _constant(x, y)
    out, degenerate = _defined(cx, cy)
    ok = ~degenerate if valid is None else (~degenerate & valid)
    if ok.any():
        out[ok] = _pearson_rows(x.ranks[ok], y.ranks[ok])
    # a non-constant row has at least two distinct ranks, so the value is finite
    return np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=-1.0), degenerate


def spearman(a: Any, b: Any, absolute: bool) -> tuple[np.ndarray, np.ndarray]:
    """Spearman rank correlation of each pair of flattened maps (``absolute``: of ``|a|``,
    ``|b|``); returns ``(values (B,), degenerate (B,))``."""
    x, y = _prepare(a, b)
    kind = "abs" if absolute else "signed"
    return _spearman_ranked(x.ranked(kind), y.ranked(kind))


def minmax(m: np.ndarray) -> np.ndarray:
    """A 2-D map rescaled to [0, 1] by its own min and max (the map must not be constant)."""
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo)


def ssim_win_size(h: int, w: int) -> int:
    """SSIM window: 7, or for maps under 7 px the largest odd size ≤ the short side (≥ 3)."""
    side = min(h, w)
    if side >= SSIM_WIN_SIZE:
        return SSIM_WIN_SIZE
    if side < 3:
        raise UsageError(
            f"maps of {h}×{w} px are too small for SSIM (at least 3×3 needed)", hint="use a larger input size"
        )
    return side if side % 2 else side - 1


def hog_cell_size(h: int, w: int) -> int:
    """HOG cell side in pixels: ``max(1, min(h, w) // HOG_CELLS_PER_SIDE)``."""
    if min(h, w) < 2 * HOG_CELLS_PER_BLOCK[0]:
        raise UsageError(f"maps of {h}×{w} px are too small for HOG features", hint="use a larger input size")
    return max(1, min(h, w) // HOG_CELLS_PER_SIDE)


def ssim(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """SSIM of each pair of min–max normalized maps (``data_range=1``).

    The arithmetic of ``skimage.metrics.structural_similarity`` (uniform window, K1 = 0.01,
    K2 = 0.03, sample covariance, borders of half a window cropped before the mean), vectorized
    over the batch with ``scipy.ndimage.uniform_filter`` (the tests compare it with skimage)."""
    from scipy.ndimage import uniform_filter

    p, q = _prepare(a, b)
    cx, cy = _constant(p.ranked("signed"), q.ranked("signed"))
    out, degenerate = _defined(cx, cy)
    ok = np.flatnonzero(~degenerate)
    if ok.size == 0:
        return out, degenerate
    x, y = p.normalized()[ok], q.normalized()[ok]
    win = ssim_win_size(*x.shape[1:])
    size = (1, win, win)
    cov_norm = win * win / (win * win - 1.0)
    ux, uy = uniform_filter(x, size=size), uniform_filter(y, size=size)
    uxx, uyy = uniform_filter(x * x, size=size), uniform_filter(y * y, size=size)
    uxy = uniform_filter(x * y, size=size)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    h, w = s.shape[1:]
    vals = s[:, pad : h - pad, pad : w - pad].reshape(len(ok), -1).mean(1, dtype=np.float64)
    # SSIM lies in [-1, 1]; float rounding can overshoot by ~1e-13 on identical maps
    out[ok] = np.clip(np.nan_to_num(vals, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    return out, degenerate


def hog_features(m: np.ndarray) -> np.ndarray:
    """The HOG descriptor of one 2-D map in [0, 1] (``skimage.feature.hog``, module parameters)."""
    from skimage.feature import hog

    c = hog_cell_size(*m.shape)
    return hog(
        m,
        orientations=HOG_ORIENTATIONS,
        pixels_per_cell=(c, c),
        cells_per_block=HOG_CELLS_PER_BLOCK,
        block_norm=HOG_BLOCK_NORM,
        feature_vector=True,
    )


def _hog_batch(x: np.ndarray) -> np.ndarray:
    """HOG descriptors ``(B, F)`` of a batch of maps in [0, 1]: skimage's own cell histograms
    (``skimage.feature._hoghistogram``) and its L2-Hys block normalization vectorized over the
    blocks (bit-identical to ``skimage.feature.hog``; the tests compare). Falls back to
    ``hog`` per map if that internal module is missing."""
    b, h, w = x.shape
    try:
        from skimage.feature._hoghistogram import hog_histograms
    except ImportError:  # pragma: no cover - another scikit-image layout
        return np.stack([hog_features(m) for m in x]) if b else np.zeros((0, 0))
    from numpy.lib.stride_tricks import sliding_window_view

    c = hog_cell_size(h, w)
    n_r, n_c = h // c, w // c
    br, bc = HOG_CELLS_PER_BLOCK
    o = HOG_ORIENTATIONS
    g_row = np.zeros_like(x)
    g_row[:, 1:-1] = x[:, 2:] - x[:, :-2]
    g_col = np.zeros_like(x)
    g_col[:, :, 1:-1] = x[:, :, 2:] - x[:, :, :-2]
    hist = np.zeros((b, n_r, n_c, o), dtype=np.float64)
    for i in range(b):
        hog_histograms(
            np.ascontiguousarray(g_col[i]), np.ascontiguousarray(g_row[i]), c, c, w, h, n_c, n_r, o, hist[i]
        )
    blocks = sliding_window_view(hist, (br, bc), axis=(1, 2))  # (B, nbr, nbc, O, br, bc)
    nbr, nbc = blocks.shape[1:3]
    blk = np.ascontiguousarray(blocks.transpose(0, 1, 2, 4, 5, 3)).reshape(-1, br * bc * o)
    eps = 1e-5
    out = blk / np.sqrt(np.sum(blk**2, axis=1, keepdims=True) + eps**2)
    out = np.minimum(out, 0.2)
    out = out / np.sqrt(np.sum(out**2, axis=1, keepdims=True) + eps**2)
    return out.reshape(b, nbr * nbc * br * bc * o)


def hog_spearman(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Spearman rank correlation of the HOG descriptors of each pair of maps."""
    p, q = _prepare(a, b)
    cx, cy = _constant(p.ranked("signed"), q.ranked("signed"))
    out, degenerate = _defined(cx, cy)
    if (~degenerate).any():
        v, d = _spearman_ranked(p.ranked("hog"), q.ranked("hog"), valid=~degenerate)
        ok = ~degenerate
        out[ok], degenerate[ok] = v[ok], d[ok]
    return out, degenerate


def similarity(a: Any, b: Any, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch by name: ``spearman_abs``, ``spearman``, ``ssim`` or ``hog`` (see METRICS).
    ``a`` and ``b`` are tensors, arrays or :class:`Maps` (reused per-map quantities)."""
    if metric == "spearman_abs":
        return spearman(a, b, absolute=True)
    if metric == "spearman":
        return spearman(a, b, absolute=False)
    if metric == "ssim":
        return ssim(a, b)
    if metric == "hog":
        return hog_spearman(a, b)
    raise UsageError(f"unknown similarity metric {metric!r}", hint="choose from " + ", ".join(METRICS))
