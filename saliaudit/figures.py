"""Example figures stored with the results, so the report renders without the model.

For a seeded sample of the audited images (chosen from the listing before decoding, so the
choice does not depend on the batch size) the results hold a thumbnail (PNG data URI) and,
per method variant, the map for the top-1 and for the lowest-scoring class downsampled to at
most 48 px (unless a check stores them for the images its report section shows: class
sensitivity). Checks add their own small arrays (randomization strips, perturbed images).
"""

from __future__ import annotations

import base64
import io
import random
from typing import Any

import torch
from PIL import Image

from .maps import Batch, MapSource, small_map

__all__ = ["choose_examples", "thumbnail_uri", "ExampleFigures"]


def choose_examples(names: list[str], k: int, seed: int) -> set[str]:
    """``k`` image names drawn with ``seed`` (all of them when there are fewer)."""
    if k <= 0:
        return set()
    if len(names) <= k:
        return set(names)
    return set(random.Random(seed).sample(sorted(names), k))


def thumbnail_uri(image: Image.Image, size: int = 128) -> str:
    """A PNG data URI of ``image`` scaled to at most ``size`` px (deterministic bytes)."""
    img = image.convert("RGB")
    scale = size / max(img.size)
    if scale < 1:
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR
        )
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ExampleFigures:
    """Collects thumbnails and small maps for the example images while the audit streams;
    ``with_maps=False``: thumbnails only (a check stores the maps the report shows)."""

    def __init__(self, names: set[str], with_maps: bool = True):
        self.names = names
        self.with_maps = with_maps
        self.images: dict[str, dict[str, Any]] = {}
        self.maps: list[dict[str, Any]] = []

    def add_images(
        self, batch: Batch, pil_images: list[Image.Image], class_names: list[str], probs: torch.Tensor
    ) -> None:
        for i, name in enumerate(batch.images):
            if name not in self.names:
                continue
            t, low = int(batch.targets[i]), int(batch.logits[i].argmin())
            self.images[name] = {
                "thumbnail": thumbnail_uri(pil_images[i]),
                "predicted": t,
                "predicted_name": class_names[t],
                "lowest": low,
                "lowest_name": class_names[low],
                "score": float(probs[i, t]),
            }

    def add_maps(self, batch: Batch, source: MapSource, maps: dict[Any, torch.Tensor]) -> None:
        """Top-1 maps (given) and lowest-class maps (computed for the example images only)."""
        idx = [i for i, n in enumerate(batch.images) if n in self.names]
        if not idx or not self.with_maps:
            return
        sub = batch.select(idx)
        lowest = sub.logits.argmin(1)
        low_maps = source.maps(sub.model, sub.x, lowest)
        for j, i in enumerate(idx):
            for v, m in maps.items():
                for kind, target, data in (
                    ("top1", int(batch.targets[i]), m[i]),
                    ("lowest", int(lowest[j]), low_maps[v][j]),
                ):
                    self.maps.append(
                        {
                            "image": batch.images[i],
                            "method": v.method,
                            "psi": v.psi,
                            "post": v.post,
                            "signed": v.signed,
                            "kind": kind,
                            "target": target,
                            "data": small_map(data),
                        }
                    )

    def ranking(self, checks: list[Any]) -> list[str]:
        """Example images, most telling first: the worst per-image value, in the check's
        direction, of any cell of a check that ranks examples
        (:attr:`~saliaudit.checks.base.Check.ranks_examples`: class sensitivity, where a high
        similarity means maps that ignore the class), then the least confident prediction."""
        from .checks import CHECKS, check_names

        check_names()
        worst: dict[str, float] = {}
        for c in checks:
            cls = CHECKS.get(c.check)
            if cls is None or not cls.ranks_examples:
                continue
            sign = -1.0 if cls.higher_is_better else 1.0
            for p in c.per_image:
                if p.get("value") is not None and p["image"] in self.images:
                    bad = sign * float(p["value"])
                    worst[p["image"]] = max(worst.get(p["image"], -float("inf")), bad)
        return sorted(self.images, key=lambda n: (-worst.get(n, -1.0), self.images[n]["score"], n))

    def to_dict(self, checks: list[Any]) -> dict[str, Any]:
        return {"images": self.images, "maps": self.maps, "ranking": self.ranking(checks)}
