"""Caveats about post-processing, computed from this audit's measurements (see docs/report.md).

Never boilerplate: each caveat is produced only when its numbers support it and it carries
them. Kinds:

- ``abs_discards``: the share of FullGrad's bias-gradient mass whose sign ``abs`` throws away
  (the negative part of each layer's term, Σ max(−t, 0) / Σ |t|), per layer.
- ``psi_changes_verdict``: a check whose FullGrad verdict differs between ψ presets.
- ``signed_vs_paper``: FullGrad ``signed`` against ``paper`` on class sensitivity (the paper's
  ψ is less class-sensitive on many models; the report says which way it goes here).
- ``resembles_edge``: a method whose maps resemble the model-independent edge control more
  than they resemble its own maps on the fully randomized model.
- ``survives_top_randomization``: a method whose maps stay alike the original (similarity at
  or above the FAIL threshold) while at least the top third of the cascade is randomized: the
  maps do not reflect the top layers (Adebayo et al. 2018, guided backprop in Fig. 2).
- ``choose_psi_by_metric``: which ψ each check favours here; the FullGrad authors note that ψ
  must be chosen by the metric that matters (Srinivas & Fleuret 2019, §6).
- ``control_passes``: a control (``random``, ``edge``) that PASSES a check it must fail: on
  this model that check cannot tell a map from noise or image edges, so its other verdicts
  are not evidence (docs/methods.md, "Controls").
"""

from __future__ import annotations

from typing import Any

from .result import CheckResult

__all__ = ["AbsDiscards", "compute_caveats"]

#: For these checks a higher value is better; for the others (similarities) lower is better.
_HIGHER_IS_BETTER = {"perturbation", "sensitivity_n", "sign_flip", "pointing_game",
                     "restricted_pointing_game", "bn_folding"}
_RANK = {"pass": 0, "warn": 1, "fail": 2}


class AbsDiscards:
    """Accumulates, per FullGrad layer, the negative and absolute mass of its term."""

    def __init__(self) -> None:
        self.neg: dict[str, float] = {}
        self.abs: dict[str, float] = {}

    def add(self, fg: Any) -> None:
        """Add one batch's decomposition (:class:`~saliaudit.methods.fullgrad.FullGradients`)."""
        from .psi import TermStats

        layers = [("input (∇ₓf ⊙ x)", TermStats(fg.input_term))]
        layers += [(t.name, t.stats) for t in fg.spatial_terms]
        for name, st in layers:
            a = float(st.sum("abs").sum())
            s = float(st.sum("keep").sum())
            self.abs[name] = self.abs.get(name, 0.0) + a
            self.neg[name] = self.neg.get(name, 0.0) + max(a - s, 0.0) / 2

    def per_layer(self) -> dict[str, float]:
        return {k: self.neg[k] / self.abs[k] for k in self.abs if self.abs[k] > 0}

    def total(self) -> float | None:
        a = sum(self.abs.values())
        return sum(self.neg.values()) / a if a > 0 else None


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _survivors(checks: list[CheckResult]) -> list[dict[str, Any]]:
    """Maps that stay alike the original while the top third of the cascade is randomized."""
    out = []
    for c in checks:
        if c.check != "randomization" or c.status not in _RANK or c.method in ("random", "edge"):
            continue
        metric = c.series.get("verdict_metric", "spearman_abs")
        curve = c.series.get(f"cascading_{metric}") or {}
        mean, steps = curve.get("mean") or [], curve.get("x") or []
        fail = c.thresholds.get("fail")
        if not mean or fail is None or len(mean) < 3:
            continue
        kept = 0
        for v in mean:
            if v is None or v < fail:
                break
            kept += 1
        if kept >= -(-len(mean) // 3) and kept < len(mean):
            out.append({"kind": "survives_top_randomization", "variant": c.variant,
                        "numbers": {"steps_kept": kept, "steps": len(mean),
                                    "curve": dict(zip(map(str, steps), mean))},
                        "message": (
                            f"{c.variant} maps stay alike the original (similarity ≥ {fail:g}) "
                            f"until {steps[kept]} is randomized ({kept} of {len(mean)} cascade "
                            f"steps, values {', '.join(f'{v:.2f}' for v in mean[:kept + 1])}): "
                            "they do not reflect the top layers of the model "
                            "(Adebayo et al. 2018).")})
    return out


def compute_caveats(checks: list[CheckResult], discards: AbsDiscards | None,
                    edge_similarity: dict[str, float]) -> list[dict[str, Any]]:
    """The caveats supported by the measurements, each with a message and its numbers."""
    out: list[dict[str, Any]] = []
    if discards is not None and discards.total() is not None:
        per = discards.per_layer()
        total = discards.total()
        worst = sorted(per.items(), key=lambda kv: -kv[1])[:3]
        out.append({"kind": "abs_discards", "numbers": {"total": total, "per_layer": per},
                    "message": (
                        f"abs (ψ paper, abs, per-channel) discards the sign of {total:.0%} of "
                        "FullGrad's gradient mass on this model: that share is negative evidence "
                        "that the abs map shows as positive. Largest shares: "
                        + ", ".join(f"{n} {v:.0%}" for n, v in worst) + ".")})
    fg = [c for c in checks if c.method == "fullgrad" and c.psi and c.status in _RANK]
    by_check: dict[str, list[CheckResult]] = {}
    for c in fg:
        by_check.setdefault(c.check, []).append(c)
    for check, cells in by_check.items():
        statuses = {c.status for c in cells}
        if len(statuses) > 1:
            best = min(cells, key=lambda c: _RANK[c.status])
            worst_c = max(cells, key=lambda c: _RANK[c.status])
            out.append({"kind": "psi_changes_verdict", "check": check,
                        "numbers": {c.psi: {"status": c.status, "value": c.value} for c in cells},
                        "message": (
                            f"{check}: the verdict depends on ψ — {best.status.upper()} under "
                            f"{best.psi} ({_fmt(best.value)}) but {worst_c.status.upper()} under "
                            f"{worst_c.psi} ({_fmt(worst_c.value)}). The post-processing, not the "
                            "model, decides this verdict.")})
        valued = [c for c in cells if c.value is not None]
        if len(valued) > 1:
            hib = check in _HIGHER_IS_BETTER
            best = max(valued, key=lambda c: c.value if hib else -c.value)
            out.append({"kind": "choose_psi_by_metric", "check": check,
                        "numbers": {c.psi: c.value for c in valued},
                        "message": (
                            f"{check} favours ψ={best.psi} on this model ({_fmt(best.value)}; "
                            + ", ".join(f"{c.psi} {_fmt(c.value)}" for c in valued if c is not best)
                            + "). Choose ψ by the metric that matters for your use "
                            "(Srinivas & Fleuret 2019, §6).")})
    cs = {c.psi: c for c in by_check.get("class_sensitivity", [])}
    if "signed" in cs and "paper" in cs and cs["signed"].value is not None \
            and cs["paper"].value is not None:
        s, p = cs["signed"].value, cs["paper"].value
        more = "more" if s < p else "not more"
        out.append({"kind": "signed_vs_paper", "numbers": {"signed": s, "paper": p},
                    "message": (
                        f"FullGrad signed maps are {more} class-sensitive than the paper's ψ here "
                        f"(similarity of top-1 and lowest-class maps {s:.3g} signed vs {p:.3g} "
                        "paper; lower means the map changes more with the class).")})
    out += _survivors(checks)
    for c in checks:
        if c.control == "unexpected":
            out.append({"kind": "control_passes", "check": c.check, "variant": c.variant,
                        "numbers": {"value": c.value, "thresholds": dict(c.thresholds)},
                        "message": (
                            f"{c.check} PASSES the {c.method} control ({c.variant}, "
                            f"{_fmt(c.value)}), a map that ignores the model: on this model the "
                            f"check cannot tell an explanation from {'noise' if c.method == 'random' else 'image edges'}, "
                            f"so its verdicts for the other methods are not evidence. "
                            "Change its parameters or thresholds (saliaudit checks).")})
    rand = {c.variant: c.value for c in checks
            if c.check == "randomization" and c.value is not None}
    for variant, sim_edge in sorted(edge_similarity.items()):
        if variant.startswith("edge/") or variant not in rand:
            continue
        if sim_edge > rand[variant] and sim_edge >= 0.3:
            out.append({"kind": "resembles_edge", "variant": variant,
                        "numbers": {"edge_similarity": sim_edge, "randomized_similarity": rand[variant]},
                        "message": (
                            f"{variant} maps resemble the model-independent edge control "
                            f"(Spearman {sim_edge:.2f}) more than their own maps on the fully "
                            f"randomized model ({rand[variant]:.2f}): they may show image "
                            "structure rather than what the model uses (Adebayo et al. 2018).")})
    return out
