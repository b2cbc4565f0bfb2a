"""The audit's plan: declared passes against counted passes, the estimate against the measured
time, the budget, profiles and the rows per pass (saliaudit.cost, saliaudit.plan)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saliaudit.config import resolve_config
from saliaudit.cost import PassCounter, Passes, rows_limit, rows_per_pass
from saliaudit.engine import run_audit
from saliaudit.plan import MIN_IMAGES, PROFILES, parse_duration

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sample_models" / "shapes_vgg.pt2"
IMAGES = ROOT / "sample_models" / "images" / "shapes"


def _images(tmp_path: Path, n: int) -> Path:
    """``n`` sample images, in their class folders (round robin over the classes)."""
    classes = sorted(p for p in IMAGES.iterdir() if p.is_dir())
    files = [sorted(c.glob("*.png")) for c in classes]
    out = tmp_path / f"images{n}"
    for i in range(n):
        src = files[i % len(classes)][i // len(classes)]
        (out / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, out / src.parent.name / src.name)
    return out


def _audit(tmp_path: Path, images: Path, **flags):
    cfg = resolve_config(
        {"overlays": False, "format": "json", "force": True, **flags}, cwd=tmp_path, environ={}
    )
    return run_audit(MODEL, images, cfg, tmp_path / "out")


def test_passes_arithmetic_and_durations():
    p = Passes(forward=2, backward=1, compare=3) + 2 * Passes(maps=1, backward=1)
    assert p == Passes(forward=2, backward=3, compare=3, maps=2)
    assert Passes().empty and not Passes(maps=1).empty
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400 and parse_duration(90) == 90
    assert parse_duration("1.5h") == 5400 and parse_duration("45s") == 45
    for bad in ("", "ten minutes", "-5m", "0", "5x"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert set(PROFILES) == {"quick", "standard", "thorough"}
    assert PROFILES["thorough"] == {"checks": {}, "methods": {}}


def test_rows_per_pass_bounds_the_chunks_of_integrated_gradients():
    """IG's steps go through the model in chunks of the audit's rows per pass."""
    from saliaudit.methods import get_method

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 3)
    )
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    counter = PassCounter()
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, a: sizes.append(a[0].shape[0]))
    with counter.active(), rows_limit({"backward": 5, "forward": 7}):
        assert rows_per_pass() == 5 and rows_per_pass(kind="forward") == 7 and rows_per_pass(3) == 3
        get_method("integrated_gradients")(model, x, t, steps=8)
    assert max(sizes) == 5 and sum(sizes) == 16  # 8 steps × 2 images, at most 5 rows at a time
    assert counter.passes("other") == Passes(backward=16)
    # the counter's global hooks are gone afterwards, also after an exception
    from torch.nn.modules import module as mod

    with pytest.raises(RuntimeError), counter.active():
        raise RuntimeError("boom")
    assert not mod._global_forward_pre_hooks and not mod._global_forward_hooks


@pytest.fixture(scope="module")
def small_audit(tmp_path_factory):
    if not MODEL.is_file():
        pytest.skip("sample model not present")
    tmp = tmp_path_factory.mktemp("plan")
    images = _images(tmp, 8)
    result = _audit(
        tmp,
        images,
        methods=["gradient", "integrated_gradients", "smoothgrad", "random"],
        checks=[
            "class_sensitivity",
            "random_logit",
            "randomization",
            "perturbation",
            "sensitivity_n",
            "infidelity",
            "max_sensitivity",
            "input_invariance",
        ],
        method_params={"integrated_gradients": {"steps": 8}, "smoothgrad": {"samples": 4}},
        check_params={"randomization": {"max_images": 4}, "sensitivity_n": {"subsets": 20}},
    )
    return result


def test_declared_passes_are_the_passes_the_audit_runs(small_audit):
    """Every stage runs exactly the forward and forward+backward rows its method and check
    declare (counted by the audit's own pass counter, stored in results.json)."""
    plan = small_audit.plan
    stages = plan["stages"]
    assert {"predict", "method:gradient", "check:randomization", "check:sensitivity_n", "figures"} <= set(
        stages
    )
    for name, st in stages.items():
        planned, counted = st["passes"], st["counted"]
        assert (counted["forward"], counted["backward"]) == (planned["forward"], planned["backward"]), name
    assert stages["method:integrated_gradients"]["passes"]["backward"] == 8 * 8
    assert stages["check:randomization"]["images"] == 4
    assert not plan.get("unplanned_passes")  # nothing ran that the plan did not count


def test_plan_is_stored_with_estimate_floor_and_measured_time(small_audit):
    plan = small_audit.plan
    assert plan["profile"] == "standard" and plan["budget_s"] is None and plan["budgeted"] is False
    cal = plan["calibration"]
    assert cal["forward_s_per_row"] > 0 and cal["backward_s_per_row"] > 0 and cal["compare_s"] > 0
    for st in plan["stages"].values():
        if not st["passes"]["maps"]:  # map computations are estimated by their measured time
            assert st["floor_s"] <= st["estimated_s"] + 1e-9
        assert st["measured_s"] is None or st["measured_s"] >= 0
    assert plan["estimated_s"] > 0 and plan["measured_s"] > 0
    assert plan["ratio_to_estimate"] == pytest.approx(plan["measured_s"] / plan["estimated_s"], rel=1e-2)
    assert plan["estimated_peak_bytes"] > 0 and plan["peak_rss_bytes"] > 0


@pytest.mark.slow
def test_estimate_within_30_percent_of_the_measured_time_on_the_sample_model(tmp_path):
    """The plan printed before a default audit of the sample model is within ±30 % of the time
    the planned stages then take."""
    result = _audit(tmp_path, IMAGES)
    plan = result.plan
    assert 0.7 <= plan["ratio_to_estimate"] <= 1.3, (plan["estimated_s"], plan["measured_s"])


@pytest.mark.slow
def test_budget_reduces_the_expensive_checks_and_holds(tmp_path):
    """A budget well below the default's estimate: the audit reduces what it says, finishes
    within +20 % of the budget, and every verdict still has its n and interval."""
    full = _audit(tmp_path / "a", IMAGES, profile="thorough")
    budget = max(20.0, 0.4 * full.plan["measured_s"])
    result = _audit(tmp_path / "b", IMAGES, profile="thorough", budget=budget)
    plan = result.plan
    assert plan["budgeted"] and plan["reductions"] and plan["fits_budget"]
    assert plan["total_s"] <= 1.2 * budget, (plan["total_s"], budget)
    reduced = {(r["check"], r["param"]) for r in plan["reductions"]}
    for check, param in reduced:
        if param == "max_images":
            value = next(
                r["to"] for r in reversed(plan["reductions"]) if (r["check"], r["param"]) == (check, param)
            )
            assert value >= MIN_IMAGES
            assert result.check_info[check]["params"]["max_images"] == value
    judged = [c for c in result.checks if c.status in ("pass", "warn", "fail") and c.value is not None]
    assert judged and all(c.n and c.n > 0 for c in judged)


def test_cli_prints_the_plan_and_rejects_a_bad_budget(tmp_path):
    images = _images(tmp_path, 2)
    base = [sys.executable, "-m", "saliaudit", "report", str(MODEL), str(images), "--format", "json"]
    bad = subprocess.run(
        [*base, "-o", str(tmp_path / "x"), "--budget", "soon"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "budget" in bad.stderr and "Traceback" not in bad.stderr
    ok = subprocess.run(
        [
            *base,
            "-o",
            str(tmp_path / "o"),
            "--methods",
            "gradient",
            "--checks",
            "randomization",
            "--budget",
            "5m",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode in (0, 1), ok.stderr
    assert "plan · profile standard" in ok.stderr and "budget 5 min 00 s" in ok.stderr
    assert ok.stderr.index("plan · profile") < ok.stderr.index("saliaudit verdicts")
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["plan"]["budget_s"] == 300 and doc["plan"]["stages"]["check:randomization"]["images"] == 2


def test_report_shows_the_plan_and_what_a_budget_reduced(small_audit):
    """The report's Cost and plan table lists the stages with their passes and times, and a
    budgeted audit's reductions in words (rendered from the results only)."""
    from saliaudit.report.html import render_html
    from saliaudit.report.plan_text import plan_lines

    doc = small_audit.to_dict()
    doc["plan"] = {
        **doc["plan"],
        "budget_s": 60.0,
        "budgeted": True,
        "reductions": [
            {
                "check": "randomization",
                "param": "max_images",
                "from": 16,
                "to": 8,
                "why": "a class-stratified sample of 8 of the 16 images",
            }
        ],
    }
    html = render_html(doc)
    assert "Cost and plan" in html and "check:randomization" in html
    assert "randomization: max_images 16 → 8 (a class-stratified sample of 8 of the 16 images)" in html
    assert "budget 1 min 00 s: 1 reduction(s)" in html  # the cover line
    lines = plan_lines(doc["plan"])
    assert lines[0].startswith("plan · profile standard")
    assert any("check:randomization" in line for line in lines)
    assert any("randomization: max_images 16 → 8" in line for line in lines)


def test_randomization_max_steps_coarsens_the_cascade_over_the_same_parameters():
    """``max_steps`` merges consecutive steps (the output layer stays alone); every parameter
    is still randomized exactly once, in the same order; the check's declared cost follows."""
    import torchvision

    from saliaudit.checks import get_check
    from saliaudit.checks.reinit import group_parameters
    from saliaudit.cost import CostContext

    model = torchvision.models.resnet18()
    full = group_parameters(model, "blocks")
    for k in (1, 2, 5, len(full), len(full) + 3):
        coarse = group_parameters(model, "blocks", k)
        assert len(coarse) == min(k, len(full))
        assert [n for _, ns in coarse for n in ns] == [n for _, ns in full for n in ns]
        if k > 1:
            assert coarse[0] == full[0]
    check = get_check("randomization")(params={"max_steps": 4, "independent": False})
    ctx = CostContext(Passes(backward=3), variants=2, size=(224, 224), model=model)
    assert check.cost(ctx) == Passes(maps=4, compare=4 * 2 * 4)
    with pytest.raises(Exception, match="max_steps"):
        get_check("randomization")(params={"max_steps": 0})
