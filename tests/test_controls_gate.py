"""Controls in the verdicts: a control's expected FAIL shows the check working and never gates;
a control that PASSES a check it must fail is a warning about that check (docs/methods.md, "Controls")."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from saliaudit.caveats import compute_caveats
from saliaudit.checks import get_check
from saliaudit.checks.runner import control_expectation
from saliaudit.report.ci import annotations, step_summary_markdown
from saliaudit.report.context import gate_status_of
from saliaudit.report.junit import render_junit
from saliaudit.result import AuditResult, CheckResult, gate_failed, gate_status


def _cell(check: str, method: str, status: str, post: str | None = "signed") -> CheckResult:
    c = CheckResult(
        check,
        method,
        None,
        status,
        0.9 if status != "pass" else 0.1,
        "m",
        {"fail": 0.7, "warn": 0.4},
        f"{status} message",
        post=post,
    )
    c.control = control_expectation(c, get_check(check)())
    return c


def _result(cells: list[CheckResult], fail_on: str = "fail") -> AuditResult:
    r = AuditResult(
        tool={"name": "saliaudit", "version": "t"}, run={}, config={}, model={}, inputs={}, checks=cells
    )
    r.summarize(fail_on)
    return r


@pytest.mark.parametrize(
    "check,method,status,expected",
    [
        ("class_sensitivity", "random", "fail", "expected"),
        ("randomization", "edge", "fail", "expected"),
        ("class_sensitivity", "edge", "pass", "unexpected"),
        ("perturbation", "random", "warn", "expected"),
        ("perturbation", "edge", "pass", "reference"),  # edges may beat a random order
        ("randomization", "random", "error", "reference"),
        ("class_sensitivity", "gradient", "fail", None),
        ("class_sensitivity", "fullgrad", "fail", None),
    ],
)
def test_control_expectation(check, method, status, expected):
    assert _cell(check, method, status).control == expected


def test_expected_control_failures_do_not_gate():
    cells = [
        _cell("class_sensitivity", "gradcam", "pass"),
        _cell("class_sensitivity", "random", "fail"),
        _cell("randomization", "edge", "fail"),
    ]
    r = _result(cells)
    assert not r.summary["gate_failed"] and r.summary["status"] == "pass"
    assert r.summary["counts"]["fail"] == 0 and r.summary["counts"]["pass"] == 1
    assert r.summary["controls"] == {"expected": 2, "unexpected": 0, "reference": 0}
    # a method's FAIL still gates
    r = _result(cells + [_cell("class_sensitivity", "guided_backprop", "fail")])
    assert r.summary["gate_failed"] and r.summary["status"] == "fail"


def test_control_that_passes_is_a_warning_and_a_caveat():
    bad = _cell("class_sensitivity", "edge", "pass")
    assert gate_status(bad) == "warn"
    assert not gate_failed([bad], "fail") and gate_failed([bad], "warn")
    r = _result([bad], "warn")
    assert r.summary["status"] == "warn" and r.summary["controls"]["unexpected"] == 1
    cav = [c for c in compute_caveats([bad], None, {}) if c["kind"] == "control_passes"]
    assert len(cav) == 1 and "class_sensitivity" in cav[0]["message"] and "edge" in cav[0]["message"]
    assert not [
        c
        for c in compute_caveats([_cell("class_sensitivity", "edge", "fail")], None, {})
        if c["kind"] == "control_passes"
    ]


def test_an_error_in_a_control_still_counts():
    err = _cell("randomization", "random", "error")
    assert gate_status(err) == "error" and gate_failed([err], "fail")


def test_junit_and_ci_judge_controls_as_the_gate_does():
    cells = [
        _cell("class_sensitivity", "random", "fail"),
        _cell("class_sensitivity", "edge", "pass"),
        _cell("class_sensitivity", "gradient", "fail"),
    ]
    doc = _result(cells).to_dict()
    assert [gate_status_of(c) for c in doc["checks"]] == ["pass", "warn", "fail"]
    root = ET.fromstring(render_junit(doc))
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert cases["random/signed"].find("failure") is None
    props = {p.get("name"): p.get("value") for p in cases["random/signed"].iter("property")}
    assert props["status"] == "fail" and props["control"] == "expected"
    assert cases["gradient/signed"].find("failure") is not None
    assert root.get("failures") == "1"
    lines = annotations(doc)
    assert sum(line.startswith("::error") for line in lines) == 1  # gradient only
    assert any(line.startswith("::warning") and "edge" in line for line in lines)
    md = step_summary_markdown(doc)
    assert "control: expected" in md and "check unreliable" in md
