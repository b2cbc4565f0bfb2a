"""Similarity measures of the sanity checks against scipy/skimage, degenerate maps, invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.feature import hog
from skimage.metrics import structural_similarity

from saliaudit.checks import similarity as sim
from saliaudit.errors import SaliauditError, UsageError


def _maps(seed: int = 0, shape=(5, 32, 40)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=shape)
    b = 0.6 * a + rng.normal(size=shape)
    a[0] = np.round(a[0])  # many ties
    b[-1] = np.round(2 * b[-1])
    a[len(a) // 2] = np.maximum(a[len(a) // 2], 0)  # many zeros, as after a ReLU
    return a, b


def _mm(m: np.ndarray) -> np.ndarray:
    return (m - m.min()) / (m.max() - m.min())


@pytest.mark.parametrize("absolute", [True, False])
def test_spearman_equals_scipy_with_ties(absolute):
    a, b = _maps()
    values, degenerate = sim.spearman(
        torch.from_numpy(a).float(), torch.from_numpy(b).float(), absolute=absolute
    )
    f = np.abs if absolute else (lambda t: t)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    ref = [spearmanr(f(a32[i]).ravel(), f(b32[i]).ravel()).statistic for i in range(len(a))]
    assert values.dtype == np.float64 and degenerate.dtype == bool
    np.testing.assert_allclose(values, ref, rtol=0, atol=1e-12)
    assert not degenerate.any()


def test_rank_average_equals_scipy_rankdata():
    from scipy.stats import rankdata

    x = np.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [0, 0, 0, 1, 1, 2, 2, 2, 2, 7]], dtype=float)
    np.testing.assert_array_equal(sim.rank_average(x), np.stack([rankdata(r) for r in x]))


def test_ssim_equals_skimage():
    a, b = _maps(1)
    values, degenerate = sim.ssim(a, b)
    ref = [structural_similarity(_mm(a[i]), _mm(b[i]), data_range=1.0) for i in range(len(a))]
    np.testing.assert_allclose(values, ref, rtol=0, atol=1e-12)
    assert not degenerate.any()


def test_ssim_tiny_maps_shrink_the_window():
    a, b = _maps(2, shape=(3, 5, 6))
    values, _ = sim.ssim(a, b)
    ref = [structural_similarity(_mm(a[i]), _mm(b[i]), data_range=1.0, win_size=5) for i in range(3)]
    np.testing.assert_allclose(values, ref, atol=1e-12)
    assert sim.ssim_win_size(4, 9) == 3 and sim.ssim_win_size(64, 64) == 7
    with pytest.raises(UsageError):
        sim.ssim(np.arange(16.0).reshape(1, 2, 8), np.arange(16.0)[::-1].reshape(1, 2, 8))


@pytest.mark.parametrize("size", [32, 64, 224])
def test_hog_spearman_equals_skimage_and_scipy(size):
    a, b = _maps(3, shape=(2, size, size))
    values, degenerate = sim.hog_spearman(a, b)
    cell = sim.hog_cell_size(size, size)
    assert size // cell >= 4  # at least 4×4 cells
    ref = []
    for i in range(2):
        fa, fb = (
            hog(
                _mm(m),
                orientations=9,
                pixels_per_cell=(cell, cell),
                cells_per_block=(2, 2),
                block_norm="L2-Hys",
            )
            for m in (a[i], b[i])
        )
        ref.append(spearmanr(fa, fb).statistic)
    np.testing.assert_allclose(values, ref, rtol=0, atol=1e-12)
    assert not degenerate.any()


def test_degenerate_maps_have_defined_values():
    rng = np.random.default_rng(4)
    m = rng.normal(size=(16, 16))
    zero = np.zeros((16, 16))
    tiny = 1e-9 * rng.normal(size=(16, 16))  # constant at the other map's scale
    a = np.stack([zero, zero, m, np.full((16, 16), 3.0), tiny, zero])
    b = np.stack([zero, m, zero, np.full((16, 16), 3.0), m, np.full((16, 16), 2.0)])
    for metric in sim.METRICS:
        values, degenerate = sim.similarity(a, b, metric)
        assert np.isfinite(values).all(), metric
        np.testing.assert_array_equal(values, [1.0, 0.0, 0.0, 1.0, 0.0, 1.0], err_msg=metric)
        assert degenerate.all(), metric
    # a tiny map alone is not constant: the tolerance is relative to the pair's scale
    values, degenerate = sim.spearman(tiny[None], (2 * tiny + 1e-10)[None], absolute=False)
    assert not degenerate[0] and values[0] > 0.99
    # |map| constant (±1 everywhere) is degenerate for the ABS variant only
    signs = np.where(rng.normal(size=(1, 16, 16)) > 0, 1.0, -1.0)
    v_abs, d_abs = sim.spearman(signs, m[None], absolute=True)
    v_sig, d_sig = sim.spearman(signs, m[None], absolute=False)
    assert d_abs[0] and v_abs[0] == 0.0 and not d_sig[0]


def test_identical_maps_give_one_and_never_nan():
    a, _ = _maps(5, shape=(3, 16, 16))
    for metric in sim.METRICS:
        values, degenerate = sim.similarity(a, a.copy(), metric)
        np.testing.assert_allclose(values, 1.0, atol=1e-12, err_msg=metric)
        assert not degenerate.any()


def test_nonfinite_maps_raise():
    a, b = _maps(6, shape=(2, 8, 8))
    a[1, 2, 3] = np.nan
    with pytest.raises(SaliauditError, match="NaN"):
        sim.spearman(a, b, absolute=True)


@pytest.mark.parametrize("metric", ["spearman", "ssim", "hog"])
def test_invariant_to_positive_affine_maps(metric):
    a, b = _maps(7, shape=(3, 32, 32))
    base, _ = sim.similarity(a, b, metric)
    moved, _ = sim.similarity(3.5 * a + 2.0, 0.25 * b - 7.0, metric)
    np.testing.assert_allclose(moved, base, atol=1e-9)


def test_abs_spearman_invariant_to_positive_scaling_not_to_sign_shift():
    a, b = _maps(8, shape=(3, 32, 32))
    base, _ = sim.spearman(a, b, absolute=True)
    scaled, _ = sim.spearman(4.0 * a, 0.5 * b, absolute=True)
    np.testing.assert_allclose(scaled, base, atol=1e-12)
    shifted, _ = sim.spearman(a + 10.0, b, absolute=True)  # |a + 10| = a + 10: signed ranks
    signed, _ = sim.spearman(a, np.abs(b), absolute=False)
    np.testing.assert_allclose(shifted, signed, atol=1e-12)
    assert np.abs(shifted - base).max() > 0.05


@pytest.mark.parametrize("metric", sim.METRICS)
def test_batch_independence(metric):
    a, b = _maps(9, shape=(4, 32, 32))
    a[3] = 0.0  # a degenerate pair in the batch
    whole, deg = sim.similarity(torch.from_numpy(a), torch.from_numpy(b), metric)
    alone = [sim.similarity(a[i], b[i], metric) for i in range(4)]  # (H, W): a batch of one
    np.testing.assert_array_equal(whole, [v[0] for v, _ in alone])
    np.testing.assert_array_equal(deg, [d[0] for _, d in alone])
    rev, _ = sim.similarity(a[::-1].copy(), b[::-1].copy(), metric)
    np.testing.assert_array_equal(rev[::-1], whole)


def test_dispatch_and_errors():
    a, b = _maps(10, shape=(2, 16, 16))
    assert sim.METRICS == ("spearman_abs", "spearman", "ssim", "hog")
    np.testing.assert_array_equal(
        sim.similarity(a, b, "spearman_abs")[0], sim.spearman(a, b, absolute=True)[0]
    )
    with pytest.raises(UsageError, match="unknown similarity metric"):
        sim.similarity(a, b, "pearson")
    with pytest.raises(UsageError, match="shapes"):
        sim.spearman(a, b[:, :8], absolute=False)


def test_negated_map_hog_is_sign_blind():
    """Documented property: HOG uses unsigned orientations and min-max normalization maps −x
    to 1 − x̂, so a map and its negation have the same HOG features (signed Spearman −1)."""
    a, _ = _maps(11, shape=(2, 32, 32))
    h, _ = sim.hog_spearman(a, -a)
    s, _ = sim.spearman(a, -a, absolute=False)
    np.testing.assert_allclose(h, 1.0, atol=1e-9)
    np.testing.assert_allclose(s, -1.0, atol=1e-12)


@pytest.mark.parametrize("metric", sim.METRICS)
def test_prepared_maps_give_the_same_values(metric):
    a, b = _maps(12, shape=(3, 32, 32))
    a[1] = 0.0
    ref = sim.Maps(torch.from_numpy(a))
    np.testing.assert_array_equal(
        sim.similarity(ref, sim.Maps(b), metric)[0], sim.similarity(a, b, metric)[0]
    )
    np.testing.assert_array_equal(sim.similarity(ref, b, metric)[1], sim.similarity(a, b, metric)[1])
