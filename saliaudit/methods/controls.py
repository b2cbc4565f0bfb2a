"""Control "methods" that must fail every faithfulness check (see docs/methods.md, "Controls").

Neither looks at the model or the target class: a check that passes a control is a broken
check. Both are model-independent, batched and computed on ``x``'s device.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from . import register
from .common import as_targets, forward_fn

__all__ = ["content_seed", "edge", "edge_signed", "random", "sobel_magnitude"]


def content_seed(image: torch.Tensor) -> int:
    """A 63-bit seed from one image's content alone: SHA-256 of its shape and of its values
    quantized to float32 (C-contiguous, little-endian on every supported platform)."""
    t = image.detach().to("cpu", torch.float32).contiguous().clone()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())  # same bytes as the storage, ~1000x faster
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


@register(
    "random",
    family="control",
    reference="model-independent random-noise control (cf. Adebayo et al., NeurIPS 2018)",
    summary="control: standard-normal noise seeded by the image content (ignores model and class)",
)
def random(model: Any, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Random control: standard-normal noise seeded by the image's content alone.

    Definition: ``A_i ~ N(0, 1)^(C×H×W)`` drawn from a CPU ``torch.Generator`` seeded with
    :func:`content_seed` ``(x_i)`` (SHA-256 of the float32 values), then moved to ``x``'s
    device. Independent of the model and of the target class, deterministic, identical on
    every device and for any batch composition; different images get different noise.

    Parameters: none.
    Returns: ``(B, C, H, W)`` on ``x``'s device, in ``x``'s dtype.
    Reference: a model-independent control, see docs/methods.md (cf. Adebayo et al. 2018, "Sanity Checks for Saliency Maps").
    """
    as_targets(targets, x)
    out = []
    for xi in x:
        gen = torch.Generator().manual_seed(content_seed(xi))
        out.append(torch.randn(tuple(xi.shape), generator=gen, dtype=torch.float32))
    return torch.stack(out).to(device=x.device, dtype=x.dtype)


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Per-channel Sobel gradient magnitude ``(B, C, H, W)``: ``sqrt(s_h² + s_w²)`` with the
    unnormalized kernels ``[1, 2, 1]ᵀ ⊗ [−1, 0, 1]`` (and transpose) and edge-replicating
    padding — for a 3×3 kernel identical to ``scipy.ndimage.sobel``'s default ``mode='reflect'``."""
    c = x.shape[1]
    d = torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype, device=x.device)
    s = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    k_w = torch.outer(s, d)  # derivative along W (scipy axis=-1)
    k_h = torch.outer(d, s)  # derivative along H (scipy axis=-2)
    kernels = torch.stack([k_h, k_w]).unsqueeze(1).repeat(c, 1, 1, 1)  # (2C, 1, 3, 3)
    padded = torch.nn.functional.pad(x.detach(), (1, 1, 1, 1), mode="replicate")
    g = torch.nn.functional.conv2d(padded, kernels, groups=c).view(x.shape[0], c, 2, *x.shape[2:])
    return g.pow(2).sum(2).sqrt()


@register(
    "edge",
    family="control",
    reference="model-independent edge-detector control (Adebayo et al., NeurIPS 2018)",
    summary="control: Sobel gradient magnitude of the image (ignores model and class)",
)
def edge(model: Any, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Edge control: the Sobel gradient magnitude of the image, model-independent.

    Definition: ``A = Σ_c sqrt((S_h * x_c)² + (S_w * x_c)²)`` with the 3×3 Sobel kernels
    (unnormalized, ``[1,2,1] ⊗ [−1,0,1]``) and the image border replicated (= scipy.ndimage's
    ``mode='reflect'`` for a 3×3 kernel), computed on the input as given (model space).
    Ignores the model and the target class; non-negative.

    Parameters: none.
    Returns: ``(B, 1, H, W)`` on ``x``'s device.
    Reference: a model-independent control, see docs/methods.md (cf. Adebayo et al. 2018, "Sanity Checks for Saliency Maps").
    """
    as_targets(targets, x)
    return sobel_magnitude(x).sum(1, keepdim=True)


@register(
    "edge_signed",
    family="control",
    reference="control for sign flips (Khakzar et al. 2020; edge baseline of Adebayo et al. 2018)",
    summary="control: the edge map, negated for every class but the top-1 (evidence "
    "in the same place for every class, only its sign changes)",
)
def edge_signed(model: Any, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Signed edge control: the edge map for the model's top-1 class, its negation otherwise.

    Definition: ``A = s · E`` with ``E`` the :func:`edge` map and ``s = +1`` when the target
    is the model's top-1 class for the image, ``−1`` otherwise. Its evidence lies on the same
    pixels for every class; only the sign flips. A class-sensitivity measure that scores it
    as class-sensitive (e.g. a signed Spearman of −1) measures the sign, not where the
    evidence lies: a check must FAIL this control.

    Parameters: none.
    Returns: ``(B, 1, H, W)`` on ``x``'s device.
    Reference: the sign-flip trap of class sensitivity for signed maps (Khakzar, Baselizadeh
    & Navab 2020), built on the edge baseline of Adebayo et al. 2018.
    """
    t = as_targets(targets, x)
    with torch.no_grad():
        top1 = forward_fn(model)(x).argmax(1).to(x.device)
    sign = torch.where(t.to(x.device) == top1, 1.0, -1.0).to(x.dtype)
    return sobel_magnitude(x).sum(1, keepdim=True) * sign.view(-1, 1, 1, 1)
