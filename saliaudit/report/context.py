"""Views of a results document shared by every renderer (HTML/PDF, JUnit, CI, terminal).

Everything here takes the ``results.json`` dictionary (``AuditResult.to_dict()``), never the
model, and tolerates documents that lack optional parts (results written before the checks
existed, or by an older saliaudit): missing keys read as empty. What the renderers know about a
check comes from :func:`check_info`: the results' ``check_info`` entry, completed by the
registered check's class attributes, else by generic defaults.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "STATUSES",
    "STATUS_TEXT",
    "STATUS_SYMBOL",
    "variant_of",
    "variant_label",
    "is_signed",
    "check_order",
    "check_info",
    "method_order",
    "psi_methods",
    "verdict_rows",
    "fmt",
    "cell_key",
    "as_list",
    "as_dict",
    "gate_status_of",
    "control_text",
    "cell_text",
]

STATUSES = ("pass", "warn", "fail", "error", "skipped")
STATUS_TEXT = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "error": "ERROR", "skipped": "SKIPPED"}
STATUS_SYMBOL = {"pass": "✓", "warn": "!", "fail": "✗", "error": "⚠", "skipped": "–"}


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
CONTROL_TEXT = {
    "expected": "expected of a control",
    "unexpected": "a control passed: check unreliable",
    "reference": "control, for reference",
}


def control_text(cell: dict[str, Any]) -> str:
    """``""`` for a method's cell; for a control's cell what its status means."""
    return CONTROL_TEXT.get(str(cell.get("control")), "") if cell.get("control") else ""


def ci_text(cell: dict[str, Any], digits: int = 3) -> str:
    """``"n = 12, 95 % CI [0.31, 0.52]"`` for a judged cell (``""`` when not recorded)."""
    ci, n = cell.get("ci"), cell.get("n")
    if not isinstance(ci, list) or len(ci) != 2 or not all(isinstance(v, (int, float)) for v in ci):
        return f"n = {n}" if isinstance(n, int) else ""
    return f"n = {n}, 95 % CI [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


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


def _registered_info(name: str) -> dict[str, Any] | None:
    """:meth:`Check.describe` of a registered check (``None`` if nobody registered it)."""
    from ..checks import CHECKS, check_names

    check_names()  # discovers the check modules once
    cls = CHECKS.get(name)
    return cls.describe() if cls is not None else None


def check_info(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """Everything known about check ``name`` for this document: its ``check_info`` entry in
    the results, with the fields an older results file lacks taken from the registered check
    (:meth:`~saliaudit.checks.base.Check.describe`) or, for a check nobody registered, from
    generic defaults. The metric, thresholds and parameters are those of the run: empty when
    the entry lacks them (the cells carry them)."""
    from ..checks.base import generic_info

    entry = as_dict(as_dict(doc.get("check_info")).get(name))
    base = _registered_info(name) or generic_info(name)
    info = {**base, **{k: v for k, v in entry.items() if v is not None or k == "records"}}
    for key, empty in (("metric", ""), ("thresholds", {}), ("params", {})):
        if key not in entry:  # per run: the cells carry what the audit used
            info[key] = empty
    info["curves"] = {**as_dict(base.get("curves")), **as_dict(entry.get("curves"))}
    if not isinstance(info.get("order"), (int, float)) or isinstance(info.get("order"), bool):
        info["order"] = base["order"]
    info["short"] = str(info.get("short") or name)[:6]
    return info


def check_order(doc: dict[str, Any]) -> list[str]:
    """Checks in report order: by their ``order`` (results, else the registered check), then
    as ``check_info`` and the cells list them."""
    names = [str(k) for k in as_dict(doc.get("check_info"))]
    for c in as_list(doc.get("checks")):
        if isinstance(c, dict) and c.get("check"):
            names.append(str(c["check"]))
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda n: (check_info(doc, n)["order"], names.index(n)))


def method_order(doc: dict[str, Any]) -> list[str]:
    """Methods in the order of ``methods`` (the configured order), then as the cells name them."""
    names = [
        str(m.get("method")) for m in as_list(doc.get("methods")) if isinstance(m, dict) and m.get("method")
    ]
    names += [
        str(c.get("method")) for c in as_list(doc.get("checks")) if isinstance(c, dict) and c.get("method")
    ]
    return list(dict.fromkeys(names))


def psi_methods(doc: dict[str, Any]) -> list[str]:
    """Methods whose variants are ψ presets (FullGrad): ``option`` ``psi`` in ``methods``, or,
    in results without it, a method with a cell that has a ``psi``."""
    names = {
        str(m.get("method"))
        for m in as_list(doc.get("methods"))
        if isinstance(m, dict) and m.get("option") == "psi"
    }
    names |= {
        str(c.get("method")) for c in as_list(doc.get("checks")) if isinstance(c, dict) and c.get("psi")
    }
    return [m for m in method_order(doc) if m in names]


def _variant_rank(doc: dict[str, Any]) -> dict[str, int]:
    values = as_dict(as_dict(doc.get("config")).get("values"))
    order = [*as_list(values.get("psi")), *as_list(values.get("post"))]
    return {str(v): i for i, v in enumerate(order)}


def verdict_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, variant): ``{method, variant, label, cells{check: cell}}``.

    A method's bare row (FullGrad's decomposition: completeness) comes before its variants.
    """
    rows: dict[tuple[str, str | None], dict[str, Any]] = {}
    for c in as_list(doc.get("checks")):
        if not isinstance(c, dict):
            continue
        key = cell_key(c)
        row = rows.setdefault(
            key, {"method": key[0], "variant": key[1], "label": variant_label(c), "cells": {}}
        )
        row["cells"].setdefault(str(c.get("check", "?")), c)
    morder = {m: i for i, m in enumerate(method_order(doc))}
    vrank = _variant_rank(doc)
    first = list(rows)
    return [
        rows[k]
        for k in sorted(
            rows,
            key=lambda k: (
                morder.get(k[0], 10_000),
                k[1] is not None,
                vrank.get(k[1] or "", 10_000),
                first.index(k),
            ),
        )
    ]


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
        return f"{v:.0f}" if a >= 10**digits else f"{v:.{digits}g}"
    return str(v)
