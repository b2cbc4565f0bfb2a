"""The bias of every op, explicit or implicit, for the full-gradient decomposition.

Srinivas & Fleuret (NeurIPS 2019) write a network as ``f(x) = ∇ₓf·x + Σ_b ⟨∇_b f, b⟩``. For any
op ``y = g(u₁, …, u_k)`` of the input-dependent values ``uᵢ`` we use the op's *implicit bias*

    b = g(u) − Σᵢ Jᵢ(u)·uᵢ          (what the input-gradient does not account for, §3)

computed exactly by forward-mode AD (one JVP with the inputs themselves as tangents). By a
telescoping argument over the graph, ``f(x) = ∇ₓf·x + Σ_ops ⟨∂f/∂y_op, b_op⟩`` exactly, for any
mix of ops: conv/linear biases (b = the bias), batch-norm (b = β − γμ/√(σ²+ε)), ReLU6 clipping
(b = 6 where it clips), SiLU/GELU/sigmoid (b = σ(z) − σ'(z)z), squeeze-excitation products
(b = −a·s), normalization layers, constants added to activations.

Common ops have closed forms below (cheaper, and exact zeros for linear and positively
homogeneous ops such as ReLU and max-pooling); every other op goes through the JVP. An op that
has no forward-mode derivative is *unaccounted*: the decomposition names it and its share
stays in the completeness residual.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from ..graph import VALUE_FREE_OPS, call_with, dependent_leaves, op_name

__all__ = ["CONSTANT_OPS", "ZERO_BIAS_OPS", "Unaccounted", "bias_of", "bias_kind"]

#: Linear or positively homogeneous ops of their input-dependent arguments: no bias.
ZERO_BIAS_OPS = frozenset(
    {
        "relu",
        "leaky_relu",
        "prelu",
        "_prelu_kernel",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "max_pool2d_with_indices",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "_adaptive_avg_pool2d",
        "adaptive_max_pool2d",
        "adaptive_avg_pool3d",
        "view",
        "reshape",
        "_unsafe_view",
        "flatten",
        "unflatten",
        "permute",
        "transpose",
        "t",
        "contiguous",
        "clone",
        "cat",
        "stack",
        "split",
        "split_with_sizes",
        "chunk",
        "unbind",
        "slice",
        "select",
        "squeeze",
        "unsqueeze",
        "expand",
        "mean",
        "sum",
        "dropout",
        "feature_dropout",
        "alpha_dropout",
        "alias",
        "neg",
        "upsample_nearest2d",
        "upsample_bilinear2d",
        "_upsample_bilinear2d_aa",
        "pixel_shuffle",
        "pixel_unshuffle",
        "channel_shuffle",
        "native_channel_shuffle",
        "roll",
        "flip",
        "narrow",
        "repeat",
        "tile",
        "index_select",
        "gather",
        "getitem",
        "mm",
        "bmm",
        "matmul",
        "einsum",
        "_to_copy",
        "to",
        "type_as",
        "detach",
        "lift_fresh_copy",
        "copy",
        "identity",
    }
)
#: Ops whose output does not depend on the values of their input: the output is a constant.
CONSTANT_OPS = VALUE_FREE_OPS
_PRODUCT_OPS = frozenset({"mm", "bmm", "matmul", "einsum", "mul", "div"})
_CONV_OPS = frozenset(
    {
        "conv1d",
        "conv2d",
        "conv3d",
        "convolution",
        "_convolution",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
    }
)
_BN_OPS = frozenset(
    {
        "batch_norm",
        "_native_batch_norm_legit_no_training",
        "native_batch_norm",
        "_batch_norm_impl_index",
        "cudnn_batch_norm",
    }
)


class Unaccounted(Exception):
    """The bias of this op cannot be computed (no forward-mode derivative)."""


def bias_kind(name: str) -> str:
    """Category of a bias for reporting: explicit, batchnorm, constant or implicit."""
    if name in _CONV_OPS or name in ("linear", "addmm"):
        return "explicit"
    if name in _BN_OPS:
        return "batchnorm"
    if name in ("add", "sub", "rsub"):
        return "constant"
    return "implicit"


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _bn_bias(weight, bias, mean, var, eps: float, ndim: int) -> torch.Tensor | None:
    if mean is None or var is None:
        return None
    b = -mean / torch.sqrt(var + eps)
    if weight is not None:
        b = b * weight
    if bias is not None:
        b = b + bias
    return _channel_view(b.detach(), ndim)


def _closed_form(name: str, args: tuple, dep: list[bool], out: Any) -> tuple[bool, Any]:
    """(handled, bias) for ops with a closed form; ``dep`` is per positional argument."""
    only_first = dep[0] and not any(dep[1:])
    if name in ZERO_BIAS_OPS and (name not in _PRODUCT_OPS or sum(dep) == 1):
        return True, None
    if name in ("mul", "div") and only_first or (name == "mul" and sum(dep) == 1):
        return True, None
    if name in _CONV_OPS and only_first:
        bias = args[2] if len(args) > 2 else None
        return True, None if bias is None else _channel_view(bias.detach(), out.dim())
    if name == "linear" and only_first:
        bias = args[2] if len(args) > 2 else None
        return True, None if bias is None else bias.detach()
    if name == "addmm" and dep[1] and not dep[0] and not dep[2]:
        return True, args[0].detach()
    if name == "batch_norm" and only_first and not args[5]:
        return True, _bn_bias(args[1], args[2], args[3], args[4], args[7], out.dim())
    if name == "_native_batch_norm_legit_no_training" and only_first:
        return True, (_bn_bias(args[1], args[2], args[3], args[4], args[6], out[0].dim()), None, None)
    if name == "native_batch_norm" and only_first and not args[5]:
        return True, (_bn_bias(args[1], args[2], args[3], args[4], args[7], out[0].dim()), None, None)
    if name in ("add", "sub") and sum(dep[:2]) == 1 and len(args) >= 2:
        alpha = args[2] if len(args) > 2 else 1
        other = args[1] if dep[0] else args[0]
        if not isinstance(other, torch.Tensor):
            other = torch.as_tensor(other, dtype=out.dtype, device=out.device)
        if dep[0]:
            return True, (other * alpha if name == "add" else -other * alpha).detach()
        return True, other.detach()  # b + alpha*x (add) or b - alpha*x (sub)
    if name in ("add", "sub") and all(dep[:2]):
        return True, None
    return False, None


def bias_of(target: Any, args: tuple, kwargs: dict, out: Any, dep_mask: list[bool]) -> Any:
    """The implicit bias of one op call (tensor broadcastable to ``out``, tuple, or None).

    ``dep_mask`` flags the flattened ``(args, kwargs)`` leaves that depend on the input.
    Raises :class:`Unaccounted` when the op has no forward-mode derivative.
    """
    name = op_name(target)
    if name in ("cat", "stack", "index_put", "where") and not _all_tensors_dependent(args, dep_mask):
        pass  # a constant joined to input-dependent values (a class token): its bias is itself
    elif not kwargs:
        arg_dep = []
        leaves, _ = _flat_positional(args, dep_mask)
        arg_dep = leaves
        handled, bias = _closed_form(name, args, arg_dep, out)
        if handled:
            return bias
    leaves, spec, positions = dependent_leaves(args, kwargs, dep_mask)
    if not positions:
        return None
    primals = tuple(leaves[i].detach() for i in positions)
    try:
        with torch.no_grad(), fwAD.dual_level():
            duals = tuple(fwAD.make_dual(p, p) for p in primals)
            y = call_with(target, leaves, spec, positions, duals)
            y, tangent = _unpack(y)
    except Exception as err:
        raise Unaccounted(f"{name}: {type(err).__name__}") from err
    if _missing_tangent(y, tangent) and name not in CONSTANT_OPS:
        # no forward-mode derivative (e.g. a custom op with only a backward formula)
        raise Unaccounted(f"{name}: no forward-mode derivative")
    return _subtract(y, tangent)


def _unpack(y: Any) -> tuple[Any, Any]:
    if isinstance(y, torch.Tensor):
        primal, tangent = fwAD.unpack_dual(y)
        return primal, tangent
    if isinstance(y, (tuple, list)):
        pairs = [_unpack(v) for v in y]
        return tuple(p for p, _ in pairs), tuple(t for _, t in pairs)
    return y, None


def _missing_tangent(y: Any, tangent: Any) -> bool:
    if isinstance(y, torch.Tensor):
        return y.is_floating_point() and tangent is None
    if isinstance(y, tuple):
        return any(_missing_tangent(a, b) for a, b in zip(y, tangent))
    return False


def _subtract(y: Any, t: Any) -> Any:
    if isinstance(y, torch.Tensor):
        if not y.is_floating_point():
            return None
        return y if t is None else y - t
    if isinstance(y, (tuple, list)):
        return tuple(_subtract(a, b) for a, b in zip(y, t))
    return None


def _all_tensors_dependent(args: tuple, dep_mask: list[bool]) -> bool:
    from torch.utils._pytree import tree_flatten

    leaves = tree_flatten(args)[0]
    return all(d for leaf, d in zip(leaves, dep_mask) if isinstance(leaf, torch.Tensor))


def _flat_positional(args: tuple, dep_mask: list[bool]) -> tuple[list[bool], int]:
    """Per positional argument: does any of its leaves depend on the input?"""
    from torch.utils._pytree import tree_flatten

    flags: list[bool] = []
    i = 0
    for a in args:
        n = len(tree_flatten(a)[0])
        flags.append(any(dep_mask[i : i + n]))
        i += n
    return flags, i
