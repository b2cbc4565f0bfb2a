"""Compare two audits: which verdicts and values changed, and whether the change is a regression.

``saliaudit compare OLD/results.json NEW/results.json`` and ``saliaudit report --baseline``
use :func:`compare_audits`, which takes the two ``results.json`` documents (never a model) and
returns a :class:`Comparison`, written as ``diff.json`` (docs/compare.md). Cells are matched
by (check, method, ψ or post-processing). For each matched cell:

* the verdicts, as the gate judges them (an ERROR counts as FAIL, a control's expected FAIL as
  PASS): a worse verdict (PASS → WARN/FAIL, WARN → FAIL) is a regression, a better one an
  improvement;
* for the same verdict, the change of the value ``new − old`` with a 95 % t interval
  (:func:`saliaudit.stats.difference_interval`), paired over the images both audits measured
  (the same name and content; Student's t), unpaired when fewer than 2 are shared (Welch's t). An interval that
  excludes zero in the check's bad direction (``higher_is_better``) is a regression, in the
  good direction an improvement; one that includes zero is "unchanged (no significant
  change)". A worst-case check (``aggregate`` ``worst``) and a control are decided by their
  verdict alone.

The header (:mod:`saliaudit.compare_header`) says what differs between the two audits: model,
images, seed, settings, versions, and warns when a compared check was defined differently.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .compare_header import audit_identity, header_and_warnings
from .errors import UsageError
from .report.context import (
    STATUS_TEXT,
    as_dict,
    as_list,
    check_info,
    fmt,
    gate_status_of,
    status_of,
    variant_label,
)
from .result import _finite
from .stats import CONFIDENCE, difference_interval

__all__ = [
    "DIFF_SCHEMA_VERSION",
    "CellChange",
    "Comparison",
    "ComparisonInputError",
    "compare_audits",
    "load_audit",
    "FAIL_ON",
]

DIFF_SCHEMA_VERSION = "1.0"
FAIL_ON = ("regression", "never")
#: Gate severity of a verdict (``saliaudit.result``): an ERROR counts as a FAIL.
SEVERITY = {"pass": 0, "warn": 1, "fail": 2, "error": 2}
#: A change smaller than this, relative to ``1 + |old value|``, is numerical noise (another
#: device or library build), never a regression or an improvement.
TOLERANCE = 1e-6
CLASSES = ("regression", "improvement", "unchanged", "not compared")


class ComparisonInputError(UsageError):
    """A file given to ``compare`` or ``--baseline`` is not a results.json this saliaudit reads
    (exit 2, like any input the user named that cannot be used)."""


def load_audit(path: Path) -> dict[str, Any]:
    """Read and validate a ``results.json`` to compare; :class:`ComparisonInputError` names
    the file and says what to do."""
    from .report.render import load_results

    hint = "pass the results.json that saliaudit report wrote"
    try:
        doc = load_results(
            Path(path),
            version_hint="compare audits written by saliaudit 1.x, or rerun that audit with this saliaudit",
        )
    except UsageError as err:
        raise ComparisonInputError(str(err)) from None
    if doc.get("kind") == "saliaudit comparison":
        raise ComparisonInputError("is a diff.json of saliaudit compare, not an audit", path=path, hint=hint)
    if not isinstance(doc.get("checks"), list):
        raise ComparisonInputError("not an audit's results (no checks list)", path=path, hint=hint)
    return doc


@dataclass
class CellChange:
    """One (check, method, ψ/post) cell present in both audits."""

    check: str
    method: str
    psi: str | None
    post: str | None
    variant: str
    metric: str
    higher_is_better: bool
    control: str | None
    old: dict[str, Any]
    new: dict[str, Any]
    #: ``new.value − old.value``, or None when a side has no value.
    difference: float | None
    #: ``{estimate, ci, n, pairing, ci_method, how}`` of the tested change, or None (see
    #: ``reason``); ``estimate`` is the mean difference the interval is about.
    change: dict[str, Any] | None
    #: ``worse``, ``better``, ``same`` or ``not comparable`` (a SKIPPED side).
    verdict: str
    classification: str
    reason: str


@dataclass
class Comparison:
    """The comparison of two audits: the ``diff.json`` document (``to_dict``)."""

    old: dict[str, Any]
    new: dict[str, Any]
    header: dict[str, Any]
    warnings: list[str]
    cells: list[CellChange]
    appeared: list[dict[str, Any]] = field(default_factory=list)
    disappeared: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "schema_version": DIFF_SCHEMA_VERSION,
            "kind": "saliaudit comparison",
            "tool": {"name": "saliaudit", "version": __version__},
            "statistics": {
                "confidence": CONFIDENCE,
                "interval": "t interval of the change new − old: Student's t of the per-image "
                "differences over the shared images (paired), else Welch's t (unpaired)",
                "tolerance": TOLERANCE,
            },
            **asdict(self),
        }
        return _finite(doc)


def _side(cell: dict[str, Any]) -> dict[str, Any]:
    ci = cell.get("ci")
    return {
        "status": status_of(cell),
        "gate_status": gate_status_of(cell),
        "value": _num(cell.get("value")),
        "n": cell.get("n") if isinstance(cell.get("n"), int) else None,
        "ci": ci if isinstance(ci, list) and len(ci) == 2 else None,
        "inconclusive": bool(cell.get("inconclusive")),
        "control": cell.get("control"),
        "message": str(cell.get("message") or ""),
    }


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _key(cell: dict[str, Any]) -> tuple[str, str, str | None, str | None]:
    return (
        str(cell.get("check")),
        str(cell.get("method")),
        cell.get("psi") or None,
        cell.get("post") or None,
    )


def _per_image(cell: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in as_list(cell.get("per_image")):
        v = _num(as_dict(r).get("value"))
        if v is not None and as_dict(r).get("image") is not None:
            out.setdefault(str(r["image"]), v)
    return out


def _tested_change(
    old: dict[str, Any], new: dict[str, Any], pairable: set[str]
) -> tuple[dict[str, Any] | None, str]:
    """The change of the value with its interval, or ``(None, why not)``."""
    a, b = _per_image(old), _per_image(new)
    shared = sorted(set(a) & set(b) & pairable)
    if len(shared) >= 2:
        iv = difference_interval([a[i] for i in shared], [b[i] for i in shared], paired=True)
        pairing, how = "paired", f"paired over {len(shared)} shared images"
    else:
        iv = difference_interval(list(a.values()), list(b.values()), paired=False)
        pairing = "unpaired"
        how = f"unpaired: {len(a)} old and {len(b)} new images" + (
            f", only {len(shared)} shared" if shared else ", none shared"
        )
    if iv is None:
        return None, (
            f"not tested: fewer than 2 per-image values on a side ({len(a)} old, {len(b)} new)"
            if pairing == "unpaired"
            else "not tested"
        )
    change = {
        "estimate": iv.mean,
        "ci": [iv.lo, iv.hi],
        "n": len(shared) if pairing == "paired" else iv.n,
        "pairing": pairing,
        "ci_method": iv.method,
        "how": how,
    }
    return change, how


def _significant(change: dict[str, Any], old_value: float | None) -> int:
    """+1: the interval lies above zero, −1: below, 0: it includes zero (or the change is
    below the numerical tolerance)."""
    lo, hi = change["ci"]
    scale = TOLERANCE * (1.0 + abs(old_value or 0.0))
    if lo > scale:
        return 1
    if hi < -scale:
        return -1
    return 0


def _verdict_text(side: dict[str, Any]) -> str:
    text = STATUS_TEXT.get(side["status"], side["status"].upper())
    if side.get("control"):
        return f"{text} ({side['control']} control)"
    return text + (" (inconclusive)" if side.get("inconclusive") else "")


def _classify(cell: CellChange, info: dict[str, Any]) -> None:
    """Fill ``verdict``, ``classification`` and ``reason`` of a matched cell."""
    o, n = cell.old, cell.new
    vo, vn = _verdict_text(o), _verdict_text(n)
    move = f"{vo} → {vn}" if vo != vn else f"{vo} in both"
    if "skipped" in (o["gate_status"], n["gate_status"]):
        side = "old" if o["gate_status"] == "skipped" else "new"
        cell.verdict, cell.classification = "not comparable", "not compared"
        cell.reason = (
            f"{move}: skipped in both audits"
            if o["gate_status"] == n["gate_status"]
            else f"{move}: the {side} audit skipped this cell, nothing to compare"
        )
        return
    so, sn = SEVERITY[o["gate_status"]], SEVERITY[n["gate_status"]]
    ch = cell.change
    direction = _significant(ch, o["value"]) if ch is not None else 0
    if cell.control:
        value = "a control is judged by its verdict alone"
    elif str(info.get("aggregate")) == "worst":
        value = "a worst-case check (every image checked) is judged by its verdict"
    elif ch is None:
        value = f"value change {cell.reason}"
    else:
        interval = f"{_signed(ch['estimate'])}, 95 % CI [{_signed(ch['ci'][0])}, {_signed(ch['ci'][1])}], {ch['how']}"
        if direction == 0:
            value = f"change {interval}: the interval includes zero (no significant change)"
        else:
            good = (direction > 0) == bool(cell.higher_is_better)
            value = (
                f"the value is significantly {'higher' if direction > 0 else 'lower'} "
                f"({'better' if good else 'worse'}: {'higher' if cell.higher_is_better else 'lower'} "
                f"is better): change {interval}"
            )
    cell.reason = f"verdict {move}; {value}"
    if sn != so:  # the verdict decides
        cell.verdict = "worse" if sn > so else "better"
        cell.classification = "regression" if sn > so else "improvement"
        return
    cell.verdict = "same"
    if direction == 0:
        cell.classification = "unchanged"
    else:
        cell.classification = (
            "improvement" if (direction > 0) == bool(cell.higher_is_better) else "regression"
        )


def _signed(v: float) -> str:
    return ("+" if v > 0 else "") + fmt(float(v))


def _brief(cell: dict[str, Any]) -> dict[str, Any]:
    return {
        "check": str(cell.get("check")),
        "method": str(cell.get("method")),
        "psi": cell.get("psi") or None,
        "post": cell.get("post") or None,
        "variant": variant_label(cell),
        **{k: v for k, v in _side(cell).items() if k in ("status", "value", "n", "ci", "control")},
    }


def compare_audits(
    old: dict[str, Any],
    new: dict[str, Any],
    *,
    old_path: str | Path = "old",
    new_path: str | Path = "new",
    fail_on: str = "regression",
) -> Comparison:
    """Compare the ``results.json`` documents ``old`` and ``new`` (see the module docstring)."""
    if fail_on not in FAIL_ON:
        raise UsageError(f"invalid --fail-on {fail_on!r}", hint="choose regression or never")
    header, warnings, pairable = header_and_warnings(old, new)
    old_cells = {_key(c): c for c in reversed(as_list(old.get("checks"))) if isinstance(c, dict)}
    new_cells = {_key(c): c for c in reversed(as_list(new.get("checks"))) if isinstance(c, dict)}
    order = list(dict.fromkeys(_key(c) for c in as_list(new.get("checks")) if isinstance(c, dict)))
    order += [k for k in dict.fromkeys(_key(c) for c in as_list(old.get("checks")) if isinstance(c, dict))]
    order = list(dict.fromkeys(order))
    infos: dict[str, dict[str, Any]] = {}
    cells: list[CellChange] = []
    for key in order:
        if key not in old_cells or key not in new_cells:
            continue
        oc, nc = old_cells[key], new_cells[key]
        name = key[0]
        info = infos.setdefault(name, check_info(new, name))
        o, n = _side(oc), _side(nc)
        diff = None if o["value"] is None or n["value"] is None else n["value"] - o["value"]
        control = nc.get("control") or oc.get("control")
        change, why = (None, "not tested")
        judged = all(s["status"] in ("pass", "warn", "fail") for s in (o, n))
        if judged and not control and str(info.get("aggregate")) != "worst":
            change, why = _tested_change(oc, nc, pairable)
        cell = CellChange(
            check=name,
            method=key[1],
            psi=key[2],
            post=key[3],
            variant=variant_label(nc),
            metric=str(nc.get("metric") or info.get("metric") or "value"),
            higher_is_better=bool(info.get("higher_is_better")),
            control=control,
            old=o,
            new=n,
            difference=diff,
            change=change,
            verdict="",
            classification="",
            reason=why,
        )
        _classify(cell, info)
        cells.append(cell)
    appeared = [_brief(new_cells[k]) for k in order if k in new_cells and k not in old_cells]
    disappeared = [_brief(old_cells[k]) for k in order if k in old_cells and k not in new_cells]
    counts = {c: sum(1 for x in cells if x.classification == c) for c in CLASSES}
    tested = sum(1 for x in cells if x.change is not None)
    summary = {
        "regressions": counts["regression"],
        "improvements": counts["improvement"],
        "unchanged": counts["unchanged"],
        "not_compared": counts["not compared"],
        "compared": len(cells),
        "appeared": len(appeared),
        "disappeared": len(disappeared),
        "values_tested": tested,
        "status": "regression" if counts["regression"] else "no regression",
        "fail_on": fail_on,
        "gate_failed": fail_on == "regression" and counts["regression"] > 0,
        "how": (
            "A cell regressed when its verdict got worse (PASS → WARN or FAIL, WARN → FAIL; an "
            "ERROR counts as FAIL), or, with the same verdict, when the 95 % interval of its "
            "change excludes zero in the check's bad direction. Each interval is 95 % on its "
            f"own: among {tested} tested values that did not really change, about "
            f"{tested * (1 - CONFIDENCE) / 2:.1f} would be flagged as regressions by chance."
        ),
    }
    return Comparison(
        old=audit_identity(old, old_path),
        new=audit_identity(new, new_path),
        header=header,
        warnings=warnings,
        cells=cells,
        appeared=appeared,
        disappeared=disappeared,
        summary=summary,
    )


def variant_key(cell: dict[str, Any]) -> str:
    """``check · method/variant`` of a diff.json cell, for listings."""
    return f"{cell.get('check')} · {variant_label(cell)}"


def summary_lines(diff: dict[str, Any], limit: int = 20) -> list[str]:
    """The terminal summary of a comparison: the counts, then each regression in one line."""
    s = as_dict(diff.get("summary"))
    lines = [
        f"compare: {s.get('regressions', 0)} regressions, {s.get('improvements', 0)} improvements, "
        f"{s.get('unchanged', 0)} unchanged, {s.get('not_compared', 0)} not compared "
        f"({s.get('compared', 0)} cells in both; {s.get('appeared', 0)} appeared, "
        f"{s.get('disappeared', 0)} disappeared)"
    ]
    lines += [f"warning: {w}" for w in as_list(diff.get("warnings"))]
    regressions = [c for c in as_list(diff.get("cells")) if as_dict(c).get("classification") == "regression"]
    for c in regressions[:limit]:
        lines.append(f"regression: {variant_key(c)}: {c.get('reason')}")
    if len(regressions) > limit:
        lines.append(f"... and {len(regressions) - limit} more regressions (see diff.json)")
    return lines
