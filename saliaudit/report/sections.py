"""The views of the report's fixed sections, from the results document alone: cover, verdict
table, post-processing caveats, completeness per image, skipped inputs and errors,
configuration and references. :mod:`saliaudit.report.html` puts them into the templates with
the per-check sections and their figures."""

from __future__ import annotations

import json
from typing import Any

from ..result import dropped_text
from .context import (
    STATUS_TEXT,
    STATUSES,
    as_dict,
    as_list,
    check_info,
    check_order,
    ci_text,
    control_text,
    fmt,
    gate_status_of,
    method_order,
    psi_methods,
    status_of,
    variant_label,
    verdict_rows,
)

__all__ = [
    "cover_view",
    "verdict_view",
    "caveats_view",
    "completeness_view",
    "problems_view",
    "configuration_view",
    "cell_view",
    "text_of",
    "check_title",
    "numbers_text",
    "REFERENCES",
]

PDF_TABLE_ROWS = 60  # long per-image tables in the PDF: the worst rows, the rest in the HTML

REFERENCES = [
    "Srinivas, S. & Fleuret, F. Full-Gradient Representation for Neural Network Visualization. NeurIPS 2019.",
    "Khakzar, A., Baselizadeh, S. & Navab, N. Rethinking Positive Aggregation and Propagation of "
    "Gradients in Gradient-based Saliency Methods. 2020.",
    "Ancona, M., Ceolini, E., Öztireli, C. & Gross, M. Towards better understanding of "
    "gradient-based attribution methods for Deep Neural Networks. ICLR 2018.",
    "Adebayo, J., Gilmer, J., Muelly, M., Goodfellow, I., Hardt, M. & Kim, B. Sanity Checks for "
    "Saliency Maps. NeurIPS 2018.",
]


def text_of(v: Any, default: str = "–") -> str:
    if v is None or v == "" or v == []:
        return default
    if isinstance(v, (list, tuple)):
        return ", ".join(text_of(i, "none") for i in v)
    if isinstance(v, dict):
        return json.dumps(v, ensure_ascii=False, sort_keys=True)
    if isinstance(v, float):
        return fmt(v)
    return str(v)


def numbers_text(v: Any, depth: int = 0, limit: int = 360) -> str:
    """A caveat's number(s) for people: 3 significant digits, verdicts in words, nested
    tables flattened (``paper FAIL 0.875, positive PASS 0.143``)."""
    if isinstance(v, dict):
        if "status" in v and set(v) <= {"status", "value", "message"}:
            text = " ".join(
                x
                for x in (
                    str(v.get("status", "")).upper(),
                    fmt(v.get("value")) if v.get("value") is not None else "",
                )
                if x
            )
        else:
            text = ", ".join(f"{k} {numbers_text(x, depth + 1)}" for k, x in v.items())
            text = f"({text})" if depth and len(v) > 1 else text
    elif isinstance(v, (list, tuple)):
        text = ", ".join(numbers_text(x, depth + 1) for x in v)
    else:
        text = fmt(v) if isinstance(v, (int, float)) or v is None else str(v)
    return text if depth or len(text) <= limit else text[: limit - 1] + "…"


def check_title(name: str, info: dict[str, Any]) -> str:
    return str(info.get("title") or name.replace("_", " ").capitalize())


def cover_view(doc: dict[str, Any]) -> dict[str, Any]:
    model, inputs, run = as_dict(doc.get("model")), as_dict(doc.get("inputs")), as_dict(doc.get("run"))
    summary, tool = as_dict(doc.get("summary")), as_dict(doc.get("tool"))
    counts = {s: int(as_dict(summary.get("counts")).get(s) or 0) for s in STATUSES}
    total = sum(counts.values())
    status = str(summary.get("status") or "error").lower()
    status = status if status in STATUSES else "error"
    fail_on = str(summary.get("fail_on") or "fail")
    gate = bool(summary.get("gate_failed"))
    parts = [f"{counts[s]} {STATUS_TEXT[s]}" for s in STATUSES if counts[s]]
    headline = (f"{total} verdicts: " + ", ".join(parts)) if total else "no check was run"
    undecided = int(summary.get("inconclusive") or 0)
    if undecided:
        need = summary.get("images_to_decide")
        headline += f"; {undecided} of them inconclusive (their 95 % interval lies across a threshold)" + (
            f"; the closest call would need about {need} images" if isinstance(need, int) else ""
        )
    controls = {
        k: int(as_dict(summary.get("controls")).get(k) or 0) for k in ("expected", "unexpected", "reference")
    }
    if any(controls.values()):
        headline += (
            f"; controls (model-independent maps): {controls['expected']} failed as they must"
            + (
                f", {controls['unexpected']} PASSED a check they must fail (that check is unreliable here)"
                if controls["unexpected"]
                else ""
            )
            + (f", {controls['reference']} for reference" if controls["reference"] else "")
        )
    dropped = as_dict(summary.get("dropped"))
    drop_line = dropped_text(dropped)
    if gate and dropped.get("exceeded"):
        level = {"fail": ("fail", "error"), "warn": ("warn", "fail", "error")}.get(fail_on, ())
        cells = any(gate_status_of(c) in level for c in as_list(doc.get("checks")) if isinstance(c, dict))
        gate_text = (
            f"The gate failed: {drop_line}"
            + (f"; also, cells reached --fail-on {fail_on}" if cells else "")
            + ". saliaudit exits with code 1 (verdicts resting on the images the model could "
            "handle would not describe the others)."
        )
    elif gate:
        gate_text = f"The gate --fail-on {fail_on} failed: saliaudit exits with code 1."
    else:
        gate_text = f"The gate --fail-on {fail_on} passed." + (f" {drop_line}." if drop_line else "")
    skipped = as_list(inputs.get("skipped"))
    size = model.get("input_size")
    rows = [
        ("Model", text_of(model.get("path"))),
        ("SHA-256", text_of(model.get("sha256"))),
        ("Format", text_of(model.get("format")) + (f" ({model['arch']})" if model.get("arch") else "")),
        ("Classes", text_of(model.get("num_classes"))),
        ("Input size", "×".join(str(s) for s in size) if isinstance(size, list) else text_of(size)),
        *_preprocessing_row(model),
        (
            "Images",
            f"{text_of(inputs.get('loaded'), '0')} audited of {text_of(inputs.get('found'), '0')} "
            f"found ({len(skipped)} skipped)" + (f" in {inputs['source']}" if inputs.get("source") else ""),
        ),
        ("Methods", text_of([m for m in method_order(doc)])),
        ("Checks", text_of(check_order(doc))),
        ("Date", text_of(run.get("started_at"))),
        ("Tool", f"{text_of(tool.get('name'), 'saliaudit')} {text_of(tool.get('version'))}"),
        ("Device · seed", f"{text_of(run.get('device'))} · {text_of(run.get('seed'))}"),
    ]
    plan = as_dict(doc.get("plan"))
    if plan:
        from .plan_text import cover_text

        rows.append(("Cost", cover_text(plan)))
    stats = as_dict(run.get("statistics"))
    how = ""
    if stats:
        how = (
            f"Each verdict rests on n images and a {stats.get('interval', '95 % interval')} of "
            "its value: PASS or FAIL only when the whole interval lies on that side of the "
            "threshold. A method must also beat the check's must-fail controls on the same "
            f"images ({stats.get('test', 'paired test')}, {stats.get('adjustment', '')} "
            f"adjusted over the audit's {stats.get('tests', 0)} tests) before it can PASS."
        )
    return {
        "rows": rows,
        "status": status,
        "headline": headline,
        "gate_text": gate_text,
        "gate_failed": gate,
        "reason": summary.get("reason"),
        "partial": partial_text(doc) if summary.get("partial") else None,
        "counts": counts,
        "how": how,
    }


def partial_text(doc: dict[str, Any]) -> str:
    """The cover's banner for results of an audit that did not finish."""
    loaded = len(as_list(doc.get("images")))
    found = as_dict(doc.get("inputs")).get("found")
    of = f" of {found}" if isinstance(found, int) and found else ""
    return (
        f"Partial results: the audit did not finish. The verdicts below rest only on what was "
        f"measured before it stopped ({loaded}{of} images in finished batches); they are not the "
        "audit's verdicts. Continue it with the same command and --resume."
    )


def cell_view(cell: dict[str, Any] | None) -> dict[str, Any]:
    if cell is None:
        return {"status": None, "text": "", "value": ""}
    s = status_of(cell)
    note = control_text(cell)
    message = str(cell.get("message") or "")
    inconclusive = bool(cell.get("inconclusive"))
    deg = cell.get("degenerate")
    conv = f"{deg:.0%} constant maps" if isinstance(deg, (int, float)) and deg > 0 else ""
    return {
        "status": s,
        "text": STATUS_TEXT[s],
        "value": fmt(cell.get("value")) if cell.get("value") is not None else "",
        "message": f"{message} ({note})" if note else message,
        "control": cell.get("control"),
        "note": note or "; ".join(x for x in ("inconclusive" if inconclusive else "", conv) if x),
        "ci": ci_text(cell),
        "inconclusive": inconclusive,
    }


def verdict_view(doc: dict[str, Any], checks: list[str], info: dict[str, Any]) -> dict[str, Any]:
    """The methods × checks table; ``info``: check name -> :func:`check_info`."""
    rows = []
    for r in verdict_rows(doc):
        rows.append(
            {
                "method": r["method"],
                "variant": r["variant"] or "",
                "cells": [cell_view(r["cells"].get(c)) for c in checks],
            }
        )
    for i, r in enumerate(rows):
        r["first"] = i == 0 or rows[i - 1]["method"] != r["method"]
    heads = []
    for c in checks:
        ci = as_dict(info.get(c)) or check_info(doc, c)
        heads.append({"name": c, "title": check_title(c, ci), "short": str(ci.get("short") or c)})
    return {"checks": heads, "rows": rows}


def caveats_view(
    doc: dict[str, Any], checks: list[str], info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ψ matrix (every cell with a ``psi``: the methods whose variants are ψ presets),
    the decomposition cells of those methods, and the computed caveats."""
    by_psi = psi_methods(doc)
    cells = [c for c in as_list(doc.get("checks")) if isinstance(c, dict) and str(c.get("method")) in by_psi]
    psis = []
    for p in [
        *as_list(as_dict(as_dict(doc.get("config")).get("values")).get("psi")),
        *[c.get("psi") for c in cells],
    ]:
        if p and str(p) not in psis and any(c.get("psi") == p for c in cells):
            psis.append(str(p))
    cols = [c for c in checks if any(x.get("check") == c and x.get("psi") for x in cells)]
    matrix = None
    if psis and cols:
        first = by_psi[0]  # the ψ matrix shows one method: the first with ψ variants
        lookup = {
            (str(c.get("psi")), str(c.get("check"))): c
            for c in cells
            if c.get("psi") and str(c.get("method")) == first
        }
        changes = []
        for col in cols:
            statuses = {status_of(lookup[(p, col)]) for p in psis if (p, col) in lookup}
            changes.append(len(statuses - {"skipped"}) > 1)
        matrix = {
            "method": first,
            "checks": [{"name": c, "changes": ch} for c, ch in zip(cols, changes)],
            "rows": [{"psi": p, "cells": [cell_view(lookup.get((p, c))) for c in cols]} for p in psis],
        }
    decomposition = [cell_view(c) | {"check": str(c.get("check"))} for c in cells if not c.get("psi")]
    items = []
    for cv in as_list(doc.get("caveats")):
        if not isinstance(cv, dict):
            continue
        numbers = [(str(k), numbers_text(v)) for k, v in as_dict(cv.get("numbers")).items()]
        items.append(
            {
                "kind": str(cv.get("kind") or "caveat").replace("_", " "),
                "message": str(cv.get("message") or ""),
                "numbers": numbers,
            }
        )
    return {"matrix": matrix, "findings": items, "decomposition": decomposition}


def completeness_view(doc: dict[str, Any], target: str, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The per-image records of ``results["completeness"]`` and the cell of the check that
    judges them (the check whose ``records`` is ``completeness``)."""
    recs = [r for r in as_list(doc.get("completeness")) if isinstance(r, dict)]
    names = list(info or {}) or check_order(doc)
    judge = [
        n
        for n in names
        if (as_dict((info or {}).get(n)) or check_info(doc, n)).get("records") == "completeness"
    ]
    cell = next(
        (c for c in as_list(doc.get("checks")) if isinstance(c, dict) and c.get("check") in judge), None
    )
    tol = as_dict(cell.get("thresholds")).get("fail") if cell else None
    if not isinstance(tol, (int, float)):
        tol = as_dict(as_dict(doc.get("config")).get("values")).get("completeness_tolerance")
    res = [r.get("relative_residual") for r in recs]
    finite = sorted(v for v in res if isinstance(v, (int, float)) and not isinstance(v, bool))
    above = (
        sum(
            1 for v in res if not (isinstance(v, (int, float)) and isinstance(tol, (int, float)) and v <= tol)
        )
        if isinstance(tol, (int, float))
        else None
    )
    shown = recs
    note = None
    if target == "pdf" and len(recs) > PDF_TABLE_ROWS:
        shown = sorted(
            recs,
            key=lambda r: (
                -(
                    r.get("relative_residual")
                    if isinstance(r.get("relative_residual"), (int, float))
                    else float("inf")
                )
            ),
        )[:PDF_TABLE_ROWS]
        note = (
            f"The {PDF_TABLE_ROWS} images with the largest residual of {len(recs)}; "
            "report.html and results.json list every image."
        )
    rows = [
        {
            "image": str(r.get("image", "")),
            "target": text_of(r.get("target_name") or r.get("target")),
            "logit": fmt(r.get("logit")),
            "reconstructed": fmt(r.get("reconstructed")),
            "residual": fmt(r.get("relative_residual")),
            "bad": isinstance(tol, (int, float))
            and not (isinstance(r.get("relative_residual"), (int, float)) and r["relative_residual"] <= tol),
            "unaccounted": text_of(r.get("unaccounted"), ""),
        }
        for r in shown
    ]
    stats = None
    if finite:
        stats = {
            "n": len(recs),
            "max": fmt(finite[-1]),
            "median": fmt(finite[len(finite) // 2]),
            "tol": fmt(tol) if isinstance(tol, (int, float)) else "–",
            "above": above,
        }
    return {
        "rows": rows,
        "stats": stats,
        "note": note,
        "status": status_of(cell) if cell else None,
        "message": str(cell.get("message") or "") if cell else "",
        "others": _delta_rows(doc),
        "tokens": _token_layout(doc, recs),
    }


def _token_layout(doc: dict[str, Any], recs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How FullGrad's terms of a transformer were drawn (attention modules as single ops, token
    terms on the patch grid) and the leading tokens' share of the logit (in no map)."""
    methods = [m for m in as_list(doc.get("methods")) if isinstance(m, dict)]
    entry = next((as_dict(m["decomposition"]) for m in methods if m.get("decomposition")), {})
    if not entry:
        return None
    shares = sorted(
        abs(r["leading_tokens"]) / max(abs(r["logit"]), 1e-6)
        for r in recs
        if isinstance(r.get("leading_tokens"), (int, float)) and isinstance(r.get("logit"), (int, float))
    )
    grid = as_list(entry.get("token_grid"))
    return {
        "attention": int(entry.get("attention_modules") or 0),
        "grid": f"{grid[0]}×{grid[1]}" if len(grid) == 2 else None,
        "leading": entry.get("leading_tokens"),
        "share_median": fmt(shares[len(shares) // 2]) if shares else None,
        "share_max": fmt(shares[-1]) if shares else None,
        "n": len(shares),
    }


def _delta_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Summation-to-delta of the other methods, one row per (method, reference): n, median
    and largest relative delta (informational)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in as_list(doc.get("attribution_completeness")):
        if not isinstance(r, dict) or not isinstance(r.get("relative_delta"), (int, float)):
            continue
        key = (str(r.get("method")), str(r.get("reference", "")))
        groups.setdefault(key, []).append(float(r["relative_delta"]))
    rows = []
    for (method, ref), vals in groups.items():
        vals.sort()
        rows.append(
            {
                "method": method,
                "reference": ref,
                "n": len(vals),
                "median": f"{100 * vals[len(vals) // 2]:.3g}%",
                "max": f"{100 * vals[-1]:.3g}%",
            }
        )
    return rows


def problems_view(doc: dict[str, Any], target: str) -> dict[str, Any]:
    inputs = as_dict(doc.get("inputs"))
    skipped = [
        {"path": str(s.get("path", "")), "reason": str(s.get("reason", ""))}
        for s in as_list(inputs.get("skipped"))
        if isinstance(s, dict)
    ]
    note = None
    if target == "pdf" and len(skipped) > PDF_TABLE_ROWS:
        note = f"The first {PDF_TABLE_ROWS} of {len(skipped)} skipped inputs; results.json lists all."
        skipped = skipped[:PDF_TABLE_ROWS]
    cells = [c for c in as_list(doc.get("checks")) if isinstance(c, dict)]
    errors = [
        {"check": str(c.get("check")), "variant": variant_label(c), "message": str(c.get("message") or "")}
        for c in cells
        if status_of(c) == "error"
    ]
    skip_groups: dict[tuple[str, str], list[str]] = {}
    for c in cells:
        if status_of(c) == "skipped":
            skip_groups.setdefault((str(c.get("check")), str(c.get("message") or "")), []).append(
                variant_label(c)
            )
    skipped_cells = [
        {
            "check": k[0],
            "reason": k[1],
            "count": len(v),
            "variants": ", ".join(v) if len(v) <= 6 else ", ".join(v[:6]) + f" and {len(v) - 6} more",
        }
        for k, v in skip_groups.items()
    ]
    methods = [
        {"method": str(m.get("method")), "status": str(m.get("status")), "reason": text_of(m.get("reason"))}
        for m in as_list(doc.get("methods"))
        if isinstance(m, dict) and m.get("status") not in (None, "ok")
    ]
    model = as_dict(doc.get("model"))
    notes = [str(n) for n in as_list(model.get("limitations"))] + [
        str(n) for n in as_list(model.get("notes"))
    ]
    image_notes = [
        {"image": str(r.get("image")), "notes": text_of(r.get("notes"))}
        for r in as_list(doc.get("images"))
        if isinstance(r, dict) and as_list(r.get("notes"))
    ]
    if target == "pdf":
        image_notes = image_notes[:PDF_TABLE_ROWS]
    reason = as_dict(doc.get("summary")).get("reason")
    return {
        "skipped": skipped,
        "skipped_note": note,
        "errors": errors,
        "skipped_cells": skipped_cells,
        "methods": methods,
        "model_notes": notes,
        "image_notes": image_notes,
        "reason": str(reason) if reason else None,
    }


def _preprocessing_row(model: dict[str, Any]) -> list[tuple[str, str]]:
    """A "Preprocessing" row for a model whose source gave its resize and crop (timm, Hugging
    Face): ``shorter side to 256, center crop 224×224, bicubic (PIL) · timm pretrained_cfg``."""
    from ..preprocess import Preprocessing

    pre, size = as_dict(model.get("preprocessing")), model.get("input_size")
    fields = {k: pre[k] for k in Preprocessing.__dataclass_fields__ if k in pre}
    try:
        fields["resize_size"] = tuple(fields["resize_size"]) if fields.get("resize_size") else None
        policy = Preprocessing(**fields)
        if policy.is_default or not isinstance(size, list) or len(size) != 2:
            return []
        text = policy.describe(size)
    except (TypeError, ValueError):
        return []
    source = as_dict(model.get("sources")).get("preprocessing")
    return [("Preprocessing", text + (f" · {source}" if source else ""))]


#: Settings the loaded model resolves when they are not given (flag, environment or config
#: file): their effective value and its source are in ``results["model"]``.
MODEL_SETTINGS = ("input_size", "mean", "std")

#: How the report names the model's sources (``results["model"]["sources"]``).
MODEL_SOURCES = {
    "pt2 metadata": ".pt2 metadata",
    "graph": ".pt2 graph (static input size)",
    "torchvision weights": "torchvision weights",
    "default": "default",
    "flag": "flag",
}


def _setting_row(name: str, value: Any, source: Any, model: dict[str, Any]) -> dict[str, str]:
    """One row of the configuration table: the effective value and where it came from. A
    setting the model resolves (:data:`MODEL_SETTINGS`) that was not given takes the loaded
    model's value and source (``.pt2`` metadata, torchvision weights, default)."""
    given = source not in (None, "", "default")
    model_sources = as_dict(model.get("sources"))
    if name in MODEL_SETTINGS and not given and model.get(name) is not None:
        effective = model[name]
        if name == "input_size" and isinstance(effective, (list, tuple)) and len(effective) == 2:
            text = "×".join(text_of(v) for v in effective)
        else:
            text = text_of(effective)
        how = model_sources.get(name)
        return {"name": name, "value": text, "source": MODEL_SOURCES.get(str(how), text_of(how, "default"))}
    return {"name": name, "value": text_of(value), "source": text_of(source, "default")}


def _ranks_text(run: dict[str, Any]) -> str:
    """The world size, and under torchrun each rank's device, images and seconds."""
    size = run.get("world_size")
    ranks = [as_dict(r) for r in run.get("ranks") or [] if isinstance(r, dict)]
    if not isinstance(size, int) or size <= 1:
        return "1" if size == 1 else "–"
    parts = [
        f"rank {text_of(r.get('rank'))}: {text_of(r.get('device'))}, {text_of(r.get('images'))} images, "
        + (fmt(r["seconds"]) + " s" if isinstance(r.get("seconds"), (int, float)) else "–")
        for r in ranks
    ]
    return f"{size} (torchrun; " + "; ".join(parts) + ")"


def configuration_view(doc: dict[str, Any]) -> dict[str, Any]:
    config = as_dict(doc.get("config"))
    values, sources = as_dict(config.get("values")), as_dict(config.get("sources"))
    model = as_dict(doc.get("model"))
    rows = [_setting_row(str(k), v, sources.get(k), model) for k, v in values.items()]
    run = as_dict(doc.get("run"))
    env = [(str(k), text_of(v)) for k, v in as_dict(run.get("versions")).items()]
    env += [
        ("device", text_of(run.get("device"))),
        ("processes", _ranks_text(run)),
        ("seed", text_of(run.get("seed"))),
        ("started at", text_of(run.get("started_at"))),
        (
            "duration",
            (fmt(run["duration_s"]) + " s") if isinstance(run.get("duration_s"), (int, float)) else "–",
        ),
    ]
    timings = as_dict(doc.get("timings"))
    stages = [
        (str(k), fmt(v) + " s" if isinstance(v, (int, float)) else text_of(v))
        for k, v in as_dict(timings.get("per_stage")).items()
    ]
    refs = list(REFERENCES)
    for info in as_dict(doc.get("check_info")).values():
        if isinstance(info, dict) and info.get("reference"):
            refs.append(str(info["reference"]))
    for m in as_list(doc.get("methods")):
        if isinstance(m, dict) and m.get("reference") and str(m.get("reference")) not in ("control",):
            refs.append(f"{m.get('method')}: {m['reference']}")
    return {
        "rows": rows,
        "file": text_of(config.get("file"), ""),
        "environment": env,
        "stages": stages,
        "references": list(dict.fromkeys(refs)),
    }
