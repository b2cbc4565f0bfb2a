"""One forward and one backward pass through the ATen graph: the full-gradient decomposition.

Every op's bias (:mod:`saliaudit.methods.biases`) is recorded as the graph runs; attention
modules are taken as single ops (:mod:`saliaudit.methods.scopes`); one backward pass gives
``∂f/∂y`` for every recorded output and ``∇ₓf``. Terms laid out as images (``NCHW``, or
channels-last such as Swin's ``(B, H, W, C)``) are spatial; token terms ``(B, T, C)`` of a
vision transformer are drawn on its patch grid (:mod:`saliaudit.tokens`), and the share of the
tokens without a patch (class, distillation) is kept as a term of its own, in the
completeness but in no map.

Srinivas & Fleuret, NeurIPS 2019, eq. 1–2.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from ..errors import DecompositionError
from ..graph import GraphRunner, module_path, op_name
from ..tokens import token_grid
from .biases import Unaccounted, bias_kind, bias_of
from .scopes import find_scopes, nodes_of, scope_biases
from .token_layers import infer_layouts

if TYPE_CHECKING:
    from .fullgrad import BiasTerm, FullGradients

__all__ = ["decompose"]

#: The op name given to an attention module taken as one op.
ATTENTION = "attention"
_SCOPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _nchw_order(layout: str | None, ndim: int) -> list[int] | None:
    """Permutation that brings a value of this layout to NCHW, or None if not spatial."""
    if ndim != 4 or layout is None or sorted(layout) != sorted("NCHW"):
        return None
    return [layout.index(c) for c in "NCHW"]


def _channel_vector(bias: torch.Tensor, order: list[int], shape: torch.Size) -> torch.Tensor | None:
    """``bias`` as a (C,) vector if it only varies along the channel dimension."""
    b = bias.reshape((1,) * (len(shape) - bias.dim()) + tuple(bias.shape))
    varying = [d for d in range(b.dim()) if b.shape[d] != 1]
    c_dim = order[1]
    if varying == [c_dim] and b.shape[c_dim] == shape[c_dim]:
        return b.reshape(-1)
    if not varying:
        return b.reshape(1).expand(shape[c_dim])
    return None


def _scopes_of(gm: torch.fx.GraphModule) -> list:
    """The graph's attention scopes, found once per graph (freed with it)."""
    if gm not in _SCOPES:
        _SCOPES[gm] = find_scopes(gm)
    return _SCOPES[gm]


def decompose(gm: torch.fx.GraphModule, x: torch.Tensor, targets: torch.Tensor) -> FullGradients:
    """The decomposition of ``x`` for ``targets`` through ``gm`` (module docstring)."""
    from .fullgrad import FullGradients

    records: list[tuple[torch.fx.Node, str, torch.Tensor, torch.Tensor]] = []
    tuple_bias: dict[torch.fx.Node, tuple] = {}
    unaccounted: list[str] = []
    scopes = _scopes_of(gm)
    member = nodes_of(scopes)
    scope_out: dict[torch.fx.Node, Any] = {}
    done: set[str] = set()
    grids: dict[tuple[int, int], None] = {}

    def on_op(node, target, args, kwargs, out, dep_mask):
        layout = runner.layouts.get(node)
        if layout == "NCHW" and isinstance(out, torch.Tensor):
            grids.setdefault((int(out.shape[2]), int(out.shape[3])), None)
        name = op_name(target)
        scope = member.get(node)
        if scope is not None:
            if scope.key not in done:  # the module's bias, once, from its inputs
                done.add(scope.key)
                try:
                    scope_out.update(scope_biases(scope, runner.env, runner.dependent, runner.fetch_attr))
                except Exception as err:  # an op without forward-mode derivative, a missing input
                    unaccounted.append(f"{module_path(node)} ({ATTENTION}: {type(err).__name__}: {err})")
            if node in scope_out:
                b = scope_out.pop(node)
                _inherit_layout(runner, scope, node, out)
                if isinstance(b, tuple):
                    tuple_bias[node] = b
                elif b is not None and isinstance(out, torch.Tensor) and out.requires_grad:
                    records.append((node, ATTENTION, out, b))
            return
        if name == "getitem":
            src = node.args[0]
            if src in tuple_bias and isinstance(out, torch.Tensor):
                b = tuple_bias[src][node.args[1]]
                if b is not None:
                    src_name = ATTENTION if src in member else op_name(src.target)
                    records.append((node, src_name, out, b))
            return
        try:
            b = bias_of(target, args, kwargs, out, dep_mask)
        except Unaccounted as err:
            unaccounted.append(f"{module_path(node)} ({err})")
            return
        if isinstance(b, tuple):
            tuple_bias[node] = b
        elif b is not None and isinstance(out, torch.Tensor) and out.requires_grad:
            records.append((node, name, out, b))

    x = x.detach().requires_grad_(True)
    runner = GraphRunner(gm, on_op=on_op)
    with torch.enable_grad():
        try:
            out = runner.run(x)
        finally:  # on_op refers to the runner: break the cycle, activations are freed at once
            runner.on_op = None
        logits_all = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(logits_all, torch.Tensor) or logits_all.dim() != 2:
            raise DecompositionError(
                f"the model output has shape {getattr(logits_all, 'shape', None)}, not (batch, classes)",
                hint="audit a classifier that returns logits",
            )
        picked = logits_all.gather(1, targets.view(-1, 1)).squeeze(1)
        inputs = [x] + [r[2] for r in records]
        grads = torch.autograd.grad(picked.sum(), inputs, allow_unused=True)
    input_grad = grads[0] if grads[0] is not None else torch.zeros_like(x)
    input_term = (input_grad * x).detach()
    terms: dict[str, BiasTerm] = {}
    n = x.shape[0]
    # per-image 4-D values whose layout a reshape lost (timm's Swin): the one of NHWC or NCHW
    # whose grid tiles the input
    shapes = {node: tuple(g.shape) for (node, *_), g in zip(records, grads[1:]) if g is not None}
    layouts = {
        **runner.layouts,
        **infer_layouts(list(shapes), shapes, runner.layouts, n, tuple(x.shape[2:]), set()),
    }
    for node, shape in shapes.items():  # every image-like grid is a candidate patch grid
        order = _nchw_order(layouts.get(node), len(shape))
        if order is not None:
            grids.setdefault((int(shape[order[2]]), int(shape[order[3]])), None)
    used: dict[tuple[int, int, int], None] = {}  # token grids drawn: (leading, h, w)
    for (node, name, _out_t, b), g in zip(records, grads[1:]):
        if g is None:
            continue
        if g.dim() == 0 or g.shape[0] != n:
            unaccounted.append(f"{module_path(node)} ({name}: its values are not laid out per image)")
            continue
        scope = member.get(node)
        path = _clean(scope.key) if scope is not None else module_path(node)
        origin = node.args[0] if op_name(node.target) == "getitem" else node
        for term in _terms(path, name, g.detach(), b.detach(), layouts.get(node), list(grids), used):
            term.node = getattr(origin, "name", node.name)
            key, k = term.name, 2
            while key in terms:
                key = f"{term.name}#{k}"
                k += 1
            term.name = key
            terms[key] = term
    logits = picked.detach()
    recon = input_term.reshape(n, -1).sum(1, dtype=torch.float64)
    for t in terms.values():
        recon = recon + t.total()
    f64 = logits.to(torch.float64)
    residual = (f64 - recon).abs() / f64.abs().clamp(min=1e-6)
    layout: dict[str, Any] = {"attention_modules": len(scopes)}
    if used:
        p, h, w = max(used, key=lambda k: k[1] * k[2])
        layout.update(token_grid=[h, w], leading_tokens=p)
    return FullGradients(
        input_term, input_grad.detach(), terms, logits, targets, recon, residual, unaccounted, layout
    )


def _terms(
    path: str,
    name: str,
    g: torch.Tensor,
    b: torch.Tensor,
    layout: str | None,
    grids: list[tuple[int, int]],
    used: dict[tuple[int, int, int], None],
) -> list[BiasTerm]:
    """The bias term(s) of one op: spatial (NCHW), a token term split into its patch grid
    and its leading tokens, or one non-spatial term."""
    from .fullgrad import BiasTerm

    key, kind = f"{path}.{name}", bias_kind(name)
    order = _nchw_order(layout, g.dim())
    if order is not None:
        channel_bias = _channel_vector(b, order, g.shape)
        b = b.reshape((1,) * (g.dim() - b.dim()) + tuple(b.shape)).permute(order)
        return [BiasTerm(key, name, kind, g.permute(order), b, True, channel_bias)]
    grid = token_grid(int(g.shape[1]), grids) if g.dim() == 3 else None
    if grid is None:
        return [BiasTerm(key, name, kind, g, b, False)]
    used.setdefault((grid.prefix, grid.h, grid.w), None)
    b3 = b.reshape((1,) * (3 - b.dim()) + tuple(b.shape))
    g4, b4 = grid.patches(g), grid.patches(b3)
    spatial = BiasTerm(key, name, kind, g4, b4, True, _channel_vector(b4, [0, 1, 2, 3], g4.shape))
    if grid.prefix == 0:
        return [spatial]
    lead = BiasTerm(f"{key}[leading tokens]", name, kind, grid.leading(g), grid.leading(b3), False)
    return [spatial, lead]


def _inherit_layout(runner: GraphRunner, scope: Any, node: torch.fx.Node, out: Any) -> None:
    """A module output shaped like one of its inputs keeps that input's image layout (Swin's
    window attention returns the ``(B, H, W, C)`` it was given)."""
    if node in runner.layouts or not isinstance(out, torch.Tensor) or out.dim() != 4:
        return
    for a in scope.inputs:
        lay = runner.layouts.get(a)
        meta = a.meta.get("val")
        if lay and meta is not None and tuple(meta.shape[1:]) == tuple(out.shape[1:]):
            runner.layouts[node] = lay
            return


def _clean(key: str) -> str:
    for junk in ("L['self'].", "L['self']", "L__self__."):
        key = key.replace(junk, "")
    return key.replace("[", ".").replace("]", "").strip(".") or "model"
