"""Infidelity: does the map predict how the output changes under small random perturbations?

Yeh, Hsieh, Suggala, Inouye & Ravikumar (*On the (In)fidelity and Sensitivity of
Explanations*, NeurIPS 2019) define the infidelity of an explanation Φ of f at x as
``E_I[(Iᵀ Φ(x) − (f(x) − f(x − I)))²]`` for a random perturbation ``I``. This check computes it
exactly as ``captum.metrics.infidelity(..., normalize=True)`` does: with ``a_s = Σ_pixels m ·
I_s`` and ``Δ_s = f(x) − f(x − I_s)`` over ``n_perturb`` samples, the explanation is rescaled
by the least-squares factor ``β = Σ a_s Δ_s / Σ a_s²`` (``β = 0`` when every ``a_s`` is 0), and
the value is ``Σ_s (β a_s − Δ_s)² / n``. The normalization makes the number independent of the
map's scale (maps of different methods are not on one scale).

Perturbations (Yeh et al.'s "noisy baseline"): per pixel ``I ~ N(0, σ²)`` in the model's
normalized input space (``sigma``, default 0.01: small, so the number measures the local fidelity
rather than the curvature of the model), the same value on every channel of a pixel,
drawn from :func:`saliaudit.checks.removal.image_generator` ``(seed, image, "infidelity")``:
the same perturbations for every method. The 2-D map ``m`` is the method's map; with a
perturbation shared by the channels, ``Σ_c,pixels A_c I = Σ_pixels (Σ_c A_c) I``, so passing
``m / C`` on every channel to Captum gives the same number. ``f`` is the top-1 logit.

Lower is better, but a raw infidelity has no universal scale (it is in squared logits), so the
verdict comes from the controls (``verdict_from_controls``): a method PASSES only when its
per-image values are significantly below the ``random`` control's on the same images
(docs/checks.md, "Controls and the paired test"); no fixed thresholds unless configured.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import validate
from ..cost import CostContext, Passes, rows_per_pass
from ..result import CheckResult
from .base import Batch, Check, Measurement, Variant, higher_is_worse, register
from .removal import image_generator

__all__ = ["Infidelity", "infidelity_perturbations", "infidelity_values"]


def infidelity_perturbations(seed: int, name: str, n: int, h: int, w: int, sigma: float) -> torch.Tensor:
    """``(n, H, W)`` float32 Gaussian perturbations of one image (shared by its channels)."""
    g = image_generator(seed, name, "infidelity", n, h, w)
    return torch.randn(n, h, w, generator=g, dtype=torch.float32) * float(sigma)


def infidelity_values(a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Captum's normalized infidelity from ``a (B, n)`` (``Σ map · I``) and ``delta (B, n)``
    (``f(x) − f(x − I)``), in float64."""
    a, delta = a.double(), delta.double()
    aa, ab, bb = (a * a).sum(1), (a * delta).sum(1), (delta * delta).sum(1)
    beta = torch.where(aa != 0, ab / torch.where(aa != 0, aa, torch.ones_like(aa)), torch.zeros_like(aa))
    return (beta * beta * aa - 2 * beta * ab + bb) / a.shape[1]


def _top1(model: Any, x: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    outs = []
    for s in range(0, x.shape[0], chunk):
        logits = model.logits(x[s : s + chunk])
        outs.append(logits.gather(1, targets[s : s + chunk, None].to(logits.device))[:, 0])
    return torch.cat(outs).detach().double().cpu()


@register
class Infidelity(Check):
    name = "infidelity"
    title = "Infidelity (Yeh et al.): the map against output changes under noise"
    short = "infid"
    summary = (
        "How well does the map, summed against a small random perturbation, predict the change "
        "of the top-1 logit? The expected squared error after the best rescaling of the map "
        "(Yeh et al., NeurIPS 2019; Captum's infidelity with normalize=True); judged against "
        "the random control."
    )
    reference = (
        "Yeh, Hsieh, Suggala, Inouye & Ravikumar, On the (In)fidelity and Sensitivity of "
        "Explanations, NeurIPS 2019"
    )
    metric = "normalized infidelity (squared top-1 logit units), Gaussian perturbations"
    thresholds = {"warn": None, "fail": None}  # judged against the controls, not a fixed bar
    controls_must_fail = frozenset({"random"})
    verdict_from_controls = True
    higher_is_better = False
    order = 55
    params = {
        "sigma": 0.01,  # std of the per-pixel Gaussian perturbation, model input space (small: local)
        "n_perturb": 16,  # perturbations per image
        "chunk": None,  # rows per pass (None: from the model's activation memory)
        "max_images": 16,
    }

    def __init__(
        self, params: dict[str, Any] | None = None, thresholds: dict[str, float | None] | None = None
    ):
        super().__init__(params, thresholds)
        validate.integer("infidelity.n_perturb", self.p["n_perturb"], min=2)
        validate.rows("infidelity.chunk", self.p["chunk"])
        validate.integer(
            "infidelity.max_images", self.p["max_images"], min=1, allow_none=True, hint="null: all images"
        )
        validate.number("infidelity.sigma", self.p["sigma"], min=0.0, min_open=True)
        self._deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._model: Any = None  # the model the cached deltas belong to

    def _perturbed(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image the perturbations ``(n, H, W)`` and ``f(x) − f(x − I)`` ``(n,)``; both
        depend on the model and the image only, so they are computed once per image."""
        n, (h, w) = int(self.p["n_perturb"]), batch.x.shape[2:]
        if batch.model is not self._model:
            self._deltas, self._model = {}, batch.model
        todo = [i for i, name in enumerate(batch.images) if name not in self._deltas]
        if todo:
            pert = torch.stack(
                [
                    infidelity_perturbations(batch.seed, batch.images[i], n, h, w, self.p["sigma"])
                    for i in todo
                ]
            )
            x = batch.x[todo]
            xp = (x[:, None] - pert[:, :, None].to(x.device, x.dtype)).reshape(-1, *x.shape[1:])
            t = batch.targets[todo].to(x.device)
            f0 = _top1(batch.model, x, t, rows_per_pass(self.p["chunk"], "forward"))
            fp = _top1(
                batch.model, xp, t.repeat_interleave(n), rows_per_pass(self.p["chunk"], "forward")
            ).view(len(todo), n)
            for k, i in enumerate(todo):
                self._deltas[batch.images[i]] = (pert[k], f0[k] - fp[k])
        got = [self._deltas[name] for name in batch.images]
        return torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got])

    def shared_cost(self, ctx: CostContext) -> Passes:
        """``f(x)`` and ``f(x − I)`` for every perturbation, once per image."""
        return Passes(forward=1 + int(self.p["n_perturb"]))

    def measure(
        self, batch: Batch, source: Any, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        if len(batch) == 0:
            return {v: Measurement() for v in maps}
        pert, delta = self._perturbed(batch)
        out: dict[Variant, Measurement] = {}
        for v, m in maps.items():
            m64 = torch.nan_to_num(m.detach().double().cpu())
            a = torch.einsum("bhw,bnhw->bn", m64, pert.double())
            vals = infidelity_values(a, delta)
            out[v] = Measurement(values=[float(x) for x in vals], images=list(batch.images))
        return out

    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        if not m.values:
            return self.result(variant, m, "skipped", None, "no image was measured")
        value = m.mean()
        status = higher_is_worse(value, self.t)
        msg = (
            f"mean normalized infidelity {value:.4g} ({self.p['n_perturb']} Gaussian perturbations "
            f"of σ = {float(self.p['sigma']):g} per image; lower is better, judged against the "
            "random control)"
        )
        return self.result(variant, m, status, value, msg)
