"""The comparison of two audits as HTML, PDF and JUnit, from ``diff.json`` alone.

:func:`render_compare_html` fills ``templates/compare.html.j2`` with the report's Jinja
environment, stylesheet and macros (autoescaped, everything inline); the PDF goes through the
report's WeasyPrint path (:func:`saliaudit.report.pdf.pdf_from_html`: ``data:`` URIs only,
the bundled fonts). :func:`render_compare_junit` writes one test case per compared cell, a
regression being a ``<failure>``. :func:`write_comparison` writes the requested formats
atomically into an output folder, the PDF last.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from markupsafe import Markup

from .context import STATUS_SYMBOL, STATUS_TEXT, STATUSES, as_dict, as_list, fmt
from .output import atomic_write

__all__ = [
    "COMPARE_FILES",
    "BASELINE_FILES",
    "build_compare_context",
    "render_compare_html",
    "render_compare_pdf",
    "render_compare_junit",
    "write_comparison",
    "compare_and_write",
]

#: Files of ``saliaudit compare -o DIR`` per format.
COMPARE_FILES = {"json": "diff.json", "junit": "junit.xml", "html": "report.html", "pdf": "report.pdf"}
#: Files of ``saliaudit report --baseline``, next to the audit's own report.
BASELINE_FILES = {
    "json": "diff.json",
    "junit": "compare-junit.xml",
    "html": "compare.html",
    "pdf": "compare.pdf",
}
_ORDER = ("json", "junit", "html", "pdf")
_GROUPS = (
    (
        "regression",
        "Regressions",
        "The verdict got worse, or the value moved significantly in the bad direction.",
    ),
    (
        "improvement",
        "Improvements",
        "The verdict got better, or the value moved significantly in the good direction.",
    ),
    ("unchanged", "Unchanged", "The same verdict, and no change whose 95 % interval excludes zero."),
    ("not compared", "Not compared", "A side skipped the cell: there is nothing to compare."),
)


def _text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(_text(x) for x in v) or "[]"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_text(x)}" for k, x in v.items()) or "{}"
    return fmt(v) if not isinstance(v, str) else v


def _status(side: dict[str, Any]) -> str:
    s = str(side.get("status") or "error")
    return s if s in STATUSES else "error"


def _signed(v: Any) -> str:
    return ("+" if isinstance(v, (int, float)) and v > 0 else "") + fmt(v)


def _ci_text(change: dict[str, Any], difference: Any) -> str:
    """``[lo, hi]``; prefixed with the estimate when the interval is about another mean than
    the values' difference (paired over only some of the images)."""
    ci, est = as_list(change.get("ci")), change.get("estimate")
    if len(ci) != 2:
        return "–"
    text = f"[{_signed(ci[0])}, {_signed(ci[1])}]"
    if isinstance(est, (int, float)) and isinstance(difference, (int, float)):
        if not math.isclose(est, difference, rel_tol=1e-6, abs_tol=1e-12):
            text = f"{_signed(est)} {text}"
    return text


def _row(c: dict[str, Any]) -> dict[str, Any]:
    o, n = as_dict(c.get("old")), as_dict(c.get("new"))
    ch = as_dict(c.get("change"))
    return {
        "check": str(c.get("check")),
        "variant": str(c.get("variant")),
        "old": _status(o),
        "new": _status(n),
        "control": c.get("control"),
        "old_value": fmt(o.get("value")),
        "new_value": fmt(n.get("value")),
        "difference": _signed(c.get("difference")) if c.get("difference") is not None else "–",
        "ci": _ci_text(ch, c.get("difference")),
        "how": str(ch.get("how") or "not tested"),
        "direction": "higher is better" if c.get("higher_is_better") else "lower is better",
        "reason": str(c.get("reason") or ""),
        "classification": str(c.get("classification")),
    }


def build_compare_context(
    diff: dict[str, Any], *, target: str = "html", page_size: str = "a4"
) -> dict[str, Any]:
    """The template context of the comparison report, from the ``diff.json`` document."""
    from .html import PAGE_SIZES, _css, fonts_css

    s = as_dict(diff.get("summary"))
    old, new = as_dict(diff.get("old")), as_dict(diff.get("new"))
    header = as_dict(diff.get("header"))
    cells = [_row(c) for c in as_list(diff.get("cells")) if isinstance(c, dict)]
    groups = []
    for key, title, intro in _GROUPS:
        rows = [r for r in cells if r["classification"] == key]
        skipped_both = [r for r in rows if key == "not compared" and r["old"] == r["new"] == "skipped"]
        shown = [r for r in rows if r not in skipped_both]
        groups.append(
            {
                "key": key,
                "title": title,
                "intro": intro,
                "rows": shown,
                "count": len(rows),
                "skipped_both": len(skipped_both),
                "detailed": key in ("regression", "improvement"),
            }
        )
    failed = bool(s.get("gate_failed"))
    regressions = int(s.get("regressions") or 0)
    word = "fail" if regressions else "pass"
    gate = (
        "The gate (--fail-on regression) failed: exit code 1."
        if failed
        else "The gate passed."
        if s.get("fail_on") == "regression"
        else "No gate (--fail-on never)."
    )
    name_old = Path(str(old.get("model") or "model")).name
    name_new = Path(str(new.get("model") or "model")).name
    title = f"saliaudit comparison: {name_old}" + (f" → {name_new}" if name_new != name_old else "")
    tool = as_dict(diff.get("tool"))
    return {
        "target": target,
        "page_size": PAGE_SIZES.get(str(page_size).lower(), "A4"),
        "fonts_css": fonts_css() if target == "pdf" else Markup(""),
        "css": _css(),
        "meta": {
            "title": title,
            "author": f"saliaudit {tool.get('version') or ''}".strip(),
            "description": f"Comparison of {old.get('path')} (old) and {new.get('path')} (new)",
            "keywords": "saliency, audit, comparison, regression",
            "created": str(new.get("started_at") or ""),
        },
        "summary": {
            "word": word,
            "text": f"{regressions} regressions" if regressions else "No regression",
            "counts": [
                ("regressions", s.get("regressions", 0)),
                ("improvements", s.get("improvements", 0)),
                ("unchanged", s.get("unchanged", 0)),
                ("not compared", s.get("not_compared", 0)),
                ("appeared", s.get("appeared", 0)),
                ("disappeared", s.get("disappeared", 0)),
            ],
            "gate": gate,
            "how": str(s.get("how") or ""),
        },
        "audits": [("old", old), ("new", new)],
        "rows": [
            {
                "what": r.get("what"),
                "old": _text(r.get("old")),
                "new": _text(r.get("new")),
                "same": r.get("same"),
                "note": r.get("note") or "",
            }
            for r in as_list(header.get("rows"))
            if isinstance(r, dict)
        ],
        "images": as_dict(header.get("images")),
        "settings": [
            {**r, "old": _text(r.get("old")), "new": _text(r.get("new"))}
            for r in as_list(header.get("settings"))
            if isinstance(r, dict)
        ],
        "warnings": [str(w) for w in as_list(diff.get("warnings"))],
        "groups": groups,
        "appeared": [
            {**c, "value": fmt(c.get("value"))} for c in as_list(diff.get("appeared")) if isinstance(c, dict)
        ],
        "disappeared": [
            {**c, "value": fmt(c.get("value"))}
            for c in as_list(diff.get("disappeared"))
            if isinstance(c, dict)
        ],
        "statuses": [{"status": k, "text": STATUS_TEXT[k], "symbol": STATUS_SYMBOL[k]} for k in STATUSES],
    }


def render_compare_html(
    diff: dict[str, Any], *, target: str = "html", page_size: str = "a4", meta: dict[str, str] | None = None
) -> str:
    """The comparison report as one self-contained HTML document."""
    from .html import _environment

    ctx = build_compare_context(diff, target=target, page_size=page_size)
    ctx["meta"].update(meta or {})
    return _environment().get_template("compare.html.j2").render(**ctx)


def render_compare_pdf(
    diff: dict[str, Any], *, page_size: str = "a4", environ: dict[str, str] | None = None
) -> bytes:
    """The PDF of the comparison report; raises :class:`~saliaudit.report.pdf.PdfUnavailableError`."""
    from .pdf import load_weasyprint, pdf_dates, pdf_from_html

    weasyprint = load_weasyprint()
    started = {"run": {"started_at": as_dict(diff.get("new")).get("started_at")}}
    html = render_compare_html(diff, target="pdf", page_size=page_size, meta=pdf_dates(started, environ))
    return pdf_from_html(weasyprint, html, environ)


def render_compare_junit(diff: dict[str, Any]) -> str:
    """JUnit XML: one test case per cell both audits have; a regression is a ``<failure>``,
    a cell not compared is ``<skipped>``."""
    from .junit import _el, xml_text

    cells = [c for c in as_list(diff.get("cells")) if isinstance(c, dict)]
    s = as_dict(diff.get("summary"))
    attrs = {
        "name": "saliaudit compare",
        "tests": len(cells),
        "failures": sum(1 for c in cells if c.get("classification") == "regression"),
        "errors": 0,
        "skipped": sum(1 for c in cells if c.get("classification") == "not compared"),
        "time": "0",
    }
    root = ET.Element("testsuites", {k: xml_text(v) for k, v in attrs.items()})
    suite = _el(root, "testsuite", attrs)
    props = _el(suite, "properties")
    for name, value in (
        ("old", as_dict(diff.get("old")).get("path")),
        ("new", as_dict(diff.get("new")).get("path")),
        ("fail_on", s.get("fail_on")),
        ("gate_failed", str(bool(s.get("gate_failed"))).lower()),
        ("improvements", s.get("improvements")),
        ("appeared", s.get("appeared")),
        ("disappeared", s.get("disappeared")),
    ):
        if value is not None:
            _el(props, "property", {"name": name, "value": value})
    for w in as_list(diff.get("warnings")):
        _el(props, "property", {"name": "warning", "value": w})
    for c in cells:
        r = _row(c)
        case = _el(suite, "testcase", {"classname": c.get("check"), "name": c.get("variant"), "time": "0"})
        cprops = _el(case, "properties")
        for name, value in (
            ("classification", r["classification"]),
            ("old_status", r["old"]),
            ("new_status", r["new"]),
            ("difference", c.get("difference")),
            ("ci95", r["ci"] if r["ci"] != "–" else None),
            ("pairing", as_dict(c.get("change")).get("pairing")),
        ):
            if value is not None:
                _el(cprops, "property", {"name": name, "value": value})
        detail = f"{c.get('check')} · {c.get('variant')}: {r['reason']}"
        if r["classification"] == "regression":
            _el(case, "failure", {"message": r["reason"], "type": "regression"}, detail)
        elif r["classification"] == "not compared":
            _el(case, "skipped", {"message": r["reason"]})
        else:
            _el(case, "system-out", None, detail)
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_comparison(
    diff: dict[str, Any],
    out_dir: Path,
    formats: list[str],
    *,
    files: dict[str, str] = COMPARE_FILES,
    page_size: str = "a4",
    environ: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``formats`` (json = diff.json, junit, html, pdf) of the comparison into
    ``out_dir`` (atomically, the PDF last); returns the paths written."""
    from .render import results_json

    written = []
    for name in _ORDER:
        if name not in formats:
            continue
        if name == "json":
            data: str | bytes = results_json(diff)
        elif name == "junit":
            data = render_compare_junit(diff)
        elif name == "html":
            data = render_compare_html(diff, page_size=page_size)
        else:
            data = render_compare_pdf(diff, page_size=page_size, environ=environ)
        written.append(atomic_write(Path(out_dir) / files[name], data))
    return written


def compare_and_write(
    old: tuple[Path, dict[str, Any]],
    new: tuple[Path, dict[str, Any]],
    out_dir: Path,
    formats: list[str],
    *,
    fail_on: str = "regression",
    baseline: bool = False,
    page_size: str = "a4",
    quiet: bool = False,
) -> tuple[list[str], int, Any]:
    """Compare two loaded audits ``(path, results)`` and write the comparison into
    ``out_dir`` (the ``report --baseline`` names when ``baseline``). Returns the terminal
    lines (one with ``quiet``), the gate's exit code (0 or 1) and the
    :class:`~saliaudit.report.pdf.PdfUnavailableError` when the PDF could not be written (the
    other formats are), else None."""
    from ..compare import compare_audits, summary_lines
    from ..errors import EXIT_GATE, EXIT_OK
    from .pdf import PdfUnavailableError

    diff = compare_audits(old[1], new[1], old_path=old[0], new_path=new[0], fail_on=fail_on).to_dict()
    names = BASELINE_FILES if baseline else COMPARE_FILES
    pdf_error = None
    try:
        written = write_comparison(diff, out_dir, formats, files=names, page_size=page_size)
    except PdfUnavailableError as err:
        written, pdf_error = (
            [Path(out_dir) / names[f] for f in ("json", "junit", "html") if f in formats],
            err,
        )
    s = diff["summary"]
    code = EXIT_GATE if s["gate_failed"] else EXIT_OK
    if not quiet:
        return summary_lines(diff) + [f"wrote {p}" for p in written], code, pdf_error
    gate = "failed" if s["gate_failed"] else "passed" if fail_on != "never" else "off"
    first = Path(out_dir) / names["json" if "json" in formats else formats[0]]
    line = (
        f"saliaudit compare: {s['regressions']} regressions, {s['improvements']} improvements · "
        f"gate --fail-on {fail_on} {gate} (exit {code}) · {first}"
    )
    return [line], code, pdf_error
