"""Layers of a model's graph that CAM methods read (see docs/methods.md), and their capture.

A :class:`LayerIndex` lists the spatial, input-dependent nodes of the model's ATen graph
(:func:`saliaudit.graph.get_graph`, the same for eager modules and ``.pt2`` files) by
``nn.Module`` path: the layer ``"layer4"`` is the output of that module, i.e. the last
input-dependent graph node whose module path is ``layer4`` or starts with ``layer4.``; an fx
node name (``relu__16``) is accepted too. A vision transformer's token values ``(B, T, C)``
count as layers too, read as the ``(B, C, h, w)`` map of their patch tokens (the leading
class/distillation/register tokens dropped, :mod:`saliaudit.methods.token_layers`).
:func:`find_cam_layer` picks the default (the input of the global pooling that feeds the
classifier; on a class-token transformer the input of the last attention),
:func:`cam_layers` lists the choices; :mod:`saliaudit.methods.capture` reads them.
"""

from __future__ import annotations

import difflib
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from ..errors import DecompositionError, UsageError
from ..graph import GraphRunner, get_graph, module_path, op_name
from ..tokens import TokenGrid
from .token_layers import default_token_layer, infer_layouts, mixer_modules, token_values

__all__ = [
    "LayerIndex",
    "LayerInfo",
    "cam_layers",
    "cumulative_nodes",
    "find_cam_layer",
    "layer_info",
    "model_index",
    "resolve_layer",
]

_POOL_OPS = frozenset(
    {
        "adaptive_avg_pool2d",
        "_adaptive_avg_pool2d",
        "adaptive_max_pool2d",
        "avg_pool2d",
        "max_pool2d",
        "max_pool2d_with_indices",
    }
)
_REDUCE_OPS = frozenset({"mean", "amax", "sum", "amin", "logsumexp"})
_ADAPTIVE = frozenset({"adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d"})


# --------------------------------------------------------------------------- layer index


@dataclass
class LayerIndex:
    """What one run of the graph tells about its layers, for one input shape."""

    order: list[torch.fx.Node]  # input-dependent call_function nodes
    shapes: dict[torch.fx.Node, tuple[int, ...]]
    layouts: dict[torch.fx.Node, str]
    last_of: dict[str, torch.fx.Node]  # module path (and prefixes) -> output node
    by_name: dict[str, torch.fx.Node]  # fx node name -> node
    names: dict[torch.fx.Node, str] = field(default_factory=dict)  # canonical layer names
    spatial: list[torch.fx.Node] = field(default_factory=list)
    tokens: dict[torch.fx.Node, TokenGrid] = field(default_factory=dict)  # (B, T, C) values
    dead: set[torch.fx.Node] = field(default_factory=set)  # patch tokens that miss the logits
    auto: torch.fx.Node | None = None
    auto_reason: str = ""
    cut: list[torch.fx.Node] = field(default_factory=list)

    def name(self, node: torch.fx.Node) -> str:
        return self.names.get(node, node.name)

    def usable(self, node: torch.fx.Node) -> bool:
        """Can a CAM read this value (spatial, or tokens on a patch grid)?"""
        return node in self.tokens or _is_spatial(self, node)


_INDEX: weakref.WeakKeyDictionary[torch.fx.GraphModule, dict[tuple, LayerIndex]] = weakref.WeakKeyDictionary()


def _is_spatial(index: LayerIndex, node: torch.fx.Node) -> bool:
    layout = index.layouts.get(node)
    return layout is not None and sorted(layout) == sorted("NCHW") and len(index.shapes.get(node, ())) == 4


def _hw(index: LayerIndex, node: torch.fx.Node) -> tuple[int, int]:
    layout, shape = index.layouts[node], index.shapes[node]
    return shape[layout.index("H")], shape[layout.index("W")]


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _first_dep(node: torch.fx.Node, dependent: set[torch.fx.Node]) -> torch.fx.Node | None:
    return next((a for a in node.all_input_nodes if a in dependent), None)


def _build_index(gm: torch.fx.GraphModule, x: torch.Tensor, small: torch.Tensor) -> LayerIndex:
    """The index for the input ``x``; ``small`` (one image, padded to a static batch) is the
    probe of the NaN tests that find a token model's default layer."""
    shapes: dict[torch.fx.Node, tuple[int, ...]] = {}

    def on_op(node, target, args, kwargs, out, dep_mask):
        t = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(t, torch.Tensor):
            shapes[node] = tuple(t.shape)

    runner = GraphRunner(gm, on_op=on_op)
    with torch.no_grad():
        runner.run(x)
    dependent = runner.dependent
    order = [n for n in gm.graph.nodes if n.op == "call_function" and n in dependent]
    last_of: dict[str, torch.fx.Node] = {}
    for n in order:
        for p in _prefixes(module_path(n)):
            last_of[p] = n
    index = LayerIndex(order, shapes, dict(runner.layouts), last_of, {n.name: n for n in order})
    for n in order:
        for p in _prefixes(module_path(n)):
            if last_of[p] is n:
                index.names[n] = p  # the outermost module whose output this node is
                break
    mixers = mixer_modules(order)
    batch, size = int(x.shape[0]), (int(x.shape[-2]), int(x.shape[-1]))
    index.layouts.update(infer_layouts(order, shapes, index.layouts, batch, size, mixers))
    index.spatial = [n for n in order if _is_spatial(index, n)]
    spatial = set(index.spatial)
    grids = [hw for hw in dict.fromkeys(_hw(index, n) for n in index.spatial) if hw[0] * hw[1] > 1]
    index.tokens = token_values(order, shapes, batch, grids)

    # the default layer: the input of the last global pooling (over H and W) of a spatial value
    for n in reversed(order):
        name = op_name(n.target)
        src = _first_dep(n, dependent)
        if src is None or src not in spatial:
            continue
        layout = index.layouts[src]
        hw = {layout.index("H"), layout.index("W")}
        if name in _POOL_OPS:
            out_layout = index.layouts.get(n, "NCHW")
            shape = shapes.get(n, ())
            if len(shape) == 4 and shape[out_layout.index("H")] == 1 and shape[out_layout.index("W")] == 1:
                index.auto, index.auto_reason = src, f"the input of the global pooling ({n.name})"
                break
        elif (
            name in _REDUCE_OPS
            and len(n.args) > 1
            and isinstance(n.args[1], (list, tuple))
            and hw <= {int(d) % 4 for d in n.args[1]}
        ):
            index.auto, index.auto_reason = src, f"the input of the global {name} ({n.name})"
            break
    if index.auto is None and index.tokens:
        # no global pooling of a spatial value (a vision transformer): the last token value
        # whose patch tokens reach the logits
        node, why, dead = default_token_layer(gm, small, index.tokens, index.names, mixers)
        index.dead.update(dead)
        if node is not None:
            index.auto, index.auto_reason = node, why
    if index.auto is None and index.spatial:
        # no global pooling (e.g. VGG's flatten of a 7×7 map): the last spatial value, taken
        # before an adaptive pooling to a fixed size
        node = index.spatial[-1]
        if op_name(node.target) in _ADAPTIVE:
            src = _first_dep(node, dependent)
            node = src if src in spatial else node
        index.auto, index.auto_reason = node, "the last spatial value (no global pooling found)"

    # cut points: values through which all later computation flows (a plain CNN's layers, a
    # residual network's block outputs)
    pos = {n: i for i, n in enumerate(order)}
    first_input = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    reach = max((pos[u] for u in (first_input.users if first_input else ()) if u in pos), default=-1)
    for i, n in enumerate(order):
        if reach <= i and (n in spatial or n in index.tokens) and n in index.names:
            index.cut.append(n)
        reach = max([reach] + [pos[u] for u in n.users if u in pos])
    return index


def _graph(model: Any, x: torch.Tensor) -> torch.fx.GraphModule:
    gm = get_graph(model, x)
    if gm is None:
        raise DecompositionError(
            "CAM methods need the model's layer activations, which a TorchScript model does not expose",
            hint="export the model with torch.export and audit the .pt2",
        )
    return gm


def _chunking(model: Any, n: int) -> tuple[int, int]:
    """(chunk size, size a chunk is padded to) the graph accepts."""
    chunks = getattr(model, "_chunks", None)
    if callable(chunks):
        return chunks(n)
    return max(n, 1), 1


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[0] >= size:
        return x
    return torch.cat([x, x[-1:].expand(size - x.shape[0], *x.shape[1:])])


def model_index(model: Any, x: torch.Tensor) -> tuple[torch.fx.GraphModule, LayerIndex]:
    gm = _graph(model, x)
    size, pad_to = _chunking(model, x.shape[0])
    probe = _pad(x[:size].detach(), pad_to)
    per_gm = _INDEX.setdefault(gm, {})
    key = tuple(probe.shape)
    if key not in per_gm:
        per_gm[key] = _build_index(gm, probe, _pad(x[:1].detach(), pad_to))
    return gm, per_gm[key]


def _layer_names(index: LayerIndex) -> list[str]:
    """Spatial and token module outputs up to the default layer (later ones are pooled, 1×1,
    or their patch tokens no longer reach the logits)."""
    nodes = [n for n in index.order if index.usable(n)]
    if index.auto is not None and index.auto in nodes:
        nodes = nodes[: nodes.index(index.auto) + 1]
    return list(dict.fromkeys(index.names[n] for n in nodes if n in index.names))


def _suggest(index: LayerIndex, name: str) -> str:
    pool = [p for p in _layer_names(index) if p != name]
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.4)
    if close:
        return "did you mean " + ", ".join(close) + "?"
    return "layers: " + ", ".join(pool[-8:])


def resolve_layer(index: LayerIndex, layer: str | None) -> torch.fx.Node:
    if layer is None:
        if index.auto is None:
            raise DecompositionError(
                "the model has no spatial (B, C, H, W) layer and no (B, T, C) tokens on a patch "
                "grid for a CAM"
            )
        return index.auto
    if not isinstance(layer, str) or not layer:
        raise UsageError(f"invalid CAM layer {layer!r}", hint="pass a module path such as layer4")
    node = index.last_of.get(layer) or index.by_name.get(layer)
    if node is None:
        raise UsageError(f"the model has no layer {layer!r}", hint=_suggest(index, layer))
    if not index.usable(node):
        raise UsageError(
            f"layer {layer!r} is not spatial: its output has shape "
            f"{index.shapes.get(node)}; a CAM needs a (B, C, H, W) value or (B, T, C) tokens "
            "on the patch grid",
            hint=_suggest(index, layer),
        )
    if node in index.dead:
        raise UsageError(
            f"the patch tokens of layer {layer!r} do not reach the logits (they are read only "
            "through the leading tokens after it), so its CAM is zero",
            hint=f"take {index.name(index.auto)} or an earlier layer"
            if index.auto
            else _suggest(index, layer),
        )
    return node


def find_cam_layer(model: Any, example: torch.Tensor) -> str:
    """Name of the default CAM layer: the last spatial value before global pooling.

    That is the input of the ``adaptive_avg_pool2d`` (or max pooling, or mean/amax over H and
    W) that leads to the classifier, found on the ATen graph of an eager module or a ``.pt2``
    (Swin's channels-last ``(B, H, W, C)`` included). Without global pooling but with token
    values (a ViT), the last token value whose patch tokens reach the logits: with a
    class-token readout the input of the last attention, ``blocks.11.norm1`` on a timm
    ViT-B/16 (pytorch-grad-cam's documented ``model.blocks[-1].norm1``), with a token-mean
    readout the input of the mean. Otherwise the last spatial value (before an adaptive
    pooling to a fixed size, as in VGG). The name is the outermost module whose output it is
    (``"layer4"`` on a torchvision ResNet), else the fx node name. ``example``: a
    (B, C, H, W) input batch.
    """
    _, index = model_index(model, example)
    return index.name(resolve_layer(index, None))


def cam_layers(model: Any, example: torch.Tensor) -> list[str]:
    """Names of the module outputs a CAM can use (``--cam-layer``), in graph order.

    Spatial and token module outputs up to and including :func:`find_cam_layer`'s (the last
    entry); any other module path or fx node name with such an output is accepted as well.
    """
    _, index = model_index(model, example)
    return _layer_names(index)


@dataclass
class LayerInfo:
    """What a CAM reads at one layer: ``channels`` maps on an ``h × w`` grid, from ``tokens``
    values of which ``prefix`` lead (``tokens`` is None for a spatial layer)."""

    name: str
    channels: int
    h: int
    w: int
    tokens: int | None = None
    prefix: int = 0
    reason: str = ""

    def __str__(self) -> str:
        if self.tokens is None:
            return f"layer {self.name}, {self.channels} channels on a {self.h}×{self.w} grid"
        return (
            f"layer {self.name}, tokens {self.tokens} = {self.prefix} leading + "
            f"{self.h}×{self.w} patches, {self.channels} channels"
        )


def layer_info(model: Any, example: torch.Tensor, layer: str | None = None) -> LayerInfo:
    """The :class:`LayerInfo` of ``layer`` (None: the default, with the reason it was chosen)."""
    _, index = model_index(model, example)
    node = resolve_layer(index, layer)
    shape = index.shapes[node]
    grid = index.tokens.get(node)
    reason = index.auto_reason if node is index.auto else ""
    if grid is not None:
        return LayerInfo(index.name(node), shape[2], grid.h, grid.w, shape[1], grid.prefix, reason)
    h, w = _hw(index, node)
    return LayerInfo(index.name(node), shape[index.layouts[node].index("C")], h, w, reason=reason)


def cumulative_nodes(index: LayerIndex, last: torch.fx.Node) -> list[torch.fx.Node]:
    pos = {n: i for i, n in enumerate(index.order)}
    nodes = [n for n in index.cut if pos[n] <= pos[last]]
    if last not in nodes:
        nodes.append(last)
    return nodes
