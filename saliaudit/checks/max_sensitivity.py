"""Max-sensitivity: how much does the map change under a small random perturbation of the input?

Yeh, Hsieh, Suggala, Inouye & Ravikumar (*On the (In)fidelity and Sensitivity of
Explanations*, NeurIPS 2019) define the max-sensitivity of an explanation Φ at x as
``max_{‖δ‖∞ ≤ r} ‖Φ(x + δ) − Φ(x)‖``, estimated by Monte-Carlo sampling. This check computes it
as ``captum.metrics.sensitivity_max`` does with its default perturbation and ``norm_ord="fro"``:
``n_perturb`` perturbations ``δ_s`` uniform in ``[−r, r]`` for every input element (every channel
of every pixel, in the model's normalized input space; ``radius``, default 0.02, Captum's
default), and the value ``max_s ‖m(x + δ_s) − m(x)‖_F / ‖m(x)‖_F`` (the denominator 1 when the
map is all zero), where ``m`` is the method's 2-D map for the top-1 class of ``x`` (the class is
kept for the perturbed inputs). The relative norm makes methods comparable whatever their
scale. The perturbations come from :func:`saliaudit.checks.removal.image_generator`
``(seed, image, "max_sensitivity")``: the same for every method.

Lower is better, but there is no universal bar (a map may rightly change where the model is
not smooth), so the verdict comes from the controls (``verdict_from_controls``): a method
PASSES only when its per-image values are significantly below the ``random`` control's (noise
seeded by the image content, which changes entirely under any perturbation) on the same
images. ``edge`` (an image gradient) is smooth by construction and not a must-fail control:
low sensitivity is necessary, not sufficient.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import validate
from ..cost import CostContext, Passes, rows_per_pass
from ..result import CheckResult
from .base import Batch, Check, MapSource, Measurement, Variant, higher_is_worse, register
from .removal import image_generator

__all__ = ["MaxSensitivity", "sensitivity_perturbations", "max_sensitivity_values"]


def sensitivity_perturbations(
    seed: int, name: str, n: int, shape: tuple[int, ...], radius: float
) -> torch.Tensor:
    """``(n, C, H, W)`` float32 perturbations of one image, uniform in ``[−radius, radius]``."""
    g = image_generator(seed, name, "max_sensitivity", n, *shape)
    return (torch.rand(n, *shape, generator=g, dtype=torch.float32) * 2 - 1) * float(radius)


def max_sensitivity_values(ref: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """``max_s ‖perturbed[:, s] − ref‖_F / ‖ref‖_F`` per image (``ref (B, H, W)``, ``perturbed
    (B, n, H, W)``; a zero reference norm counts as 1), in float64."""
    ref, perturbed = ref.double(), perturbed.double()
    b, n = perturbed.shape[:2]
    norm = ref.reshape(b, -1).norm(dim=1)
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    diff = (perturbed - ref[:, None]).reshape(b, n, -1).norm(dim=2)
    return (diff / norm[:, None]).amax(1)


@register
class MaxSensitivity(Check):
    name = "max_sensitivity"
    title = "Max-sensitivity (Yeh et al.): the map under small input perturbations"
    short = "maxsen"
    summary = (
        "How much does the map change, relative to its norm, under the worst of a few small "
        "uniform perturbations of the input? (Yeh et al., NeurIPS 2019; Captum's "
        "sensitivity_max); judged against the random control."
    )
    reference = (
        "Yeh, Hsieh, Suggala, Inouye & Ravikumar, On the (In)fidelity and Sensitivity of "
        "Explanations, NeurIPS 2019"
    )
    metric = "max over perturbations of ‖m(x + δ) − m(x)‖ / ‖m(x)‖ (Frobenius)"
    thresholds = {"warn": None, "fail": None}  # judged against the controls, not a fixed bar
    controls_must_fail = frozenset({"random"})
    verdict_from_controls = True
    higher_is_better = False
    order = 56
    params = {
        "radius": 0.02,  # L∞ radius of the uniform perturbation, model input space (Captum)
        "n_perturb": 10,  # perturbations per image (Captum's default)
        "chunk": None,  # rows per pass (None: from the model's activation memory)
        "max_images": 8,  # every perturbation costs one map: a class-stratified sample
    }

    def __init__(
        self, params: dict[str, Any] | None = None, thresholds: dict[str, float | None] | None = None
    ):
        super().__init__(params, thresholds)
        validate.integer("max_sensitivity.n_perturb", self.p["n_perturb"], min=1)
        validate.rows("max_sensitivity.chunk", self.p["chunk"])
        validate.integer(
            "max_sensitivity.max_images",
            self.p["max_images"],
            min=1,
            allow_none=True,
            hint="null: all images",
        )
        validate.number("max_sensitivity.radius", self.p["radius"], min=0.0, min_open=True)

    def cost(self, ctx: CostContext) -> Passes:
        """The maps of every perturbed copy."""
        return Passes(maps=int(self.p["n_perturb"]))

    def reductions(self) -> list[dict[str, Any]]:
        n = int(self.p["n_perturb"])
        return (
            [{"param": "n_perturb", "value": max(3, n // 2), "why": "fewer perturbations per image"}]
            if n > 3
            else []
        )

    def measure(
        self, batch: Batch, source: MapSource, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        if len(batch) == 0:
            return {v: Measurement() for v in maps}
        n, shape = int(self.p["n_perturb"]), tuple(batch.x.shape[1:])
        delta = torch.stack(
            [sensitivity_perturbations(batch.seed, name, n, shape, self.p["radius"]) for name in batch.images]
        )
        xp = (batch.x[:, None] + delta.to(batch.x.device, batch.x.dtype)).reshape(-1, *shape)
        targets = batch.targets.to(batch.x.device).repeat_interleave(n)
        chunk = rows_per_pass(self.p["chunk"])
        parts: dict[Variant, list[torch.Tensor]] = {v: [] for v in maps}
        for s in range(0, xp.shape[0], chunk):
            got = source.maps(batch.model, xp[s : s + chunk], targets[s : s + chunk])
            for v in maps:
                parts[v].append(got[v].detach().double().cpu())
        out: dict[Variant, Measurement] = {}
        for v, m in maps.items():
            pert = torch.cat(parts[v]).view(len(batch), n, *m.shape[1:])
            vals = max_sensitivity_values(m.detach().cpu(), pert)
            out[v] = Measurement(values=[float(x) for x in vals], images=list(batch.images))
        return out

    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        if not m.values:
            return self.result(variant, m, "skipped", None, "no image was measured")
        value = m.mean()
        status = higher_is_worse(value, self.t)
        msg = (
            f"mean max-sensitivity {value:.4g} (the largest relative change of the map over "
            f"{self.p['n_perturb']} uniform perturbations of radius {float(self.p['radius']):g}; "
            "lower is better, judged against the random control)"
        )
        return self.result(variant, m, status, value, msg)
