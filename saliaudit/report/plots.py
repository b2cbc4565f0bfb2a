"""Small inline-SVG charts for the report: line charts, horizontal bars, colour bars.

No matplotlib: the charts are a few dozen SVG elements each, written with fixed number
formatting so the same results give the same bytes. Every text that comes from the results
(series names, labels) is escaped; the functions return :class:`markupsafe.Markup` that the
templates insert as is. The SVG carries no namespace URL: inline SVG in HTML does not need one
(html5 parsers put ``<svg>`` in the SVG namespace), and the report holds no ``http`` string.

Lines are told apart by colour *and* dash pattern and marker, so a grey-scale print still
reads; random baselines are grey and dashed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from markupsafe import Markup, escape

__all__ = ["line_chart", "bar_chart", "colorbar", "PALETTE"]

#: Okabe & Ito's colour-blind-safe palette (black last).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
DASHES = ("", "6 3", "2 2", "8 3 2 3", "4 4", "1 3", "10 2", "3 6")
MARKERS = ("circle", "square", "triangle", "diamond", "circle", "square", "triangle", "diamond")
STATUS_FILL = {
    "pass": "#2e7d32",
    "warn": "#b7791f",
    "fail": "#c62828",
    "error": "#6a1b9a",
    "skipped": "#9e9e9e",
}
FONT = "DejaVu Sans, Verdana, Arial, sans-serif"


def _n(v: float) -> str:
    """A coordinate with fixed precision (deterministic bytes)."""
    s = f"{v:.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _tick(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000 or a < 0.01:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.3g}"


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _marker(kind: str, x: float, y: float, colour: str) -> str:
    if kind == "square":
        return f'<rect x="{_n(x - 2.5)}" y="{_n(y - 2.5)}" width="5" height="5" fill="{colour}"/>'
    if kind == "triangle":
        return (
            f'<path d="M{_n(x)} {_n(y - 3)}L{_n(x - 3)} {_n(y + 2.5)}L{_n(x + 3)} '
            f'{_n(y + 2.5)}Z" fill="{colour}"/>'
        )
    if kind == "diamond":
        return (
            f'<path d="M{_n(x)} {_n(y - 3.2)}L{_n(x + 3.2)} {_n(y)}L{_n(x)} {_n(y + 3.2)}'
            f'L{_n(x - 3.2)} {_n(y)}Z" fill="{colour}"/>'
        )
    return f'<circle cx="{_n(x)}" cy="{_n(y)}" r="2.5" fill="{colour}"/>'


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 1, 1)] + "…"


def line_chart(
    series: Sequence[dict[str, Any]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    x_kind: str = "auto",
    y_min: float | None = None,
    y_max: float | None = None,
    hlines: dict[str, float] | None = None,
    width: int = 330,
    height: int = 220,
) -> Markup:
    """A line chart of curves ``{"label", "x", "mean", "std"?, "baseline"?: bool}``.

    ``x_kind``: ``"cat"`` (labels evenly spaced), ``"lin"``, ``"log"`` or ``"auto"`` (log for
    positive numbers spanning ≥ 20×, linear for other numbers, categories otherwise). A band of
    ±std is drawn under each curve; ``hlines`` draws labelled horizontal threshold lines.
    """
    series = [s for s in series if s.get("x") and s.get("mean")]
    xs_all = [x for s in series for x in s["x"]]
    numeric = bool(xs_all) and all(_num(x) is not None for x in xs_all)
    if x_kind == "auto":
        if numeric and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 20:
            x_kind = "log"
        else:
            x_kind = "lin" if numeric else "cat"
    cats: list[str] = []
    if x_kind == "cat":
        for s in series:
            for x in s["x"]:
                if str(x) not in cats:
                    cats.append(str(x))
    longest = max((len(c) for c in cats), default=0)
    rotate = x_kind == "cat" and (len(cats) > 4 or longest > 6)
    left, right, top = 44, 10, 24 if title else 10
    bottom = 34 + (min(longest, 14) * 4.2 if rotate else 0)
    legend_rows = math.ceil(len(series) / 2) if series else 0
    legend_h = legend_rows * 14 + (6 if legend_rows else 0)
    total_h = height + legend_h
    pw, ph = width - left - right, height - top - bottom
    ys = [_num(v) for s in series for v in s["mean"]]
    sds = [_num(v) or 0.0 for s in series for v in (s.get("std") or [])]
    finite = [v for v in ys if v is not None]
    lo = min(finite) if finite else 0.0
    hi = max(finite) if finite else 1.0
    if sds:
        spread = max(sds)
        lo, hi = lo - spread, hi + spread
    for v in (hlines or {}).values():
        if _num(v) is not None:
            lo, hi = min(lo, v), max(hi, v)
    lo = y_min if y_min is not None else lo
    hi = y_max if y_max is not None else hi
    if hi <= lo:
        hi = lo + 1.0
    ticks = _nice_ticks(lo, hi)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])

    def fy(v: float) -> float:
        return top + ph * (1 - (min(max(v, lo), hi) - lo) / (hi - lo))

    if x_kind == "cat":

        def fx(x: Any) -> float:
            i = cats.index(str(x))
            return left + (pw * (i + 0.5) / len(cats) if len(cats) else 0)

        xticks = [(fx(c), c) for c in cats]
    else:
        xn = [float(x) for x in xs_all] or [0.0, 1.0]
        if x_kind == "log":
            xl, xh = math.log10(min(xn)), math.log10(max(xn))
            conv = math.log10
        else:
            xl, xh = min(xn), max(xn)
            conv = float  # type: ignore[assignment]
        if xh <= xl:
            xh = xl + 1.0

        def fx(x: Any) -> float:
            return left + pw * (conv(float(x)) - xl) / (xh - xl)

        if x_kind == "log":
            xticks = [
                (fx(10**e), _tick(10**e)) for e in range(math.ceil(xl - 1e-9), math.floor(xh + 1e-9) + 1)
            ]
        else:
            xticks = [(fx(t), _tick(t)) for t in _nice_ticks(xl, xh, 6) if xl - 1e-9 <= t <= xh + 1e-9]
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {total_h}" width="{width}" '
        f'height="{total_h}" role="img" font-family="{FONT}" font-size="10">'
    ]
    if title:
        out.append(
            f'<text x="{left}" y="13" font-size="10" font-weight="bold">{escape(_shorten(title, 60))}</text>'
        )
    out.append(
        f'<rect x="{left}" y="{top}" width="{_n(pw)}" height="{_n(ph)}" fill="#ffffff" '
        'stroke="#999999" stroke-width="0.6"/>'
    )
    for t in ticks:
        y = fy(t)
        out.append(
            f'<line x1="{left}" x2="{_n(left + pw)}" y1="{_n(y)}" y2="{_n(y)}" '
            'stroke="#e3e3e3" stroke-width="0.6"/>'
        )
        out.append(f'<text x="{left - 3}" y="{_n(y + 3)}" text-anchor="end">{escape(_tick(t))}</text>')
    for x, label in xticks:
        label = _shorten(str(label), 14)
        if rotate:
            out.append(
                f'<text x="{_n(x)}" y="{_n(top + ph + 8)}" text-anchor="end" '
                f'transform="rotate(-40 {_n(x)} {_n(top + ph + 8)})">{escape(label)}</text>'
            )
        else:
            out.append(
                f'<text x="{_n(x)}" y="{_n(top + ph + 11)}" text-anchor="middle">{escape(label)}</text>'
            )
    if xlabel:
        out.append(
            f'<text x="{_n(left + pw / 2)}" y="{_n(height - 3)}" text-anchor="middle" '
            f'fill="#444444">{escape(_shorten(xlabel, 52))}</text>'
        )
    if ylabel:
        out.append(
            f'<text x="10" y="{_n(top + ph / 2)}" text-anchor="middle" fill="#444444" '
            f'transform="rotate(-90 10 {_n(top + ph / 2)})">'
            f"{escape(_shorten(ylabel, max(int(ph / 5.6), 8)))}</text>"
        )
    for name, v in (hlines or {}).items():
        if _num(v) is None or not lo <= v <= hi:
            continue
        y = fy(v)
        out.append(
            f'<line x1="{left}" x2="{_n(left + pw)}" y1="{_n(y)}" y2="{_n(y)}" '
            'stroke="#c62828" stroke-width="0.8" stroke-dasharray="3 2"/>'
        )
        out.append(
            f'<text x="{_n(left + pw - 2)}" y="{_n(y - 2)}" text-anchor="end" '
            f'fill="#c62828" font-size="8">{escape(name)}</text>'
        )
    styled = []
    k = 0
    for s in series:
        if s.get("baseline"):
            styled.append((s, "#8a8a8a", "3 3", "none"))
        else:
            styled.append((s, PALETTE[k % len(PALETTE)], DASHES[k % len(DASHES)], MARKERS[k % len(MARKERS)]))
            k += 1
    for s, colour, _dash, _ in styled:
        std = s.get("std") or []
        pts = [
            (fx(x), _num(m), _num(std[i]) if i < len(std) else None)
            for i, (x, m) in enumerate(zip(s["x"], s["mean"]))
        ]
        band = [(x, m, d) for x, m, d in pts if m is not None and d is not None]
        if len(band) > 1 and not s.get("baseline"):
            upper = " ".join(f"{_n(x)},{_n(fy(m + d))}" for x, m, d in band)
            lower = " ".join(f"{_n(x)},{_n(fy(m - d))}" for x, m, d in reversed(band))
            out.append(
                f'<polygon points="{upper} {lower}" fill="{colour}" fill-opacity="0.10" stroke="none"/>'
            )
    for s, colour, dash, marker in styled:
        run: list[str] = []
        segments = []
        for x, m in zip(s["x"], s["mean"]):
            mv = _num(m)
            if mv is None:
                if run:
                    segments.append(run)
                run = []
                continue
            run.append(f"{_n(fx(x))},{_n(fy(mv))}")
        if run:
            segments.append(run)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        for seg in segments:
            out.append(
                f'<polyline points="{" ".join(seg)}" fill="none" stroke="{colour}" '
                f'stroke-width="1.4"{dash_attr}/>'
            )
        if marker != "none":
            for x, m in zip(s["x"], s["mean"]):
                mv = _num(m)
                if mv is not None:
                    out.append(_marker(marker, fx(x), fy(mv), colour))
    for i, (s, colour, dash, marker) in enumerate(styled):
        col, row = i % 2, i // 2
        lx = left + col * (pw / 2)
        ly = height + 4 + row * 14
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<line x1="{_n(lx)}" x2="{_n(lx + 16)}" y1="{_n(ly + 4)}" y2="{_n(ly + 4)}" '
            f'stroke="{colour}" stroke-width="1.4"{dash_attr}/>'
        )
        if marker != "none":
            out.append(_marker(marker, lx + 8, ly + 4, colour))
        out.append(
            f'<text x="{_n(lx + 20)}" y="{_n(ly + 8)}">{escape(_shorten(str(s.get("label", "")), 22))}</text>'
        )
    out.append("</svg>")
    return Markup("".join(out))


def bar_chart(
    rows: Sequence[dict[str, Any]],
    *,
    title: str = "",
    xlabel: str = "",
    thresholds: dict[str, float] | None = None,
    x_min: float | None = None,
    x_max: float | None = None,
    width: int = 640,
    bar_h: int = 12,
) -> Markup:
    """Horizontal bars ``{"label", "value", "status"}``, one per row, with status text, and
    the row's 95 % interval (``"ci": [lo, hi]``) as an error bar when given.

    Bars are coloured by status and also carry the status word, so colour is never the only
    cue; ``thresholds`` draws labelled vertical lines (e.g. warn/fail).
    """
    label_w, status_w, right, gap = 150, 52, 6, 34
    top = 32 if title else 14
    h = top + len(rows) * (bar_h + 4) + 26
    pw = width - label_w - status_w - right - gap
    vals = [_num(r.get("value")) for r in rows]
    cis = [
        r.get("ci")
        if isinstance(r.get("ci"), (list, tuple))
        and len(r["ci"]) == 2
        and all(_num(c) is not None for c in r["ci"])
        else None
        for r in rows
    ]
    finite = [v for v in vals if v is not None] + [
        v for v in (thresholds or {}).values() if _num(v) is not None
    ]
    finite += [float(c) for ci in cis if ci for c in ci]
    lo = x_min if x_min is not None else min([0.0, *finite])
    hi = x_max if x_max is not None else max([1.0 if not finite else max(finite), 0.0])
    if hi <= lo:
        hi = lo + 1.0
    ticks = _nice_ticks(lo, hi, 6)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])

    def fx(v: float) -> float:
        return label_w + pw * (min(max(v, lo), hi) - lo) / (hi - lo)

    out = [
        f'<svg class="chart bars" viewBox="0 0 {width} {h}" width="{width}" height="{h}" '
        f'role="img" font-family="{FONT}" font-size="9">'
    ]
    if title:
        out.append(
            f'<text x="4" y="13" font-size="10" font-weight="bold">{escape(_shorten(title, 90))}</text>'
        )
    axis_y = top + len(rows) * (bar_h + 4)
    for t in ticks:
        x = fx(t)
        out.append(
            f'<line x1="{_n(x)}" x2="{_n(x)}" y1="{top}" y2="{_n(axis_y)}" stroke="#e3e3e3" '
            'stroke-width="0.6"/>'
        )
        out.append(f'<text x="{_n(x)}" y="{_n(axis_y + 11)}" text-anchor="middle">{escape(_tick(t))}</text>')
    zero = fx(0.0) if lo <= 0 <= hi else fx(lo)
    for i, (r, v) in enumerate(zip(rows, vals)):
        y = top + i * (bar_h + 4)
        status = str(r.get("status", ""))
        out.append(
            f'<text x="{label_w - 4}" y="{_n(y + bar_h - 3)}" text-anchor="end">'
            f"{escape(_shorten(str(r.get('label', '')), 28))}</text>"
        )
        if v is not None:
            x0, x1 = sorted((zero, fx(v)))
            out.append(
                f'<rect x="{_n(x0)}" y="{y}" width="{_n(max(x1 - x0, 0.8))}" height="{bar_h}" '
                f'fill="{STATUS_FILL.get(status, "#9e9e9e")}" fill-opacity="0.8"/>'
            )
            ci = cis[i]
            if ci:  # the 95 % interval as an error bar
                a, b = fx(float(ci[0])), fx(float(ci[1]))
                mid = y + bar_h / 2
                out.append(
                    f'<line x1="{_n(a)}" x2="{_n(b)}" y1="{_n(mid)}" y2="{_n(mid)}" '
                    'stroke="#222222" stroke-width="1"/>'
                )
                for e in (a, b):
                    out.append(
                        f'<line x1="{_n(e)}" x2="{_n(e)}" y1="{_n(mid - 3)}" '
                        f'y2="{_n(mid + 3)}" stroke="#222222" stroke-width="1"/>'
                    )
                x1 = max(x1, a, b)
            out.append(f'<text x="{_n(x1 + 3)}" y="{_n(y + bar_h - 3)}">{escape(_tick(v))}</text>')
        else:
            out.append(f'<text x="{_n(zero + 3)}" y="{_n(y + bar_h - 3)}" fill="#666666">no value</text>')
        out.append(
            f'<text x="{_n(width - right - status_w + 6)}" y="{_n(y + bar_h - 3)}" '
            f'font-weight="bold" fill="{STATUS_FILL.get(status, "#777777")}">'
            f"{escape(str(r.get('status_text') or status).upper())}</text>"
        )
    out.append(
        f'<line x1="{_n(label_w)}" x2="{_n(label_w + pw)}" y1="{_n(axis_y)}" y2="{_n(axis_y)}" '
        'stroke="#999999" stroke-width="0.6"/>'
    )
    for name, v in (thresholds or {}).items():
        if _num(v) is None or not lo <= v <= hi:
            continue
        x = fx(v)
        out.append(
            f'<line x1="{_n(x)}" x2="{_n(x)}" y1="{top - 2}" y2="{_n(axis_y)}" stroke="#c62828" '
            'stroke-width="0.9" stroke-dasharray="3 2"/>'
        )
        out.append(
            f'<text x="{_n(x + 2)}" y="{top - 3}" fill="#c62828" font-size="8">'
            f"{escape(name)} {escape(_tick(v))}</text>"
        )
    if xlabel:
        out.append(
            f'<text x="{_n(label_w + pw / 2)}" y="{_n(axis_y + 23)}" text-anchor="middle" '
            f'fill="#444444">{escape(_shorten(xlabel, 90))}</text>'
        )
    out.append("</svg>")
    return Markup("".join(out))


def colorbar(stops: Sequence[str], *, signed: bool, label: str = "", width: int = 200) -> Markup:
    """A horizontal colour bar from ``stops`` (hex colours, low → high) with tick labels.

    Signed maps read ``− 0 +`` (blue: against the class, red: for it); magnitude maps read
    ``0 → max``. Each map in the report is scaled to its own 99.5th percentile, so the bar is
    relative, which the label says.
    """
    h = 34 if label else 24
    n = len(stops)
    ticks = (("−max", 0.0), ("0", 0.5), ("+max", 1.0)) if signed else (("0", 0.0), ("max", 1.0))
    bw = width - 20
    out = [
        f'<svg class="colorbar" viewBox="0 0 {width} {h}" width="{width}" height="{h}" '
        f'role="img" font-family="{FONT}" font-size="8">'
    ]
    # solid steps rather than a gradient: renders the same in every SVG engine
    steps = 64
    for i in range(steps):
        t = i / (steps - 1) * (n - 1)
        lo, frac = int(t), t - int(t)
        c0, c1 = stops[lo], stops[min(lo + 1, n - 1)]
        rgb = [round(int(c0[k : k + 2], 16) * (1 - frac) + int(c1[k : k + 2], 16) * frac) for k in (1, 3, 5)]
        x = 10 + bw * i / steps
        out.append(
            f'<rect x="{_n(x)}" y="2" width="{_n(bw / steps + 0.3)}" height="9" '
            f'fill="#{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x}"/>'
        )
    out.append(
        f'<rect x="10" y="2" width="{bw}" height="9" fill="none" stroke="#777777" stroke-width="0.5"/>'
    )
    for text, pos in ticks:
        x = 10 + bw * pos
        anchor = "start" if pos == 0 else "end" if pos == 1 else "middle"
        out.append(f'<line x1="{_n(x)}" x2="{_n(x)}" y1="11" y2="14" stroke="#555555" stroke-width="0.5"/>')
        out.append(f'<text x="{_n(x)}" y="21" text-anchor="{anchor}">{escape(text)}</text>')
    if label:
        out.append(
            f'<text x="{_n(width / 2)}" y="31" text-anchor="middle" fill="#444444">'
            f"{escape(_shorten(label, 60))}</text>"
        )
    out.append("</svg>")
    return Markup("".join(out))
