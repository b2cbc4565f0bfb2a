"""Pixel perturbation (LeRF/MoRF) and the shared removal helpers (saliaudit.checks.removal)."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from saliaudit.checks import removal as R
from saliaudit.checks.base import MapSource, Variant
from saliaudit.checks.perturbation import Perturbation
from saliaudit.errors import UsageError
from saliaudit.methods import build_source
from saliaudit.result import _finite
from tests.checks_util import all_weights, make_batch

# 3 images per class of the sample shapes model (circle, cross, square, triangle)
PICK = [0, 1, 2, 6, 7, 8, 12, 13, 14, 18, 19, 20]


@pytest.fixture(scope="module")
def shapes():
    return make_batch(n=24).select(PICK)


@pytest.fixture(scope="module")
def maps(shapes):
    out = {}
    for name in ("fullgrad", "gradient", "gradcam", "random", "edge"):
        # gradcam and edge maps are ≥ 0 (signed = abs); the report numbers of every variant on
        # all 24 images come from the same code (see the engineer's report)
        posts = ["signed", "abs"] if name == "random" else ["abs"]
        src = build_source(name, psi=["paper"], post=posts)
        out[name] = (src, src.maps(shapes.model, shapes.x, shapes.targets))
    return out


@pytest.fixture(scope="module")
def check():
    """One instance with the default parameters (its random-order outputs are cached)."""
    return Perturbation()


@pytest.fixture(scope="module")
def default_results(shapes, maps, check):
    """Default parameters (mean-colour removal, logit), every variant of every source."""
    before = all_weights(shapes.model)
    cells = {}
    for src, m in maps.values():
        for v, meas in check.measure(shapes, src, m).items():
            cells[v.label] = (meas, check.judge(v, meas))
    after = all_weights(shapes.model)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "the model was modified"
    for label, (meas, r) in cells.items():
        lt, mt = meas.extra["lerf_test"], meas.extra["morf_test"]
        print(
            f"{label:16s} {r.status:5s} value {r.value:+.3f}  LeRF adv {lt['mean']:+.3f} "
            f"win {lt['win_rate']:.2f} p {lt['p_value']:.2g}  MoRF adv {mt['mean']:+.3f} "
            f"win {mt['win_rate']:.2f} p {mt['p_value']:.2g}"
        )
    return cells


def test_random_control_is_no_better_than_random(default_results):
    for label in ("random/signed", "random/abs"):
        meas, r = default_results[label]
        assert r.status == "fail", (label, r.message)
        # a random map beats about half of the random orders; its advantage is ~0 (gradcam: > 0.2)
        for test in (meas.extra["lerf_test"], meas.extra["morf_test"]):
            assert abs(test["mean"]) < 0.12 and 0.3 <= test["win_rate"] <= 0.7, test
    assert default_results["gradcam/abs"][1].value > 0.2


def test_edge_control_does_not_pass(default_results):
    for label in ("edge/abs",):
        assert default_results[label][1].status == "fail", default_results[label][1].message


def test_informative_maps_beat_random(default_results):
    """gradcam beats random on both; gradient (abs) on LeRF (numbers printed above)."""
    assert default_results["gradcam/abs"][1].status == "pass"
    assert default_results["gradient/abs"][0].extra["lerf_test"]["better"]


def test_result_is_json_ready(default_results):
    _, r = default_results["fullgrad/paper"]
    doc = json.loads(json.dumps(_finite(asdict(r)), allow_nan=False))
    assert doc["status"] in ("pass", "warn", "fail")
    assert set(doc["series"]) >= {"lerf", "lerf_random", "morf", "morf_random", "lerf_test", "morf_test"}
    assert doc["series"]["lerf"]["x"] == Perturbation.params["fractions"]
    assert doc["params"]["baseline"] == "mean"
    assert len(doc["per_image"]) == len(PICK)


def test_lerf_with_blur_baseline(shapes, maps):
    """FullGrad (paper ψ) and gradient (abs) LeRF beat random with a blur fill (8 images)."""
    check = Perturbation({"baseline": "blur"})
    eight = shapes.select(list(range(0, 12, 3)) + list(range(1, 12, 3)))
    for name, label in (("fullgrad", "fullgrad/paper"), ("gradient", "gradient/abs")):
        src, m = maps[name]
        v = next(v for v in m if v.label == label)
        meas = check.measure(eight, src, {v: m[v][list(range(0, 12, 3)) + list(range(1, 12, 3))]})[v]
        r = check.judge(v, meas)
        lt = meas.extra["lerf_test"]
        print(
            f"blur {label}: LeRF adv {lt['mean']:+.3f} win {lt['win_rate']:.2f} p {lt['p_value']:.2g}; {r.message}"
        )
        assert lt["better"], r.message


def textbook(lm, x, target, smap, base, fractions, random_orders, output="logit"):
    """Slow reference: sort the pixels, remove k% one fraction at a time, call the model."""
    c, h, w = x.shape
    hw = h * w
    ties = R.tie_breaks(0, ["img"], hw)[0].tolist()
    tie_pos = {p: i for i, p in enumerate(ties)}
    vals = smap.reshape(-1).double().tolist()
    order = sorted(range(hw), key=lambda p: (-vals[p], tie_pos[p]))  # most salient first

    def f(img):
        with torch.no_grad():
            return float(lm.logits(img[None])[0, target])

    f0 = f(x)

    def removed(pixels):
        out = x.clone()
        for p in pixels:
            out[:, p // w, p % w] = base[:, p // w, p % w]
        return out

    lerf, morf, lr, mr = [], [], [], []
    rand_orders = [
        sorted(range(hw), key=lambda p, r=r: int(r[p])) for r in R.random_ranks(0, "img", hw, random_orders)
    ]
    for k in fractions:
        n = max(1, round(k * hw))
        lerf.append(abs(f(removed(order[hw - n :])) - f0) / abs(f0))
        morf.append((f0 - f(removed(order[:n]))) / abs(f0))
        outs = [f(removed(o[:n])) for o in rand_orders]
        lr.append(np.mean([abs(o - f0) / abs(f0) for o in outs]))
        mr.append(np.mean([(f0 - o) / abs(f0) for o in outs]))
    return {"lerf": lerf, "morf": morf, "lerf_random": lr, "morf_random": mr}


def test_textbook_reimplementation(shapes, maps):
    one = shapes.select([2])
    one.images = ["img"]
    src, m = maps["gradient"]
    v = next(v for v in m if v.label == "gradient/abs")
    check = Perturbation({"chunk": 7})
    meas = check.measure(one, src, {v: m[v][2:3]})[v]
    base = R.removal_baseline(one.model, one.x, "mean")[0]
    ref = textbook(one.model, one.x[0], int(one.targets[0]), m[v][2], base, check.fractions, 3)
    for key, curve in ref.items():
        np.testing.assert_allclose(meas.curves[key][0], curve, rtol=1e-4, atol=1e-5, err_msg=key)
    lerf_adv = np.mean(np.array(ref["lerf_random"]) - ref["lerf"])
    morf_adv = np.mean(np.array(ref["morf"]) - ref["morf_random"])
    assert meas.values[0] == pytest.approx((lerf_adv + morf_adv) / 2, rel=1e-4, abs=1e-6)


def test_same_numbers_for_any_batch_split(shapes, maps):
    src, m = maps["gradient"]
    three = shapes.select([0, 4, 8])
    sub = {v: t[[0, 4, 8]] for v, t in m.items() if v.label == "gradient/abs"}
    whole = Perturbation().measure(three, src, sub)
    check = Perturbation({"chunk": 4})
    parts = [check.measure(three.select(ix), src, {v: t[ix] for v, t in sub.items()}) for ix in ([0], [1, 2])]
    for v in whole:
        parts[0][v].extend(parts[1][v])
        assert parts[0][v].images == whole[v].images
        np.testing.assert_allclose(parts[0][v].values, whole[v].values, rtol=1e-5, atol=1e-6)
        for k in whole[v].curves:
            np.testing.assert_allclose(parts[0][v].curves[k], whole[v].curves[k], rtol=1e-5, atol=1e-6)
        assert parts[0][v].extra["lerf_win_rate"] == whole[v].extra["lerf_win_rate"]


class ConstantSource(MapSource):
    method = "constant"
    model_independent = True

    def __init__(self):
        self.variants = [Variant("constant", post="signed", signed=True)]

    def maps(self, model, x, targets):
        return {self.variants[0]: torch.zeros(x.shape[0], *x.shape[2:], device=x.device)}


def test_constant_map_ranks_like_a_random_order(shapes, check):
    """All-zero maps: ties broken by the seeded permutation, not by raster order."""
    src = ConstantSource()
    meas = check.measure(shapes, src, src.maps(shapes.model, shapes.x, shapes.targets))[src.variants[0]]
    r = check.judge(src.variants[0], meas)
    assert r.status == "fail", r.message
    assert abs(meas.extra["lerf_test"]["mean"]) < 0.1 and abs(meas.extra["morf_test"]["mean"]) < 0.1


# ---------------------------------------------------------------------------------------------
# removal helpers
# ---------------------------------------------------------------------------------------------


def test_baselines(shapes):
    x = shapes.x[:2]
    black = R.removal_baseline(shapes.model, x, "black")
    assert torch.allclose(black, torch.full_like(x, (0 - 0.5) / 0.5))  # the model's mean/std = 0.5
    assert torch.equal(R.removal_baseline(shapes.model, x, "zero"), torch.zeros_like(x))
    mean = R.removal_baseline(shapes.model, x, "mean")
    assert torch.allclose(mean[:, :, 5, 7], x.mean((2, 3)))
    blur = R.removal_baseline(shapes.model, x, "blur", sigma=2.0)
    assert blur.shape == x.shape and not torch.allclose(blur, x)
    assert (blur.std((2, 3)) < x.std((2, 3))).all()
    with pytest.raises(UsageError):
        R.removal_baseline(shapes.model, x, "white")
    with pytest.raises(UsageError):
        R.removal_baseline(shapes.model, x, "blur", sigma=0)


def test_ranks_and_masks():
    smap = torch.tensor([[[0.5, -2.0], [3.0, 0.5]]])
    ties = torch.tensor([[3, 2, 1, 0]])
    ranks = R.saliency_ranks(smap, ties)[0]
    # most salient first: 3.0 (pixel 2), then the tied 0.5s in tie order (pixel 3 before 0), then -2.0
    assert ranks.tolist() == [2, 3, 0, 1]
    most = R.prefix_masks(ranks, [1, 3])
    least = R.prefix_masks(ranks, [1, 3], least=True)
    assert most.tolist() == [[False, False, True, False], [True, False, True, True]]
    assert least.tolist() == [[False, True, False, False], [True, True, False, True]]
    nan_map = torch.tensor([[[float("nan"), 1.0], [0.0, 2.0]]])
    assert R.saliency_ranks(nan_map, ties)[0].tolist()[0] == 3  # NaN is least salient
    assert R.fraction_counts([0.0001, 0.5, 1.0], 100) == [1, 50, 100]
    assert R.fraction_counts([0.01, 0.02], 64 * 64) == [41, 82]


def test_seeds_depend_on_image_not_batch():
    a = R.random_ranks(0, "a.png", 50, 2)
    assert torch.equal(a, R.random_ranks(0, "a.png", 50, 2))
    assert not torch.equal(a, R.random_ranks(0, "b.png", 50, 2))
    assert not torch.equal(a, R.random_ranks(1, "a.png", 50, 2))
    assert sorted(a[0].tolist()) == list(range(50))
    t = R.tie_breaks(0, ["a.png", "b.png"], 50)
    assert torch.equal(t[1], R.tie_breaks(0, ["b.png"], 50)[0])


def test_run_removals_chunks(shapes):
    x = shapes.x[:2]
    base = R.removal_baseline(shapes.model, x, "black")
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(7, 64 * 64, generator=g) < 0.3
    jobs = [R.Job(0, masks), R.Job(1, lambda: masks[:3], [2, 0])]
    a = R.run_removals(shapes.model, x, base, jobs, chunk=4)
    b = R.run_removals(shapes.model, x, base, jobs, chunk=100)
    assert a[0].shape == (7, 4) and a[1].shape == (3, 2)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    ref = torch.where(masks[4].view(1, 64, 64), base[0], x[0])
    torch.testing.assert_close(a[0][4], shapes.model.logits(ref[None])[0], rtol=1e-5, atol=1e-5)


def test_rank_test_is_exact_and_calibrated():
    assert R.rank_test([1, 1, 1, 1], 3) == pytest.approx(4.0**-4)
    assert R.rank_test([1], 3) == pytest.approx(0.25)
    assert R.rank_test([0] * 5, 3) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    null = [R.rank_test(rng.integers(0, 4, 12) / 3, 3) for _ in range(2000)]
    assert np.mean(np.array(null) < 0.05) <= 0.06
    big = [R.rank_test(rng.integers(0, 4, 800) / 3, 3) for _ in range(300)]
    assert np.mean(np.array(big) < 0.05) <= 0.09


def test_win_rate_removes_the_mean_of_draws_bias():
    """A single draw of a skewed score vs the mean of 3: biased; the win rate is not."""
    rng = np.random.default_rng(1)
    scores = -rng.lognormal(0, 1.5, size=(4000, 4))  # higher = better, skewed
    mine, draws = scores[:, 0], scores[:, 1:]
    assert np.mean(mine - draws.mean(1) > 0) > 0.55  # the median advantage is biased
    assert R.win_rates(mine, draws).mean() == pytest.approx(0.5, abs=0.02)


def test_parameters_are_validated():
    with pytest.raises(UsageError):
        Perturbation({"baseline": "white"})
    with pytest.raises(UsageError):
        Perturbation({"output": "softmax"})
    with pytest.raises(UsageError):
        Perturbation({"fractions": [0, 0.5]})
    with pytest.raises(UsageError):
        Perturbation({"random_orders": 0})
    assert Perturbation({"fractions": [0.2, 0.1, 0.1]}).fractions == [0.1, 0.2]
