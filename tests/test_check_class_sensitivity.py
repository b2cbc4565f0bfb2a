"""The class-sensitivity check (Khakzar et al.; FullGrad reviews): controls FAIL, a textbook
HOG-Spearman computation gives the check's numbers, degenerate maps are defined and noted,
results do not depend on the batch split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.feature import hog

from saliaudit.checks import get_check
from saliaudit.checks.base import MapSource, Measurement, Variant
from saliaudit.checks.class_sensitivity import ClassSensitivity
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
    """8 sample shapes images, two per class (mixed predicted classes)."""
    full = make_batch(n=24)
    batch = full.select([0, 6, 12, 18, 1, 7, 13, 19])
    batch.examples = {batch.images[1]}
    assert len(set(batch.targets.tolist())) == 4
    return batch


def _measure(check, batch, name):
    source = build_source(name, psi=["paper", "signed"], post=["signed", "abs"])
    maps = source.maps(batch.model, batch.x, batch.targets)
    return check.measure(batch, source, maps)


@pytest.fixture(scope="module")
def cells(shapes):
    check = get_check("class_sensitivity")()
    out = {}
    for name in ("random", "edge", "edge_signed", "gradient", "gradcam", "guided_backprop", "fullgrad"):
        for v, m in _measure(check, shapes, name).items():
            out[v.label] = check.judge(v, m)
    for label, r in out.items():  # the lead wants these numbers
        print(
            f"class_sensitivity {label}: {r.status} {r.value:.3f} lowest={r.series['lowest']} "
            f"runner_up={r.series['runner_up']}"
        )
    return out


@pytest.mark.parametrize("label", ["random/signed", "random/abs", "edge/signed", "edge/abs"])
def test_controls_fail(cells, label):
    r = cells[label]
    assert r.status == "fail", r.message
    assert r.value == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in r.series["lowest"].values())
    assert all(v == pytest.approx(1.0) for v in r.series["runner_up"].values())
    assert "does not depend on the class" in r.message and "HOG Spearman 1.00" in r.message
    assert r.n == len(r.per_image) and r.ci == [1.0, 1.0]


def test_edge_signed_control_fails_although_its_signed_spearman_is_minus_one(cells):
    """The sign-flip trap: the edge map negated for every class but the top-1 puts its
    evidence on the same pixels for every class. Judged on where the evidence lies it FAILs;
    the signed Spearman (−1) is reported beside the verdict, never as the verdict."""
    r = cells["edge_signed/signed"]
    assert r.status == "fail", r.message
    assert r.value == pytest.approx(1.0)
    assert r.series["lowest"]["spearman"] == pytest.approx(-1.0)
    assert "signed Spearman -1.00" in r.message and "flips the sign" in r.message
    assert cells["edge_signed/abs"].status == "fail"


def test_signed_and_unsigned_maps_are_judged_by_the_same_location_metric(cells):
    for method in ("gradient", "guided_backprop"):
        s, a = cells[f"{method}/signed"], cells[f"{method}/abs"]
        assert s.metric == a.metric == "Spearman of HOG features, top-1 vs lowest class"
        assert s.value == pytest.approx(s.series["lowest"]["hog"])
        assert a.value == pytest.approx(a.series["lowest"]["hog"])
        assert f"signed Spearman {s.series['lowest']['spearman']:.2f}" in s.message
        assert s.ci[0] <= s.value <= s.ci[1] and s.n == 8


def test_gradcam_is_class_sensitive(cells):
    """Khakzar et al. measure Grad-CAM 0.03 on VGG-16; on the shapes model it must PASS too,
    with the all-zero maps of rejected classes counted."""
    r = cells["gradcam/abs"]
    assert r.status == "pass", r.message
    assert r.value < cells["random/abs"].value - 0.5


def test_guided_backprop_does_not_pass_on_the_sample_model(cells):
    """Positive propagation makes maps class-insensitive (Khakzar et al.: 0.99 on VGG-16;
    Adebayo et al.): the check must say so on the sample shapes model."""
    statuses = {p: cells[f"guided_backprop/{p}"].status for p in ("signed", "abs")}
    assert "pass" not in statuses.values(), statuses
    assert cells["guided_backprop/signed"].value > cells["gradcam/signed"].value + 0.3


def test_fullgrad_signed_and_paper_are_judged_by_the_same_metric(cells):
    """Both ψ are judged on where the evidence lies; keeping the sign does not move the
    evidence of the lowest class away from the top-1 evidence on the sample model, so the
    signed ψ gets no PASS from a metric switch."""
    signed, paper = cells["fullgrad/signed"], cells["fullgrad/paper"]
    assert signed.metric == paper.metric
    assert signed.status != "pass" and paper.status != "pass", (signed.message, paper.message)


def test_result_fields(cells, shapes):
    r = cells["gradient/abs"]
    assert r.check == "class_sensitivity"
    assert r.metric == "Spearman of HOG features, top-1 vs lowest class"
    assert r.thresholds == {"fail": 0.7, "warn": 0.4}
    assert (
        set(r.series["lowest"]) == set(r.series["runner_up"]) == {"spearman_abs", "spearman", "ssim", "hog"}
    )
    assert r.value == pytest.approx(r.series["lowest"]["hog"])
    assert len(r.per_image) == len(shapes)
    fig = r.series["figures"][shapes.images[1]]
    assert set(fig) == {"top1", "top1_class", "lowest", "lowest_class"}
    assert fig["lowest_class"] == int(shapes.logits[1].argmin())
    assert fig["top1_class"] == int(shapes.targets[1])
    for key in ("lowest_hog", "degenerate", "no_lowest"):
        assert key not in r.series
    assert f"{r.value:.2f}" in r.message


def test_textbook_hog_spearman(cells, shapes):
    """Khakzar's measure by hand: gradient maps (sum of |∂f/∂x| over channels) for the top-1 and
    the lowest class, skimage HOG of the min–max normalized maps, scipy's Spearman."""
    grad = get_method("gradient")
    top = grad(shapes.model, shapes.x, shapes.targets).abs().sum(1).numpy()
    low = grad(shapes.model, shapes.x, shapes.logits.argmin(1)).abs().sum(1).numpy()
    cell = hog_cell_size(64, 64)
    expected = []
    for a, b in zip(top, low):
        fa, fb = (
            hog(
                (m - m.min()) / (m.max() - m.min()),
                orientations=9,
                pixels_per_cell=(cell, cell),
                cells_per_block=(2, 2),
                block_norm="L2-Hys",
            )
            for m in (a.astype(np.float64), b.astype(np.float64))
        )
        expected.append(spearmanr(fa, fb).statistic)
    got = [p["value"] for p in cells["gradient/abs"].per_image]
    np.testing.assert_allclose(got, expected, atol=1e-6)


class _ZeroForRejected(MapSource):
    """A source whose map is all-zero for any class but the top-1 (like Grad-CAM without
    positive evidence): every pair is degenerate, with a defined similarity of 0."""

    method = "zeros"

    def __init__(self, top):
        self.top = top
        self.variants = [Variant("zeros", post="abs")]

    def maps(self, model, x, targets):
        m = x.abs().sum(1)
        keep = (targets == self.top).to(m.dtype)[:, None, None]
        return {self.variants[0]: m * keep}


def test_degenerate_maps_noted(shapes):
    check = ClassSensitivity()
    source = _ZeroForRejected(shapes.targets)
    maps = source.maps(shapes.model, shapes.x, shapes.targets)
    out = check.measure(shapes, source, maps)
    r = check.judge(source.variants[0], out[source.variants[0]])
    # every pair rests on the constant-map convention: the would-be PASS is a WARN
    assert r.status == "warn" and r.value == 0.0 and r.degenerate == 1.0
    assert r.series["degenerate_pairs"] == len(shapes)
    assert f"{len(shapes)} of {len(shapes)} map pairs had a constant map" in r.message
    assert "rests on a convention" in r.message


def test_batch_split_and_reruns_give_the_same_numbers(shapes):
    whole = _measure(ClassSensitivity(), shapes, "gradient")
    again = _measure(ClassSensitivity(), shapes, "gradient")
    check = ClassSensitivity()
    merged: dict = {}
    for idx in ([0, 1, 2], [3, 4, 5, 6, 7]):
        for v, m in _measure(check, shapes.select(idx), "gradient").items():
            merged.setdefault(v, Measurement()).extend(m)
    for v in whole:
        assert whole[v].values == again[v].values
        assert merged[v].images == whole[v].images
        np.testing.assert_allclose(merged[v].values, whole[v].values, atol=1e-5)
        a = check.judge(v, merged[v])
        b = ClassSensitivity().judge(v, whole[v])
        for pair in ("lowest", "runner_up"):
            for k, val in b.series[pair].items():
                assert a.series[pair][k] == pytest.approx(val, abs=1e-5)


def test_params_and_skip():
    with pytest.raises(UsageError):
        ClassSensitivity(params={"metric": "pearson"})
    with pytest.raises(UsageError):
        ClassSensitivity(params={"max_images": -1})
    c = ClassSensitivity(params={"metric": "spearman"})
    assert c.metric.startswith("Spearman rank correlation of the signed maps")

    class One:
        num_classes = 1

    assert "2 classes" in ClassSensitivity().skip_reason(
        build_source("gradient", psi=[], post=["abs"]), One(), False
    )
