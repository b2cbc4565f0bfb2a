"""The audit report as HTML, from the results document alone (design.md §5).

:func:`render_html` fills the Jinja2 templates of ``saliaudit.templates`` (autoescaped) with a
context built by :func:`build_context` from the ``results.json`` dictionary: never from the
model. The same templates make ``report.html`` (``target="html"``: more example images, no
embedded font) and the HTML that WeasyPrint turns into ``report.pdf`` (``target="pdf"``: the
top-``examples`` images, the bundled DejaVu fonts as data URIs, page size and PDF metadata).
Everything the report shows is inline: images are ``data:`` URIs, the stylesheet is inlined,
and a Content-Security-Policy forbids any fetch.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from . import plots
from .context import (STATUS_SYMBOL, STATUS_TEXT, STATUSES, as_dict, as_list, check_order, fmt,
                      is_signed, method_order, status_of, variant_label, variant_of, verdict_rows,
                      control_text)
from .figures import FigureMaker, colorbar, compose_row, figure_uri, ranking

__all__ = ["render_html", "build_context", "template_text", "PAGE_SIZES"]

PAGE_SIZES = {"a4": "A4", "letter": "letter"}
PDF_TABLE_ROWS = 60  # long per-image tables in the PDF: the worst rows, the rest in the HTML
STRIP_MAX_PDF = 8  # randomization/perturbation strips: at most this many steps in the PDF
PDF_CURVE_GROUPS = 2  # curve groups per check in the PDF (the HTML shows all)
PRIMARY_CURVES = ("cascading_spearman_abs", "independent_spearman_abs", "lerf", "morf",
                  "correlation", "flip")
PAIR_CHUNK = {"pdf": 6, "html": 6}  # images per class-sensitivity grid
TILE_PX = {"pair": 64, "strip": 48}  # pixels per tile of a figure row
TILE_MM = {"pdf": {"pair": 11, "strip": 12}, "html": {"pair": 19, "strip": 18}}  # width of a tile
LABEL_MM = 26  # the row label column of a figure
CURVE_TEXT = {
    "cascading_spearman_abs": ("Cascading randomization", "Spearman of |map| with the original",
                               "re-initialized up to layer (from the output)"),
    "cascading_spearman": ("Cascading randomization (signed)", "signed Spearman with the original",
                           "re-initialized up to layer (from the output)"),
    "cascading_ssim": ("Cascading randomization", "SSIM with the original",
                       "re-initialized up to layer (from the output)"),
    "cascading_hog": ("Cascading randomization", "Spearman of HOG features",
                      "re-initialized up to layer (from the output)"),
    "independent_spearman_abs": ("Independent randomization", "Spearman of |map| with the original",
                                 "the one layer re-initialized"),
    "independent_ssim": ("Independent randomization", "SSIM with the original",
                         "the one layer re-initialized"),
    "lerf": ("LeRF: least salient removed first (lower is better)",
             "|fractional change| of the output", "fraction of pixels removed"),
    "morf": ("MoRF: most salient removed first (higher is better)", "drop of the output",
             "fraction of pixels removed"),
    "correlation": ("Sensitivity-n (higher is better)", "Pearson correlation",
                    "n (pixels removed, log scale)"),
    "flip": ("Sign flip: log-odds change towards the contrast class (higher is better)",
             "change in log-odds", "fraction of pixels removed"),
}
REFERENCES = [
    "Srinivas, S. & Fleuret, F. Full-Gradient Representation for Neural Network Visualization. "
    "NeurIPS 2019.",
    "Khakzar, A., Baselizadeh, S. & Navab, N. Rethinking Positive Aggregation and Propagation of "
    "Gradients in Gradient-based Saliency Methods. 2020.",
    "Ancona, M., Ceolini, E., Öztireli, C. & Gross, M. Towards better understanding of "
    "gradient-based attribution methods for Deep Neural Networks. ICLR 2018.",
    "Adebayo, J., Gilmer, J., Muelly, M., Goodfellow, I., Hardt, M. & Kim, B. Sanity Checks for "
    "Saliency Maps. NeurIPS 2018.",
]
_FONTS = (("DejaVu Sans", "normal", "DejaVuSans.ttf"), ("DejaVu Sans", "bold", "DejaVuSans-Bold.ttf"),
          ("DejaVu Sans Mono", "normal", "DejaVuSansMono.ttf"))


# ----------------------------------------------------------------------------- templates

def _template_dir() -> Any:
    try:
        from importlib.resources import files

        return files("saliaudit.templates")
    except (ModuleNotFoundError, TypeError):  # a source tree without the package mapping
        return Path(__file__).resolve().parents[2] / "templates"


def template_text(name: str) -> str:
    """A file of the packaged templates as text."""
    return (_template_dir() / name).read_text(encoding="utf-8")


def template_bytes(name: str) -> bytes:
    return (_template_dir() / name).read_bytes()


def _load(name: str) -> tuple[str, None, Any]:
    return template_text(name), None, lambda: True


def _breakable(text: Any) -> Markup:
    """Escaped ``text`` with line-break opportunities after ``_`` and ``/`` (method names)."""
    return Markup(str(escape(text)).replace("_", "_<wbr>").replace("/", "/<wbr>"))


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FunctionLoader(_load), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["fmt"] = fmt
    env.filters["status_text"] = lambda s: STATUS_TEXT.get(str(s), str(s).upper())
    env.filters["status_symbol"] = lambda s: STATUS_SYMBOL.get(str(s), "?")
    env.filters["breakable"] = _breakable
    return env


@lru_cache(maxsize=1)
def fonts_css() -> Markup:
    """``@font-face`` rules with the bundled DejaVu fonts as data URIs (for the PDF)."""
    rules = []
    for family, weight, name in _FONTS:
        data = base64.b64encode(template_bytes(name)).decode("ascii")
        rules.append(f'@font-face {{ font-family: "{family}"; font-weight: {weight}; '
                     f'font-style: normal; src: url(data:font/ttf;base64,{data}) format("truetype"); }}')
    return Markup("\n".join(rules))


def _css() -> Markup:
    css = template_text("report.css")
    if "</" in css:
        raise ValueError("report.css must not contain '</'")
    return Markup(css)


# ----------------------------------------------------------------------------- context

def _text(v: Any, default: str = "–") -> str:
    if v is None or v == "" or v == []:
        return default
    if isinstance(v, (list, tuple)):
        return ", ".join(_text(i, "none") for i in v)
    if isinstance(v, dict):
        return json.dumps(v, ensure_ascii=False, sort_keys=True)
    if isinstance(v, float):
        return fmt(v)
    return str(v)


def _numbers(v: Any, depth: int = 0, limit: int = 360) -> str:
    """A caveat's number(s) for people: 3 significant digits, verdicts in words, nested
    tables flattened (``paper FAIL 0.875, positive PASS 0.143``)."""
    if isinstance(v, dict):
        if "status" in v and set(v) <= {"status", "value", "message"}:
            text = " ".join(x for x in (str(v.get("status", "")).upper(), fmt(v.get("value"))
                                        if v.get("value") is not None else "") if x)
        else:
            text = ", ".join(f"{k} {_numbers(x, depth + 1)}" for k, x in v.items())
            text = f"({text})" if depth and len(v) > 1 else text
    elif isinstance(v, (list, tuple)):
        text = ", ".join(_numbers(x, depth + 1) for x in v)
    else:
        text = fmt(v) if isinstance(v, (int, float)) or v is None else str(v)
    return text if depth or len(text) <= limit else text[: limit - 1] + "…"


def _title(name: str, info: dict[str, Any]) -> str:
    return str(info.get("title") or name.replace("_", " ").capitalize())


def _cover(doc: dict[str, Any]) -> dict[str, Any]:
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
    controls = {k: int(as_dict(summary.get("controls")).get(k) or 0)
                for k in ("expected", "unexpected", "reference")}
    if any(controls.values()):
        headline += (f"; controls (random, edge): {controls['expected']} failed as they must"
                     + (f", {controls['unexpected']} PASSED a check they must fail (that check "
                        "is unreliable here)" if controls["unexpected"] else "")
                     + (f", {controls['reference']} for reference" if controls["reference"] else ""))
    gate_text = (f"The gate --fail-on {fail_on} failed: saliaudit exits with code 1."
                 if gate else f"The gate --fail-on {fail_on} passed.")
    skipped = as_list(inputs.get("skipped"))
    size = model.get("input_size")
    rows = [
        ("Model", _text(model.get("path"))),
        ("SHA-256", _text(model.get("sha256"))),
        ("Format", _text(model.get("format")) + (f" ({model['arch']})" if model.get("arch") else "")),
        ("Classes", _text(model.get("num_classes"))),
        ("Input size", "×".join(str(s) for s in size) if isinstance(size, list) else _text(size)),
        ("Images", f"{_text(inputs.get('loaded'), '0')} audited of {_text(inputs.get('found'), '0')} "
                   f"found ({len(skipped)} skipped)" + (f" in {inputs['source']}" if inputs.get("source") else "")),
        ("Methods", _text([m for m in method_order(doc)])),
        ("Checks", _text(check_order(doc))),
        ("Date", _text(run.get("started_at"))),
        ("Tool", f"{_text(tool.get('name'), 'saliaudit')} {_text(tool.get('version'))}"),
        ("Device · seed", f"{_text(run.get('device'))} · {_text(run.get('seed'))}"),
    ]
    return {"rows": rows, "status": status, "headline": headline, "gate_text": gate_text,
            "gate_failed": gate, "reason": summary.get("reason"), "counts": counts}


def _cell_view(cell: dict[str, Any] | None) -> dict[str, Any]:
    if cell is None:
        return {"status": None, "text": "", "value": ""}
    s = status_of(cell)
    note = control_text(cell)
    message = str(cell.get("message") or "")
    return {"status": s, "text": STATUS_TEXT[s], "value": fmt(cell.get("value")) if cell.get("value") is not None else "",
            "message": f"{message} ({note})" if note else message, "control": cell.get("control"),
            "note": note}


def _verdict(doc: dict[str, Any], checks: list[str], info: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for r in verdict_rows(doc):
        rows.append({"method": r["method"], "variant": r["variant"] or "",
                     "cells": [_cell_view(r["cells"].get(c)) for c in checks]})
    for i, r in enumerate(rows):
        r["first"] = i == 0 or rows[i - 1]["method"] != r["method"]
    return {"checks": [{"name": c, "title": _title(c, as_dict(info.get(c)))} for c in checks],
            "rows": rows}


def _caveats(doc: dict[str, Any], checks: list[str]) -> dict[str, Any]:
    cells = [c for c in as_list(doc.get("checks")) if isinstance(c, dict) and c.get("method") == "fullgrad"]
    psis = []
    for p in [*as_list(as_dict(as_dict(doc.get("config")).get("values")).get("psi")),
              *[c.get("psi") for c in cells]]:
        if p and str(p) not in psis and any(c.get("psi") == p for c in cells):
            psis.append(str(p))
    cols = [c for c in checks if any(x.get("check") == c and x.get("psi") for x in cells)]
    matrix = None
    if psis and cols:
        lookup = {(str(c.get("psi")), str(c.get("check"))): c for c in cells if c.get("psi")}
        changes = []
        for col in cols:
            statuses = {status_of(lookup[(p, col)]) for p in psis if (p, col) in lookup}
            changes.append(len(statuses - {"skipped"}) > 1)
        matrix = {"checks": [{"name": c, "changes": ch} for c, ch in zip(cols, changes)],
                  "rows": [{"psi": p, "cells": [_cell_view(lookup.get((p, c))) for c in cols]}
                           for p in psis]}
    decomposition = [_cell_view(c) | {"check": str(c.get("check"))} for c in cells if not c.get("psi")]
    items = []
    for cv in as_list(doc.get("caveats")):
        if not isinstance(cv, dict):
            continue
        numbers = [(str(k), _numbers(v)) for k, v in as_dict(cv.get("numbers")).items()]
        items.append({"kind": str(cv.get("kind") or "caveat").replace("_", " "),
                      "message": str(cv.get("message") or ""), "numbers": numbers})
    return {"matrix": matrix, "findings": items, "decomposition": decomposition}


def _series_curves(cells: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for c in cells:
        for k, v in as_dict(c.get("series")).items():
            if isinstance(v, dict) and isinstance(v.get("x"), list) and isinstance(v.get("mean"), list):
                if k not in names:
                    names.append(str(k))
    return names


def _panel_of(cell: dict[str, Any]) -> tuple[int, str]:
    """Small-multiple panel of a cell: FullGrad by ψ, the other methods by post-processing."""
    if cell.get("method") == "fullgrad":
        return 0, "FullGrad, by ψ"
    post = cell.get("post")
    if post:
        return (1 if post == "signed" else 2), f"other methods, {post} maps"
    return 3, "other methods"


def _charts(name: str, cells: list[dict[str, Any]], methods: list[str],
            target: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Curve groups (small multiples) of a check, and the curves left to the HTML report."""
    curves = _series_curves(cells)
    bases = [n for n in curves if not (n.endswith("_random") and n[: -len("_random")] in curves)]
    bases = sorted(bases, key=lambda n: (n not in PRIMARY_CURVES, curves.index(n)))
    omitted = bases[PDF_CURVE_GROUPS:] if target == "pdf" else []
    bases = bases[:PDF_CURVE_GROUPS] if target == "pdf" else bases
    morder = {m: i for i, m in enumerate(methods)}
    groups = []
    for base in bases:
        title, ylabel, xlabel = CURVE_TEXT.get(base, (base.replace("_", " "), "", ""))
        with_curve = [c for c in cells if isinstance(as_dict(c.get("series")).get(base), dict)]
        panels = {}
        for c in sorted(with_curve, key=lambda c: (_panel_of(c), morder.get(str(c.get("method")), 10_000))):
            panels.setdefault(_panel_of(c), []).append(c)
        out = []
        for (_, ptitle), pcells in sorted(panels.items()):
            series = []
            for c in pcells:
                s = as_dict(c["series"])[base]
                label = (variant_of(c) or "fullgrad") if c.get("method") == "fullgrad" else str(c.get("method"))
                series.append({"label": label, "x": as_list(s.get("x")), "mean": as_list(s.get("mean")),
                               "std": as_list(s.get("std"))})
            rnd = next((as_dict(c["series"]).get(base + "_random") for c in pcells
                        if isinstance(as_dict(c["series"]).get(base + "_random"), dict)), None)
            if rnd:
                series.append({"label": "random order", "x": as_list(rnd.get("x")),
                               "mean": as_list(rnd.get("mean")), "baseline": True})
            out.append(plots.line_chart(series, title=ptitle, xlabel=xlabel, ylabel=ylabel))
        if out:
            groups.append({"title": title, "name": base, "panels": out})
    return groups, omitted


def _bars(name: str, cells: list[dict[str, Any]], info: dict[str, Any]) -> Markup | None:
    if len(cells) < 2 or not any(isinstance(c.get("value"), (int, float)) for c in cells):
        return None
    rows = [{"label": variant_label(c), "value": c.get("value"), "status": status_of(c)}
            for c in cells if status_of(c) != "skipped"]
    thresholds = {k: v for k, v in as_dict(info.get("thresholds") or cells[0].get("thresholds")).items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metric = str(info.get("metric") or cells[0].get("metric") or "value")
    return plots.bar_chart(rows, title=f"{_title(name, info)}: {metric}", xlabel=metric,
                           thresholds=thresholds)


def _scalar_columns(cells: list[dict[str, Any]]) -> tuple[list[str], list[tuple[str, str]]]:
    """Numeric scalars of the cells' series: those that vary between cells become table
    columns (at most 3), those that are the same everywhere are stated once."""
    names: list[str] = []
    for c in cells:
        for k, v in as_dict(c.get("series")).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in names:
                names.append(str(k))
    varying, constant = [], []
    for k in names:
        values = {repr(as_dict(c.get("series")).get(k)) for c in cells if status_of(c) != "skipped"}
        if len(values) > 1:
            varying.append(k)
        elif values:
            v = next(as_dict(c.get("series")).get(k) for c in cells if status_of(c) != "skipped")
            constant.append((k.replace("_", " "), fmt(v)))
    return varying[:3], constant


def _class_name(doc: dict[str, Any], idx: Any) -> str | None:
    names = as_list(as_dict(doc.get("model")).get("class_names"))
    if isinstance(idx, int) and not isinstance(idx, bool) and 0 <= idx < len(names):
        return str(names[idx])
    return None


def _image_head(doc: dict[str, Any], fm: FigureMaker, image: str, px: int) -> dict[str, Any]:
    info = fm.info(image)
    pred = info.get("predicted_name") or _class_name(doc, info.get("predicted"))
    low = info.get("lowest_name") or _class_name(doc, info.get("lowest"))
    score = info.get("score")
    sub = []
    if pred is not None:
        sub.append(f"top-1: {pred}" + (f" ({fmt(score)})" if isinstance(score, (int, float)) else ""))
    if low is not None:
        sub.append(f"lowest: {low}")
    return {"image": image, "src": fm.thumbnail(image, px), "sub": sub}


def _subsample(n: int, limit: int) -> list[int]:
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def _fig_parts(doc: dict[str, Any], fm: FigureMaker, image: str, fig: dict[str, Any],
               signed: bool, target: str) -> tuple[str, list[str], Any, bool]:
    """("strip"|"pair", captions, build, shows maps) for one cell's figure of one image;
    ``build(px)`` gives the tiles as images."""
    if isinstance(fig.get("maps"), list):
        steps, maps = as_list(fig.get("steps")), fig["maps"]
        idx = _subsample(len(maps), STRIP_MAX_PDF) if target == "pdf" else list(range(len(maps)))
        caps = [str(steps[i]) if i < len(steps) else f"step {i}" for i in idx]
        return "strip", caps, lambda px: [fm.overlay_image(image, maps[i], signed=signed, px=px) for i in idx], True
    if isinstance(fig.get("perturbed"), list):
        pics, fr = fig["perturbed"], as_list(fig.get("fractions"))
        idx = _subsample(len(pics), STRIP_MAX_PDF) if target == "pdf" else list(range(len(pics)))
        caps = [f"{fr[i] * 100:.0f}% removed" if i < len(fr) and isinstance(fr[i], (int, float))
                and not isinstance(fr[i], bool) else f"step {i}" for i in idx]
        return "strip", caps, lambda px: [fm.picture_image(pics[i], px) for i in idx], False
    caps, parts = [], []
    for key, val in fig.items():
        if key.endswith("_class") or key in ("steps", "fractions", "order"):
            continue
        if isinstance(val, list) and val and isinstance(val[0], list):
            caps.append({"top1": "top-1 class", "lowest": "lowest class"}.get(key, key.replace("_", " ")))
            parts.append(("map", val))
        elif isinstance(val, str) and val.startswith("data:"):
            caps.append(key.replace("_", " "))
            parts.append(("pic", val))

    def build(px: int) -> list[Any]:
        return [fm.overlay_image(image, v, signed=signed, px=px) if k == "map" else fm.picture_image(v, px)
                for k, v in parts]
    return ("strip" if len(parts) > 3 else "pair"), caps, build, any(k == "map" for k, _ in parts)


def _row_src(fm: FigureMaker, key: tuple, build: Any, px: int, target: str) -> str | None:
    """A figure row as a data URI; the composed image is shared by the HTML and the PDF."""
    def make() -> Any:
        tiles = build(px)
        return compose_row(tiles, px) if any(t is not None for t in tiles) else None
    img = fm.cached(("img",) + key + (px,), make)
    return None if img is None else fm.cached(("uri", target) + key + (px,),
                                              lambda: figure_uri(img, target))


def _figure_cells_from_maps(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Pseudo-cells whose ``series.figures`` are the top-1/lowest maps of ``figures.maps``."""
    cells: dict[tuple, dict[str, Any]] = {}
    for m in as_list(as_dict(doc.get("figures")).get("maps")):
        if not isinstance(m, dict) or m.get("kind") not in ("top1", "lowest"):
            continue
        key = (str(m.get("method")), m.get("psi"), m.get("post"))
        cell = cells.setdefault(key, {"method": key[0], "psi": key[1], "post": key[2],
                                      "signed": m.get("signed"), "series": {"figures": {}}})
        fig = cell["series"]["figures"].setdefault(str(m.get("image")), {})
        fig[m["kind"]] = m.get("data")
        if m["kind"] == "lowest":
            fig["lowest_class"] = m.get("target")
    morder = {n: i for i, n in enumerate(method_order(doc))}
    return sorted(cells.values(), key=lambda c: morder.get(c["method"], 10_000))


def _figures(doc: dict[str, Any], fm: FigureMaker, cells: list[dict[str, Any]], target: str,
             examples: int, examples_html: int, tag: str) -> dict[str, Any]:
    ranked = ranking(doc)
    with_figs = {im for c in cells for im in as_dict(as_dict(c.get("series")).get("figures"))}
    order = [im for im in ranked if im in with_figs] + sorted(with_figs - set(ranked))
    parts: dict[str, list[tuple[int, dict[str, Any], str, list[str], Any]]] = {}
    for im in order:
        for ci, c in enumerate(cells):
            fig = as_dict(as_dict(as_dict(c.get("series")).get("figures")).get(im))
            if fig:
                kind, caps, build, maps = _fig_parts(doc, fm, im, fig, is_signed(c), target)
                if caps:
                    parts.setdefault(im, []).append((ci, c, kind, caps, build, maps))
    strip_images = [im for im in order if any(p[2] == "strip" for p in parts.get(im, []))][:examples]
    pair_images = [im for im in order if any(p[2] == "pair" for p in parts.get(im, []))]
    pair_images = pair_images[:examples if target == "pdf" else max(examples, examples_html)]
    kinds_signed: set[bool] = set()
    strips = []
    for im in strip_images:
        rows, columns = [], None
        for ci, c, kind, caps, build, maps in parts[im]:
            if kind != "strip":
                continue
            columns = columns or caps
            if maps:
                kinds_signed.add(is_signed(c))
            src = _row_src(fm, (tag, "strip", im, ci, len(caps)), build, TILE_PX["strip"], target)
            rows.append({"label": variant_label(c), "src": src, "n": len(caps),
                         "alt": f"{variant_label(c)}: " + ", ".join(caps)})
        columns = columns or []
        strips.append({"head": _image_head(doc, fm, im, TILE_PX["pair"]), "columns": columns,
                       "width_mm": LABEL_MM + TILE_MM[target]["strip"] * len(columns),
                       "rows": [r for r in rows if r["n"] == len(columns)]})
    pairs = []
    chunk = PAIR_CHUNK[target]
    for start in range(0, len(pair_images), chunk):
        ims = pair_images[start:start + chunk]
        by_cell: dict[int, dict[str, Any]] = {}
        captions: dict[str, list[str]] = {}
        for im in ims:
            for ci, c, kind, caps, build, maps in parts[im]:
                if kind != "pair":
                    continue
                captions.setdefault(im, caps)
                row = by_cell.setdefault(ci, {"label": variant_label(c), "by_image": {}})
                if maps:
                    kinds_signed.add(is_signed(c))
                if caps == captions[im]:
                    row["by_image"][im] = _row_src(fm, (tag, "pair", im, ci), build, TILE_PX["pair"], target)
        width = max((len(v) for v in captions.values()), default=1)
        rows = [{"label": r["label"], "cells": [r["by_image"].get(im) for im in ims]}
                for _, r in sorted(by_cell.items())]
        pairs.append({"heads": [_image_head(doc, fm, im, TILE_PX["pair"]) for im in ims],
                      "subcols": [captions.get(im, []) + [""] * (width - len(captions.get(im, [])))
                                  for im in ims],
                      "width": width, "rows": rows,
                      "width_mm": LABEL_MM + max(TILE_MM[target]["pair"] * width, 18) * len(ims)})
    bars = [colorbar(s) for s in sorted(kinds_signed, reverse=True)]
    return {"strips": strips, "pairs": pairs, "colorbars": bars,
            "count": len(set(strip_images) | set(pair_images))}


def _section(doc: dict[str, Any], fm: FigureMaker, name: str, info: dict[str, Any],
             target: str, examples: int, examples_html: int, methods: list[str]) -> dict[str, Any]:
    rank = {(r["method"], r["variant"]): i for i, r in enumerate(verdict_rows(doc))}
    cells = sorted([c for c in as_list(doc.get("checks")) if isinstance(c, dict) and c.get("check") == name],
                   key=lambda c: rank.get((str(c.get("method")), variant_of(c)), 10_000))
    scalar_cols, constants = _scalar_columns(cells)
    rows = []
    for c in cells:
        series = as_dict(c.get("series"))
        rows.append({"label": variant_label(c), "status": status_of(c),
                     "value": fmt(c.get("value")), "spread": fmt(c.get("spread")),
                     "extra": [fmt(series.get(k)) for k in scalar_cols],
                     "message": str(c.get("message") or "")})
    statuses = {status_of(c) for c in cells}
    all_skipped = bool(cells) and statuses == {"skipped"}
    thresholds = as_dict(info.get("thresholds")) or (as_dict(cells[0].get("thresholds")) if cells else {})
    params = as_dict(info.get("params")) or (as_dict(cells[0].get("params")) if cells else {})
    fig_cells = cells
    if name == "class_sensitivity" and not any(as_dict(as_dict(c.get("series")).get("figures")) for c in cells):
        fig_cells = _figure_cells_from_maps(doc)
    figs = (_figures(doc, fm, fig_cells, target, examples, examples_html, name) if not all_skipped
            else {"strips": [], "pairs": [], "colorbars": [], "count": 0})
    skip_reasons = sorted({str(c.get("message") or "") for c in cells if status_of(c) == "skipped"})
    charts, omitted = _charts(name, cells, methods, target) if not all_skipped else ([], [])
    return {
        "name": name, "anchor": "check-" + "".join(ch if ch.isalnum() else "-" for ch in name),
        "title": _title(name, info), "summary": str(info.get("summary") or ""),
        "reference": str(info.get("reference") or ""),
        "metric": str(info.get("metric") or (cells[0].get("metric") if cells else "") or ""),
        "thresholds": [(str(k), _text(v)) for k, v in thresholds.items()],
        "params": [(str(k), _text(v)) for k, v in params.items()], "constants": constants,
        "counts": {s: sum(1 for c in cells if status_of(c) == s) for s in STATUSES},
        "rows": rows, "scalar_cols": [k.replace("_", " ") for k in scalar_cols],
        "all_skipped": all_skipped, "skip_reasons": skip_reasons,
        "bars": None if all_skipped else _bars(name, cells, info),
        "charts": charts, "charts_omitted": omitted,
        "figures": figs,
    }


def _completeness(doc: dict[str, Any], target: str) -> dict[str, Any]:
    recs = [r for r in as_list(doc.get("completeness")) if isinstance(r, dict)]
    cell = next((c for c in as_list(doc.get("checks")) if isinstance(c, dict)
                 and c.get("check") == "completeness"), None)
    tol = as_dict(cell.get("thresholds")).get("fail") if cell else None
    if not isinstance(tol, (int, float)):
        tol = as_dict(as_dict(doc.get("config")).get("values")).get("completeness_tolerance")
    res = [r.get("relative_residual") for r in recs]
    finite = sorted(v for v in res if isinstance(v, (int, float)) and not isinstance(v, bool))
    above = sum(1 for v in res if not (isinstance(v, (int, float)) and isinstance(tol, (int, float)) and v <= tol)) \
        if isinstance(tol, (int, float)) else None
    shown = recs
    note = None
    if target == "pdf" and len(recs) > PDF_TABLE_ROWS:
        shown = sorted(recs, key=lambda r: -(r.get("relative_residual") if isinstance(
            r.get("relative_residual"), (int, float)) else float("inf")))[:PDF_TABLE_ROWS]
        note = (f"The {PDF_TABLE_ROWS} images with the largest residual of {len(recs)}; "
                "report.html and results.json list every image.")
    rows = [{"image": str(r.get("image", "")),
             "target": _text(r.get("target_name") or r.get("target")),
             "logit": fmt(r.get("logit")), "reconstructed": fmt(r.get("reconstructed")),
             "residual": fmt(r.get("relative_residual")),
             "bad": isinstance(tol, (int, float)) and not (isinstance(r.get("relative_residual"), (int, float))
                                                           and r["relative_residual"] <= tol),
             "unaccounted": _text(r.get("unaccounted"), "")} for r in shown]
    stats = None
    if finite:
        stats = {"n": len(recs), "max": fmt(finite[-1]), "median": fmt(finite[len(finite) // 2]),
                 "tol": fmt(tol) if isinstance(tol, (int, float)) else "–", "above": above}
    return {"rows": rows, "stats": stats, "note": note,
            "status": status_of(cell) if cell else None,
            "message": str(cell.get("message") or "") if cell else ""}


def _problems(doc: dict[str, Any], target: str) -> dict[str, Any]:
    inputs = as_dict(doc.get("inputs"))
    skipped = [{"path": str(s.get("path", "")), "reason": str(s.get("reason", ""))}
               for s in as_list(inputs.get("skipped")) if isinstance(s, dict)]
    note = None
    if target == "pdf" and len(skipped) > PDF_TABLE_ROWS:
        note = f"The first {PDF_TABLE_ROWS} of {len(skipped)} skipped inputs; results.json lists all."
        skipped = skipped[:PDF_TABLE_ROWS]
    cells = [c for c in as_list(doc.get("checks")) if isinstance(c, dict)]
    errors = [{"check": str(c.get("check")), "variant": variant_label(c), "message": str(c.get("message") or "")}
              for c in cells if status_of(c) == "error"]
    skip_groups: dict[tuple[str, str], list[str]] = {}
    for c in cells:
        if status_of(c) == "skipped":
            skip_groups.setdefault((str(c.get("check")), str(c.get("message") or "")), []).append(variant_label(c))
    skipped_cells = [{"check": k[0], "reason": k[1], "count": len(v),
                      "variants": ", ".join(v) if len(v) <= 6 else ", ".join(v[:6]) + f" and {len(v) - 6} more"}
                     for k, v in skip_groups.items()]
    methods = [{"method": str(m.get("method")), "status": str(m.get("status")), "reason": _text(m.get("reason"))}
               for m in as_list(doc.get("methods")) if isinstance(m, dict) and m.get("status") not in (None, "ok")]
    model = as_dict(doc.get("model"))
    notes = [str(n) for n in as_list(model.get("limitations"))] + [str(n) for n in as_list(model.get("notes"))]
    image_notes = [{"image": str(r.get("image")), "notes": _text(r.get("notes"))}
                   for r in as_list(doc.get("images")) if isinstance(r, dict) and as_list(r.get("notes"))]
    if target == "pdf":
        image_notes = image_notes[:PDF_TABLE_ROWS]
    reason = as_dict(doc.get("summary")).get("reason")
    return {"skipped": skipped, "skipped_note": note, "errors": errors, "skipped_cells": skipped_cells,
            "methods": methods, "model_notes": notes, "image_notes": image_notes,
            "reason": str(reason) if reason else None}


def _configuration(doc: dict[str, Any]) -> dict[str, Any]:
    config = as_dict(doc.get("config"))
    values, sources = as_dict(config.get("values")), as_dict(config.get("sources"))
    rows = [{"name": str(k), "value": _text(v), "source": _text(sources.get(k), "default")}
            for k, v in values.items()]
    run = as_dict(doc.get("run"))
    env = [(str(k), _text(v)) for k, v in as_dict(run.get("versions")).items()]
    env += [("device", _text(run.get("device"))), ("seed", _text(run.get("seed"))),
            ("started at", _text(run.get("started_at"))),
            ("duration", (fmt(run["duration_s"]) + " s") if isinstance(run.get("duration_s"), (int, float)) else "–")]
    timings = as_dict(doc.get("timings"))
    stages = [(str(k), fmt(v) + " s" if isinstance(v, (int, float)) else _text(v))
              for k, v in as_dict(timings.get("per_stage")).items()]
    refs = list(REFERENCES)
    for info in as_dict(doc.get("check_info")).values():
        if isinstance(info, dict) and info.get("reference"):
            refs.append(str(info["reference"]))
    for m in as_list(doc.get("methods")):
        if isinstance(m, dict) and m.get("reference") and str(m.get("reference")) not in ("control",):
            refs.append(f"{m.get('method')}: {m['reference']}")
    return {"rows": rows, "file": _text(config.get("file"), ""), "environment": env,
            "stages": stages, "references": list(dict.fromkeys(refs))}


def build_context(doc: dict[str, Any], *, target: str = "html", examples: int = 6,
                  examples_html: int = 24, page_size: str = "a4",
                  meta: dict[str, str] | None = None, figure_maker: FigureMaker | None = None) -> dict[str, Any]:
    """The template context, built from the results document only."""
    if target not in ("html", "pdf"):
        raise ValueError(f"target must be 'html' or 'pdf', got {target!r}")
    page = PAGE_SIZES.get(str(page_size).lower())
    if page is None:
        raise ValueError(f"page_size must be a4 or letter, got {page_size!r}")
    fm = figure_maker or FigureMaker(doc)
    checks = check_order(doc)
    info = as_dict(doc.get("check_info"))
    methods = method_order(doc)
    model = as_dict(doc.get("model"))
    model_name = Path(str(model.get("path") or "model")).name
    tool = as_dict(doc.get("tool"))
    sections = [_section(doc, fm, c, as_dict(info.get(c)), target, max(0, examples),
                         max(0, examples_html), methods) for c in checks]
    gallery = None
    if "class_sensitivity" not in checks and as_list(as_dict(doc.get("figures")).get("maps")):
        gallery = _figures(doc, fm, _figure_cells_from_maps(doc), target, examples, examples_html, "gallery")
    metadata = {"title": f"saliaudit report: {model_name}",
                "author": f"{tool.get('name') or 'saliaudit'} {tool.get('version') or ''}".strip(),
                "description": f"Saliency audit of {model.get('path') or 'a model'} "
                               f"(sha256 {model.get('sha256') or 'unknown'})",
                "keywords": "saliency, FullGrad, sanity checks, audit",
                "created": str(as_dict(doc.get("run")).get("started_at") or "")}
    metadata.update(meta or {})
    return {
        "target": target, "page_size": page, "meta": metadata,
        "fonts_css": fonts_css() if target == "pdf" else Markup(""),
        "css": _css(), "cover": _cover(doc),
        "verdict": _verdict(doc, checks, info), "caveats": _caveats(doc, checks),
        "gallery": gallery, "sections": sections, "completeness": _completeness(doc, target),
        "problems": _problems(doc, target), "configuration": _configuration(doc),
        "statuses": [{"status": s, "text": STATUS_TEXT[s], "symbol": STATUS_SYMBOL[s]} for s in STATUSES],
        "examples": examples, "examples_html": examples_html,
    }


def render_html(doc: dict[str, Any], *, target: str = "html", examples: int = 6,
                examples_html: int = 24, page_size: str = "a4", meta: dict[str, str] | None = None,
                figure_maker: FigureMaker | None = None) -> str:
    """The report as one self-contained HTML document (a ``str``)."""
    ctx = build_context(doc, target=target, examples=examples, examples_html=examples_html,
                        page_size=page_size, meta=meta, figure_maker=figure_maker)
    return _environment().get_template("report.html.j2").render(**ctx)
