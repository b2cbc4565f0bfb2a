"""Checks made before the expensive work: the environment settings the outputs depend on, and
what a report run will write into its output folder, with an estimate of its size.

The estimate is made from the number of images (listed as the audit will list them), the
map variants of the selected methods, ``--overlays`` and ``--format``, with typical sizes
measured on saliaudit's own outputs (overlays of 256-512 px photos are 90-300 kB each; the
HTML report 3-6 MB, the PDF 1.5-2 MB). It is meant to catch a disk that is nearly full before
an audit of hours, not to predict the bytes exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UsageError
from .report.output import FILES, Planned, human_bytes

__all__ = ["check_environment", "planned_report", "planned_files", "SIZES"]

#: Typical sizes in bytes of what a report writes (see the module docstring).
SIZES = {
    "overlay": 300_000,
    "json": 10_000_000,
    "json_per_image": 20_000,
    "html": 6_000_000,
    "pdf": 3_000_000,
    "junit": 200_000,
    "baseline": 10_000_000,  # diff.json, compare.html, compare.pdf, compare-junit.xml
}


def check_environment(formats: list[str], environ: Mapping[str, str] | None = None) -> None:
    """``SOURCE_DATE_EPOCH``, which dates the PDF, must be a non-negative integer when it is
    set and a PDF is written; else :class:`UsageError` (exit 2) before any work."""
    env = os.environ if environ is None else environ
    if "pdf" not in formats or "SOURCE_DATE_EPOCH" not in env:
        return
    value = env["SOURCE_DATE_EPOCH"]
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise UsageError(
            f"invalid environment variable SOURCE_DATE_EPOCH: expected a non-negative integer "
            f"(seconds since 1970-01-01 UTC), got {value!r}",
            hint="set it to e.g. $(git log -1 --format=%ct), or unset it",
        )


def planned_files(formats: list[str], names: Mapping[str, str] = FILES) -> list[str]:
    """The file names of ``formats`` in the folder."""
    return [names[f] for f in formats if f in names]


def _variants(cfg: Any) -> int:
    from .methods import get_method

    total = 0
    for name in cfg.methods:
        try:
            method = get_method(name)
        except Exception:  # an unknown name is reported by the audit itself
            total += 1
            continue
        chosen = cfg.psi if method.option == "psi" else cfg.post
        total += len(chosen) if chosen else len(method.choices or [None])
    return total


def _count_images(cfg: Any, images: Path) -> int:
    from .data import find_images

    try:
        listing = find_images(images, max_images=cfg.max_images, sample=cfg.sample, seed=cfg.seed)
    except Exception:  # the audit reports an unusable image source with its own message
        return 0
    return len(listing.entries)


def planned_report(cfg: Any, images: Path, *, baseline: bool = False) -> Planned:
    """What ``saliaudit report`` will write, and about how many bytes."""
    from .report.compare_html import BASELINE_FILES

    formats = list(cfg.format)
    files = planned_files(formats) + (planned_files(formats, BASELINE_FILES) if baseline else [])
    n = _count_images(cfg, images)
    shown = {"all": n, "examples": min(n, int(cfg.examples_html)), "none": 0}.get(cfg.overlays, n)
    overlays = shown * _variants(cfg) if cfg.overlays != "none" else 0
    parts: list[tuple[str, int]] = []
    if overlays:
        parts.append((f"{overlays} overlays", overlays * SIZES["overlay"]))
    if "json" in formats:
        parts.append(("results.json", SIZES["json"] + n * SIZES["json_per_image"]))
    for fmt in ("html", "pdf", "junit"):
        if fmt in formats:
            parts.append((FILES[fmt], SIZES[fmt]))
    if baseline:
        parts.append(("the comparison", SIZES["baseline"]))
    total = sum(b for _, b in parts)
    detail = f"{n} images: " + ", ".join(f"{what} {human_bytes(b)}" for what, b in parts)
    return Planned(files=files, maps=overlays > 0, bytes=total, detail=detail)
