"""Sign flip (DeepLIFT digit flipping, generalized) on the sample digits model."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from saliaudit.checks.sign_flip import SignFlip, _parse_pairs, _resolve
from saliaudit.errors import UsageError
from saliaudit.methods import build_source
from saliaudit.result import _finite
from tests.checks_util import SAMPLES, all_weights, make_batch


@pytest.fixture(scope="module")
def digits():
    return make_batch(SAMPLES / "digits_cnn.pt2", SAMPLES / "images" / "digits", n=0)


@pytest.fixture(scope="module")
def sources(digits):
    out = {}
    for name in ("fullgrad", "gradient", "random"):
        src = build_source(name, psi=["paper", "signed", "abs"], post=["signed", "abs"])
        out[name] = (src, src.maps(digits.model, digits.x, digits.targets))
    return out


def test_pair_8_3_applies_to_images_predicted_8_only(digits, sources):
    check = SignFlip({"pairs": [["8", "3"]]})
    eights = [n for n, t in zip(digits.images, digits.targets.tolist()) if t == 8]
    assert len(eights) >= 3 and len(eights) < len(digits)
    before = all_weights(digits.model)
    numbers = {}
    for name in ("fullgrad", "gradient"):
        src, m = sources[name]
        for v, meas in check.measure(digits, src, m).items():
            r = check.judge(v, meas)
            assert meas.images == eights
            assert meas.extra["classes"] == [[8, 3]] * len(eights)
            assert list(meas.extra["pairs"]) == [{"from": 8, "to": 3, "from_name": "8", "to_name": "3"}]
            assert meas.extra["skipped_images"] == len(digits) - len(eights)
            assert all(np.isfinite(meas.values)) and np.isfinite(meas.curves["flip"]).all()
            assert np.isfinite(meas.curves["flip_random"]).all()
            assert any("skipped" in n for n in meas.notes)
            assert r.status in ("pass", "warn", "fail") and np.isfinite(r.value)
            json.dumps(_finite(asdict(r)), allow_nan=False)
            numbers[v.label] = (
                r.status,
                r.value,
                meas.extra["flip_test"]["win_rate"],
                meas.extra["flip_test"]["p_value"],
                np.nanmean(meas.curves["flip"]),
                np.nanmean(meas.curves["flip_random"]),
            )
    assert all(torch.equal(a, b) for a, b in zip(before, all_weights(digits.model)))
    for label, (status, value, win, p, flip, rnd) in numbers.items():
        print(
            f"8→3 {label:16s} {status:5s} advantage {value:+.3f} (Δ log-odds {flip:+.2f} vs random "
            f"{rnd:+.2f}) wins {win:.2f} p {p:.2g}"
        )
    # the random orders remove as many pixels as the map: variants that remove the same
    # numbers of pixels share the random curve (it does not depend on the method)


def test_runner_up_controls_fail_and_gradient_passes(digits, sources):
    check = SignFlip()
    src, m = sources["random"]
    for v, meas in check.measure(digits, src, m).items():
        r = check.judge(v, meas)
        print(f"runner-up {v.label}: {r.status} {r.value:+.3f}")
        assert r.status == "fail", r.message
        assert meas.extra["pairs"] == "runner-up"
        runner = digits.logits.topk(2, dim=1).indices[:, 1].tolist()
        assert [c for _, c in meas.extra["classes"]] == runner
    src, m = sources["gradient"]
    v = next(v for v in m if v.label == "gradient/signed")
    r = check.judge(v, check.measure(digits, src, {v: m[v]})[v])
    print(f"runner-up gradient/signed: {r.status} {r.value:+.3f}")
    assert r.status == "pass", r.message


def test_pair_without_matching_images_is_skipped(digits, sources):
    check = SignFlip({"pairs": "3:8"})
    four = digits.select([0, 1, 2, 3])  # all predicted 0
    src, m = sources["gradient"]
    out = check.measure(four, src, {v: t[:4] for v, t in m.items()})
    for v, meas in out.items():
        r = check.judge(v, meas)
        assert r.status == "skipped" and "3→8" in r.message and r.value is None


@pytest.mark.slow  # 4 s; test_check_perturbation.py keeps a batch-split test in the fast tier
def test_same_numbers_for_any_batch_split(digits, sources):
    src, m = sources["gradient"]
    idx = [0, 13, 33]
    three = digits.select(idx)
    sub = {v: t[idx] for v, t in m.items() if v.label == "gradient/signed"}
    whole = SignFlip().measure(three, src, sub)
    check = SignFlip({"chunk": 2})
    parts = [check.measure(three.select(ix), src, {v: t[ix] for v, t in sub.items()}) for ix in ([0, 1], [2])]
    for v in whole:
        parts[0][v].extend(parts[1][v])
        np.testing.assert_allclose(parts[0][v].values, whole[v].values, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(parts[0][v].curves["flip"], whole[v].curves["flip"], rtol=1e-5, atol=1e-5)


def test_flip_matches_a_direct_computation(digits, sources):
    """Δ at the largest fraction, recomputed by hand for one image."""
    src, m = sources["gradient"]
    i = 34  # a digit 8
    one = digits.select([i])
    v = next(v for v in m if v.label == "gradient/signed")
    check = SignFlip({"pairs": "8:3", "fractions": [0.2]})
    meas = check.measure(one, src, {v: m[v][i : i + 1]})[v]
    lm, x = digits.model, digits.x[i]
    d = m[v][i] - src.maps(lm, x[None], torch.tensor([3]))[v][0]
    ties = {
        p: r
        for r, p in enumerate(
            __import__("saliaudit.checks.removal", fromlist=["x"])
            .tie_breaks(0, [one.images[0]], 32 * 32)[0]
            .tolist()
        )
    }
    vals = d.reshape(-1).double().tolist()
    top = sorted(range(32 * 32), key=lambda p: (-vals[p], ties[p]))[: round(0.2 * 1024)]
    xt = x.clone()
    mean = x.mean((1, 2))
    for p in top:
        xt[:, p // 32, p % 32] = mean
    lo, lt = lm.logits(x[None])[0].double(), lm.logits(xt[None])[0].double()
    expected = float((lt[3] - lt[8]) - (lo[3] - lo[8]))
    assert meas.curves["flip"][0, 0] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_pairs_parsing_and_class_names():
    assert _parse_pairs(None) is None and _parse_pairs([]) is None
    assert _parse_pairs("8:3, cat:dog") == [("8", "3"), ("cat", "dog")]
    assert _parse_pairs([["8", "3"]]) == [("8", "3")] == _parse_pairs(["8:3"]) == _parse_pairs([[8, 3]])
    with pytest.raises(UsageError):
        _parse_pairs("8-3")
    names = ["cat", "dog", "3", "bird"]
    notes: list[str] = []
    assert _resolve("dog", names, 4, notes) == 1
    assert _resolve("0", names, 4, notes) == 0 and not notes
    assert _resolve("3", names, 4, notes) == 2 and "index 2" in notes[0]  # a name wins over an index
    with pytest.raises(UsageError, match="unknown class"):
        _resolve("horse", names, 4, notes)
    with pytest.raises(UsageError):
        _resolve("7", names, 4, notes)
    check = SignFlip({"pairs": "dog:cat"})
    assert check.pairs(type("M", (), {"class_names": names, "num_classes": 4})()) == [(1, 0)]
    with pytest.raises(UsageError):
        SignFlip({"pairs": "dog:1"}).pairs(type("M", (), {"class_names": names, "num_classes": 4})())


def test_only_pixels_with_a_positive_difference_are_removed_with_both_baselines(digits, sources):
    """DeepLIFT: the evidence for c over c′ is where map_c − map_c′ > 0; the budget is a cap.
    The primary removal value is the method's own reference (mean for the gradient, which has
    none) and the other value is reported beside it."""
    check = SignFlip({"fractions": [0.05, 0.5]})
    src, maps = sources["gradient"]
    out = check.measure(digits, src, maps)
    hw = digits.x.shape[2] * digits.x.shape[3]
    for v, meas in out.items():
        shares = meas.extra["removed_share"]
        assert all(0 <= s <= 0.5 + 1 / hw for s in shares)
        assert any(s < 0.5 - 1 / hw for s in shares), "some images have fewer positive pixels"
        r = check.judge(v, meas)
        assert r.series["baseline"] == "mean" and r.series["other"]["baseline"] == "black"
        assert f"with black removal: {r.series['other']['status'].upper()}" in r.message
        assert isinstance(r.series["baseline_dependent"], bool)
    rnd_src, rnd_maps = sources["random"]
    for v, meas in check.measure(digits, rnd_src, rnd_maps).items():
        # a model-independent map has the same map for c and c′: nothing to remove
        assert all(s == 0 for s in meas.extra["removed_share"])
        assert check.judge(v, meas).status == "fail"


def test_methods_with_a_reference_remove_to_it():
    check = SignFlip()
    deeplift = build_source("deeplift", post=["signed"])
    ig = build_source("integrated_gradients", post=["signed"], params={"baseline": "uniform-noise"})
    gxi = build_source("grad_x_input", post=["signed"])
    assert check.baselines(deeplift) == ("black", "mean")
    assert check.baselines(ig) == ("mean", "black")  # noise is no removal value
    assert check.baselines(gxi) == ("zero", "mean")
    assert SignFlip({"baseline": "blur", "other_baseline": "none"}).baselines(gxi) == ("blur", None)


def test_baseline_dependent_caveat():
    from saliaudit.result import CheckResult

    cell = CheckResult(
        "sign_flip",
        "gradient",
        None,
        "pass",
        0.5,
        "m",
        {},
        "",
        post="signed",
        series={
            "baseline": "mean",
            "baseline_dependent": True,
            "other": {"baseline": "black", "status": "fail"},
        },
    )
    same = CheckResult(
        "sign_flip",
        "gradient",
        None,
        "pass",
        0.5,
        "m",
        {},
        "",
        post="abs",
        series={
            "baseline": "mean",
            "baseline_dependent": False,
            "other": {"baseline": "black", "status": "pass"},
        },
    )
    (cav,) = SignFlip.caveats([cell, same], {})
    assert cav["kind"] == "baseline_dependent" and list(cav["numbers"]) == ["gradient/signed"]
    assert "1 of 2 maps" in cav["message"]
    assert "gradient/signed: PASS with mean, FAIL with black" in cav["message"]
