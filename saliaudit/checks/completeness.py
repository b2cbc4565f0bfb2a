"""Completeness of the full-gradient decomposition (Srinivas & Fleuret, NeurIPS 2019, eq. 1).

``f(x) = Σ ∇ₓf ⊙ x + Σ_ops ⟨∂f/∂y, b⟩`` holds exactly for every op whose bias is accounted.
The relative residual ``|f − Σ terms| / max(|f|, 1e-6)`` per image measures whether the
decomposition really explains the logit; a large one means biases are missing (as in the
official code on networks with implicit biases) and the FullGrad maps omit part of the model.
"""

from __future__ import annotations

import torch

from ..result import CheckResult
from .base import Batch, Check, MapSource, Measurement, Variant, register


@register
class Completeness(Check):
    name = "completeness"
    title = "Completeness of the FullGrad decomposition"
    summary = (
        "Does the FullGrad decomposition add up to the logit? The input-gradient term "
        "plus every bias term must equal f(x); missing biases leave part of the model "
        "unexplained (Srinivas & Fleuret 2019, eq. 1)."
    )
    reference = (
        "Srinivas & Fleuret, Full-Gradient Representation for Neural Network Visualization, NeurIPS 2019"
    )
    metric = "max relative residual"
    thresholds = {"fail": 1e-3}
    short = "compl"
    higher_is_better = False  # the residual
    order = 10
    records = "completeness"  # results["completeness"]: the per-image residuals
    requires = frozenset({"decomposition"})
    compares_psi = False
    aggregate = "worst"  # every image must add up: the worst residual decides

    def measure(
        self, batch: Batch, source: MapSource, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        fg = source.decompose(batch.model, batch.x, batch.targets)  # type: ignore[attr-defined]
        m = Measurement(
            values=[float(r) for r in fg.residual],
            images=list(batch.images),
            extra={"unaccounted": list(fg.unaccounted)},
        )
        return {self.variants(source)[0]: m}

    def variants(self, source: MapSource) -> list[Variant]:
        """One cell per method: the decomposition does not depend on the post-processing."""
        return [Variant(source.method)]

    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        tol = float(self.t["fail"])
        unaccounted = sorted(set(m.extra.get("unaccounted", [])))
        m.extra["unaccounted"] = unaccounted
        if not m.values:
            return self.result(variant, m, "skipped", None, "no image was decomposed")
        worst = max(m.values, key=lambda v: v if v == v else float("inf"))
        bad = [v for v in m.values if not v <= tol]
        if bad:
            extra = f"; unaccounted ops: {', '.join(unaccounted[:3])}" if unaccounted else ""
            return self.result(
                variant,
                m,
                "fail",
                worst,
                f"{len(bad)} of {len(m.values)} images have a relative residual "
                f"above {tol:g} (worst {worst:.2e}){extra}: the maps leave part "
                "of the logit unexplained",
            )
        return self.result(
            variant,
            m,
            "pass",
            worst,
            f"the decomposition adds up to the logit on all {len(m.values)} "
            f"images (worst relative residual {worst:.2e} ≤ {tol:g})",
        )
