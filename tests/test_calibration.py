"""Verdicts from intervals and from paired tests against the controls, under nulls and
alternatives: false PASS verdicts stay near the nominal level, real differences are found."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest

from saliaudit.checks.base import Check, Measurement
from saliaudit.checks.calibrate import calibrate
from saliaudit.maps import Variant
from saliaudit.result import CheckResult
from saliaudit.stats import ALPHA


class _Similarity(Check):
    """A lower-is-better similarity judged by its interval, like class sensitivity."""

    name = "toy_similarity"
    metric = "similarity"
    thresholds: ClassVar = {"fail": 0.7, "warn": 0.4}
    interval_verdict = True
    value_range = (-1.0, 1.0)
    controls_must_fail = frozenset({"random"})

    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        value = m.mean()
        status = "fail" if value >= 0.7 else "warn" if value >= 0.4 else "pass"
        return self.result(variant, m, status, value, f"similarity {value:.2f}")


def _judge(values, method: str = "m", post: str = "abs") -> CheckResult:
    m = Measurement(values=list(values), images=[f"img{i}" for i in range(len(values))])
    return _Similarity().judge(Variant(method, post=post), m)


def test_every_judged_cell_has_n_and_an_interval_that_holds_its_value():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 30):
        cell = _judge(rng.uniform(-0.2, 0.9, n))
        assert cell.n == n and cell.ci is not None
        assert cell.ci[0] <= cell.value <= cell.ci[1]
        assert cell.ci_method
    single = _judge([0.1])
    assert single.status == "warn" and single.inconclusive and single.ci == [-1.0, 1.0]
    assert "inconclusive: n = 1" in single.message


def test_interval_verdicts_at_the_threshold_rarely_pass():
    """True mean exactly at the warn threshold: a PASS is a false claim. The share of PASS
    verdicts over many samples stays at most α/2 (one side of a 95 % interval) plus error."""
    rng = np.random.default_rng(1)
    trials, passes, inconclusive = 200, 0, 0
    for _ in range(trials):
        cell = _judge(np.clip(rng.normal(0.4, 0.15, 20), -1, 1))
        passes += cell.status == "pass"
        inconclusive += cell.inconclusive
    bound = ALPHA / 2 + 3 * math.sqrt(ALPHA / 2 * (1 - ALPHA / 2) / trials) + 0.02
    assert passes / trials <= bound, passes
    assert inconclusive / trials > 0.8  # most samples cannot tell


def test_clear_effects_are_decided_and_inconclusive_ones_say_how_many_images():
    rng = np.random.default_rng(2)
    assert _judge(rng.normal(0.1, 0.05, 20)).status == "pass"
    assert _judge(rng.normal(0.9, 0.05, 20)).status == "fail"
    mid = _judge(rng.normal(0.38, 0.2, 6))
    assert mid.status == "warn" and mid.inconclusive and mid.images_needed > 6
    assert f"about {mid.images_needed} images" in mid.message


def _cells(method_values, control_values, method_status="pass") -> list[CheckResult]:
    a = _judge(method_values, "m")
    a.status = method_status
    c = _judge(control_values, "random")
    c.control = "expected"
    return [a, c]


def test_a_method_no_better_than_the_control_cannot_pass():
    """Null: the method's per-image values come from the control's distribution. Over 40
    seeds, the share that keeps its PASS is at most α plus sampling error."""
    checks = {"toy_similarity": _Similarity()}
    kept = 0
    seeds = 40
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        control = rng.uniform(0.0, 0.6, 16)
        method = rng.uniform(0.0, 0.6, 16)
        cells = _cells(method, control)
        info = calibrate(cells, checks)
        assert info["tests"] == 1 and "Wilcoxon" in info["test"]
        kept += cells[0].status == "pass"
        result = cells[0].controls["random"]
        assert result["n"] == 16 and 0 <= result["p"] <= 1 and result["p_adjusted"] >= result["p"]
    assert kept / seeds <= ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / seeds)


def test_a_method_clearly_better_than_the_control_keeps_its_pass():
    rng = np.random.default_rng(3)
    cells = _cells(rng.uniform(0.0, 0.2, 16), rng.uniform(0.8, 1.0, 16))
    calibrate(cells, {"toy_similarity": _Similarity()})
    assert cells[0].status == "pass" and cells[0].controls["random"]["better"]
    assert cells[0].controls["random"]["partner"] == "random/abs"


def test_a_pass_without_a_testable_control_comparison_is_downgraded():
    cells = _cells([0.1], [0.9])  # one shared image: no paired test possible
    calibrate(cells, {"toy_similarity": _Similarity()})
    assert cells[0].status == "warn" and "not testable" in cells[0].message


@pytest.mark.parametrize("status", ["warn", "fail"])
def test_calibration_never_upgrades(status):
    rng = np.random.default_rng(4)
    cells = _cells(rng.uniform(0.0, 0.2, 16), rng.uniform(0.8, 1.0, 16), method_status=status)
    calibrate(cells, {"toy_similarity": _Similarity()})
    assert cells[0].status == status


def test_completeness_of_the_other_methods_is_reported(tmp_path):
    """Summation-to-delta per image for the methods with a reference input, informational:
    in results.json and in the report's completeness section."""
    from pathlib import Path

    import saliaudit

    root = Path(__file__).resolve().parents[1] / "sample_models"
    result = saliaudit.audit(
        root / "shapes_vgg.pt2",
        root / "images" / "shapes",
        methods=["integrated_gradients", "deeplift", "grad_x_input", "gradient"],
        checks=["class_sensitivity"],
        max_images=4,
        check_params={"class_sensitivity": {"figure_images": 0}},
    )
    rows = result.attribution_completeness
    assert {r["method"] for r in rows} == {"integrated_gradients", "deeplift", "grad_x_input"}
    assert len(rows) == 12
    for r in rows:
        assert r["delta"] == pytest.approx(r["total"] - r["expected"])
        assert r["relative_delta"] == pytest.approx(abs(r["delta"]) / max(abs(r["expected"]), 1e-6))
    ig = [r["relative_delta"] for r in rows if r["method"] == "integrated_gradients"]
    assert max(ig) < 0.2 and all(r["reference"] == "black" for r in rows if r["method"] != "grad_x_input")
    files = saliaudit.render(result, tmp_path / "out", formats=["html"])
    html = files[0].read_text(encoding="utf-8")
    assert "Summation to delta of the other methods" in html and "integrated_gradients" in html


@pytest.mark.slow
def test_null_maps_rarely_pass_pixel_perturbation_over_40_seeds():
    """A true null end to end: maps that are noise (independent of the model, seeded by the
    seed and the image) judged by the perturbation check and calibrated against the random
    control on the same images. Over 40 seeds the share of PASS verdicts stays at most α plus
    sampling error."""
    import dataclasses

    import torch

    from saliaudit.checks import get_check
    from saliaudit.maps import MapSource
    from saliaudit.methods import build_source
    from tests.checks_util import SAMPLES, make_batch

    batch = make_batch(SAMPLES / "digits_cnn.pt2", SAMPLES / "images" / "digits", n=12)

    class Noise(MapSource):
        method = "null_noise"

        def __init__(self, seed: int):
            self.seed = seed
            self.variants = [Variant("null_noise", post="abs")]

        def maps(self, model, x, targets):
            gen = torch.Generator().manual_seed(self.seed)
            return {self.variants[0]: torch.rand(x.shape[0], *x.shape[2:], generator=gen)}

    control = build_source("random", post=["abs"])
    passes = 0
    seeds = 40
    for seed in range(seeds):
        check = get_check("perturbation")(params={"random_orders": 3})
        b = dataclasses.replace(batch, seed=seed)
        src = Noise(seed)
        cells = []
        for source in (src, control):
            maps = source.maps(b.model, b.x, b.targets)
            for v, m in check.measure(b, source, maps).items():
                cells.append(check.judge(v, m))
        calibrate(cells, {"perturbation": check})
        passes += cells[0].status == "pass"
    assert passes / seeds <= ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / seeds), passes
