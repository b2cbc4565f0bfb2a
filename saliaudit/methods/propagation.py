"""Modified-gradient (propagation) methods: guided backprop, ε-LRP, DeepLIFT Rescale.

All three are the input gradient of the target logit with the derivative of every
element-wise non-linearity replaced by a rule (Ancona et al., ICLR 2018, §3):

============== ============================================ ============================
method         backward of ``y = f(z)``, upstream ``g``      attribution
============== ============================================ ============================
guided_backprop ``f'(z) · max(g, 0)``                        the modified gradient
epsilon_lrp    ``g · f(z) / (z + ε·sign(z))``               modified gradient ⊙ x
deeplift       ``g · (f(z) − f(z̄)) / (z − z̄)``              modified gradient ⊙ (x − x̄)
============== ============================================ ============================

Linear ops (convolutions, batch-norm, pooling, additions of branches) keep their ordinary
gradient. Products of two input-dependent values (attention, squeeze-excitation gates),
softmax and normalizations by input-dependent statistics (LayerNorm) get the rules of
:mod:`saliaudit.methods.propagation_rules` (ε-LRP: Ali et al., ICML 2022; guided backprop:
the gradient except at a softmax), or the method raises
:class:`~saliaudit.errors.NotApplicableError` naming the op (the audit reports it SKIPPED):
it never keeps a gradient that its paper does not define.

The rules are applied on the model's ATen graph (:func:`saliaudit.graph.get_graph`), not with
module hooks, so they reach every non-linearity however it was written: ``nn.ReLU`` or a
``ReLU`` module reused several times (torchvision's ``BasicBlock``/``Bottleneck``; Captum's
DeepLift raises or mis-attributes there, Captum issue #1082), ``F.relu``, in-place ``relu_``,
``ReLU6``/``hardtanh``, ``LeakyReLU``, ``Hardswish``, ``SiLU``, ``GELU``, sigmoid, tanh, ELU,
``clamp``/``clamp_min`` … and ops inside a ``.pt2`` graph. Captum's ``GuidedBackprop``
overrides only ``nn.ReLU`` modules and silently returns the plain gradient through ``ReLU6``;
ours does not. Nothing is registered on the user's module, so nothing can leak.

Conventions (differences from Captum 0.9):

* DeepLIFT's fallback to ``f'(z)`` where ``|z − z̄| < 1e-6`` (Captum: ``eps=1e-10``); the two
  agree unless ``z`` and ``z̄`` straddle a kink within 1e-6.
* Max-pooling keeps its gradient (routing to the arg-max). Captum's DeepLift registers its
  own rule for ``nn.MaxPool2d`` (pooled-output difference unpooled at the input's arg-max,
  divided by the input difference), but in Captum 0.9 that rule only takes effect when the
  pool does not follow a hooked non-linearity: in the usual ``ReLU → MaxPool`` order the
  ReLU's hook captured the upstream gradient before the pool's tensor hook rewrote it, so
  Captum's result equals ours (measured: 8e-8 of the range); in ``MaxPool → ReLU`` order the
  two differ. With a reference that is constant per channel at the pool's input (a zero
  baseline into torchvision's resnet stem) both rules coincide and the attribution sums to
  ``f(x) − f(x̄)``; with other references and max-pooling, ours does not sum exactly
  (neither does Captum's: on the sample shapes model, VGG-style with max-pooling, the delta
  error reaches 150 %). Without max-pooling both are summation-to-delta complete. The audit
  reports the delta of every image (``attribution_completeness`` in the results).
* Only element-wise activation functions (:data:`NONLINEAR_OPS`) are modified. ``exp``,
  ``log``, ``sqrt``, ``pow`` … have no rule in ε-LRP and DeepLIFT where the backward pass
  reaches them (ε-LRP's does not inside a LayerNorm or softmax); guided backprop keeps theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.autograd.function import once_differentiable

from ..cost import Passes
from ..errors import DecompositionError, UsageError
from ..graph import GraphRunner, get_graph, op_name
from . import register
from .common import picked
from .gradients import zero_reference
from .propagation_rules import RulePlan, plan_rules, require, run_rule_op, unsupported

__all__ = ["NONLINEAR_OPS", "deeplift", "epsilon_lrp", "guided_backprop", "modified_gradient"]

#: ATen element-wise activation functions (of their first argument) whose derivative the
#: propagation rules replace. In-place variants (``relu_``) are run as these.
NONLINEAR_OPS = frozenset(
    {
        "relu",
        "relu6",
        "hardtanh",
        "leaky_relu",
        "rrelu",
        "prelu",
        "_prelu_kernel",
        "hardswish",
        "hardsigmoid",
        "silu",
        "gelu",
        "sigmoid",
        "tanh",
        "elu",
        "selu",
        "celu",
        "softplus",
        "mish",
        "threshold",
        "log_sigmoid",
        "hardshrink",
        "softshrink",
        "clamp",
        "clamp_min",
        "clamp_max",
    }
)

#: DeepLIFT falls back to the ordinary derivative where ``|z − z̄|`` is below this.
RESCALE_EPS = 1e-6


def _vjp(call: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``f'(z) · v`` for an element-wise ``f`` (autograd's own derivative, kinks included)."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(call(zz), [zz], v)
    return g


class _Rule(torch.autograd.Function):
    """Forward: the op. Backward: the method's rule instead of ``f'(z) · g``."""

    @staticmethod
    def forward(ctx, z, call, rule, ref):
        out = call(z)
        ctx.call, ctx.rule, ctx.ref = call, rule, ref
        ctx.save_for_backward(z, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        z, out = ctx.saved_tensors
        return _RULES[ctx.rule](ctx.call, z, out, g, ctx.ref), None, None, None


def _guided(call, z, out, g, ref):
    return _vjp(call, z, g.clamp(min=0))


def _epsilon(call, z, out, g, eps):
    denom = z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    return torch.where(denom == 0, torch.zeros_like(z), g * out / safe)


def _rescale(call, z, out, g, ref):
    z_ref, out_ref = ref
    dz = z - z_ref
    small = dz.abs() < RESCALE_EPS
    ratio = (out - out_ref) / torch.where(small, torch.ones_like(dz), dz)
    return torch.where(small, _vjp(call, z, g), g * ratio)


_RULES = {"guided": _guided, "epsilon": _epsilon, "rescale": _rescale}


def _nonlinear_input(node: torch.fx.Node, target: Any, args: tuple, dependent: set) -> bool:
    """True when ``node`` is an element-wise activation of one input-dependent tensor."""
    if op_name(target) not in NONLINEAR_OPS or not args or not isinstance(args[0], torch.Tensor):
        return False
    first = node.args[0] if node.args else None
    if not (isinstance(first, torch.fx.Node) and first in dependent):
        return False
    others = [a for a in node.all_input_nodes if a is not first]
    return not any(a in dependent for a in others)


def _caller(target: Any, args: tuple, kwargs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    rest = tuple(args[1:])
    return lambda t: target(t, *rest, **kwargs)


def _logits(out: Any) -> torch.Tensor:
    logits = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise DecompositionError(
            f"the model output has shape {getattr(logits, 'shape', None)}, not (batch, classes)",
            hint="audit a classifier that returns logits",
        )
    return logits


def _run(
    gm: torch.fx.GraphModule,
    x: torch.Tensor,
    targets: torch.Tensor,
    rule: str,
    param: Any,
    reference: torch.Tensor | None,
    plan: RulePlan,
) -> torch.Tensor:
    refs: dict[torch.fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
    # The per-op callbacks read the runners' ``dependent`` sets through these holders, not
    # through the runners themselves: a callback that referred to its own runner would make a
    # reference cycle, and the reference activations in ``refs`` (about 1 GB for 8 ResNet-50
    # rows) would stay alive until the cyclic garbage collector happened to run.
    deps: dict[str, set[torch.fx.Node]] = {}
    if rule == "rescale":

        def record(node, target, args, kwargs):
            out = target(*args, **kwargs)
            if _nonlinear_input(node, target, args, deps["ref"]):
                refs[node] = (args[0].detach(), out.detach())
            return out

        ref_runner = GraphRunner(gm, run_op=record)
        deps["ref"] = ref_runner.dependent
        with torch.no_grad():
            ref_runner.run(reference.detach())
        del ref_runner, deps["ref"]

    def apply(node, target, args, kwargs):
        if node in plan.cuts or node in plan.norms:  # ε-LRP's AH-, LN- and gate rules
            return run_rule_op(plan, node, target, args, kwargs)
        if not _nonlinear_input(node, target, args, deps["run"]):
            return target(*args, **kwargs)
        extra = refs.get(node) if rule == "rescale" else param
        if rule == "rescale" and extra is None:  # not reached by the reference: keep f'
            return target(*args, **kwargs)
        return _Rule.apply(args[0], _caller(target, args, kwargs), rule, extra)

    runner = GraphRunner(gm, run_op=apply)
    deps["run"] = runner.dependent
    xi = x.detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            score = picked(_logits(runner.run(xi)), targets)
            (grad,) = torch.autograd.grad(score.sum(), [xi], allow_unused=True)
    finally:
        refs.clear()
        deps.clear()
    return torch.zeros_like(x) if grad is None else grad.detach()


def modified_gradient(
    model: Any,
    x: torch.Tensor,
    targets: torch.Tensor,
    rule: str,
    param: Any = None,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Input gradient of the target logits with ``rule`` at every non-linearity.

    ``rule`` is ``"guided"``, ``"epsilon"`` (``param`` = ε) or ``"rescale"`` (``reference`` =
    the reference input x̄, same shape as ``x``). Batched; a ``.pt2`` graph with a static batch
    size runs on chunks of that size. Raises :class:`DecompositionError` for TorchScript and
    :class:`~saliaudit.errors.NotApplicableError` when the backward pass reaches an op that
    ``rule`` has no rule for (:func:`~saliaudit.methods.propagation_rules.plan_rules`).
    """
    targets = torch.as_tensor(targets, dtype=torch.long, device=x.device).reshape(-1)
    gm = _graph(model, x)
    plan = plan_rules(gm, rule)
    require(plan)
    static = getattr(model, "static_batch", None)
    if not static or x.shape[0] == static:
        return _run(gm, x, targets, rule, param, reference, plan)
    parts = []
    for start in range(0, x.shape[0], static):
        xs, ts = x[start : start + static], targets[start : start + static]
        rs = None if reference is None else reference[start : start + static]
        n = xs.shape[0]
        if n < static:  # pad by repeating the last row, drop the padding afterwards
            pad = static - n
            xs = torch.cat([xs, xs[-1:].expand(pad, *xs.shape[1:])])
            ts = torch.cat([ts, ts[-1:].expand(pad)])
            rs = None if rs is None else torch.cat([rs, rs[-1:].expand(pad, *rs.shape[1:])])
        parts.append(_run(gm, xs, ts, rule, param, rs, plan)[:n])
    return torch.cat(parts)


def _graph(model: Any, x: torch.Tensor) -> torch.fx.GraphModule:
    gm = get_graph(model, x)
    if gm is None:
        raise DecompositionError(
            "modified-gradient methods need the model graph, which TorchScript does not expose",
            hint="export the model with torch.export and pass the .pt2",
        )
    return gm


def _baseline(model: Any, x: torch.Tensor, baseline: Any) -> torch.Tensor:
    """The reference input, broadcast to ``x``: ``black`` (black image), ``zero`` or a tensor."""
    if isinstance(baseline, torch.Tensor):
        return baseline.to(device=x.device, dtype=x.dtype).expand_as(x).contiguous()
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "black":
        mean, std = getattr(model, "mean", None), getattr(model, "std", None)
        if mean is None or std is None or len(mean) != x.shape[1]:
            return torch.zeros_like(x)
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return ((0.0 - m) / s).expand_as(x).contiguous()
    raise UsageError(f"unknown deeplift baseline {baseline!r}", hint="choose black or zero")


@register(
    "guided_backprop",
    family="propagation",
    needs_internals=True,
    reference="Springenberg et al., Striving for Simplicity: The All Convolutional Net, "
    "ICLR workshop 2015 (arXiv 2014)",
    summary="gradient with f'(z)·max(g, 0) at every non-linearity",
    unsupported=unsupported("guided"),
)
def guided_backprop(model: Any, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Guided backpropagation: the gradient with negative upstream gradients zeroed.

    At every element-wise non-linearity ``y = f(z)`` of the model graph the backward pass
    uses ``f'(z) · max(g, 0)`` instead of ``f'(z) · g`` (for ReLU ``1[z>0] · max(g, 0)``, as in
    Captum). Applied to every activation (ReLU, reused ReLU modules, ``F.relu``, ReLU6,
    LeakyReLU, Hardswish, SiLU, GELU, sigmoid, … and ops of a ``.pt2``); every other op keeps
    its gradient, products included, as Springenberg et al. define it. A softmax (attention)
    has no such rule: ``NotApplicableError`` names it and the audit reports the method SKIPPED
    (iNNvestigate, Alber et al. JMLR 2019, refuses any non-ReLU network).

    Parameters: none.

    Returns the modified gradient ``(B, C, H, W)``.

    Khakzar et al. show positive propagation makes maps class-insensitive; the class
    sensitivity check measures that.

    Reference: Springenberg, Dosovitskiy, Brox & Riedmiller, *Striving for Simplicity: The
    All Convolutional Net*, 2014.
    """
    return modified_gradient(model, x, targets, "guided")


@register(
    "epsilon_lrp",
    family="propagation",
    needs_internals=True,
    reference="Bach et al., PLoS ONE 2015, via Ancona et al., ICLR 2018; on attention and "
    "LayerNorm Ali et al., ICML 2022",
    summary="ε-LRP: gradient with f(z)/(z+ε·sign z) at non-linearities, times input",
    reference_input=zero_reference,
    unsupported=unsupported("epsilon"),
)
def epsilon_lrp(model: Any, x: torch.Tensor, targets: torch.Tensor, *, epsilon: float = 1e-9) -> torch.Tensor:
    """ε-LRP as a modified gradient (Ancona et al. 2018, Prop. 1).

    The derivative of every element-wise non-linearity ``f`` is replaced by
    ``f(z) / (z + ε·sign(z))`` (``sign(0) = +1``); the attribution is the modified gradient
    times the input. On a network whose only non-linearities are ReLUs this equals
    gradient × input (Ancona Prop. 3); it differs for activations with ``f(z)/z ≠ f'(z)``
    (ReLU6 clipping, SiLU, sigmoid …).

    On transformers, the rules of Ali et al. (ICML 2022, CP-LRP): attention weights constant
    (AH-rule; a fused ``scaled_dot_product_attention`` runs with ``q``, ``k`` detached),
    LayerNorm's ``σ`` constant (LN-rule; also GroupNorm, RMSNorm, a division by an
    input-dependent value), sigmoid gates constant (signal-take-all, Arras et al. 2017); the
    relevance then sums to the logit minus the biases' share. Other products of two
    input-dependent tensors raise ``NotApplicableError`` (:mod:`.propagation_rules`).

    Parameters:
        epsilon: stabilizer ε (default ``1e-9``).

    Returns ``modified_gradient ⊙ x``, ``(B, C, H, W)``.

    Reference: Bach et al., *On Pixel-Wise Explanations for Non-Linear Classifier Decisions
    by Layer-Wise Relevance Propagation*, PLoS ONE 2015; Ancona, Ceolini, Öztireli & Gross,
    *Towards better understanding of gradient-based attribution methods*, ICLR 2018; Ali,
    Schnake, Eberle, Montavon, Müller & Wolf, *XAI for Transformers: Better Explanations
    through Conservative Propagation*, ICML 2022.
    """
    return modified_gradient(model, x, targets, "epsilon", float(epsilon)) * x


@register(
    "deeplift",
    family="propagation",
    needs_internals=True,
    reference="Shrikumar et al., ICML 2017 (Rescale), via Ancona et al., ICLR 2018",
    summary="DeepLIFT Rescale: gradient with Δf/Δz at non-linearities, times x − x̄",
    reference_input=lambda model, x, baseline="black", **_: _baseline(model, x, baseline)[None],
    cost=Passes(forward=1, backward=1),  # the reference's pre-activations, then x
    unsupported=unsupported("rescale"),
)
def deeplift(model: Any, x: torch.Tensor, targets: torch.Tensor, *, baseline: str = "black") -> torch.Tensor:
    """DeepLIFT with the Rescale rule, as a modified gradient (Ancona et al. 2018).

    The reference ``x̄`` is run through the graph first to record each non-linearity's
    reference pre-activation ``z̄``; then the derivative of every element-wise non-linearity
    is replaced by ``(f(z) − f(z̄)) / (z − z̄)``, falling back to ``f'(z)`` where
    ``|z − z̄| < 1e-6``. Max-pooling keeps its gradient (Captum applies its own rule there).
    Without max-pooling the attribution sums to ``f(x) − f(x̄)`` (summation-to-delta).
    DeepLIFT has no rule for a product of two input-dependent tensors (attention,
    squeeze-excitation gates), a softmax or a LayerNorm: ``NotApplicableError`` names the op
    and the audit reports the method SKIPPED (Captum silently keeps the gradient there).

    Parameters:
        baseline: ``black`` (default: a black image, i.e. ``(0 − mean)/std`` for a loaded
            model with normalization, zeros for a plain module) or ``zero`` (zeros in the
            model's input space).

    Returns ``modified_gradient ⊙ (x − x̄)``, ``(B, C, H, W)``.

    Reference: Shrikumar, Greenside & Kundaje, *Learning Important Features Through
    Propagating Activation Differences*, ICML 2017; Ancona et al., ICLR 2018.
    """
    ref = _baseline(model, x, baseline)
    return modified_gradient(model, x, targets, "rescale", reference=ref) * (x - ref)
