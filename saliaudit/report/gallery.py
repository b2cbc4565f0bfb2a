"""The example figures of the report, from the results document alone: for each selected
image a header (thumbnail, classes) and rows of tiles (the map for the top-1 and the lowest
class, randomization strips, perturbed images), chosen most telling first (``ranking``) and
capped at ``examples`` in the PDF and ``examples_html`` in the HTML."""

from __future__ import annotations

from typing import Any

from ..maps import is_stored_map
from .context import as_dict, as_list, fmt, is_signed, method_order, variant_label
from .figures import FigureMaker, colorbar, compose_row, figure_uri, ranking

__all__ = ["example_figures", "figure_cells_from_maps"]

STRIP_MAX_PDF = 8  # randomization/perturbation strips: at most this many steps in the PDF
PAIR_CHUNK = {"pdf": 6, "html": 6}  # images per class-sensitivity grid
TILE_PX = {"pair": 64, "strip": 48}  # pixels per tile of a figure row
TILE_MM = {"pdf": {"pair": 11, "strip": 12}, "html": {"pair": 19, "strip": 18}}  # width of a tile
LABEL_MM = 26  # the row label column of a figure


def class_name(doc: dict[str, Any], idx: Any) -> str | None:
    names = as_list(as_dict(doc.get("model")).get("class_names"))
    if isinstance(idx, int) and not isinstance(idx, bool) and 0 <= idx < len(names):
        return str(names[idx])
    return None


def image_head(doc: dict[str, Any], fm: FigureMaker, image: str, px: int) -> dict[str, Any]:
    info = fm.info(image)
    pred = info.get("predicted_name") or class_name(doc, info.get("predicted"))
    low = info.get("lowest_name") or class_name(doc, info.get("lowest"))
    score = info.get("score")
    sub = []
    if pred is not None:
        sub.append(f"top-1: {pred}" + (f" ({fmt(score)})" if isinstance(score, (int, float)) else ""))
    if low is not None:
        sub.append(f"lowest: {low}")
    return {"image": image, "src": fm.thumbnail(image, px), "sub": sub}


def subsample(n: int, limit: int) -> list[int]:
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def figure_parts(
    doc: dict[str, Any], fm: FigureMaker, image: str, fig: dict[str, Any], signed: bool, target: str
) -> tuple[str, list[str], Any, bool]:
    """("strip"|"pair", captions, build, shows maps) for one cell's figure of one image;
    ``build(px)`` gives the tiles as images."""
    if isinstance(fig.get("maps"), list):
        steps, maps = as_list(fig.get("steps")), fig["maps"]
        idx = subsample(len(maps), STRIP_MAX_PDF) if target == "pdf" else list(range(len(maps)))
        caps = [str(steps[i]) if i < len(steps) else f"step {i}" for i in idx]
        return (
            "strip",
            caps,
            lambda px: [fm.overlay_image(image, maps[i], signed=signed, px=px) for i in idx],
            True,
        )
    if isinstance(fig.get("perturbed"), list):
        pics, fr = fig["perturbed"], as_list(fig.get("fractions"))
        idx = subsample(len(pics), STRIP_MAX_PDF) if target == "pdf" else list(range(len(pics)))
        caps = [
            f"{fr[i] * 100:.0f}% removed"
            if i < len(fr) and isinstance(fr[i], (int, float)) and not isinstance(fr[i], bool)
            else f"step {i}"
            for i in idx
        ]
        return "strip", caps, lambda px: [fm.picture_image(pics[i], px) for i in idx], False
    caps, parts = [], []
    for key, val in fig.items():
        if key.endswith("_class") or key in ("steps", "fractions", "order"):
            continue
        if is_stored_map(val):
            caps.append({"top1": "top-1 class", "lowest": "lowest class"}.get(key, key.replace("_", " ")))
            parts.append(("map", val))
        elif isinstance(val, str) and val.startswith("data:"):
            caps.append(key.replace("_", " "))
            parts.append(("pic", val))

    def build(px: int) -> list[Any]:
        return [
            fm.overlay_image(image, v, signed=signed, px=px) if k == "map" else fm.picture_image(v, px)
            for k, v in parts
        ]

    return ("strip" if len(parts) > 3 else "pair"), caps, build, any(k == "map" for k, _ in parts)


def row_src(fm: FigureMaker, key: tuple, build: Any, px: int, target: str) -> str | None:
    """A figure row as a data URI; the composed image is shared by the HTML and the PDF."""

    def make() -> Any:
        tiles = build(px)
        return compose_row(tiles, px) if any(t is not None for t in tiles) else None

    img = fm.cached(("img",) + key + (px,), make)
    return None if img is None else fm.cached(("uri", target) + key + (px,), lambda: figure_uri(img, target))


def figure_cells_from_maps(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Pseudo-cells whose ``series.figures`` are the top-1/lowest maps of ``figures.maps``."""
    cells: dict[tuple, dict[str, Any]] = {}
    for m in as_list(as_dict(doc.get("figures")).get("maps")):
        if not isinstance(m, dict) or m.get("kind") not in ("top1", "lowest"):
            continue
        key = (str(m.get("method")), m.get("psi"), m.get("post"))
        cell = cells.setdefault(
            key,
            {
                "method": key[0],
                "psi": key[1],
                "post": key[2],
                "signed": m.get("signed"),
                "series": {"figures": {}},
            },
        )
        fig = cell["series"]["figures"].setdefault(str(m.get("image")), {})
        fig[m["kind"]] = m.get("data")
        if m["kind"] == "lowest":
            fig["lowest_class"] = m.get("target")
    morder = {n: i for i, n in enumerate(method_order(doc))}
    return sorted(cells.values(), key=lambda c: morder.get(c["method"], 10_000))


def example_figures(
    doc: dict[str, Any],
    fm: FigureMaker,
    cells: list[dict[str, Any]],
    target: str,
    examples: int,
    examples_html: int,
    tag: str,
) -> dict[str, Any]:
    ranked = ranking(doc)
    with_figs = {im for c in cells for im in as_dict(as_dict(c.get("series")).get("figures"))}
    order = [im for im in ranked if im in with_figs] + sorted(with_figs - set(ranked))
    parts: dict[str, list[tuple[int, dict[str, Any], str, list[str], Any]]] = {}
    for im in order:
        for ci, c in enumerate(cells):
            fig = as_dict(as_dict(as_dict(c.get("series")).get("figures")).get(im))
            if fig:
                kind, caps, build, maps = figure_parts(doc, fm, im, fig, is_signed(c), target)
                if caps:
                    parts.setdefault(im, []).append((ci, c, kind, caps, build, maps))
    strip_images = [im for im in order if any(p[2] == "strip" for p in parts.get(im, []))][:examples]
    pair_images = [im for im in order if any(p[2] == "pair" for p in parts.get(im, []))]
    pair_images = pair_images[: examples if target == "pdf" else max(examples, examples_html)]
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
            src = row_src(fm, (tag, "strip", im, ci, len(caps)), build, TILE_PX["strip"], target)
            rows.append(
                {
                    "label": variant_label(c),
                    "src": src,
                    "n": len(caps),
                    "alt": f"{variant_label(c)}: " + ", ".join(caps),
                }
            )
        columns = columns or []
        strips.append(
            {
                "head": image_head(doc, fm, im, TILE_PX["pair"]),
                "columns": columns,
                "width_mm": LABEL_MM + TILE_MM[target]["strip"] * len(columns),
                "rows": [r for r in rows if r["n"] == len(columns)],
            }
        )
    pairs = []
    chunk = PAIR_CHUNK[target]
    for start in range(0, len(pair_images), chunk):
        ims = pair_images[start : start + chunk]
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
                    row["by_image"][im] = row_src(fm, (tag, "pair", im, ci), build, TILE_PX["pair"], target)
        width = max((len(v) for v in captions.values()), default=1)
        rows = [
            {"label": r["label"], "cells": [r["by_image"].get(im) for im in ims]}
            for _, r in sorted(by_cell.items())
        ]
        pairs.append(
            {
                "heads": [image_head(doc, fm, im, TILE_PX["pair"]) for im in ims],
                "subcols": [captions.get(im, []) + [""] * (width - len(captions.get(im, []))) for im in ims],
                "width": width,
                "rows": rows,
                "width_mm": LABEL_MM + max(TILE_MM[target]["pair"] * width, 18) * len(ims),
            }
        )
    bars = [colorbar(s) for s in sorted(kinds_signed, reverse=True)]
    return {
        "strips": strips,
        "pairs": pairs,
        "colorbars": bars,
        "count": len(set(strip_images) | set(pair_images)),
    }
