"""What differs between two audits, for the top of a comparison (``saliaudit compare``).

:func:`header_and_warnings` lines up the model, the images, the seed, the settings and the
versions of two ``results.json`` documents side by side, and warns when a check both audits
judged was defined differently (other thresholds or parameters, another metric or direction):
a verdict that changed may then come from the definition rather than the model. It also
returns the images that can be paired: the same name and, where both record it, the same
content (sha256).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report.context import as_dict, as_list, check_info

__all__ = ["header_and_warnings", "audit_identity", "OUTPUT_ONLY"]

#: Settings that change how the results are written, not what is measured.
OUTPUT_ONLY = frozenset(
    {"output", "format", "force", "examples", "examples_html", "page_size", "annotations", "overlays"}
)
LISTED = 50  # image names listed per side when the image sets differ


def audit_identity(doc: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Which audit this is: the file, when it ran, its overall status and the model."""
    run, summary, model = as_dict(doc.get("run")), as_dict(doc.get("summary")), as_dict(doc.get("model"))
    return {
        "path": str(path),
        "started_at": run.get("started_at"),
        "status": summary.get("status"),
        "model": model.get("path"),
        "model_sha256": model.get("sha256"),
        "images": as_dict(doc.get("inputs")).get("loaded"),
        "finished": not (summary.get("reason") and summary.get("status") == "error"),
        "reason": summary.get("reason"),
    }


def _row(what: str, old: Any, new: Any, note: str = "") -> dict[str, Any]:
    return {"what": what, "old": old, "new": new, "same": old == new, "note": note}


def _images(doc: dict[str, Any]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for r in as_list(doc.get("images")):
        if isinstance(r, dict) and r.get("image") is not None:
            out.setdefault(str(r["image"]), r.get("sha256"))
    return out


def _image_overlap(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    a, b = _images(old), _images(new)
    shared = set(a) & set(b)
    changed = sorted(i for i in shared if a[i] and b[i] and a[i] != b[i])
    pairable = shared - set(changed)
    if not a or not b:  # results without an images list: pair by the per-image names alone
        pairable = {
            str(r.get("image"))
            for d in (old, new)
            for c in as_list(d.get("checks"))
            for r in as_list(as_dict(c).get("per_image"))
            if isinstance(r, dict)
        }
    return (
        {
            "old": len(a),
            "new": len(b),
            "shared": len(shared),
            "paired": len(pairable & shared) if a and b else None,
            "only_old": sorted(set(a) - shared)[:LISTED],
            "only_new": sorted(set(b) - shared)[:LISTED],
            "only_old_count": len(set(a) - shared),
            "only_new_count": len(set(b) - shared),
            "changed_content": changed[:LISTED],
            "changed_content_count": len(changed),
        },
        pairable,
    )


def _definition(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """The definition of check ``name`` in an audit: thresholds, parameters, metric, direction
    (the ``check_info`` entry, else the first cell of the check)."""
    entry = as_dict(as_dict(doc.get("check_info")).get(name))
    cell = next((c for c in as_list(doc.get("checks")) if isinstance(c, dict) and c.get("check") == name), {})
    info = check_info(doc, name)
    return {
        "thresholds": as_dict(entry.get("thresholds") if "thresholds" in entry else cell.get("thresholds")),
        "params": as_dict(entry.get("params") if "params" in entry else cell.get("params")),
        "metric": entry.get("metric") or cell.get("metric") or info.get("metric"),
        "higher_is_better": bool(info.get("higher_is_better")),
    }


def _dict_changes(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [
        f"{k} {a.get(k, 'unset')!r} → {b.get(k, 'unset')!r}"
        for k in sorted(set(a) | set(b), key=str)
        if a.get(k) != b.get(k)
    ]


def _check_definitions(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    names_old = {str(c.get("check")) for c in as_list(old.get("checks")) if isinstance(c, dict)}
    names_new = [str(c.get("check")) for c in as_list(new.get("checks")) if isinstance(c, dict)]
    rows, warnings = [], []
    for name in dict.fromkeys(n for n in names_new if n in names_old):
        a, b = _definition(old, name), _definition(new, name)
        changes = []
        for key in ("thresholds", "params"):
            diff = _dict_changes(a[key], b[key])
            if diff:
                changes.append(f"{key}: " + ", ".join(diff))
        if a["metric"] != b["metric"]:
            changes.append(f"metric: {a['metric']!r} → {b['metric']!r}")
        if a["higher_is_better"] != b["higher_is_better"]:
            changes.append(f"higher_is_better: {a['higher_is_better']} → {b['higher_is_better']}")
        if changes:
            rows.append({"check": name, "changes": changes})
            warnings.append(
                f"{name} is defined differently in the two audits ({'; '.join(changes)}): its verdict "
                "changes may come from the definition, not the model; rerun both with the same settings "
                "to compare the model alone"
            )
    return rows, warnings


def header_and_warnings(
    old: dict[str, Any], new: dict[str, Any]
) -> tuple[dict[str, Any], list[str], set[str]]:
    """``(header, warnings, pairable images)`` of a comparison; the header's ``rows`` line up
    what identifies each audit (model, images, seed, versions, device, profile), ``settings``
    every effective setting that differs, ``checks`` the checks defined differently."""
    mo, mn = as_dict(old.get("model")), as_dict(new.get("model"))
    ro, rn = as_dict(old.get("run")), as_dict(new.get("run"))
    vo, vn = (
        as_dict(as_dict(old.get("config")).get("values")),
        as_dict(as_dict(new.get("config")).get("values")),
    )
    images, pairable = _image_overlap(old, new)
    rows = [
        _row("model", mo.get("path"), mn.get("path")),
        _row("model sha256", mo.get("sha256"), mn.get("sha256")),
        _row("model format", mo.get("format"), mn.get("format")),
        _row(
            "images (IMAGES)",
            as_dict(old.get("inputs")).get("source"),
            as_dict(new.get("inputs")).get("source"),
        ),
        _row(
            "images audited",
            images["old"],
            images["new"],
            f"{images['shared']} shared by name"
            + (
                f", {images['changed_content_count']} of them with other content"
                if images["changed_content_count"]
                else ""
            ),
        ),
        _row("seed", ro.get("seed"), rn.get("seed")),
        _row("profile", vo.get("profile"), vn.get("profile")),
        _row("saliaudit", as_dict(old.get("tool")).get("version"), as_dict(new.get("tool")).get("version")),
    ]
    versions_o, versions_n = as_dict(ro.get("versions")), as_dict(rn.get("versions"))
    for key in dict.fromkeys([*versions_o, *versions_n]):
        if key != "saliaudit":
            rows.append(_row(str(key), versions_o.get(key), versions_n.get(key)))
    rows += [
        _row("device", ro.get("device"), rn.get("device")),
        _row("started", ro.get("started_at"), rn.get("started_at")),
        _row(
            "overall verdict",
            as_dict(old.get("summary")).get("status"),
            as_dict(new.get("summary")).get("status"),
        ),
    ]
    rows[-2]["same"] = True  # the start time always differs: not a difference worth flagging
    settings = [
        {"key": str(k), "old": vo.get(k), "new": vn.get(k), "output_only": k in OUTPUT_ONLY}
        for k in dict.fromkeys([*vo, *vn])
        if vo.get(k) != vn.get(k)
    ]
    checks, warnings = _check_definitions(old, new)
    if images["changed_content_count"]:
        warnings.append(
            f"{images['changed_content_count']} images have the same name but other content in the two "
            "audits; they are not paired"
        )
    for side, doc in (("old", old), ("new", new)):
        summary = as_dict(doc.get("summary"))
        reason = summary.get("reason")
        if reason and summary.get("status") == "error":
            warnings.append(
                f"the {side} audit did not finish ({reason}): its missing cells show as appeared or disappeared"
            )
    header = {"rows": rows, "images": images, "settings": settings, "checks": checks}
    return header, warnings, pairable
