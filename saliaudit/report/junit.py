"""``junit.xml``: one test case per (check, method, ψ or post-processing) for CI dashboards.

``<testsuite name="saliaudit">``; a test case's ``classname`` is the check and its ``name`` the
map (``fullgrad/paper``, ``gradient/abs``, ``fullgrad``). FAIL becomes ``<failure>``, ERROR
``<error>``, SKIPPED ``<skipped>``; WARN passes and carries a ``status=warn`` property. A
control's cell (``random``, ``edge``) is judged as the gate judges it: its expected FAIL passes
(the check works) with a ``control=expected`` property, and a control that PASSES a check it
must fail passes with ``control=unexpected`` like a WARN. Each test case carries the check's
title and the direction of its value (``higher_is_better``) from ``check_info``. Every
string is stripped of the characters XML 1.0 forbids, so hostile file names or labels still
give well-formed XML.

An audit that did not finish (interrupted, or stopped on an error: ``summary.partial``) adds
the suite property ``partial=true`` and one more test case, ``saliaudit``/``audit``, whose
``<error>`` says why: a CI dashboard shows the run as broken, never as green.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

from .context import as_dict, as_list, check_info, control_text, fmt, gate_status_of, status_of, variant_label

__all__ = ["render_junit", "xml_text"]

_FORBIDDEN = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(v: Any) -> str:
    """``v`` as text that XML 1.0 can hold (forbidden characters and lone surrogates removed)."""
    return _FORBIDDEN.sub("", "" if v is None else str(v))


def _seconds(v: Any) -> str:
    return f"{float(v):.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else "0"


def _el(parent: ET.Element, tag: str, attrs: dict[str, Any] | None = None, text: Any = None) -> ET.Element:
    e = ET.SubElement(parent, tag, {k: xml_text(v) for k, v in (attrs or {}).items()})
    if text is not None:
        e.text = xml_text(text)
    return e


def render_junit(doc: dict[str, Any]) -> str:
    """The JUnit XML document of the results."""
    cells = [c for c in as_list(doc.get("checks")) if isinstance(c, dict)]
    counts = {s: sum(1 for c in cells if gate_status_of(c) == s) for s in ("fail", "error", "skipped")}
    run, model, summary = as_dict(doc.get("run")), as_dict(doc.get("model")), as_dict(doc.get("summary"))
    partial = bool(summary.get("partial"))  # the audit did not finish: one more test case, an error
    attrs = {
        "name": "saliaudit",
        "tests": len(cells) + partial,
        "failures": counts["fail"],
        "errors": counts["error"] + partial,
        "skipped": counts["skipped"],
        "time": _seconds(run.get("duration_s")),
    }
    root = ET.Element("testsuites", {k: xml_text(v) for k, v in attrs.items()})
    suite_attrs = dict(attrs)
    if run.get("started_at"):
        suite_attrs["timestamp"] = run["started_at"]
    suite = _el(root, "testsuite", suite_attrs)
    props = _el(suite, "properties")
    tool = as_dict(doc.get("tool"))
    for name, value in (
        ("saliaudit.version", tool.get("version")),
        ("model", model.get("path")),
        ("model.sha256", model.get("sha256")),
        ("status", summary.get("status")),
        ("fail_on", summary.get("fail_on")),
        ("gate_failed", str(bool(summary.get("gate_failed"))).lower()),
        ("images", as_dict(doc.get("inputs")).get("loaded")),
        ("partial", "true" if partial else None),
    ):
        if value is not None:
            _el(props, "property", {"name": name, "value": value})
    if partial:
        reason = str(summary.get("reason") or "the audit did not finish")
        case = _el(
            suite,
            "testcase",
            {"classname": "saliaudit", "name": "audit", "time": _seconds(run.get("duration_s"))},
        )
        kind = "interrupted" if "interrupted" in reason else "error"
        _el(
            case,
            "error",
            {"message": f"the audit did not finish: {reason}", "type": kind},
            f"{reason}\nThe results are partial: only the cells below were measured before it stopped.",
        )
    infos: dict[str, dict[str, Any]] = {}
    for c in cells:
        name = str(c.get("check", "?"))
        info = infos.setdefault(name, check_info(doc, name))
        status = gate_status_of(c)  # a control's expected FAIL is a passing test of the check
        case = _el(
            suite, "testcase", {"classname": c.get("check", "?"), "name": variant_label(c), "time": "0"}
        )
        value = c.get("value")
        message = str(c.get("message") or "")
        note = control_text(c)
        detail = (
            f"{variant_label(c)} · {c.get('check')}: {status_of(c).upper()} "
            + (f"({note}) " if note else "")
            + f"{c.get('metric') or 'value'} = {fmt(value)}"
            + (f" (thresholds {as_dict(c.get('thresholds'))})" if c.get("thresholds") else "")
            + (f"\n{message}" if message else "")
        )
        cprops = _el(case, "properties")
        _el(cprops, "property", {"name": "status", "value": status_of(c)})
        _el(cprops, "property", {"name": "check_title", "value": info["title"]})
        _el(
            cprops,
            "property",
            {"name": "higher_is_better", "value": str(bool(info["higher_is_better"])).lower()},
        )
        if c.get("control"):
            _el(cprops, "property", {"name": "control", "value": c["control"]})
        if value is not None:
            _el(
                cprops,
                "property",
                {"name": "value", "value": repr(value) if isinstance(value, float) else value},
            )
        if c.get("metric"):
            _el(cprops, "property", {"name": "metric", "value": c["metric"]})
        if isinstance(c.get("n"), int):
            _el(cprops, "property", {"name": "n", "value": str(c["n"])})
        ci = c.get("ci")
        if isinstance(ci, list) and len(ci) == 2:
            _el(cprops, "property", {"name": "ci95", "value": f"[{ci[0]!r}, {ci[1]!r}]"})
        if c.get("inconclusive"):
            _el(cprops, "property", {"name": "inconclusive", "value": "true"})
        if status == "fail":
            _el(case, "failure", {"message": message or "FAIL", "type": "fail"}, detail)
        elif status == "error":
            _el(case, "error", {"message": message or "ERROR", "type": "error"}, detail)
        elif status == "skipped":
            _el(case, "skipped", {"message": message or "skipped"})
        else:
            _el(case, "system-out", None, detail)
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
