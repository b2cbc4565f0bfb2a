"""The audit's plan as text: printed before the audit starts and shown in the report.

Takes the ``plan`` entry of the results (a plain dict), never the live objects."""

from __future__ import annotations

from typing import Any

__all__ = ["duration", "plan_lines", "reduction_text", "memory", "cover_text", "plan_view"]


def duration(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds is None:
        return "–"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def memory(n: float | None) -> str:
    if not n:
        return "–"
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def reduction_text(r: dict[str, Any]) -> str:
    """One budget reduction in words: ``randomization: max_images 16 → 8 (a class-stratified
    sample of 8 of the 24 images)``."""
    before = "all" if r.get("from") is None else r.get("from")
    return f"{r.get('check')}: {r.get('param')} {before} → {r.get('to')} ({r.get('why')})"


def plan_lines(plan: dict[str, Any]) -> list[str]:
    """The plan: calibration, one line per stage with work, the estimate and the budget."""
    cal = plan.get("calibration") or {}
    lines = [
        f"plan · profile {plan.get('profile')} · one pass of the model at batch {cal.get('batch')}: "
        f"forward {1000 * float(cal.get('forward_s_per_row') or 0):.1f} ms, forward+backward "
        f"{1000 * float(cal.get('backward_s_per_row') or 0):.1f} ms per image"
        + (
            f"; ROAD's imputation {1000 * float(cal['impute_s_per_row']):.1f} ms per image and mask"
            if cal.get("impute_s_per_row")
            else ""
        )
    ]
    stages = plan.get("stages") or {}
    width = max((len(k) for k in stages), default=10)
    for name, st in stages.items():
        p = st.get("passes") or {}
        if not st.get("estimated_s"):
            continue
        lines.append(
            f"  {name:<{width}}  {st.get('images'):>5} img  {p.get('forward', 0):>9.0f} fwd  "
            f"{p.get('backward', 0):>8.0f} fwd+bwd  {p.get('compare', 0):>8.0f} cmp  "
            f"≈ {duration(st.get('estimated_s'))}"
        )
    lines.append(
        f"  estimated {duration(plan.get('estimated_s'))} (model passes alone "
        f"{duration(plan.get('floor_s'))}), peak memory ≈ {memory(plan.get('estimated_peak_bytes'))}"
    )
    budget = plan.get("budget_s")
    if budget is not None:
        reductions = plan.get("reductions") or []
        head = f"  budget {duration(budget)}: "
        if not reductions:
            lines.append(head + "fits without reductions")
        else:
            lines.append(head + f"{len(reductions)} reduction(s):")
            lines += [f"    {reduction_text(r)}" for r in reductions]
        if not plan.get("fits_budget", True):
            lines.append(
                "  the budget cannot be met even with every reduction; the audit runs at its minimum"
            )
    return lines


def cover_text(plan: dict[str, Any]) -> str:
    """The cover's line on cost: profile, estimate against measured time, the budget."""
    text = f"profile {plan.get('profile')}; estimated {duration(plan.get('estimated_s'))}"
    if plan.get("measured_s") is not None:
        text += f", took {duration(plan.get('measured_s'))}"
    if plan.get("budget_s") is not None:
        n = len(plan.get("reductions") or [])
        text += f"; budget {duration(plan.get('budget_s'))}: " + (
            f"{n} reduction(s), listed under Cost and plan" if n else "no reduction needed"
        )
    return text


def plan_view(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The report's Cost and plan table: per stage the images, the planned passes, the floor,
    the estimate and the measured time; the budget's reductions in words."""
    plan = doc.get("plan") if isinstance(doc, dict) else None
    if not isinstance(plan, dict) or not plan.get("stages"):
        return None
    rows = []
    for name, st in plan["stages"].items():
        p = st.get("passes") or {}
        if not (st.get("estimated_s") or st.get("measured_s")):
            continue
        rows.append(
            {
                "stage": name,
                "images": st.get("images"),
                "forward": f"{p.get('forward', 0):.0f}",
                "backward": f"{p.get('backward', 0):.0f}",
                "compare": f"{p.get('compare', 0):.0f}",
                "floor": duration(st.get("floor_s")),
                "estimated": duration(st.get("estimated_s")),
                "measured": duration(st.get("measured_s")),
            }
        )
    cal = plan.get("calibration") or {}
    intro = (
        f"Before the audit, one pass of the model at {cal.get('batch')} images took "
        f"{1000 * float(cal.get('forward_s_per_row') or 0):.1f} ms forward and "
        f"{1000 * float(cal.get('backward_s_per_row') or 0):.1f} ms forward and backward per image; "
        "each stage's passes are those its method and check declare, the floor is those passes "
        "alone, the estimate adds the methods' measured time per map, the map comparisons and "
        "ROAD's imputation (timed on a few images when ROAD runs). "
        f"Estimated {duration(plan.get('estimated_s'))}, measured {duration(plan.get('measured_s'))} "
        f"(profile {plan.get('profile')})."
    )
    if cal.get("error"):
        intro += f" The passes could not be timed ({cal['error']}), so there is no estimate."
    budget = None
    if plan.get("budget_s") is not None:
        reductions = [reduction_text(r) for r in plan.get("reductions") or []]
        budget = {
            "text": f"Budget {duration(plan.get('budget_s'))}: "
            + (
                "these reductions were made before the audit started, most expensive check first; "
                "the verdicts of the reduced checks rest on the images and settings below."
                if reductions
                else "the audit fitted without reductions."
            )
            + (
                ""
                if plan.get("fits_budget", True)
                else " Even with every reduction the estimate exceeded the budget."
            ),
            "reductions": reductions,
        }
    return {"intro": intro, "rows": rows, "budget": budget}
