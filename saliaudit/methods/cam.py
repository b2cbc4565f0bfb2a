"""CAM methods: Grad-CAM, Grad-CAM++ and Khakzar's diagnostics (design.md §3).

Every method here reads the activation ``A`` (B, K, h, w) of one spatial layer and the gradient
``∂f_c/∂A`` of the target logit. Both come from the model's ATen graph
(:func:`saliaudit.graph.get_graph`, the same for eager modules and ``.pt2`` files), run by
:class:`~saliaudit.graph.GraphRunner` whose ``on_op`` callback keeps the chosen node's output;
``torch.autograd.grad`` then differentiates the target logits with respect to it. No module hook
is ever registered, so nothing can be left behind, also when an exception is raised. TorchScript
models have no capturable graph: these methods raise :class:`DecompositionError` there (the
registry marks them ``needs_internals``, so an audit reports them SKIPPED).

Layers are named by ``nn.Module`` path: the layer ``"layer4"`` is the output of that module, i.e.
the last input-dependent graph node whose module path is ``layer4`` or starts with ``layer4.``;
an fx node name (``relu__16``) is accepted too. :func:`find_cam_layer` picks the default (the
input of the global pooling that feeds the classifier) and :func:`cam_layers` lists the choices.
"""

from __future__ import annotations

import difflib
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from ..errors import DecompositionError, UsageError
from ..graph import GraphRunner, get_graph, module_path, op_name
from . import register

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

_SELVARAJU = ("Selvaraju et al., Grad-CAM: Visual Explanations from Deep Networks via "
              "Gradient-based Localization, ICCV 2017")
_CHATTOPADHYAY = ("Chattopadhyay et al., Grad-CAM++: Generalized Gradient-based Visual "
                  "Explanations for Deep Convolutional Networks, WACV 2018")
_KHAKZAR = ("Khakzar, Baselizadeh & Navab, Rethinking Positive Aggregation and Propagation of "
            "Gradients in Gradient-based Saliency Methods, 2020")

_POOL_OPS = frozenset({"adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d",
                       "avg_pool2d", "max_pool2d", "max_pool2d_with_indices"})
_REDUCE_OPS = frozenset({"mean", "amax", "sum", "amin", "logsumexp"})
_ADAPTIVE = frozenset({"adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d"})
#: Grad-CAM++'s ε in the denominator of α (pytorch-grad-cam uses the same value).
_PP_EPS = 1e-6


# --------------------------------------------------------------------------- layer index

@dataclass
class _LayerIndex:
    """What one run of the graph tells about its layers, for one input shape."""

    order: list[torch.fx.Node]                       # input-dependent call_function nodes
    shapes: dict[torch.fx.Node, tuple[int, ...]]
    layouts: dict[torch.fx.Node, str]
    last_of: dict[str, torch.fx.Node]                # module path (and prefixes) -> output node
    by_name: dict[str, torch.fx.Node]                # fx node name -> node
    names: dict[torch.fx.Node, str] = field(default_factory=dict)  # canonical layer names
    spatial: list[torch.fx.Node] = field(default_factory=list)
    auto: torch.fx.Node | None = None
    auto_reason: str = ""
    cut: list[torch.fx.Node] = field(default_factory=list)

    def name(self, node: torch.fx.Node) -> str:
        return self.names.get(node, node.name)


_INDEX: weakref.WeakKeyDictionary[torch.fx.GraphModule, dict[tuple, _LayerIndex]] = \
    weakref.WeakKeyDictionary()


def _is_spatial(index: _LayerIndex, node: torch.fx.Node) -> bool:
    layout = index.layouts.get(node)
    return (layout is not None and sorted(layout) == sorted("NCHW")
            and len(index.shapes.get(node, ())) == 4)


def _hw(index: _LayerIndex, node: torch.fx.Node) -> tuple[int, int]:
    layout, shape = index.layouts[node], index.shapes[node]
    return shape[layout.index("H")], shape[layout.index("W")]


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _first_dep(node: torch.fx.Node, dependent: set[torch.fx.Node]) -> torch.fx.Node | None:
    return next((a for a in node.all_input_nodes if a in dependent), None)


def _build_index(gm: torch.fx.GraphModule, x: torch.Tensor) -> _LayerIndex:
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
    index = _LayerIndex(order, shapes, dict(runner.layouts), last_of,
                        {n.name: n for n in order})
    for n in order:
        for p in _prefixes(module_path(n)):
            if last_of[p] is n:
                index.names[n] = p  # the outermost module whose output this node is
                break
    index.spatial = [n for n in order if _is_spatial(index, n)]
    spatial = set(index.spatial)

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
            if len(shape) == 4 and shape[out_layout.index("H")] == 1 \
                    and shape[out_layout.index("W")] == 1:
                index.auto, index.auto_reason = src, f"input of the global pooling {n.name}"
                break
        elif (name in _REDUCE_OPS and len(n.args) > 1 and isinstance(n.args[1], (list, tuple))
              and hw <= {int(d) % 4 for d in n.args[1]}):
            index.auto, index.auto_reason = src, f"input of the global {name} {n.name}"
            break
    if index.auto is None and index.spatial:
        # no global pooling (e.g. VGG's flatten of a 7×7 map): the last spatial value, taken
        # before an adaptive pooling to a fixed size
        node = index.spatial[-1]
        if op_name(node.target) in _ADAPTIVE:
            src = _first_dep(node, dependent)
            node = src if src in spatial else node
        index.auto, index.auto_reason = node, "last spatial value (no global pooling found)"

    # cut points: values through which all later computation flows (a plain CNN's layers, a
    # residual network's block outputs)
    pos = {n: i for i, n in enumerate(order)}
    first_input = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    reach = max((pos[u] for u in (first_input.users if first_input else ()) if u in pos),
                default=-1)
    for i, n in enumerate(order):
        if reach <= i and n in spatial and n in index.names:
            index.cut.append(n)
        reach = max([reach] + [pos[u] for u in n.users if u in pos])
    return index


def _graph(model: Any, x: torch.Tensor) -> torch.fx.GraphModule:
    gm = get_graph(model, x)
    if gm is None:
        raise DecompositionError(
            "CAM methods need the model's layer activations, which a TorchScript model does "
            "not expose", hint="export the model with torch.export and audit the .pt2")
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


def _index(model: Any, x: torch.Tensor) -> tuple[torch.fx.GraphModule, _LayerIndex]:
    gm = _graph(model, x)
    size, pad_to = _chunking(model, x.shape[0])
    probe = _pad(x[:size].detach(), pad_to)
    per_gm = _INDEX.setdefault(gm, {})
    key = tuple(probe.shape)
    if key not in per_gm:
        per_gm[key] = _build_index(gm, probe)
    return gm, per_gm[key]


def _layer_names(index: _LayerIndex) -> list[str]:
    """Spatial module outputs up to the default layer (later ones are pooled, 1×1)."""
    nodes = index.spatial
    if index.auto is not None and index.auto in nodes:
        nodes = nodes[:nodes.index(index.auto) + 1]
    return list(dict.fromkeys(index.names[n] for n in nodes if n in index.names))


def _suggest(index: _LayerIndex, name: str) -> str:
    pool = [p for p in _layer_names(index) if p != name]
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.4)
    if close:
        return "did you mean " + ", ".join(close) + "?"
    return "spatial layers: " + ", ".join(pool[-8:])


def _resolve(index: _LayerIndex, layer: str | None) -> torch.fx.Node:
    if layer is None:
        if index.auto is None:
            raise DecompositionError("the model has no spatial (B, C, H, W) layer for a CAM")
        return index.auto
    if not isinstance(layer, str) or not layer:
        raise UsageError(f"invalid CAM layer {layer!r}", hint="pass a module path such as layer4")
    node = index.last_of.get(layer) or index.by_name.get(layer)
    if node is None:
        raise UsageError(f"the model has no layer {layer!r}", hint=_suggest(index, layer))
    if node not in index.spatial:
        raise UsageError(
            f"layer {layer!r} is not spatial: its output has shape "
            f"{index.shapes.get(node)}; a CAM needs a (B, C, H, W) value",
            hint=_suggest(index, layer))
    return node


def find_cam_layer(model: Any, example: torch.Tensor) -> str:
    """Name of the default CAM layer: the last spatial value before global pooling.

    That is the input of the ``adaptive_avg_pool2d`` (or max pooling, or mean/amax over H and
    W) that leads to the classifier, found on the ATen graph of an eager module or a ``.pt2``.
    Without global pooling, the last spatial value (before an adaptive pooling to a fixed
    size, as in VGG). The name is the outermost module whose output it is (``"layer4"`` on a
    torchvision ResNet), else the fx node name. ``example``: a (B, C, H, W) input batch.
    """
    _, index = _index(model, example)
    return index.name(_resolve(index, None))


def cam_layers(model: Any, example: torch.Tensor) -> list[str]:
    """Names of the spatial module outputs a CAM can use (``--cam-layer``), in graph order.

    Module outputs up to and including :func:`find_cam_layer`'s (the last entry); any other
    module path or fx node name with a spatial output is accepted as well.
    """
    _, index = _index(model, example)
    return _layer_names(index)


def _cumulative_nodes(index: _LayerIndex, last: torch.fx.Node) -> list[torch.fx.Node]:
    pos = {n: i for i, n in enumerate(index.order)}
    nodes = [n for n in index.cut if pos[n] <= pos[last]]
    if last not in nodes:
        nodes.append(last)
    return nodes


# --------------------------------------------------------------------------- capture

def _nchw(t: torch.Tensor, layout: str) -> torch.Tensor:
    order = [layout.index(c) for c in "NCHW"]
    return t if order == [0, 1, 2, 3] else t.permute(order)


def _capture(gm: torch.fx.GraphModule, index: _LayerIndex, x: torch.Tensor,
             targets: torch.Tensor, nodes: list[torch.fx.Node]
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
            raise DecompositionError(f"the model output has shape {getattr(logits, 'shape', None)}"
                                     ", not (batch, classes)",
                                     hint="audit a classifier that returns logits")
        k = logits.shape[1]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= k):
            raise UsageError(f"target class out of range for a model with {k} classes: "
                             f"{targets.tolist()}")
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
        layout = runner.layouts.get(n) or index.layouts[n]
        result.append((_nchw(a, layout), _nchw(g, layout)))
    return result


def layer_activations(model: Any, x: torch.Tensor, targets: torch.Tensor | list[int],
                      layers: str | None | list[str | None] = None
                      ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``[(name, A, ∂f_target/∂A)]`` for each layer, NCHW ``(B, K, h, w)``, one forward+backward.

    ``layers``: a name, ``None`` (automatic) or a list of them. Batched on ``x``'s device; a
    graph with a static batch size runs in chunks of that size.
    """
    if x.dim() != 4:
        raise UsageError(f"x must be a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    targets = torch.as_tensor(targets, dtype=torch.long, device=x.device).reshape(-1)
    if targets.numel() != x.shape[0]:
        raise UsageError(f"{targets.numel()} targets for a batch of {x.shape[0]} images")
    gm, index = _index(model, x)
    names = layers if isinstance(layers, list) else [layers]
    nodes = [_resolve(index, name) for name in names]
    return _run_chunks(model, gm, index, x, targets, nodes)


def _run_chunks(model: Any, gm: torch.fx.GraphModule, index: _LayerIndex, x: torch.Tensor,
                targets: torch.Tensor, nodes: list[torch.fx.Node]
                ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    size, pad_to = _chunking(model, x.shape[0])
    parts = []
    for start in range(0, x.shape[0], size):
        xs, ts = x[start:start + size], targets[start:start + size]
        n = xs.shape[0]
        parts.append([(a[:n], g[:n]) for a, g in
                       _capture(gm, index, _pad(xs, pad_to), _pad(ts, pad_to), nodes)])
    out = []
    for i, node in enumerate(nodes):
        a = torch.cat([p[i][0] for p in parts]) if len(parts) > 1 else parts[0][i][0]
        g = torch.cat([p[i][1] for p in parts]) if len(parts) > 1 else parts[0][i][1]
        out.append((index.name(node), a, g))
    return out


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


def _combine(a: torch.Tensor, g: torch.Tensor, weighting: str, relu: bool,
             absolute: bool = False) -> torch.Tensor:
    weighted = _WEIGHTS[weighting](a, g) * a
    if absolute:
        weighted = weighted.abs()
    cam = weighted.sum(dim=1, keepdim=True)
    return cam.clamp(min=0) if relu else cam


def _upsample(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(cam.shape[-2:]) == tuple(size):
        return cam
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)


def layer_cam(model: Any, x: torch.Tensor, targets: torch.Tensor | list[int], *,
              layer: str | None = None, weighting: str = "gradcam", relu: bool = True,
              absolute: bool = False) -> torch.Tensor:
    """A CAM at the layer's own resolution ``(B, 1, h, w)``, before upsampling.

    ``weighting``: ``gradcam`` (α = spatial mean of the gradient) or ``gradcam_pp``;
    ``absolute``: Σ_k |α_k A_k| instead of Σ_k α_k A_k; ``relu``: clamp the sum at 0.
    """
    if weighting not in _WEIGHTS:
        raise UsageError(f"unknown CAM weighting {weighting!r}", hint="gradcam or gradcam_pp")
    [(_, a, g)] = layer_activations(model, x, targets, layer)
    return _combine(a, g, weighting, relu, absolute)


# --------------------------------------------------------------------------- methods

@register("gradcam", family="cam", needs_internals=True, reference=_SELVARAJU,
          summary="Grad-CAM: ReLU(Σ_k mean(∂f/∂A_k)·A_k) at the last spatial layer, upsampled")
def gradcam(model: Any, x: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None,
            relu: bool = True) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017).

    Definition: for the activation ``A`` (K channels, h×w) of ``layer`` and the target logit
    ``f_c``, ``α_k = mean_{h,w} ∂f_c/∂A_k`` and ``map = ReLU(Σ_k α_k A_k)``, upsampled bilinearly
    (``align_corners=False``) to the input size. No rescaling (pytorch-grad-cam min–max
    rescales each map to [0, 1]; apply that yourself to compare).

    Parameters:
        layer (None): module path (``"layer4"``: that module's output) or fx node name;
            ``None`` = :func:`find_cam_layer` (the input of the global pooling).
        relu (True): the standard definition's ReLU; ``False`` keeps the signed sum.

    Returns: ``(B, 1, H, W)`` on ``x``'s device and dtype.
    """
    return _upsample(layer_cam(model, x, targets, layer=layer, relu=relu), x.shape[-2:])


@register("gradcam_pp", family="cam", needs_internals=True, reference=_CHATTOPADHYAY,
          summary="Grad-CAM++: channel weights Σ relu(g)·g²/(2g²+ΣA·g³), closed form")
def gradcam_pp(model: Any, x: torch.Tensor, targets: torch.Tensor, *,
               layer: str | None = None, relu: bool = True) -> torch.Tensor:
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
    return _upsample(layer_cam(model, x, targets, layer=layer, weighting="gradcam_pp",
                               relu=relu), x.shape[-2:])


@register("gradcam_abs", family="cam", needs_internals=True, reference=_KHAKZAR,
          summary="Grad-CAM with abs before channel aggregation: Σ_k |α_k A_k| (diagnostic)")
def gradcam_abs(model: Any, x: torch.Tensor, targets: torch.Tensor, *,
                layer: str | None = None) -> torch.Tensor:
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
    return _upsample(layer_cam(model, x, targets, layer=layer, relu=False, absolute=True),
                     x.shape[-2:])


@register("cumulative_gradcam", family="cam", needs_internals=True, reference=_KHAKZAR,
          summary="Grad-CAM summed over every layer/block output up to the CAM layer (diagnostic)")
def cumulative_gradcam(model: Any, x: torch.Tensor, targets: torch.Tensor, *,
                       layer: str | None = None, relu: bool = True) -> torch.Tensor:
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
    if x.dim() != 4:
        raise UsageError(f"x must be a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    targets = torch.as_tensor(targets, dtype=torch.long, device=x.device).reshape(-1)
    if targets.numel() != x.shape[0]:
        raise UsageError(f"{targets.numel()} targets for a batch of {x.shape[0]} images")
    gm, index = _index(model, x)
    nodes = _cumulative_nodes(index, _resolve(index, layer))
    total = None
    for _, a, g in _run_chunks(model, gm, index, x, targets, nodes):
        m = _upsample(_combine(a, g, "gradcam", relu), x.shape[-2:])
        total = m if total is None else total + m
    return total


def cumulative_layers(model: Any, example: torch.Tensor, layer: str | None = None) -> list[str]:
    """The layers :func:`cumulative_gradcam` sums over, in graph order."""
    _, index = _index(model, example)
    return [index.name(n) for n in _cumulative_nodes(index, _resolve(index, layer))]
