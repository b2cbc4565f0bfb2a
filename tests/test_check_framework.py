"""The check framework: runner (errors, skips, OOM halving), settings, caveats, figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saliaudit.caveats import AbsDiscards, compute_caveats
from saliaudit.checks import CHECKS, check_names, get_check
from saliaudit.checks.base import Check, Measurement, Variant, small_map
from saliaudit.checks.runner import CheckRunner, oom_split
from saliaudit.cli import app
from saliaudit.config import resolve_config
from saliaudit.errors import UsageError
from saliaudit.figures import choose_examples
from saliaudit.maps import decode_map
from saliaudit.methods import build_source
from saliaudit.result import CheckResult

from .checks_util import make_batch


class _Probe(Check):
    """A test check: value = mean |map| per image; records the batch sizes it saw."""

    name = "probe"
    metric = "mean |map|"
    thresholds = {"fail": 1e9}
    params = {"max_images": None}

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.sizes: list[int] = []

    def measure(self, batch, source, maps):
        self.sizes.append(len(batch))
        return {
            v: Measurement(values=[float(x) for x in m.abs().mean((1, 2))], images=list(batch.images))
            for v, m in maps.items()
        }

    def judge(self, variant, m):
        return self.result(variant, m, "pass", m.mean(), f"{len(m.values)} images")


@pytest.fixture
def probe():
    CHECKS["probe"] = _Probe
    yield _Probe
    CHECKS.pop("probe", None)


@pytest.fixture(scope="module")
def batch():
    return make_batch(n=6)


def test_oom_split_halves_and_merges(batch):
    calls = []

    def fn(b, maps):
        calls.append(len(b))
        if len(b) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return list(b.images)

    out = oom_split(fn, batch, {}, lambda a, b: a + b)
    assert out == batch.images  # every image, in order
    assert calls[0] == 6 and max(calls[1:]) <= 3 and min(calls) >= 1


def test_oom_split_reraises_for_one_image_and_passes_other_errors(batch):
    def always(b, maps):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        oom_split(always, batch, {}, lambda a, b: a + b)

    def bug(b, maps):
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        oom_split(bug, batch, {}, lambda a, b: a + b)


def test_runner_oom_in_measure_gives_same_numbers(probe, batch):
    source = build_source("gradient", psi=[], post=["abs"])
    maps = source.maps(batch.model, batch.x, batch.targets)
    plain = CheckRunner(["probe"], {}, {}, False)
    plain.run(batch, source, maps)

    class Tight(_Probe):
        def measure(self, b, s, m):
            if len(b) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super().measure(b, s, m)

    CHECKS["probe"] = Tight
    tight = CheckRunner(["probe"], {}, {}, False)
    tight.run(batch, source, maps)
    assert tight.oom_retries > 0
    a, b = plain.results()[0], tight.results()[0]
    assert b.status == "pass" and a.per_image == b.per_image


def test_runner_error_is_contained_to_its_cell(probe, batch):
    class Fragile(_Probe):
        def measure(self, b, s, m):
            if s.method == "gradient":
                raise RuntimeError("boom")
            return super().measure(b, s, m)

    CHECKS["probe"] = Fragile
    runner = CheckRunner(["probe", "completeness"], {}, {}, False)
    for name in ("fullgrad", "gradient"):
        source = build_source(name, psi=["paper", "signed"], post=["signed", "abs"])
        runner.run(batch, source, source.maps(batch.model, batch.x, batch.targets))
    cells = {(c.check, c.variant): c for c in runner.results()}
    assert cells[("probe", "gradient/signed")].status == "error"
    assert "RuntimeError: boom" in cells[("probe", "gradient/abs")].message
    assert cells[("probe", "fullgrad/paper")].status == "pass"
    assert cells[("completeness", "fullgrad")].status == "pass"
    assert ("completeness", "gradient") not in cells  # FullGrad-only: no cell for other methods


def test_runner_max_images_and_skips(probe, batch):
    runner = CheckRunner(
        ["probe", "pointing_game"] if "pointing_game" in check_names() else ["probe"],
        {},
        {"probe": {"max_images": 4}},
        False,
    )
    source = build_source("gradient", psi=[], post=["signed"])
    for half in ([0, 1, 2], [3, 4, 5]):
        sub = batch.select(half)
        runner.run(sub, source, source.maps(sub.model, sub.x, sub.targets))
        runner.end_batch(sub)
    cells = runner.results()
    probe_cell = next(c for c in cells if c.check == "probe")
    assert len(probe_cell.per_image) == 4  # 3 from the first batch, 1 from the second
    for c in cells:
        if c.check == "pointing_game":
            assert c.status == "skipped" and "--masks" in c.message


def test_thresholds_and_params_from_flags_env_and_file(tmp_path):
    cfg = resolve_config(
        {
            "thresholds": ["completeness.fail=0.01"],
            "check_params": ["completeness.max_images=3"]
            if "max_images" in get_check("completeness").params
            else None,
        },
        environ={},
        cwd=tmp_path,
    )
    assert cfg.thresholds == {"completeness": {"fail": 0.01}}
    assert cfg.sources["thresholds"] == "flag"
    (tmp_path / "saliaudit.toml").write_text("[thresholds.completeness]\nfail = 0.5\n")
    cfg = resolve_config({}, environ={}, cwd=tmp_path)
    assert cfg.thresholds == {"completeness": {"fail": 0.5}}
    assert cfg.sources["thresholds"].startswith("config file")
    cfg = resolve_config({}, environ={"SALIAUDIT_THRESHOLDS": "completeness.fail=2e-3"}, cwd=tmp_path)
    assert cfg.thresholds == {"completeness": {"fail": 2e-3}}


@pytest.mark.parametrize(
    "bad, words",
    [
        ("nosuch.fail=1", "expected CHECK.NAME=VALUE"),
        ("completeness.nosuch=1", "has no threshold 'nosuch'"),
        ("completeness.fail=abc", "expected a number"),
        ("completeness", "expected CHECK.NAME=VALUE"),
    ],
)
def test_bad_threshold_is_a_usage_error(tmp_path, bad, words):
    with pytest.raises(UsageError, match="invalid --threshold") as err:
        resolve_config({"thresholds": [bad]}, environ={}, cwd=tmp_path)
    assert words in str(err.value)


def test_flip_pairs_parse(tmp_path):
    assert resolve_config({"flip": "8:3,cat:dog"}, environ={}, cwd=tmp_path).flip == [
        ["8", "3"],
        ["cat", "dog"],
    ]
    for bad in ("8", "8:8", "8:3:1", ":3"):
        with pytest.raises(UsageError, match="--flip"):
            resolve_config({"flip": bad}, environ={}, cwd=tmp_path)


def test_checks_command_lists_every_check():
    result = CliRunner().invoke(app, ["checks"])
    assert result.exit_code == 0, result.output
    for name in check_names():
        assert name in result.output
        for key in CHECKS[name].thresholds:
            assert f"{key}=" in result.output


def _cell(check, psi, status, value, method="fullgrad", per_image=None):
    cell = CheckResult(check, method, psi, status, value, "m", {}, "")
    if per_image is not None:
        cell.per_image = [{"image": f"i{k}", "value": v} for k, v in enumerate(per_image)]
    return cell


def test_caveat_when_psi_changes_the_verdict_with_a_significant_difference():
    rng = np.random.default_rng(0)
    paper = 0.81 + rng.normal(0, 0.03, 12)
    signed = 0.12 + rng.normal(0, 0.03, 12)
    cells = [
        _cell("class_sensitivity", "paper", "fail", float(paper.mean()), per_image=paper),
        _cell("class_sensitivity", "signed", "pass", float(signed.mean()), per_image=signed),
    ]
    kinds = {c["kind"]: c for c in compute_caveats(cells, None, {})}
    msg = kinds["psi_changes_verdict"]["message"]
    assert "PASS under signed (0.1" in msg and "FAIL under paper (0.8" in msg
    assert "95 % CI" in msg and kinds["psi_changes_verdict"]["numbers"]["n"] == 12
    best = kinds["choose_psi_by_metric"]
    assert best["numbers"]["best"] == "signed" and best["numbers"]["ci"][1] < 0
    same = [
        _cell("class_sensitivity", "paper", "pass", 0.2, per_image=[0.2] * 4),
        _cell("class_sensitivity", "signed", "pass", 0.1, per_image=[0.1] * 4),
    ]
    assert "psi_changes_verdict" not in {c["kind"] for c in compute_caveats(same, None, {})}


def test_no_psi_named_better_from_noise():
    """Differences such as −0.065 vs 0.003 on a few noisy images name no winner."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.0, 0.3, 6), rng.normal(0.0, 0.3, 6)
    cells = [
        _cell("class_sensitivity", "paper", "pass", float(a.mean()), per_image=a),
        _cell("class_sensitivity", "signed", "warn", float(b.mean()), per_image=b),
    ]
    kinds = {c["kind"]: c for c in compute_caveats(cells, None, {})}
    assert "choose_psi_by_metric" not in kinds and "psi_changes_verdict" not in kinds
    assert "no ψ of fullgrad is distinguishably better on these 6 images" in kinds["no_better_psi"]["message"]
    # bn_folding (signed is 1.0 by construction) is never compared across ψ
    fold = [
        _cell("bn_folding", "signed", "pass", 1.0, per_image=[1.0] * 6),
        _cell("bn_folding", "paper", "pass", 0.9, per_image=[0.9] * 6),
    ]
    assert not [c for c in compute_caveats(fold, None, {}) if "psi" in c["kind"]]


def test_caveat_resembles_edge_only_when_measured_so():
    cells = [_cell("randomization", None, "pass", 0.1, method="gradient")]
    cells[0].post = "abs"
    # the fully randomized model's value (the cell's value is the cascade mean)
    cells[0].series = {"verdict_metric": "spearman_abs", "final": {"spearman_abs": 0.1}}
    yes = compute_caveats(cells, None, {"gradient/abs": 0.6})
    no = compute_caveats(cells, None, {"gradient/abs": 0.05})
    assert [c["kind"] for c in yes] == ["resembles_edge"]
    assert yes[0]["numbers"] == {"edge_similarity": 0.6, "randomized_similarity": 0.1}
    assert no == []


def test_abs_discards_share_matches_a_direct_count(batch):
    from saliaudit.methods.fullgrad import full_gradients

    fg = full_gradients(batch.model, batch.x, batch.targets)
    acc = AbsDiscards()
    acc.add(fg)
    t = fg.input_term.double()
    direct = float((-t).clamp(min=0).sum() / t.abs().sum())
    assert acc.per_layer()["input (∇ₓf ⊙ x)"] == pytest.approx(direct, rel=1e-4)
    term = fg.spatial_terms[0]
    v = term.value.double()
    assert acc.per_layer()[term.name] == pytest.approx(
        float((-v).clamp(min=0).sum() / v.abs().sum()), rel=1e-4
    )
    assert 0 <= acc.total() <= 1


def test_small_map_and_examples_are_bounded_and_seeded():
    src = torch.arange(200 * 100, dtype=torch.float32).reshape(200, 100)
    src[0, 0] = float("nan")
    m = small_map(src)
    a = decode_map(m)
    assert a.shape == (48, 24) and m["shape"] == [48, 24]
    assert np.isfinite(a).all()
    ref = torch.nn.functional.interpolate(
        torch.nan_to_num(src).double()[None, None], size=(48, 24), mode="area"
    )
    assert np.allclose(a, ref[0, 0].numpy(), rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    # compact: under 3 characters a value, where decimal lists took about 9
    assert len(json.dumps(m)) < 3 * 48 * 24
    assert decode_map({**m, "f16": m["f16"][:-8]}) is None and decode_map({**m, "shape": [48, 0]}) is None
    assert decode_map(small_map(torch.zeros(4, 4))).tolist() == [[0.0] * 4] * 4
    names = [f"img{i}.png" for i in range(100)]
    assert choose_examples(names, 10, 1) == choose_examples(list(reversed(names)), 10, 1)
    assert choose_examples(names, 10, 1) != choose_examples(names, 10, 2)
    assert choose_examples(names[:5], 10, 0) == set(names[:5])


def test_variant_labels():
    assert Variant("fullgrad", psi="paper").label == "fullgrad/paper"
    assert Variant("gradcam", post="abs").label == "gradcam/abs"
    assert _cell("completeness", None, "pass", 0.0).variant == "fullgrad"


def test_caveat_survives_top_randomization():
    def cell(method, curve):
        c = CheckResult("randomization", method, None, "pass", curve[-1], "m", {"fail": 0.7}, "", post="abs")
        c.series = {
            "verdict_metric": "spearman_abs",
            "cascading_spearman_abs": {
                "x": [f"s{i}" for i in range(len(curve))],
                "mean": curve,
                "std": [0.0] * len(curve),
            },
        }
        return c

    gbp = cell("guided_backprop", [0.8, 0.86, 0.71, 0.61, 0.49, 0.15, 0.04])
    grad = cell("gradient", [0.86, 0.72, 0.46, 0.38, 0.29, 0.1, 0.05])
    found = [
        c
        for c in compute_caveats([gbp, grad, cell("random", [1.0] * 7)], None, {})
        if c["kind"] == "survives_top_randomization"
    ]
    assert [c["variant"] for c in found] == ["guided_backprop/abs"]
    assert found[0]["numbers"]["steps_kept"] == 3 and "until s3 is randomized" in found[0]["message"]


def test_measurement_extend_merges_figures():
    a = Measurement(values=[1.0], images=["a"], extra={"figures": {"a": 1}})
    a.extend(Measurement(values=[2.0], images=["b"], extra={"figures": {"b": 2}}))
    assert a.extra["figures"] == {"a": 1, "b": 2} and a.values == [1.0, 2.0]
