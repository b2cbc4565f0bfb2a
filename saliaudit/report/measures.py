"""The "measures" table of a check section: other measures of the same question, judged on the
same images and shown beside the one that decides the verdict.

A check that measures alternatives puts them in each cell's ``series["measures"]``
(``{name: {value, n, ci, status, inconclusive, selected, differs, computed, why}}``) and
describes them in its ``check_info["measures"]`` (``{name: {title, text}}``); the randomization
check does so for MPRT, sMPRT and eMPRT (Hedström et al. 2023). Results without them render
without the table.
"""

from __future__ import annotations

from typing import Any

from .context import as_dict, fmt, status_of, variant_label

__all__ = ["measures_view"]


def _entry(m: dict[str, Any]) -> str:
    """One measure of one cell in words: ``0.445 [0.397, 0.5], n = 8: WARN (inconclusive)``."""
    if not m.get("computed", True):
        return "not computed"
    if m.get("value") is None:
        return "no finite value"
    ci = m.get("ci") if isinstance(m.get("ci"), list) else None
    text = fmt(m.get("value")) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")
    text += f", n = {m.get('n')}" if m.get("n") is not None else ""
    status = str(m.get("status") or "")
    if status:
        text += f": {status.upper()}" + (" (inconclusive)" if m.get("inconclusive") else "")
    return text


def measures_view(cells: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any] | None:
    """The table (one row per map, one column per measure), the sentence per measure, and
    which measure decided; ``None`` when no cell carries ``series["measures"]``."""
    judged = [
        c for c in cells if status_of(c) != "skipped" and as_dict(as_dict(c.get("series")).get("measures"))
    ]
    if not judged:
        return None
    described = as_dict(info.get("measures"))
    names: list[str] = []
    for c in judged:
        for k in as_dict(as_dict(c.get("series")).get("measures")):
            if k not in names:
                names.append(str(k))
    title = {k: str(as_dict(described.get(k)).get("title") or k) for k in names}
    selected = next(
        (
            k
            for c in judged
            for k, m in as_dict(c["series"]["measures"]).items()
            if as_dict(m).get("selected")
        ),
        None,
    )
    rows, skipped = [], set()
    for c in judged:
        ms = as_dict(c["series"]["measures"])
        entries = [_entry(as_dict(ms.get(k))) if k in ms else "–" for k in names]
        for k in names:
            if not as_dict(ms.get(k)).get("computed", True):
                skipped.add(k)
        rows.append(
            {
                "label": variant_label(c),
                "control": bool(c.get("control")),
                "cells": entries,
                "differs": [bool(as_dict(ms.get(k)).get("differs")) for k in names],
            }
        )
    texts = [
        str(
            as_dict(described.get(k)).get("text")
            or as_dict(judged[0]["series"]["measures"].get(k)).get("measure")
            or ""
        )
        for k in names
    ]
    why = next(
        (
            str(as_dict(c["series"]["measures"].get(k)).get("why") or "")
            for c in judged
            for k in sorted(skipped)
            if as_dict(c["series"]["measures"].get(k)).get("why")
        ),
        "",
    )
    intro = (
        f"The verdict is decided by {title.get(selected, selected)}; the other measures are taken "
        "on the same images and judged by their own thresholds through their own 95 % interval. "
        "Where one of them gives another verdict than the deciding measure's thresholds (before "
        "the comparison with the controls), the finding says so (marked * here)."
        if selected
        else "Each measure judged by its own thresholds through its 95 % interval."
    )
    return {
        "heads": [title[k] + (" (verdict)" if k == selected else "") for k in names],
        "rows": rows,
        "texts": [t for t in texts if t],
        "intro": intro,
        "not_computed": (", ".join(title[k] for k in sorted(skipped)) + f" {why}") if skipped else "",
    }
