"""Runs an audit: model × images → every method's maps under each variant → checks → results.

:class:`Audit` plans (loads the model, lists the images, builds a map source per method and
the check runner) and runs: images stream through in batches, so memory is bounded by the
batch, not the folder. Each batch costs one forward pass for the prediction, then each method
computes its maps once (FullGrad: one decomposition for every ψ) and every check measures
them. The model is never modified. :func:`run_audit` is the one-call form.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, stats
from .batches import OOM_HINT, Predicted, first_line, is_oom, next_batch, predict_batch
from .caveats import AbsDiscards, compute_caveats
from .checks.runner import CheckRunner, oom_split
from .config import AuditConfig
from .cost import Calibration, PassCounter, calibrate, peak_rss_bytes, release_memory, rows_limit
from .data import ImageListing, Skipped, find_images, iter_decoded, require_images
from .errors import NoImagesError, SaliauditError, UsageError
from .figures import ExampleFigures, choose_examples
from .maps import Batch, MapSource, Variant
from .methods import build_source, get_method, postprocess
from .model import LoadedModel, load_model, resolve_device
from .plan import Plan, SourceCost, build_stages, fit, profile_params
from .report.overlay import write_overlays
from .result import AuditResult, CompletenessRecord
from .resume import AuditState, Mark, audit_identity, restore_unit, unit_record
from .sampling import stratified_sample

__all__ = ["Audit", "Progress", "run_audit", "new_result", "environment_versions"]

Progress = Callable[[str, int, int | None], None]
"""Progress callback: ``(description, done, total or None)``. The description names what
runs (``batch 2/3 · method fullgrad``, ``batch 2/3 · check randomization``, ``judging``);
``done`` and ``total`` count work units: per batch one unit per method (its maps) and one
per (method, check), plus one for judging, so ``total`` is known once the audit is planned
and ``done`` only grows."""


class Timer:
    """Seconds spent per named stage (summed over batches)."""

    def __init__(self) -> None:
        self.per_stage: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.per_stage[name] = self.per_stage.get(name, 0.0) + time.perf_counter() - t0


def environment_versions() -> dict[str, str]:
    """Versions of the interpreter and the libraries that determine the numbers."""
    import PIL
    import torchvision

    return {
        "saliaudit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "platform": platform.platform(),
    }


def model_info(lm: LoadedModel) -> dict[str, Any]:
    """What the results record about the loaded model."""
    return {
        "path": str(lm.path) if lm.path else None,
        "sha256": lm.sha256,
        "format": lm.format,
        "arch": lm.arch,
        "num_classes": lm.num_classes,
        "input_size": list(lm.input_size),
        "mean": list(lm.mean),
        "std": list(lm.std),
        "static_batch": lm.static_batch,
        "preprocessing": lm.preprocessing.to_dict(),
        "class_names": list(lm.class_names),
        "sources": dict(lm.sources),
        "limitations": list(lm.limitations),
        "notes": list(lm.notes),
    }


def new_result(cfg: AuditConfig, started: datetime, device: torch.device) -> AuditResult:
    """An empty result with the run and configuration recorded (filled as the audit runs)."""
    return AuditResult(
        tool={"name": "saliaudit", "version": __version__},
        run={
            "started_at": started.isoformat(timespec="seconds"),
            "duration_s": None,
            "seed": cfg.seed,
            "device": str(device),
            "versions": environment_versions(),
        },
        config={
            "values": dict(cfg.values),
            "sources": dict(cfg.sources),
            "file": str(cfg.config_file) if cfg.config_file else None,
        },
        model={},
        inputs={"source": None, "found": 0, "loaded": 0, "skipped": []},
    )


def run_audit(
    model_path: str | Path,
    images: str | Path,
    cfg: AuditConfig,
    out_dir: Path,
    progress: Progress | None = None,
    result: AuditResult | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> AuditResult:
    """Audit ``model_path`` on ``images``: maps of every method and variant, the checks,
    caveats. ``result`` (from :func:`new_result`) is filled in place, so that a caller
    interrupted half-way still holds everything measured so far. Overlays (``overlays``:
    the example images, all or none) go to ``out_dir/maps``. Raises
    :mod:`saliaudit.errors` subclasses for an unusable model (exit 3) or image set (exit 4);
    a failing method or check cell is recorded and the audit goes on. ``on_plan(plan)`` is
    called once the plan is made, before any map is computed."""
    audit = Audit(cfg, out_dir, progress=progress, result=result, on_plan=on_plan)
    audit.plan(model_path, images)
    return audit.run()


class Audit:
    """One audit: :meth:`plan` what to compute, then :meth:`run` it batch by batch."""

    def __init__(
        self,
        cfg: AuditConfig,
        out_dir: Path,
        *,
        progress: Progress | None = None,
        result: AuditResult | None = None,
        on_plan: Callable[[Plan], None] | None = None,
        state: AuditState | None = None,
        shard: Any = None,
    ):
        self.cfg, self.out_dir, self.progress = cfg, Path(out_dir), progress
        self.state = state  # saved work (saliaudit.resume): each finished unit, --resume
        self.shard = shard  # torchrun: this rank's share of the units (saliaudit.distributed)
        self.on_plan = on_plan
        self.counter = PassCounter()
        self.timer = Timer()
        self.started = time.perf_counter()
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.result = result or new_result(cfg, datetime.now(timezone.utc), self.device)
        self.skipped: list[Skipped] = []
        self.edge_sim: dict[str, list[float]] = {}

    # ------------------------------------------------------------------------------ plan
    def plan(self, model_path: str | Path, images: str | Path, reuse: Plan | None = None) -> None:
        """Load the model, list the images, build the map sources and the checks (``reuse``:
        the plan an earlier audit of the same inputs made, instead of calibrating again)."""
        cfg = self.cfg
        with self.timer.stage("load_model"):
            self.lm = load_model(
                model_path,
                arch=cfg.arch,
                num_classes=cfg.num_classes,
                input_size=cfg.input_size,
                mean=cfg.mean,
                std=cfg.std,
                labels=cfg.labels,
                trust_model=cfg.trust_model,
                device=self.device,
                batch_size=cfg.batch_size,
                output_key=cfg.output_key,
            )
        self.result.model = model_info(self.lm)
        with self.timer.stage("find_images"):
            self.listing: ImageListing = find_images(
                images, max_images=cfg.max_images, sample=cfg.sample, seed=cfg.seed
            )
        self.images = images
        self.skipped = list(self.listing.skipped)
        self.result.inputs.update(
            source=str(images), found=self.listing.found, class_names_from_folders=self.listing.class_names
        )
        require_images(self.listing)
        self.masks_dir = _masks_dir(cfg)
        self.runner = CheckRunner(
            cfg.checks, _thresholds(cfg), _check_params(cfg), self.masks_dir is not None
        )
        self.runner.counter = self.counter
        self.sources = self._plan_sources()
        self.figures = ExampleFigures(
            choose_examples([e.rel for e in self.listing.entries], int(cfg.examples_html), cfg.seed)
        )
        with self.timer.stage("calibrate"):
            self.plan_ = reuse if reuse is not None else self._make_plan()
        # after the plan: a budget may have capped the check that stores the class maps
        self.figures.with_maps = not _stores_class_maps(self.runner.checks)
        self.result.plan = self.plan_.to_dict()
        if self.on_plan is not None:
            self.on_plan(self.plan_)
        self.result.check_info = self.runner.info()
        with self.timer.stage("sample"), self.counter.active(), self.counter.at("sample"):
            self._draw_samples()
        decomposes = any("decomposition" in s.provides for s in self.sources)
        self.discards = AbsDiscards() if decomposes else None
        # progress units: per batch, each method's maps and each of its checks; then judging
        self.n_batches = -(-len(self.listing.entries) // max(int(cfg.batch_size), 1))
        self.per_source = 1 + len(self.runner.checks)
        self.units_total = self.n_batches * len(self.sources) * self.per_source + 1
        self.units_done, self.batch_no = 0, 0
        if self.state is not None:
            with self.timer.stage("resume_state"):
                self.state.begin(audit_identity(self), self.result.run.get("started_at"))
            if self.state.units or self.state.pending:
                self.result.run["resumed"] = {
                    "from_started_at": self.state.previous.get("started_at"),
                    "units_saved": len(self.state.units),
                    "units_total": self.n_batches * len(self.sources),
                }

    def _make_plan(self) -> Plan:
        """Measure a pass of the model, count every stage's passes and, with ``--budget``,
        reduce the most expensive checks until the estimate fits (docs/usage.md, "Cost")."""
        cfg, n = self.cfg, len(self.listing.entries)
        rows = max(1, min(int(cfg.batch_size), n))
        try:
            imputes = any(getattr(c, "imputes", False) for c in self.runner.checks)
            cal = calibrate(self.lm, rows, impute=imputes)
        except Exception as err:  # e.g. out of memory: the audit records the failures itself
            cal = Calibration.unmeasured(rows, f"{type(err).__name__}: {first_line(err)}")
        with rows_limit(cal.rows()):
            costs = self._source_costs(rows, cal if cal.error is None else None)
        labelled = all(e.label is not None for e in self.listing.entries)
        has_masks = self.masks_dir is not None

        def estimate(checks: list) -> list:
            capped = any(c.p.get("max_images") is not None and int(c.p["max_images"]) < n for c in checks)
            return build_stages(
                costs,
                checks,
                n,
                cal,
                self.lm,
                extra_predict=capped and not labelled,
                has_masks=has_masks,
                examples=0 if _stores_class_maps(checks) else len(self.figures.names),
            )

        reductions: list[dict[str, Any]] = []
        fits = True
        budget = cfg.values.get("budget")
        if budget is not None:
            left = float(budget) - (time.perf_counter() - self.started)
            checks, _, reductions, fits = fit(
                list(self.runner.checks), estimate, left, n, self.runner.rebuild
            )
            self.runner.replace(checks)
        stages = estimate(self.runner.checks)
        peak = _peak_estimate(
            cal, cal.rows()["backward"], any(c.name == "randomization" for c in self.runner.checks)
        )
        return Plan(cal, stages, _profile(cfg), budget, reductions, peak, fits)

    def _source_costs(self, rows: int, cal: Calibration | None = None) -> list[SourceCost]:
        """Each method's declared passes and its measured seconds per image for one map
        computation, timed on seeded random images: ``rows`` of them, or as few as keep the
        timing of a method near 2 s by ``cal``'s pass times (graph methods after a one-image
        warm-up that builds the graph); without ``cal``, untimed."""
        size = tuple(self.lm.input_size)
        h, w = size
        gen = torch.Generator().manual_seed(self.cfg.seed)
        x = torch.randn(rows, 3, h, w, generator=gen).to(self.device)
        targets = torch.zeros(rows, dtype=torch.long, device=self.device)
        costs = []
        for s in self.sources:
            method = get_method(s.method)
            params = getattr(s, "params", {})
            passes = method.passes(params, size)
            refs = int(params.get("n_baselines", 1)) if method.reference_input is not None else 0
            seconds = None
            if cal is not None and not passes.empty:
                per_image = max(cal.floor(passes), 1e-9)
                n = int(min(rows, max(1, 2.0 // per_image)))
                try:
                    if method.needs_internals or s.provides:  # builds (and caches) the graph
                        s.maps(self.lm, x[:1], targets[:1])
                    t0 = time.perf_counter()
                    s.maps(self.lm, x[:n], targets[:n])
                    seconds = (time.perf_counter() - t0) / n
                except Exception:  # the audit records the method's error; plan from its passes
                    seconds = None
                finally:
                    s.forget()
            signed = sum(1 for v in s.variants if v.signed)
            costs.append(
                SourceCost(
                    s.method, passes, len(s.variants), signed, bool(s.model_independent), s, seconds, refs
                )
            )
        return costs

    def _draw_samples(self) -> None:
        """Capped checks measure a seeded class-stratified sample of the images (the folder's
        label where it gives one, else the predicted class: one extra forward pass per
        image), the same images for every method; recorded in ``check_info``."""
        caps = self.runner.caps()
        entries = self.listing.entries
        if not caps or all(cap >= len(entries) for cap in caps.values()):
            return
        if all(e.label is not None for e in entries):
            names = [e.rel for e in entries]
            folders = self.listing.class_names or []
            classes: list[object] = [folders[e.label] if e.label < len(folders) else e.label for e in entries]
            how = "folder label"
        else:
            names, classes = self._predicted_classes()
            how = "predicted class"
        for check, cap in caps.items():
            if cap >= len(names):
                continue
            pick = stratified_sample(names, classes, cap, self.cfg.seed)
            self.runner.assign_sample(check, pick)
            counts: dict[str, int] = {}
            for name, cls in zip(names, classes):
                if name in set(pick):
                    counts[str(cls)] = counts.get(str(cls), 0) + 1
            self.result.check_info.setdefault(check, {})["sample"] = {
                "images": pick,
                "of": len(names),
                "stratified_by": how,
                "seed": self.cfg.seed,
                "per_class": counts,
            }

    def _predicted_classes(self) -> tuple[list[str], list[object]]:
        """The top-1 class of every decodable image (no gradients; images that fail to decode
        or give non-finite logits are left out, as the audit will skip them)."""
        names: list[str] = []
        classes: list[object] = []
        decoded = iter_decoded(self.listing, max_pixels=self.cfg.max_pixels)
        while True:
            items = next_batch(decoded, self.cfg.batch_size, [])
            if not items:
                break
            with torch.no_grad():
                logits = self.lm.logits(self.lm.preprocess([d.image for d in items]))
            for d, row in zip(items, logits):
                if bool(torch.isfinite(row).all()):
                    names.append(d.entry.rel)
                    classes.append(int(row.argmax()))
        return names, classes

    def _plan_sources(self) -> list[MapSource]:
        """The map sources of the selected methods; those that cannot run recorded as skipped."""
        cfg, planned = self.cfg, []
        for name in cfg.methods:
            method = get_method(name)
            params = dict(method.params)
            params.update(profile_params(_profile(cfg), "methods").get(name, {}))
            if "layer" in params and cfg.cam_layer:
                params["layer"] = cfg.cam_layer
            # --method-param METHOD.NAME=VALUE (validated by the config) overrides both
            params.update((cfg.values.get("method_params") or {}).get(name, {}))
            source = build_source(name, psi=list(cfg.psi), post=list(cfg.post), params=params)
            entry = {
                "method": name,
                "family": method.family,
                "params": _jsonable(params),
                "reference": method.reference,
                "status": "ok",
                "reason": None,
                "option": method.option,
                "origin": method.origin,
                "variants": [v.psi or v.post for v in source.variants],
            }
            if method.option == "psi":
                entry["params"]["psi"] = list(cfg.psi)
            if method.needs_internals and self.lm.format == "torchscript":
                entry.update(
                    status="skipped",
                    reason="needs layer internals, which a TorchScript "
                    "model does not expose; export the model with torch.export (.pt2)",
                )
            elif (why := self._unsupported(method)) is not None:
                entry.update(status="skipped", reason=why)  # no rule for an op of this model
            if entry["status"] == "skipped":
                self.runner.fail_source(source, f"{name} was skipped: {entry['reason']}", skipped=True)
            else:
                planned.append(source)
            self.result.methods.append(entry)
        return planned

    def _unsupported(self, method: Any) -> str | None:
        """Why ``method`` has no rule for an op of the model (``Method.unsupported``), asked
        on one seeded example image; ``None`` when it can run. A failure of the question
        itself leaves the method planned: running it records its own error."""
        if method.unsupported is None:
            return None
        gen = torch.Generator().manual_seed(self.cfg.seed)
        x = torch.randn(1, 3, *self.lm.input_size, generator=gen).to(self.device)
        try:
            return method.unsupported(self.lm, x)
        except Exception:  # e.g. the graph cannot be captured: the method's run says so
            return None

    # ------------------------------------------------------------------------------- run
    def run(self) -> AuditResult:
        """Stream the images through every method and check; judge; the filled result."""
        self.run_units()
        return self._finish()

    def run_units(self) -> None:
        """Stream the images through every method and check, without judging."""
        with self.counter.active(), rows_limit(self.plan_.calibration.rows()):
            self._run_batches()

    def _run_batches(self) -> None:
        decoded = iter_decoded(self.listing, max_pixels=self.cfg.max_pixels)
        while True:
            if self.batch_no < self.n_batches:
                self.batch_no += 1
                self._step("decoding images")
            with self.timer.stage("decode_images"):
                items = next_batch(decoded, self.cfg.batch_size, self.skipped)
            if not items:
                break
            self._run_batch(items)
            self._record_inputs()

    def _finish(self) -> AuditResult:
        """Judge, caveats, figures, timings and the plan against what was measured."""
        result = self.result
        self._record_inputs()
        # batches of images that could not be decoded never ran: their units are done
        self.units_done = self.units_total - 1
        self._step("judging", batch=False)
        if not result.images:
            first = self.skipped[0] if self.skipped else None
            raise NoImagesError(
                f"none of the {self.listing.found} image files could be used",
                path=self.images,
                hint=f"first problem: {first.path}: {first.reason}" if first else None,
            )
        with self.timer.stage("judge"):
            result.checks = self.runner.results()
            sims = {k: float(np.mean(v)) for k, v in self.edge_sim.items() if v}
            result.caveats = compute_caveats(result.checks, self.discards, sims, result.completeness)
            result.figures = self.figures.to_dict(result.checks)
        result.run["oom_retries"] = self.runner.oom_retries
        result.run["statistics"] = {"interval": stats.INTERVAL_METHOD, **self.runner.calibration}
        result.summarize(self.cfg.fail_on, max_skipped=self.cfg.max_skipped)
        per_stage = {**self.timer.per_stage, **self.runner.timings}
        result.timings = {
            "total_s": time.perf_counter() - self.started,
            "per_stage": {k: round(v, 4) for k, v in per_stage.items()},
        }
        if self.state is not None and self.state.reused:
            # the seconds the reused units took in the interrupted run (not spent in this one)
            result.timings["reused_units"] = self.state.reused
            result.timings["reused_s"] = {k: round(v, 4) for k, v in self.state.reused_s.items()}
            result.run["resumed"]["units_reused"] = self.state.reused
        if self.state is not None and self.state.steps_reused:
            result.run.setdefault("resumed", {})["steps_reused"] = self.state.steps_reused
        if self.state is not None and self.state.broken:
            result.run["resume_state"] = f"not saved after: {self.state.broken}"
        result.run["duration_s"] = result.timings["total_s"]
        if "world_size" not in result.run:  # one process (torchrun: saliaudit.distributed sets them)
            result.run["world_size"] = 1
            seconds = round(result.timings["total_s"], 3)
            result.run["ranks"] = [
                {"rank": 0, "device": str(self.device), "images": len(result.images), "seconds": seconds}
            ]
        result.plan = self._plan_record(per_stage)
        self.units_done = self.units_total
        self._step("audited", batch=False)
        return result

    def judge_partial(self) -> None:
        """An interrupted audit: judge what was measured so far (the cells of every finished
        (batch, method) unit, and of the checks that finished in the unit that was running),
        so that the partial results hold every number measured. Best effort: a failure
        leaves the cells empty."""
        if not hasattr(self, "runner"):
            return
        try:
            self.result.checks = self.runner.results()
            self.result.figures = self.figures.to_dict(self.result.checks)
        except Exception:  # the partial results are still written, without cells
            self.result.checks = []

    def _plan_record(self, per_stage: dict[str, float]) -> dict[str, Any]:
        """The plan with, per stage, the measured seconds, the counted passes and the ratios
        measured / floor and measured / estimate; totals over the planned stages."""
        doc = self.plan_.to_dict()
        for name, st in doc["stages"].items():
            measured = per_stage.get(name)
            counted = self.counter.passes(name)
            st["measured_s"] = None if measured is None else round(measured, 3)
            st["counted"] = counted.to_dict()
            st["floor_measured_s"] = round(self.plan_.calibration.floor(counted), 3)
            st["ratio_to_floor"] = _ratio(measured, st["floor_s"])
            st["ratio_to_estimate"] = _ratio(measured, st["estimated_s"])
        planned = [v["measured_s"] for v in doc["stages"].values() if v["measured_s"] is not None]
        doc["measured_s"] = round(sum(planned), 3)
        doc["ratio_to_estimate"] = _ratio(doc["measured_s"], doc["estimated_s"])
        doc["unplanned_s"] = {
            k: round(v, 3) for k, v in per_stage.items() if k not in doc["stages"] and v >= 0.01
        }
        doc["total_s"] = round(time.perf_counter() - self.started, 3)
        doc["peak_rss_bytes"] = peak_rss_bytes()
        unplanned = {
            k: self.counter.passes(k).to_dict() for k in self.counter.counts if k not in doc["stages"]
        }
        if unplanned:
            doc["unplanned_passes"] = unplanned
        return doc

    def _step(self, what: str, batch: bool = True) -> None:
        """Report progress: ``what`` runs now, ``self.units_done`` units are done."""
        if self.progress:
            text = f"batch {self.batch_no}/{self.n_batches} · {what}" if batch else what
            self.progress(text, min(self.units_done, self.units_total), self.units_total)

    def _record_inputs(self) -> None:
        self.result.inputs["loaded"] = len(self.result.images)
        self.result.inputs["skipped"] = [{"path": s.path, "reason": s.reason} for s in self.skipped]

    def _run_batch(self, items: list) -> None:
        """Predict one batch, run every source and check on it; the batch lands whole."""
        if self.shard is not None:
            self.shard.at(self.batch_no, [d.entry.rel for d in items])
        self._step("predicting")
        with self.timer.stage("predict"), self.counter.at("predict"):
            pred = predict_batch(
                self.lm,
                items,
                seed=self.cfg.seed,
                offset=len(self.result.images),
                examples=self.figures.names,
                masks_dir=self.masks_dir,
                folders=self.listing.class_names,
                on_retry=self.runner.count_retry,
            )
        self.skipped.extend(pred.dropped)
        start = self.units_done
        if pred.batch is None:  # every image of the batch gave NaN/Inf logits
            self.units_done = start + len(self.sources) * self.per_source
            return
        batch = pred.batch
        self.figures.add_images(batch, pred.images, self.lm.class_names, pred.probs)
        edges: list[torch.Tensor | None] = []  # computed once, when a method first needs them
        complete: list[CompletenessRecord] = []
        for k, source in enumerate(self.sources):
            base = start + k * self.per_source
            self.units_done = base
            saved = self.state.take(self.batch_no, source.method, batch.images) if self.state else None
            if saved is None and self.shard is not None:  # torchrun, rank 0: the ranks' units
                saved = self.shard.take(self.batch_no, source.method, batch.images)
            if saved is not None:  # --resume: this unit's numbers were saved by the earlier run
                self._step(f"method {source.method} (saved)")
                restore_unit(self, saved, source, complete)
                self.units_done = base + self.per_source
                self.runner.log.clear()
                continue
            if self.shard is not None and not self.shard.owns(self.batch_no):
                self.units_done = base + self.per_source  # another rank computes it
                continue
            mark = Mark(self, complete)
            self._step(f"method {source.method}")
            maps = self._maps(source, batch, complete)
            self.units_done = base + 1
            if maps is not None:
                if not edges:
                    edges.append(self._edge_maps(batch))
                progress = (
                    self.state.progress(self.batch_no, source.method, batch.images) if self.state else None
                )
                for c in self.runner.checks:
                    c.progress = progress
                self.runner.progress = progress
                try:
                    self._use_maps(source, batch, pred, maps, edges[0], on_check=self._check_step(base + 1))
                finally:
                    for c in self.runner.checks:
                        c.progress = None
                    self.runner.progress = None
            self.units_done = base + self.per_source
            source.forget()
            del maps
            if self.state is not None:  # saved as soon as it is finished
                self.state.save(unit_record(self, mark, source, batch.images, complete))
            if self.shard is not None:  # gathered by rank 0 at the end
                self.shard.keep(unit_record(self, mark, source, batch.images, complete), self.out_dir)
            self.runner.log.clear()
            release_memory()  # the next method starts from the memory this one really holds
        self.runner.end_batch(batch)
        # a batch lands in the results whole (an interrupted run keeps consistent records)
        self.result.images.extend(pred.records)
        self.result.completeness.extend(complete)

    def _entry(self, source: MapSource) -> dict[str, Any]:
        return next(e for e in self.result.methods if e["method"] == source.method)

    def _maps(
        self, source: MapSource, batch: Batch, complete: list[CompletenessRecord]
    ) -> dict[Variant, torch.Tensor] | None:
        """``source``'s top-1 maps for the batch (halved on out-of-memory); ``None`` when the
        method failed (recorded: every check of it gets ERROR)."""
        entry = self._entry(source)
        if entry["status"] != "ok":
            return None
        retry = self.runner.count_retry
        try:
            with self.timer.stage(f"method:{source.method}"), self.counter.at(f"method:{source.method}"):
                if "decomposition" in source.provides:  # once (halved on OOM), then reused
                    fg = oom_split(
                        lambda b, _m: source.decompose(b.model, b.x, b.targets),
                        batch,
                        {},
                        lambda a, b: type(a).cat(a, b),
                        retry,
                    )
                    source.prime(batch.model, batch.x, batch.targets, fg)
                    self._record_decomposition(batch, fg, complete)
                collect = get_method(source.method).reference_input is not None
                if collect:
                    source.collect = True  # type: ignore[attr-defined]
                try:
                    maps = oom_split(
                        lambda b, _m: source.maps(b.model, b.x, b.targets), batch, {}, _cat_maps, retry
                    )
                finally:
                    if collect:
                        source.collect = False  # type: ignore[attr-defined]
            if collect:
                with self.counter.at(f"method:{source.method}"):
                    self._record_delta(source, batch, source.pop_totals())
            return maps
        except Exception as err:  # one method failing must not stop the audit
            reason = (
                str(err) if isinstance(err, SaliauditError) else f"{type(err).__name__}: {first_line(err)}"
            )
            if is_oom(err):
                reason += f" (out of memory even for one image: {OOM_HINT})"
            entry.update(status="error", reason=reason)
            self.runner.fail_source(source, f"the method failed: {reason}")
            return None

    def _record_delta(self, source: MapSource, batch: Batch, totals: torch.Tensor | None) -> None:
        """Summation-to-delta of a method with a reference input, per image (informational):
        ``Σ A`` against ``f(x) − mean_k f(x̄_k)``."""
        from .methods.common import forward_fn, picked

        method = get_method(source.method)
        if totals is None or len(totals) != len(batch):
            return
        try:
            with torch.no_grad():
                bases = method.reference_input(batch.model, batch.x, **getattr(source, "params", {}))
                k = bases.shape[0]
                flat = bases.reshape(k * len(batch), *batch.x.shape[1:])
                f_ref = picked(forward_fn(batch.model)(flat), batch.targets.repeat(k))
                f_ref = f_ref.view(k, len(batch)).double().mean(0)
        except Exception as err:  # informational: a failure is recorded, never fatal
            self.result.attribution_completeness.append(
                {"method": source.method, "image": None, "error": first_line(err)}
            )
            return
        fx = batch.logits.gather(1, batch.targets.view(-1, 1))[:, 0].double()
        expected = fx - f_ref.to(fx.device)
        delta = totals.double().to(fx.device) - expected
        rel = delta.abs() / expected.abs().clamp_min(1e-6)
        params = getattr(source, "params", {})
        reference = params.get("baseline", "zero")
        for i, name in enumerate(batch.images):
            self.result.attribution_completeness.append(
                {
                    "method": source.method,
                    "image": name,
                    "reference": str(reference),
                    "total": float(totals[i]),
                    "expected": float(expected[i]),
                    "delta": float(delta[i]),
                    "relative_delta": float(rel[i]),
                }
            )

    def _record_decomposition(self, batch: Batch, fg: Any, complete: list[CompletenessRecord]) -> None:
        lead = fg.leading_share()
        layout = getattr(fg, "layout", None)
        if layout and (layout.get("token_grid") or layout.get("attention_modules")):
            entry = next((e for e in self.result.methods if e.get("method") == "fullgrad"), None)
            if entry is not None:
                entry["decomposition"] = dict(layout)
        for i, name in enumerate(batch.images):
            t = int(batch.targets[i])
            complete.append(
                CompletenessRecord(
                    name,
                    t,
                    batch.model.class_names[t],
                    float(fg.logits[i]),
                    float(fg.reconstructed[i]),
                    float(fg.residual[i]),
                    list(fg.unaccounted),
                    None if lead is None else float(lead[i]),
                )
            )
        if self.discards is not None:
            self.discards.add(fg)

    def _use_maps(
        self,
        source: MapSource,
        batch: Batch,
        pred: Predicted,
        maps: dict[Variant, torch.Tensor],
        edges: torch.Tensor | None,
        on_check: Callable[[str], None] | None = None,
    ) -> None:
        """Edge similarity, example figures, overlays and every check of one method's maps
        (``on_check(name)`` before each check: progress)."""
        if edges is not None:
            from .checks.similarity import spearman

            for v, m in maps.items():
                if bool(torch.isfinite(m).all()):  # NaN maps are the checks' business
                    values, _ = spearman(m, edges, absolute=True)
                    self.edge_sim.setdefault(v.label, []).extend(float(s) for s in values)
        with self.timer.stage("figures"), self.counter.at("figures"):
            try:  # halved on out-of-memory like the maps; the example figures are optional
                oom_split(
                    lambda b, m: self.figures.add_maps(b, source, m),
                    batch,
                    maps,
                    lambda a, b: None,
                    self.runner.count_retry,
                )
            except Exception as err:
                if not is_oom(err):
                    raise
        if self.cfg.overlays != "none":  # "examples": the report's example images only
            only = None if self.cfg.overlays == "all" else self.figures.names
            with self.timer.stage("overlays"):
                self.result.maps.extend(write_overlays(batch, pred.images, maps, self.out_dir, only))
        self.runner.run(batch, source, maps, on_check=on_check)

    def _check_step(self, first: int) -> Callable[[str], None]:
        """The ``on_check`` progress hook of one (batch, method): the n-th check starts with
        ``first + n`` units done."""
        count = {"n": 0}

        def on_check(name: str) -> None:
            self.units_done = first + count["n"]
            count["n"] += 1
            self._step(f"check {name}")

        return on_check

    def _edge_maps(self, batch: Batch) -> torch.Tensor | None:
        """The edge control's magnitude maps (for the resembles-edge caveat)."""
        try:
            return postprocess(get_method("edge")(self.lm, batch.x, batch.targets), "abs")
        except Exception:  # the caveat is optional; the edge method is tested on its own
            return None


def _profile(cfg: AuditConfig) -> str:
    return cfg.values.get("profile") or "standard"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(float(a) / float(b), 3)


def _peak_estimate(cal: Any, rows: int, randomizes: bool) -> int:
    """Peak memory: the process after loading, the activations of one batch's backward
    pass (kept activations plus their gradients), and the randomization's working copy and
    randomized values of the parameters."""
    copies = 2 * cal.parameter_bytes if randomizes else 0
    return int(cal.base_rss + 2 * rows * cal.activation_bytes + copies)


def _stores_class_maps(checks: list) -> bool:
    """A check shows the top-1 and lowest-class maps in its own report section and stores
    those of its figure images itself (class_sensitivity, uncapped): ``figures.maps`` would
    only repeat them, for images the report does not show."""
    return any(
        c.shows_class_maps and int(c.p.get("figure_images") or 0) > 0 and c.p.get("max_images") is None
        for c in checks
    )


def _cat_maps(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v)) for k, v in d.items()
    }


def _masks_dir(cfg: AuditConfig) -> Path | None:
    if not cfg.masks:
        return None
    path = Path(cfg.masks)
    if not path.is_dir():
        raise UsageError(
            "the masks folder does not exist",
            path=path,
            hint="pass --masks DIR with MASKS/<image path without extension>/<class>.png",
        )
    return path


def _thresholds(cfg: AuditConfig) -> dict[str, dict[str, Any]]:
    t = {k: dict(v) for k, v in cfg.thresholds.items()}
    t.setdefault("completeness", {}).setdefault("fail", cfg.completeness_tolerance)
    return t


def _check_params(cfg: AuditConfig) -> dict[str, dict[str, Any]]:
    """The checks' parameters: the profile's, overridden by the user's."""
    p = profile_params(_profile(cfg), "checks")
    for k, v in cfg.check_params.items():
        p.setdefault(k, {}).update(v)
    if cfg.flip:
        p.setdefault("sign_flip", {})["pairs"] = [list(x) for x in cfg.flip]
    return p
