"""Calibration against the controls: a method must beat them before it can PASS.

A check is trusted only where its must-fail controls (``random``, ``edge``, ...) fail it. For
every judged cell of a real method, each must-fail control of that check that was measured
on the same images is compared with it image by image (one-sided Wilcoxon signed-rank test,
:func:`saliaudit.stats.paired_better`), in the direction the check calls better. The
p-values of the whole audit are adjusted together (Benjamini–Hochberg); a PASS whose method is
not significantly better than every control becomes WARN, with the reason.
"""

from __future__ import annotations

from typing import Any

from .. import stats
from ..result import CheckResult

__all__ = ["calibrate", "control_partner"]


def control_partner(cell: CheckResult, controls: list[CheckResult]) -> CheckResult | None:
    """The control cell to compare ``cell`` with: the same post-processing, or for a ψ
    variant the control's ``signed``/``abs`` map that keeps the same sign handling."""
    if not controls:
        return None
    want = cell.post
    if want is None and cell.psi is not None:
        want = "signed" if cell.signed else "abs"
    for c in controls:
        if c.post == want:
            return c
    return controls[0]


def _is_control(method: str) -> bool:
    from ..methods import METHODS, method_names

    m = METHODS.get(method) if method in method_names() else None
    return m is not None and m.family == "control"


def calibrate(
    cells: list[CheckResult], checks: dict[str, Any], *, alpha: float = stats.ALPHA
) -> dict[str, Any]:
    """Test every judged method cell against its check's must-fail controls; adjust all
    p-values (Benjamini–Hochberg); downgrade PASS cells that do not beat every control.
    Fills ``cell.controls``; returns what the results record about the procedure."""
    tests: list[tuple[CheckResult, str, int, float]] = []
    for cell in cells:
        check = checks.get(cell.check)
        if check is None or cell.status not in ("pass", "warn", "fail"):
            continue
        if _is_control(cell.method) and cell.method not in getattr(check, "controls_must_fail", ()):
            continue  # a control the check makes no demand on: for reference, never tested
        if cell.method in getattr(check, "controls_must_fail", ()):
            if getattr(check, "verdict_from_controls", False) and cell.status == "pass":
                cell.status = "fail"  # the reference of the test cannot beat itself
                cell.message = (
                    "the control this check tests every method against: by "
                    f"definition not above itself. {cell.message}"
                )
            continue
        for name in sorted(getattr(check, "controls_must_fail", ())):
            pool = [
                c
                for c in cells
                if c.check == cell.check and c.method == name and c.status in ("pass", "warn", "fail")
            ]
            partner = control_partner(cell, pool)
            if partner is None:
                continue
            n, p = check.control_test(cell, partner)
            if p is None:
                cell.controls[name] = {
                    "n": n,
                    "p": None,
                    "p_adjusted": None,
                    "better": False,
                    "partner": partner.variant,
                }
                continue
            tests.append((cell, name, n, p))
            cell.controls[name] = {
                "n": n,
                "p": p,
                "p_adjusted": None,
                "better": False,
                "partner": partner.variant,
            }
    adjusted = stats.adjust([t[3] for t in tests])
    for (cell, name, _n, _p), q in zip(tests, adjusted):
        cell.controls[name].update(p_adjusted=q, better=bool(q < alpha))
    for cell in cells:
        check = checks.get(cell.check)
        if _is_control(cell.method):
            continue  # a control is never held to the controls
        if (
            cell.status == "pass"
            and not cell.controls
            and cell.method not in getattr(check, "controls_must_fail", ())
            and getattr(check, "verdict_from_controls", False)
        ):
            need = ", ".join(sorted(getattr(check, "controls_must_fail", ())))
            cell.status = "warn"
            cell.message = (
                f"no must-fail control ({need}) was measured on these images, and "
                f"this check is judged against it, so it cannot PASS (add it to "
                f"--methods). {cell.message}"
            )
            continue
        if cell.status != "pass" or not cell.controls:
            continue
        losing = [k for k, v in cell.controls.items() if not v["better"]]
        if losing:
            why = ", ".join(
                f"{k} (n = {cell.controls[k]['n']}, adjusted p = "
                + (
                    f"{cell.controls[k]['p_adjusted']:.2g})"
                    if cell.controls[k]["p_adjusted"] is not None
                    else "not testable)"
                )
                for k in losing
            )
            cell.status = "warn"
            cell.message = (
                f"not significantly better than the must-fail control(s) {why} on "
                f"the same images, so it cannot PASS. {cell.message}"
            )
    return {"test": stats.TEST_METHOD, "adjustment": stats.ADJUST_METHOD, "alpha": alpha, "tests": len(tests)}
