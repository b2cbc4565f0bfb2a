"""``saliaudit explain``: one map of one image, as a PNG (the image and its map side by side)."""

from __future__ import annotations

from pathlib import Path

import torch

from .data import ImageEntry, decode_image
from .errors import UsageError, suggest
from .methods import build_source, get_method
from .model import load_model
from .report.overlay import EXPLAIN_SIZE, save_explanation

#: The variant ``explain`` draws when the flag of the method's option is not given.
DEFAULT_VARIANT = {"psi": "paper", "post": "signed"}


def resolve_variant(method: str, psi: str | None, post: str | None) -> tuple[str, str]:
    """``(option, variant)`` of ``method``: ``("psi", preset)`` for a method whose variants
    are ψ presets (FullGrad), else ``("post", signed|abs)``. The flag of the other option is
    a usage error naming the right flag; an unset flag takes :data:`DEFAULT_VARIANT` (or the
    method's first choice)."""
    m = get_method(method)
    given, other = (psi, post) if m.option == "psi" else (post, psi)
    if other is not None:
        wrong = "--post" if m.option == "psi" else "--psi"
        right = "--psi" if m.option == "psi" else "--post"
        what = "ψ presets" if m.option == "psi" else "post-processings"
        raise UsageError(
            f"{wrong} does not apply to {method}, whose variants are {what}: use {right} "
            + ", ".join(m.choices)
        )
    if given is None:
        default = DEFAULT_VARIANT[m.option]
        given = default if default in m.choices else m.choices[0]
    return m.option, given


def resolve_target(target: int | str | None, class_names: list[str]) -> int | None:
    """A class index from ``--target``: an index (``3``) or a class name (``square``, exact,
    else ignoring case); ``None`` stays ``None`` (the top-1 class). An unknown name or an
    index out of range is a usage error that lists some class names."""
    if target is None:
        return None
    n = len(class_names)
    shown = ", ".join(class_names[:8]) + (f", … ({n} classes)" if n > 8 else "")
    text = str(target).strip()
    if isinstance(target, int) or text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < n:
            raise UsageError(
                f"--target {index} is not a class index of this model",
                hint=f"use 0..{n - 1} or a name: {shown}",
            )
        return index
    if text in class_names:
        return class_names.index(text)
    folded = [c.casefold() for c in class_names]
    if text.casefold() in folded:
        return folded.index(text.casefold())
    raise UsageError(
        f"--target {text!r} is not a class of this model{suggest(text, class_names)}",
        hint=f"classes: {shown}; or an index 0..{n - 1}",
    )


def explain_image(
    model: Path,
    image: Path,
    *,
    method: str,
    psi: str | None = None,
    post: str | None = None,
    target: int | str | None = None,
    output: Path,
    cam_layer: str | None = None,
    size: int = EXPLAIN_SIZE,
    **load_options,
) -> str:
    """Compute ``method``'s map for ``image`` and write it to ``output``; returns a summary line.

    ``psi`` is for methods whose variants are ψ presets (FullGrad), ``post`` for the others;
    ``None`` takes the default (``paper``, ``signed``). ``target`` is a class index or name
    (``None``: the top-1 class). ``size`` is the long side of each panel in pixels."""
    option, variant = resolve_variant(method, psi, post)
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise UsageError("the output of explain is a PNG file", path=output, hint="use -o map.png")
    lm = load_model(model, **load_options)
    decoded = decode_image(ImageEntry(Path(image).resolve(), Path(image).name))
    x = lm.preprocess([decoded.image])
    logits = lm.logits(x)
    chosen = resolve_target(target, list(lm.class_names))
    index = int(logits.argmax(1)) if chosen is None else chosen
    m = get_method(method)
    params = {"layer": cam_layer} if cam_layer and "layer" in m.params else {}
    source = build_source(method, psi=[variant], post=[variant], params=params)
    ((found, maps),) = source.maps(lm, x, torch.tensor([index])).items()
    label = f"{method} psi={variant}" if option == "psi" else f"{method} {variant}"
    name = lm.class_names[index]
    how = "top-1 class" if chosen is None else "class"
    logit = float(logits[0, index])
    title = f"{label} · {Path(image).name} · {how} {index} ({name}), logit {logit:.4g}"
    save_explanation(
        output,
        lm.visible(decoded.image),
        maps[0].detach().cpu().numpy(),
        signed=found.signed,
        title=title,
        size=size,
    )
    return f"{output}: {label}, class {index} ({name}), logit {logit:.4g}"
