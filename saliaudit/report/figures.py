"""Example figures of the report: overlays as PNG data URIs, built from the results alone.

The results carry, per example image, a small thumbnail (a PNG data URI) and small 2-D maps
(nested lists, at most 48 px). An overlay is the thumbnail with the map blended over it:
signed maps (ψ ``signed``, post-processing ``signed``) use the diverging RdBu colour map
symmetric around 0 (blue against the class, red for it), magnitude maps the sequential viridis
map, as in :mod:`saliaudit.report.overlay`. The colour bar is drawn once per figure as SVG
(:func:`colorbar`). Each map is scaled to its own 99.5th percentile of |map|.

Everything read from the results is validated: only ``data:image/png|jpeg|gif|webp;base64``
URIs that decode to a small image are used, and they are re-encoded as PNG, so a crafted
document cannot smuggle markup, a remote URL or a decompression bomb into the report. The same
inputs give the same PNG bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

import numpy as np
from markupsafe import Markup
from PIL import Image

from ..maps import decode_map
from . import plots
from .context import as_dict, as_list
from .overlay import colormap, render_overlay

__all__ = [
    "FigureMaker",
    "ranking",
    "colorbar",
    "clean_map",
    "compose_row",
    "png_uri",
    "jpeg_uri",
    "figure_uri",
]

_DATA_URI = re.compile(r"data:image/(png|jpeg|gif|webp);base64,([A-Za-z0-9+/=\s]+)\Z")
MAX_URI_CHARS = 4_000_000  # a thumbnail is a few kB; refuse anything absurd
MAX_SIDE = 1024


def ranking(doc: dict[str, Any]) -> list[str]:
    """Images, most telling first: ``figures.ranking``, then the other images in audit order."""
    figures = as_dict(doc.get("figures"))
    order = [str(i) for i in as_list(figures.get("ranking")) if isinstance(i, str)]
    known = [
        str(r.get("image"))
        for r in as_list(doc.get("images"))
        if isinstance(r, dict) and r.get("image") is not None
    ]
    known += [str(k) for k in as_dict(figures.get("images"))]
    return list(dict.fromkeys(order + known))


def decode_image(uri: Any) -> Image.Image | None:
    """The RGB image of a ``data:image/...;base64`` URI, or ``None`` when it is not one."""
    if not isinstance(uri, str) or len(uri) > MAX_URI_CHARS:
        return None
    m = _DATA_URI.match(uri.strip())
    if not m:
        return None
    try:
        raw = base64.b64decode("".join(m.group(2).split()), validate=True)
        img = Image.open(io.BytesIO(raw))
        if img.width < 1 or img.height < 1 or max(img.size) > MAX_SIDE:
            return None
        img.load()
        return img.convert("RGB")
    except (binascii.Error, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None


def clean_map(data: Any) -> np.ndarray | None:
    """A finite float (H, W) array of a stored small map (:func:`saliaudit.maps.decode_map`:
    the compact encoding, or nested lists from earlier results), or ``None`` when malformed."""
    return decode_map(data)


def png_uri(img: Image.Image) -> str:
    """Deterministic PNG data URI of ``img``."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def jpeg_uri(img: Image.Image, quality: int = 90) -> str:
    """Deterministic JPEG data URI of ``img`` (4:4:4, baseline): the PDF's photographic figure
    rows, 4-6× smaller than PNG and embedded by WeasyPrint without re-encoding."""
    buf = io.BytesIO()
    img.convert("RGB").save(
        buf, format="JPEG", quality=quality, subsampling=0, optimize=False, progressive=False
    )
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_uri(img: Image.Image, target: str) -> str:
    """PNG (lossless) in the HTML report, JPEG in the PDF (size)."""
    return jpeg_uri(img) if target == "pdf" else png_uri(img)


def _fit(img: Image.Image, px: int) -> Image.Image:
    """``img`` scaled so that its long side is ``px`` (bilinear, deterministic)."""
    w, h = img.size
    s = px / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return img if size == img.size else img.resize(size, Image.Resampling.BILINEAR)


class FigureMaker:
    """Turns the results' thumbnails and small maps into data URIs (cached per render)."""

    def __init__(self, doc: dict[str, Any]):
        self.images = as_dict(as_dict(doc.get("figures")).get("images"))
        self._photos: dict[tuple, Image.Image | None] = {}
        self._uris: dict[tuple, str | None] = {}

    def cached(self, key: tuple, build: Any) -> Any:
        """``build()`` once per ``key`` (the HTML and the PDF of one run share the figures)."""
        if key not in self._uris:
            self._uris[key] = build()
        return self._uris[key]

    def info(self, image: str) -> dict[str, Any]:
        return as_dict(self.images.get(image))

    def photo(self, image: str, px: int) -> Image.Image | None:
        key = (image, px)
        if key not in self._photos:
            img = decode_image(self.info(image).get("thumbnail"))
            self._photos[key] = _fit(img, px) if img is not None else None
        return self._photos[key]

    def thumbnail(self, image: str, px: int = 128) -> str | None:
        """The image's thumbnail as a PNG data URI (long side ``px``), or ``None``."""
        key = ("thumb", image, px)
        if key not in self._uris:
            img = self.photo(image, px)
            self._uris[key] = png_uri(img) if img is not None else None
        return self._uris[key]

    def picture_image(self, uri: Any, px: int) -> Image.Image | None:
        """Another image stored as a data URI (e.g. a perturbed input), validated, long side ``px``."""
        img = decode_image(uri)
        return _fit(img, px) if img is not None else None

    def picture(self, uri: Any, px: int = 96) -> str | None:
        """:meth:`picture_image` re-encoded as a PNG data URI."""
        img = self.picture_image(uri, px)
        return png_uri(img) if img is not None else None

    def overlay_image(self, image: str, data: Any, *, signed: bool, px: int = 96) -> Image.Image | None:
        """The map ``data`` over the image's thumbnail (or alone on white), long side ``px``."""
        arr = clean_map(data)
        if arr is None:
            return None
        base = self.backdrop(image, px)
        if base is None:
            h, w = arr.shape
            s = px / max(h, w)
            base = Image.new("RGB", (max(1, round(w * s)), max(1, round(h * s))), (255, 255, 255))
        return render_overlay(base, arr, signed=signed, alpha=0.65, colorbar=False)

    def backdrop(self, image: str, px: int) -> Image.Image | None:
        """The thumbnail in light grey: under an overlay, colour then only encodes the map
        (the image's own colours would read as saliency); the header shows the original."""
        key = ("backdrop", image, px)
        if key not in self._photos:
            photo = self.photo(image, px)
            if photo is None:
                self._photos[key] = None
            else:
                grey = np.asarray(photo.convert("L"), dtype=np.float64)
                light = np.round(96 + grey * (159 / 255)).astype(np.uint8)
                self._photos[key] = Image.fromarray(light).convert("RGB")
        return self._photos[key]

    def overlay(self, image: str, data: Any, *, signed: bool, px: int = 96) -> str | None:
        """:meth:`overlay_image` as a PNG data URI (``None`` for a malformed map)."""
        img = self.overlay_image(image, data, signed=signed, px=px)
        return png_uri(img) if img is not None else None


def compose_row(tiles: list[Image.Image | None], px: int, pad: int = 2) -> Image.Image:
    """Tiles side by side in equal slots of ``px + 2·pad`` (a missing tile is a grey box), so
    that the row lines up with ``len(tiles)`` equal table columns."""
    slot = px + 2 * pad
    row = Image.new("RGB", (slot * max(len(tiles), 1), slot), (255, 255, 255))
    for i, tile in enumerate(tiles):
        if tile is None:
            row.paste((226, 226, 230), (i * slot + pad, pad, i * slot + pad + px, pad + px))
            continue
        t = _fit(tile, px)
        row.paste(t, (i * slot + pad + (px - t.width) // 2, pad + (px - t.height) // 2))
    return row


def _stops(name: str, n: int = 11) -> list[str]:
    lut = colormap(name)
    idx = [round(i * 255 / (n - 1)) for i in range(n)]
    return ["#{:02x}{:02x}{:02x}".format(*tuple(int(c) for c in lut[i])) for i in idx]


def colorbar(signed: bool) -> Markup:
    """The colour bar of signed (diverging) or magnitude (sequential) overlays."""
    if signed:
        return plots.colorbar(
            _stops("diverging"),
            signed=True,
            width=300,
            label="signed maps: blue against the class, red for it",
        )
    return plots.colorbar(
        _stops("sequential"), signed=False, width=300, label="magnitude maps: dark low, yellow high"
    )
