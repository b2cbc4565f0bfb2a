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
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..maps import Batch, MapSource, Variant, small_map
from ..result import CheckResult

__all__ = ["CHECKS", "Check", "register", "Variant", "Batch", "Measurement", "MapSource",
           "nan_safe", "small_map", "higher_is_worse"]

CHECKS: dict[str, type["Check"]] = {}


def register(cls: type["Check"]) -> type["Check"]:
    """Class decorator: make a check available by its ``name`` (``--checks``)."""
    CHECKS[cls.name] = cls
    return cls


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

    def extend(self, other: "Measurement") -> None:
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
            out[k] = {"x": list(self.axes.get(k, range(arr.shape[1] if arr.ndim > 1 else 0))),
                      "mean": [nan_safe(v) for v in mean],
                      "std": [nan_safe(v) for v in np.sqrt(sq)]}
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

    Class attributes:
        name: registry name (``--checks``).
        title: heading in the report.
        summary: what it tests, in two sentences, with the paper.
        reference: the paper(s).
        metric: what ``value`` is (e.g. "Spearman of HOG features").
        thresholds: default thresholds (``fail``, ``warn``), overridable by configuration.
        params: default parameters, overridable by configuration.
        requires: capabilities a method's map source must provide for the check to apply
            (:attr:`MapSource.provides`; e.g. ``{"decomposition"}`` for completeness and
            bn_folding, which FullGrad provides); other methods get no cell.
        needs_masks: SKIPPED unless ``--masks`` is given.
        controls_must_fail: the controls (``random``, ``edge``) that must not PASS this
            check: one that does shows the check cannot tell a map that explains the model
            from one that does not (docs/methods.md, "Controls"), and is reported as such.
    """

    name: ClassVar[str]
    title: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    metric: ClassVar[str] = ""
    thresholds: ClassVar[dict[str, float | None]] = {}
    params: ClassVar[dict[str, Any]] = {}
    requires: ClassVar[frozenset[str]] = frozenset()
    needs_masks: ClassVar[bool] = False
    controls_must_fail: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: dict[str, Any] | None = None,
                 thresholds: dict[str, float | None] | None = None):
        self.p: dict[str, Any] = {**self.params, **(params or {})}
        self.t: dict[str, float | None] = {**self.thresholds, **(thresholds or {})}
        self.seen = 0  # images measured so far (for max_images)

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

    def take(self, batch: Batch) -> Batch | None:
        """The part of ``batch`` still to measure under ``params["max_images"]`` (or None)."""
        limit = self.p.get("max_images")
        if limit is None:
            return batch
        room = int(limit) - self.seen
        if room <= 0:
            return None
        return batch if len(batch) <= room else batch.select(list(range(room)))

    def measure(self, batch: Batch, source: MapSource,
                maps: dict[Variant, torch.Tensor]) -> dict[Variant, Measurement]:
        """Numbers for this batch, per variant. ``maps`` are ``source``'s maps for the
        batch's top-1 targets on the unmodified model (already computed, reuse them)."""
        raise NotImplementedError

    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        """The verdict for one variant from its whole measurement."""
        raise NotImplementedError

    def result(self, variant: Variant, m: Measurement, status: str, value: float | None,
               message: str, **series: Any) -> CheckResult:
        """A :class:`CheckResult` carrying the measurement's per-image values and curves."""
        return CheckResult(self.name, variant.method, variant.psi, status, nan_safe(value),
                           self.metric, {k: v for k, v in self.t.items()}, message,
                           spread=nan_safe(m.spread()), per_image=m.per_image(),
                           series={**m.curve_series(), **m.extra, **series},
                           post=variant.post, params=_jsonable(self.p))


def higher_is_worse(value: float | None, t: dict[str, float | None]) -> str:
    """``fail`` if value ≥ t["fail"], ``warn`` if ≥ t["warn"], else ``pass`` (None: skip)."""
    if value is None or not np.isfinite(value):
        return "error"
    if t.get("fail") is not None and value >= t["fail"]:
        return "fail"
    if t.get("warn") is not None and value >= t["warn"]:
        return "warn"
    return "pass"


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v))
            for k, v in d.items()}
