"""A state_dict (``.pt``/``.pth``/``.safetensors``) plus ``--arch``: torchvision architecture resolution
(``--arch timm:NAME``: :mod:`saliaudit.model_timm`, which shares the unwrapping and strict loading).

The state_dict is unwrapped from a training checkpoint, the torchvision classification model named by
``--arch`` is built with the head size read from the weights (or ``--num-classes``) and loaded strictly;
input size, normalization and ImageNet class names come from torchvision's weight metadata (no download).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch

from saliaudit.errors import ModelLoadError, UsageError
from saliaudit.model_formats import one_line, parse_size, parse_triple

_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


def _tv_weights_meta(arch: str) -> dict[str, Any] | None:
    """Preprocessing and categories from torchvision's weight metadata (no download)."""
    import torchvision

    try:
        w = next(iter(torchvision.models.get_model_weights(arch)))
        t = w.transforms()
        return {
            "input_size": parse_size(list(t.crop_size)),
            "mean": parse_triple(list(t.mean), "mean"),
            "std": parse_triple(list(t.std), "std"),
            "categories": list(w.meta.get("categories") or []),
        }
    except Exception:
        return None


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap {'state_dict'|'model'|...: sd} and strip a 'module.' (DataParallel) prefix."""
    for _ in range(3):
        if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = type(obj).__name__ if not isinstance(obj, dict) else "a dict that is not a state_dict"
        keys = list(obj)[:5] if isinstance(obj, dict) else []
        raise ModelLoadError(
            f"holds {what}{f' (keys {keys})' if keys else ''}, not a model or a state_dict",
            path=path,
            hint="save model.state_dict() (pass --arch) or export with torch.export.save",
        )
    sd = {str(k): v for k, v in obj.items()}
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _check_arch(arch: str, path: Path) -> str:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch in names:
        return arch
    if arch.lower() in names:
        return arch.lower()
    close = difflib.get_close_matches(arch.lower(), names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
    raise UsageError(
        f"unknown --arch {arch!r}: not a torchvision classification model",
        path=path,
        hint=f"{hint} (torchvision classification models only)",
    )


def _build_from_state_dict(
    sd: dict[str, torch.Tensor], arch: str, num_classes: int | None, path: Path
) -> tuple[torch.nn.Module, int, str]:
    """torchvision model with the head size from the flag or the state_dict, loaded strictly."""
    import torchvision

    extra: dict[str, Any] = {}
    if arch in ("googlenet", "inception_v3") and not any(k.startswith(("aux", "AuxLogits")) for k in sd):
        extra["aux_logits"] = False
    inferred = None
    try:
        try:
            with torch.device("meta"):
                ref = torchvision.models.get_model(arch, weights=None, **extra)
        except Exception:
            ref = torchvision.models.get_model(arch, weights=None, **extra)
        for k, t in ref.state_dict().items():
            s = sd.get(k)
            if (
                s is not None
                and t.ndim >= 1
                and t.shape[0] == 1000
                and s.ndim == t.ndim
                and s.shape[1:] == t.shape[1:]
                and s.shape[0] != 1000
            ):
                inferred = int(s.shape[0])
    except Exception:
        pass
    k_cls = num_classes or inferred or 1000
    source = "flag" if num_classes else "state_dict"
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=k_cls, **extra)
    except Exception as e:
        raise ModelLoadError(
            f"cannot build --arch {arch} with {k_cls} classes: {one_line(e)}",
            path=path,
            hint="check --arch and --num-classes",
        ) from None
    load_strict(model, sd, f"--arch {arch}", k_cls, inferred, num_classes, path)
    return model.eval(), k_cls, source


def load_strict(
    model: torch.nn.Module,
    sd: dict[str, torch.Tensor],
    what: str,
    k_cls: int,
    inferred: int | None,
    num_classes: int | None,
    path: Path,
) -> None:
    """``model.load_state_dict(sd, strict=True)``, with a one-line error that counts the missing
    and unexpected keys and the shape mismatches (``what``: ``--arch resnet18``)."""
    msd = model.state_dict()
    for k in msd:
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = msd[k].clone()
    missing = [k for k in msd if k not in sd]
    unexpected = [k for k in sd if k not in msd]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(msd[k].shape)}"
        for k in msd
        if k in sd and sd[k].shape != msd[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(lst)} {kind} ({', '.join(lst[:3])}{', ...' if len(lst) > 3 else ''})"
            for kind, lst in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if lst
        ]
        hint = "check --arch (the architecture the weights were trained with)"
        if any(k.endswith("pos_embed") for k in (x.split(":")[0] for x in shapes)):
            hint += ", --input-size (the size the weights were trained at)"
        if inferred and num_classes and inferred != num_classes:
            hint += f" and --num-classes (the file's head has {inferred} classes)"
        else:
            hint += " and --num-classes"
        raise ModelLoadError(
            f"state_dict does not match {what} with {k_cls} classes: {'; '.join(parts)}",
            path=path,
            hint=hint,
        )
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:
        raise ModelLoadError(
            f"state_dict does not load into {what}: {one_line(e)}",
            path=path,
            hint="check --arch and --num-classes",
        ) from None


def load_state_dict_model(
    obj: Any,
    arch: str | None,
    num_classes: int | None,
    path: Path,
    found: dict[str, list],
    sources: dict[str, str],
) -> tuple[torch.nn.Module, str, list[str] | None]:
    """(module, resolved arch, class names or None) for a state_dict plus ``--arch``; ``found`` and
    ``sources`` get the torchvision weights metadata and where ``num_classes`` came from."""
    sd = unwrap_state_dict(obj, path)
    if arch is None:
        raise UsageError(
            "is a state_dict (weights only, no architecture); pass --arch NAME (a torchvision model "
            "name, or timm:NAME for a timm model)",
            path=path,
            hint="e.g. --arch resnet18 or --arch timm:convnext_tiny, or export the model with "
            "torch.export.save to .pt2",
        )
    arch = _check_arch(arch, path)
    module, k_cls, sources["num_classes"] = _build_from_state_dict(sd, arch, num_classes, path)
    tv = _tv_weights_meta(arch) or {}
    found.update({key: [(tv.get(key), "torchvision weights")] for key in ("input_size", "mean", "std")})
    if k_cls == 1000 and len(tv.get("categories") or []) == 1000:
        sources["class_names"] = "torchvision weights"
        return module, arch, tv["categories"]
    return module, arch, None
