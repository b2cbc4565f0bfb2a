"""Caveats about post-processing, computed from this audit's measurements (design.md §4).

Never boilerplate: each caveat is produced only when its numbers support it and it carries
them. Kinds:

- ``abs_discards``: the share of FullGrad's bias-gradient mass whose sign ``abs`` throws away
  (the negative part of each layer's term, Σ max(−t, 0) / Σ |t|), per layer.
- ``psi_changes_verdict``: a check whose verdict for a method with ψ variants (FullGrad)
  differs between ψ presets.
- ``choose_psi_by_metric``: which ψ each check favours here (in the check's direction,
  :attr:`~saliaudit.checks.base.Check.higher_is_better`); the FullGrad authors note that ψ
  must be chosen by the metric that matters (Srinivas & Fleuret 2019, §6).
- whatever a check's own :meth:`~saliaudit.checks.base.Check.caveats` finds in its cells
  (class_sensitivity: ``signed_vs_paper``; randomization: ``survives_top_randomization``,
  ``resembles_edge``).
- ``control_passes``: a control (``random``, ``edge``) that PASSES a check it must fail: on
  this model that check cannot tell a map from noise or image edges, so its other verdicts
  are not evidence (design.md §3).
"""

from __future__ import annotations

from typing import Any

from .result import CheckResult

__all__ = ["AbsDiscards", "compute_caveats"]

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


def _check_class(name: str) -> Any:
    """The registered check class of ``name`` (``None`` for a check nobody registered)."""
    from .checks import CHECKS, check_names

    check_names()  # discovers the check modules once
    return CHECKS.get(name)


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
    psi_cells = [c for c in checks if c.psi and c.status in _RANK]
    by_check: dict[tuple[str, str], list[CheckResult]] = {}
    for c in psi_cells:
        by_check.setdefault((c.check, c.method), []).append(c)
    for (check, _method), cells in by_check.items():
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
            cls = _check_class(check)
            hib = bool(cls.higher_is_better) if cls is not None else False
            best = max(valued, key=lambda c: c.value if hib else -c.value)
            out.append({"kind": "choose_psi_by_metric", "check": check,
                        "numbers": {c.psi: c.value for c in valued},
                        "message": (
                            f"{check} favours ψ={best.psi} on this model ({_fmt(best.value)}; "
                            + ", ".join(f"{c.psi} {_fmt(c.value)}" for c in valued if c is not best)
                            + "). Choose ψ by the metric that matters for your use "
                            "(Srinivas & Fleuret 2019, §6).")})
    names = list(dict.fromkeys(c.check for c in checks))
    context = {"edge_similarity": dict(edge_similarity)}
    for name in names:
        cls = _check_class(name)
        if cls is not None:
            out += cls.caveats([c for c in checks if c.check == name], context)
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
    return out
