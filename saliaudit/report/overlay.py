"""Saliency overlays: colour maps, normalization and PIL rendering (no matplotlib).

Colour map anchors and their sources:

* ``"diverging"``: ColorBrewer RdBu, 11 classes (Cynthia Brewer, colorbrewer2.org; the same
  anchors as matplotlib's ``RdBu``), reversed so negative is blue and positive is red. The
  centre anchor ``#f7f7f7`` is replaced by pure white so that a zero saliency is white.
  Interpolated in CIELAB (D65), centre anchor exactly at index 128.
* ``"sequential"``: viridis (van der Walt & Smith, matplotlib ``_cm_listed``), 16 evenly spaced
  samples (identical to R ``viridisLite::viridis(16)``), interpolated linearly in sRGB.
"""

from __future__ import annotations

import io
import re
from collections.abc import Collection
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..result import MapRecord
from .output import atomic_write

__all__ = [
    "colormap",
    "display_image",
    "map_filename",
    "map_to_png_bytes",
    "normalize_map",
    "render_explanation",
    "render_overlay",
    "save_explanation",
    "save_overlay",
    "wrap_text",
    "write_overlays",
]

_RDBU_R = (
    "#053061",
    "#2166ac",
    "#4393c3",
    "#92c5de",
    "#d1e5f0",
    "#ffffff",
    "#fddbc7",
    "#f4a582",
    "#d6604d",
    "#b2182b",
    "#67001f",
)
_VIRIDIS = (
    "#440154",
    "#481a6c",
    "#472f7d",
    "#414487",
    "#39568c",
    "#31688e",
    "#2a788e",
    "#23888e",
    "#1f988b",
    "#22a884",
    "#35b779",
    "#54c568",
    "#7ad151",
    "#a5db36",
    "#d2e21b",
    "#fde725",
)

BAR_WIDTH = 12  # px, colour bar strip
MARGIN = 4  # px, spacing around the colour bar, labels and title
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_XYZ_WHITE = np.array([0.95047, 1.0, 1.08883])
_RGB2XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)


def _hex(colours: tuple[str, ...]) -> np.ndarray:
    return np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in colours], float) / 255.0


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    t = lin @ _RGB2XYZ.T / _XYZ_WHITE
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def _lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    fy = (lab[:, 0] + 16) / 116
    f = np.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], 1)
    t = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29))
    lin = np.clip(t * _XYZ_WHITE @ np.linalg.inv(_RGB2XYZ).T, 0.0, 1.0)
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)


def _interp(anchors: np.ndarray, positions: np.ndarray) -> np.ndarray:
    idx = np.arange(256, dtype=float)
    return np.stack([np.interp(idx, positions, anchors[:, c]) for c in range(3)], 1)


@cache
def _lut(name: str) -> np.ndarray:
    if name == "diverging":
        half = len(_RDBU_R) // 2
        pos = np.concatenate([np.linspace(0, 128, half + 1), np.linspace(128, 255, half + 1)[1:]])
        rgb = _lab_to_srgb(_interp(_srgb_to_lab(_hex(_RDBU_R)), pos))
    elif name == "sequential":
        rgb = _interp(_hex(_VIRIDIS), np.linspace(0, 255, len(_VIRIDIS)))
    else:
        raise ValueError(f"unknown colour map {name!r}; expected 'diverging' or 'sequential'")
    lut = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def colormap(name: str) -> np.ndarray:
    """Return a (256, 3) uint8 lookup table: ``"diverging"`` (RdBu_r) or ``"sequential"`` (viridis)."""
    return _lut(name).copy()


def _clean(saliency: np.ndarray, two_d: bool = True) -> np.ndarray:
    """Float64 copy with NaN/Inf replaced by 0; ``two_d`` drops leading singleton axes and
    requires an (H, W) map."""
    s = np.array(saliency, dtype=np.float64)
    while two_d and s.ndim > 2 and s.shape[0] == 1:
        s = s[0]
    if two_d and s.ndim != 2:
        raise ValueError(f"saliency must be a 2-D (H, W) array, got shape {np.shape(saliency)}")
    return np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)


def _scale(s: np.ndarray, signed: bool, percentile: float) -> tuple[float, float]:
    """(low, high) of the normalization; high <= low means "all zeros" (empty/constant map)."""
    if s.size == 0 or s.min() == s.max():
        return 0.0, 0.0
    if signed:
        a = np.abs(s)
        hi = float(np.percentile(a, percentile))
        return 0.0, hi if hi > 0 else float(a.max())
    s = np.maximum(s, 0.0)
    lo = float(s.min())
    hi = float(np.percentile(s, percentile))
    return lo, hi if hi > lo else float(s.max())


def _apply(s: np.ndarray, signed: bool, lo: float, hi: float) -> np.ndarray:
    if not hi > lo:
        return np.zeros_like(s)
    if signed:
        return np.clip(s / hi, -1.0, 1.0)
    return np.clip((np.maximum(s, 0.0) - lo) / (hi - lo), 0.0, 1.0)


def normalize_map(saliency: np.ndarray, *, signed: bool, percentile: float = 99.5) -> np.ndarray:
    """Scale a map robustly: signed -> [-1, 1] by the percentile of |s|; magnitude -> [0, 1].

    Magnitude maps clip negatives to 0 and are min-max scaled with the percentile as the max.
    NaN/Inf count as 0; constant maps (all-zero included, either mode) give zeros. Any shape.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    s = _clean(saliency, two_d=False)
    return _apply(s, signed, *_scale(s, signed, percentile))


def _resize(v: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to PIL size (width, height)."""
    if v.size == 0:
        return np.zeros((size[1], size[0]))
    if (v.shape[1], v.shape[0]) == tuple(size):
        return v
    img = Image.fromarray(v.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float64)


def _colour(v: np.ndarray, signed: bool) -> np.ndarray:
    """Colour a normalized map: (H, W, 3) uint8; signed 0 -> index 128 (white)."""
    if signed:
        idx = np.where(v >= 0, 128 + v * 127, 128 + v * 128)
        return _lut("diverging")[np.clip(np.round(idx), 0, 255).astype(np.intp)]
    return _lut("sequential")[np.clip(np.round(v * 255), 0, 255).astype(np.intp)]


def _fmt(x: float) -> str:
    return f"{x:.2g}"


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    left, _top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom)


def _font(size: int | None = None) -> Any:
    """Pillow's bundled font: the bitmap default when ``size`` is None, else the scalable
    default (Aileron, FreeType) at ``size`` px; Pillow < 10.1 without a scalable default
    falls back to the bitmap font (text is measured with whatever font is drawn)."""
    if size is None:
        return ImageFont.load_default()
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()


def wrap_text(text: str, font: Any, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` px in ``font`` (measured, not estimated):
    broken at spaces, a word wider than a line broken between characters. Joining the lines
    with single spaces gives ``text`` back when it has no run of spaces and no long word."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def fits(t: str) -> bool:
        return _text_size(probe, t, font)[0] <= width

    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if fits(candidate):
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        while not fits(word) and len(word) > 1:  # a word wider than the line: cut it
            cut = max(1, max(k for k in range(1, len(word) + 1) if k == 1 or fits(word[:k])))
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line or not lines:
        lines.append(line)
    return lines


def _colorbar(height: int, signed: bool, lo: float, hi: float) -> Image.Image:
    """A vertical colour bar strip with tick labels, ``height`` pixels tall."""
    font = ImageFont.load_default()
    labels = [f"+{_fmt(hi)}", "0", f"-{_fmt(hi)}"] if signed else [_fmt(hi), _fmt(lo)]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sizes = [_text_size(probe, t, font) for t in labels]
    width = MARGIN + BAR_WIDTH + MARGIN + max(w for w, _ in sizes) + MARGIN
    strip = Image.new("RGB", (width, height), _WHITE)
    ramp = np.linspace(1.0, -1.0 if signed else 0.0, height)[:, None].repeat(BAR_WIDTH, 1)
    strip.paste(Image.fromarray(_colour(ramp, signed)), (MARGIN, 0))
    draw = ImageDraw.Draw(strip)
    x = 2 * MARGIN + BAR_WIDTH
    for i, (text, (_, th)) in enumerate(zip(labels, sizes)):
        centre = (height - 1) * i / (len(labels) - 1)
        y = int(min(max(centre - th / 2, 0), max(height - th, 0)))
        draw.text((x, y), text, fill=_BLACK, font=font)
    return strip


def render_overlay(
    image: Image.Image,
    saliency: np.ndarray,
    *,
    signed: bool,
    alpha: float = 0.5,
    colorbar: bool = True,
    title: str | None = None,
) -> Image.Image:
    """Blend a coloured saliency map over ``image``; optional colour bar (right) and title (top).

    Signed maps use the diverging map weighted by |normalized| (neutral areas keep the photo);
    magnitude maps use the sequential map everywhere. Returns a new RGB image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    photo = image.convert("RGB")
    s = _clean(saliency)
    lo, hi = _scale(s, signed, 99.5)
    v = _resize(_apply(s, signed, lo, hi), photo.size)
    w = (np.abs(v) if signed else np.ones_like(v))[..., None] * alpha
    base = np.asarray(photo, dtype=np.float64)
    out = (1.0 - w) * base + w * _colour(v, signed).astype(np.float64)
    body = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
    if colorbar:
        strip = _colorbar(body.height, signed, lo, max(hi, lo))
        canvas = Image.new("RGB", (body.width + strip.width, body.height), _WHITE)
        canvas.paste(body, (0, 0))
        canvas.paste(strip, (body.width, 0))
        body = canvas
    if title:  # wrapped to the canvas width, so that it is never clipped
        font = _font()
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        lines = wrap_text(title, font, max(body.width - 2 * MARGIN, 1))
        line_h = max(_text_size(probe, t, font)[1] for t in lines) + 2
        band = line_h * len(lines) + 2 * MARGIN
        canvas = Image.new("RGB", (body.width, body.height + band), _WHITE)
        canvas.paste(body, (0, band))
        draw = ImageDraw.Draw(canvas)
        for k, text in enumerate(lines):
            draw.text((MARGIN, MARGIN + k * line_h), text, fill=_BLACK, font=font)
        body = canvas
    return body


def save_overlay(
    path: Path, image: Image.Image, saliency: np.ndarray, *, signed: bool, **kwargs: object
) -> Path:
    """Render an overlay and write it with :func:`~saliaudit.report.output.atomic_write` (temp
    file + ``os.replace``, the folder created, the user's file mode): JPEG for a ``.jpg`` or
    ``.jpeg`` path (quality 90, no chroma subsampling, deterministic; the audit's ``maps/``
    overlays: a photograph under a colour map is 4-5x smaller than as PNG), else PNG."""
    rendered = render_overlay(image, saliency, signed=signed, **kwargs)  # type: ignore[arg-type]
    buf = io.BytesIO()
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):
        rendered.convert("RGB").save(buf, format="JPEG", quality=90, subsampling=0, optimize=False)
    else:
        rendered.save(buf, format="PNG", compress_level=1)  # 10x faster to encode, ~1.5x larger
    return atomic_write(Path(path), buf.getvalue())


EXPLAIN_SIZE = 512  # px, long side of each panel of ``saliaudit explain``
_EXPLAIN_MARGIN = 12
_TITLE_PX, _LABEL_PX = 18, 14  # font sizes of the title and of the captions and bar labels
_EXPLAIN_BAR = 20  # px, width of the colour bar strip of ``explain``


def _panel_size(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    w, h = size
    scale = long_side / max(w, h, 1)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _fit_photo(photo: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Nearest neighbour when enlarging (every input pixel a visible block, nothing
    invented), Lanczos when reducing."""
    if photo.size == size:
        return photo
    enlarge = size[0] >= photo.width and size[1] >= photo.height
    return photo.resize(size, Image.Resampling.NEAREST if enlarge else Image.Resampling.LANCZOS)


def _fit_map(v: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The normalized map at PIL ``size``: nearest neighbour when enlarging, so each value of
    the map (computed at the model's input resolution) is one flat block and the map shows
    its true resolution; bilinear when reducing (:func:`_resize`)."""
    if v.size == 0:
        return np.zeros((size[1], size[0]))
    if size[0] >= v.shape[1] and size[1] >= v.shape[0]:
        rows = np.minimum((np.arange(size[1]) * v.shape[0]) // size[1], v.shape[0] - 1)
        cols = np.minimum((np.arange(size[0]) * v.shape[1]) // size[0], v.shape[1] - 1)
        return v[rows][:, cols]
    return _resize(v, size)


def _bar_labels(signed: bool, lo: float, hi: float) -> tuple[list[str], list[float]]:
    """Labels of the colour bar, top to bottom, and their positions in [0, 1] from the top."""
    if signed:
        return [f"+{_fmt(hi)} for the class", "0", f"-{_fmt(hi)} against it"], [0.0, 0.5, 1.0]
    return [f"{_fmt(hi)} high", f"{_fmt(lo)} low"], [0.0, 1.0]


def render_explanation(
    image: Image.Image,
    saliency: np.ndarray,
    *,
    signed: bool,
    title: str,
    size: int = EXPLAIN_SIZE,
    percentile: float = 99.5,
) -> tuple[Image.Image, list[str]]:
    """The figure of ``saliaudit explain``: the title, then the image and its map side by
    side, and the map's colour bar with labelled ends. Returns the RGB image and the title's
    lines as drawn.

    Layout and why:

    * Both panels are ``size`` px on the long side (512 by default), whatever the input size:
      a 64×64 input is enlarged 8×. Enlarging uses **nearest neighbour** for the map and
      the image, so each value of the map (at the model's input resolution) is one flat
      block: a smooth-looking map would claim a resolution the method does not have.
      Reducing a large image uses Lanczos (image) and bilinear (map).
    * **Side by side** rather than one blend: a faint overlay hides weak attributions, a
      strong one hides the image. The left panel is the untouched image; the right panel is
      the map at full strength over a faded grey copy of the image (its outlines only, so
      that positions can be read without the photo's colours competing with the map's).
      A signed map is weighted by its own magnitude (zero shows the faded image, the
      strongest values full colour: RdBu_r, blue negative, red positive); a magnitude map
      colours every pixel (viridis).
    * The colour bar labels its ends (and 0 of a signed map) with the map's values: the
      normalization scales by the ``percentile`` of |map| (of the map for magnitudes), and
      values beyond it are shown at the end colour.
    * The title is wrapped at spaces to the canvas width, measured with the font it is drawn
      in, so it is never clipped; a word wider than the canvas is broken between characters.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    photo = image.convert("RGB")
    s = _clean(saliency)
    lo, hi = _scale(s, signed, percentile)
    pw, ph = _panel_size(photo.size, size)
    left = _fit_photo(photo, (pw, ph))
    v = _fit_map(_apply(s, signed, lo, hi), (pw, ph))
    grey = np.asarray(left.convert("L"), dtype=np.float64)[..., None]
    faded = 255.0 - 0.5 * (255.0 - grey)  # half the contrast, towards white
    weight = (np.abs(v) if signed else np.full_like(v, 0.7))[..., None]
    mixed = (1.0 - weight) * faded + weight * _colour(v, signed).astype(np.float64)
    right = Image.fromarray(np.clip(np.round(mixed), 0, 255).astype(np.uint8))

    label_font, title_font = _font(_LABEL_PX), _font(_TITLE_PX)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    m = _EXPLAIN_MARGIN
    labels, where = _bar_labels(signed, lo, max(hi, lo))
    label_w = max(_text_size(probe, t, label_font)[0] for t in labels)
    captions = ["image", "map" + (" (signed)" if signed else " (magnitude)") + " over the faded image"]
    caption_h = max(_text_size(probe, t, label_font)[1] for t in captions) + m // 2
    width = m + pw + m + pw + m + _EXPLAIN_BAR + m // 2 + label_w + m
    lines = wrap_text(title, title_font, width - 2 * m)
    line_h = max(_text_size(probe, t or "Ag", title_font)[1] for t in lines) + 4
    top = m + line_h * len(lines) + m
    label_h = _text_size(probe, "0", label_font)[1]
    height = top + caption_h + ph + label_h // 2 + m
    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(lines):
        draw.text((m, m + k * line_h), text, fill=_BLACK, font=title_font)
    y0 = top + caption_h
    for x, panel, caption in ((m, left, captions[0]), (2 * m + pw, right, captions[1])):
        draw.text((x, top), caption, fill=_BLACK, font=label_font)
        canvas.paste(panel, (x, y0))
    bar_x = 3 * m + 2 * pw
    ramp = np.linspace(1.0, -1.0 if signed else 0.0, ph)[:, None].repeat(_EXPLAIN_BAR, 1)
    canvas.paste(Image.fromarray(_colour(ramp, signed)), (bar_x, y0))
    draw.rectangle((bar_x, y0, bar_x + _EXPLAIN_BAR - 1, y0 + ph - 1), outline=(120, 120, 120))
    for text, pos in zip(labels, where):
        th = _text_size(probe, text, label_font)[1]
        y = int(min(max(y0 + pos * (ph - 1) - th / 2, top), height - th - 1))
        draw.text((bar_x + _EXPLAIN_BAR + m // 2, y), text, fill=_BLACK, font=label_font)
    return canvas, lines


def save_explanation(
    path: Path, image: Image.Image, saliency: np.ndarray, *, signed: bool, title: str, **kwargs: Any
) -> list[str]:
    """:func:`render_explanation` written as PNG (atomically); the full title is recorded in
    the PNG's ``Title`` text chunk and the drawn lines in ``saliaudit:title_lines`` (JSON).
    Returns the title's lines as drawn."""
    import json

    from PIL.PngImagePlugin import PngInfo

    rendered, lines = render_explanation(image, saliency, signed=signed, title=title, **kwargs)
    info = PngInfo()
    info.add_itxt("Title", title)
    info.add_itxt("saliaudit:title_lines", json.dumps(lines, ensure_ascii=False))
    buf = io.BytesIO()
    rendered.save(buf, format="PNG", pnginfo=info)
    atomic_write(Path(path), buf.getvalue())
    return lines


def map_to_png_bytes(saliency: np.ndarray, *, signed: bool, size: tuple[int, int] | None = None) -> bytes:
    """PNG bytes of the coloured map alone; ``size`` is PIL's (width, height)."""
    v = normalize_map(_clean(saliency), signed=signed)
    if size is not None:
        v = _resize(v, (int(size[0]), int(size[1])))
    elif v.size == 0:
        v = np.zeros((1, 1))
    buf = io.BytesIO()
    Image.fromarray(_colour(v, signed)).save(buf, format="PNG")
    return buf.getvalue()


def map_filename(rel: str, method: str, variant: str) -> str:
    """A flat, safe file name for the overlay of image ``rel`` by ``method`` (ψ or post)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", rel.rsplit(".", 1)[0].replace("/", "__"))
    return f"{stem[:150]}.{method}.{variant}.jpg"


def display_image(image: Image.Image, short_side: int = 256, long_side: int = 512) -> Image.Image:
    """The image at a size where an overlay is readable: small inputs are enlarged."""
    w, h = image.size
    scale = max(short_side / min(w, h), 1.0)
    scale = min(scale, max(long_side / max(w, h), 1.0)) if scale > 1 else min(1.0, long_side / max(w, h))
    if abs(scale - 1.0) < 1e-6:
        return image
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)


def write_overlays(
    batch: Any,
    images: list[Image.Image],
    maps: dict[Any, Any],
    out_dir: Path,
    only: Collection[str] | None = None,
) -> list[MapRecord]:
    """One JPEG overlay per (image of ``batch``, map variant) under ``out_dir/maps``, for the
    images named in ``only`` (``None``: every image); the records the results list them by
    (paths relative to ``out_dir``)."""
    chosen = [i for i, rel in enumerate(batch.images) if only is None or rel in only]
    if not chosen:
        return []
    maps_dir = Path(out_dir) / "maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    names = batch.model.class_names
    records = []
    for v, m in maps.items():
        arr = m[chosen].detach().cpu().numpy()
        variant = v.psi or v.post
        what = f"{v.method} psi={v.psi}" if v.psi else f"{v.method} {v.post}"
        for j, i in enumerate(chosen):
            rel = batch.images[i]
            t = int(batch.targets[i])
            name = map_filename(rel, v.method, variant)
            save_overlay(
                maps_dir / name,
                display_image(images[i]),
                arr[j],
                signed=v.signed,
                title=f"{what} - {names[t]}",
            )
            records.append(MapRecord(rel, v.method, v.psi, t, f"maps/{name}", v.signed, v.post))
    return records
