"""Which ops of a model's graph the propagation methods have a rule for, and the rules that
make ε-LRP conservative on attention and normalization (Ali et al., ICML 2022).

Guided backprop, ε-LRP and DeepLIFT replace the derivative of element-wise activations
(:mod:`saliaudit.methods.propagation`). A transformer also multiplies two input-dependent
tensors (``q·kᵀ``, ``attention·v``), normalizes by input-dependent statistics (LayerNorm) and
applies a softmax. Before a method runs, :func:`plan_rules` walks the graph backwards from
the logits and finds every op the backward pass reaches (*live*); an op that the method has no
rule for makes it raise :class:`~saliaudit.errors.NotApplicableError` (the audit reports the
method SKIPPED with the reason) instead of silently keeping the op's gradient.

ε-LRP follows Ali, Schnake, Eberle, Montavon, Müller & Wolf, *XAI for Transformers: Better
Explanations through Conservative Propagation*, ICML 2022 (CP-LRP):

* **AH-rule**: in a product of two input-dependent tensors one of which is a softmax output
  (the attention weights ``P`` in ``P·v``), ``P`` is a constant; relevance flows through the
  value path only. Fused ``scaled_dot_product_attention`` runs with ``q`` and ``k`` detached:
  its output ``P·v`` then has ``P`` constant, which is the rule written out
  (``softmax(q·kᵀ·scale)`` detached, then ``·v``).
* **LN-rule**: LayerNorm's normalization factor ``σ = sqrt(Var[x] + ε)`` is a constant; the
  mean-centering stays (it is linear). The same reading applies to GroupNorm, RMSNorm, a
  division by an input-dependent value (the divisor is constant) and a product with an
  ``rsqrt``/``reciprocal`` factor (a LayerNorm written out).
* Gates: in a product with a ``sigmoid``/``hardsigmoid`` output (squeeze-excitation) the
  gate is a constant and the signal takes all relevance (the signal-take-all rule for
  gated interactions: Arras, Montavon, Müller & Samek, WASSA 2017).

With ε → 0 and the identity-ratio rule ``f(z)/z`` at the element-wise activations (GELU …),
the network with these constants is linear in the input, so ε-LRP is its gradient × input and
the relevance sums to the logit up to the biases' share (Ali et al.).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_flatten

from ..errors import NotApplicableError
from ..graph import VALUE_FREE_OPS, get_graph, module_path, op_name
from .scopes import SDPA_OPS

__all__ = [
    "NORM_OPS",
    "SDPA_OPS",
    "SOFTMAX_OPS",
    "RulePlan",
    "plan_rules",
    "require",
    "run_rule_op",
    "unsupported",
]

#: Positions of the two factors of a product (bilinear in them).
PRODUCTS: dict[str, tuple[int, ...]] = {
    **dict.fromkeys(("mul", "matmul", "bmm", "mm", "mv", "dot", "vdot", "outer", "bilinear"), (0, 1)),
    **dict.fromkeys(("linear", "conv1d", "conv2d", "conv3d", "convolution", "_convolution"), (0, 1)),
    **dict.fromkeys(("baddbmm", "addmm", "addbmm", "addmv", "addcmul", "addr"), (1, 2)),
}
#: Numerator and divisor positions of a division.
DIVISIONS: dict[str, tuple[int, int]] = {"div": (0, 1), "true_divide": (0, 1), "addcdiv": (1, 2)}
SOFTMAX_OPS = frozenset({"softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax"})
#: Normalizations by input-dependent statistics; ε-LRP has the LN-rule for the first five.
LN_RULE_OPS = frozenset({"layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "rms_norm"})
NORM_OPS = LN_RULE_OPS | {"instance_norm", "_fused_rms_norm", "local_response_norm"}
#: Other element-wise non-linear ops none of the three methods has a rule for (activation
#: functions are in ``propagation.NONLINEAR_OPS``; max-pooling keeps its gradient).
NO_RULE_OPS = frozenset(
    {"exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "reciprocal"}
    | {"pow", "square", "logsumexp", "var", "std", "var_mean", "std_mean", "norm", "linalg_vector_norm"}
    | {"sin", "cos", "erf", "prod", "cumprod"}
)
#: Ops through which a value stays "the same tensor" when looking for a factor's origin.
_PASS_OPS = frozenset(
    {"view", "reshape", "_unsafe_view", "expand", "expand_as", "transpose", "t", "permute", "contiguous"}
    | {"clone", "to", "_to_copy", "type_as", "dropout", "native_dropout", "alias", "detach", "getitem"}
    | {"unsqueeze", "squeeze", "select", "slice", "narrow", "flatten", "unflatten", "unbind", "split"}
    | {"split_with_sizes", "chunk", "repeat", "repeat_interleave", "masked_fill", "mul", "div"}
    | {"lift_fresh_copy"}
)
#: Origins of a factor that ε-LRP takes as a constant, and the rule that says so.
_CONSTANT_ORIGINS = {
    **dict.fromkeys(("softmax", "_softmax", "_safe_softmax"), "AH-rule"),
    **dict.fromkeys(("sigmoid", "hardsigmoid"), "gate"),
    **dict.fromkeys(("rsqrt", "reciprocal"), "LN-rule"),
}
METHOD_LABELS = {"guided": "guided backprop", "epsilon": "ε-LRP", "rescale": "DeepLIFT (Rescale)"}

Key = tuple  # ("a", i), ("k", name) or ("l", i, j): where an argument sits in (args, kwargs)


@dataclass
class RulePlan:
    """The graph analysed for one method: the factors ε-LRP takes as constants (``cuts``:
    node → argument keys), the ops run with the LN-rule (``norms``) and the live nodes."""

    cuts: dict[torch.fx.Node, set[Key]] = field(default_factory=dict)
    norms: set[torch.fx.Node] = field(default_factory=set)
    live: set[torch.fx.Node] = field(default_factory=set)
    problem: str | None = None


def dependent_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes whose value depends on the first input (statically, as ``GraphRunner`` does)."""
    first = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    dep = {first} if first is not None else set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or op_name(n.target) in VALUE_FREE_OPS:
            continue
        if any(a in dep for a in n.all_input_nodes):
            val = n.meta.get("val", torch.empty(0))
            if any(isinstance(v, torch.Tensor) for v in tree_flatten(val)[0]):
                dep.add(n)
    return dep


def _arg(node: torch.fx.Node, i: int) -> tuple[Key, Any]:
    """The ``i``-th schema argument of ``node`` and where it sits."""
    if i < len(node.args):
        return ("a", i), node.args[i]
    schema = getattr(node.target, "_schema", None)
    if schema is not None and i < len(schema.arguments):
        name = schema.arguments[i].name
        if name in node.kwargs:
            return ("k", name), node.kwargs[name]
    return ("a", i), None


def _named(node: torch.fx.Node, name: str) -> tuple[Key, Any]:
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    if name in node.kwargs:
        return ("k", name), node.kwargs[name]
    if name in names and names.index(name) < len(node.args):
        return ("a", names.index(name)), node.args[names.index(name)]
    return ("k", name), None


def factors(node: torch.fx.Node, dep: set[torch.fx.Node]) -> list[tuple[Key, torch.fx.Node]]:
    """The input-dependent factors of a product node, with their keys."""
    name = op_name(node.target)
    if name == "einsum":
        _, ops = _arg(node, 1)
        return [(("l", 1, j), a) for j, a in enumerate(ops or []) if a in dep]
    out = []
    for i in PRODUCTS.get(name, ()):
        key, a = _arg(node, i)
        if isinstance(a, torch.fx.Node) and a in dep:
            out.append((key, a))
    return out


def _origin(node: torch.fx.Node, dep: set[torch.fx.Node]) -> str:
    """The op a factor comes from, through shape ops and constant scalings."""
    for _ in range(64):
        name = op_name(node.target) if node.op == "call_function" else node.op
        inputs = [a for a in node.all_input_nodes if a in dep]
        if name not in _PASS_OPS or len(inputs) != 1:
            return name
        if name == "div" and node.args[0] is not inputs[0]:
            return name  # a constant divided by the value is not the value
        node = inputs[0]
    return ""


def _divisor(node: torch.fx.Node, dep: set[torch.fx.Node]) -> tuple[Key, torch.fx.Node] | None:
    pos = DIVISIONS.get(op_name(node.target))
    if pos is None:
        return None
    key, a = _arg(node, pos[1])
    return (key, a) if isinstance(a, torch.fx.Node) and a in dep else None


def _sdpa_scores(node: torch.fx.Node) -> list[tuple[Key, Any]]:
    """Query, key and mask of a fused attention op: what only shapes the weights ``P``."""
    return [_arg(node, 0), _arg(node, 1), _named(node, "attn_mask"), _named(node, "attn_bias")]


def _live(gm: torch.fx.GraphModule, dep: set, cuts: dict) -> set[torch.fx.Node]:
    """Dependent nodes that the backward pass from the logits reaches, past the cuts."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = [a for a in tree_flatten(out.args)[0] if isinstance(a, torch.fx.Node)]
    inplace: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for n in gm.graph.nodes:  # readers of a value mutated in place read the mutating op
        name = op_name(n.target)
        if n.op == "call_function" and name.endswith("_") and not name.startswith("_") and n.args:
            if isinstance(n.args[0], torch.fx.Node):
                inplace.setdefault(n.args[0], []).append(n)
    live: set[torch.fx.Node] = set()
    stack = [leaves[0]] if leaves and leaves[0] in dep else []
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack += [m for m in inplace.get(n, ()) if m in dep]
        cut = cuts.get(n, set())
        for key, a in _inputs(n):
            if a in dep and key not in cut:
                stack.append(a)
    return live


def _inputs(n: torch.fx.Node) -> Iterator[tuple[Key, torch.fx.Node]]:
    for i, a in enumerate(n.args):
        if isinstance(a, torch.fx.Node):
            yield ("a", i), a
        elif isinstance(a, (list, tuple)):
            for j, b in enumerate(a):
                if isinstance(b, torch.fx.Node):
                    yield ("l", i, j), b
    for k, a in n.kwargs.items():
        for b in tree_flatten(a)[0]:
            if isinstance(b, torch.fx.Node):
                yield ("k", k), b


def plan_rules(gm: torch.fx.GraphModule, rule: str) -> RulePlan:
    """Analyse ``gm`` for ``rule`` (``guided``, ``epsilon`` or ``rescale``); ``problem`` says
    which live op the method has no rule for (``None``: it runs)."""
    dep = dependent_nodes(gm)
    plan = RulePlan()
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n in dep]
    if rule == "epsilon":
        for n in calls:
            name = op_name(n.target)
            fs = factors(n, dep)
            if len(fs) >= 2:
                const = {k for k, a in fs if _origin(a, dep) in _CONSTANT_ORIGINS}
                if const and len(const) < len(fs):
                    plan.cuts[n] = const
            elif (div := _divisor(n, dep)) is not None:
                plan.cuts[n] = {div[0]}
            elif name in SDPA_OPS:
                plan.cuts[n] = {k for k, a in _sdpa_scores(n) if a in dep}
            elif name in LN_RULE_OPS and hasattr(n.target, "_schema"):
                plan.norms.add(n)
    plan.live = _live(gm, dep, plan.cuts)
    found: dict[str, str] = {}  # what has no rule -> its first op, in graph order
    for n in calls:
        what = _no_rule(n, rule, dep, plan.cuts.get(n, set()), n in plan.norms) if n in plan.live else None
        if what and what not in found:
            where = module_path(n)
            found[what] = f"{op_name(n.target)} in {where}" if where != n.name else op_name(n.target)
    if found:
        parts = [f"{what} ({at})" for what, at in found.items()]
        plan.problem = f"{METHOD_LABELS[rule]} has no rule for " + "; nor for ".join(parts)
    return plan


def _no_rule(n: torch.fx.Node, rule: str, dep: set, cut: set, ln_rule: bool) -> str | None:
    """What about live node ``n`` the method ``rule`` has no rule for; ``None``: it has one."""
    name = op_name(n.target)
    if name in SOFTMAX_OPS:
        return "softmax" if rule != "epsilon" else "a softmax that does not weight a product"
    if name in SDPA_OPS and rule != "epsilon":
        return "attention (a softmax of a product of two input-dependent tensors)"
    if rule == "guided":  # the gradient at every other op, as Springenberg et al. define it
        return None
    if len([k for k, a in factors(n, dep) if k not in cut]) >= 2:
        return "the product of two input-dependent tensors"
    div = _divisor(n, dep)
    if div is not None and div[0] not in cut:
        return "a division by an input-dependent value"
    if name in NORM_OPS and not ln_rule:
        return "a normalization by input-dependent statistics"
    if name in NO_RULE_OPS:
        return f"the non-linear op {name}"
    return None


def require(plan: RulePlan) -> None:
    """Raise :class:`NotApplicableError` when the plan found an op without a rule."""
    if plan.problem:
        raise NotApplicableError(
            plan.problem,
            hint="choose another method (an audit reports this one as skipped); 'Propagation "
            "methods on transformers' in docs/methods.md lists the rules of each",
        )


def unsupported(rule: str) -> Callable[[Any, torch.Tensor], str | None]:
    """The registry's ``unsupported`` question for ``rule``: the ops it has no rule for on a
    model (``None`` for TorchScript, which the audit skips for lack of a graph)."""

    def ask(model: Any, x: torch.Tensor) -> str | None:
        gm = get_graph(model, x)
        return None if gm is None else plan_rules(gm, rule).problem

    return ask


# ------------------------------------------------------------------------- ε-LRP at run time


def detach_keys(args: tuple, kwargs: dict, keys: set[Key]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the tensors at ``keys`` detached (taken as constants)."""
    args, kwargs = list(args), dict(kwargs)
    for key in keys:
        if key[0] == "a" and key[1] < len(args):
            args[key[1]] = _detach(args[key[1]])
        elif key[0] == "k" and key[1] in kwargs:
            kwargs[key[1]] = _detach(kwargs[key[1]])
        elif key[0] == "l":
            seq = list(args[key[1]])
            seq[key[2]] = _detach(seq[key[2]])
            args[key[1]] = seq
    return tuple(args), kwargs


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


def _bind(target: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Argument name → value (defaults filled in) of an ATen call."""
    out = {}
    for i, a in enumerate(target._schema.arguments):
        if i < len(args) and not a.kwarg_only:
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _ln_rule(x: torch.Tensor, dims: tuple[int, ...], eps: float, center: bool = True) -> torch.Tensor:
    """``(x − mean) / σ`` over ``dims`` with ``σ`` a constant (without the mean for RMSNorm)."""
    xc = x - x.mean(dims, keepdim=True) if center else x
    second = (xc * xc).mean(dims, keepdim=True)
    return xc / (second + eps).sqrt().detach()


def run_norm(target: Any, args: tuple, kwargs: dict) -> Any:
    """A normalization op whose value is the op's own and whose gradient is the LN-rule's."""
    exact = target(*args, **kwargs)
    b = _bind(target, args, kwargs)
    x = b["input"]
    name = op_name(target)
    if name in ("layer_norm", "native_layer_norm", "rms_norm"):
        dims = tuple(range(-len(b["normalized_shape"]), 0))
        eps = b["eps"] if b["eps"] is not None else torch.finfo(x.dtype).eps
        y = _ln_rule(x, dims, eps, center=name != "rms_norm")
        w, bias = b["weight"], b.get("bias")
    else:  # group_norm, native_group_norm: (N, C, *) in groups of channels
        groups = b["num_groups"] if name == "group_norm" else b["group"]
        n, c = x.shape[0], x.shape[1]
        y = _ln_rule(x.reshape(n, groups, -1), (-1,), b["eps"]).reshape(x.shape)
        shape = (1, c) + (1,) * (x.dim() - 2)
        w = None if b["weight"] is None else b["weight"].reshape(shape)
        bias = None if b["bias"] is None else b["bias"].reshape(shape)
    if w is not None:
        y = y * w
    if bias is not None:
        y = y + bias
    if isinstance(exact, tuple):
        return (y + (exact[0] - y).detach(), *exact[1:])
    return y + (exact - y).detach()


def run_rule_op(plan: RulePlan, node: torch.fx.Node, target: Any, args: tuple, kwargs: dict) -> Any | None:
    """Run ``node`` under ε-LRP's attention and normalization rules; ``None`` when none
    applies (the caller runs it as usual)."""
    if node in plan.cuts:
        args, kwargs = detach_keys(args, kwargs, plan.cuts[node])
        return target(*args, **kwargs)
    if node in plan.norms:
        return run_norm(target, args, kwargs)
    return None
