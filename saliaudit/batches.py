"""Decoded images to the batches the methods and checks see: preprocess, predict, record.

One forward pass per batch gives the prediction (top-1 target, the lowest class); images whose
logits are NaN/Inf are dropped with a recorded reason. Ground truth comes from an ImageFolder
layout matched to the model's class names, object masks from ``--masks``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import DecodedImage, Skipped
from .errors import SaliauditError
from .maps import Batch
from .model import LoadedModel
from .result import ImageRecord

__all__ = ["Predicted", "predict_batch", "next_batch", "OOM_HINT", "first_line", "is_oom"]

OOM_HINT = "use --device cpu, a smaller --input-size, or free the device's memory"

NONFINITE = (
    "the model output NaN/Inf for this image; check the model's weights and its "
    "preprocessing (--mean, --std, --input-size)"
)


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is a device out-of-memory error (CUDA, MPS or the CPU allocator)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def first_line(err: BaseException) -> str:
    """The first line of an exception's text (its type name when it has none)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@dataclass
class Predicted:
    """One predicted batch: what the checks see, what the results record, what was dropped."""

    batch: Batch | None
    records: list[ImageRecord] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    probs: torch.Tensor | None = None
    dropped: list[Skipped] = field(default_factory=list)
    items: list[DecodedImage] = field(default_factory=list)


def next_batch(
    decoded: Iterator[DecodedImage | Skipped], size: int, skipped: list[Skipped]
) -> list[DecodedImage]:
    """Up to ``size`` decoded images from the shared iterator (skips go to ``skipped``)."""
    batch: list[DecodedImage] = []
    for item in decoded:
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        batch.append(item)
        if len(batch) == size:
            break
    return batch


def predict_batch(
    lm: LoadedModel,
    items: list[DecodedImage],
    *,
    seed: int,
    offset: int,
    examples: set[str],
    masks_dir: Path | None = None,
    folders: list[str] | None = None,
    on_retry: Callable[[int], None] | None = None,
) -> Predicted:
    """Preprocess and predict ``items``; the :class:`Batch` of those with finite logits.

    ``offset`` is the index of the first image in the audit; ``examples`` the names of the
    example images (figures). ``batch`` is ``None`` when every image gave NaN/Inf logits.
    """
    x = lm.preprocess([d.image for d in items])
    logits = _logits(lm, x, on_retry)
    finite = torch.isfinite(logits).all(1)
    dropped = [Skipped(d.entry.rel, NONFINITE) for i, d in enumerate(items) if not finite[i]]
    if dropped:
        keep = [i for i in range(len(items)) if finite[i]]
        items = [items[i] for i in keep]
        if not items:
            return Predicted(None, dropped=dropped)
        x, logits = x[keep], logits[keep]
    probs = torch.softmax(logits.double(), dim=1)
    targets = logits.argmax(1)
    names = lm.class_names
    labels: list[int | None] = []
    masks: list[dict[int, np.ndarray]] | None = [] if masks_dir is not None else None
    records = []
    for i, d in enumerate(items):
        t = int(targets[i])
        label, folder = true_label(d.entry.label, folders, names)
        labels.append(label)
        notes = list(d.notes)
        if masks is not None and masks_dir is not None:
            masks.append(_load_masks(masks_dir, d.entry.rel, names, lm, notes, d.image.size))
        records.append(
            ImageRecord(d.entry.rel, d.sha256, label, t, names[t], float(probs[i, t]), notes, folder)
        )
    batch = Batch(lm, x, [d.entry.rel for d in items], targets, logits, labels, masks, seed, offset, examples)
    # what the maps are drawn over: the part of each image the model sees (its center crop)
    return Predicted(batch, records, [lm.visible(d.image) for d in items], probs, dropped, items)


def _logits(lm: LoadedModel, x: torch.Tensor, on_retry: Callable[[int], None] | None) -> torch.Tensor:
    """``lm.logits(x)``, run in halves on out-of-memory (down to one image)."""
    try:
        return lm.logits(x)
    except Exception as err:
        if not is_oom(err):
            raise
        if len(x) <= 1:
            raise SaliauditError(
                f"out of memory on {lm.device} even for one image ({first_line(err)})",
                path=lm.path,
                hint=OOM_HINT,
            ) from err
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(x) // 2
    if on_retry:
        on_retry(half)
    return torch.cat([_logits(lm, x[:half], on_retry), _logits(lm, x[half:], on_retry)])


def _load_masks(
    masks_dir: Path,
    rel: str,
    names: list[str],
    lm: LoadedModel,
    notes: list[str],
    image_size: tuple[int, int],
) -> dict[int, np.ndarray]:
    from .masks import load_masks, mask_skip_reason

    reason = mask_skip_reason(masks_dir, rel)
    if reason:
        notes.append(f"no masks: {reason}")
        return {}
    try:
        crop = None
        if lm.preprocessing.resize != "stretch":  # resized and cropped as the image
            crop = lm.preprocessing.geometry(image_size, lm.input_size)
        return load_masks(masks_dir, rel, names, lm.input_size, image_size=image_size, crop=crop)
    except SaliauditError as err:
        notes.append(f"masks not used: {err}")
        return {}


def true_label(
    entry_label: int | None, folders: list[str] | None, names: list[str]
) -> tuple[int | None, str | None]:
    """Ground truth from an ImageFolder layout, as the model's class index (matched by name).

    Folder indices follow the sorted folder names, which need not be the model's class
    order; a folder whose name is not a class name gives no label index.
    """
    if entry_label is None or not folders:
        return None, None
    folder = folders[entry_label]
    return (names.index(folder) if folder in names else None), folder
