"""The check protocol, the registry, and the data a check sees (see docs/checks.md).

A check is a small class. The audit keeps one instance for the whole run and, for every
batch of images and every selected method, calls :meth:`Check.measure` with the batch
(:class:`Batch`) and the method's :class:`MapSource`, which turns the method into 2-D maps
under each of its variants (FullGrad: every ψ preset from one decomposition; a comparison
method: its ``signed`` and ``abs`` post-processings from one attribution). ``measure``
returns, per variant, the numbers for the batch's images (:class:`Measurement`); the audit
concatenates them across batches, and :meth:`Check.judge` turns the whole measurement of one
variant into a verdict (:class:`~saliaudit.result.CheckResult`).

A check may keep state on its instance across batches (e.g. randomized model copies) and
may stop measuring once it has seen ``params["max_images"]`` images (expensive checks).
"""

from __future__ import annotations

import statistics
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..cost import CostContext, Passes
from ..maps import Batch, MapSource, Variant, small_map
from ..result import CheckResult

__all__ = [
    "CHECKS",
    "Check",
    "Curve",
    "register",
    "Variant",
    "Batch",
    "Measurement",
    "MapSource",
    "nan_safe",
    "small_map",
    "higher_is_worse",
    "generic_info",
]

CHECKS: dict[str, type[Check]] = {}


def register(cls: type[Check]) -> type[Check]:
    """Class decorator: make a check available by its ``name`` (``--checks``)."""
    CHECKS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Curve:
    """How the report draws one curve a check puts in its cells' ``series``.

    Attributes:
        title: heading of the curve group.
        xlabel, ylabel: axis labels.
        primary: shown in the PDF (which has room for few curve groups per check).
        baseline: the curve drawn dashed as this one's reference (e.g. a random order);
            a curve named as another's baseline gets no group of its own.
    """

    title: str
    xlabel: str = ""
    ylabel: str = ""
    primary: bool = False
    baseline: str | None = None

    def info(self) -> dict[str, Any]:
        """JSON-ready form (``check_info[check]["curves"][name]``)."""
        return {
            "title": self.title,
            "xlabel": self.xlabel,
            "ylabel": self.ylabel,
            "primary": self.primary,
            "baseline": self.baseline,
        }


@dataclass
class Measurement:
    """What a check measured for one variant: per-image values and per-image curves.

    Attributes:
        values: one number per image (``nan`` where undefined; say why in ``notes``).
        images: the image of each value.
        curves: name -> array ``(n_images, n_points)``; ``axes`` gives the x values.
        axes: name -> the curve's x values (steps, fractions, n) as plain numbers or labels.
        extra: anything else for the result's ``series`` (small, JSON-ready).
        notes: remarks for the message (e.g. "3 degenerate maps").
    """

    values: list[float] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def extend(self, other: Measurement) -> None:
        """Append another batch's measurement (same variant, same axes)."""
        self.values.extend(other.values)
        self.images.extend(other.images)
        for k, v in other.curves.items():
            v = np.asarray(v, dtype=np.float64)
            self.curves[k] = np.concatenate([self.curves[k], v]) if k in self.curves else v
        for k, v in other.axes.items():
            self.axes.setdefault(k, v)
        for k, v in other.extra.items():
            if isinstance(v, list) and isinstance(self.extra.get(k), list):
                self.extra[k] = self.extra[k] + v
            elif isinstance(v, dict) and isinstance(self.extra.get(k), dict):
                self.extra[k] = {**self.extra[k], **v}  # e.g. figures keyed by image
            else:
                self.extra[k] = v
        self.notes.extend(n for n in other.notes if n not in self.notes)

    def mean(self) -> float | None:
        """Mean of the finite values (``None`` if there are none)."""
        finite = [v for v in self.values if np.isfinite(v)]
        return float(np.mean(finite)) if finite else None

    def spread(self) -> float | None:
        """Population standard deviation of the finite values."""
        finite = [v for v in self.values if np.isfinite(v)]
        return float(statistics.pstdev(finite)) if len(finite) > 1 else (0.0 if finite else None)

    def per_image(self) -> list[dict[str, Any]]:
        return [{"image": i, "value": nan_safe(v)} for i, v in zip(self.images, self.values)]

    def curve_series(self) -> dict[str, Any]:
        """Mean and standard deviation per point of every curve, with its x values."""
        out: dict[str, Any] = {}
        for k, arr in self.curves.items():
            arr = np.asarray(arr, dtype=np.float64)
            with np.errstate(all="ignore"):
                finite = np.where(np.isfinite(arr), arr, np.nan)
                count = np.isfinite(finite).sum(0)
                mean = np.where(count > 0, np.nansum(finite, 0) / np.maximum(count, 1), np.nan)
                sq = np.nansum((finite - mean) ** 2, 0) / np.maximum(count, 1)
            out[k] = {
                "x": list(self.axes.get(k, range(arr.shape[1] if arr.ndim > 1 else 0))),
                "mean": [nan_safe(v) for v in mean],
                "std": [nan_safe(v) for v in np.sqrt(sq)],
            }
        return out


def nan_safe(v: Any) -> float | None:
    """A float for JSON: ``None`` for NaN or ±Inf."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


class Check:
    """A sanity check. ``measure`` returns numbers; ``judge`` turns them into a verdict.

    The class attributes are everything the rest of saliaudit knows about a check: the
    registry, the CLI, the caveats and every report read them (through
    :meth:`info`, written into the results as ``check_info``), never a list of their own.

    Class attributes:
        name: registry name (``--checks``).
        title: heading in the report.
        short: column label in the terminal verdict table (at most 6 characters).
        summary: what it tests, in two sentences, with the paper.
        reference: the paper(s).
        metric: what ``value`` is (e.g. "Spearman of HOG features").
        higher_is_better: direction of ``value`` (a similarity to what the map must not
            resemble: lower is better; a hit rate or an advantage: higher is better).
        order: position in reports and listings (ascending; ties by name).
        thresholds: default thresholds (``fail``, ``warn``), overridable by configuration.
        params: default parameters, overridable by configuration.
        curves: curve name -> :class:`Curve`, for the curves ``measure`` puts in ``series``.
        requires: capabilities a method's map source must provide for the check to apply
            (:attr:`MapSource.provides`; e.g. ``{"decomposition"}`` for completeness and
            bn_folding, which FullGrad provides); other methods get no cell.
        needs_masks: SKIPPED unless ``--masks`` is given.
        controls_must_fail: the controls (``random``, ``edge``) that must not PASS this
            check: one that does shows the check cannot tell a map that explains the model
            from one that does not (docs/methods.md, "Controls"), and is reported as such.
        ranks_examples: its per-image values rank the report's example images (worst first).
        shows_class_maps: its report section shows the top-1 and lowest-class maps of the
            example images (else the report shows them in a gallery of their own).
        informational: without thresholds set, its cells report a number, not a verdict.
        records: the top-level results key of per-image records this check judges
            (``completeness``), shown as a table in the report; ``None``: none.
    """

    name: ClassVar[str]
    title: ClassVar[str] = ""
    short: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = False
    order: ClassVar[float] = 1000
    thresholds: ClassVar[dict[str, float | None]] = {}
    params: ClassVar[dict[str, Any]] = {}
    curves: ClassVar[dict[str, Curve]] = {}
    requires: ClassVar[frozenset[str]] = frozenset()
    needs_masks: ClassVar[bool] = False
    controls_must_fail: ClassVar[frozenset[str]] = frozenset()
    ranks_examples: ClassVar[bool] = False
    shows_class_maps: ClassVar[bool] = False
    informational: ClassVar[bool] = False
    records: ClassVar[str | None] = None
    #: Instance attributes the check accumulates across batches and reads when it judges
    #: (figure maps, counts): saved with each finished unit of work (JSON, see
    #: saliaudit.state_codec) and restored by ``saliaudit report --resume``. Caches that
    #: measuring rebuilds (randomized model copies) are not state.
    resume_state: ClassVar[tuple[str, ...]] = ()
    #: Where a check with long steps of its own saves them inside the running unit of work
    #: (a :class:`saliaudit.resume.Progress`, set by the audit for each unit; None outside
    #: an audit that saves its state).
    progress: Any = None

    #: The verdict needs the controls: without a must-fail control measured on the same
    #: images, a cell cannot PASS (its number alone has no scale).
    verdict_from_controls: ClassVar[bool] = False
    #: ψ presets of one method may be compared on this check's numbers (False where a ψ
    #: wins by construction, e.g. bn_folding's signed maps, which folding cannot change).
    compares_psi: ClassVar[bool] = True
    #: How ``value`` aggregates the images: ``mean`` (a 95 % bootstrap interval is recorded)
    #: or ``worst`` (the worst image decides; no interval).
    aggregate: ClassVar[str] = "mean"
    #: The verdict compares the mean with the thresholds through its interval (else the
    #: check's own test decides, and the interval is reported beside it).
    interval_verdict: ClassVar[bool] = False
    #: The check imputes images with ROAD's noisy linear imputation (``Passes.impute`` in its
    #: cost): the audit then times the imputation before the audit, for the plan.
    imputes: ClassVar[bool] = False
    #: The range ``value`` can take (e.g. ``(-1, 1)`` for a correlation): the interval for a
    #: single image, and a bound for the bootstrap interval.
    value_range: ClassVar[tuple[float, float] | None] = None

    def __init__(
        self, params: dict[str, Any] | None = None, thresholds: dict[str, float | None] | None = None
    ):
        self.p: dict[str, Any] = {**self.params, **(params or {})}
        self.t: dict[str, float | None] = {**self.thresholds, **(thresholds or {})}
        self.seen = 0  # images measured so far (for max_images)
        #: The images to measure, when the audit drew a sample for ``max_images``.
        self.sample: set[str] | None = None
        self.stats_seconds = 0.0  # time spent on intervals (the statistics of the verdicts)

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The class's declared knowledge as a JSON-ready dict (default thresholds/params)."""
        return {
            "name": cls.name,
            "title": cls.title or generic_info(cls.name)["title"],
            "short": (cls.short or cls.name)[:6],
            "summary": cls.summary,
            "reference": cls.reference,
            "metric": cls.metric,
            "higher_is_better": bool(cls.higher_is_better),
            "order": cls.order,
            "thresholds": dict(cls.thresholds),
            "params": _jsonable(cls.params),
            "curves": {k: c.info() for k, c in cls.curves.items()},
            "controls_must_fail": sorted(cls.controls_must_fail),
            "requires": sorted(cls.requires),
            "needs_masks": bool(cls.needs_masks),
            "ranks_examples": bool(cls.ranks_examples),
            "shows_class_maps": bool(cls.shows_class_maps),
            "informational": bool(cls.informational),
            "records": cls.records,
            "aggregate": cls.aggregate,
            "compares_psi": bool(cls.compares_psi),
            "interval_verdict": bool(cls.interval_verdict),
            "verdict_from_controls": bool(cls.verdict_from_controls),
            "value_range": list(cls.value_range) if cls.value_range else None,
            "origin": getattr(cls, "origin", "builtin"),
        }

    def info(self) -> dict[str, Any]:
        """:meth:`describe` with this instance's metric, thresholds and parameters (as
        configured): the check's entry of ``check_info`` in the results."""
        return {
            **self.describe(),
            "metric": self.metric,
            "thresholds": dict(self.t),
            "params": _jsonable(self.p),
        }

    def control_test(self, cell: CheckResult, control: CheckResult) -> tuple[int, float | None]:
        """``(n, p)``: a one-sided paired test, over the images both cells measured, that
        ``cell``'s method does better than the ``control`` (default: Wilcoxon signed-rank on
        the per-image values, in the check's direction); ``p`` is ``None`` when untestable."""
        from .. import stats

        mine = {p.get("image"): p.get("value") for p in cell.per_image}
        theirs = {p.get("image"): p.get("value") for p in control.per_image}
        shared = [
            k for k in mine if isinstance(mine[k], (int, float)) and isinstance(theirs.get(k), (int, float))
        ]
        return stats.paired_better(
            [mine[k] for k in shared],
            [theirs[k] for k in shared],
            higher_is_better=bool(self.higher_is_better),
        )

    @classmethod
    def caveats(cls, cells: list[CheckResult], context: dict[str, Any]) -> list[dict[str, Any]]:
        """Caveats only this check's numbers support (:mod:`saliaudit.caveats`): each a dict
        with ``kind``, ``message`` and ``numbers``. ``cells`` are this check's cells;
        ``context`` holds ``edge_similarity`` (variant label -> mean Spearman with the edge
        control's maps). Default: none."""
        return []

    def skip_reason(self, source: MapSource, model: Any, has_masks: bool) -> str | None:
        """Why this check cannot apply to ``source`` on ``model`` (``None``: it applies)."""
        if not self.applies_to(source):
            missing = ", ".join(sorted(self.requires - source.provides))
            return f"needs a method that provides {missing}"
        if self.needs_masks and not has_masks:
            return "needs object masks (--masks DIR)"
        return None

    @classmethod
    def applies_to(cls, source: MapSource) -> bool:
        """Whether ``source`` provides what the check requires (else it gets no cell)."""
        return cls.requires <= source.provides

    def variants(self, source: MapSource) -> list[Variant]:
        """The cells this check produces for ``source`` (default: one per map variant)."""
        return list(source.variants)

    # ------------------------------------------------------------------------- cost
    def cost(self, ctx: CostContext) -> Passes:
        """Work this check adds per measured image for one method, on top of the method's
        own maps: a check that recomputes the maps for two other classes declares
        ``Passes(maps=2)`` (plus its map comparisons); each map computation costs the passes
        the method declares (``ctx.method``) and its measured time. Counted by the audit's plan
        and ``--budget``; default: nothing."""
        return Passes()

    def shared_cost(self, ctx: CostContext) -> Passes:
        """Work per measured image that the check does once for all methods (outputs that do
        not depend on the map, cached per image). Default: nothing."""
        return Passes()

    def reductions(self) -> list[dict[str, Any]]:
        """Parameter changes, cheapest loss first, that ``--budget`` may apply to this check
        (besides measuring fewer images): ``[{"param": name, "value": new, "why": text}]``.
        Default: none."""
        return []

    def take(self, batch: Batch) -> list[int] | None:
        """Positions of ``batch`` to measure: those in the check's :attr:`sample` when the
        audit assigned one (a class-stratified sample under ``params["max_images"]``), else
        the batch up to ``max_images`` images in all; ``None`` when there is none."""
        if self.sample is not None:
            idx = [i for i, name in enumerate(batch.images) if name in self.sample]
            return idx or None
        limit = self.p.get("max_images")
        if limit is None:
            return list(range(len(batch)))
        room = int(limit) - self.seen
        if room <= 0:
            return None
        return list(range(min(len(batch), room)))

    def measure(
        self, batch: Batch, source: MapSource, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        """Numbers for this batch, per variant. ``maps`` are ``source``'s maps for the
        batch's top-1 targets on the unmodified model (already computed, reuse them)."""
        raise NotImplementedError

    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        """The verdict for one variant from its whole measurement."""
        raise NotImplementedError

    def result(
        self, variant: Variant, m: Measurement, status: str, value: float | None, message: str, **series: Any
    ) -> CheckResult:
        """A :class:`CheckResult` carrying the measurement's per-image values and curves,
        ``n`` and the 95 % interval of ``value``; for a check judged by its thresholds
        (:attr:`interval_verdict`), the verdict then follows the interval: PASS or FAIL only
        when the whole interval lies on that side (else WARN, inconclusive)."""
        cell = CheckResult(
            self.name,
            variant.method,
            variant.psi,
            status,
            nan_safe(value),
            self.metric,
            {k: v for k, v in self.t.items()},
            message,
            spread=nan_safe(m.spread()),
            per_image=m.per_image(),
            series={**m.curve_series(), **m.extra, **series},
            post=variant.post,
            params=_jsonable(self.p),
            signed=variant.signed,
        )
        if status in ("pass", "warn", "fail") and cell.value is not None:
            self._with_interval(cell, m, variant)
        return cell

    def mark_degenerate(self, cell: CheckResult, count: int, n: int) -> CheckResult:
        """Record that ``count`` of ``n`` images rest on a convention (constant maps); a PASS
        with a larger share than ``params["max_degenerate_share"]`` becomes WARN."""
        if n <= 0 or cell.status in ("error", "skipped"):
            return cell
        share = count / n
        cell.degenerate = share
        limit = self.p.get("max_degenerate_share")
        if cell.status == "pass" and limit is not None and share > float(limit):
            cell.status = "warn"
            cell.message = (
                f"rests on a convention: {count} of {n} images had a constant map, whose "
                f"similarity is defined, not measured ({share:.0%} > max_degenerate_share "
                f"{float(limit):.0%}). {cell.message}"
            )
        return cell

    def _with_interval(self, cell: CheckResult, m: Measurement, variant: Variant) -> None:
        t0 = time.perf_counter()
        try:
            self._interval(cell, m, variant)
        finally:
            self.stats_seconds += time.perf_counter() - t0

    def _interval(self, cell: CheckResult, m: Measurement, variant: Variant) -> None:
        from .. import stats

        value = float(cell.value)  # type: ignore[arg-type]
        finite = [v for v in m.values if np.isfinite(v)]
        if self.aggregate == "worst" or not finite:
            cell.n, cell.ci = len(finite), [value, value]
            cell.ci_method = "none: the worst image decides, every image is checked"
            return
        seed = zlib.crc32(f"{self.name}/{variant.label}".encode())
        iv = stats.mean_interval(finite, seed=seed, bounds=self.value_range)
        assert iv is not None
        cell.n, cell.ci_method = iv.n, iv.method
        cell.ci = [min(iv.lo, value), max(iv.hi, value)]
        if not self.interval_verdict:
            return
        hib = bool(getattr(self, "higher_is_better", False))
        fail, warn = self.t.get("fail"), self.t.get("warn")
        if fail is None and warn is None:
            return
        status, inconclusive = stats.decide(iv, fail=fail, warn=warn, higher_is_better=hib)
        if iv.n < 2:
            status, inconclusive = "warn", True
        if inconclusive:
            cell.inconclusive = True
            cell.images_needed = stats.images_to_decide(iv, [fail, warn])
            more = f"; about {cell.images_needed} images would decide it" if cell.images_needed else ""
            cell.message = (
                f"inconclusive: n = {iv.n}, 95 % CI [{iv.lo:.3g}, {iv.hi:.3g}] "
                f"lies across a threshold{more}. Point estimate: {cell.message}"
            )
        elif status != cell.status:
            cell.message = (
                f"{status.upper()} by the whole 95 % CI [{iv.lo:.3g}, {iv.hi:.3g}] "
                f"(n = {iv.n}); point estimate: {cell.message}"
            )
        cell.status = status


def higher_is_worse(value: float | None, t: dict[str, float | None]) -> str:
    """``fail`` if value ≥ t["fail"], ``warn`` if ≥ t["warn"], else ``pass`` (None: skip)."""
    if value is None or not np.isfinite(value):
        return "error"
    if t.get("fail") is not None and value >= t["fail"]:
        return "fail"
    if t.get("warn") is not None and value >= t["warn"]:
        return "warn"
    return "pass"


def generic_info(name: str) -> dict[str, Any]:
    """``check_info`` of a check nothing is known about (results of an unregistered check)."""
    return {
        "name": name,
        "title": name.replace("_", " ").capitalize(),
        "short": name[:6],
        "summary": "",
        "reference": "",
        "metric": "",
        "higher_is_better": False,
        "order": 1000,
        "thresholds": {},
        "params": {},
        "curves": {},
        "controls_must_fail": [],
        "requires": [],
        "needs_masks": False,
        "ranks_examples": False,
        "shows_class_maps": False,
        "informational": False,
        "records": None,
        "aggregate": "mean",
        "interval_verdict": False,
        "value_range": None,
        "verdict_from_controls": False,
        "compares_psi": True,
        "origin": "unknown",
    }


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v)) for k, v in d.items()
    }
