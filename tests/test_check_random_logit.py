"""The random-logit check (Sixt et al., ICML 2020; Quantus' RandomLogit): controls FAIL,
Grad-CAM scores far below them, a slow per-image re-implementation gives the check's numbers,
the random classes are never the top-1, are the same for every method and batch split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.feature import hog

from saliaudit.checks import get_check
from saliaudit.checks.base import Measurement
from saliaudit.checks.random_logit import RandomLogit, random_classes
from saliaudit.checks.removal import image_seed
from saliaudit.checks.similarity import hog_cell_size
from saliaudit.errors import UsageError
from saliaudit.methods import build_source, get_method

from .checks_util import make_batch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shapes():
    """8 sample shapes images, two per class."""
    full = make_batch(n=24)
    batch = full.select([0, 6, 12, 18, 1, 7, 13, 19])
    assert len(set(batch.targets.tolist())) == 4
    return batch


def _measure(check, batch, name):
    source = build_source(name, psi=["paper"], post=["signed", "abs"])
    maps = source.maps(batch.model, batch.x, batch.targets)
    return check.measure(batch, source, maps)


@pytest.fixture(scope="module")
def cells(shapes):
    check = get_check("random_logit")()
    out = {}
    for name in ("random", "edge", "edge_signed", "gradient", "gradcam"):
        for v, m in _measure(check, shapes, name).items():
            out[v.label] = check.judge(v, m)
    for label, r in out.items():
        print(f"random_logit {label}: {r.status} {r.value:.3f} ci={r.ci} means={r.series['means']}")
    return out


@pytest.mark.parametrize(
    "label",
    ["random/signed", "random/abs", "edge/signed", "edge/abs", "edge_signed/signed", "edge_signed/abs"],
)
def test_controls_fail(cells, label):
    r = cells[label]
    assert r.status == "fail", r.message
    assert r.value == pytest.approx(1.0)
    assert "does not depend on the class" in r.message
    assert r.n == 8 and r.ci == [1.0, 1.0]


def test_gradcam_scores_clearly_below_the_controls(cells):
    r = cells["gradcam/abs"]
    assert r.status in ("pass", "warn"), r.message
    assert r.value < cells["random/abs"].value - 0.5
    assert r.value < cells["edge/abs"].value - 0.5


def _slow_classes(seed, names, top1, k):
    """The draw written out: randint(K − 1) from a generator seeded by image_seed, shifted
    past the top-1 class."""
    out = []
    for name, t in zip(names, top1):
        g = torch.Generator()
        g.manual_seed(image_seed(seed, name, "random_logit"))
        r = int(torch.randint(k - 1, (1,), generator=g).item())
        out.append(r + 1 if r >= t else r)
    return out


def test_slow_reimplementation(cells, shapes):
    """Gradient maps (Σ_c |∂f/∂x|) for the top-1 and the drawn class, skimage HOG of min–max
    normalized maps, scipy's Spearman — image by image."""
    top1 = shapes.targets.tolist()
    other = _slow_classes(shapes.seed, shapes.images, top1, 4)
    assert cells["gradient/abs"].series["classes"] == dict(zip(shapes.images, other))
    grad = get_method("gradient")
    cell = hog_cell_size(64, 64)
    expected = []
    for i in range(len(shapes)):
        x = shapes.x[i : i + 1]
        a = grad(shapes.model, x, torch.tensor([top1[i]])).abs().sum(1)[0].double().numpy()
        b = grad(shapes.model, x, torch.tensor([other[i]])).abs().sum(1)[0].double().numpy()
        fa, fb = (
            hog(
                (m - m.min()) / (m.max() - m.min()),
                orientations=9,
                pixels_per_cell=(cell, cell),
                cells_per_block=(2, 2),
                block_norm="L2-Hys",
            )
            for m in (a, b)
        )
        expected.append(spearmanr(fa, fb).statistic)
    got = [p["value"] for p in cells["gradient/abs"].per_image]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert cells["gradient/abs"].value == pytest.approx(np.mean(expected), abs=1e-6)


def test_classes_never_top1_and_the_same_for_every_method(cells, shapes):
    first = cells["gradient/abs"].series["classes"]
    for label, r in cells.items():
        assert r.series["classes"] == first, label
    for name, t in zip(shapes.images, shapes.targets.tolist()):
        assert first[name] != t
    # many images, many classes: never the top-1, every other class drawn
    names = [f"img{i}.png" for i in range(400)]
    top1 = torch.tensor([i % 10 for i in range(400)])
    drawn = random_classes(3, names, top1, 10)
    assert not bool((drawn == top1).any())
    assert set(drawn.tolist()) == set(range(10))
    assert torch.equal(drawn, random_classes(3, names, top1, 10))
    assert not torch.equal(drawn, random_classes(4, names, top1, 10))


def test_batch_split_gives_the_same_numbers(shapes):
    whole = _measure(RandomLogit(), shapes, "gradient")
    check = RandomLogit()
    merged: dict = {}
    for idx in ([0, 1, 2], [3, 4, 5, 6, 7]):
        for v, m in _measure(check, shapes.select(idx), "gradient").items():
            merged.setdefault(v, Measurement()).extend(m)
    for v in whole:
        assert merged[v].images == whole[v].images
        assert merged[v].extra["classes"] == whole[v].extra["classes"]
        np.testing.assert_allclose(merged[v].values, whole[v].values, atol=1e-6)


def test_result_fields_and_params(cells):
    r = cells["gradient/signed"]
    assert r.check == "random_logit" and r.thresholds == {"fail": 0.7, "warn": 0.4}
    assert r.metric == "Spearman of HOG features, top-1 vs a random other class"
    assert set(r.series["means"]) == {"spearman_abs", "spearman", "ssim", "hog"}
    assert r.value == pytest.approx(r.series["means"]["hog"])
    assert "signed Spearman" in r.message
    for key in ("sim_hog", "degenerate"):
        assert key not in r.series
    with pytest.raises(UsageError):
        RandomLogit(params={"metric": "pearson"})
    with pytest.raises(UsageError):
        random_classes(0, ["a"], torch.tensor([0]), 1)
    assert RandomLogit(params={"metric": "ssim"}).metric.startswith("SSIM")

    class One:
        num_classes = 1

    assert "2 classes" in RandomLogit().skip_reason(
        build_source("gradient", psi=[], post=["abs"]), One(), False
    )
