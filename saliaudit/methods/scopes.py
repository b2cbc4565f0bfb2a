"""Token mixers as single ops of the full-gradient decomposition.

Inside an attention module the values are not laid out per image: torchvision's
``MultiheadAttention`` works on ``(T, B, C)`` and merges the batch with the heads
(``(B·heads, T, d)``), Swin merges it with the windows (``(B·windows, 49, C)``), and the
attention weights ``(B, heads, T, T)`` belong to two tokens at once. Such a module is taken as
*one* op ``y = g(u)`` of the decomposition: its implicit bias ``b = g(u) − J(u)·u`` (Srinivas &
Fleuret 2019, §3, with every input-dependent value ``u`` entering the module as tangent) is
computed by one forward-mode pass over the module's ops and lives on its output, which is laid
out per image (``(B, T, C)`` or ``(B, H, W, C)``). The telescoping argument of
:mod:`saliaudit.methods.biases` holds for ops of any size, so the decomposition stays exact:
the module's explicit biases (query, key, value and output projections), the products of two
input-dependent tensors (``q·kᵀ``, ``attention·v``: bias ``−a·b``) and the softmax are all in
its bias.

A *scope* is the innermost module (from the graph's ``nn_module_stack``) holding a softmax or
a fused attention op, or a value whose batch dimension is not its first, alone; when the
module's own output is not per image either, its parent is taken.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.fx
from torch.utils._pytree import tree_flatten, tree_map

from ..graph import VALUE_FREE_OPS, op_name

__all__ = ["MIXER_OPS", "SDPA_OPS", "Scope", "find_scopes", "sdpa_math"]

#: Fused attention ops (``F.scaled_dot_product_attention`` and its kernels).
SDPA_OPS = frozenset(
    {
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_attention_math",
    }
)
#: Ops that mix tokens through input-dependent weights (attention).
MIXER_OPS = frozenset({"softmax", "_softmax", "_safe_softmax"}) | SDPA_OPS


def _stack(node: torch.fx.Node) -> list[str]:
    """Module keys from the outermost to the innermost that produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    return [str(v[0]) for v in stack.values()]


def _batch_symbol(gm: torch.fx.GraphModule) -> Any:
    """The batch size of the graph's input: a symbol (dynamic batch), an int (a graph exported
    with a static batch), or None."""
    x = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    val = x.meta.get("val") if x is not None else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    first = val.shape[0]
    return first if isinstance(first, torch.SymInt) else int(first)


def _per_image(val: Any, batch: Any) -> bool:
    """Is the (fake) value laid out per image: batch first, and nowhere else? With a static
    batch only the first dimension can be checked."""
    if batch is None or not isinstance(val, torch.Tensor) or val.dim() == 0:
        return True
    if isinstance(batch, int):
        return int(val.shape[0]) == batch
    sym = batch.node.expr
    first = val.shape[0]
    if not (isinstance(first, torch.SymInt) and first.node.expr == sym):
        return False
    return not any(isinstance(d, torch.SymInt) and sym in d.node.expr.free_symbols for d in val.shape[1:])


def _touches_batch(val: Any, batch: Any) -> bool:
    if batch is None or not isinstance(val, torch.Tensor):
        return False
    if isinstance(batch, int):
        return True  # with a static batch every input-dependent value is a candidate
    sym = batch.node.expr
    return any(isinstance(d, torch.SymInt) and sym in d.node.expr.free_symbols for d in val.shape)


def _input_dependent(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """The nodes whose values depend on the input image's values (not only on its shape)."""
    x = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    dep: set[torch.fx.Node] = {x} if x is not None else set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and op_name(n.target) not in VALUE_FREE_OPS:
            if any(a in dep for a in n.all_input_nodes):
                dep.add(n)
    return dep


class Scope:
    """One module taken as a single op: its nodes (graph order), inputs and outputs."""

    def __init__(self, key: str, nodes: list[torch.fx.Node]):
        self.key, self.nodes = key, nodes
        members = set(nodes)
        self.inputs = [a for n in nodes for a in n.all_input_nodes if a not in members]
        self.inputs = list(dict.fromkeys(self.inputs))
        self.outputs = [n for n in nodes if any(u not in members for u in n.users)]
        self.first = nodes[0]

    def __repr__(self) -> str:
        return f"Scope({self.key!r}, {len(self.nodes)} ops, outputs={[o.name for o in self.outputs]})"


def find_scopes(gm: torch.fx.GraphModule) -> list[Scope]:
    """The token-mixing scopes of a graph (module docstring), in graph order."""
    batch = _batch_symbol(gm)
    dependent = _input_dependent(gm)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    stacks = {n: _stack(n) for n in calls}
    wanted: set[str] = set()
    for n in calls:
        st = stacks[n]
        if not st:
            continue
        mixer = op_name(n.target) in MIXER_OPS
        val = n.meta.get("val")
        strange = n in dependent and _touches_batch(val, batch) and not _per_image(val, batch)
        if mixer or strange:
            wanted.add(st[-1])
    # widen a scope whose outputs are not per image to its parent, until they are
    for _ in range(8):
        changed = False
        for key in sorted(wanted):
            nodes = [n for n in calls if key in stacks[n]]
            scope = Scope(key, nodes)
            bad = [o for o in scope.outputs if not _per_image(o.meta.get("val"), batch)]
            if bad:
                parent = next(
                    (st[st.index(key) - 1] for st in map(stacks.get, nodes) if st.index(key) > 0), None
                )
                if parent is not None:
                    wanted.discard(key)
                    wanted.add(parent)
                    changed = True
        if not changed:
            break
    # keep the outermost of nested scopes
    keys = [k for k in wanted if not any(k != o and _inside(k, o, stacks) for o in wanted)]
    scopes = [Scope(k, [n for n in calls if k in stacks[n]]) for k in keys]
    return sorted(scopes, key=lambda s: calls.index(s.first))


def _inside(inner: str, outer: str, stacks: dict[torch.fx.Node, list[str]]) -> bool:
    return any(outer in st and inner in st and st.index(outer) < st.index(inner) for st in stacks.values())


def sdpa_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``softmax(q·kᵀ·scale + mask)·v`` written with ops that have forward-mode derivatives
    (``F.scaled_dot_product_attention`` has none); dropout is off (the audit runs in eval)."""
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    a = torch.matmul(q, k.transpose(-2, -1)) * s
    if is_causal:
        lq, lk = q.shape[-2], k.shape[-2]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        a = a.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        a = a.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else a + attn_mask
    return torch.matmul(torch.softmax(a, dim=-1), v)


def _sdpa_call(name: str, args: tuple, kwargs: dict) -> Any:
    if name == "scaled_dot_product_attention":
        return sdpa_math(*args, **kwargs)
    q, k, v = args[:3]
    rest = list(args[3:])
    dropout = rest[0] if rest else kwargs.get("dropout_p", 0.0)
    causal = rest[1] if len(rest) > 1 else kwargs.get("is_causal", False)
    out = sdpa_math(q, k, v, kwargs.get("attn_mask"), dropout, causal, kwargs.get("scale"))
    return (out, None)  # the other outputs (log-sum-exp, ...) are never read in eval graphs


def scope_biases(
    scope: Scope, env: dict[torch.fx.Node, Any], dependent: set[torch.fx.Node], fetch: Any = None
) -> dict:
    """``{output node: b}`` with ``b = y − J·u`` of the scope (module docstring), from the
    values of its inputs in ``env``; raises ``KeyError`` when an input is not available."""
    from ..graph import _functional

    local: dict[torch.fx.Node, Any] = {}
    with torch.no_grad(), fwAD.dual_level():
        for a in scope.inputs:
            if a not in env and a.op == "get_attr" and fetch is not None:
                val = fetch(a.target)  # a weight the graph reads only later
                val = val.detach() if isinstance(val, torch.Tensor) else val
            else:
                val = env[a]
            if a in dependent and isinstance(val, torch.Tensor) and val.is_floating_point():
                val = fwAD.make_dual(val.detach(), val.detach())
            local[a] = val
        live = {a for a in scope.inputs if a in dependent}
        for n in scope.nodes:
            args = tree_map(lambda a: local[a] if isinstance(a, torch.fx.Node) else a, n.args)
            kwargs = tree_map(lambda a: local[a] if isinstance(a, torch.fx.Node) else a, n.kwargs)
            dep = any(a in live for a in n.all_input_nodes) and op_name(n.target) not in VALUE_FREE_OPS
            # as in the graph runner: only input-dependent in-place ops run functionally
            target = _functional(n.target)[0] if dep else n.target
            if dep:
                live.add(n)
            name = op_name(target)
            if name in SDPA_OPS:
                out = _sdpa_call(name, args, kwargs)
            else:
                out = target(*args, **kwargs)
            local[n] = out
            inplace = target is not n.target
            if inplace and n.args and isinstance(n.args[0], torch.fx.Node):
                local[n.args[0]] = out
        result = {}
        for o in scope.outputs:
            result[o] = _bias(local[o])
    return result


def _bias(y: Any) -> Any:
    if isinstance(y, torch.Tensor):
        if not y.is_floating_point():
            return None
        primal, tangent = fwAD.unpack_dual(y)
        return primal if tangent is None else (primal - tangent)
    if isinstance(y, (tuple, list)):
        return tuple(_bias(v) for v in y)
    return None


def nodes_of(scopes: list[Scope]) -> dict[torch.fx.Node, Scope]:
    """Every node of every scope, to its scope."""
    return {n: s for s in scopes for n in s.nodes}


def flat_tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]
