"""CI conveniences: the GitHub Actions job summary and ``::warning::``/``::error::`` annotations.

* :func:`append_step_summary` appends a Markdown verdict table (methods × checks, status in
  words, not colour alone) to the file named by ``$GITHUB_STEP_SUMMARY``.
* :func:`annotations` gives one workflow command per FAIL/ERROR (``::error``) and WARN
  (``::warning``) cell, escaped as GitHub documents, so a file name or label cannot inject a
  command or a line break.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..result import dropped_text
from .context import (
    STATUS_TEXT,
    as_dict,
    as_list,
    check_order,
    fmt,
    gate_status_of,
    status_of,
    variant_label,
    verdict_rows,
)

__all__ = [
    "step_summary_markdown",
    "append_step_summary",
    "annotations",
    "emit_annotations",
    "MAX_ANNOTATIONS",
]

MAX_ANNOTATIONS = 50  # GitHub shows at most 50 annotations of a kind per job
_ICON = {"pass": "✅", "warn": "⚠️", "fail": "❌", "error": "💥", "skipped": "⏭️"}
_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}()#+!|~])")


def md(text: Any) -> str:
    """Text safe inside a GitHub Markdown table cell (no HTML, no formatting, no line break)."""
    s = html.escape(" ".join(str("" if text is None else text).split()), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", s)


def step_summary_markdown(doc: dict[str, Any]) -> str:
    summary, model, inputs = (
        as_dict(doc.get("summary")),
        as_dict(doc.get("model")),
        as_dict(doc.get("inputs")),
    )
    status = str(summary.get("status") or "error").lower()
    checks = check_order(doc)
    gate = "failed" if summary.get("gate_failed") else "passed"
    lines = [
        f"## saliaudit: {_ICON.get(status, '')} {STATUS_TEXT.get(status, status.upper())}",
        "",
        f"Model {md(Path(str(model.get('path') or 'model')).name)} (sha256 "
        f"{md(str(model.get('sha256') or '')[:12])}…) · {md(inputs.get('loaded') or 0)} images audited, "
        f"{len(as_list(inputs.get('skipped')))} skipped · gate \\-\\-fail\\-on "
        f"{md(summary.get('fail_on') or 'fail')} {gate}",
        "",
    ]
    drop_line = dropped_text(as_dict(summary.get("dropped")))
    if drop_line:
        failed = as_dict(summary.get("dropped")).get("exceeded") and summary.get("gate_failed")
        lines += [("**Gate failed:** " if failed else "") + md(drop_line) + ".", ""]
    rows = verdict_rows(doc)
    if rows and checks:
        lines.append("| map | " + " | ".join(md(c) for c in checks) + " |")
        lines.append("|---|" + "---|" * len(checks))
        for r in rows:
            cells = []
            for c in checks:
                cell = r["cells"].get(c)
                if cell is None:
                    cells.append("")
                    continue
                s = status_of(cell)
                value = f" {md(fmt(cell.get('value')))}" if cell.get("value") is not None else ""
                mark = (
                    ""
                    if cell.get("control") is None
                    else (
                        " (control: expected)"
                        if cell.get("control") == "expected"
                        else " (control passed: check unreliable)"
                        if cell.get("control") == "unexpected"
                        else " (control)"
                    )
                )
                cells.append(f"{_ICON[s]} {STATUS_TEXT[s]}{value}{mark}")
            lines.append(f"| {md(r['label'])} | " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines += ["No check was run.", ""]
    caveats = [c for c in as_list(doc.get("caveats")) if isinstance(c, dict) and c.get("message")]
    if caveats:
        lines.append("**Post-processing caveats**")
        lines.append("")
        lines += [f"- {md(c['message'])}" for c in caveats[:8]]
        lines.append("")
    return "\n".join(lines) + "\n"


def append_step_summary(doc: dict[str, Any], path: str | os.PathLike[str] | None = None) -> Path | None:
    """Append the summary to ``path`` (default ``$GITHUB_STEP_SUMMARY``); ``None`` when unset."""
    target = path if path is not None else os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    p = Path(target)
    with open(p, "a", encoding="utf-8") as fh:
        fh.write(step_summary_markdown(doc))
    return p


def _data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _prop(s: str) -> str:
    return _data(s).replace(":", "%3A").replace(",", "%2C")


def annotations(doc: dict[str, Any], limit: int = MAX_ANNOTATIONS) -> list[str]:
    """Workflow commands: ``::error`` for FAIL/ERROR cells, then ``::warning`` for WARN."""
    cells = [c for c in as_list(doc.get("checks")) if isinstance(c, dict)]
    out = []
    for level, statuses in (("error", ("fail", "error")), ("warning", ("warn",))):
        for c in cells:
            s = gate_status_of(c)  # a control's expected failure is no finding
            if s not in statuses:
                continue
            title = f"saliaudit {c.get('check')}: {variant_label(c)} {STATUS_TEXT[status_of(c)]}"
            value = (
                f" ({c.get('metric') or 'value'} {fmt(c.get('value'))})" if c.get("value") is not None else ""
            )
            out.append(
                f"::{level} title={_prop(title)}::{_data(str(c.get('message') or STATUS_TEXT[s]) + value)}"
            )
    if len(out) > limit:
        rest = len(out) - limit + 1
        out = out[: limit - 1] + [f"::warning title=saliaudit::{rest} more findings in results.json"]
    return out


def emit_annotations(doc: dict[str, Any], write: Callable[[str], Any] | None = None) -> int:
    """Print the annotations on stdout (where the runner reads them); returns how many."""
    lines = annotations(doc)
    for line in lines:
        (write or print)(line)
    return len(lines)
