"""Input invariance: does the map survive a constant shift of the input that the model absorbs?

Kindermans et al. (*The (Un)reliability of Saliency Methods*, 2017/2019) shift every input by a
constant ``c`` and compensate exactly in the first layer's bias, so the shifted model on the
shifted input computes the same function as the original: ``f'(x + c) = f(x)``. Nothing the
model does depends on the shift, so a reliable map must not change either. The gradient
passes (its map is identical); gradient × input and integrated gradients with a black
baseline fail (the shift moves the input but not their reference).

Construction (a copy only; the user's model is never modified). The ATen graph the methods run
(:func:`saliaudit.graph.get_graph`; a ``.pt2`` program's module, an eager module's export) is
deep-copied, as the randomization check does (:mod:`saliaudit.checks.reinit`). The input's
first consumer must be

* ``conv2d``/``convolution`` without padding: its bias becomes ``b' = b − Σ_kernel W · c`` (per
  output channel, the kernel weights times ``c`` of their input channel; a missing bias is
  added), or
* ``linear`` after ``flatten``/``view``/``reshape`` to ``(B, C·H·W)``: ``b' = b − W · c_flat``.

Zero padding cannot be compensated: the copy pads ``x + c`` with zeros where the original pads
``x`` with zeros, so the logits differ near the borders. The compensation is verified
numerically: the check is SKIPPED, with the reason and the measured difference, when the
first layer cannot be found or compensated, or when ``max|f'(x + c) − f(x)|`` exceeds
``tolerance`` (1e-4) times ``max|f(x)|`` on a probe input; images of the audit whose logits
differ by more are left out with a note.

The shift: ``shift`` (default −1) in image units (pixel values in [0, 1]), i.e.
``c = shift / std`` per channel in the model's normalized input space: the default moves the
image from [0, 1] to [−1, 0], Kindermans' MNIST experiment.

Value, per image: ``metric`` (default ``l1``), the normalized L1 similarity
``1 − Σ|m' − m| / (Σ|m| + Σ|m'|)`` of the map on (copy, ``x + c``) and the map on
(model, ``x``): 1 when identical, 0 when the maps share nothing (both all-zero: 1). It asks for
the *same* map, as the paper does, not merely a similar ranking; the Spearman of ``|map|`` and
the other similarity measures are reported beside it (``series.means``). Higher is better;
verdict through the 95 % interval of the mean: FAIL when the whole interval is below 0.8, PASS
when it is above 0.95, else WARN. The controls (``random``, ``edge``) are input invariant by
construction, so none must fail: this is a necessary property, not a sufficient one.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from functools import reduce
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import validate
from ..cost import CostContext, Passes
from ..errors import DecompositionError
from ..graph import get_graph, module_path, op_name
from ..result import CheckResult
from .base import Batch, Check, MapSource, Measurement, Variant, register
from .similarity import METRIC_NAMES, METRICS, Maps, similarity

__all__ = ["InputInvariance", "ShiftedModel", "shifted_model", "l1_similarity", "NotCompensable"]

_CONV = frozenset({"conv2d", "convolution", "_convolution"})
_FLATTEN = frozenset({"flatten", "view", "reshape", "_unsafe_view"})
_VERDICT_METRICS = ("l1", *METRICS)


class NotCompensable(Exception):
    """The shift cannot be absorbed exactly by the first layer (the message says why)."""


@dataclasses.dataclass
class ShiftedModel:
    """A compensated copy: ``model`` (wrapped like the original) computes ``f(x)`` from
    ``x + shift``; ``layer`` is the first layer's module path, ``error`` the measured relative
    logit difference on the probe."""

    model: Any
    shift: torch.Tensor  # (C,) in model space
    layer: str
    error: float


def l1_similarity(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """``1 − Σ|a − b| / (Σ|a| + Σ|b|)`` per map of two ``(B, H, W)`` batches (1 if both are 0)."""
    a = a.detach().to("cpu", torch.float64).flatten(1)
    b = b.detach().to("cpu", torch.float64).flatten(1)
    den = a.abs().sum(1) + b.abs().sum(1)
    num = (a - b).abs().sum(1)
    out = torch.where(
        den > 0, 1.0 - num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den)
    )
    return out.numpy()


def _attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    return reduce(getattr, target.split("."), gm)


def _first_layer(gm: torch.fx.GraphModule) -> tuple[torch.fx.Node, str, torch.fx.Node | None]:
    """``(layer node, kind, flatten node)`` of the input's first consumer (``kind``: conv or
    linear)."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not inputs:
        raise NotCompensable("the model graph has no input")
    x = inputs[0]
    users = [u for u in x.users if not (u.op == "call_module" or str(u.target).startswith("_guards"))]
    users = [u for u in users if u.op == "call_function" and op_name(u.target) != "_guards_fn"]
    if len(users) != 1:
        raise NotCompensable(
            f"the input feeds {len(users)} operations ({', '.join(op_name(u.target) for u in users)}), "
            "not one first layer"
        )
    node, flat = users[0], None
    if op_name(node.target) in _FLATTEN and len(node.users) == 1:
        flat, node = node, next(iter(node.users))
    name = op_name(node.target)
    if name in _CONV and flat is None:
        return node, "conv", None
    if name == "linear" and flat is not None:
        return node, "linear", flat
    raise NotCompensable(
        f"the input's first operation is {op_name((flat or node).target)}"
        + (f" then {name}" if flat is not None else "")
        + ", not a convolution or a linear layer whose bias could absorb the shift"
    )


def _conv_delta(node: torch.fx.Node, gm: torch.fx.GraphModule, c: torch.Tensor) -> torch.Tensor:
    args = list(node.args)
    name = op_name(node.target)
    weight = _attr(gm, args[1].target)
    if name == "conv2d":
        padding, dilation, groups = (
            (args[4] if len(args) > 4 else [0, 0]),
            (args[5] if len(args) > 5 else [1, 1]),
            (args[6] if len(args) > 6 else 1),
        )
        transposed = False
    else:  # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        padding, dilation, transposed, groups = args[4], args[5], args[6], args[8]
    if weight.dim() != 4:
        raise NotCompensable(f"the first layer is a {weight.dim() - 2}-D convolution (only 2-D is supported)")
    if transposed:
        raise NotCompensable("the first layer is a transposed convolution")
    if padding == "valid":
        padding = [0, 0]
    if isinstance(padding, str) or any(int(p) != 0 for p in padding):
        raise NotCompensable(
            f"the first convolution pads the input with zeros (padding {list(padding) if not isinstance(padding, str) else padding}): "
            "zero padding of x + c differs from zero padding of x, so the shift cannot be "
            "compensated exactly at the borders"
        )
    kh, kw = weight.shape[2:]
    dh, dw = (int(dilation[0]), int(dilation[1])) if not isinstance(dilation, int) else (dilation, dilation)
    const = (
        c.to(weight.dtype)
        .to(weight.device)[None, :, None, None]
        .expand(1, c.numel(), (kh - 1) * dh + 1, (kw - 1) * dw + 1)
    )
    with torch.no_grad():
        return F.conv2d(const, weight, None, 1, 0, (dh, dw), int(groups)).reshape(-1)


def _linear_delta(
    node: torch.fx.Node, flat: torch.fx.Node, gm: torch.fx.GraphModule, x: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    name = op_name(flat.target)
    args = list(flat.args)
    if name == "flatten" and not (
        len(args) >= 2 and int(args[1]) == 1 and (len(args) < 3 or int(args[2]) in (-1, x.dim() - 1))
    ):
        raise NotCompensable(f"the input is flattened with {args[1:]}, not from dimension 1")
    if name != "flatten":
        shape = args[1] if len(args) > 1 else None
        if not (isinstance(shape, (list, tuple)) and len(shape) == 2):
            raise NotCompensable("the input is reshaped to something other than (batch, features)")
    weight = _attr(gm, node.args[1].target)
    per_pixel = int(np.prod(x.shape[2:]))
    if weight.shape[1] != c.numel() * per_pixel:
        raise NotCompensable("the first linear layer does not read the flattened image")
    c_flat = c.to(weight.dtype).to(weight.device).repeat_interleave(per_pixel)
    with torch.no_grad():
        return weight @ c_flat


def shifted_model(model: Any, x: torch.Tensor, shift: torch.Tensor, tolerance: float = 1e-4) -> ShiftedModel:
    """A deep copy of ``model``'s graph whose first layer's bias absorbs ``shift`` (per channel,
    model space), verified on ``x``; raises :class:`NotCompensable` with the reason."""
    try:
        graph = get_graph(model, x)
    except DecompositionError as err:
        raise NotCompensable(f"the model graph cannot be captured ({err})") from None
    if graph is None:
        raise NotCompensable("a TorchScript model's layers cannot be reached")
    if shift.numel() != x.shape[1]:
        raise NotCompensable(f"the input has {x.shape[1]} channels, the shift {shift.numel()}")
    gm = copy.deepcopy(graph)
    node, kind, flat = _first_layer(gm)
    layer = module_path(node)
    if node.args[1].op != "get_attr":
        raise NotCompensable(f"the first layer's ({layer}) weight is computed, not a parameter")
    delta = _conv_delta(node, gm, shift) if kind == "conv" else _linear_delta(node, flat, gm, x, shift)
    bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    with torch.no_grad():
        if isinstance(bias_node, torch.fx.Node) and bias_node.op == "get_attr":
            bias = _attr(gm, bias_node.target)
            bias.data = bias.data - delta.to(bias.dtype)
        elif bias_node is None:
            gm.register_parameter(
                "_saliaudit_shift_bias", torch.nn.Parameter(-delta.clone(), requires_grad=False)
            )
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr("_saliaudit_shift_bias")
            args = list(node.args)
            args += [None] * (3 - len(args))
            args[2] = new
            node.args = tuple(args)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
            gm.recompile()
        else:
            raise NotCompensable(f"the first layer's ({layer}) bias is computed, not a parameter")
    if dataclasses.is_dataclass(model) and not isinstance(model, type):
        wrapped = dataclasses.replace(model, module=gm, exported=None)
    else:
        wrapped = types.SimpleNamespace(module=gm, static_batch=getattr(model, "static_batch", None))
    cx = shift.to(x.device, x.dtype)[None, :, None, None]
    ref, got = _logits(model, x), _logits(wrapped, x + cx)
    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
    if not np.isfinite(err) or err > tolerance:
        raise NotCompensable(
            f"the compensated copy's logits differ from the model's by {err:.2g} (relative; "
            f"tolerance {tolerance:g}) after compensating {layer}"
        )
    return ShiftedModel(wrapped, shift, layer, err)


def _logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "logits") and callable(model.logits):
        return model.logits(x).detach().double()
    with torch.no_grad():
        return model.module(x).detach().double()


def relative_errors(model: Any, shifted: ShiftedModel, x: torch.Tensor) -> np.ndarray:
    """Per image ``max|f'(x + c) − f(x)| / max|f(x)|``."""
    cx = shifted.shift.to(x.device, x.dtype)[None, :, None, None]
    ref, got = _logits(model, x), _logits(shifted.model, x + cx)
    return ((got - ref).abs().amax(1) / ref.abs().amax(1).clamp_min(1e-6)).cpu().numpy()


@register
class InputInvariance(Check):
    name = "input_invariance"
    title = "Input invariance (constant input shift absorbed by the first layer)"
    short = "invar"
    summary = (
        "Does the map stay the same when the input is shifted by a constant that the first "
        "layer's bias absorbs exactly, so the model computes the same function? The maps "
        "before and after are compared (Kindermans et al., 2017)."
    )
    reference = (
        "Kindermans, Hooker, Adebayo, Alber, Schütt, Dähne, Erhan & Kim, The (Un)reliability "
        "of Saliency Methods, 2017 (in Explainable AI, LNCS 11700, 2019)"
    )
    metric = "normalized L1 similarity of the maps before and after the shift"
    thresholds = {"fail": 0.8, "warn": 0.95}
    interval_verdict = True
    value_range = (0.0, 1.0)
    higher_is_better = True
    order = 25
    params = {
        "shift": -1.0,  # in image units ([0, 1] pixels); c = shift / std per channel
        "metric": "l1",  # or spearman_abs, spearman, ssim, hog
        "tolerance": 1e-4,  # relative logit difference the compensation may leave
        "max_images": None,
    }

    def __init__(
        self, params: dict[str, Any] | None = None, thresholds: dict[str, float | None] | None = None
    ):
        super().__init__(params, thresholds)
        validate.choice("input_invariance.metric", self.p["metric"], _VERDICT_METRICS)
        validate.integer(
            "input_invariance.max_images",
            self.p["max_images"],
            min=1,
            allow_none=True,
            hint="null: all images",
        )
        self.metric = self._metric_text(self.p["metric"])
        self._shifted: dict[Any, tuple[Any, ShiftedModel | str]] = {}

    @staticmethod
    def _metric_text(metric: str) -> str:
        name = "normalized L1 similarity" if metric == "l1" else METRIC_NAMES[metric]
        return f"{name} of the maps before and after the shift"

    def _shift(self, model: Any, channels: int) -> torch.Tensor:
        std = getattr(model, "std", None) or (1.0,) * channels
        return torch.tensor([float(self.p["shift"]) / float(s) for s in std][:channels], dtype=torch.float64)

    def prepare(self, model: Any, x: torch.Tensor) -> ShiftedModel | str:
        """The compensated copy for ``model`` (cached), or why there is none."""
        key = (id(model), x.dtype, x.device)
        if key not in self._shifted or self._shifted[key][0] is not model:
            try:
                shift = self._shift(model, x.shape[1]).to(x.dtype)
                got: ShiftedModel | str = shifted_model(model, x, shift, float(self.p["tolerance"]))
            except NotCompensable as err:
                got = f"cannot shift the input exactly: {err}"
            self._shifted[key] = (model, got)  # the model kept: its id cannot be reused
        return self._shifted[key][1]

    def _probe(self, model: Any) -> torch.Tensor | None:
        size = getattr(model, "input_size", None)
        if not size:
            return None
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, *size, generator=g)
        return x.to(getattr(model, "device", "cpu"))

    def skip_reason(self, source: MapSource, model: Any, has_masks: bool) -> str | None:
        probe = self._probe(model)
        if probe is not None:
            got = self.prepare(model, probe)
            if isinstance(got, str):
                return got
        return super().skip_reason(source, model, has_masks)

    def cost(self, ctx: CostContext) -> Passes:
        """The maps on the shifted model and input, and the logits of both (exactness)."""
        return Passes(maps=1, forward=2, compare=ctx.variants * len(METRICS))

    def measure(
        self, batch: Batch, source: MapSource, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        variants = list(maps)
        if len(batch) == 0:
            return {v: Measurement() for v in variants}
        probe = self._probe(batch.model)
        shifted = self.prepare(batch.model, probe if probe is not None else batch.x)
        if isinstance(shifted, str):
            raise DecompositionError(shifted)
        errors = relative_errors(batch.model, shifted, batch.x)
        inexact = errors > float(self.p["tolerance"])
        cx = shifted.shift.to(batch.x.device, batch.x.dtype)[None, :, None, None]
        after = source.maps(shifted.model, batch.x + cx, batch.targets)
        metric = self.p["metric"]
        out: dict[Variant, Measurement] = {}
        for v in variants:
            extra: dict[str, Any] = {"sim_l1": [float(s) for s in l1_similarity(maps[v], after[v])]}
            ref, cmp = Maps(maps[v]), Maps(after[v])
            for m in METRICS:
                vals, _ = similarity(ref, cmp, m)
                extra[f"sim_{m}"] = [float(s) for s in vals]
            extra["logit_error"] = [float(e) for e in errors]
            values = [float("nan") if inexact[i] else extra[f"sim_{metric}"][i] for i in range(len(batch))]
            notes = []
            if inexact.any():
                notes.append(
                    f"{int(inexact.sum())} images were left out: the compensated model's logits "
                    f"differ by more than {float(self.p['tolerance']):g} (relative)"
                )
            out[v] = Measurement(values=values, images=list(batch.images), extra=extra, notes=notes)
            out[v].extra["layer"] = shifted.layer
            out[v].extra["shift"] = [float(s) for s in shifted.shift]
        return out

    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        metric = self.p["metric"]
        per_metric = {k: m.extra.pop(f"sim_{k}", []) for k in _VERDICT_METRICS}
        errors = m.extra.pop("logit_error", [])

        def mean(xs: list[float]) -> float | None:
            f = [x for x in xs if np.isfinite(x)]
            return float(np.mean(f)) if f else None

        series: dict[str, Any] = {
            "verdict_metric": metric,
            "means": {k: mean(per_metric[k]) for k in _VERDICT_METRICS},
            "max_logit_error": max(errors) if errors else None,
        }
        value = m.mean()
        if value is None:
            return self.result(
                variant, m, "skipped", None, "no image was measured; " + "; ".join(m.notes), **series
            )
        fail, warn = self.t.get("fail"), self.t.get("warn")
        if fail is not None and value < fail:
            status = "fail"
            msg = f"the map changes under an input shift the model absorbs exactly (similarity {value:.3f} < {fail:g})"
        elif warn is not None and value < warn:
            status = "warn"
            msg = f"the map changes somewhat under an input shift the model absorbs exactly (similarity {value:.3f} < {warn:g})"
        else:
            status = "pass"
            msg = f"the map stays the same under an input shift the model absorbs exactly (similarity {value:.3f})"
        sp = series["means"].get("spearman_abs")
        if sp is not None and metric != "spearman_abs":
            msg += f"; Spearman ABS {sp:.2f}"
        msg += f"; shift {float(self.p['shift']):g} (image units) absorbed by {m.extra.get('layer', '?')}"
        if m.notes:
            msg += "; " + "; ".join(m.notes)
        cell = self.result(variant, m, status, value, msg, **series)
        cell.metric = self._metric_text(metric)
        return cell
