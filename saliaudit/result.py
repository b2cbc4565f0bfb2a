"""The audit results: plain data that renderers take (no tensors, no HTML).

``AuditResult.to_dict()`` is the ``results.json`` document of docs/results-schema.md; every float is
finite (NaN and Inf never reach the file: they become ``null`` and the cell says why).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = "1.0"
STATUSES = ("pass", "warn", "fail", "error", "skipped")
_SEVERITY = {"pass": 0, "skipped": 0, "warn": 1, "fail": 2, "error": 2}


@dataclass
class CheckResult:
    """One (check, method, ψ) cell of the verdict table."""

    check: str
    method: str
    psi: str | None
    status: str
    value: float | None
    metric: str
    thresholds: dict[str, float] = field(default_factory=dict)
    message: str = ""
    spread: float | None = None
    per_image: list[dict[str, Any]] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)
    post: str | None = None  # signed/abs of a comparison method (psi is None then)
    params: dict[str, Any] = field(default_factory=dict)  # the check's parameters
    #: For a control's cell (``random``, ``edge``): ``expected`` (it did not pass a check it
    #: must fail: the check works), ``unexpected`` (it passed one: the check cannot tell a
    #: map from noise or edges on this model) or ``reference`` (no expectation); else None.
    control: str | None = None
    #: Images the aggregate rests on, and its 95 % confidence interval (``ci_method`` says
    #: how it was computed); ``None`` for cells that were not measured.
    n: int | None = None
    ci: list[float] | None = None
    ci_method: str | None = None
    #: The interval lies across a threshold: the verdict is WARN for want of evidence, and
    #: about ``images_needed`` images in all would decide it (from the measured spread).
    inconclusive: bool = False
    images_needed: int | None = None
    #: Paired tests against the check's must-fail controls on the same images:
    #: ``{control: {n, p, p_adjusted, better}}``; a method that is not significantly better
    #: than every control cannot PASS.
    controls: dict[str, Any] = field(default_factory=dict)
    signed: bool | None = None  # the judged map keeps negative evidence
    #: Share of the images whose value rests on a convention (a constant map, whose
    #: similarity is defined rather than measured); above the check's
    #: ``max_degenerate_share`` a PASS becomes WARN.
    degenerate: float | None = None

    @property
    def variant(self) -> str:
        """``fullgrad/paper``, ``gradient/abs`` or ``fullgrad``: the map the cell judged."""
        v = self.psi or self.post
        return f"{self.method}/{v}" if v else self.method


@dataclass
class CompletenessRecord:
    """FullGrad completeness for one image: ``f(x)`` against the sum of all terms."""

    image: str
    target: int
    target_name: str
    logit: float
    reconstructed: float
    relative_residual: float
    unaccounted: list[str] = field(default_factory=list)
    #: On a token model: the sum of the leading tokens' terms (class, distillation), the part
    #: of the logit that is in the decomposition but in no map.
    leading_tokens: float | None = None


@dataclass
class ImageRecord:
    """One audited image."""

    image: str
    sha256: str
    label: int | None
    predicted: int
    predicted_name: str
    score: float
    notes: list[str] = field(default_factory=list)
    label_name: str | None = None  # the ImageFolder class folder, when there is one


@dataclass
class MapRecord:
    """A saliency map written as a JPEG overlay (path relative to the output folder)."""

    image: str
    method: str
    psi: str | None
    target: int
    path: str
    signed: bool
    post: str | None = None  # post-processing of a comparison method (signed or abs)


@dataclass
class AuditResult:
    """Everything an audit produced; see docs/results-schema.md for the field meanings."""

    tool: dict[str, Any]
    run: dict[str, Any]
    config: dict[str, Any]
    model: dict[str, Any]
    inputs: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    completeness: list[CompletenessRecord] = field(default_factory=list)
    images: list[ImageRecord] = field(default_factory=list)
    maps: list[MapRecord] = field(default_factory=list)
    methods: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    check_info: dict[str, Any] = field(default_factory=dict)
    caveats: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    #: Summation-to-delta of the methods with a reference input (integrated gradients,
    #: DeepLIFT, ε-LRP, gradient × input), per image: informational, never gated.
    attribution_completeness: list[dict[str, Any]] = field(default_factory=list)
    #: The audit's plan (profile, budget and what it reduced, calibration, per stage the
    #: planned passes, floor and estimate) with the measured time and counted passes.
    plan: dict[str, Any] = field(default_factory=dict)

    def summarize(
        self,
        fail_on: str,
        status: str | None = None,
        reason: str | None = None,
        *,
        partial: bool = False,
        max_skipped: float | None = None,
    ) -> None:
        """Fill ``summary``: counts per status (controls apart) and the overall status of the
        gate, which judges each cell by :func:`gate_status`; ``partial``: the audit did not
        finish (interrupted or stopped on an error), the cells are those measured so far.
        More dropped images than ``max_skipped`` (a fraction) also fail the gate."""
        counts = {s: 0 for s in STATUSES}
        controls = {k: 0 for k in ("expected", "unexpected", "reference")}
        for c in self.checks:
            if c.control in controls and c.status != "error":
                controls[c.control] += 1
            else:
                counts[c.status] += 1
        inconclusive = [c for c in self.checks if c.inconclusive and c.control is None]
        gated = [gate_status(c) for c in self.checks]
        worst = max((_SEVERITY[g] for g in gated), default=0)
        overall = {0: "pass", 1: "warn", 2: "fail"}[worst]
        if "error" in gated and overall == "fail" and "fail" not in gated:
            overall = "error"
        needed = [c.images_needed for c in inconclusive if c.images_needed]
        # an ERROR gates on its own; "no verdict" is an audit that judged nothing at all
        judged = [
            c for c in self.checks if c.control is None and c.status in ("pass", "warn", "fail", "error")
        ]
        no_verdict = not judged
        if no_verdict and status is None and overall == "pass":
            overall = "skipped"
        if no_verdict and status is None:
            reason = reason or (
                "no check judged any method: the selected checks do not apply to the selected "
                "methods, or only controls were audited (see saliaudit checks and saliaudit methods)"
            )
        dropped = dropped_inputs(self.inputs, max_skipped)
        self.summary = {
            "status": status or overall,
            "fail_on": fail_on,
            "counts": counts,
            "controls": controls,
            "gate_failed": gate_failed(self.checks, fail_on)
            or (no_verdict and fail_on != "never")
            or (dropped["exceeded"] and fail_on != "never"),
            "dropped": dropped,
            "no_verdict": no_verdict,
            "inconclusive": len(inconclusive),
            "images_to_decide": max(needed) if needed else None,
            "partial": partial,
        }
        if reason:
            self.summary["reason"] = reason

    def to_dict(self) -> dict[str, Any]:
        doc = {"schema_version": SCHEMA_VERSION, **asdict(self)}
        return _finite(doc)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False)


def gate_status(cell: CheckResult) -> str:
    """The status a cell gives the gate and the overall verdict.

    A control's expected failure is the check working, so it counts as ``pass``; a control
    that passes a check it must fail counts as ``warn`` (that check's verdicts cannot be
    trusted on this model); an ERROR counts whatever the method."""
    if cell.control is None or cell.status in ("error", "skipped"):
        return cell.status
    return "warn" if cell.control == "unexpected" else "pass"


def dropped_inputs(inputs: dict[str, Any], max_skipped: float | None) -> dict[str, Any]:
    """The images the audit lost (``inputs.skipped``: undecodable, NaN/Inf logits, ...; a
    duplicate is audited once and is not lost): ``{n, of, fraction, max, exceeded, reasons}``,
    ``of`` the images the audit tried (audited + dropped), ``reasons`` ``[{reason, n}]`` (the
    reason up to its first ';'), most frequent first; ``exceeded``: ``fraction > max``."""
    lost = [
        s for s in inputs.get("skipped") or [] if not str(s.get("reason", "")).startswith("duplicate of ")
    ]
    n = len(lost)
    of = int(inputs.get("loaded") or 0) + n
    fraction = n / of if of else 0.0
    counts: dict[str, int] = {}
    for s in lost:
        key = str(s.get("reason", "")).split(";", 1)[0].strip() or "no reason recorded"
        counts[key] = counts.get(key, 0) + 1
    reasons = [{"reason": k, "n": v} for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    exceeded = max_skipped is not None and fraction > max_skipped
    return {
        "n": n,
        "of": of,
        "fraction": fraction,
        "max": max_skipped,
        "exceeded": exceeded,
        "reasons": reasons,
    }


def dropped_text(dropped: dict[str, Any] | None) -> str | None:
    """One sentence on the dropped images, e.g. "1 of 3 images (33 %) dropped, more than
    --max-skipped 0.1 allows: the model output NaN/Inf for this image (1)"; None when none."""
    if not dropped or not dropped.get("n"):
        return None
    n, of, limit = int(dropped["n"]), int(dropped.get("of") or 0), dropped.get("max")
    share = f" ({100 * float(dropped.get('fraction') or 0):.0f} %)"
    if limit is None:
        bound = ""
    elif dropped.get("exceeded"):
        bound = f", more than --max-skipped {limit:g} allows"
    else:
        bound = f", within --max-skipped {limit:g}"
    reasons = dropped.get("reasons") or []
    why = "; ".join(f"{r['reason']} ({r['n']})" for r in reasons[:3])
    if len(reasons) > 3:
        why += f"; {len(reasons) - 3} other reasons"
    noun = "image" if of == 1 else "images"
    return f"{n} of {of} {noun}{share} dropped{bound}: {why}"


def gate_failed(checks: list[CheckResult], fail_on: str) -> bool:
    """Whether a cell reached the ``--fail-on`` level (ERROR counts as FAIL; controls by
    :func:`gate_status`)."""
    if fail_on == "never":
        return False
    level = {"warn": 1, "fail": 2}[fail_on]
    return any(_SEVERITY[gate_status(c)] >= level for c in checks)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
