"""Completeness of the full-gradient decomposition (Srinivas & Fleuret, NeurIPS 2019, eq. 1).

``f(x) = Σ ∇ₓf ⊙ x + Σ_ops ⟨∂f/∂y, b⟩`` holds exactly for every op whose bias is accounted.
The relative residual ``|f − Σ terms| / max(|f|, 1e-6)`` per image measures whether the
decomposition really explains the logit; a large one means biases are missing (as in the
official code on networks with implicit biases) and the FullGrad maps omit part of the model.
"""

from __future__ import annotations

import statistics
from typing import Any

from ..result import CheckResult, CompletenessRecord
from .base import Check, register


@register
class Completeness(Check):
    name = "completeness"
    summary = ("Does the FullGrad decomposition add up to the logit? "
               "Missing biases leave part of the model unexplained (Srinivas & Fleuret 2019, eq. 1).")
    thresholds = {"fail": 1e-3}

    def measure(self, *, records: list[CompletenessRecord], **_: Any) -> dict[str, Any]:
        values = [r.relative_residual for r in records]
        unaccounted = sorted({u for r in records for u in r.unaccounted})
        return {"per_image": [{"image": r.image, "value": r.relative_residual} for r in records],
                "max": max(values) if values else None,
                "spread": statistics.pstdev(values) if len(values) > 1 else 0.0,
                "unaccounted": unaccounted}

    def judge(self, m: dict[str, Any], thresholds: dict[str, float]) -> CheckResult:
        tol = thresholds["fail"]
        worst = m["max"]
        if worst is None:
            return CheckResult(self.name, "fullgrad", None, "skipped", None, "max relative residual",
                               thresholds, "no image was decomposed")
        bad = [p for p in m["per_image"] if not p["value"] <= tol]
        if bad:
            extra = f"; unaccounted ops: {', '.join(m['unaccounted'][:3])}" if m["unaccounted"] else ""
            msg = (f"{len(bad)} of {len(m['per_image'])} images have a relative residual above "
                   f"{tol:g} (worst {worst:.2e}){extra}: the maps leave part of the logit unexplained")
            status = "fail"
        else:
            msg = (f"the decomposition adds up to the logit on all {len(m['per_image'])} images "
                   f"(worst relative residual {worst:.2e} ≤ {tol:g})")
            status = "pass"
        return CheckResult(self.name, "fullgrad", None, status, worst, "max relative residual",
                           thresholds, msg, spread=m["spread"], per_image=m["per_image"],
                           series={"unaccounted": m["unaccounted"]})
