"""Baselines of the attribution methods: the black image, the image mean, a blur, uniform noise.

Integrated gradients (:mod:`saliaudit.methods.gradients`), occlusion and the removal checks
(:mod:`saliaudit.checks.removal`) build their reference inputs here, in the model's input space:
a black pixel is ``(0 − mean) / std`` when the model carries its normalization.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import validate
from ..errors import UsageError

__all__ = ["BASELINES", "black_value", "gaussian_blur", "generator", "make_baselines"]

#: Baselines understood by integrated gradients (and, the deterministic ones, by occlusion).
BASELINES = ("black", "mean", "blur", "uniform-noise")


def _normalization(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean, std)`` as ``(1, C, 1, 1)`` tensors when ``model`` (a LoadedModel, not a bare
    module) carries a per-channel normalization matching ``x``'s channels, else None."""
    c = x.shape[1]
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if (
        isinstance(model, torch.nn.Module)
        or not isinstance(mean, (tuple, list))
        or not isinstance(std, (tuple, list))
        or len(mean) != c
        or len(std) != c
    ):
        return None
    m = torch.tensor([float(v) for v in mean], dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    s = torch.tensor([float(v) for v in std], dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    return m, s


def black_value(model: Any, x: torch.Tensor) -> torch.Tensor:
    """The preprocessed value of a black pixel, ``(1, C, 1, 1)``.

    ``(0 - mean) / std`` per channel when ``model`` carries its normalization (a LoadedModel with
    ``mean``/``std`` of length C), else 0 (the input is taken as already in model space).
    """
    norm = _normalization(model, x)
    if norm is None:
        return torch.zeros((1, x.shape[1], 1, 1), dtype=x.dtype, device=x.device)
    m, s = norm
    return (0.0 - m) / s


def _gauss_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, int(4.0 * sigma + 0.5))  # scipy.ndimage's truncate=4
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of ``(B, C, H, W)`` per channel; kernel radius ``round(4σ)``,
    edge-replicating padding (works for any image size). ``sigma <= 0`` returns ``x``."""
    if sigma <= 0:
        return x.clone()
    c = x.shape[1]
    k = _gauss_kernel(float(sigma), x.dtype, x.device)
    r = (k.numel() - 1) // 2
    out = torch.nn.functional.pad(x, (r, r, 0, 0), mode="replicate")
    out = torch.nn.functional.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = torch.nn.functional.pad(out, (0, 0, r, r), mode="replicate")
    return torch.nn.functional.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def make_baselines(
    model: Any,
    x: torch.Tensor,
    baseline: str = "black",
    *,
    n: int = 1,
    blur_sigma: float = 5.0,
    seed: int = 0,
) -> torch.Tensor:
    """Baselines ``(n, B, C, H, W)`` for ``x`` (already normalized, model space).

    * ``black``: the preprocessed black image, :func:`black_value` (``n`` identical copies);
    * ``mean``: each image's per-channel mean (``n`` identical copies);
    * ``blur``: :func:`gaussian_blur` of ``x``; with ``n = 1`` σ = ``blur_sigma``, with ``n > 1``
      σ_k ~ U(0, ``blur_sigma``) drawn from ``seed``;
    * ``uniform-noise``: uniform noise per channel over the range of a valid image — [black,
      white] = [(0−mean)/std, (1−mean)/std] when the model carries its normalization, else
      each image's per-channel [min, max]. The unit noise ``(n, C, H, W)`` is drawn once from
      ``seed`` on ``x``'s device and shared by the images of the batch, so an image's baseline
      does not depend on the rest of the batch.
    """
    if baseline not in BASELINES:
        raise UsageError(f"unknown baseline {baseline!r}", hint="choose from " + ", ".join(BASELINES))
    n = validate.integer("n_baselines", n, min=1)
    b, c, h, w = x.shape
    x = x.detach()
    if baseline == "black":
        return black_value(model, x).expand(b, c, h, w).unsqueeze(0).expand(n, b, c, h, w).clone()
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand(b, c, h, w).unsqueeze(0).expand(n, b, c, h, w).clone()
    gen = generator(x.device, seed)
    if baseline == "blur":
        sigma = validate.number("blur_sigma", blur_sigma, min=0)
        if n == 1:
            return gaussian_blur(x, sigma).unsqueeze(0)
        sigmas = torch.rand(n, generator=gen, device=x.device, dtype=torch.float64) * sigma
        return torch.stack([gaussian_blur(x, float(s)) for s in sigmas.tolist()])
    # uniform-noise
    norm = _normalization(model, x)
    if norm is not None:
        m, s = norm
        lo, hi = ((0.0 - m) / s).expand(b, c, 1, 1), ((1.0 - m) / s).expand(b, c, 1, 1)
    else:
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
    u = torch.rand((n, 1, c, h, w), generator=gen, device=x.device, dtype=x.dtype)
    return lo.unsqueeze(0) + u * (hi - lo).unsqueeze(0)
