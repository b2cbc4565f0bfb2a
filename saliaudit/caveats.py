"""Caveats about post-processing, computed from this audit's measurements (see docs/report.md).

Never boilerplate: each caveat is produced only when its numbers support it and it carries
them. Kinds:

- ``abs_discards``: the share of FullGrad's gradient mass (input-gradient and bias terms)
  whose sign ``abs`` throws away
  (the negative part of each layer's term, Σ max(−t, 0) / Σ |t|), per layer.
- ``psi_changes_verdict``: a check whose decisive verdicts for a method with ψ variants
  (FullGrad) differ between ψ presets, with a paired difference over the same images whose
  95 % interval excludes 0.
- ``choose_psi_by_metric``: the ψ a check favours here (in the check's direction,
  :attr:`~saliaudit.checks.base.Check.higher_is_better`, or the cells' ``series["higher_is_better"]``
  for a check whose direction depends on its parameters), named only when its paired
  difference with the next best ψ has a 95 % interval that excludes 0; otherwise
  ``no_better_psi`` says that no ψ is distinguishably better on these images. The FullGrad
  authors note that ψ must be chosen by the metric that matters (Srinivas & Fleuret 2019, §6).
- whatever a check's own :meth:`~saliaudit.checks.base.Check.caveats` finds in its cells
  (randomization: ``survives_top_randomization``,
  ``resembles_edge``).
- ``control_passes``: a control (``random``, ``edge``) that PASSES a check it must fail: on
  this model that check cannot tell a map from noise or image edges, so its other verdicts
  are not evidence (docs/methods.md, "Controls").
"""

from __future__ import annotations

import zlib
from typing import Any

from .result import CheckResult
from .stats import Interval, mean_interval

__all__ = ["AbsDiscards", "compute_caveats"]

_RANK = {"pass": 0, "warn": 1, "fail": 2}


class AbsDiscards:
    """Accumulates, per FullGrad layer, the negative and absolute mass of its term."""

    def __init__(self) -> None:
        self.neg: dict[str, float] = {}
        self.abs: dict[str, float] = {}
        #: Each batch's ``[(layer, abs mass, negative mass)]``, in order (saved for --resume).
        self.log: list[list[tuple[str, float, float]]] = []

    def add(self, fg: Any) -> None:
        """Add one batch's decomposition (:class:`~saliaudit.methods.fullgrad.FullGradients`)."""
        from .psi import TermStats

        layers = [("input (∇ₓf ⊙ x)", TermStats(fg.input_term))]
        layers += [(t.name, t.stats) for t in fg.spatial_terms]
        parts = []
        for name, st in layers:
            a = float(st.sum("abs").sum())
            s = float(st.sum("keep").sum())
            parts.append((name, a, max(a - s, 0.0) / 2))
        self.add_parts(parts)

    def add_parts(self, parts: list[tuple[str, float, float]]) -> None:
        """Add one batch's masses (what :meth:`add` computed; a resumed audit replays them)."""
        self.log.append(list(parts))
        for name, a, neg in parts:
            self.abs[name] = self.abs.get(name, 0.0) + a
            self.neg[name] = self.neg.get(name, 0.0) + neg

    def per_layer(self) -> dict[str, float]:
        return {k: self.neg[k] / self.abs[k] for k in self.abs if self.abs[k] > 0}

    def total(self) -> float | None:
        a = sum(self.abs.values())
        return sum(self.neg.values()) / a if a > 0 else None


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def paired_difference(a: CheckResult, b: CheckResult) -> Interval | None:
    """Mean of ``a − b`` over the images both cells measured, with its 95 % interval."""
    va = {p.get("image"): p.get("value") for p in a.per_image}
    vb = {p.get("image"): p.get("value") for p in b.per_image}
    diffs = [
        float(va[k]) - float(vb[k])
        for k in va
        if isinstance(va[k], (int, float)) and isinstance(vb.get(k), (int, float))
    ]
    seed = zlib.crc32(f"{a.check}/{a.variant}/{b.variant}".encode())
    return mean_interval(diffs, seed=seed)


def _psi_caveats(check: str, method: str, cells: list[CheckResult], hib: bool) -> list[dict[str, Any]]:
    """ψ comparisons of one (check, method), claimed only where a paired difference over
    the same images has a 95 % interval that excludes 0 (FullGrad §6: choose ψ by the metric
    that matters; the choice must be evidence, not noise)."""
    out: list[dict[str, Any]] = []
    valued = [c for c in cells if c.value is not None]
    if len(valued) < 2:
        return out
    ranked = sorted(valued, key=lambda c: -c.value if hib else c.value)  # best first
    best, runner = ranked[0], ranked[1]
    iv = paired_difference(best, runner)

    def shown(d: Interval) -> str:
        return f"{d.mean:+.3g}, 95 % CI [{d.lo:+.3g}, {d.hi:+.3g}], n = {d.n}"

    decisive = iv is not None and iv.n >= 2 and (iv.lo > 0 or iv.hi < 0)
    numbers = {c.psi: c.value for c in valued}
    if decisive:
        out.append(
            {
                "kind": "choose_psi_by_metric",
                "check": check,
                "method": method,
                "numbers": {
                    **numbers,
                    "difference": iv.mean,
                    "ci": [iv.lo, iv.hi],
                    "n": iv.n,
                    "best": best.psi,
                    "next": runner.psi,
                },
                "message": (
                    f"{check}: {method} with ψ={best.psi} does better than the next best "
                    f"ψ={runner.psi} on the same images (paired difference {shown(iv)}). "
                    "Choose ψ by the metric that matters for your use (Srinivas & Fleuret "
                    "2019, §6)."
                ),
            }
        )
    else:
        n = iv.n if iv is not None else 0
        out.append(
            {
                "kind": "no_better_psi",
                "check": check,
                "method": method,
                "numbers": {
                    **numbers,
                    **({"difference": iv.mean, "ci": [iv.lo, iv.hi]} if iv is not None else {}),
                    "n": n,
                },
                "message": (
                    f"{check}: no ψ of {method} is distinguishably better on these {n} "
                    f"images (best {best.psi} vs {runner.psi}: "
                    + (shown(iv) if iv is not None else "no shared image")
                    + ")."
                ),
            }
        )
    statuses = {c.status for c in cells}
    if len(statuses) > 1:
        good = min(cells, key=lambda c: _RANK[c.status])
        bad = max(cells, key=lambda c: _RANK[c.status])
        d = paired_difference(good, bad)
        if (
            d is not None
            and d.n >= 2
            and (d.lo > 0 or d.hi < 0)
            and not good.inconclusive
            and not bad.inconclusive
        ):
            out.append(
                {
                    "kind": "psi_changes_verdict",
                    "check": check,
                    "method": method,
                    "numbers": {
                        **{c.psi: {"status": c.status, "value": c.value} for c in cells},
                        "difference": d.mean,
                        "ci": [d.lo, d.hi],
                        "n": d.n,
                    },
                    "message": (
                        f"{check}: the verdict of {method} depends on ψ — "
                        f"{good.status.upper()} under {good.psi} ({_fmt(good.value)}) but "
                        f"{bad.status.upper()} under {bad.psi} ({_fmt(bad.value)}); paired "
                        f"difference {shown(d)}. The post-processing, not the model, "
                        "decides this verdict."
                    ),
                }
            )
    return out


def _check_class(name: str) -> Any:
    """The registered check class of ``name`` (``None`` for a check nobody registered)."""
    from .checks import CHECKS, check_names

    check_names()  # discovers the check modules once
    return CHECKS.get(name)


#: The leading tokens' share of |f(x)| above which FullGrad's maps are called partial.
LEADING_SHARE = 0.25


def leading_tokens_caveat(records: list[Any]) -> dict[str, Any] | None:
    """On a token model: the class (and distillation) tokens' terms carry a share of the logit
    that no map shows. Raised when the 95 % interval of the mean share |Σ leading| / |f(x)|
    lies above :data:`LEADING_SHARE`."""
    from .stats import mean_interval

    shares = [
        abs(r.leading_tokens) / max(abs(r.logit), 1e-6)
        for r in records
        if getattr(r, "leading_tokens", None) is not None
    ]
    iv = mean_interval(shares) if shares else None
    if iv is None or iv.lo <= LEADING_SHARE:
        return None
    return {
        "kind": "leading_tokens_share",
        "numbers": {"n": iv.n, "mean": iv.mean, "ci": iv.as_list(), "threshold": LEADING_SHARE},
        "message": (
            f"On this model the class token's terms of FullGrad's decomposition carry on average "
            f"{iv.mean:.0%} of |f(x)| (95 % CI [{iv.lo:.0%}, {iv.hi:.0%}], n = {iv.n} images, above "
            f"{LEADING_SHARE:.0%}): that share is in the completeness but in no map, because the "
            "class token stands for no patch. FullGrad's maps of this model show the patch tokens' "
            "and the input-gradient terms only: read them as a partial explanation."
        ),
    }


def compute_caveats(
    checks: list[CheckResult],
    discards: AbsDiscards | None,
    edge_similarity: dict[str, float],
    completeness: list[Any] | None = None,
) -> list[dict[str, Any]]:
    """The caveats supported by the measurements, each with a message and its numbers
    (``completeness``: FullGrad's per-image records, for the leading tokens' share)."""
    out: list[dict[str, Any]] = []
    lead = leading_tokens_caveat(list(completeness or []))
    if lead is not None:
        out.append(lead)
    if discards is not None and discards.total() is not None:
        per = discards.per_layer()
        total = discards.total()
        worst = sorted(per.items(), key=lambda kv: -kv[1])[:3]
        out.append(
            {
                "kind": "abs_discards",
                "numbers": {"total": total, "per_layer": per},
                "message": (
                    f"abs (ψ paper, abs, per-channel) discards the sign of {total:.0%} of "
                    "FullGrad's gradient mass on this model: that share is negative evidence "
                    "that the abs map shows as positive. Largest shares: "
                    + ", ".join(f"{n} {v:.0%}" for n, v in worst)
                    + "."
                ),
            }
        )
    psi_cells = [c for c in checks if c.psi and c.status in _RANK]
    by_check: dict[tuple[str, str], list[CheckResult]] = {}
    for c in psi_cells:
        cls = _check_class(c.check)
        if cls is None or getattr(cls, "compares_psi", True):
            by_check.setdefault((c.check, c.method), []).append(c)
    for (check, method), cells in by_check.items():
        cls = _check_class(check)
        hib = bool(cls.higher_is_better) if cls is not None else False
        # a check whose direction depends on its parameters (randomization's eMPRT) says so
        hib = bool(cells[0].series.get("higher_is_better", hib))
        out += _psi_caveats(check, method, cells, hib)
    names = list(dict.fromkeys(c.check for c in checks))
    context = {"edge_similarity": dict(edge_similarity)}
    for name in names:
        cls = _check_class(name)
        if cls is not None:
            out += cls.caveats([c for c in checks if c.check == name], context)
    for c in checks:
        if c.control == "unexpected":
            out.append(
                {
                    "kind": "control_passes",
                    "check": c.check,
                    "variant": c.variant,
                    "numbers": {"value": c.value, "thresholds": dict(c.thresholds)},
                    "message": (
                        f"{c.check} PASSES the {c.method} control ({c.variant}, "
                        f"{_fmt(c.value)}), a map that ignores the model: on this model the "
                        f"check cannot tell an explanation from {'noise' if c.method == 'random' else 'image edges'}, "
                        f"so its verdicts for the other methods are not evidence. "
                        "Change its parameters or thresholds (saliaudit checks)."
                    ),
                }
            )
    return out
