"""Perturbation-based comparison methods: occlusion.

Forward passes only (``needs_internals=False``): runs on TorchScript models too. The occluded
copies are sent through the model in chunks of ``internal_batch`` rows on ``x``'s device.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import validate
from ..cost import Passes, rows_per_pass
from ..errors import UsageError
from . import register
from .baselines import make_baselines
from .common import as_targets, forward_fn, picked

__all__ = ["occlusion", "occlusion_windows"]

#: Baselines occlusion accepts (the deterministic ones of integrated gradients).
OCCLUSION_BASELINES = ("black", "mean", "blur")


def occlusion_windows(
    size: int, patch: int, stride: int, *, device: torch.device | None = None
) -> torch.Tensor:
    """Coverage matrix ``(n_windows, size)`` of the windows along one axis (Captum's layout).

    Window ``k`` starts at ``k · stride`` for ``k = 0 .. ceil((size − patch)/stride)`` and covers
    ``[k·stride, min(k·stride + patch, size))``: the last one is clipped at the border, exactly as
    Captum's ``Occlusion`` pads its sliding-window mask with a negative (cropping) pad.
    """
    n = math.ceil((size - patch) / stride) + 1
    starts = torch.arange(n, device=device).view(-1, 1) * stride
    pos = torch.arange(size, device=device).view(1, -1)
    return (pos >= starts) & (pos < starts + patch)


def _windows(size: tuple[int, int], patch: int, stride: int) -> int:
    """Number of occlusion windows on an image of ``size`` (the forward rows per image)."""
    h, w = size
    return (math.ceil(max(h - patch, 0) / stride) + 1) * (math.ceil(max(w - patch, 0) / stride) + 1)


@register(
    "occlusion",
    family="perturbation",
    reference="Zeiler & Fergus 2014, ECCV",
    summary="mean drop of the target logit when a sliding patch is replaced by a baseline",
    cost=lambda p, size: Passes(forward=1 + _windows(size, int(p["patch"]), int(p["stride"]))),
)
def occlusion(
    model: Any,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    patch: int = 8,
    stride: int = 4,
    baseline: str = "black",
    blur_sigma: float = 5.0,
    internal_batch: int | None = None,
) -> torch.Tensor:
    """Occlusion: the average drop of the target logit over the patches covering a pixel.

    Definition: for every square window ``P`` (``patch × patch``, all channels at once, moved
    by ``stride``; the last row/column of windows is clipped at the border), ``d_P = f_c(x) −
    f_c(x with P replaced by the baseline)``; the attribution of a pixel is the mean of ``d_P``
    over the windows covering it, the same value in every channel. This is exactly Captum's
    ``Occlusion(...).attribute(x, sliding_window_shapes=(C, patch, patch), strides=(C, stride,
    stride), baselines=x')`` (which divides the summed differences by the coverage count);
    the ``signed`` post-processing (sum over channels) therefore gives C × the mean drop.

    Parameters:
        patch=8: window side in pixels (≤ the image side).
        stride=4: window step in pixels (1 ≤ stride ≤ patch, so every pixel is covered).
        baseline="black": ``black`` (the preprocessed black image: ``(0 − mean)/std`` for a
            LoadedModel, else zeros), ``mean`` (per-image channel mean) or ``blur``.
        blur_sigma=5.0: σ of the ``blur`` baseline.
        internal_batch=None: occluded copies per forward pass (default: the audit's batch size).
    Returns: ``(B, C, H, W)`` on ``x``'s device; ``n_windows + 1`` forward rows per image.
    Paper: Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014.
    """
    targets = as_targets(targets, x)
    patch = validate.integer("patch", patch, min=1)
    stride = validate.integer("stride", stride, min=1)
    internal_batch = validate.integer("internal_batch", rows_per_pass(internal_batch, "forward"), min=1)
    b, c, h, w = x.shape
    if patch > min(h, w):
        raise UsageError(f"occlusion patch {patch} exceeds the image size {h}×{w}")
    if stride > patch:
        raise UsageError(
            f"occlusion stride {stride} exceeds patch {patch}: some pixels would never be occluded"
        )
    if baseline not in OCCLUSION_BASELINES:
        raise UsageError(
            f"unknown occlusion baseline {baseline!r}", hint="choose from " + ", ".join(OCCLUSION_BASELINES)
        )
    x = x.detach()
    base = make_baselines(model, x, baseline, blur_sigma=blur_sigma)[0]
    forward = forward_fn(model)
    rh = occlusion_windows(h, patch, stride, device=x.device).to(x.dtype)  # (nh, H)
    rw = occlusion_windows(w, patch, stride, device=x.device).to(x.dtype)  # (nw, W)
    nh, nw = rh.shape[0], rw.shape[0]
    per_image = nh * nw
    drops = torch.empty(b * per_image, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        fx = picked(forward(x), targets)
        total = b * per_image
        for start in range(0, total, internal_batch):
            idx = torch.arange(start, min(start + internal_batch, total), device=x.device)
            i, win = idx // per_image, idx % per_image
            mask = (rh[win // nw].unsqueeze(2) * rw[win % nw].unsqueeze(1)).unsqueeze(1)  # (n, 1, H, W)
            occluded = x[i] * (1 - mask) + base[i] * mask
            drops[start : start + idx.numel()] = fx[i] - picked(forward(occluded), targets[i]).to(x.dtype)
    grid = drops.view(b, nh, nw)
    summed = torch.einsum("kh,bkl,lw->bhw", rh, grid, rw)  # Σ over covering windows
    count = rh.sum(0).view(h, 1) * rw.sum(0).view(1, w)
    return (summed / count).unsqueeze(1).expand(b, c, h, w).contiguous()
