"""``saliaudit report`` outputs and ``saliaudit render``: formats, exit codes, CI conveniences.

The audits run on a tiny exported CNN and three small PNGs (FullGrad, completeness only), so
these tests exercise the plumbing, not the checks.
"""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from typer.testing import CliRunner

from saliaudit.cli import app
from saliaudit.report.render import results_json

from .report_fixture import make_results

META = {
    "input_size": [16, 16],
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "class_names": ["a", 'b <script>alert(1)</script> "&" ü', "c"],
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report-cli")
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()
    with torch.no_grad():
        m[4].bias.copy_(torch.tensor([2.0, 1.5, 1.0]))
    ep = torch.export.export(
        m, (torch.rand(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},)
    )
    model = root / "model.pt2"
    torch.export.save(ep, str(model), extra_files={"saliaudit.json": json.dumps(META)})
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", '<script>alert(1)</script> "x" & ü.png', "c.png"):  # a folder "<script>alert(1)<"
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / name)
    return {"model": model, "images": images}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    for key in list(os.environ):
        if key.startswith("SALIAUDIT_") or key in ("GITHUB_STEP_SUMMARY", "SOURCE_DATE_EPOCH"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def run(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=True)


def audit(assets, out, *extra, env=None):
    return run(
        "report",
        assets["model"],
        assets["images"],
        "-o",
        out,
        "--methods",
        "fullgrad",
        "--checks",
        "completeness",
        "--psi",
        "paper,signed",
        "--no-overlays",
        *extra,
        env=env,
    )


def one_error_line(result, code):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("saliaudit: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_report_formats_and_render_same_html(assets, tmp_path):
    out = tmp_path / "out"
    result = audit(assets, out, "--format", "html,json,junit", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "junit.xml",
        "report.html",
        "results.json",
    ]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    again = tmp_path / "again"
    result = run("render", out / "results.json", "-o", again, "--format", "html,junit", "-q")
    assert result.exit_code == 0, result.output
    assert (again / "report.html").read_bytes() == (out / "report.html").read_bytes()
    assert (again / "junit.xml").read_bytes() == (out / "junit.xml").read_bytes()
    # the default output of render is the results' own folder (a saliaudit output)
    result = run("render", out / "results.json", "--format", "html")
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output


def test_report_default_formats_write_pdf(assets, tmp_path):
    pytest.importorskip("weasyprint")  # the CLI restores Pillow's truncated-image flag itself
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    out = tmp_path / "out"
    result = audit(assets, out)
    assert result.exit_code == 0, result.output
    for name in ("results.json", "report.html", "report.pdf"):
        assert (out / name).is_file(), name
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF-")
    assert "report.pdf" in result.output
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_report_without_pdf_backend_exits_3(assets, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_weasyprint(name, *args, **kwargs):
        if name == "weasyprint" or name.startswith("weasyprint."):
            raise ImportError("No module named 'weasyprint'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_weasyprint)
    out = tmp_path / "out"
    result = audit(assets, out, "--format", "html,pdf,json", "-q")
    line = one_error_line(result, 3)
    assert "saliaudit doctor" in line and "libpango-1.0-0 libpangoft2-1.0-0" in line
    assert (out / "report.html").is_file() and (out / "results.json").is_file()
    assert not (out / "report.pdf").exists()
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert doc["summary"]["status"] == "pass"  # the audit itself is recorded as it ran
    # without pdf in --format nothing needs WeasyPrint
    result = audit(assets, tmp_path / "nopdf", "--format", "html,json", "-q")
    assert result.exit_code == 0, result.output
    # render says the same
    result = run("render", out / "results.json", "-o", tmp_path / "r", "--format", "html,pdf")
    one_error_line(result, 3)
    assert (tmp_path / "r" / "report.html").is_file()


def test_ci_summary_annotations_and_gate(assets, tmp_path):
    summary = tmp_path / "summary.md"
    out = tmp_path / "out"
    result = audit(
        assets,
        out,
        "--format",
        "json",
        "--annotations",
        "-q",
        "--threshold",
        "completeness.fail=1e-30",
        env={"GITHUB_STEP_SUMMARY": str(summary)},
    )
    assert result.exit_code == 1, result.output  # completeness FAIL reaches --fail-on fail
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("::")]
    assert len(lines) == 1 and lines[0].startswith("::error title=saliaudit completeness%3A fullgrad FAIL::")
    md = summary.read_text(encoding="utf-8")
    assert md.startswith("## saliaudit: ❌ FAIL") and "| fullgrad | ❌ FAIL" in md
    result = audit(assets, tmp_path / "quiet", "--format", "json", "-q")
    assert result.exit_code == 0 and "::" not in result.stdout


def test_terminal_verdict_table(assets, tmp_path):
    result = audit(assets, tmp_path / "out", "--format", "json")
    assert result.exit_code == 0, result.output
    assert "saliaudit verdicts" in result.output and "completeness" in result.output
    assert "fullgrad" in result.output and "PASS" in result.output
    assert "overall: PASS" in result.output


def test_render_errors(tmp_path):
    one_error_line(run("render", tmp_path / "missing.json", "-o", tmp_path / "o"), 2)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    line = one_error_line(run("render", bad, "-o", tmp_path / "o"), 2)
    assert str(bad) in line and "not valid JSON" in line
    good = tmp_path / "results.json"
    good.write_text(results_json(make_results(3, n_examples=1)), encoding="utf-8")
    line = one_error_line(run("render", good, "-o", tmp_path / "o", "--format", "html,docx"), 2)
    assert "--format" in line
    one_error_line(run("render", good, "-o", tmp_path / "o", "--page-size", "a3"), 2)
    one_error_line(run("render", good, "-o", tmp_path / "o", "--examples", "-1"), 2)
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("mine", encoding="utf-8")
    line = one_error_line(run("render", good, "-o", foreign, "--format", "html"), 3)
    assert "not a saliaudit output" in line
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.txt"]
    result = run("render", good, "-o", foreign, "--format", "html", "--force", "-q")
    assert result.exit_code == 0 and (foreign / "report.html").is_file()
