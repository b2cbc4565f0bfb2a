"""The plan of an audit: per stage its images, model passes, floor and estimated time; the
profiles (``--profile``) and the budget (``--budget``).

Before any map is computed the audit measures one forward and one forward+backward pass of
the user's model at its batch size (:func:`saliaudit.cost.calibrate`) and counts the passes
every stage will run from what the methods and checks declare (:mod:`saliaudit.cost`). The
plan is printed and stored in ``results.json`` (``plan``), where the audit adds the measured
time and the counted passes of each stage. With a budget, the plan is fitted before the
audit starts: the most expensive check first gives up what its
:meth:`~saliaudit.checks.base.Check.reductions` offer, then measures half as many images (a
class-stratified sample, never fewer than :data:`MIN_IMAGES`), until the estimate fits; each
reduction is recorded with its reason and shown in the report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .cost import Calibration, CostContext, Passes
from .errors import UsageError

__all__ = [
    "PROFILES",
    "MIN_IMAGES",
    "Stage",
    "Plan",
    "parse_duration",
    "profile_params",
    "build_stages",
    "fit",
]

#: Fewest images a budget may leave a check with (a paired test on fewer images cannot
#: reach p < 0.05 after the audit's multiple-testing correction).
MIN_IMAGES = 8

#: Settings of each profile: check parameters and method parameters (the user's
#: ``--check-param`` / ``--method-param`` and config values override them).
PROFILES: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "quick": {
        "checks": {
            "randomization": {"max_images": 8, "independent": False, "max_steps": 4},
            "class_sensitivity": {"max_images": 16},
            "random_logit": {"max_images": 8},
            "input_invariance": {"max_images": 8},
            "perturbation": {"max_images": 16, "fractions": [0.02, 0.1, 0.2]},
            "road": {"max_images": 8, "fractions": [0.1, 0.5, 0.9]},
            "sign_flip": {"max_images": 8, "fractions": [0.02, 0.1, 0.2]},
            "sensitivity_n": {"max_images": 8, "subsets": 30, "points": 4},
            "infidelity": {"max_images": 8, "n_perturb": 8},
            "max_sensitivity": {"max_images": 8, "n_perturb": 3},
        },
        "methods": {"integrated_gradients": {"steps": 16}, "smoothgrad": {"samples": 8}},
    },
    "standard": {
        "checks": {
            "randomization": {"max_images": 8, "independent": False, "max_steps": 6},
            "random_logit": {"max_images": 16},
            "input_invariance": {"max_images": 16},
            "perturbation": {"max_images": 16},
            "road": {"max_images": 8, "fractions": [0.1, 0.3, 0.5, 0.7, 0.9]},
            "sign_flip": {"max_images": 16},
            "sensitivity_n": {"max_images": 8, "subsets": 50},
            "infidelity": {"max_images": 16},
            "max_sensitivity": {"max_images": 8, "n_perturb": 3},
        },
        # the methods keep their defaults: fewer IG steps leave a visible completeness gap
        "methods": {},
    },
    "thorough": {"checks": {}, "methods": {}},
}

_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(value: Any) -> float:
    """``"10m"``, ``"90s"``, ``"1h30m"``, ``"1.5h"`` or a number of seconds -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|sec|s)?", text)
        if not text or "".join(a + b for a, b in parts) != text:
            raise ValueError(f"expected a duration such as 10m, 90s or 1h30m, got {value!r}")
        seconds = sum(float(a) * _UNITS[b or "s"] for a, b in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a budget must be a positive duration, got {value!r}")
    return seconds


def profile_params(profile: str, kind: str) -> dict[str, dict[str, Any]]:
    """The ``checks`` or ``methods`` parameters of ``profile`` (copies)."""
    if profile not in PROFILES:
        raise UsageError(f"unknown profile {profile!r}", hint="choose " + ", ".join(PROFILES))
    return {k: dict(v) for k, v in PROFILES[profile][kind].items()}


@dataclass
class Stage:
    """One stage of the plan: ``name`` as in the measured timings (``method:gradient``,
    ``check:randomization``), the images it measures and the work it runs in all."""

    name: str
    images: int
    passes: Passes
    estimated_s: float
    floor_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "passes": self.passes.to_dict(),
            "estimated_s": round(self.estimated_s, 3),
            "floor_s": round(self.floor_s, 3),
        }


@dataclass
class Plan:
    """The stages of an audit with the calibration they were estimated from."""

    calibration: Calibration
    stages: list[Stage]
    profile: str = "standard"
    budget_s: float | None = None
    reductions: list[dict[str, Any]] = field(default_factory=list)
    peak_bytes: int = 0
    fits: bool = True

    @property
    def total_s(self) -> float:
        return sum(s.estimated_s for s in self.stages)

    @property
    def floor_s(self) -> float:
        return sum(s.floor_s for s in self.stages)

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "budget_s": self.budget_s,
            "budgeted": bool(self.reductions),
            "fits_budget": self.fits,
            "reductions": list(self.reductions),
            "calibration": self.calibration.to_dict(),
            "estimated_s": round(self.total_s, 3),
            "floor_s": round(self.floor_s, 3),
            "estimated_peak_bytes": int(self.peak_bytes),
            "stages": {s.name: s.to_dict() for s in self.stages},
        }


@dataclass(frozen=True)
class SourceCost:
    """What the plan needs to know of one map source."""

    method: str
    passes: Passes  # one map computation per image, as the method declares
    variants: int
    signed: int
    model_independent: bool
    source: Any  # the MapSource (for Check.skip_reason)
    seconds: float | None = None  # one map computation per image, measured (None: from passes)
    reference_rows: int = 0  # forward rows per image of the completeness reference (x̄)


def build_stages(
    sources: Sequence[SourceCost],
    checks: Sequence[Any],
    n_images: int,
    cal: Calibration,
    model: Any,
    *,
    extra_predict: bool = False,
    has_masks: bool = False,
    examples: int = 0,
) -> list[Stage]:
    """The stages of an audit of ``n_images`` images: prediction, each method's maps, each
    check (over the images it measures: its ``max_images`` or all) and the example figures
    (the lowest-class maps of ``examples`` images)."""
    size = tuple(model.input_size)
    stages = [_stage("predict", n_images, Passes(forward=n_images), cal)]
    if extra_predict:  # the predicted classes that stratify the checks' samples
        stages.append(_stage("sample", n_images, Passes(forward=n_images), cal))
    for s in sources:
        # the maps, and the Spearman of every variant with the edge control (one comparison)
        stages.append(
            _work(
                f"method:{s.method}",
                n_images,
                Passes(
                    maps=n_images, forward=n_images * s.reference_rows, compare=0.25 * n_images * s.variants
                ),
                s,
                cal,
            )
        )
    for check in checks:
        limit = check.p.get("max_images")
        n = n_images if limit is None else min(n_images, int(limit))
        seconds, floor, total, shared = 0.0, 0.0, Passes(), None
        for s in sources:
            if check.skip_reason(s.source, model, has_masks) is not None:
                continue
            ctx = CostContext(
                s.passes,
                s.variants,
                size,
                signed=s.signed,
                model=model,
                model_independent=s.model_independent,
            )
            st = _work("", n, n * check.cost(ctx), s, cal)
            seconds, floor, total = seconds + st.estimated_s, floor + st.floor_s, total + st.passes
            shared = shared or n * check.shared_cost(ctx)
        if shared is not None:
            total = total + shared
            seconds, floor = seconds + cal.seconds(shared), floor + cal.floor(shared)
        stages.append(Stage(f"check:{check.name}", n, total, seconds, floor))
    k = min(examples, n_images)
    figures = [_work("", k, Passes(maps=k), s, cal) for s in sources]
    stages.append(
        Stage(
            "figures",
            k,
            sum((f.passes for f in figures), Passes()),
            sum(f.estimated_s for f in figures),
            sum(f.floor_s for f in figures),
        )
    )
    return stages


def _stage(name: str, images: int, passes: Passes, cal: Calibration) -> Stage:
    return Stage(name, images, passes, cal.seconds(passes), cal.floor(passes))


def _work(name: str, images: int, work: Passes, s: SourceCost, cal: Calibration) -> Stage:
    """A stage of ``work`` for source ``s``: its map computations become the method's passes
    (counted) and its measured seconds (estimated)."""
    expanded = Passes(
        work.forward + work.maps * s.passes.forward,
        work.backward + work.maps * s.passes.backward,
        work.compare + work.maps * s.passes.compare,
        work.maps,
        work.impute,
    )
    own = Passes(work.forward, work.backward, work.compare, impute=work.impute)
    per_map = s.seconds if s.seconds is not None else cal.seconds(s.passes)
    return Stage(name, images, expanded, cal.seconds(own) + work.maps * per_map, cal.floor(expanded))


#: A budgeted audit plans to this share of the budget: the estimate is within about ±30 % per
#: stage (a heavily reduced audit of the sample model ran 1.47× its estimate in CI), and a
#: budget is a limit the user set, so the plan leaves room for an estimate that was low
#: rather than aiming at the limit itself.
BUDGET_HEADROOM = 0.7


def fit(
    checks: list[Any],
    estimate: Callable[[list[Any]], list[Stage]],
    budget_s: float,
    n_images: int,
    rebuild: Callable[[Any, dict[str, Any]], Any],
) -> tuple[list[Any], list[Stage], list[dict[str, Any]], bool]:
    """Reduce ``checks`` until ``estimate(checks)`` fits :data:`BUDGET_HEADROOM` × ``budget_s``.

    The most expensive check stage that can still give something up does, in order: its own
    :meth:`reductions`, then half its images (not below :data:`MIN_IMAGES`). ``rebuild(check,
    params)`` makes a check with new parameters. Returns the checks, the final stages, the
    reductions made (each with the check, parameter, old and new value, reason and the
    estimated seconds before and after) and whether the budget is met.
    """
    reductions: list[dict[str, Any]] = []
    stages = estimate(checks)
    target = BUDGET_HEADROOM * budget_s
    while sum(s.estimated_s for s in stages) > target:
        by_cost = sorted(
            (s for s in stages if s.name.startswith("check:") and s.estimated_s > 0),
            key=lambda s: -s.estimated_s,
        )
        step = None
        for s in by_cost:
            k = next(i for i, c in enumerate(checks) if f"check:{c.name}" == s.name)
            step = _next_reduction(checks[k], s.images, n_images)
            if step is not None:
                break
        if step is None:
            return checks, stages, reductions, False
        before = sum(x.estimated_s for x in stages)
        check = checks[k]
        checks[k] = rebuild(check, {step["param"]: step["value"]})
        stages = estimate(checks)
        after = sum(x.estimated_s for x in stages)
        reductions.append(
            {
                "check": check.name,
                "param": step["param"],
                "from": step["from"],
                "to": step["value"],
                "why": step["why"],
                "estimated_s_before": round(before, 2),
                "estimated_s_after": round(after, 2),
            }
        )
    return checks, stages, reductions, True


def _next_reduction(check: Any, measured: int, n_images: int) -> dict[str, Any] | None:
    for r in check.reductions():
        if check.p.get(r["param"]) != r["value"]:
            return {**r, "from": check.p.get(r["param"])}
    if measured > MIN_IMAGES:
        new = max(MIN_IMAGES, measured // 2)
        return {
            "param": "max_images",
            "value": new,
            "from": check.p.get("max_images"),
            "why": f"a class-stratified sample of {new} of the {min(measured, n_images)} images",
        }
    return None
