"""The data that flows between methods, checks and figures: neither layer owns it.

A saliency method becomes a :class:`MapSource` that turns a batch of images into 2-D maps
under each of its :class:`Variant` s (FullGrad: one per ψ preset, from one decomposition; a
comparison method: its ``signed`` and ``abs`` post-processings of one attribution). Checks
and the example figures see the images as a :class:`Batch`. :func:`small_map` shrinks a map
for storage in the results. ``methods/`` and ``checks/`` both import from here, never from
each other's internals.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Variant", "Batch", "MapSource", "small_map", "decode_map", "is_stored_map"]


@dataclass(frozen=True)
class Variant:
    """One way of turning a method's attribution into a 2-D map.

    ``psi`` is the FullGrad ψ preset (``None`` for other methods); ``post`` the comparison
    methods' post-processing (``signed`` or ``abs``; ``None`` for FullGrad). ``signed`` tells
    whether the map keeps negative evidence.
    """

    method: str
    psi: str | None = None
    post: str | None = None
    signed: bool = False

    @property
    def label(self) -> str:
        """``fullgrad/paper``, ``gradient/abs``: for messages and test names."""
        return f"{self.method}/{self.psi or self.post}" if (self.psi or self.post) else self.method


@dataclass
class Batch:
    """One batch of audited images, as every check sees it.

    Attributes:
        model: the loaded model (:class:`~saliaudit.model.LoadedModel`); never modify it.
        x: preprocessed images ``(B, 3, H, W)`` on the model's device.
        images: the images' paths relative to the audited folder (result keys).
        targets: the predicted (top-1) classes ``(B,)``.
        logits: the model's outputs ``(B, K)``.
        labels: ground-truth class index per image, or ``None``.
        masks: per image, ``{class index: bool array (H, W) at input size}`` when ``--masks``
            was given (else ``None``).
        seed: the audit seed; derive every random choice from it (and the image, not the
            batch composition) so results do not depend on the batch size.
        offset: index of the batch's first image in the audit.
    """

    model: Any
    x: torch.Tensor
    images: list[str]
    targets: torch.Tensor
    logits: torch.Tensor
    labels: list[int | None] = field(default_factory=list)
    masks: list[dict[int, np.ndarray]] | None = None
    seed: int = 0
    offset: int = 0
    examples: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.images)

    def select(self, index: list[int]) -> Batch:
        """The sub-batch of the given positions."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.x.device)
        return Batch(
            self.model,
            self.x[idx],
            [self.images[i] for i in index],
            self.targets[idx],
            self.logits[idx],
            [self.labels[i] for i in index] if self.labels else [],
            [self.masks[i] for i in index] if self.masks else None,
            self.seed,
            self.offset + (index[0] if index else 0),
            self.examples,
        )


class MapSource:
    """A saliency method as 2-D maps under all its selected variants.

    ``maps(model, x, targets)`` returns ``{Variant: (B, H, W) float tensor}`` at input
    resolution. Checks call it with other targets (class sensitivity), other inputs
    (perturbations) or another model (a randomized copy). Built by
    :func:`saliaudit.methods.build_source` from a registered method.
    """

    method: str
    variants: list[Variant]
    needs_internals: bool = False
    model_independent: bool = False  # the controls: maps do not depend on the model
    #: Capabilities beyond maps that checks may require (:attr:`Check.requires`), e.g.
    #: ``"decomposition"``: ``decompose(model, x, targets)`` returns a complete decomposition.
    provides: frozenset[str] = frozenset()

    def maps(self, model: Any, x: torch.Tensor, targets: torch.Tensor) -> dict[Variant, torch.Tensor]:
        raise NotImplementedError

    def forget(self) -> None:
        """Drop whatever was cached for the last batch (called after each batch)."""

    def pop_totals(self) -> torch.Tensor | None:
        """``Σ attribution`` per image of the maps computed while collecting (sources of
        methods with a completeness reference); ``None`` for others."""
        return None


def small_map(t: torch.Tensor | np.ndarray, size: int = 48) -> dict[str, Any]:
    """A 2-D map downsampled (area average) to at most ``size`` px on its long side, encoded
    compactly for results.json: ``{"shape": [h, w], "scale": s, "f16": BASE64}``, the values
    divided by ``s`` (the largest magnitude, 1 for an all-zero map) as little-endian float16.
    About 2.7 characters per value instead of ~9 for decimal lists, with 3 significant digits
    relative to each value (not only to the maximum), which is more than a colour map shows.
    Non-finite values become 0. :func:`decode_map` reads it back."""
    a = torch.as_tensor(t).detach().to("cpu", torch.float64)
    if a.dim() != 2:
        raise ValueError(f"small_map expects a (H, W) map, got shape {tuple(a.shape)}")
    a = torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)  # before averaging: one NaN pixel
    # must not blank its whole block
    h, w = a.shape
    scale = size / max(h, w)
    if scale < 1:
        a = torch.nn.functional.interpolate(
            a[None, None], size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area"
        )[0, 0]
    a = a.numpy()
    top = float(np.abs(a).max()) if a.size else 0.0
    s = top if top > 0 and math.isfinite(top) else 1.0
    raw = (a / s).astype("<f2").tobytes()
    return {
        "shape": [int(a.shape[0]), int(a.shape[1])],
        "scale": float(f"{s:.9g}"),
        "f16": base64.b64encode(raw).decode("ascii"),
    }


MAX_MAP_SIDE = 512


def is_stored_map(v: Any) -> bool:
    """Whether ``v`` has the form of a stored small map (:func:`small_map`'s encoding, or the
    nested lists of earlier results); :func:`decode_map` still validates its content."""
    if isinstance(v, dict):
        return "f16" in v and "shape" in v
    return isinstance(v, list) and bool(v) and isinstance(v[0], list)


def decode_map(data: Any) -> np.ndarray | None:
    """The finite float (H, W) array of a stored small map — the encoding of :func:`small_map`,
    or the nested lists of results written by earlier versions — or ``None`` when malformed."""
    if isinstance(data, dict):
        return _decode_f16(data)
    if not isinstance(data, list) or not data or not all(isinstance(r, list) for r in data):
        return None
    if len(data) > MAX_MAP_SIDE or any(len(r) != len(data[0]) or len(r) > MAX_MAP_SIDE for r in data):
        return None
    try:
        arr = np.array(
            [
                [float(v) if v is not None and not isinstance(v, bool) else math.nan for v in row]
                for row in data
            ],
            dtype=np.float64,
        )
    except (TypeError, ValueError):
        return None
    if arr.ndim != 2 or arr.size == 0:
        return None
    return np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)


def _decode_f16(data: dict[str, Any]) -> np.ndarray | None:
    shape, scale, text = data.get("shape"), data.get("scale"), data.get("f16")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int for v in shape)):
        return None
    h, w = shape
    if not (0 < h <= MAX_MAP_SIDE and 0 < w <= MAX_MAP_SIDE) or not isinstance(text, str):
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 2 * h * w:
        return None
    arr = np.frombuffer(raw, dtype="<f2").astype(np.float64).reshape(h, w) * float(scale)
    return np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
