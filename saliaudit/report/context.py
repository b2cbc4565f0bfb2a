"""Views of a results document shared by every renderer (HTML/PDF, JUnit, CI, terminal).

Everything here takes the ``results.json`` dictionary (``AuditResult.to_dict()``), never the
model, and tolerates documents that lack optional parts (results written before the checks
existed, or by an older saliaudit): missing keys read as empty.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["STATUSES", "STATUS_TEXT", "STATUS_SYMBOL", "KNOWN_CHECKS", "variant_of",
           "variant_label", "is_signed", "check_order", "method_order", "verdict_rows",
           "fmt", "cell_key", "as_list", "as_dict", "gate_status_of", "control_text", "cell_text"]

STATUSES = ("pass", "warn", "fail", "error", "skipped")
STATUS_TEXT = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "error": "ERROR",
               "skipped": "SKIPPED"}
STATUS_SYMBOL = {"pass": "✓", "warn": "!", "fail": "✗", "error": "⚠", "skipped": "–"}
#: Report order of the checks (docs/checks.md) when the results do not give one.
KNOWN_CHECKS = ("completeness", "class_sensitivity", "randomization", "perturbation",
                "sensitivity_n", "sign_flip", "bn_folding", "pointing_game")


def as_list(v: Any) -> list:
    return v if isinstance(v, list) else []


def as_dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def status_of(cell: dict[str, Any]) -> str:
    s = str(cell.get("status", "error")).lower()
    return s if s in STATUSES else "error"


def gate_status_of(cell: dict[str, Any]) -> str:
    """The status a cell gives the gate (as ``result.gate_status``): a control's expected
    failure counts as ``pass``, a control that passes a check it must fail as ``warn``."""
    s = status_of(cell)
    control = cell.get("control")
    if control is None or s in ("error", "skipped"):
        return s
    return "warn" if control == "unexpected" else "pass"


#: What a control cell's status means, for people.
CONTROL_TEXT = {"expected": "expected of a control", "unexpected": "a control passed: check unreliable",
                "reference": "control, for reference"}


def control_text(cell: dict[str, Any]) -> str:
    """``""`` for a method's cell; for a control's cell what its status means."""
    return CONTROL_TEXT.get(str(cell.get("control")), "") if cell.get("control") else ""


def cell_text(cell: dict[str, Any]) -> str:
    """``FAIL`` or, for a control, ``FAIL (expected of a control)``."""
    note = control_text(cell)
    return STATUS_TEXT[status_of(cell)] + (f" ({note})" if note else "")


def variant_of(cell: dict[str, Any]) -> str | None:
    """The ψ preset (FullGrad) or the post-processing (comparison methods) of a cell/map."""
    v = cell.get("psi") or cell.get("post")
    return str(v) if v else None


def variant_label(cell: dict[str, Any]) -> str:
    """``fullgrad/paper``, ``gradient/abs`` or ``fullgrad`` (same as ``CheckResult.variant``)."""
    v = variant_of(cell)
    method = str(cell.get("method", "?"))
    return f"{method}/{v}" if v else method


def cell_key(cell: dict[str, Any]) -> tuple[str, str | None]:
    return str(cell.get("method", "?")), variant_of(cell)


def is_signed(entry: dict[str, Any]) -> bool:
    """Whether a map keeps its sign (diverging colours) or is a magnitude (sequential).

    The map's own ``signed`` flag wins; otherwise it follows the declared sign handling:
    only ψ ``signed`` and the comparison post-processing ``signed`` keep the sign.
    """
    if isinstance(entry.get("signed"), bool):
        return entry["signed"]
    return entry.get("psi") == "signed" or entry.get("post") == "signed"


def check_order(doc: dict[str, Any]) -> list[str]:
    """Checks in report order: ``check_info`` order, then the known order, then the rest."""
    present = []
    for c in as_list(doc.get("checks")):
        if isinstance(c, dict) and c.get("check") and str(c["check"]) not in present:
            present.append(str(c["check"]))
    info = [str(k) for k in as_dict(doc.get("check_info"))]
    rank = {n: i for i, n in enumerate(info)}
    known = {n: len(info) + i for i, n in enumerate(KNOWN_CHECKS)}
    names = list(dict.fromkeys(info + present))
    return sorted(names, key=lambda n: (rank.get(n, known.get(n, 10_000)), names.index(n)))


def method_order(doc: dict[str, Any]) -> list[str]:
    """Methods in the order of ``methods`` (FullGrad first), then as the cells name them."""
    names = [str(m.get("method")) for m in as_list(doc.get("methods"))
             if isinstance(m, dict) and m.get("method")]
    names += [str(c.get("method")) for c in as_list(doc.get("checks"))
              if isinstance(c, dict) and c.get("method")]
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda n: (n != "fullgrad", names.index(n)))


def _variant_rank(doc: dict[str, Any]) -> dict[str, int]:
    values = as_dict(as_dict(doc.get("config")).get("values"))
    order = [*as_list(values.get("psi")), *as_list(values.get("post"))]
    return {str(v): i for i, v in enumerate(order)}


def verdict_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, variant): ``{method, variant, label, cells{check: cell}}``.

    A bare ``fullgrad`` row (the decomposition: completeness) comes before the ψ rows.
    """
    rows: dict[tuple[str, str | None], dict[str, Any]] = {}
    for c in as_list(doc.get("checks")):
        if not isinstance(c, dict):
            continue
        key = cell_key(c)
        row = rows.setdefault(key, {"method": key[0], "variant": key[1],
                                    "label": variant_label(c), "cells": {}})
        row["cells"].setdefault(str(c.get("check", "?")), c)
    morder = {m: i for i, m in enumerate(method_order(doc))}
    vrank = _variant_rank(doc)
    first = list(rows)
    return [rows[k] for k in sorted(rows, key=lambda k: (
        morder.get(k[0], 10_000), k[1] is not None, vrank.get(k[1] or "", 10_000), first.index(k)))]


def fmt(v: Any, digits: int = 3) -> str:
    """A number for people: 3 significant digits, scientific when tiny or huge, ``–`` if none."""
    if v is None or isinstance(v, bool):
        return "–" if v is None else ("yes" if v else "no")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        if v == 0:
            return "0"
        a = abs(v)
        if a < 1e-2 or a >= 1e6:
            return f"{v:.{max(digits - 1, 0)}e}"
        return f"{v:.0f}" if a >= 10 ** digits else f"{v:.{digits}g}"
    return str(v)
