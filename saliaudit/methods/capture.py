"""A CAM layer's activation and the gradient of the target logits with respect to it.

One run of :class:`~saliaudit.graph.GraphRunner` over the model's ATen graph, whose ``on_op``
callback keeps the chosen nodes' outputs; ``torch.autograd.grad`` then differentiates the
target logits with respect to them (no module hook). Values laid out channels-last are
permuted to ``(B, C, h, w)``; token values ``(B, T, C)`` become the ``(B, C, h, w)`` map of
their patch tokens (:class:`saliaudit.tokens.TokenGrid`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from ..errors import DecompositionError, UsageError
from ..graph import GraphRunner
from .common import as_targets
from .layers import LayerIndex, _chunking, _pad, model_index, resolve_layer

__all__ = ["layer_activations", "run_chunks"]


def _nchw(t: torch.Tensor, layout: str) -> torch.Tensor:
    order = [layout.index(c) for c in "NCHW"]
    return t if order == [0, 1, 2, 3] else t.permute(order)


def _capture(
    gm: torch.fx.GraphModule,
    index: LayerIndex,
    x: torch.Tensor,
    targets: torch.Tensor,
    nodes: list[torch.fx.Node],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    store: dict[torch.fx.Node, torch.Tensor] = {}
    wanted = set(nodes)

    def on_op(node, target, args, kwargs, out, dep_mask):
        if node in wanted:
            store[node] = out

    xi = x.detach().requires_grad_(True)
    runner = GraphRunner(gm, on_op=on_op)
    with torch.enable_grad():
        out = runner.run(xi)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise DecompositionError(
                f"the model output has shape {getattr(logits, 'shape', None)}, not (batch, classes)",
                hint="audit a classifier that returns logits",
            )
        k = logits.shape[1]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= k):
            raise UsageError(f"target class out of range for a model with {k} classes: {targets.tolist()}")
        missing = [n.name for n in nodes if n not in store]
        if missing:
            raise DecompositionError(f"layer value {missing[0]} was not computed")
        score = logits.gather(1, targets.view(-1, 1)).sum()
        acts = [store[n] for n in nodes]
        grads = torch.autograd.grad(score, acts, allow_unused=True)
    result = []
    for n, a, g in zip(nodes, acts, grads):
        a = a.detach()
        g = torch.zeros_like(a) if g is None else g.detach()
        grid = index.tokens.get(n)
        if grid is not None:  # (B, T, C) -> (B, C, h, w)
            result.append((grid.patches(a), grid.patches(g)))
            continue
        layout = runner.layouts.get(n) or index.layouts[n]
        result.append((_nchw(a, layout), _nchw(g, layout)))
    return result


def layer_activations(
    model: Any,
    x: torch.Tensor,
    targets: torch.Tensor | list[int],
    layers: str | None | list[str | None] = None,
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``[(name, A, ∂f_target/∂A)]`` for each layer, NCHW ``(B, K, h, w)``, one forward+backward.

    ``layers``: a name, ``None`` (automatic) or a list of them. Batched on ``x``'s device; a
    graph with a static batch size runs in chunks of that size.
    """
    targets = as_targets(targets, x)
    gm, index = model_index(model, x)
    names = layers if isinstance(layers, list) else [layers]
    nodes = [resolve_layer(index, name) for name in names]
    return run_chunks(model, gm, index, x, targets, nodes)


def run_chunks(
    model: Any,
    gm: torch.fx.GraphModule,
    index: LayerIndex,
    x: torch.Tensor,
    targets: torch.Tensor,
    nodes: list[torch.fx.Node],
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    size, pad_to = _chunking(model, x.shape[0])
    parts = []
    for start in range(0, x.shape[0], size):
        xs, ts = x[start : start + size], targets[start : start + size]
        n = xs.shape[0]
        parts.append(
            [(a[:n], g[:n]) for a, g in _capture(gm, index, _pad(xs, pad_to), _pad(ts, pad_to), nodes)]
        )
    out = []
    for i, node in enumerate(nodes):
        a = torch.cat([p[i][0] for p in parts]) if len(parts) > 1 else parts[0][i][0]
        g = torch.cat([p[i][1] for p in parts]) if len(parts) > 1 else parts[0][i][1]
        out.append((index.name(node), a, g))
    return out
