"""The gate is honest: no verdict is not a PASS; controls are shown one way everywhere;
PASSes that rest on constant maps are marked and, above a share, become WARN."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from saliaudit.checks.base import Measurement
from saliaudit.checks.class_sensitivity import ClassSensitivity
from saliaudit.cli import app
from saliaudit.errors import EXIT_NO_VERDICT
from saliaudit.maps import Variant

ROOT = Path(__file__).resolve().parents[1] / "sample_models"


def _report(tmp_path: Path, *args: str):
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        [
            "report",
            str(ROOT / "shapes_vgg.pt2"),
            str(ROOT / "images" / "shapes"),
            "-o",
            str(out),
            "--max-images",
            "4",
            "--no-overlays",
            *args,
        ],
        catch_exceptions=False,
    )
    return res, out


@pytest.mark.parametrize("methods,checks", [("gradient", "completeness"), ("random", "class_sensitivity")])
def test_nothing_judged_is_not_a_pass(tmp_path, monkeypatch, methods, checks):
    monkeypatch.chdir(tmp_path)
    res, out = _report(tmp_path, "--methods", methods, "--checks", checks, "--format", "json")
    assert res.exit_code == EXIT_NO_VERDICT, res.output
    assert "no verdict" in res.output and "PASS" not in res.output.split("overall:")[-1]
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert doc["summary"]["no_verdict"] is True and doc["summary"]["status"] != "pass"
    assert doc["summary"]["gate_failed"] is True
    # --fail-on never keeps its promise: exit 0, but the results still say so
    res, out = _report(
        tmp_path,
        "--methods",
        methods,
        "--checks",
        checks,
        "--format",
        "json",
        "--fail-on",
        "never",
        "--force",
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["summary"]["no_verdict"]


def test_a_judged_audit_has_a_verdict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res, out = _report(
        tmp_path, "--methods", "gradcam,random", "--checks", "class_sensitivity", "--format", "json"
    )
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert doc["summary"]["no_verdict"] is False and res.exit_code in (0, 1)


def _judge(degenerate: list[bool], values: list[float], **params) -> object:
    check = ClassSensitivity(params=params)
    n = len(values)
    extra = {
        f"{pair}_{m}": list(values)
        for pair in ("lowest", "runner_up")
        for m in ("spearman_abs", "spearman", "ssim", "hog")
    }
    extra.update(degenerate=degenerate, no_lowest=[False] * n)
    m = Measurement(values=list(values), images=[f"i{k}" for k in range(n)], extra=extra)
    return check.judge(Variant("gradcam", post="abs"), m)


def test_passes_resting_on_constant_maps_are_marked_and_become_warn_above_the_share():
    values = [0.0, 0.05, 0.02, 0.01, 0.03, 0.04, 0.0, 0.02]
    few = _judge([True] + [False] * 7, values)
    assert few.status == "pass" and few.degenerate == pytest.approx(1 / 8)
    many = _judge([True] * 5 + [False] * 3, values)
    assert many.status == "warn" and many.degenerate == pytest.approx(5 / 8)
    assert "rests on a convention: 5 of 8 images had a constant map" in many.message
    lenient = _judge([True] * 5 + [False] * 3, values, max_degenerate_share=0.9)
    assert lenient.status == "pass"


def test_terminal_and_tables_mark_constant_map_passes():
    from rich.console import Console

    from saliaudit.report.sections import cell_view
    from saliaudit.report.terminal import print_summary

    cell = {
        "check": "class_sensitivity",
        "method": "gradcam",
        "psi": None,
        "post": "abs",
        "status": "pass",
        "value": 0.1,
        "degenerate": 0.125,
        "message": "m",
        "control": None,
    }
    assert "12% constant maps" in cell_view(cell)["note"]  # 0.125 shown to 0 decimals
    doc = {
        "checks": [cell],
        "check_info": {},
        "methods": [{"method": "gradcam"}],
        "summary": {"status": "pass", "fail_on": "fail"},
        "inputs": {},
    }
    console = Console(record=True, width=100)
    print_summary(console, doc, Path("out"))
    text = console.export_text()
    assert "P~" in text.replace(" ", "") or "PASS~" in text.replace(" ", "")
    assert "rests partly on constant maps" in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pdftotext") is None, reason="pdftotext (poppler-utils) not installed")
def test_pdf_class_sensitivity_greys_controls_and_counts_like_the_cover(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res, out = _report(
        tmp_path,
        "--methods",
        "gradcam,gradient,random,edge",
        "--checks",
        "class_sensitivity",
        "--format",
        "json,html,pdf",
    )
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    cells = [c for c in doc["checks"] if c["check"] == "class_sensitivity"]
    methods = [c for c in cells if not c.get("control")]
    controls = [c for c in cells if c.get("control")]
    assert controls and all(c["control"] == "expected" for c in controls)
    # the cover counts only the methods' cells, the controls apart
    counts = doc["summary"]["counts"]
    assert sum(counts.values()) == len(methods) and doc["summary"]["controls"]["expected"] == len(controls)
    html = (out / "report.html").read_text(encoding="utf-8")
    section = html.split('id="check-class-sensitivity"')[1].split("</section>")[0]
    assert section.count('<tr class="ctl">') == len(controls)
    text = subprocess.run(
        ["pdftotext", "-layout", str(out / "report.pdf"), "-"], capture_output=True, text=True, check=True
    ).stdout
    want = ", ".join(
        f"{sum(1 for c in methods if c['status'] == s)} {s.upper()}"
        for s in ("pass", "warn", "fail")
        if any(c["status"] == s for c in methods)
    )
    assert want in " ".join(text.split()), want
    assert f"controls: {len(controls)} did not pass, as they must" in " ".join(text.split())
    assert "CONTROL" in text  # the bars label the controls as such, in grey
