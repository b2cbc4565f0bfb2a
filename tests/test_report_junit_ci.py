"""junit.xml and the CI conveniences (GitHub job summary, workflow annotations)."""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET

import pytest

from saliaudit.report.ci import MAX_ANNOTATIONS, annotations, append_step_summary, step_summary_markdown
from saliaudit.report.junit import render_junit, xml_text

from .report_fixture import HOSTILE, HOSTILE_LABEL, make_results


@pytest.fixture(scope="module")
def doc() -> dict:
    return make_results(4, n_examples=1)


def test_junit_one_testcase_per_cell(doc):
    root = ET.fromstring(render_junit(doc).encode("utf-8"))
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite.get("name") == "saliaudit"
    cases = suite.findall("testcase")
    assert len(cases) == len(doc["checks"]) == int(suite.get("tests"))
    by_key = {(c.get("classname"), c.get("name")): c for c in cases}
    assert len(by_key) == len(cases)
    assert ("completeness", "fullgrad") in by_key
    assert ("class_sensitivity", "fullgrad/paper") in by_key and (
        "class_sensitivity",
        "gradient/abs",
    ) in by_key
    counts = {s: sum(1 for c in doc["checks"] if c["status"] == s) for s in ("fail", "error", "skipped")}
    assert int(suite.get("failures")) == counts["fail"] == len(suite.findall("testcase/failure"))
    assert int(suite.get("errors")) == counts["error"] == len(suite.findall("testcase/error"))
    assert int(suite.get("skipped")) == counts["skipped"] == len(suite.findall("testcase/skipped"))
    warn = by_key[("class_sensitivity", "fullgrad/paper")]
    assert warn.find("failure") is None and warn.find("error") is None
    props = {p.get("name"): p.get("value") for p in warn.findall("properties/property")}
    assert props["status"] == "warn" and float(props["value"]) == pytest.approx(0.48)
    err = by_key[("sensitivity_n", "guided_backprop/abs")].find("error")
    assert err is not None and "CUDA out of memory" in err.get("message")
    assert suite.get("timestamp") == doc["run"]["started_at"]


def test_junit_hostile_strings_valid(doc):
    evil = copy.deepcopy(doc)
    bad = HOSTILE + "\x00\x1b[31m\x0b\ufffe\ud800 ]]> <![CDATA["
    for c in evil["checks"]:
        c["message"] = bad
    evil["checks"][0]["method"] = HOSTILE_LABEL
    text = render_junit(evil)
    root = ET.fromstring(text.encode("utf-8"))  # well-formed
    case = root.find("testsuite/testcase")
    assert case.get("name") == HOSTILE_LABEL
    messages = [e.get("message") for e in root.iter() if e.get("message")]
    assert HOSTILE + "[31m ]]> <![CDATA[" in messages
    assert xml_text("a\x00b\x08c\td\ne") == "abc\td\ne"


def test_step_summary_table(doc, tmp_path, monkeypatch):
    md = step_summary_markdown(doc)
    assert md.startswith("## saliaudit: ❌ FAIL")
    lines = md.splitlines()
    header = next(ln for ln in lines if ln.startswith("| map |"))
    assert "class\\_sensitivity" in header and header.count("|") == 2 + 8
    assert any(ln.startswith("| fullgrad/paper |") and "⚠️ WARN 0.48" in ln for ln in lines)
    assert "<script" not in md
    path = tmp_path / "summary.md"
    path.write_text("previous step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(path))
    assert append_step_summary(doc) == path
    append_step_summary(doc)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("previous step\n") and text.count("## saliaudit") == 2
    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    assert append_step_summary(doc) is None


def test_step_summary_escapes_markdown_and_html(doc):
    evil = copy.deepcopy(doc)
    evil["model"]["path"] = "models/<img src=x onerror=alert(1)>|*x*.pt2"
    evil["caveats"] = [{"kind": "x", "message": "a | b <script>alert(1)</script> [link](javascript:x)\nnext"}]
    md = step_summary_markdown(evil)
    assert "<img" not in md and "<script" not in md
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;\\|\\*x\\*.pt2" in md
    caveat = next(ln for ln in md.splitlines() if ln.startswith("- a"))
    assert "\\|" in caveat and "\\[link\\]\\(javascript:x\\)" in caveat and "next" in caveat


def test_annotations(doc):
    lines = annotations(doc)
    errors = [ln for ln in lines if ln.startswith("::error ")]
    warnings = [ln for ln in lines if ln.startswith("::warning ")]
    n_bad = sum(1 for c in doc["checks"] if c["status"] in ("fail", "error"))
    n_warn = sum(1 for c in doc["checks"] if c["status"] == "warn")
    assert len(lines) == min(n_bad + n_warn, MAX_ANNOTATIONS)
    assert errors and len(errors) == min(n_bad, MAX_ANNOTATIONS - 1)
    assert lines.index(errors[-1]) < lines.index(warnings[0])
    assert all("\n" not in ln for ln in lines)
    first = errors[0]
    title, _, message = first[len("::error ") :].partition("::")
    assert title.startswith("title=saliaudit class_sensitivity%3A guided_backprop/signed FAIL")
    evil = copy.deepcopy(doc)
    evil["checks"] = [
        dict(evil["checks"][1], status="fail", method="m,x:y", message="50%\nline2\r::error::x")
    ]
    (line,) = annotations(evil)
    assert "m%2Cx%3Ay" in line and "50%25%0Aline2%0D::error::x" in line
    assert line.count("\n") == 0


def test_annotations_capped(doc):
    many = copy.deepcopy(doc)
    many["checks"] = [dict(doc["checks"][1], status="fail") for _ in range(80)]
    lines = annotations(many)
    assert len(lines) == MAX_ANNOTATIONS and "31 more findings" in lines[-1]
