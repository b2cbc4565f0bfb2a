"""``saliaudit explain``: one map of one image, as a PNG overlay."""

from __future__ import annotations

from pathlib import Path

import torch

from .data import ImageEntry, decode_image
from .errors import UsageError
from .methods import build_source, get_method
from .model import load_model
from .report.overlay import save_overlay


def explain_image(
    model: Path,
    image: Path,
    *,
    method: str,
    psi: str,
    post: str,
    target: int | None,
    output: Path,
    cam_layer: str | None = None,
    **load_options,
) -> str:
    """Compute ``method``'s map for ``image`` and write it to ``output``; returns a summary line."""
    lm = load_model(model, **load_options)
    decoded = decode_image(ImageEntry(Path(image).resolve(), Path(image).name))
    x = lm.preprocess([decoded.image])
    logits = lm.logits(x)
    if target is None:
        target = int(logits.argmax(1))
    if not 0 <= target < lm.num_classes:
        raise UsageError(
            f"--target {target} is not a class index of this model", hint=f"use 0..{lm.num_classes - 1}"
        )
    targets = torch.tensor([target])
    m = get_method(method)
    params = {"layer": cam_layer} if cam_layer and "layer" in m.params else {}
    source = build_source(method, psi=[psi], post=[post], params=params)
    ((variant, maps),) = source.maps(lm, x, targets).items()
    saliency, signed = maps[0], variant.signed
    label = f"{method} psi={psi}" if m.option == "psi" else f"{method} {post}"
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise UsageError("the output of explain is a PNG file", path=output, hint="use -o map.png")
    save_overlay(
        output,
        decoded.image,
        saliency.detach().cpu().numpy(),
        signed=signed,
        title=f"{label} - {lm.class_names[target]}",
    )
    return (
        f"{output}: {label}, class {target} ({lm.class_names[target]}), logit {float(logits[0, target]):.4g}"
    )
