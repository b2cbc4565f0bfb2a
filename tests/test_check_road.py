"""ROAD (Rong et al., ICML 2022): the batched noisy linear imputation against the authors'
imputer as pytorch-grad-cam ships it, the curves and the ROAD score against pytorch-grad-cam's
ROAD metrics, the controls, determinism, and the model left untouched."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from saliaudit.checks.imputation import linear_impute, noisy_linear_impute
from saliaudit.checks.removal import saliency_ranks, tie_breaks
from saliaudit.checks.road import Road
from saliaudit.errors import ImputationError, UsageError
from saliaudit.methods import build_source
from saliaudit.model import wrap_module

from .checks_util import SAMPLES, all_weights, make_batch
from .conftest import hook_counts

gradcam_road = pytest.importorskip("pytorch_grad_cam.metrics.road")
# 2 images per class of the sample shapes model (circle, cross, square, triangle)
PICK = [0, 1, 6, 7, 12, 13, 18, 19]


@pytest.fixture(scope="module")
def shapes():
    torch.set_num_threads(1)
    return make_batch(n=24).select(PICK)


def _blob(h: int, w: int, frac: float, seed: int) -> torch.Tensor:
    """The ``frac`` share of the pixels in one smooth region (a large connected mask)."""
    g = torch.Generator().manual_seed(seed)
    s = nn.functional.interpolate(torch.rand(1, 1, 3, 3, generator=g), size=(h, w), mode="bilinear")[0, 0]
    s = s + 1e-6 * torch.rand(h, w, generator=g)  # no ties
    k = int(round(frac * h * w))
    return s >= s.flatten().sort(descending=True).values[k - 1]


def _masks(h: int, w: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    border = torch.zeros(h, w, dtype=torch.bool)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    corner = torch.zeros(h, w, dtype=torch.bool)
    corner[0, 0] = True
    all_but_one = torch.ones(h, w, dtype=torch.bool)
    all_but_one[h // 2, w // 3] = False
    return [
        torch.rand(h, w, generator=g) < 0.3,  # scattered
        torch.rand(h, w, generator=g) < 0.9,
        border,  # the image's edges, where neighbour weights are renormalized
        corner,
        _blob(h, w, 0.9, seed),  # one large region
        all_but_one,  # a single kept pixel
    ]


def _reference(x: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's NoisyLinearImputer without noise (mask: 1 = kept)."""
    return gradcam_road.NoisyLinearImputer(noise=0)(x, (~removed).float())


@pytest.mark.parametrize("h,w", [(7, 9), (16, 16), (13, 20)])
def test_imputation_equals_the_reference(h, w):
    x = torch.randn(6, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    masks = torch.stack(_masks(h, w, h + w))
    ours = linear_impute(x, masks)  # every mask of the stack solved at once
    for i in range(len(masks)):
        ref = _reference(x[i], masks[i])
        assert (ours[i] - ref).abs().max().item() <= 1e-5, i
        assert torch.equal(ours[i][:, ~masks[i]], x[i][:, ~masks[i]])  # kept pixels untouched
        assert not torch.allclose(ours[i][:, masks[i]], x[i][:, masks[i]])
    # one at a time: the same numbers as in the stack
    torch.testing.assert_close(linear_impute(x[4:5], masks[4:5]), ours[4:5], rtol=0, atol=1e-6)


def test_imputation_on_a_large_region_matches_scipy_in_float64():
    """90 % of a 128 × 128 image in one region (the slowest case for the solver): the
    imputed values are within 1e-6 of SciPy's direct solution of the reference's system."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    h = w = 128
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4 - 2
    m = _blob(h, w, 0.9, 5)
    a, b = gradcam_road.NoisyLinearImputer.setup_sparse_system(
        (~m).numpy().astype(np.float64), x[0].numpy(), gradcam_road.neighbors_weights
    )
    exact = spsolve(csc_matrix(a), b)  # (removed pixels, C)
    ours = linear_impute(x, m[None])[0].reshape(3, -1)[:, m.flatten()].T.numpy()
    assert np.abs(ours - exact).max() < 1e-6


def test_imputation_edge_cases():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    none = torch.zeros(2, 8, 8, dtype=torch.bool)
    assert torch.equal(linear_impute(x, none), x)
    full = none.clone()
    full[1] = True
    with pytest.raises(ImputationError, match="remove every pixel"):
        linear_impute(x, full)  # SciPy's spsolve would return NaN (singular matrix)
    # a constant image stays constant; noise lands on the removed pixels only
    const = torch.full((1, 3, 8, 8), 0.7)
    m = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    torch.testing.assert_close(linear_impute(const, m), const)
    # the float32 solver (used on mps) converges, within its documented error
    big = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 4 - 2
    region = _blob(64, 64, 0.9, 4)[None]
    f32 = linear_impute(big, region, dtype=torch.float32)
    assert (f32 - linear_impute(big, region)).abs().max().item() < 2e-4
    noise = 0.01 * torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out = noisy_linear_impute(const, m, noise)
    torch.testing.assert_close(out[:, :, m[0]], (const + noise)[:, :, m[0]])
    assert torch.equal(out[:, :, ~m[0]], const[:, :, ~m[0]])


# ---------------------------------------------------------------------------------------------
# the curves against pytorch-grad-cam's ROAD metrics
# ---------------------------------------------------------------------------------------------


class _Logits(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm.logits(x)


def test_curves_and_score_equal_pytorch_grad_cam(shapes, monkeypatch):
    """Both without noise. pytorch-grad-cam's ``percentile=p`` keeps the pixels below the
    p-th percentile of the cam (MoRF) or of ``1 − cam`` (LeRF); with a cam of distinct values
    this removes the same pixels as our fraction ``removed / HW``, which is computed from the
    reference's own thresholds here. The cam is the gradient map's ranking as exact binary
    fractions, so ``1 − cam`` has no ties either."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    two = shapes.select([0, 4])
    b, _, h, w = two.x.shape
    hw = h * w
    src = build_source("gradient", post=["abs"])
    ((v, smap),) = src.maps(two.model, two.x, two.targets).items()
    ranks = saliency_ranks(smap, tie_breaks(0, two.images, hw))
    cam = ((hw - ranks).to(torch.float32) / hw).reshape(b, h, w)  # most salient = 1
    cams = cam.numpy()
    percentiles = [90, 50, 20]
    removed_morf = [int((cams[0] >= np.percentile(cams[0], p)).sum()) for p in percentiles]
    removed_lerf = [int(((1 - cams[0]) >= np.percentile(1 - cams[0], p)).sum()) for p in percentiles]
    assert removed_morf == removed_lerf
    check = Road({"fractions": [n / hw for n in removed_morf], "noise": 0.0, "random_orders": 1, "chunk": 5})
    assert check._counts(hw) == sorted(removed_morf)
    meas = check.measure(two, src, {v: cam})[v]

    model = _Logits(two.model)
    targets = [ClassifierOutputTarget(int(t)) for t in two.targets]
    imputer = gradcam_road.NoisyLinearImputer(noise=0)
    for j, p in enumerate(percentiles):
        col = check.fractions.index(removed_morf[j] / hw)
        morf = PerturbationConfidenceMetric(RemoveMostRelevantFirst(p, imputer))(two.x, cams, targets, model)
        lerf = PerturbationConfidenceMetric(RemoveLeastRelevantFirst(p, imputer))(two.x, cams, targets, model)
        np.testing.assert_allclose(meas.curves["morf"][:, col], morf, rtol=1e-4, atol=1e-4, err_msg=str(p))
        np.testing.assert_allclose(meas.curves["lerf"][:, col], lerf, rtol=1e-4, atol=1e-4, err_msg=str(p))

    # the value is ROADCombined's score (its imputers made noise-free)
    class NoiseFree(gradcam_road.NoisyLinearImputer):
        def __init__(self) -> None:
            super().__init__(noise=0)

    monkeypatch.setattr(gradcam_road, "NoisyLinearImputer", NoiseFree)
    combined = gradcam_road.ROADCombined(percentiles=percentiles)(two.x, cams, targets, model)
    np.testing.assert_allclose(meas.values, combined, rtol=1e-4, atol=1e-4)
    # not a vacuous match: the outputs move, and differently for MoRF and LeRF
    assert (
        np.abs(meas.curves["morf"]).max() > 0.1
        and np.abs(meas.curves["morf"] - meas.curves["lerf"]).max() > 0.1
    )


# ---------------------------------------------------------------------------------------------
# controls, determinism, the model untouched
# ---------------------------------------------------------------------------------------------

FEW = {"fractions": [0.2, 0.5, 0.8]}


@pytest.fixture(scope="module")
def verdicts(shapes):
    check = Road(FEW)
    before = all_weights(shapes.model)
    cells = {}
    for name, posts in (("random", ["signed", "abs"]), ("fullgrad", None)):
        src = build_source(name, psi=["paper"], post=posts)
        for v, meas in check.measure(shapes, src, src.maps(shapes.model, shapes.x, shapes.targets)).items():
            cells[v.label] = (meas, check.judge(v, meas))
            print(v.label, cells[v.label][1].status, cells[v.label][1].message)
    assert all(torch.equal(a, b) for a, b in zip(before, all_weights(shapes.model)))
    return cells


def test_random_control_fails(verdicts):
    for label in ("random/signed", "random/abs"):
        meas, r = verdicts[label]
        assert r.status == "fail", (label, r.message)
        for part in ("morf_test", "lerf_test"):
            assert not meas.extra[part]["better"] and 0.2 <= meas.extra[part]["win_rate"] <= 0.8
    assert "no better than a random order on MoRF or LeRF" in verdicts["random/abs"][1].message


def test_an_informative_map_does_better(verdicts):
    meas, r = verdicts["fullgrad/paper"]
    assert r.value > max(verdicts[c][1].value for c in ("random/signed", "random/abs")) + 1.0
    assert meas.extra["morf_test"]["better"] and r.status in ("pass", "warn"), r.message
    assert r.n == len(PICK) and r.ci[0] <= r.value <= r.ci[1]
    lo, hi = meas.extra["morf_test"]["ci"]
    assert lo <= meas.extra["morf_test"]["mean"] <= hi and "95 % CI" in r.message
    assert set(r.series) >= {"morf", "lerf", "random", "morf_test", "lerf_test"}
    assert r.series["morf"]["x"] == FEW["fractions"]


def test_same_numbers_for_any_run_batch_split_and_chunk(shapes):
    src = build_source("gradient", post=["abs"])
    three = shapes.select([0, 3, 6])
    maps = src.maps(three.model, three.x, three.targets)
    params = {"fractions": [0.3, 0.7], "random_orders": 2}
    whole = Road(params).measure(three, src, maps)
    again = Road(params).measure(three, src, maps)
    split = Road({**params, "chunk": 3})
    parts = [
        split.measure(three.select(ix), src, {v: t[ix] for v, t in maps.items()}) for ix in ([0], [1, 2])
    ]
    for v in whole:
        assert whole[v].values == again[v].values
        parts[0][v].extend(parts[1][v])
        assert parts[0][v].images == whole[v].images
        np.testing.assert_allclose(parts[0][v].values, whole[v].values, rtol=1e-5, atol=1e-5)
        for k in whole[v].curves:
            np.testing.assert_allclose(parts[0][v].curves[k], whole[v].curves[k], rtol=1e-5, atol=1e-5)
    other = dataclasses.replace(three, seed=1)  # another seed: other noise and random orders
    assert not np.allclose(
        Road(params).measure(other, src, maps)[v].curves["random"], whole[v].curves["random"]
    )


def test_eager_model_unchanged_and_no_hooks(shapes):
    spec = importlib.util.spec_from_file_location("sample_archs", SAMPLES / "archs.py")
    archs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(archs)
    model = archs.ShapesVGG().eval()
    model.load_state_dict(torch.load(SAMPLES / "shapes_vgg.pt", weights_only=True))
    lm = wrap_module(model, input_size=(64, 64), mean=(0.5,) * 3, std=(0.5,) * 3)
    batch = dataclasses.replace(shapes.select([0, 1]), model=lm)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_counts(model)
    src = build_source("gradient", post=["abs"])
    out = Road({"fractions": [0.5], "random_orders": 1}).measure(
        batch, src, src.maps(lm, batch.x, batch.targets)
    )
    assert all(np.isfinite(m.values).all() for m in out.values())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert hook_counts(model) == hooks == 0 and not any(m.training for m in model.modules())


def test_parameters_are_validated_and_reduced():
    for bad in ({"fractions": [0.5, 1.0]}, {"noise": -0.1}, {"output": "softmax"}, {"random_orders": 0}):
        with pytest.raises(UsageError):
            Road(bad)
    road = Road()
    assert road.fractions == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    steps = road.reductions()
    assert [len(s["value"]) for s in steps] == [5, 3]
    assert Road({"fractions": steps[0]["value"]}).reductions()[0]["value"] == [0.1, 0.5, 0.9]
    assert road._counts(4) == [min(3, max(1, round(f * 4))) for f in road.fractions]  # never all pixels


def test_declared_cost_counts_the_imputation():
    """Every forward row of ROAD is one imputed image; the plan times them (Passes.impute)."""
    from saliaudit.cost import Calibration, CostContext, Passes, impute_seconds

    road = Road({"fractions": [0.2, 0.6], "random_orders": 3})
    ctx = CostContext(Passes(backward=1), variants=2, size=(8, 8))
    assert road.cost(ctx) == Passes(forward=8, impute=8)
    assert road.shared_cost(ctx) == Passes(forward=6, impute=6)
    seconds = impute_seconds((12, 10), rows=2, repeats=1)
    assert 0 < seconds < 5
    cal = Calibration(1, 0.01, 0.02, 0.0, 0, 0, 0, 0, impute_s=seconds)
    assert cal.seconds(road.cost(ctx)) == pytest.approx(8 * 0.01 + 8 * seconds)
    assert cal.floor(road.cost(ctx)) == pytest.approx(8 * 0.01)  # the floor is model passes only
    assert Road.imputes and (road.cost(ctx) + road.shared_cost(ctx)).impute == 14
