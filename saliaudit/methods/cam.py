"""CAM methods: Grad-CAM, Grad-CAM++ and Khakzar's diagnostics (see docs/methods.md).

Every method here reads the activation ``A`` (B, K, h, w) of one spatial layer and the gradient
``∂f_c/∂A`` of the target logit. Both come from the model's ATen graph
(:func:`saliaudit.graph.get_graph`, the same for eager modules and ``.pt2`` files), run by
:class:`~saliaudit.graph.GraphRunner` whose ``on_op`` callback keeps the chosen node's output;
``torch.autograd.grad`` then differentiates the target logits with respect to it. No module hook
is ever registered, so nothing can be left behind, also when an exception is raised. TorchScript
models have no capturable graph: these methods raise :class:`DecompositionError` there (the
registry marks them ``needs_internals``, so an audit reports them SKIPPED).

Layers are named by ``nn.Module`` path (``"layer4"``); :mod:`saliaudit.methods.layers` finds the
default (:func:`find_cam_layer`) and lists the choices (:func:`cam_layers`),
:mod:`saliaudit.methods.capture` captures them. On a vision transformer ``A`` is the patch
tokens of a token layer laid out on the patch grid, the leading (class, distillation,
register) tokens left out, as pytorch-grad-cam's ViT ``reshape_transform`` does; the default
layer there is the input of the last attention (``blocks.11.norm1`` on a timm ViT, the
layer pytorch-grad-cam's tutorial prescribes), after which the patch tokens no longer reach a
class-token head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UsageError
from . import register
from .capture import layer_activations, run_chunks
from .common import as_targets
from .layers import cam_layers, cumulative_nodes, find_cam_layer, model_index, resolve_layer

__all__ = [
    "cam_layers",
    "cumulative_gradcam",
    "cumulative_layers",
    "find_cam_layer",
    "gradcam",
    "gradcam_abs",
    "gradcam_pp",
    "layer_activations",
    "layer_cam",
]

_SELVARAJU = (
    "Selvaraju et al., Grad-CAM: Visual Explanations from Deep Networks via "
    "Gradient-based Localization, ICCV 2017"
)
_CHATTOPADHYAY = (
    "Chattopadhyay et al., Grad-CAM++: Generalized Gradient-based Visual "
    "Explanations for Deep Convolutional Networks, WACV 2018"
)
_KHAKZAR = (
    "Khakzar, Baselizadeh & Navab, Rethinking Positive Aggregation and Propagation of "
    "Gradients in Gradient-based Saliency Methods, 2020"
)

#: Grad-CAM++'s ε in the denominator of α (pytorch-grad-cam uses the same value).
_PP_EPS = 1e-6


# --------------------------------------------------------------------------- weightings


def _gradcam_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return g.mean(dim=(2, 3), keepdim=True)


def _gradcam_pp_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # closed form of Chattopadhyay et al. eq. 19 with Y = exp(S): the second and third
    # derivatives of exp(S) are exp(S)·g² and exp(S)·g³, and exp(S) cancels; as in
    # pytorch-grad-cam's GradCAMPlusPlus.get_cam_weights
    g2 = g * g
    g3 = g2 * g
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + _PP_EPS)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return (g.clamp(min=0) * alpha).sum(dim=(2, 3), keepdim=True)


_WEIGHTS = {"gradcam": _gradcam_weights, "gradcam_pp": _gradcam_pp_weights}


def _combine(
    a: torch.Tensor, g: torch.Tensor, weighting: str, relu: bool, absolute: bool = False
) -> torch.Tensor:
    weighted = _WEIGHTS[weighting](a, g) * a
    if absolute:
        weighted = weighted.abs()
    cam = weighted.sum(dim=1, keepdim=True)
    return cam.clamp(min=0) if relu else cam


def _upsample(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(cam.shape[-2:]) == tuple(size):
        return cam
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)


def layer_cam(
    model: Any,
    x: torch.Tensor,
    targets: torch.Tensor | list[int],
    *,
    layer: str | None = None,
    weighting: str = "gradcam",
    relu: bool = True,
    absolute: bool = False,
) -> torch.Tensor:
    """A CAM at the layer's own resolution ``(B, 1, h, w)``, before upsampling.

    ``weighting``: ``gradcam`` (α = spatial mean of the gradient) or ``gradcam_pp``;
    ``absolute``: Σ_k |α_k A_k| instead of Σ_k α_k A_k; ``relu``: clamp the sum at 0.
    """
    if weighting not in _WEIGHTS:
        raise UsageError(f"unknown CAM weighting {weighting!r}", hint="gradcam or gradcam_pp")
    [(_, a, g)] = layer_activations(model, x, targets, layer)
    return _combine(a, g, weighting, relu, absolute)


# --------------------------------------------------------------------------- methods


@register(
    "gradcam",
    family="cam",
    needs_internals=True,
    reference=_SELVARAJU,
    summary="Grad-CAM: ReLU(Σ_k mean(∂f/∂A_k)·A_k) at the last spatial layer, upsampled",
)
def gradcam(
    model: Any, x: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None, relu: bool = True
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017).

    Definition: for the activation ``A`` (K channels, h×w) of ``layer`` and the target logit
    ``f_c``, ``α_k = mean_{h,w} ∂f_c/∂A_k`` and ``map = ReLU(Σ_k α_k A_k)``, upsampled bilinearly
    (``align_corners=False``) to the input size. No rescaling (pytorch-grad-cam min–max
    rescales each map to [0, 1]; apply that yourself to compare).

    Parameters:
        layer (None): module path (``"layer4"``: that module's output) or fx node name;
            ``None`` = :func:`find_cam_layer` (the input of the global pooling; on a
            class-token vision transformer the input of the last attention).
        relu (True): the standard definition's ReLU; ``False`` keeps the signed sum.

    Returns: ``(B, 1, H, W)`` on ``x``'s device and dtype.
    """
    return _upsample(layer_cam(model, x, targets, layer=layer, relu=relu), x.shape[-2:])


@register(
    "gradcam_pp",
    family="cam",
    needs_internals=True,
    reference=_CHATTOPADHYAY,
    summary="Grad-CAM++: channel weights Σ relu(g)·g²/(2g²+ΣA·g³), closed form",
)
def gradcam_pp(
    model: Any, x: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None, relu: bool = True
) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018).

    Definition: with ``g = ∂f_c/∂A`` and the exponential-score closed form (eq. 19 with
    ``Y = exp(f_c)``, as pytorch-grad-cam implements it),
    ``a_k^{ij} = g² / (2 g² + Σ_{ab} A_k^{ab} · g³ + 1e-6)`` (0 where ``g = 0``),
    ``w_k = Σ_{ij} a_k^{ij} · ReLU(g_k^{ij})`` and ``map = ReLU(Σ_k w_k A_k)``, upsampled
    bilinearly (``align_corners=False``) to the input size; no rescaling.

    Parameters:
        layer (None): module path or fx node name; ``None`` = :func:`find_cam_layer`.
        relu (True): the final ReLU; ``False`` keeps the signed sum.

    Returns: ``(B, 1, H, W)`` on ``x``'s device and dtype.
    """
    return _upsample(
        layer_cam(model, x, targets, layer=layer, weighting="gradcam_pp", relu=relu), x.shape[-2:]
    )


@register(
    "gradcam_abs",
    family="cam",
    needs_internals=True,
    reference=_KHAKZAR,
    summary="Grad-CAM with abs before channel aggregation: Σ_k |α_k A_k| (diagnostic)",
)
def gradcam_abs(
    model: Any, x: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None
) -> torch.Tensor:
    """Grad-CAM with positive aggregation (Khakzar, Baselizadeh & Navab, 2020).

    Definition: ``map = Σ_k |α_k A_k|`` with Grad-CAM's ``α_k = mean_{h,w} ∂f_c/∂A_k``: the
    absolute value is taken *before* the channel sum, so channels that vote against the class
    no longer cancel. Khakzar et al. use it to show that positive aggregation makes maps
    class-insensitive (HOG Spearman 0.69 vs Grad-CAM's 0.03 on VGG-16). Upsampled bilinearly
    (``align_corners=False``) to the input size; no rescaling. Always ≥ |Grad-CAM(relu=False)|.

    Parameters:
        layer (None): module path or fx node name; ``None`` = :func:`find_cam_layer`.

    Returns: ``(B, 1, H, W)`` on ``x``'s device and dtype, non-negative.
    """
    return _upsample(layer_cam(model, x, targets, layer=layer, relu=False, absolute=True), x.shape[-2:])


@register(
    "cumulative_gradcam",
    family="cam",
    needs_internals=True,
    reference=_KHAKZAR,
    summary="Grad-CAM summed over every layer/block output up to the CAM layer (diagnostic)",
)
def cumulative_gradcam(
    model: Any, x: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None, relu: bool = True
) -> torch.Tensor:
    """Cumulative Grad-CAM (Khakzar, Baselizadeh & Navab, 2020).

    Definition: ``Σ_l upsample(ReLU(Σ_k α_k^l A_k^l))`` over the layers ``l``: every spatial
    value through which all later computation flows (each layer output of a plain CNN, each
    block output of a residual network, named by module), from the first up to and including
    ``layer``. Each layer's Grad-CAM is upsampled bilinearly (``align_corners=False``) to the
    input size before the sum; no rescaling. One forward and one backward pass for all layers.
    Khakzar et al. report it as nearly class-insensitive (HOG Spearman 0.92 on VGG-16).

    Parameters:
        layer (None): the deepest layer (module path or fx node name); ``None`` =
            :func:`find_cam_layer`.
        relu (True): ReLU each layer's map before the sum.

    Returns: ``(B, 1, H, W)`` on ``x``'s device and dtype.
    """
    targets = as_targets(targets, x)
    gm, index = model_index(model, x)
    nodes = cumulative_nodes(index, resolve_layer(index, layer))
    total = None
    for _, a, g in run_chunks(model, gm, index, x, targets, nodes):
        m = _upsample(_combine(a, g, "gradcam", relu), x.shape[-2:])
        total = m if total is None else total + m
    return total


def cumulative_layers(model: Any, example: torch.Tensor, layer: str | None = None) -> list[str]:
    """The layers :func:`cumulative_gradcam` sums over, in graph order."""
    _, index = model_index(model, example)
    return [index.name(n) for n in cumulative_nodes(index, resolve_layer(index, layer))]
