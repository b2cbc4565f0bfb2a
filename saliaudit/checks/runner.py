"""Runs the selected checks over batches and map sources; turns measurements into cells.

An exception inside one (check, method) pair becomes ERROR for that pair's cells and the
audit goes on; a check that cannot apply is SKIPPED with the reason. Out-of-memory on the
device retries the batch in halves before the cell fails (docs/checks.md, "How verdicts are decided"; issue 6).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ..batches import is_oom
from ..cost import release_memory
from ..errors import SaliauditError
from ..maps import Batch, MapSource, Variant
from ..result import CheckResult
from . import check_names, get_check
from .base import Check, Measurement, _jsonable
from .calibrate import calibrate

#: The key under which the running unit's finished checks are saved (saliaudit.resume.Progress).
CHECKS_DONE = "__checks__"

__all__ = ["CheckRunner", "oom_split", "is_oom", "control_expectation"]

T = TypeVar("T")


def control_expectation(cell: CheckResult, check: Check) -> str | None:
    """``CheckResult.control`` for a cell: None unless its method is a control (family
    ``control`` in the method registry)."""
    from ..methods import METHODS, method_names

    method = METHODS.get(cell.method) if cell.method in method_names() else None
    if method is None or method.family != "control":
        return None
    if cell.method not in check.controls_must_fail or cell.status in ("error", "skipped"):
        return "reference"
    return "unexpected" if cell.status == "pass" else "expected"


def oom_split(
    fn: Callable[[Batch, dict[Variant, torch.Tensor]], T],
    batch: Batch,
    maps: dict[Variant, torch.Tensor],
    merge: Callable[[T, T], T],
    on_retry: Callable[[int], None] | None = None,
) -> T:
    """``fn(batch, maps)``; on out-of-memory, free the cache and run the two halves.

    Halving goes on down to single images; an image that alone does not fit re-raises.
    """
    try:
        return fn(batch, maps)
    except Exception as err:
        if not is_oom(err) or len(batch) <= 1:
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(batch) // 2
    if on_retry:
        on_retry(half)
    parts = []
    for idx in (list(range(half)), list(range(half, len(batch)))):
        sub_maps = {v: m[idx[0] : idx[-1] + 1] for v, m in maps.items()}
        parts.append(oom_split(fn, batch.select(idx), sub_maps, merge, on_retry))
    return merge(parts[0], parts[1])


def _merge_measurements(
    a: dict[Variant, Measurement], b: dict[Variant, Measurement]
) -> dict[Variant, Measurement]:
    for v, m in b.items():
        if v in a:
            a[v].extend(m)
        else:
            a[v] = m
    return a


def _error_text(err: BaseException) -> str:
    if isinstance(err, SaliauditError):
        return str(err)
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:400]


class CheckRunner:
    """The checks of one audit, their accumulated measurements, skips and errors."""

    def __init__(
        self,
        names: list[str] | None,
        thresholds: dict[str, dict[str, Any]],
        params: dict[str, dict[str, Any]],
        has_masks: bool,
    ):
        self.checks: list[Check] = [
            get_check(n)(params=params.get(n), thresholds=thresholds.get(n)) for n in (names or check_names())
        ]
        self._by_name = {c.name: c for c in self.checks}
        self.has_masks = has_masks
        self.acc: dict[tuple[str, Variant], Measurement] = {}
        self.errors: dict[tuple[str, str], str] = {}
        self.skips: dict[tuple[str, str], str] = {}
        self.sources: list[MapSource] = []
        self.oom_retries = 0
        self.timings: dict[str, float] = {}
        self.calibration: dict[str, Any] = {}
        self.counter: Any = None  # a saliaudit.cost.PassCounter: passes per check
        #: What :meth:`run` did, in order (see :meth:`apply`): the audit saves each
        #: (batch, method)'s part of it for ``--resume`` (saliaudit.resume).
        self.log: list[tuple[Any, ...]] = []
        #: Where the running unit's finished checks are saved (a saliaudit.resume.Progress,
        #: set by the audit for each unit; None outside an audit that saves its state).
        self.progress: Any = None

    def rebuild(self, check: Check, params: dict[str, Any]) -> Check:
        """A new instance of ``check`` with ``params`` changed (validated as usual)."""
        return type(check)(params={**check.p, **params}, thresholds=dict(check.t))

    def replace(self, checks: list[Check]) -> None:
        """Use ``checks`` (the same names, e.g. rebuilt by a budget) from now on."""
        self.checks = list(checks)
        self._by_name = {c.name: c for c in self.checks}

    def add_source(self, source: MapSource) -> None:
        if source not in self.sources:
            self.sources.append(source)

    def fail_source(self, source: MapSource, reason: str, skipped: bool = False) -> None:
        """The method itself failed (ERROR) or cannot run (SKIPPED): every check of it
        gets that status and reason."""
        self.add_source(source)
        where = self.skips if skipped else self.errors
        for check in self.checks:
            where.setdefault((check.name, source.method), reason)

    def run(
        self,
        batch: Batch,
        source: MapSource,
        maps: dict[Variant, torch.Tensor],
        on_check: Callable[[str], None] | None = None,
    ) -> None:
        """Measure every check on ``batch`` for ``source`` (its top-1 ``maps``);
        ``on_check(name)`` is called before each check, also one that is skipped (progress)."""
        import time

        self.add_source(source)
        # --resume: the checks this unit finished before an interruption are replayed
        progress = self.progress
        where = {"images": list(batch.images), "method": source.method, "variants": [v.label for v in maps]}
        saved = progress.load(CHECKS_DONE, where) if progress is not None else None
        done: dict[str, Any] = saved if saved is not None else {}
        finished: dict[str, Any] = {}
        for check in self.checks:
            if on_check is not None:
                on_check(check.name)
            key = (check.name, source.method)
            if key in self.errors or key in self.skips:
                continue
            if check.name in done:  # measured before the interruption: its outcome, not again
                check.take(batch)  # the check's count of images, as when it measured
                for item in done[check.name]["items"]:
                    self.apply(item)
                from ..resume import merge_state

                for attr, value in done[check.name]["state"].items():
                    setattr(check, attr, merge_state(getattr(check, attr, None), value))
                finished[check.name] = done[check.name]
                continue
            first = len(self.log)
            reason = check.skip_reason(source, batch.model, self.has_masks)
            if reason:
                self.apply(("skip", check.name, source.method, reason))
                continue
            idx = check.take(batch)
            if idx is None:
                continue
            if len(idx) == len(batch):
                sub, sub_maps = batch, maps
            else:
                sub = batch.select(idx)
                pos = torch.as_tensor(idx, dtype=torch.long)
                sub_maps = {v: m[pos.to(m.device)] for v, m in maps.items()}
            t0 = time.perf_counter()
            counting = self.counter.at(f"check:{check.name}") if self.counter else contextlib.nullcontext()
            try:
                with counting:
                    out = oom_split(
                        lambda b, mp, c=check: c.measure(b, source, mp),
                        sub,
                        sub_maps,
                        _merge_measurements,
                        self.count_retry,
                    )
            except Exception as err:  # one cell failing must not stop the audit
                self.apply(("error", check.name, source.method, _error_text(err)))
                continue
            finally:
                release_memory(collect=False)  # transient buffers back to the system
                name = f"check:{check.name}"
                self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
            self.apply(("measure", check.name, out))
            if progress is not None:  # saved at once: an interruption keeps this check's work
                state = {a: getattr(check, a) for a in check.resume_state}
                finished[check.name] = {"items": self.log[first:], "state": state}
                progress.save(CHECKS_DONE, where, finished)

    def apply(self, item: tuple[Any, ...]) -> None:
        """Record one outcome of :meth:`run` (also when a resumed audit replays it):
        ``("skip", check, method, reason)``, ``("error", check, method, text)`` (the cell's
        measurements so far are dropped) or ``("measure", check, {variant: Measurement})``
        (appended to the check's accumulated measurement of each variant)."""
        self.log.append(item)
        if item[0] == "skip":
            self.skips[(item[1], item[2])] = item[3]
        elif item[0] == "error":
            self.errors[(item[1], item[2])] = item[3]
            for v in [v for (c, v) in self.acc if c == item[1] and v.method == item[2]]:
                del self.acc[(item[1], v)]
        else:
            for v, m in item[2].items():
                if (item[1], v) in self.acc:
                    self.acc[(item[1], v)].extend(m)
                else:
                    self.acc[(item[1], v)] = copy.deepcopy(m)

    def caps(self) -> dict[str, int]:
        """``max_images`` of each check that has one."""
        return {c.name: int(c.p["max_images"]) for c in self.checks if c.p.get("max_images") is not None}

    def assign_sample(self, name: str, images: list[str]) -> None:
        """Measure check ``name`` on these images only (its drawn sample)."""
        self._by_name[name].sample = set(images)

    def end_batch(self, batch: Batch) -> None:
        """Count the batch's images against each check's ``max_images``."""
        for check in self.checks:
            check.seen += len(batch)

    def count_retry(self, size: int) -> None:
        """Count one out-of-memory retry (the batch was halved to ``size`` images)."""
        self.oom_retries += 1

    def results(self) -> list[CheckResult]:
        """One cell per (check, method, variant), in check order then method order."""
        cells: list[CheckResult] = []
        for check in self.checks:
            for source in self.sources:
                key = (check.name, source.method)
                variants = check.variants(source)
                if not check.applies_to(source):
                    continue
                if key in self.skips:
                    cells += [self._plain(check, v, "skipped", self.skips[key]) for v in variants]
                elif key in self.errors:
                    cells += [self._plain(check, v, "error", self.errors[key]) for v in variants]
                else:
                    measured = [v for (c, v) in self.acc if c == check.name and v.method == source.method]
                    if not measured:
                        cells += [self._plain(check, v, "skipped", "no image was measured") for v in variants]
                    for v in measured:
                        try:
                            cells.append(check.judge(v, self.acc[(check.name, v)]))
                        except Exception as err:
                            cells.append(self._plain(check, v, "error", _error_text(err)))
        t0 = time.perf_counter()
        self.calibration = calibrate(cells, self._by_name)
        self.timings["statistics"] = time.perf_counter() - t0 + sum(c.stats_seconds for c in self.checks)
        for cell in cells:
            cell.control = control_expectation(cell, self._by_name[cell.check])
        return cells

    @staticmethod
    def _plain(check: Check, v: Variant, status: str, message: str) -> CheckResult:
        return CheckResult(
            check.name,
            v.method,
            v.psi,
            status,
            None,
            check.metric,
            dict(check.t),
            message,
            post=v.post,
            signed=v.signed,
            params=_jsonable(check.p),
        )

    def info(self) -> dict[str, dict[str, Any]]:
        """``check_info`` of the results: :meth:`Check.info` of each selected check, in
        report order (title, short, metric, direction, curves, effective thresholds and
        parameters, ...)."""
        return {c.name: c.info() for c in sorted(self.checks, key=lambda c: (c.order, c.name))}
