"""A graph-level view of a classifier, shared by the methods that need every op.

Saliency methods that must account for every operation (FullGrad's implicit biases, and the
modified-gradient rules of guided backprop, ε-LRP and DeepLIFT) cannot rely on module hooks:
functional calls (``F.relu``, ``x * s`` in squeeze-excitation, ``out += identity``) have no
module, and torchvision reuses one ``ReLU`` module several times per block. We therefore work
on the ATen graph that :func:`torch.export.export` produces (a ``.pt2`` already is one), and run
it with :class:`GraphRunner`, an :class:`torch.fx.Interpreter` that

* tracks which values depend on the input image (everything else is a constant: weights,
  buffers, shapes),
* runs in-place ops functionally (autograd and forward-mode AD need unmutated inputs), and
* tracks the memory layout of each 4-D value (``NCHW``, or ``NHWC`` after a permute, as in
  ConvNeXt), so a per-op quantity can be drawn as a map over the image.

The user's module is never modified: export reads it, and dtype or device conversions are
made on copies of the graph.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import DecompositionError

__all__ = ["GraphRunner", "get_graph", "module_path", "op_name"]

#: Ops whose 4-D output is laid out NCHW whatever their input was.
_NCHW_OPS = frozenset(
    {
        "conv2d",
        "convolution",
        "_convolution",
        "conv_transpose2d",
        "max_pool2d",
        "max_pool2d_with_indices",
        "avg_pool2d",
        "adaptive_avg_pool2d",
        "adaptive_max_pool2d",
        "upsample_bilinear2d",
        "upsample_nearest2d",
        "_adaptive_avg_pool2d",
    }
)
#: Ops that rename dimensions: the layout follows the permutation.
_SHAPE_OPS = frozenset({"view", "reshape", "_unsafe_view", "expand", "flatten", "unflatten"})

#: Ops whose output does not depend on the values of their input (only on its shape).
VALUE_FREE_OPS = frozenset(
    {
        "zeros_like",
        "ones_like",
        "full_like",
        "empty_like",
        "new_zeros",
        "new_ones",
        "new_full",
        "new_empty",
        "scalar_tensor",
        "sym_size",
    }
)

_GRAPH_CACHE: dict[int, dict[Any, torch.fx.GraphModule]] = {}


def _cache_for(obj: Any) -> dict[Any, torch.fx.GraphModule]:
    """Per-object graph cache keyed by identity (LoadedModel is unhashable), freed with it."""
    key = id(obj)
    if key not in _GRAPH_CACHE:
        try:
            weakref.finalize(obj, _GRAPH_CACHE.pop, key, None)
        except TypeError:  # not weak-referenceable: do not cache
            return {}
        _GRAPH_CACHE[key] = {}
    return _GRAPH_CACHE[key]


def op_name(target: Any) -> str:
    """Short ATen name of a call target: ``aten.relu_.default`` -> ``relu_``."""
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return str(packet.__name__).split(".")[-1]
    return getattr(target, "__name__", str(target))


def _functional(target: Any) -> tuple[Any, bool]:
    """The out-of-place variant of an in-place ATen op, and whether a swap happened."""
    name = op_name(target)
    if not hasattr(target, "overloadpacket") or not name.endswith("_") or name.startswith("_"):
        return target, False
    packet = getattr(torch.ops.aten, name[:-1], None)
    if packet is None:
        return target, False
    overload = getattr(packet, target._overloadname, None)
    return (overload, True) if overload is not None else (target, False)


def module_path(node: torch.fx.Node) -> str:
    """The dotted path of the innermost ``nn.Module`` that produced ``node`` (or its name)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        path = str(path)
        # torch.export records paths such as "L['self'].layer1[0].conv1" or "layer1.0.conv1".
        for junk in ("L['self'].", "L['self']", "L__self__."):
            path = path.replace(junk, "")
        path = path.replace("[", ".").replace("]", "").strip(".")
        if path:
            return path
    return node.name


def _export(module: torch.nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """Export ``module`` with a dynamic batch dimension if it allows one, else a static one."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    example2 = example[:1].expand(2, *example.shape[1:]).clone()
    errors = []
    for args, dyn in (((example2,), ({0: batch},)), ((example,), None)):
        try:
            ep = torch.export.export(module, args, dynamic_shapes=dyn, strict=False)
            return ep.module()
        except Exception as err:  # export raises many kinds; we report them together
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    raise DecompositionError(
        "torch.export could not capture the model graph (" + "; ".join(errors) + ")",
        hint="export it yourself with torch.export.export and pass the .pt2",
    )


def get_graph(model: Any, example: torch.Tensor) -> torch.fx.GraphModule | None:
    """The ATen graph of ``model`` in ``example``'s dtype and device, cached per model.

    ``model`` is a :class:`~saliaudit.model.LoadedModel` or an ``nn.Module``. Returns ``None``
    for TorchScript modules, whose internals cannot be captured. Conversions happen on a copy.
    """
    key_obj = model
    module = getattr(model, "module", model)
    exported = getattr(model, "exported", None)
    if isinstance(module, torch.jit.ScriptModule) or isinstance(module, torch.jit.ScriptFunction):
        return None
    cache = _cache_for(key_obj)
    key = (example.dtype, example.device)
    if key in cache:
        return cache[key]
    base = cache.get("base")
    if base is None:
        if exported is not None:
            base = exported.module()
        elif isinstance(module, torch.fx.GraphModule) and _is_aten_graph(module):
            base = module
        else:
            if module.training:
                module = copy.deepcopy(module).eval()
            base = _export(module, example)
        cache["base"] = base
    gm = base
    params = list(base.parameters()) + list(base.buffers())
    floating = [p for p in params if p.is_floating_point()]
    if floating and (floating[0].dtype != example.dtype or floating[0].device != example.device):
        gm = copy.deepcopy(base)
        gm.to(device=example.device)
        for t in list(gm.parameters()) + list(gm.buffers()):
            if t.is_floating_point():
                t.data = t.data.to(example.dtype)
    cache[key] = gm
    return gm


def _is_aten_graph(gm: torch.fx.GraphModule) -> bool:
    return any(hasattr(n.target, "overloadpacket") for n in gm.graph.nodes)


class GraphRunner(torch.fx.Interpreter):
    """Runs an ATen graph, tracking input dependence and layouts, with a per-op callback.

    Args:
        gm: the graph module (from :func:`get_graph`).
        on_op: called as ``on_op(node, target, args, kwargs, out, dep_mask)`` after every op
            whose output depends on the input, where ``dep_mask`` lists, for the flattened
            ``(args, kwargs)``, which leaves depend on the input. Its return value is ignored.
        run_op: optional replacement for calling ``target(*args, **kwargs)`` on dependent ops
            (used by modified-gradient methods); receives ``(node, target, args, kwargs)``.
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        on_op: Callable[..., None] | None = None,
        run_op: Callable[..., Any] | None = None,
    ):
        super().__init__(gm, garbage_collect_values=True)
        self.on_op = on_op
        self.run_op = run_op
        self.dependent: set[torch.fx.Node] = set()
        self.layouts: dict[torch.fx.Node, str] = {}
        self._first_input = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)

    def nodes(self) -> Iterator[torch.fx.Node]:
        return iter(self.module.graph.nodes)

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "call_module" and str(n.target).startswith("_guards"):
            return None
        if n.op == "placeholder":
            out = super().run_node(n)
            if n is self._first_input:
                self.dependent.add(n)
                if isinstance(out, torch.Tensor) and out.dim() == 4:
                    self.layouts[n] = "NCHW"
            return out
        if n.op == "get_attr":
            # weights and buffers are constants here: detaching them keeps autograd from
            # computing weight gradients, without touching the module's requires_grad flags
            out = super().run_node(n)
            return out.detach() if isinstance(out, torch.Tensor) else out
        if n.op != "call_function":
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
        node_leaves, _ = tree_flatten((n.args, n.kwargs))
        dep_mask = [isinstance(a, torch.fx.Node) and a in self.dependent for a in node_leaves]
        dep = any(dep_mask) and op_name(n.target) not in VALUE_FREE_OPS
        # in-place ops on input-dependent values run functionally (autograd and forward-mode
        # AD need unmutated inputs); the others as written (a mask filled slice by slice)
        target, inplace = _functional(n.target) if dep else (n.target, False)
        if dep and self.run_op is not None:
            out = self.run_op(n, target, args, kwargs)
        else:
            out = target(*args, **kwargs)
        if inplace and isinstance(n.args[0], torch.fx.Node) and n.args[0] in self.env:
            self.env[n.args[0]] = out  # later readers of the mutated value see the result
        if dep and not _has_tensor(out):  # a shape (sym_size) carries no value of the image
            dep = False
        if dep:
            self.dependent.add(n)
            self._track_layout(n, args, out)
            if self.on_op is not None:
                self.on_op(n, target, args, kwargs, out, dep_mask)
        return out

    def _track_layout(self, n: torch.fx.Node, args: tuple, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
                src = _first_dep_input(n, self.dependent)
                if src is not None and src in self.layouts and out[0].dim() == 4:
                    self.layouts[n] = self.layouts[src]
            elif op_name(n.target) == "getitem" and isinstance(out, torch.Tensor):
                src = n.args[0]
                if isinstance(src, torch.fx.Node) and src in self.layouts and out.dim() == 4:
                    self.layouts[n] = self.layouts[src]
            return
        name = op_name(n.target)
        src = _first_dep_input(n, self.dependent)
        src_layout = self.layouts.get(src) if src is not None else None
        if name in _NCHW_OPS:
            self.layouts[n] = "NCHW"
        elif name in ("permute", "permute_copy") and src_layout:
            self.layouts[n] = "".join(src_layout[d % 4] for d in args[1])
        elif name in ("transpose", "transpose_copy") and src_layout:
            d0, d1 = args[1] % 4, args[2] % 4
            lay = list(src_layout)
            lay[d0], lay[d1] = lay[d1], lay[d0]
            self.layouts[n] = "".join(lay)
        elif name in _SHAPE_OPS:
            src_val = self.env.get(src) if src is not None else None
            if src_layout and isinstance(src_val, torch.Tensor) and src_val.shape == out.shape:
                self.layouts[n] = src_layout
        elif src_layout:
            self.layouts[n] = src_layout


def _has_tensor(out: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in tree_flatten(out)[0])


def _first_dep_input(n: torch.fx.Node, dependent: set[torch.fx.Node]) -> torch.fx.Node | None:
    for a in n.all_input_nodes:
        if a in dependent:
            return a
    return None


def dependent_leaves(args: tuple, kwargs: dict, dep_mask: list[bool]) -> tuple[list, Any, list[int]]:
    """Flatten ``(args, kwargs)``; return the leaves, the spec and the dependent positions."""
    leaves, spec = tree_flatten((args, kwargs))
    positions = [i for i, d in enumerate(dep_mask) if d and isinstance(leaves[i], torch.Tensor)]
    return leaves, spec, positions


def call_with(
    target: Any, leaves: list, spec: Any, positions: list[int], values: tuple[torch.Tensor, ...]
) -> Any:
    """Call ``target`` with the dependent leaves at ``positions`` replaced by ``values``."""
    leaves = list(leaves)
    for i, v in zip(positions, values):
        leaves[i] = v
    a, k = tree_unflatten(leaves, spec)
    return target(*a, **k)
