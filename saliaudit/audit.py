"""Runs an audit: model × images → FullGrad decompositions under every ψ → checks → results.

Images stream through in batches (memory is bounded by the batch, not the folder). Each batch
costs one forward pass for the prediction and one forward+backward pass for the full-gradient
decomposition; every ψ is computed from that one decomposition. The model is never modified.
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

from . import __version__
from .caveats import AbsDiscards, compute_caveats
from .checks.base import Batch, MapSource
from .checks.runner import CheckRunner, is_oom, oom_split
from .config import AuditConfig
from .data import DecodedImage, Skipped, find_images, iter_decoded, require_images
from .errors import NoImagesError, SaliauditError, UsageError
from .figures import ExampleFigures, choose_examples
from .methods import Method, get_method, postprocess
from .methods.fullgrad import FullGradients
from .methods.sources import FullGradSource, MethodSource
from .model import LoadedModel, load_model, resolve_device
from .report.overlay import display_image, map_filename, save_overlay
from .result import AuditResult, CompletenessRecord, ImageRecord, MapRecord

__all__ = ["Progress", "run_audit", "environment_versions"]

Progress = Callable[[str, int, int | None], None]
"""Progress callback: ``(stage description, done, total or None)``."""


class _Timer:
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

    return {"saliaudit": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__,
            "platform": platform.platform()}


def _model_info(lm: LoadedModel) -> dict[str, Any]:
    return {"path": str(lm.path) if lm.path else None, "sha256": lm.sha256, "format": lm.format,
            "arch": lm.arch, "num_classes": lm.num_classes, "input_size": list(lm.input_size),
            "mean": list(lm.mean), "std": list(lm.std), "static_batch": lm.static_batch,
            "class_names": list(lm.class_names), "sources": dict(lm.sources),
            "limitations": list(lm.limitations), "notes": list(lm.notes)}


def new_result(cfg: AuditConfig, started: datetime, device: torch.device) -> AuditResult:
    """An empty result with the run and configuration recorded (filled as the audit runs)."""
    return AuditResult(
        tool={"name": "saliaudit", "version": __version__},
        run={"started_at": started.isoformat(timespec="seconds"), "duration_s": None,
             "seed": cfg.seed, "device": str(device), "versions": environment_versions()},
        config={"values": dict(cfg.values), "sources": dict(cfg.sources),
                "file": str(cfg.config_file) if cfg.config_file else None},
        model={}, inputs={"source": None, "found": 0, "loaded": 0, "skipped": []})


def run_audit(model_path: str | Path, images: str | Path, cfg: AuditConfig, out_dir: Path,
              progress: Progress | None = None, result: AuditResult | None = None) -> AuditResult:
    """Audit ``model_path`` on ``images``: maps of every method and ψ, the checks, caveats.

    ``result`` (from :func:`new_result`) is filled in place, so that a caller interrupted
    half-way still holds everything measured so far. Overlays go to ``out_dir/maps``.
    Raises the :mod:`saliaudit.errors` subclasses for unusable models (exit 3) or image
    sets (exit 4); a failing method or check cell is recorded and the audit goes on.
    """
    timer = _Timer()
    started_clock = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    result = result or new_result(cfg, datetime.now(timezone.utc), device)
    with timer.stage("load_model"):
        lm = load_model(model_path, arch=cfg.arch, num_classes=cfg.num_classes,
                        input_size=cfg.input_size, mean=cfg.mean, std=cfg.std, labels=cfg.labels,
                        trust_model=cfg.trust_model, device=device)
    result.model = _model_info(lm)
    with timer.stage("find_images"):
        listing = find_images(images, max_images=cfg.max_images, sample=cfg.sample, seed=cfg.seed)
    skipped: list[Skipped] = list(listing.skipped)
    result.inputs.update(source=str(images), found=listing.found,
                         class_names_from_folders=listing.class_names)
    require_images(listing)
    masks_dir = _masks_dir(cfg)
    runner = CheckRunner(cfg.checks, _thresholds(cfg), _check_params(cfg), masks_dir is not None)
    result.check_info = runner.info()
    sources = _plan_sources(lm, cfg, result, runner)
    figures = ExampleFigures(choose_examples([e.rel for e in listing.entries],
                                             int(getattr(cfg, "examples_html", 24)), cfg.seed))
    discards = AbsDiscards() if "fullgrad" in cfg.methods else None
    edge_sim: dict[str, list[float]] = {}
    total, done = len(listing.entries), 0
    decoded = iter_decoded(listing, max_pixels=cfg.max_pixels)
    if progress:
        progress("Auditing", 0, total)
    while True:
        with timer.stage("decode_images"):
            items = next(_batches_iter(decoded, cfg.batch_size, skipped), None)
        if items is None:
            break
        records: list[ImageRecord] = []
        batch = _predict(lm, items, cfg, masks_dir, listing.class_names, records,
                         len(result.images), timer, figures, skipped, runner._retried)
        if batch is None:  # every image of the batch gave NaN/Inf logits (now in skipped)
            continue
        edges = _edge_maps(lm, batch) if sources else None
        complete: list[CompletenessRecord] = []
        for source in sources:
            _run_source(source, batch, items, cfg, runner, figures, discards, edges, edge_sim,
                        out_dir, result, complete, timer)
            if isinstance(source, FullGradSource):
                source.forget()
        runner.end_batch(batch)
        # a batch lands in the results whole (an interrupted run keeps consistent records)
        result.images.extend(records)
        result.completeness.extend(complete)
        done += len(items)
        result.inputs["loaded"] = len(result.images)
        result.inputs["skipped"] = [{"path": s.path, "reason": s.reason} for s in skipped]
        if progress:
            progress("Auditing", done + len(skipped) - len(listing.skipped), total)
    result.inputs["loaded"] = len(result.images)
    result.inputs["skipped"] = [{"path": s.path, "reason": s.reason} for s in skipped]
    if not result.images:
        first = skipped[0] if skipped else None
        raise NoImagesError(
            f"none of the {listing.found} image files could be used", path=images,
            hint=f"first problem: {first.path}: {first.reason}" if first else None)
    with timer.stage("judge"):
        result.checks = runner.results()
        sims = {k: float(np.mean(v)) for k, v in edge_sim.items() if v}
        result.caveats = compute_caveats(result.checks, discards, sims)
        result.figures = figures.to_dict(result.checks)
    result.run["oom_retries"] = runner.oom_retries
    result.summarize(cfg.fail_on)
    per_stage = {**timer.per_stage, **runner.timings}
    result.timings = {"total_s": time.perf_counter() - started_clock,
                      "per_stage": {k: round(v, 4) for k, v in per_stage.items()}}
    result.run["duration_s"] = result.timings["total_s"]
    return result


def _masks_dir(cfg: AuditConfig) -> Path | None:
    if not cfg.masks:
        return None
    path = Path(cfg.masks)
    if not path.is_dir():
        raise UsageError("the masks folder does not exist", path=path,
                         hint="pass --masks DIR with MASKS/<image path without extension>/<class>.png")
    return path


def _thresholds(cfg: AuditConfig) -> dict[str, dict[str, Any]]:
    t = {k: dict(v) for k, v in cfg.thresholds.items()}
    t.setdefault("completeness", {}).setdefault("fail", cfg.completeness_tolerance)
    return t


def _check_params(cfg: AuditConfig) -> dict[str, dict[str, Any]]:
    p = {k: dict(v) for k, v in cfg.check_params.items()}
    if cfg.flip:
        p.setdefault("sign_flip", {})["pairs"] = [list(x) for x in cfg.flip]
    return p


def _predict(lm: LoadedModel, items: list[DecodedImage], cfg: AuditConfig, masks_dir: Path | None,
             folders: list[str] | None, records: list[ImageRecord], offset: int, timer: _Timer,
             figures: ExampleFigures, skipped: list[Skipped],
             on_retry: Callable[[int], None] | None = None) -> Batch | None:
    """Preprocess and predict one batch; record the images; the Batch the checks see.

    Images whose logits are NaN/Inf are removed from ``items`` (in place) into ``skipped``;
    ``None`` when none is left.
    """
    with timer.stage("preprocess"):
        x = lm.preprocess([d.image for d in items])
    with timer.stage("predict"):
        logits = _logits(lm, x, on_retry)
        finite = torch.isfinite(logits).all(1)
        if not bool(finite.all()):
            keep = [i for i in range(len(items)) if finite[i]]
            skipped.extend(Skipped(d.entry.rel, _NONFINITE) for i, d in enumerate(items)
                           if not finite[i])
            items[:] = [items[i] for i in keep]
            if not items:
                return None
            x, logits = x[keep], logits[keep]
        probs = torch.softmax(logits.double(), dim=1)
        targets = logits.argmax(1)
    names = lm.class_names
    labels, masks = [], [] if masks_dir is not None else None
    for i, d in enumerate(items):
        t = int(targets[i])
        label, folder = _true_label(d.entry.label, folders, names)
        labels.append(label)
        notes = list(d.notes)
        if masks is not None:
            masks.append(_load_masks(masks_dir, d.entry.rel, names, lm.input_size, notes,
                                     d.image.size))
        records.append(ImageRecord(d.entry.rel, d.sha256, label, t, names[t],
                                   float(probs[i, t]), notes, folder))
    batch = Batch(lm, x, [d.entry.rel for d in items], targets, logits, labels, masks, cfg.seed,
                  offset, figures.names)
    figures.add_images(batch, [d.image for d in items], names, probs)
    return batch


_NONFINITE = ("the model output NaN/Inf for this image; check the model's weights and its "
              "preprocessing (--mean, --std, --input-size)")


class _Rows:
    """The rows of a tensor as :func:`oom_split` sees a batch."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def select(self, index: list[int]) -> "_Rows":
        return _Rows(self.x[index[0]:index[-1] + 1])


def _logits(lm: LoadedModel, x: torch.Tensor, on_retry: Callable[[int], None] | None) -> torch.Tensor:
    """``lm.logits(x)``, run in halves on out-of-memory (down to one image)."""
    try:
        return oom_split(lambda rows, _m: lm.logits(rows.x), _Rows(x), {},
                         lambda a, b: torch.cat([a, b]), on_retry)
    except Exception as err:
        if not is_oom(err):
            raise
        raise SaliauditError(f"out of memory on {lm.device} even for one image "
                             f"({_first_line(err)})", path=lm.path,
                             hint=_OOM_HINT) from err


_OOM_HINT = "use --device cpu, a smaller --input-size, or free the device's memory"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _load_masks(masks_dir: Path, rel: str, names: list[str], size: tuple[int, int],
                notes: list[str], image_size: tuple[int, int]) -> dict[int, np.ndarray]:
    from .masks import load_masks, mask_skip_reason

    reason = mask_skip_reason(masks_dir, rel)
    if reason:
        notes.append(f"no masks: {reason}")
        return {}
    try:
        return load_masks(masks_dir, rel, names, size, image_size=image_size)
    except SaliauditError as err:
        notes.append(f"masks not used: {err}")
        return {}


def _edge_maps(lm: LoadedModel, batch: Batch) -> torch.Tensor | None:
    """The edge control's magnitude maps (for the resembles-edge caveat)."""
    try:
        return postprocess(get_method("edge")(lm, batch.x, batch.targets), "abs")
    except Exception:  # the caveat is optional; the edge method is tested on its own
        return None


def _run_source(source: MapSource, batch: Batch, items: list[DecodedImage], cfg: AuditConfig,
                runner: CheckRunner, figures: ExampleFigures, discards: AbsDiscards | None,
                edges: torch.Tensor | None, edge_sim: dict[str, list[float]], out_dir: Path,
                result: AuditResult, complete: list[CompletenessRecord], timer: _Timer) -> None:
    """One method on one batch: its maps, overlays, example figures and every check."""
    entry = next(e for e in result.methods if e["method"] == source.method)
    if entry["status"] != "ok":
        return
    fg = None
    try:
        with timer.stage(f"method:{source.method}"):
            if isinstance(source, FullGradSource):  # one decomposition (halved on OOM), reused
                fg = oom_split(lambda b, _m: source.decompose(b.model, b.x, b.targets), batch,
                               {}, FullGradients.cat, runner._retried)
                source.prime(batch.model, batch.x, batch.targets, fg)
            maps = oom_split(lambda b, _m: source.maps(b.model, b.x, b.targets), batch, {},
                             _cat_maps, runner._retried)
    except Exception as err:  # one method failing must not stop the audit
        if isinstance(err, KeyboardInterrupt):
            raise
        reason = (str(err) if isinstance(err, SaliauditError)
                  else f"{type(err).__name__}: {_first_line(err)}")
        if is_oom(err):
            reason += f" (out of memory even for one image: {_OOM_HINT})"
        entry.update(status="error", reason=reason)
        runner.fail_source(source, f"the method failed: {reason}")
        return
    if fg is not None:
        for i, name in enumerate(batch.images):
            t = int(batch.targets[i])
            complete.append(CompletenessRecord(
                name, t, batch.model.class_names[t], float(fg.logits[i]),
                float(fg.reconstructed[i]), float(fg.residual[i]), list(fg.unaccounted)))
        if discards is not None:
            discards.add(fg)
    if edges is not None:
        from .checks.similarity import spearman

        for v, m in maps.items():
            if not bool(torch.isfinite(m).all()):
                continue  # a method's NaN maps are the checks' business, not the caveat's
            values, _ = spearman(m, edges, absolute=True)
            edge_sim.setdefault(f"{v.method}/{v.psi or v.post}", []).extend(float(s) for s in values)
    with timer.stage("figures"):
        try:  # halved on out-of-memory like the maps; the example figures are optional
            oom_split(lambda b, m: figures.add_maps(b, source, m), batch, maps,
                      lambda a, b: None, runner._retried)
        except Exception as err:
            if not is_oom(err):
                raise
    if cfg.overlays:
        with timer.stage("overlays"):
            _write_overlays(batch, items, maps, out_dir, result)
    runner.run(batch, source, maps)


def _cat_maps(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _write_overlays(batch: Batch, items: list[DecodedImage], maps: dict, out_dir: Path,
                    result: AuditResult) -> None:
    maps_dir = out_dir / "maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    names = batch.model.class_names
    for v, m in maps.items():
        arr = m.detach().cpu().numpy()
        for i, d in enumerate(items):
            t = int(batch.targets[i])
            variant = v.psi or v.post
            name = map_filename(d.entry.rel, v.method, variant)
            what = f"FullGrad psi={v.psi}" if v.psi else f"{v.method} {v.post}"
            save_overlay(maps_dir / name, display_image(d.image), arr[i], signed=v.signed,
                         title=f"{what} - {names[t]}")
            result.maps.append(MapRecord(d.entry.rel, v.method, v.psi, t,
                                         (maps_dir / name).relative_to(out_dir).as_posix(),
                                         v.signed, v.post))


def _batches_iter(decoded: Iterator[DecodedImage | Skipped], size: int,
                  skipped: list[Skipped]) -> Iterator[list[DecodedImage]]:
    """One batch from a shared iterator (a generator per call keeps the state in ``decoded``)."""
    batch: list[DecodedImage] = []
    for item in decoded:
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        batch.append(item)
        if len(batch) == size:
            break
    if batch:
        yield batch


def _true_label(entry_label: int | None, folders: list[str] | None,
                names: list[str]) -> tuple[int | None, str | None]:
    """Ground truth from an ImageFolder layout, as the model's class index (matched by name).

    Folder indices follow the sorted folder names, which need not be the model's class
    order; a folder whose name is not a class name gives no label index.
    """
    if entry_label is None or not folders:
        return None, None
    folder = folders[entry_label]
    return (names.index(folder) if folder in names else None), folder


def _plan_sources(lm: LoadedModel, cfg: AuditConfig, result: AuditResult,
                  runner: CheckRunner) -> list[MapSource]:
    """The map sources of the selected methods; those that cannot run recorded as skipped."""
    planned: list[MapSource] = []
    for name in cfg.methods:
        if name == "fullgrad":
            result.methods.append({"method": name, "family": "fullgrad", "status": "ok",
                                   "params": {"psi": list(cfg.psi)}, "reason": None,
                                   "reference": "Srinivas & Fleuret, NeurIPS 2019"})
            planned.insert(0, FullGradSource(list(cfg.psi)))
            continue
        method = get_method(name)
        params = _method_params(method, cfg)
        entry = {"method": name, "family": method.family, "params": params,
                 "reference": method.reference, "status": "ok", "reason": None}
        source = MethodSource(method, params, list(cfg.post))
        if method.needs_internals and lm.format == "torchscript":
            entry.update(status="skipped", reason="needs layer internals, which a TorchScript "
                         "model does not expose; export the model with torch.export (.pt2)")
            runner.fail_source(source, f"{name} was skipped: {entry['reason']}", skipped=True)
        else:
            planned.append(source)
        result.methods.append(entry)
    return planned


def _method_params(method: Method, cfg: AuditConfig) -> dict[str, Any]:
    params = dict(method.params)
    if "layer" in params and cfg.cam_layer:
        params["layer"] = cfg.cam_layer
    return params
