"""``saliaudit compare`` and ``report --baseline``: matching, classification, intervals,
the header, bad inputs, the files written and the gate (docs/compare.md)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from saliaudit.cli import app
from saliaudit.compare import ComparisonInputError, compare_audits, load_audit
from saliaudit.report.compare_html import render_compare_html, render_compare_junit
from saliaudit.stats import difference_interval

from .test_cli import _clean_env  # noqa: F401  (autouse: no SALIAUDIT_* variable, no config file)

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f"{k}/{i:03d}.png" for k in ("circle", "square") for i in range(8)]
INFO = {  # trimmed from a real results.json of the sample model
    "class_sensitivity": {"metric": "Spearman of HOG features", "higher_is_better": False, "aggregate": "mean",
                          "thresholds": {"fail": 0.7, "warn": 0.4}, "params": {"cell": 8}},
    "perturbation": {"metric": "AOPC gap (LeRF − MoRF)", "higher_is_better": True, "aggregate": "mean",
                     "thresholds": {"fail": 0.0, "warn": 0.05}, "params": {"fractions": [0.1, 0.3]}},
    "completeness": {"metric": "max relative residual", "higher_is_better": False, "aggregate": "worst",
                     "thresholds": {"fail": 0.001}, "params": {}},
}  # fmt: skip


def _cell(check, method, post, values, status="pass", names=NAMES, control=None, psi=None):
    vals = [float(v) for v in values]
    info = INFO[check]
    return {
        "check": check,
        "method": method,
        "psi": psi,
        "post": post,
        "status": status,
        "value": float(np.mean(vals)) if vals else None,
        "metric": info["metric"],
        "thresholds": dict(info["thresholds"]),
        "params": dict(info["params"]),
        "message": "",
        "per_image": [{"image": n, "value": v} for n, v in zip(names, vals)],
        "series": {},
        "control": control,
        "n": len(vals) or None,
        "ci": [min(vals), max(vals)] if vals else None,
        "ci_method": "BCa",
    }


def _doc(cells, *, names=NAMES, seed=0, sha=None, info=None):
    return {
        "schema_version": "1.0",
        "tool": {"name": "saliaudit", "version": "0.1.0"},
        "run": {"started_at": "2026-01-01T00:00:00+00:00", "seed": seed, "device": "cpu", "versions": {"torch": "2"}},
        "config": {"values": {"seed": seed, "profile": "quick", "output": "out"}, "sources": {}},
        "model": {"path": "m.pt2", "sha256": sha or "a" * 64, "format": "pt2"},
        "inputs": {"source": "imgs", "loaded": len(names)},
        "summary": {"status": "pass", "fail_on": "fail"},
        "checks": cells,
        "images": [{"image": n, "sha256": f"sha-{n}"} for n in names],
        "check_info": copy.deepcopy(info or INFO),
    }  # fmt: skip


def _base(rng):
    return rng.uniform(0.1, 0.3, len(NAMES))


def _one(diff, check="class_sensitivity", method="gradient", post="abs"):
    return next(c for c in diff["cells"] if (c["check"], c["method"], c["post"]) == (check, method, post))


def _compare(old, new, **kw):
    return compare_audits(old, new, **kw).to_dict()


def test_verdict_worse_is_a_regression_and_better_an_improvement():
    v = _base(np.random.default_rng(0))
    old = _doc(
        [
            _cell("class_sensitivity", "gradient", "abs", v),
            _cell("perturbation", "gradient", "abs", v, "warn"),
        ]
    )
    new = _doc(
        [
            _cell("class_sensitivity", "gradient", "abs", v, "fail"),
            _cell("perturbation", "gradient", "abs", v),
        ]
    )
    d = _compare(old, new)
    worse, better = _one(d), _one(d, "perturbation")
    assert (worse["classification"], worse["verdict"]) == ("regression", "worse")
    assert "PASS → FAIL" in worse["reason"]
    assert (better["classification"], better["verdict"]) == ("improvement", "better")
    assert (
        d["summary"]["regressions"] == 1 and d["summary"]["improvements"] == 1 and d["summary"]["gate_failed"]
    )
    assert not _compare(old, new, fail_on="never")["summary"]["gate_failed"]


def test_a_significant_move_in_the_bad_direction_is_a_regression_paired_over_shared_images():
    rng = np.random.default_rng(1)
    v = _base(rng)
    shift = 0.1 + rng.normal(0, 0.02, len(v))
    old = _doc(
        [_cell("class_sensitivity", "gradient", "abs", v), _cell("perturbation", "gradient", "abs", v)]
    )
    new = _doc(
        [
            _cell("class_sensitivity", "gradient", "abs", v + shift),
            _cell("perturbation", "gradient", "abs", v + shift),
        ]
    )
    d = _compare(old, new)
    up_bad, up_good = _one(d), _one(d, "perturbation")  # lower is better / higher is better
    for c in (up_bad, up_good):
        ch = c["change"]
        assert ch["pairing"] == "paired" and ch["n"] == len(NAMES)
        assert ch["how"] == f"paired over {len(NAMES)} shared images"
        assert 0 < ch["ci"][0] <= ch["estimate"] <= ch["ci"][1]
        assert c["difference"] == pytest.approx(float(np.mean(shift)))
        assert c["verdict"] == "same"
    assert up_bad["classification"] == "regression" and "significantly higher" in up_bad["reason"]
    assert up_good["classification"] == "improvement"


def test_a_change_whose_interval_includes_zero_is_unchanged():
    rng = np.random.default_rng(2)
    v = _base(rng)
    noise = rng.normal(0, 0.05, len(v))
    noise -= noise.mean() - 0.002  # a small mean change, well inside the noise
    d = _compare(_doc([_cell("class_sensitivity", "gradient", "abs", v)]),
                 _doc([_cell("class_sensitivity", "gradient", "abs", v + noise)]))  # fmt: skip
    c = _one(d)
    assert c["change"]["ci"][0] < 0 < c["change"]["ci"][1]
    assert c["classification"] == "unchanged" and "no significant change" in c["reason"]
    assert not d["summary"]["gate_failed"]


def test_numerical_noise_is_not_a_change():
    v = _base(np.random.default_rng(3))
    d = _compare(_doc([_cell("class_sensitivity", "gradient", "abs", v)]),
                 _doc([_cell("class_sensitivity", "gradient", "abs", v + 1e-9)]))  # fmt: skip
    assert _one(d)["classification"] == "unchanged"


def test_unpaired_when_the_audits_share_fewer_than_two_images():
    rng = np.random.default_rng(4)
    other = [f"new/{i}.png" for i in range(10)] + [NAMES[0]]
    old = _doc([_cell("class_sensitivity", "gradient", "abs", _base(rng))])
    new_vals = rng.uniform(0.5, 0.7, len(other))
    new = _doc([_cell("class_sensitivity", "gradient", "abs", new_vals, names=other)], names=other)
    d = _compare(old, new)
    c = _one(d)
    assert c["change"]["pairing"] == "unpaired"
    assert c["change"]["how"] == f"unpaired: {len(NAMES)} old and {len(other)} new images, only 1 shared"
    assert c["change"]["n"] == len(NAMES) + len(other)
    assert c["classification"] == "regression"  # 0.2 → 0.6, lower is better
    images = d["header"]["images"]
    assert (images["shared"], images["only_old_count"], images["only_new_count"]) == (1, 15, 10)


def test_images_with_the_same_name_but_other_content_are_not_paired():
    rng = np.random.default_rng(5)
    v = _base(rng)
    old = _doc([_cell("class_sensitivity", "gradient", "abs", v)])
    new = _doc([_cell("class_sensitivity", "gradient", "abs", v + 0.01)])
    for r in new["images"][:-1]:
        r["sha256"] = "other"
    d = _compare(old, new)
    assert _one(d)["change"]["pairing"] == "unpaired"
    assert any("same name but other content" in w for w in d["warnings"])


def test_difference_interval_covers_a_known_change_at_about_the_nominal_rate():
    """Welch (unpaired, skewed values) and Student (paired, 4 pairs: the few shared images of
    a sampled check, where a bootstrap interval covers about 75 %)."""
    rng = np.random.default_rng(6)
    trials, unpaired, paired = 400, 0, 0
    for _ in range(trials):
        a, b = rng.exponential(0.5, 15), rng.exponential(0.5, 20) + 0.2
        iv = difference_interval(a, b, paired=False)
        unpaired += iv.lo <= 0.2 <= iv.hi and iv.method == "Welch t"
        x = rng.normal(0.3, 0.2, 4)
        iv = difference_interval(x, x + 0.1 + rng.normal(0, 0.05, 4), paired=True)
        paired += iv.lo <= 0.1 <= iv.hi and iv.method == "Student t, paired" and iv.n == 4
    assert 0.9 <= unpaired / trials <= 0.99 and 0.91 <= paired / trials <= 0.99
    assert difference_interval([1.0], [2.0, 3.0], paired=False) is None
    assert difference_interval([1.0, np.nan], [2.0, 3.0], paired=True) is None
    same = difference_interval([1.0, 2.0], [1.5, 2.5], paired=True)
    assert (same.lo, same.hi, same.method) == (0.5, 0.5, "exact (all values equal)")


def test_appeared_disappeared_skipped_worst_case_and_controls():
    v = _base(np.random.default_rng(7))
    old = _doc([
        _cell("class_sensitivity", "gradient", "abs", v),
        _cell("class_sensitivity", "gradcam", "abs", v),
        _cell("perturbation", "gradient", "abs", [], "skipped"),
        _cell("completeness", "fullgrad", None, v * 1e-4),
        _cell("class_sensitivity", "random", "abs", v, "fail", control="expected"),
    ])  # fmt: skip
    new = _doc([
        _cell("class_sensitivity", "gradient", "abs", v),
        _cell("class_sensitivity", "gradient", "signed", v),
        _cell("perturbation", "gradient", "abs", v),
        _cell("completeness", "fullgrad", None, v * 2e-4),
        _cell("class_sensitivity", "random", "abs", v + 0.3, "pass", control="unexpected"),
    ])  # fmt: skip
    d = _compare(old, new)
    assert [c["variant"] for c in d["appeared"]] == ["gradient/signed"]
    assert [c["variant"] for c in d["disappeared"]] == ["gradcam/abs"]
    skipped = _one(d, "perturbation")
    assert skipped["classification"] == "not compared" and "old audit skipped" in skipped["reason"]
    worst = _one(d, "completeness", "fullgrad", None)
    assert worst["change"] is None and worst["classification"] == "unchanged" and worst["difference"] > 0
    control = _one(d, "class_sensitivity", "random")
    assert control["classification"] == "regression" and control["change"] is None  # expected → unexpected
    assert d["summary"]["appeared"] == 1 and d["summary"]["disappeared"] == 1


def test_header_shows_what_differs_and_warns_on_other_check_definitions():
    v = _base(np.random.default_rng(8))
    info = copy.deepcopy(INFO)
    info["class_sensitivity"]["thresholds"]["fail"] = 0.9
    old = _doc(
        [_cell("class_sensitivity", "gradient", "abs", v), _cell("perturbation", "gradient", "abs", v)]
    )
    new = _doc([_cell("class_sensitivity", "gradient", "abs", v), _cell("perturbation", "gradient", "abs", v)],
               seed=3, sha="b" * 64, info=info)  # fmt: skip
    new["config"]["values"]["output"] = "elsewhere"
    d = _compare(old, new)
    rows = {r["what"]: r for r in d["header"]["rows"]}
    assert not rows["seed"]["same"] and (rows["seed"]["old"], rows["seed"]["new"]) == (0, 3)
    assert not rows["model sha256"]["same"] and rows["model"]["same"]
    settings = {s["key"]: s for s in d["header"]["settings"]}
    assert settings["seed"]["output_only"] is False and settings["output"]["output_only"] is True
    assert len(d["warnings"]) == 1 and "class_sensitivity is defined differently" in d["warnings"][0]
    assert "fail 0.7 → 0.9" in d["warnings"][0]
    assert d["header"]["checks"] == [
        {"check": "class_sensitivity", "changes": ["thresholds: fail 0.7 → 0.9"]}
    ]


def test_html_and_junit_of_a_comparison_escape_names_and_mark_regressions():
    v = _base(np.random.default_rng(9))
    evil = '<script>alert(1)</script>"&'
    old = _doc([_cell("class_sensitivity", evil, "abs", v), _cell("perturbation", "gradient", "abs", v)])
    new = _doc(
        [_cell("class_sensitivity", evil, "abs", v, "fail"), _cell("perturbation", "gradient", "abs", v)]
    )
    d = _compare(old, new)
    html = render_compare_html(d)
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)" in html
    assert "Regressions (1)" in html and "Unchanged (1)" in html and "REGRESSION" in html
    assert 'src="http' not in html and "Content-Security-Policy" in html
    import xml.etree.ElementTree as ET

    suite = ET.fromstring(render_compare_junit(d)).find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    failed = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert [c.get("classname") for c in failed] == ["class_sensitivity"]


def _write(tmp_path: Path, name: str, doc: dict) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc), encoding="utf-8")
    return p


@pytest.mark.parametrize(
    "content, needle",
    [
        ("not json at all", "not valid JSON"),
        ('{"checks": []}', "not a saliaudit results document"),
        ('{"schema_version": "2.0", "checks": []}', "unsupported schema_version '2.0'"),
        ('{"schema_version": "1.0", "kind": "saliaudit comparison", "cells": []}', "is a diff.json"),
        ('{"schema_version": "1.0", "tool": {}}', "no checks list"),
        (None, "results file not found"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_naming_the_file(tmp_path, content, needle):
    good = _write(tmp_path, "old.json", _doc([_cell("class_sensitivity", "gradient", "abs", [0.1, 0.2])]))
    bad = tmp_path / "new.json"
    if content is not None:
        bad.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compare", str(good), str(bad), "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("saliaudit: error: ") and str(bad) in lines[0]
    assert needle in lines[0] and "Traceback" not in result.output
    assert not out.exists()
    with pytest.raises(ComparisonInputError):
        load_audit(bad)


def test_cli_writes_diff_json_html_pdf_and_gates(tmp_path):
    pytest.importorskip("weasyprint")
    rng = np.random.default_rng(10)
    v = _base(rng)
    old = _write(tmp_path, "old.json", _doc([_cell("class_sensitivity", "gradient", "abs", v)]))
    new = _write(tmp_path, "new.json", _doc([_cell("class_sensitivity", "gradient", "abs", v + 0.2)]))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["compare", str(old), str(new), "-o", str(out), "--format", "json,html,pdf,junit"]
    )
    if result.exit_code == 3 and "WeasyPrint" in result.output:
        pytest.skip("no PDF backend")
    assert result.exit_code == 1, result.output
    assert (
        "1 regressions" in result.output and "regression: class_sensitivity · gradient/abs" in result.output
    )
    diff = json.loads((out / "diff.json").read_text(encoding="utf-8"))
    assert diff["schema_version"] == "1.0" and diff["summary"]["regressions"] == 1
    assert "Regressions (1)" in (out / "report.html").read_text(encoding="utf-8")
    pdf = (out / "report.pdf").read_bytes()
    assert pdf[:5] == b"%PDF-" and len(pdf) > 10_000 and b"%%EOF" in pdf[-1024:]
    assert (out / "junit.xml").is_file()
    never = CliRunner().invoke(
        app, ["compare", str(old), str(new), "-o", str(out), "--format", "json", "--fail-on", "never", "-q"]
    )
    assert never.exit_code == 0, never.output
    assert len(never.output.strip().splitlines()) == 1 and "gate --fail-on never off (exit 0)" in never.output


def test_report_with_a_bad_baseline_exits_2_before_the_audit(tmp_path):
    bad = tmp_path / "base.json"
    bad.write_text("{}", encoding="utf-8")
    out = tmp_path / "out"
    model, images = ROOT / "sample_models" / "shapes_vgg.pt2", ROOT / "sample_models" / "images" / "shapes"
    result = CliRunner().invoke(
        app, ["report", str(model), str(images), "-o", str(out), "--baseline", str(bad)]
    )
    assert result.exit_code == 2, result.output
    assert str(bad) in result.output and "not a saliaudit results document" in result.output
    assert not out.exists()


@pytest.mark.slow  # two 4-image audits of the sample model (about 30 s on 2 CPU cores)
def test_report_baseline_end_to_end(tmp_path):
    model, images = ROOT / "sample_models" / "shapes_vgg.pt2", ROOT / "sample_models" / "images" / "shapes"
    if not model.is_file():
        pytest.skip("sample model not present")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALIAUDIT_")}
    env["PYTHONPATH"] = str(ROOT)
    common = [sys.executable, "-m", "saliaudit", "report", str(model), str(images), "--profile", "quick",
              "--max-images", "4", "--methods", "gradient,smoothgrad,random", "--checks",
              "class_sensitivity,random_logit", "--no-overlays", "--format", "json,html,junit", "-q"]  # fmt: skip
    first = subprocess.run(
        [*common, "-o", str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=600
    )
    assert first.returncode in (0, 1), first.stderr[-2000:]
    baseline = tmp_path / "a" / "results.json"
    second = subprocess.run(
        [*common, "-o", str(tmp_path / "b"), "--seed", "5", "--baseline", str(baseline)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    out = tmp_path / "b"
    diff = json.loads((out / "diff.json").read_text(encoding="utf-8"))
    report_code = 1 if json.loads((out / "results.json").read_text())["summary"]["gate_failed"] else 0
    assert second.returncode == max(report_code, 1 if diff["summary"]["gate_failed"] else 0), second.stderr
    assert (out / "report.html").is_file() and (out / "compare.html").is_file()
    assert (out / "compare-junit.xml").is_file() and (out / "junit.xml").is_file()
    assert "saliaudit compare:" in second.stderr
    rows = {r["what"]: r for r in diff["header"]["rows"]}
    assert (rows["seed"]["old"], rows["seed"]["new"]) == (0, 5)
    assert diff["summary"]["compared"] == len(diff["cells"]) > 0
    paired = [c for c in diff["cells"] if c["change"]]
    assert paired and all(c["change"]["pairing"] == "paired" and c["change"]["n"] == 4 for c in paired)

    # an audit compared with itself: exit 0, nothing changed
    same = CliRunner().invoke(app, ["compare", str(baseline), str(baseline), "-o", str(tmp_path / "same")])
    assert same.exit_code == 0, same.output
    summary = json.loads((tmp_path / "same" / "diff.json").read_text(encoding="utf-8"))["summary"]
    assert summary["regressions"] == 0 and summary["improvements"] == 0 and summary["compared"] > 0
    # a copy with one PASS (else WARN) cell turned into a FAIL: exit 1, the cell named everywhere
    doc = json.loads(baseline.read_text(encoding="utf-8"))
    cells = [c for c in doc["checks"] if not c.get("control") and c["status"] in ("pass", "warn")]
    cell = min(cells, key=lambda c: c["status"] != "pass")  # a PASS cell, else a WARN one
    cell["status"] = "fail"
    flipped = _write(tmp_path, "flipped.json", doc)
    worse = CliRunner().invoke(app, ["compare", str(baseline), str(flipped), "-o", str(tmp_path / "worse")])
    assert worse.exit_code == 1, worse.output
    variant = cell.get("psi") or cell.get("post")
    name = f"{cell['check']} · {cell['method']}" + (f"/{variant}" if variant else "")
    diff = json.loads((tmp_path / "worse" / "diff.json").read_text(encoding="utf-8"))
    assert diff["summary"]["regressions"] == 1
    bad = [c for c in diff["cells"] if c.get("classification") == "regression"]
    assert len(bad) == 1 and bad[0]["check"] == cell["check"] and bad[0]["method"] == cell["method"], bad
    assert name in worse.output
    html = (tmp_path / "worse" / "report.html").read_text(encoding="utf-8")
    section = re.sub(r"<[^>]+>", "", html.split("Regressions (1)", 1)[1].split("</section>", 1)[0])
    assert cell["check"] in section and f"{cell['method']}/{variant}" in section
    shutil.rmtree(tmp_path / "a")
