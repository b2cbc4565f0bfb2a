"""Runs an audit: model × images → FullGrad decompositions under every ψ → checks → results.

Images stream through in batches (memory is bounded by the batch, not the folder). Each batch
costs one forward pass for the prediction and one forward+backward pass for the full-gradient
decomposition; every ψ is computed from that one decomposition. The model is never modified.
"""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .checks import CHECKS
from .config import AuditConfig
from .errors import NoImagesError, SaliauditError
from .methods import Method, get_method, postprocess
from .data import DecodedImage, Skipped, find_images, iter_decoded, require_images
from .methods.fullgrad import full_gradients
from .model import LoadedModel, load_model, resolve_device
from .psi import get_psi
from .report.overlay import save_overlay
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


def map_filename(rel: str, method: str, variant: str) -> str:
    """A flat, safe file name for the overlay of image ``rel`` by ``method`` (ψ or post)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", rel.rsplit(".", 1)[0].replace("/", "__"))
    return f"{stem[:150]}.{method}.{variant}.png"


def _display_image(image, short_side: int = 256, long_side: int = 512):
    """The image at a size where an overlay is readable: small inputs are enlarged."""
    w, h = image.size
    scale = max(short_side / min(w, h), 1.0)
    scale = min(scale, max(long_side / max(w, h), 1.0)) if scale > 1 else min(1.0, long_side / max(w, h))
    if abs(scale - 1.0) < 1e-6:
        return image
    from PIL import Image

    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)


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
    """Audit ``model_path`` on ``images``; writes overlays into ``out_dir/maps``.

    ``result`` (from :func:`new_result`) is filled in place, so that a caller interrupted
    half-way still holds everything measured so far. Raises the :mod:`saliaudit.errors`
    subclasses for unusable models (exit 3) or image sets (exit 4).
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
    psis = [get_psi(p) for p in cfg.psi] if "fullgrad" in cfg.methods else []
    methods = _plan_methods(lm, cfg, result)
    maps_dir = out_dir / "maps"
    total = len(listing.entries)
    done = 0
    decoded = iter_decoded(listing, max_pixels=cfg.max_pixels)
    if progress:
        progress("Decomposing", 0, total)
    while True:
        with timer.stage("decode_images"):
            batch = next(_batches_iter(decoded, cfg.batch_size, skipped), None)
        if batch is None:
            break
        x, targets = _audit_batch(lm, batch, psis, cfg, maps_dir, out_dir, result, timer,
                                  listing.class_names)
        _comparison_maps(lm, batch, x, targets, methods, cfg, maps_dir, out_dir, result, timer)
        done += len(batch)
        result.inputs["loaded"] = len(result.images)
        result.inputs["skipped"] = [{"path": s.path, "reason": s.reason} for s in skipped]
        if progress:
            progress("Decomposing", done + len(skipped) - len(listing.skipped), total)
    result.inputs["loaded"] = len(result.images)
    result.inputs["skipped"] = [{"path": s.path, "reason": s.reason} for s in skipped]
    if not result.images:
        first = skipped[0] if skipped else None
        raise NoImagesError(
            f"none of the {listing.found} image files could be used", path=images,
            hint=f"first problem: {first.path}: {first.reason}" if first else None)
    with timer.stage("checks"):
        check = CHECKS["completeness"]()
        m = check.measure(records=result.completeness)
        verdict = check.judge(m, {"fail": cfg.completeness_tolerance})
        if "fullgrad" not in cfg.methods:
            verdict.message = "FullGrad was not selected (--methods)"
        result.checks = [verdict]
    result.summarize(cfg.fail_on)
    result.timings = {"total_s": time.perf_counter() - started_clock,
                      "per_stage": {k: round(v, 4) for k, v in timer.per_stage.items()}}
    result.run["duration_s"] = result.timings["total_s"]
    return result


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


def _audit_batch(lm: LoadedModel, batch: list[DecodedImage], psis: list, cfg: AuditConfig,
                 maps_dir: Path, out_dir: Path, result: AuditResult, timer: _Timer,
                 folders: list[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    with timer.stage("preprocess"):
        x = lm.preprocess([d.image for d in batch])
    with timer.stage("predict"):
        logits = lm.logits(x)
        probs = torch.softmax(logits.double(), dim=1)
        targets = logits.argmax(1)
    names = lm.class_names
    for i, d in enumerate(batch):
        t = int(targets[i])
        label, folder = _true_label(d.entry.label, folders, names)
        result.images.append(ImageRecord(d.entry.rel, d.sha256, label, t, names[t],
                                         float(probs[i, t]), list(d.notes), folder))
    if "fullgrad" not in cfg.methods:
        return x, targets
    with timer.stage("decomposition"):
        fg = full_gradients(lm, x, targets)
    with timer.stage("psi"):
        maps = {k: v.cpu().numpy() for k, v in fg.saliency_maps([p.name for p in psis]).items()}
    for i, d in enumerate(batch):
        t = int(targets[i])
        result.completeness.append(CompletenessRecord(
            d.entry.rel, t, names[t], float(fg.logits[i]), float(fg.reconstructed[i]),
            float(fg.residual[i]), list(fg.unaccounted)))
    if not cfg.overlays:
        return x, targets
    with timer.stage("overlays"):
        maps_dir.mkdir(parents=True, exist_ok=True)
        for i, d in enumerate(batch):
            t = int(targets[i])
            shown = _display_image(d.image)
            for psi in psis:
                name = map_filename(d.entry.rel, "fullgrad", psi.name)
                save_overlay(maps_dir / name, shown, maps[psi.name][i], signed=psi.signed,
                             title=f"FullGrad psi={psi.name} - {names[t]}")
                result.maps.append(MapRecord(d.entry.rel, "fullgrad", psi.name, t,
                                             (maps_dir / name).relative_to(out_dir).as_posix(),
                                             psi.signed))
    return x, targets


def _plan_methods(lm: LoadedModel, cfg: AuditConfig, result: AuditResult) -> list[Method]:
    """The comparison methods that can run on this model; the others recorded as skipped."""
    planned = []
    for name in cfg.methods:
        if name == "fullgrad":
            result.methods.append({"method": name, "family": "fullgrad", "status": "ok",
                                   "params": {}, "reason": None})
            continue
        method = get_method(name)
        params = _method_params(method, cfg)
        entry = {"method": name, "family": method.family, "params": params,
                 "reference": method.reference, "status": "ok", "reason": None}
        if method.needs_internals and lm.format == "torchscript":
            entry.update(status="skipped", reason="needs layer internals, which a TorchScript "
                         "model does not expose; export the model with torch.export (.pt2)")
        else:
            planned.append(method)
        result.methods.append(entry)
    return planned


def _method_params(method: Method, cfg: AuditConfig) -> dict[str, Any]:
    params = dict(method.params)
    if "layer" in params and cfg.cam_layer:
        params["layer"] = cfg.cam_layer
    return params


def _comparison_maps(lm: LoadedModel, batch: list[DecodedImage], x: torch.Tensor,
                     targets: torch.Tensor, methods: list[Method],
                     cfg: AuditConfig, maps_dir: Path, out_dir: Path, result: AuditResult,
                     timer: _Timer) -> None:
    """Signed attributions of the comparison methods, post-processed and drawn."""
    if not methods:
        return
    entries = {e["method"]: e for e in result.methods}
    for method in methods:
        entry = entries[method.name]
        if entry["status"] == "error":
            continue
        try:
            with timer.stage(f"method:{method.name}"):
                attribution = method(lm, x, targets, **_method_params(method, cfg))
        except SaliauditError as err:
            entry.update(status="error", reason=str(err))
            continue
        except Exception as err:  # one method failing must not stop the audit
            entry.update(status="error", reason=f"{type(err).__name__}: {err}")
            continue
        if not cfg.overlays:
            continue
        with timer.stage("overlays"):
            maps_dir.mkdir(parents=True, exist_ok=True)
            for post in cfg.post:
                maps = postprocess(attribution, post).cpu().numpy()
                for i, d in enumerate(batch):
                    t = int(targets[i])
                    name = map_filename(d.entry.rel, method.name, post)
                    save_overlay(maps_dir / name, _display_image(d.image), maps[i],
                                 signed=post == "signed",
                                 title=f"{method.name} {post} - {lm.class_names[t]}")
                    result.maps.append(MapRecord(d.entry.rel, method.name, None, t,
                                                 (maps_dir / name).relative_to(out_dir).as_posix(),
                                                 post == "signed", post))
