"""The audit report as HTML, from the results document alone (see docs/report.md).

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
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from . import plots
from .context import (
    STATUS_SYMBOL,
    STATUS_TEXT,
    STATUSES,
    as_dict,
    as_list,
    check_info,
    check_order,
    control_text,
    fmt,
    method_order,
    psi_methods,
    status_of,
    variant_label,
    variant_of,
    verdict_rows,
)
from .figures import FigureMaker
from .gallery import example_figures, figure_cells_from_maps
from .measures import measures_view
from .plan_text import plan_view
from .sections import (
    caveats_view,
    check_title,
    completeness_view,
    configuration_view,
    cover_view,
    problems_view,
    text_of,
    verdict_view,
)

__all__ = ["render_html", "build_context", "template_text", "PAGE_SIZES"]

PAGE_SIZES = {"a4": "A4", "letter": "letter"}
PDF_CURVE_GROUPS = 2  # curve groups per check in the PDF (the HTML shows all)
_FONTS = (
    ("DejaVu Sans", "normal", "DejaVuSans.ttf"),
    ("DejaVu Sans", "bold", "DejaVuSans-Bold.ttf"),
    ("DejaVu Sans Mono", "normal", "DejaVuSansMono.ttf"),
)


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
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_load),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
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
        rules.append(
            f'@font-face {{ font-family: "{family}"; font-weight: {weight}; '
            f'font-style: normal; src: url(data:font/ttf;base64,{data}) format("truetype"); }}'
        )
    return Markup("\n".join(rules))


def _css() -> Markup:
    css = template_text("report.css")
    if "</" in css:
        raise ValueError("report.css must not contain '</'")
    return Markup(css)


# ----------------------------------------------------------------------------- context


def _series_curves(cells: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for c in cells:
        for k, v in as_dict(c.get("series")).items():
            if isinstance(v, dict) and isinstance(v.get("x"), list) and isinstance(v.get("mean"), list):
                if k not in names:
                    names.append(str(k))
    return names


def _panel_of(cell: dict[str, Any], by_psi: list[str]) -> tuple[int, str]:
    """Small-multiple panel of a cell: a method with ψ variants (FullGrad) by ψ, the other
    methods by post-processing."""
    method = str(cell.get("method"))
    if method in by_psi:
        return by_psi.index(method), f"{method}, by ψ"
    post = cell.get("post")
    if post:
        return len(by_psi) + (0 if post == "signed" else 1), f"other methods, {post} maps"
    return len(by_psi) + 2, "other methods"


def _curve_bases(curves: list[str], specs: dict[str, Any]) -> list[str]:
    """The curves that get a group of their own: not another curve's baseline (declared, or
    for an undeclared curve ``<name>_random``); primary curves first."""
    baselines = {str(as_dict(v).get("baseline")) for v in specs.values() if as_dict(v).get("baseline")}
    bases = [
        n
        for n in curves
        if n not in baselines
        and not (n not in specs and n.endswith("_random") and n[: -len("_random")] in curves)
    ]
    return sorted(bases, key=lambda n: (not as_dict(specs.get(n)).get("primary"), curves.index(n)))


def _charts(
    name: str,
    cells: list[dict[str, Any]],
    methods: list[str],
    by_psi: list[str],
    info: dict[str, Any],
    target: str,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Curve groups (small multiples) of a check, and the curves left to the HTML report."""
    curves = _series_curves(cells)
    specs = as_dict(info.get("curves"))
    bases = _curve_bases(curves, specs)
    omitted = bases[PDF_CURVE_GROUPS:] if target == "pdf" else []
    bases = bases[:PDF_CURVE_GROUPS] if target == "pdf" else bases
    morder = {m: i for i, m in enumerate(methods)}
    groups = []
    for base in bases:
        spec = as_dict(specs.get(base))
        title = str(spec.get("title") or base.replace("_", " "))
        xlabel, ylabel = str(spec.get("xlabel") or ""), str(spec.get("ylabel") or "")
        baseline = str(spec.get("baseline") or base + "_random")
        with_curve = [c for c in cells if isinstance(as_dict(c.get("series")).get(base), dict)]
        panels = {}
        for c in sorted(
            with_curve, key=lambda c: (_panel_of(c, by_psi), morder.get(str(c.get("method")), 10_000))
        ):
            panels.setdefault(_panel_of(c, by_psi), []).append(c)
        out = []
        for (_, ptitle), pcells in sorted(panels.items()):
            series = []
            for c in pcells:
                s = as_dict(c["series"])[base]
                method = str(c.get("method"))
                label = (variant_of(c) or method) if method in by_psi else method
                series.append(
                    {
                        "label": label,
                        "x": as_list(s.get("x")),
                        "mean": as_list(s.get("mean")),
                        "std": as_list(s.get("std")),
                    }
                )
            rnd = next(
                (
                    as_dict(c["series"]).get(baseline)
                    for c in pcells
                    if isinstance(as_dict(c["series"]).get(baseline), dict)
                ),
                None,
            )
            if rnd:
                series.append(
                    {
                        "label": "random order",
                        "x": as_list(rnd.get("x")),
                        "mean": as_list(rnd.get("mean")),
                        "baseline": True,
                    }
                )
            out.append(plots.line_chart(series, title=ptitle, xlabel=xlabel, ylabel=ylabel))
        if out:
            groups.append({"title": title, "name": base, "panels": out})
    return groups, omitted


def _cell_notes(c: dict[str, Any]) -> str:
    """``inconclusive`` and the share of constant maps a verdict rests on, for the tables."""
    notes = ["inconclusive"] if c.get("inconclusive") else []
    deg = c.get("degenerate")
    if isinstance(deg, (int, float)) and deg > 0:
        notes.append(f"{deg:.0%} constant maps")
    return "; ".join(notes)


def _control_counts(cells: list[dict[str, Any]]) -> str:
    """``"4 failed as they must"`` for the controls' cells, never counted as verdicts."""
    ctl = [c for c in cells if c.get("control")]
    if not ctl:
        return ""
    expected = sum(1 for c in ctl if c.get("control") == "expected")
    unexpected = sum(1 for c in ctl if c.get("control") == "unexpected")
    reference = len(ctl) - expected - unexpected
    parts = [f"{expected} did not pass, as they must"] if expected else []
    parts += [f"{unexpected} PASSED (the check is unreliable here)"] if unexpected else []
    parts += [f"{reference} for reference"] if reference else []
    return ", ".join(parts)


def _sample_text(info: dict[str, Any]) -> str:
    sample = as_dict(info.get("sample"))
    if not sample:
        return ""
    per = as_dict(sample.get("per_class"))
    classes = ", ".join(f"{k} {v}" for k, v in per.items())
    return (
        f"a seeded sample of {len(as_list(sample.get('images')))} of {sample.get('of')} "
        f"images, stratified by {sample.get('stratified_by')} (seed {sample.get('seed')}"
        + (f"; {classes}" if classes else "")
        + "): "
        + ", ".join(str(i) for i in as_list(sample.get("images"))[:12])
        + (" …" if len(as_list(sample.get("images"))) > 12 else "")
    )


def _bars(name: str, cells: list[dict[str, Any]], info: dict[str, Any]) -> Markup | None:
    if len(cells) < 2 or not any(isinstance(c.get("value"), (int, float)) for c in cells):
        return None
    rows = [
        {
            "label": variant_label(c),
            "value": c.get("value"),
            "status": "control" if c.get("control") else status_of(c),
            "status_text": ("control" if c.get("control") else status_of(c))
            + (" ?" if c.get("inconclusive") else ""),
            "ci": c.get("ci") if isinstance(c.get("ci"), list) else None,
        }
        for c in cells
        if status_of(c) != "skipped"
    ]
    thresholds = {
        k: v
        for k, v in as_dict(info.get("thresholds") or cells[0].get("thresholds")).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    metric = str(info.get("metric") or cells[0].get("metric") or "value")
    return plots.bar_chart(
        rows, title=f"{check_title(name, info)}: {metric}", xlabel=metric, thresholds=thresholds
    )


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


def _section(
    doc: dict[str, Any],
    fm: FigureMaker,
    name: str,
    info: dict[str, Any],
    target: str,
    examples: int,
    examples_html: int,
    methods: list[str],
    by_psi: list[str],
) -> dict[str, Any]:
    rank = {(r["method"], r["variant"]): i for i, r in enumerate(verdict_rows(doc))}
    cells = sorted(
        [c for c in as_list(doc.get("checks")) if isinstance(c, dict) and c.get("check") == name],
        key=lambda c: rank.get((str(c.get("method")), variant_of(c)), 10_000),
    )
    scalar_cols, constants = _scalar_columns(cells)
    rows = []
    for c in cells:
        series = as_dict(c.get("series"))
        ci = c.get("ci") if isinstance(c.get("ci"), list) else None
        rows.append(
            {
                "label": variant_label(c),
                "status": status_of(c),
                "value": fmt(c.get("value")),
                "spread": fmt(c.get("spread")),
                "n": text_of(c.get("n")),
                "ci": f"[{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]" if ci else "–",
                "control": bool(c.get("control")),
                "note": control_text(c) or _cell_notes(c),
                "extra": [fmt(series.get(k)) for k in scalar_cols],
                "message": str(c.get("message") or ""),
            }
        )
    statuses = {status_of(c) for c in cells}
    all_skipped = bool(cells) and statuses == {"skipped"}
    thresholds = as_dict(info.get("thresholds")) or (as_dict(cells[0].get("thresholds")) if cells else {})
    params = as_dict(info.get("params")) or (as_dict(cells[0].get("params")) if cells else {})
    fig_cells = cells
    if info.get("shows_class_maps") and not any(
        as_dict(as_dict(c.get("series")).get("figures")) for c in cells
    ):
        fig_cells = figure_cells_from_maps(doc)
    figs = (
        example_figures(doc, fm, fig_cells, target, examples, examples_html, name)
        if not all_skipped
        else {"strips": [], "pairs": [], "colorbars": [], "count": 0}
    )
    skip_reasons = sorted({str(c.get("message") or "") for c in cells if status_of(c) == "skipped"})
    charts, omitted = _charts(name, cells, methods, by_psi, info, target) if not all_skipped else ([], [])
    return {
        "name": name,
        "anchor": "check-" + "".join(ch if ch.isalnum() else "-" for ch in name),
        "title": check_title(name, info),
        "short": str(info.get("short") or ""),
        "summary": str(info.get("summary") or ""),
        "reference": str(info.get("reference") or ""),
        "metric": str(info.get("metric") or (cells[0].get("metric") if cells else "") or ""),
        "thresholds": [(str(k), text_of(v)) for k, v in thresholds.items()],
        "params": [(str(k), text_of(v)) for k, v in params.items()],
        "constants": constants,
        "counts": {s: sum(1 for c in cells if status_of(c) == s and not c.get("control")) for s in STATUSES},
        "inconclusive": sum(1 for c in cells if c.get("inconclusive") and not c.get("control")),
        "control_counts": _control_counts(cells),
        "sample": _sample_text(info),
        "rows": rows,
        "scalar_cols": [k.replace("_", " ") for k in scalar_cols],
        "all_skipped": all_skipped,
        "skip_reasons": skip_reasons,
        "bars": None if all_skipped else _bars(name, cells, info),
        "charts": charts,
        "charts_omitted": omitted,
        "figures": figs,
        "measures": measures_view(cells, info),
    }


def build_context(
    doc: dict[str, Any],
    *,
    target: str = "html",
    examples: int = 6,
    examples_html: int = 24,
    page_size: str = "a4",
    meta: dict[str, str] | None = None,
    figure_maker: FigureMaker | None = None,
) -> dict[str, Any]:
    """The template context, built from the results document only."""
    if target not in ("html", "pdf"):
        raise ValueError(f"target must be 'html' or 'pdf', got {target!r}")
    page = PAGE_SIZES.get(str(page_size).lower())
    if page is None:
        raise ValueError(f"page_size must be a4 or letter, got {page_size!r}")
    fm = figure_maker or FigureMaker(doc)
    checks = check_order(doc)
    info = {c: check_info(doc, c) for c in checks}
    methods = method_order(doc)
    by_psi = psi_methods(doc)
    model = as_dict(doc.get("model"))
    model_name = Path(str(model.get("path") or "model")).name
    tool = as_dict(doc.get("tool"))
    sections = [
        _section(doc, fm, c, info[c], target, max(0, examples), max(0, examples_html), methods, by_psi)
        for c in checks
    ]
    gallery = None
    if not any(i.get("shows_class_maps") for i in info.values()) and as_list(
        as_dict(doc.get("figures")).get("maps")
    ):
        gallery = example_figures(
            doc, fm, figure_cells_from_maps(doc), target, examples, examples_html, "gallery"
        )
    partial = " (partial)" if as_dict(doc.get("summary")).get("partial") else ""
    metadata = {
        "title": f"saliaudit report{partial}: {model_name}",
        "author": f"{tool.get('name') or 'saliaudit'} {tool.get('version') or ''}".strip(),
        "description": f"Saliency audit of {model.get('path') or 'a model'} "
        f"(sha256 {model.get('sha256') or 'unknown'})",
        "keywords": "saliency, FullGrad, sanity checks, audit",
        "created": str(as_dict(doc.get("run")).get("started_at") or ""),
    }
    metadata.update(meta or {})
    return {
        "target": target,
        "page_size": page,
        "meta": metadata,
        "fonts_css": fonts_css() if target == "pdf" else Markup(""),
        "css": _css(),
        "cover": cover_view(doc),
        "verdict": verdict_view(doc, checks, info),
        "caveats": caveats_view(doc, checks, info),
        "gallery": gallery,
        "sections": sections,
        "completeness": completeness_view(doc, target, info),
        "problems": problems_view(doc, target),
        "configuration": configuration_view(doc),
        "plan": plan_view(doc),
        "statuses": [{"status": s, "text": STATUS_TEXT[s], "symbol": STATUS_SYMBOL[s]} for s in STATUSES],
        "examples": examples,
        "examples_html": examples_html,
    }


def render_html(
    doc: dict[str, Any],
    *,
    target: str = "html",
    examples: int = 6,
    examples_html: int = 24,
    page_size: str = "a4",
    meta: dict[str, str] | None = None,
    figure_maker: FigureMaker | None = None,
) -> str:
    """The report as one self-contained HTML document (a ``str``)."""
    ctx = build_context(
        doc,
        target=target,
        examples=examples,
        examples_html=examples_html,
        page_size=page_size,
        meta=meta,
        figure_maker=figure_maker,
    )
    return _environment().get_template("report.html.j2").render(**ctx)
