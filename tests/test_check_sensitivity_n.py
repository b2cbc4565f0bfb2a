"""Sensitivity-n (Ancona et al. 2018): linear-model exactness, controls, determinism, caching."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from saliaudit.checks.base import Batch, MapSource, Variant
from saliaudit.checks.sensitivity_n import SensitivityN, _pearson
from saliaudit.errors import UsageError
from saliaudit.methods import build_source
from saliaudit.model import wrap_module
from saliaudit.result import _finite
from tests.checks_util import SAMPLES, make_batch

SIZE = 16


def linear_batch(
    n: int = 4, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3), seed: int = 0, offset: float = 0.0
) -> Batch:
    """A linear classifier over flattened pixels and ``n`` random inputs (model space)."""
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 5)).eval()
    with torch.no_grad():
        lin[1].weight.copy_(torch.randn(lin[1].weight.shape, generator=gen))
        lin[1].bias.copy_(torch.randn(5, generator=gen))
    lm = wrap_module(lin, input_size=SIZE, mean=",".join(map(str, mean)), std=",".join(map(str, std)))
    x = torch.randn(n, 3, SIZE, SIZE, generator=gen) + offset
    logits = lm.logits(x)
    return Batch(
        lm, x, [f"img{i}.png" for i in range(n)], logits.argmax(1), logits, [None] * n, None, 0, 0, set()
    )


def measure(check, batch, name, posts=("signed", "abs")):
    src = build_source(name, psi=[], post=list(posts))
    out = check.measure(batch, src, src.maps(batch.model, batch.x, batch.targets))
    return {v.label: (m, check.judge(v, m)) for v, m in out.items()}


@pytest.mark.parametrize("features", ["patches", "pixels"])
def test_linear_model_grad_x_input_is_exact_at_every_n(features):
    """Ancona et al.: on a linear model gradient × input satisfies sensitivity-n (zero baseline)."""
    batch = linear_batch()
    cells = measure(SensitivityN({"features": features, "subsets": 30}), batch, "grad_x_input")
    m, r = cells["grad_x_input/signed"]
    assert m.curves["correlation"].shape == (4, len(m.axes["correlation"]))
    assert m.axes["correlation"][0] == 1 and len(m.axes["correlation"]) == 8
    np.testing.assert_allclose(m.curves["correlation"], 1.0, atol=1e-6)
    assert r.status == "pass" and r.value == pytest.approx(1.0, abs=1e-6)
    # the sign matters: |grad × input| does not add up to the output changes
    m_abs, _ = cells["grad_x_input/abs"]
    assert m_abs.curves["correlation"].mean() < 0.9
    json.dumps(_finite(asdict(r)), allow_nan=False)


def test_baseline_matters_on_the_linear_model():
    """Black = zero when the model has no normalization; the per-image mean is not the reference."""
    plain = linear_batch(mean=(0, 0, 0), std=(1, 1, 1), offset=2.0)
    m, _ = measure(SensitivityN({"baseline": "black", "subsets": 20}), plain, "grad_x_input", ["signed"])[
        "grad_x_input/signed"
    ]
    np.testing.assert_allclose(m.curves["correlation"], 1.0, atol=1e-6)
    m, _ = measure(SensitivityN({"baseline": "mean", "subsets": 20}), plain, "grad_x_input", ["signed"])[
        "grad_x_input/signed"
    ]
    assert m.curves["correlation"].mean() < 0.9


def test_random_control_is_noise_and_fails_as_the_reference():
    from saliaudit.checks.calibrate import calibrate

    batch = linear_batch(n=6, seed=1)
    check = SensitivityN({"subsets": 200})
    cells = measure(check, batch, "random")
    for label, (m, r) in cells.items():
        print(f"{label}: {r.value:+.3f} {np.round(np.mean(m.curves['correlation'], 0), 3)}")
        assert abs(r.value) < 0.1
    judged = [r for _, r in cells.values()]
    calibrate(judged, {"sensitivity_n": check})
    assert all(r.status == "fail" for r in judged), [r.message for r in judged]


def test_a_method_passes_only_when_significantly_above_the_random_control():
    """grad × input on a linear model tracks the output exactly; the random control does
    not: a PASS. Judged without a control on the same images, no PASS."""
    from saliaudit.checks.calibrate import calibrate

    batch = linear_batch(n=8, seed=2)
    check = SensitivityN({"subsets": 30})
    gxi = measure(check, batch, "grad_x_input", ["signed"])["grad_x_input/signed"][1]
    rnd = measure(check, batch, "random", ["signed"])["random/signed"][1]
    info = calibrate([gxi, rnd], {"sensitivity_n": check})
    assert info["tests"] == 1
    assert gxi.status == "pass" and gxi.controls["random"]["better"], gxi.message
    assert gxi.controls["random"]["n"] == 8 and gxi.controls["random"]["p_adjusted"] < 0.05
    assert len(gxi.series["per_image_curve"]) == 8
    alone = measure(check, batch, "grad_x_input", ["signed"])["grad_x_input/signed"][1]
    calibrate([alone], {"sensitivity_n": check})
    assert alone.status == "warn" and "no must-fail control" in alone.message


class ConstantSource(MapSource):
    method = "constant"
    model_independent = True

    def __init__(self, value: float = 0.0):
        self.value = value
        self.variants = [Variant("constant", post="signed", signed=True)]

    def maps(self, model, x, targets):
        return {self.variants[0]: torch.full((x.shape[0], *x.shape[2:]), self.value)}


@pytest.mark.parametrize("value", [0.0, 0.37])
def test_constant_map_correlation_is_zero_with_a_note(value):
    batch = linear_batch(n=2)
    check = SensitivityN({"subsets": 10})
    src = ConstantSource(value)
    v = src.variants[0]
    m = check.measure(batch, src, src.maps(batch.model, batch.x, batch.targets))[v]
    r = check.judge(v, m)
    # a constant map gives equal sums for equal-size subsets: undefined -> 0, never NaN
    assert np.all(m.curves["correlation"] == 0.0) and m.values == [0.0, 0.0]
    assert any("constant" in n for n in m.notes)
    assert r.value == 0.0 and "constant" in r.message
    from saliaudit.checks.calibrate import calibrate

    rnd = measure(check, batch, "random", ["signed"])["random/signed"][1]
    calibrate([r, rnd], {"sensitivity_n": check})
    assert r.status == "warn", r.message  # not above the random control


def test_pearson_edge_cases():
    assert _pearson(np.array([1.0, 2, 3]), np.array([2.0, 4, 6]))[0] == pytest.approx(1.0)
    assert _pearson(np.zeros(5), np.arange(5.0)) == (0.0, True, False)
    assert _pearson(np.arange(5.0), np.full(5, 3.0)) == (0.0, False, True)


@pytest.mark.slow  # 9 s
def test_output_changes_are_shared_by_methods_and_batch_split_invariant():
    digits = make_batch(SAMPLES / "digits_cnn.pt2", SAMPLES / "images" / "digits", n=0).select([0, 9, 21])
    params = {"subsets": 12, "points": 4}
    calls: list[int] = []
    lm = digits.model
    original = lm.logits

    def counting(x):
        calls.append(x.shape[0])
        return original(x)

    check = SensitivityN({**params, "chunk": 16})
    srcs = {n: build_source(n, psi=[], post=["signed", "abs"]) for n in ("gradient", "grad_x_input")}
    maps = {n: s.maps(lm, digits.x, digits.targets) for n, s in srcs.items()}
    lm.logits = counting
    try:
        first = {
            v.label: (m, None) for v, m in check.measure(digits, srcs["gradient"], maps["gradient"]).items()
        }
        n_first = sum(calls)
        second = {
            v.label: (m, None)
            for v, m in check.measure(digits, srcs["grad_x_input"], maps["grad_x_input"]).items()
        }
        assert sum(calls) == n_first == 3 * 4 * 12  # the second method reuses the output changes
    finally:
        del lm.logits
    whole = first["gradient/signed"][0]
    split = SensitivityN({**params, "chunk": 5})
    a = measure(split, digits.select([0]), "gradient")["gradient/signed"][0]
    b = measure(split, digits.select([1, 2]), "gradient")["gradient/signed"][0]
    a.extend(b)
    assert a.images == whole.images
    np.testing.assert_allclose(a.curves["correlation"], whole.curves["correlation"], atol=1e-4)
    assert np.isfinite(second["grad_x_input/signed"][0].curves["correlation"]).all()
    # 32x32 digits: patch 2 px -> 16 x 16 = 256 features
    assert whole.extra["n_features"] == 256 and whole.extra["patch"] == 2


def test_layout_sizes_and_subsets():
    check = SensitivityN({"patch": 3})
    pid, n, p = check.layout(20, 20)
    assert (n, p) == (49, 3) and pid.max().item() == 48 and pid[20 * 19 + 19].item() == 48
    pid, n, p = SensitivityN().layout(64, 64)
    assert (n, p) == (256, 4)
    assert SensitivityN().sizes(256) == [1, 2, 5, 10, 21, 45, 95, 204]
    assert SensitivityN().sizes(3) == [1, 2]
    sub = check.subsets(0, "a.png", 49, 7)
    assert sub.shape == (100, 49) and (sub.sum(1) == 7).all()
    assert torch.equal(sub, check.subsets(0, "a.png", 49, 7))
    assert not torch.equal(sub, check.subsets(0, "b.png", 49, 7))
    with pytest.raises(UsageError):
        SensitivityN({"features": "superpixels"})
    with pytest.raises(UsageError):
        SensitivityN({"max_fraction": 1.5})
