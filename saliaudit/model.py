"""Loading the classifier to audit (see docs/usage.md, "Models").

Formats: ``.pt2`` (torch.export), a state_dict (``.pt``/``.pth``/``.safetensors``) plus
``--arch`` (torchvision, or ``timm:NAME``), TorchScript, a pickled ``nn.Module`` (only with
``--trust-model``), and a Hugging Face folder (``save_pretrained``).
Everything is loaded on the CPU first, validated on a blank batch, then moved to the device.
The user's file is only read; an in-memory module passed to :func:`wrap_module` is never mutated.

This is the public module: reading each file format lives in :mod:`saliaudit.model_formats` and,
for a state_dict, :mod:`saliaudit.model_arch` (:mod:`saliaudit.model_timm`), for a folder
:mod:`saliaudit.model_hf`; a tuple/dict output or a 1-channel model is adapted in
:mod:`saliaudit.model_adapt`, and the resize/crop policy is :mod:`saliaudit.preprocess`. Here the
flags and the values found in the file are resolved, and the result is validated and described
as a :class:`LoadedModel`.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saliaudit.errors import ModelLoadError, UsageError
from saliaudit.model_adapt import validate
from saliaudit.model_arch import load_state_dict_model
from saliaudit.model_formats import (
    inspect_file,
    load_pt2,
    load_torchscript,
    one_line,
    parse_size,
    parse_triple,
    read_torch_file,
)
from saliaudit.model_timm import load_timm_model, timm_name
from saliaudit.preprocess import Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TORCHSCRIPT_LIMITATION",
    "LoadedModel",
    "load_model",
    "parse_size",
    "parse_triple",
    "resolve_device",
    "wrap_module",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = (224, 224)
TORCHSCRIPT_LIMITATION = "TorchScript: layer internals are not available; methods that need them are skipped"


@dataclass
class LoadedModel:
    """A validated classifier plus everything needed to feed it images."""

    module: torch.nn.Module
    format: str
    path: Path | None
    sha256: str | None
    num_classes: int
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: list[str]
    exported: torch.export.ExportedProgram | None = None
    static_batch: int | None = None
    arch: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    limitations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    device: torch.device = torch.device("cpu")
    max_batch: int | None = None  # upper bound of a dynamic .pt2 batch dimension
    min_batch: int = 1  # lower bound of a dynamic .pt2 batch dimension
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def preprocess(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """RGB PIL images -> normalized float32 (B, 3, H, W) at ``input_size`` on ``self.device``,
        resized (and center-cropped) as :attr:`preprocessing` says."""
        from torchvision.transforms.v2 import functional as F

        out = [
            F.normalize(self.preprocessing.pixels(img, self.input_size), list(self.mean), list(self.std))
            for img in images
        ]
        if not out:
            return torch.empty((0, 3, *self.input_size), dtype=torch.float32, device=self.device)
        return torch.stack(out).to(self.device)

    def visible(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """The part of ``image`` the model sees (its center crop; the whole image without one),
        at the image's resolution: what a map is drawn over."""
        box = self.preprocessing.visible_box(image.size, self.input_size)
        return image if box == (0, 0, *image.size) else image.crop(box)

    def _chunks(self, n: int) -> tuple[int, int]:
        """(chunk size, minimum size a chunk is padded to)."""
        if self.static_batch:
            return self.static_batch, self.static_batch
        return (self.max_batch or max(n, 1)), self.min_batch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable logits ``(B, K)`` of preprocessed ``x`` (chunked as the graph needs;
        a module left in training mode runs as an eval-mode copy): what a method calls."""
        from .methods.common import forward_fn

        return forward_fn(self)(x.to(self.device))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Run the module without gradients, in chunks the graph accepts; returns (B, K)."""
        x = x.to(self.device)
        size, pad_to = self._chunks(x.shape[0])
        outs = []
        with torch.no_grad():
            for start in range(0, x.shape[0], size):
                chunk = x[start : start + size]
                n = chunk.shape[0]
                if n < pad_to:
                    chunk = torch.cat([chunk, chunk[-1:].expand(pad_to - n, *chunk.shape[1:])])
                outs.append(self.module(chunk)[:n])
        if not outs:
            return torch.empty((0, self.num_classes), device=self.device)
        return torch.cat(outs)

    def to(self, device: str | torch.device) -> LoadedModel:
        """A LoadedModel on ``device`` (the user's own module is copied, never moved)."""
        device = _as_device(device)
        if device == self.device:
            return self
        if self.exported is not None:
            from torch.export.passes import move_to_device_pass

            ep = move_to_device_pass(self.exported, str(device))
            return dataclasses.replace(self, exported=ep, module=ep.module(), device=device)
        module = copy.deepcopy(self.module) if self.format == "module" else self.module
        return dataclasses.replace(self, module=module.to(device), device=device)


def _as_device(device: str | torch.device) -> torch.device:
    """A device name is checked by :func:`resolve_device`; a ``torch.device`` is taken as given."""
    return resolve_device(device) if isinstance(device, str) else torch.device(device)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an unavailable requested device is a UsageError."""
    name = str(name or "auto").strip().lower()
    mps_ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    m = re.fullmatch(r"(cpu|mps|cuda)(?::(\d+))?", name)
    if not m or (m.group(2) and m.group(1) != "cuda"):
        raise UsageError(f"unknown --device {name!r}", hint="use auto, cpu, cuda, cuda:N or mps")
    ok = {"cpu": True, "mps": mps_ok, "cuda": torch.cuda.is_available()}[m.group(1)]
    if ok and m.group(2) and int(m.group(2)) >= torch.cuda.device_count():
        ok = False
    if not ok:
        raise UsageError(
            f"--device {name} requested but it is not available (torch {torch.__version__})",
            hint="use --device cpu or auto",
        )
    return torch.device(name)


def _read_labels(labels: str | Path | Sequence[str]) -> list[str]:
    """One class name per non-blank line of a file, or the given names."""
    if isinstance(labels, (str, Path)):
        lp = Path(labels)
        try:
            text = lp.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(
                f"cannot read labels file: {one_line(e)}",
                path=lp,
                hint="pass a UTF-8 text file with one class name per line",
            ) from None
        return [ln.strip() for ln in text.splitlines() if ln.strip()]
    return [str(x) for x in labels]


def _finish(
    lm: LoadedModel,
    *,
    num_classes: int | None,
    labels: Any,
    meta_names: list[str] | None,
    device: str | torch.device,
    batch_size: int | None = None,
    output_key: str | int | None = None,
) -> LoadedModel:
    """Move to the device, validate (on ``min(2, batch_size)`` rows; the output selection and
    the 1-channel adapter of :mod:`saliaudit.model_adapt`), and settle num_classes and class
    names."""
    where = str(lm.path) if lm.path else "model"
    lm = lm.to(device)
    k = validate(lm, num_classes, where, batch_size, output_key)
    if "num_classes" not in lm.sources:
        lm.sources["num_classes"] = "flag" if num_classes else "model output"
    lm.num_classes = k
    if labels is not None:
        names = _read_labels(labels)
        if len(names) != k:
            raise UsageError(
                f"--labels gives {len(names)} class names but the model outputs {k} classes",
                path=labels if isinstance(labels, (str, Path)) else where,
                hint=f"pass a labels file with exactly {k} non-empty lines",
            )
        lm.class_names, lm.sources["class_names"] = names, "labels file"
    elif meta_names and len(meta_names) == k:
        lm.class_names = list(meta_names)
    else:
        if meta_names:
            lm.notes.append(f"{len(meta_names)} class names in the metadata but {k} outputs; names ignored")
            lm.sources.pop("class_names", None)
        lm.class_names, lm.sources["class_names"] = [f"class {i}" for i in range(k)], "default"
    return lm


def _flags(input_size: Any, mean: Any, std: Any) -> dict[str, Any]:
    return {
        "input_size": parse_size(input_size),
        "mean": parse_triple(mean, "mean"),
        "std": parse_triple(std, "std"),
    }


def _resolve(
    lm_kw: dict[str, Any],
    sources: dict[str, str],
    flags: dict[str, Any],
    found: dict[str, list[tuple[Any, str]]],
) -> None:
    """input_size/mean/std: the flag, else the first value found in the file, else the default."""
    defaults = {"input_size": DEFAULT_INPUT_SIZE, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    for key, flag in flags.items():
        options = [(flag, "flag"), *found.get(key, []), (defaults[key], "default")]
        lm_kw[key], sources[key] = next((v, s) for v, s in options if v is not None)


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    input_size: Any = None,
    mean: Any = None,
    std: Any = None,
    labels: str | Path | Sequence[str] | None = None,
    trust_model: bool = False,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    output_key: str | int | None = None,
) -> LoadedModel:
    """Load, validate and describe the classifier in ``path`` (see module docstring); the
    validation runs ``min(2, batch_size)`` rows, so a model that only runs one image at a
    time loads with ``batch_size=1``. ``output_key`` picks the logits of a model whose
    forward returns a tuple, list, dict or dataclass (a key, attribute name or index)."""
    path = Path(path)
    flags = _flags(input_size, mean, std)
    if num_classes is not None:
        try:
            num_classes = operator.index(num_classes) if not isinstance(num_classes, bool) else 0
        except TypeError:
            num_classes = 0
        if num_classes < 1:
            raise UsageError("invalid --num-classes", path=path, hint="pass a positive integer")
    device = _as_device(device)
    sha, fmt = inspect_file(path)
    try:
        return _load(
            path, fmt, sha, arch, num_classes, flags, labels, trust_model, device, batch_size, output_key
        )
    except (ModelLoadError, UsageError):
        raise
    except Exception as e:  # anything torch raises for a bad file
        raise ModelLoadError(
            f"cannot load {fmt} model: {type(e).__name__}: {one_line(e)}",
            path=path,
            hint="check that the file is complete and was saved by a compatible torch",
        ) from None


def _load(
    path: Path,
    fmt: str,
    sha: str,
    arch: str | None,
    num_classes: int | None,
    flags: dict[str, Any],
    labels: Any,
    trust_model: bool,
    device: torch.device,
    batch_size: int | None = None,
    output_key: str | int | None = None,
) -> LoadedModel:
    sources: dict[str, str] = {}
    notes: list[str] = []
    limitations: list[str] = []
    kw: dict[str, Any] = {}
    found: dict[str, list[tuple[Any, str]]] = {}
    meta_names: list[str] | None = None
    obj: Any = None
    if fmt not in ("pt2", "torchscript", "huggingface"):
        obj, fmt = read_torch_file(path, fmt, trust_model)
    if arch is not None and fmt in ("pt2", "torchscript", "pickle", "huggingface"):
        what = "folder" if fmt == "huggingface" else "file"
        notes.append(f"--arch {arch} ignored: the {fmt} {what} holds its own architecture")
        arch = None
    if fmt == "huggingface":
        from saliaudit.model_hf import load_hf_folder

        kw["module"], arch, meta_names, kw["preprocessing"] = load_hf_folder(
            path, trust_model, found, sources, notes
        )
    elif fmt == "pt2":
        meta_names = load_pt2(path, flags["input_size"], kw, found, sources, notes)
    elif fmt == "torchscript":
        kw["module"] = load_torchscript(path, notes)
        limitations.append(TORCHSCRIPT_LIMITATION)
    elif fmt == "pickle":
        if any(m.training for m in obj.modules()):
            notes.append("model was in training mode; audited in eval mode")
        kw["module"] = obj
    elif timm_name(arch) is not None:
        kw["module"], arch, meta_names, kw["preprocessing"] = load_timm_model(
            obj, str(arch), num_classes, flags["input_size"], path, found, sources, notes
        )
        fmt = "state_dict"
    else:
        kw["module"], arch, meta_names = load_state_dict_model(obj, arch, num_classes, path, found, sources)
        fmt = "state_dict"
    if fmt != "pt2":
        kw["module"].eval()
    _resolve(kw, sources, flags, found)
    policy = kw.get("preprocessing")
    if policy is not None and policy.resize_size and sources.get("input_size") == "flag":
        own = next((v for v, _ in found.get("input_size", []) if v is not None), None)
        if own is not None and tuple(own) != tuple(kw["input_size"]):
            kw["preprocessing"] = policy.scaled(own, kw["input_size"])
            sources["preprocessing"] += f" (resize scaled from {own[0]}×{own[1]} to --input-size)"
    lm = LoadedModel(
        format=fmt,
        path=path,
        sha256=sha,
        num_classes=num_classes or 0,
        class_names=[],
        arch=arch,
        sources=sources,
        limitations=limitations,
        notes=notes,
        **kw,
    )
    return _finish(
        lm,
        num_classes=num_classes,
        labels=labels,
        meta_names=meta_names,
        device=device,
        batch_size=batch_size,
        output_key=output_key,
    )


def wrap_module(
    module: torch.nn.Module,
    *,
    input_size: Any = None,
    mean: Any = None,
    std: Any = None,
    labels: str | Path | Sequence[str] | None = None,
    num_classes: int | None = None,
    output_key: str | int | None = None,
) -> LoadedModel:
    """Wrap an in-memory classifier (Python API). The user's module is never mutated: a module in
    training mode is deep-copied before eval(); no hooks, no requires_grad changes (a tuple, dict
    or 1-channel model is put behind :class:`~saliaudit.model_adapt.Adapted`, which holds it)."""
    if not isinstance(module, torch.nn.Module):
        raise UsageError(
            f"expected a torch.nn.Module, got {type(module).__name__}",
            hint="pass the model object (for a .pt2 file use load_model)",
        )
    flags = _flags(input_size, mean, std)
    notes = []
    if any(m.training for m in module.modules()):
        try:
            module = copy.deepcopy(module)
        except Exception as e:
            raise UsageError(
                f"the model is in training mode and cannot be copied: {one_line(e)}",
                hint="call model.eval() before passing it",
            ) from None
        module.eval()
        notes.append("model was in training mode; audited in eval mode (a copy)")
    p = next(iter(module.parameters()), None)
    kw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    _resolve(kw, sources, flags, {})
    lm = LoadedModel(
        module=module,
        format="module",
        path=None,
        sha256=None,
        num_classes=0,
        class_names=[],
        notes=notes,
        sources=sources,
        device=p.device if p is not None else torch.device("cpu"),
        **kw,
    )
    if isinstance(module, torch.jit.ScriptModule):
        lm.limitations.append(TORCHSCRIPT_LIMITATION)
    return _finish(
        lm, num_classes=num_classes, labels=labels, meta_names=None, device=lm.device, output_key=output_key
    )
