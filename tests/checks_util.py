"""Helpers for check tests: a Batch of sample images on a sample model."""

from __future__ import annotations

from pathlib import Path

import torch

from saliaudit.checks.base import Batch
from saliaudit.data import find_images, iter_decoded
from saliaudit.model import load_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"


def make_batch(
    model_path: str | Path = SAMPLES / "shapes_vgg.pt2",
    image_dir: str | Path = SAMPLES / "images" / "shapes",
    n: int = 8,
    seed: int = 0,
    model=None,
) -> Batch:
    """The first ``n`` decodable images of ``image_dir`` (sorted), as a Batch on the model."""
    lm = model if model is not None else load_model(model_path)
    listing = find_images(image_dir, max_images=None, sample=None, seed=seed)
    decoded = [d for d in iter_decoded(listing) if hasattr(d, "image")]
    decoded = decoded[:n] if n else decoded
    x = lm.preprocess([d.image for d in decoded])
    logits = lm.logits(x)
    return Batch(
        lm,
        x,
        [d.entry.rel for d in decoded],
        logits.argmax(1),
        logits,
        [None] * len(decoded),
        None,
        seed,
        0,
        set(),
    )


def all_weights(lm) -> list[torch.Tensor]:
    """Copies of every parameter and buffer of the model (to check it is never modified)."""
    module = lm.exported.module() if getattr(lm, "exported", None) is not None else lm.module
    state = lm.exported.state_dict if getattr(lm, "exported", None) is not None else module.state_dict()
    return [v.detach().clone() for v in state.values()]
