"""What each saliency method will do on one model (``saliaudit methods --model``).

One line per method, computed on a blank input of the model's size: the layer and the grid a
CAM method reads (:func:`saliaudit.methods.layers.layer_info`: on a vision transformer the
token layer and how its tokens split into leading tokens and patches), the bias terms of
FullGrad's decomposition (:func:`saliaudit.methods.fullgrad.full_gradients`: attention
modules taken as single ops, token terms on the patch grid, the leading tokens' share), and,
for a method an audit would skip or that cannot run, the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import SaliauditError

__all__ = ["MethodPlan", "method_plans"]

#: The reason an audit gives for skipping a method that needs layer internals on TorchScript.
TORCHSCRIPT = (
    "needs layer internals, which a TorchScript model does not expose; export the model with "
    "torch.export (.pt2)"
)


@dataclass
class MethodPlan:
    """``status``: ``runs``, ``skipped`` (an audit reports it SKIPPED) or ``fails`` (it cannot
    run on this model: the audit reports its error)."""

    method: str
    status: str
    text: str


def _message(err: Exception) -> str:
    return str(err) if isinstance(err, SaliauditError) else f"{type(err).__name__}: {err}"


def _shorten(names: list[str], keep: int = 3) -> str:
    if len(names) <= 2 * keep:
        return ", ".join(names)
    return ", ".join(names[:keep]) + ", …, " + ", ".join(names[-keep:])


def _leading(p: int) -> str:
    if p == 1:
        return "the class token's share"
    return f"the {p} leading tokens' share (class, distillation or register tokens)"


def _cam(lm: Any, example: torch.Tensor, names: list[str]) -> dict[str, MethodPlan]:
    from .methods.cam import cumulative_layers
    from .methods.layers import layer_info

    try:
        info = layer_info(lm, example)
        layers = cumulative_layers(lm, example)
    except Exception as err:  # no capturable graph, no layer, a model that fails to run
        return {n: MethodPlan(n, "fails", f"cannot run: {_message(err)}") for n in names}
    text = str(info)
    if info.tokens is not None and info.prefix:
        lead = "the leading token is" if info.prefix == 1 else f"the {info.prefix} leading tokens are"
        text += f"; {lead} left out of the map"
    if info.reason:
        text += f"; default: {info.reason}"
    plans = {n: MethodPlan(n, "runs", text) for n in names}
    if "cumulative_gradcam" in plans:
        plans["cumulative_gradcam"] = MethodPlan(
            "cumulative_gradcam", "runs", f"Grad-CAM summed over {len(layers)} layers: {_shorten(layers)}"
        )
    return plans


def _fullgrad(lm: Any, example: torch.Tensor) -> MethodPlan:
    from .methods.fullgrad import full_gradients

    try:
        fg = full_gradients(lm, example, [0])
    except Exception as err:  # a graph that cannot be captured, a model that fails to run
        return MethodPlan("fullgrad", "fails", f"cannot run: {_message(err)}")
    terms = list(fg.bias_terms.values())
    if not terms:
        why = "; ".join(fg.unaccounted) or "no op with a bias"
        return MethodPlan("fullgrad", "runs", f"the input-gradient term only ({why})")
    parts = []
    attention = {t.name.removesuffix("[leading tokens]") for t in terms if t.op == "attention"}
    if attention:
        parts.append(f"attention modules taken as single ops ({len(attention)})")
    leading = [t for t in terms if t.name.endswith("[leading tokens]")]
    grids, prefixes = {}, set()
    for t in leading:
        patch = fg.bias_terms.get(t.name.removesuffix("[leading tokens]"))
        if patch is not None and patch.grad.dim() == 4:
            grids[tuple(patch.grad.shape[-2:])] = None
        prefixes.add(int(t.grad.shape[1]))
    if grids:
        shown = " and ".join(f"{h}×{w}" for h, w in grids)
        parts.append(f"token terms drawn on the {shown} patch grid")
    for p in sorted(prefixes):
        parts.append(f"{_leading(p)} left out of the map ({len(leading)} terms, kept in the completeness)")
    spatial = sum(t.spatial for t in terms)
    count = f"{len(terms)} bias terms, {spatial} drawn on the image"
    flat = len([t for t in terms if not t.spatial and t not in leading])
    if flat:
        count += f", {flat} not laid out as an image (in the completeness, not in the map)"
    parts.append(count)
    if fg.unaccounted:
        parts.append(f"{len(fg.unaccounted)} ops unaccounted (their share stays in the residual)")
    return MethodPlan("fullgrad", "runs", "; ".join(parts))


def method_plans(lm: Any, methods: list[str]) -> list[MethodPlan]:
    """One :class:`MethodPlan` per method of ``methods`` on the loaded model ``lm``."""
    from .methods import METHODS

    example = torch.zeros(1, 3, *lm.input_size)
    torchscript = lm.format == "torchscript"
    cam = [n for n in methods if METHODS[n].family == "cam" and not torchscript]
    plans = _cam(lm, example, cam) if cam else {}
    out = []
    for name in methods:
        m = METHODS[name]
        if m.needs_internals and torchscript:
            out.append(MethodPlan(name, "skipped", f"skipped: {TORCHSCRIPT}"))
        elif name in plans:
            out.append(plans[name])
        elif m.family == "fullgrad":
            out.append(_fullgrad(lm, example))
        elif m.family == "propagation":
            out.append(
                MethodPlan(name, "runs", "modified backward rules at the non-linearities of the ATen graph")
            )
        elif m.family == "control":
            out.append(MethodPlan(name, "runs", "a control: ignores the model"))
        elif m.needs_internals:
            out.append(MethodPlan(name, "runs", "reads layer internals through the ATen graph"))
        else:
            out.append(MethodPlan(name, "runs", "through the model's inputs and outputs only (no internals)"))
    return out
