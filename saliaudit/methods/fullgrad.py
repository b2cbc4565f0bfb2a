"""FullGrad: the full-gradient decomposition and its saliency maps.

Srinivas & Fleuret, *Full-Gradient Representation for Neural Network Visualization*,
NeurIPS 2019. For a target logit ``f``::

    f(x) = Σ ∇ₓf ⊙ x  +  Σ_ops Σ ∂f/∂y_op ⊙ b_op           (completeness)

where ``b_op`` is each op's bias, explicit or implicit (:mod:`saliaudit.methods.biases`).
The decomposition is computed once per (image, class) by one forward pass through the ATen
graph and one backward pass; gradients and biases are paired by the op that produced them,
never by module order. Every ψ preset (:mod:`saliaudit.psi`) is then applied to the same terms.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UsageError
from ..graph import get_graph
from ..maps import MapSource, Variant
from ..psi import PSI_PRESETS, TermStats, get_psi, reduce_term, upsample_sum
from . import register
from .decompose import decompose

__all__ = ["BiasTerm", "FullGradients", "full_gradients"]


class BiasTerm:
    """One op's share ``∂f/∂y ⊙ b`` of the logit.

    Attributes:
        name: unique name, ``<module path>.<op>`` (e.g. ``layer1.0.bn1.batch_norm``).
        op: the ATen op (e.g. ``batch_norm``, ``hardtanh``, ``mul``).
        kind: ``explicit`` (conv/linear bias), ``batchnorm``, ``constant`` or ``implicit``.
        grad: ``∂f/∂y``, shaped like the op's output (NCHW for spatial terms).
        bias: ``b``, broadcastable to ``grad``.
        spatial: whether the term is an image-like ``(B, C, h, w)`` map (stored NCHW even
            when the op's output was channels-last).
        channel_bias: ``b`` as a ``(C,)`` vector when it is constant over space (conv,
            linear and batch-norm biases); the term is then never materialized.
        node: name of the graph node of the op (for ops with several outputs, such as
            ``_native_batch_norm_legit_no_training``, the op's node, not the ``getitem``), so
            that a term can be matched to the graph (e.g. batch-norm folding pairs).
    """

    def __init__(
        self,
        name: str,
        op: str,
        kind: str,
        grad: torch.Tensor,
        bias: torch.Tensor,
        spatial: bool,
        channel_bias: torch.Tensor | None = None,
        node: str | None = None,
    ):
        self.name, self.op, self.kind, self.spatial = name, op, kind, spatial
        self.node = node
        self.grad, self.bias, self.channel_bias = grad, bias, channel_bias
        self._stats: TermStats | None = None

    def __repr__(self) -> str:
        return f"BiasTerm({self.name!r}, op={self.op!r}, kind={self.kind!r}, shape={tuple(self.grad.shape)})"

    @property
    def value(self) -> torch.Tensor:
        """The term ``g ⊙ b``, shaped like ``grad``."""
        return (self.grad * self.bias).expand(self.grad.shape)

    @property
    def stats(self) -> TermStats:
        """Shared reductions used by every ψ (see :class:`saliaudit.psi.TermStats`)."""
        if self._stats is None:
            if self.channel_bias is not None:
                self._stats = TermStats(grad=self.grad, channel_bias=self.channel_bias)
            else:
                self._stats = TermStats(self.value)
        return self._stats

    def total(self) -> torch.Tensor:
        """Per-image sum of the term, float64, shape ``(B,)``."""
        if self.spatial:
            return self.stats.sum("keep").reshape(self.grad.shape[0], -1).sum(1, dtype=torch.float64)
        return self.value.reshape(self.grad.shape[0], -1).sum(1, dtype=torch.float64)


@dataclass
class FullGradients:
    """The full-gradient decomposition of a batch (see module docstring).

    Attributes:
        input_term: ``∇ₓf ⊙ x``, shape ``(B, C, H, W)``.
        input_gradient: ``∇ₓf``, shape ``(B, C, H, W)``.
        bias_terms: named :class:`BiasTerm` for every bias-carrying op, in graph order.
        logits: the target logits ``f(x)``, shape ``(B,)``.
        targets: the target classes, shape ``(B,)``.
        reconstructed: ``Σ input_term + Σ bias terms`` per image (float64).
        residual: ``|f − reconstructed| / max(|f|, 1e-6)`` per image (float64).
        unaccounted: ops whose bias could not be computed; their share is in ``residual``.
        layout: how the terms were laid out: ``attention_modules`` (taken as single ops),
            and on a token model ``token_grid`` ``[h, w]`` and ``leading_tokens`` (tokens
            without a patch, whose terms are in no map).
    """

    input_term: torch.Tensor
    input_gradient: torch.Tensor
    bias_terms: dict[str, BiasTerm]
    logits: torch.Tensor
    targets: torch.Tensor
    reconstructed: torch.Tensor
    residual: torch.Tensor
    unaccounted: list[str] = field(default_factory=list)
    layout: dict[str, Any] = field(default_factory=dict)

    def leading_share(self) -> torch.Tensor | None:
        """Per image, the sum of the leading tokens' terms (class, distillation): the part of
        the logit in no map; None on a model without tokens."""
        lead = [t for t in self.bias_terms.values() if "[leading tokens]" in t.name]
        if not self.layout.get("token_grid"):
            return None
        total = torch.zeros(self.logits.shape[0], dtype=torch.float64, device=self.logits.device)
        for t in lead:
            total = total + t.total()
        return total

    def head(self, n: int) -> FullGradients:
        """The decomposition of the first ``n`` images (shared biases stay shared)."""
        b = self.logits.shape[0]
        if n >= b:
            return self
        terms = {}
        for k, t in self.bias_terms.items():
            term = copy.copy(t)
            per_image = t.bias.dim() == t.grad.dim() and t.bias.shape[0] == b
            term.grad, term._stats = t.grad[:n], None
            term.bias = t.bias[:n] if per_image else t.bias
            terms[k] = term
        return FullGradients(
            self.input_term[:n],
            self.input_gradient[:n],
            terms,
            self.logits[:n],
            self.targets[:n],
            self.reconstructed[:n],
            self.residual[:n],
            list(self.unaccounted),
            dict(self.layout),
        )

    @staticmethod
    def cat(a: FullGradients, b: FullGradients) -> FullGradients:
        """The decomposition of two consecutive sub-batches as one batch (after an out-of-memory
        retry in halves): per-image gradients concatenated, shared biases kept shared."""
        na, nb = a.logits.shape[0], b.logits.shape[0]

        def per_image(t: BiasTerm | None, n: int, like: BiasTerm) -> tuple[torch.Tensor, torch.Tensor]:
            if t is None:  # no gradient reached the op in this half
                return torch.zeros(
                    (n, *like.grad.shape[1:]), dtype=like.grad.dtype, device=like.grad.device
                ), like.bias
            return t.grad, t.bias

        terms = {}
        for k in list(a.bias_terms) + [k for k in b.bias_terms if k not in a.bias_terms]:
            ta, tb = a.bias_terms.get(k), b.bias_terms.get(k)
            like = ta or tb
            (ga, ba), (gb, bb) = per_image(ta, na, like), per_image(tb, nb, like)
            batched = (
                ba.dim() == ga.dim() and bb.dim() == gb.dim() and ba.shape[0] == na and bb.shape[0] == nb
            )
            shared = ba.shape == bb.shape and (not batched or (na == nb == 1 and torch.equal(ba, bb)))
            bias = ba if shared else torch.cat([ba.expand(na, *ba.shape[1:]), bb.expand(nb, *bb.shape[1:])])
            term = copy.copy(like)  # name, op, kind, spatial, channel bias... as computed
            term.grad, term.bias, term._stats = torch.cat([ga, gb]), bias, None
            terms[k] = term
        return FullGradients(
            torch.cat([a.input_term, b.input_term]),
            torch.cat([a.input_gradient, b.input_gradient]),
            terms,
            torch.cat([a.logits, b.logits]),
            torch.cat([a.targets, b.targets]),
            torch.cat([a.reconstructed, b.reconstructed]),
            torch.cat([a.residual, b.residual]),
            sorted(set(a.unaccounted) | set(b.unaccounted)),
            {**b.layout, **a.layout},
        )

    @property
    def spatial_terms(self) -> list[BiasTerm]:
        return [t for t in self.bias_terms.values() if t.spatial]

    def saliency(self, psi: str = "paper") -> torch.Tensor:
        """FullGrad map ``ψ(∇ₓf ⊙ x) + Σ_l ψ(f^b_l)`` at input resolution, ``(B, H, W)``."""
        return self.saliency_maps([psi])[psi]

    def saliency_maps(self, psis: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Maps for several ψ presets from the one decomposition: ``{name: (B, H, W)}``."""
        presets = [get_psi(p) for p in (psis if psis is not None else list(PSI_PRESETS))]
        size = (self.input_term.shape[2], self.input_term.shape[3])

        def per_layer():
            for term in [self.input_term] + [t.stats for t in self.spatial_terms]:
                yield from reduce_term(term, presets).items()

        return upsample_sum(per_layer(), size, presets)


def _no_graph(module: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, reason: str) -> FullGradients:
    """Input-gradient part only (TorchScript): the bias share stays in the residual."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits_all = module(x)
        picked = logits_all.gather(1, targets.view(-1, 1)).squeeze(1)
        (grad,) = torch.autograd.grad(picked.sum(), [x])
    input_term = (grad * x).detach()
    recon = input_term.reshape(x.shape[0], -1).sum(1, dtype=torch.float64)
    f64 = picked.detach().to(torch.float64)
    residual = (f64 - recon).abs() / f64.abs().clamp(min=1e-6)
    return FullGradients(input_term, grad.detach(), {}, picked.detach(), targets, recon, residual, [reason])


def full_gradients(model, x: torch.Tensor, targets: torch.Tensor | Sequence[int]) -> FullGradients:
    """Full-gradient decomposition of a batch for the given target classes.

    Args:
        model: a :class:`~saliaudit.model.LoadedModel` (from :func:`saliaudit.load_model`) or
            an ``nn.Module``; it is not modified (a module in training mode is audited as an
            eval-mode copy).
        x: preprocessed float tensor ``(B, 3, H, W)``; float64 gives a float64 decomposition.
        targets: ``(B,)`` class indices.

    Returns:
        :class:`FullGradients` with ``input_term``, named ``bias_terms``, ``residual`` and
        ``saliency(psi)``.

    Reference: Srinivas & Fleuret, NeurIPS 2019, eq. 1–2.
    """
    if x.dim() != 4:
        raise UsageError(f"x must be a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    targets = torch.as_tensor(targets, dtype=torch.long, device=x.device).reshape(-1)
    if targets.numel() != x.shape[0]:
        raise UsageError(f"{targets.numel()} targets for a batch of {x.shape[0]} images")
    gm = get_graph(model, x)
    if gm is None:
        module = getattr(model, "module", model)
        return _no_graph(module, x, targets, "TorchScript internals: bias terms cannot be captured")
    static = getattr(model, "static_batch", None)
    if static and x.shape[0] != static:
        return _chunked(gm, x, targets, static)
    return decompose(gm, x, targets)


def _chunked(gm: torch.fx.GraphModule, x: torch.Tensor, targets: torch.Tensor, size: int) -> FullGradients:
    """Run a graph exported with a static batch size on chunks of exactly that size."""
    parts = []
    for start in range(0, x.shape[0], size):
        xs, ts = x[start : start + size], targets[start : start + size]
        n = xs.shape[0]
        if n < size:  # pad the last chunk by repeating its last image, then drop the padding
            xs = torch.cat([xs, xs[-1:].expand(size - n, *xs.shape[1:])])
            ts = torch.cat([ts, ts[-1:].expand(size - n)])
        parts.append((decompose(gm, xs, ts), n))
    merged = parts[0][0].head(parts[0][1])
    for fg, n in parts[1:]:
        merged = FullGradients.cat(merged, fg.head(n))
    return merged


class FullGradSource(MapSource):
    """FullGrad under the selected ψ presets (Srinivas & Fleuret 2019, eq. 2 and §6)."""

    needs_internals = False  # on TorchScript the decomposition reports what it cannot account
    provides = frozenset({"decomposition"})

    def __init__(self, method: Any, params: dict[str, Any], psis: list[str]):
        self.method = method.name
        self.params = dict(params)
        self.psis = list(psis)
        self.variants = [Variant(self.method, psi=p, signed=get_psi(p).signed) for p in self.psis]
        self._cache: list[tuple[Any, torch.Tensor, torch.Tensor, FullGradients]] = []

    def decompose(self, model: Any, x: torch.Tensor, targets: torch.Tensor) -> FullGradients:
        """The decomposition, cached for the first (the batch's top-1 classes, which most
        checks come back to) and the last (model, x, targets) it was asked for."""
        for m, xx, t, fg in self._cache:
            if m is model and xx is x and t.shape == targets.shape and torch.equal(t, targets):
                return fg
        fg = full_gradients(model, x, targets)
        self._cache = self._cache[:1] + [(model, x, targets.clone(), fg)]
        return fg

    def maps(self, model: Any, x: torch.Tensor, targets: torch.Tensor) -> dict[Variant, torch.Tensor]:
        fg = self.decompose(model, x, targets)
        out = fg.saliency_maps(self.psis)
        return {v: out[v.psi].detach() for v in self.variants}

    def prime(self, model: Any, x: torch.Tensor, targets: torch.Tensor, fg: FullGradients) -> None:
        """Make ``fg`` the first cached decomposition of (model, x, targets), e.g. one the
        audit computed in halves after an out-of-memory error, so maps and checks reuse it."""
        self._cache = [(model, x, targets.clone(), fg)]

    def forget(self) -> None:
        """Drop the cached decompositions (frees their gradients)."""
        self._cache = []


@register(
    "fullgrad",
    family="fullgrad",
    option="psi",
    choices=tuple(PSI_PRESETS),
    source=FullGradSource,
    reference="Srinivas & Fleuret, NeurIPS 2019",
)
def fullgrad(model: Any, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Full-gradient saliency: input-gradient ⊙ x plus every bias-gradient term, post-processed by ψ."""
    return full_gradients(model, x, targets).saliency("signed")[:, None]
