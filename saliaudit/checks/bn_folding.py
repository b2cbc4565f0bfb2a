"""Invariance of FullGrad maps under batch-norm folding (a NeurIPS 2019 review of FullGrad).

Deployment tools fold every eval-mode batch-norm into the convolution (or linear layer) that
feeds it (``torch.nn.utils.fusion.fuse_conv_bn_eval``, TensorRT, ONNX Runtime): with
``z = W∗x + b`` and ``y = γ(z − μ)/σ + β`` (σ = √(var + ε)), the folded layer is

    W' = (γ/σ) W,    b' = γ(b − μ)/σ + β,

and computes the same function. FullGrad, however, sees the network as written down: the
unfolded model has two bias terms, ``∂f/∂z ⊙ b`` (the conv's, absent when it has no bias) and
``∂f/∂y ⊙ (β − γμ/σ)`` (the batch-norm's), each post-processed by ψ as a layer of its own;
the folded model has one, ``∂f/∂y' ⊙ b'``. Since ``y' = y`` and ``∂f/∂z = (γ/σ) ∂f/∂y``
(per channel), the folded term is exactly the sum of the two:

    ∂f/∂y ⊙ b'  =  ∂f/∂y ⊙ (γ/σ) b  +  ∂f/∂y ⊙ (β − γμ/σ)  =  conv term + batch-norm term.

So the folded model's decomposition, and all its ψ maps, follow from the original one by
merging each batch-norm's term with the term of the layer that feeds it (no second model,
no second backward pass; ``tests/test_check_bn_folding.py`` checks this against a really
folded model). The input-gradient term is unchanged (same function), so the decomposition
stays complete. Under ``signed`` ψ the map is the sum of the terms and cannot change; under
``paper``, ``abs``, ``positive``, ``negative`` and ``per-channel`` it can (|a + b| ≠ |a| + |b|,
and one rescale replaces two). A conv without bias has no term of its own: its pair's term
is the batch-norm's, unchanged, so only convs *with* a bias move the map.

Only pairs that a deployment tool would fold are merged: an eval-mode batch-norm with running
statistics whose input is produced by a convolution or linear layer with constant weights,
and used by nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx

from ..cost import CostContext, Passes
from ..graph import get_graph, module_path, op_name
from ..methods.biases import _BN_OPS, _CONV_OPS
from ..methods.fullgrad import BiasTerm, FullGradients
from ..result import CheckResult
from .base import Batch, Check, MapSource, Measurement, Variant, register, small_map
from .similarity import spearman, ssim

__all__ = ["BNFolding", "FoldPair", "folding_pairs", "fold_decomposition"]

_FEEDERS = _CONV_OPS | {"linear", "addmm"}
#: Batch-norm ops whose positional argument 5 is the ``training`` flag.
_TRAINING_ARG = {"batch_norm": 5, "native_batch_norm": 5, "cudnn_batch_norm": 5, "_batch_norm_impl_index": 5}
#: Position of ``eps`` among each batch-norm op's arguments.
_EPS_ARG = {
    "batch_norm": 7,
    "native_batch_norm": 7,
    "cudnn_batch_norm": 7,
    "_batch_norm_impl_index": 7,
    "_native_batch_norm_legit_no_training": 6,
}


@dataclass(frozen=True, eq=False)
class FoldPair:
    """A layer and the batch-norm folded into it (graph node names and module paths).

    ``scale`` is the batch-norm's per-channel factor ``γ/√(var + ε)`` when its parameters are
    graph constants (``None`` otherwise: the terms are then added as tensors).
    """

    producer: str
    bn: str
    label: str
    scale: torch.Tensor | None = None


def _constant(node: Any, memo: dict[torch.fx.Node, bool]) -> bool:
    """Whether a graph value depends on no placeholder (weights, buffers, literals)."""
    if not isinstance(node, torch.fx.Node):
        return True
    if node not in memo:
        memo[node] = node.op != "placeholder" and all(_constant(a, memo) for a in node.all_input_nodes)
    return memo[node]


def _arg(node: torch.fx.Node, i: int, name: str) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _attr(gm: torch.fx.GraphModule, a: Any) -> Any:
    """The value of a ``get_attr`` argument (``None`` stays ``None``); raises KeyError otherwise."""
    if a is None:
        return None
    if isinstance(a, torch.fx.Node) and a.op == "get_attr":
        obj: Any = gm
        for part in str(a.target).split("."):
            obj = getattr(obj, part)
        return obj
    raise KeyError(a)


def _bn_scale(gm: torch.fx.GraphModule, n: torch.fx.Node) -> torch.Tensor | None:
    """``γ/√(var + ε)`` of a batch-norm node, if its parameters are graph constants."""
    try:
        weight, var = _attr(gm, _arg(n, 1, "weight")), _attr(gm, _arg(n, 4, "running_var"))
        eps = _arg(n, _EPS_ARG[op_name(n.target)], "eps")
    except (KeyError, AttributeError):
        return None
    if not isinstance(var, torch.Tensor) or not isinstance(eps, (int, float)):
        return None
    scale = torch.rsqrt(var.detach().double() + float(eps))
    return scale * weight.detach().double() if isinstance(weight, torch.Tensor) else scale


def folding_pairs(gm: torch.fx.GraphModule) -> list[FoldPair]:
    """The (layer, batch-norm) pairs of an ATen graph that folding would merge, in graph order."""
    memo: dict[torch.fx.Node, bool] = {}
    pairs = []
    for n in gm.graph.nodes:
        name = op_name(n.target) if n.op == "call_function" else ""
        if name not in _BN_OPS or not n.args:
            continue
        if name in _TRAINING_ARG and _arg(n, _TRAINING_ARG[name], "training") is not False:
            continue  # training-mode statistics: not a fixed affine map, not foldable
        if _arg(n, 3, "running_mean") is None or _arg(n, 4, "running_var") is None:
            continue
        src = n.args[0]
        if not (
            isinstance(src, torch.fx.Node)
            and src.op == "call_function"
            and op_name(src.target) in _FEEDERS
            and len(src.users) == 1
        ):
            continue
        # the layer's weights and bias must be constants (addmm: bias, input, weight)
        params = [src.args[0], *src.args[2:3]] if op_name(src.target) == "addmm" else list(src.args[1:3])
        if not all(_constant(p, memo) for p in params):
            continue
        pairs.append(FoldPair(src.name, n.name, f"{module_path(src)} + {module_path(n)}", _bn_scale(gm, n)))
    return pairs


class _FoldedTerm(BiasTerm):
    """The folded layer's bias term: the sum of a layer's term and its batch-norm's."""

    def __init__(self, layer: BiasTerm, bn: BiasTerm):
        super().__init__(
            f"{layer.name}+{bn.name}",
            f"{layer.op}+{bn.op}",
            "explicit",
            bn.grad,
            bn.bias,
            bn.spatial,
            None,
            bn.node,
        )
        self._value = layer.value + bn.value

    @property
    def value(self) -> torch.Tensor:
        return self._value


def _fold(layer: BiasTerm, pair: FoldPair, bn: BiasTerm) -> BiasTerm:
    """The folded layer's term ``∂f/∂y ⊙ b'`` with ``b' = (γ/σ) b + (β − γμ/σ)``.

    With per-channel biases and the batch-norm's scale known, the term keeps the per-channel
    form (never materialized; a channel whose gradient is constant over space stays exactly
    constant, as in a really folded model). Otherwise the two terms are added as tensors.
    """
    scale = pair.scale
    if (
        scale is not None
        and layer.channel_bias is not None
        and bn.channel_bias is not None
        and scale.numel() == bn.channel_bias.numel() == layer.channel_bias.numel()
    ):
        cb = scale.to(bn.channel_bias) * layer.channel_bias.to(bn.channel_bias) + bn.channel_bias
        bias = cb.reshape((1, -1) + (1,) * (bn.grad.dim() - 2))
        return BiasTerm(
            f"{layer.name}+{bn.name}",
            f"{layer.op}+{bn.op}",
            "explicit",
            bn.grad,
            bias,
            bn.spatial,
            cb,
            bn.node,
        )
    return _FoldedTerm(layer, bn)


def fold_decomposition(fg: FullGradients, pairs: list[FoldPair]) -> tuple[FullGradients, int]:
    """The decomposition of the batch-norm-folded model, from the unfolded one.

    Returns it and the number of terms actually merged (pairs whose layer has a bias term).
    """
    by_node = {t.node: t for t in fg.bias_terms.values() if t.node is not None}
    layer_for: dict[str, tuple[BiasTerm, FoldPair]] = {}  # batch-norm node -> layer term
    for p in pairs:
        layer, bn = by_node.get(p.producer), by_node.get(p.bn)
        if layer is not None and bn is not None and layer.grad.shape == bn.grad.shape:
            layer_for[p.bn] = (layer, p)
    absorbed = {id(t) for t, _ in layer_for.values()}
    terms: dict[str, BiasTerm] = {}
    for key, t in fg.bias_terms.items():
        if id(t) in absorbed:
            continue  # merged into its batch-norm's term
        if t.node in layer_for:
            folded = _fold(*layer_for[t.node], t)
            terms[folded.name] = folded
        else:
            terms[key] = t  # incl. a batch-norm after a bias-free conv: the folded term as is
    merged = len(layer_for)
    recon = fg.input_term.reshape(fg.input_term.shape[0], -1).sum(1, dtype=torch.float64)
    for t in terms.values():
        recon = recon + t.total()
    f64 = fg.logits.to(torch.float64)
    residual = (f64 - recon).abs() / f64.abs().clamp(min=1e-6)
    return FullGradients(
        fg.input_term, fg.input_gradient, terms, fg.logits, fg.targets, recon, residual, list(fg.unaccounted)
    ), merged


def _values(out: Any) -> torch.Tensor:
    """The per-image values of a similarity function (which may also return flags)."""
    v = out[0] if isinstance(out, tuple) else out
    return torch.as_tensor(v, dtype=torch.float64).reshape(-1)


@register
class BNFolding(Check):
    name = "bn_folding"
    resume_state = ("_figures", "_merged", "_pair_labels")
    title = "Invariance under batch-norm folding"
    summary = (
        "Are the FullGrad maps the same after folding every batch-norm into the "
        "convolution before it, a deployment step that does not change the function? "
        "The folded model's decomposition is the original one with each batch-norm's "
        "bias term merged into its convolution's, so maps whose ψ takes abs or rescales "
        "per layer can change (requested by the NeurIPS 2019 reviews of Srinivas & "
        "Fleuret's FullGrad)."
    )
    reference = (
        "Srinivas & Fleuret, Full-Gradient Representation for Neural Network "
        "Visualization, NeurIPS 2019 (and its reviews); batch-norm folding as in "
        "torch.nn.utils.fusion.fuse_conv_bn_eval"
    )
    metric = "Spearman of |map| before vs after folding"
    thresholds = {"fail": None, "warn": 0.9}
    params = {"tolerance": 1e-3}  # completeness residual the folded decomposition must stay under
    requires = frozenset({"decomposition"})
    compares_psi = False
    short = "bn"
    higher_is_better = True  # a similarity the maps must keep
    order = 70

    def __init__(
        self, params: dict[str, Any] | None = None, thresholds: dict[str, float | None] | None = None
    ):
        super().__init__(params, thresholds)
        self._pairs: dict[int, tuple[Any, list[FoldPair] | None]] = {}
        self._merged = 0
        self._figures: dict[Variant, dict[str, Any]] = {}
        self._pair_labels: list[str] = []  # the folded pairs of the measured model

    def pairs(self, model: Any, example: torch.Tensor | None = None) -> list[FoldPair] | None:
        """The foldable pairs of ``model`` (cached per model); ``None`` without a graph."""
        hit = self._pairs.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1]
        if example is None:
            size = tuple(model.input_size)
            example = torch.zeros((1, 3, *size), device=getattr(model, "device", "cpu"))
        gm = get_graph(model, example)
        pairs = None if gm is None else folding_pairs(gm)
        self._pairs[id(model)] = (model, pairs)
        return pairs

    def skip_reason(self, source: MapSource, model: Any, has_masks: bool) -> str | None:
        reason = super().skip_reason(source, model, has_masks)
        if reason:
            return reason
        try:
            pairs = self.pairs(model)
        except Exception:  # measure() looks again and reports the error in the cell
            return None
        return _no_pairs(pairs)

    def cost(self, ctx: CostContext) -> Passes:
        """One decomposition of the folded model (a forward and backward row)."""
        return Passes(backward=1, compare=2 * ctx.variants)

    def measure(
        self, batch: Batch, source: MapSource, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        pairs = self.pairs(batch.model, batch.x)
        reason = _no_pairs(pairs)
        if reason:
            return {v: Measurement(notes=[reason]) for v in maps}
        self._pair_labels = self._pair_labels or [p.label for p in pairs or []]
        fg = source.decompose(batch.model, batch.x, batch.targets)  # type: ignore[attr-defined]
        folded, merged = fold_decomposition(fg, pairs or [])
        self._merged = max(self._merged, merged)
        after = folded.saliency_maps([v.psi for v in maps])
        out: dict[Variant, Measurement] = {}
        for v, before in maps.items():
            a = after[v.psi].to(before.dtype)
            rho, degenerate = spearman(before, a, absolute=True)
            rho = torch.as_tensor(rho, dtype=torch.float64).reshape(-1)
            s = _values(ssim(before, a))
            flat_b = before.reshape(len(batch), -1).double()
            change = (a.reshape(len(batch), -1).double() - flat_b).abs().sum(1) / flat_b.abs().sum(1).clamp(
                min=1e-12
            )
            notes = []
            n_deg = int(torch.as_tensor(degenerate).sum())
            if n_deg:
                notes.append(
                    f"{n_deg} image(s) with a constant map before or after folding "
                    "(similarity as defined for degenerate maps)"
                )
            out[v] = Measurement(
                values=[float(r) for r in rho],
                images=list(batch.images),
                notes=notes,
                extra={
                    "ssim": [float(x) for x in s],
                    "relative_l1_change": [float(x) for x in change],
                    "residual_before": [float(r) for r in fg.residual],
                    "residual_after": [float(r) for r in folded.residual],
                },
            )
            for i, name in enumerate(batch.images):
                if name in batch.examples:
                    self._figures.setdefault(v, {})[name] = {"folded": small_map(a[i])}
        return out

    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        pairs = list(self._pair_labels)
        series = {
            "folded_pairs": pairs,
            "merged_terms": self._merged,
            "figures": self._figures.get(variant, {}),
        }
        if not m.values:
            reason = m.notes[0] if m.notes else "no image was measured"
            return self.result(variant, m, "skipped", None, reason, **series)
        finite = [x for x in m.values if np.isfinite(x)]
        if not finite:
            return self.result(
                variant,
                m,
                "error",
                None,
                "the similarity before vs after folding is undefined on every image" + _notes(m),
                **series,
            )
        rho = float(np.mean(finite))
        ssim_mean = _mean(m.extra.get("ssim", []))
        change = _mean(m.extra.get("relative_l1_change", []))
        res_after = max(
            (r for r in m.extra.get("residual_after", []) if np.isfinite(r)), default=float("nan")
        )
        tol = float(self.p["tolerance"])
        warn, fail = self.t.get("warn"), self.t.get("fail")
        n = len(finite)
        what = (
            f"folding the {len(pairs)} batch-norm layer(s) into the convolution or linear "
            f"layer that feeds each ({self._merged} of these layers carry a bias of their own)"
        )
        numbers = (
            f"Spearman of |map| before vs after {rho:.3f} (lowest {min(finite):.3f}), "
            f"SSIM {ssim_mean:.3f}, relative L1 change {change:.2g}, on {n} image(s)"
        )
        complete = (
            f"the folded decomposition stays complete (residual ≤ {res_after:.1e})"
            if res_after <= tol
            else f"the folded decomposition is incomplete (residual up to {res_after:.1e} "
            f"> {tol:g}: see the completeness check)"
        )
        changed = (fail is not None and rho < fail) or (warn is not None and rho < warn)
        status = ("fail" if fail is not None and rho < fail else "warn") if changed else "pass"
        if not res_after <= tol and status == "pass":
            status = "warn"
        if changed:
            limit = warn if warn is not None else fail
            below = sum(1 for x in finite if x < limit)
            msg = (
                f"{what}, a deployment step that does not change the function, changes the "
                f"{variant.label} map: {numbers}; {below} of {n} image(s) below {limit:g}. "
                "The map depends on how the network is written down, not only on what it "
                f"computes; {complete}"
            )
        else:
            sign = " (signed ψ: the terms only add up, so the map cannot change)" if variant.signed else ""
            if min(finite) > 1 - 1e-9:
                how = f"leaves the {variant.label} map unchanged{sign}"
            else:
                limit = warn if warn is not None else fail
                how = f"changes the {variant.label} map only slightly" + (
                    f" (similarity ≥ {limit:g})" if limit is not None else ""
                )
            msg = f"{what} {how}: {numbers}; {complete}"
        return self.result(variant, m, status, rho, msg + _notes(m), **series)


def _no_pairs(pairs: list[FoldPair] | None) -> str | None:
    if pairs is None:
        return "the model has no graph (TorchScript): its batch-norm layers cannot be found"
    if not pairs:
        return "the model has no batch-norm that follows a convolution or linear layer: nothing to fold"
    return None


def _mean(xs: list[float]) -> float:
    finite = [x for x in xs if np.isfinite(x)]
    return float(np.mean(finite)) if finite else float("nan")


def _notes(m: Measurement) -> str:
    return ("; " + "; ".join(m.notes)) if m.notes else ""
