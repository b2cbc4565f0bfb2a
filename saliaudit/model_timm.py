"""A state_dict plus ``--arch timm:NAME``: a timm architecture (``pip install 'saliaudit[timm]'``).

The model is built with ``timm.create_model(NAME, pretrained=False, num_classes=K)`` (nothing is
downloaded); ``K`` and the input channels come from the weights (or ``--num-classes``), the
weights load strictly after the same unwrapping as the torchvision path. The input size, mean,
std and the evaluation transform (resize the shorter side to ``size / crop_pct``, center crop,
interpolation) come from the model's ``pretrained_cfg`` through ``timm.data.resolve_data_config``;
``--input-size``, ``--mean`` and ``--std`` override them. A 1000-class head gets ImageNet's class
names, as the torchvision path does.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch

from saliaudit.errors import ModelLoadError, UsageError
from saliaudit.model_arch import load_strict, unwrap_state_dict
from saliaudit.model_formats import one_line
from saliaudit.preprocess import INTERPOLATIONS, Preprocessing

__all__ = ["TIMM_HINT", "load_timm_model", "timm_name"]

TIMM_HINT = "pip install 'saliaudit[timm]'"


def timm_name(arch: str | None) -> str | None:
    """``NAME`` of ``--arch timm:NAME`` (``None`` for a torchvision name)."""
    if arch is not None and arch.strip().lower().startswith("timm:"):
        return arch.strip()[5:].strip()
    return None


def _timm(path: Path) -> Any:
    try:
        import timm
        import timm.data
    except ImportError:
        raise ModelLoadError(
            "--arch timm:NAME needs the timm package, which is not installed", path=path, hint=TIMM_HINT
        ) from None
    return timm


def _check_name(timm: Any, name: str, path: Path) -> str:
    if name and timm.is_model(name):
        return name
    if name and timm.is_model(name.lower()):
        return name.lower()
    names = timm.list_models()
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.5)
    hint = (
        "did you mean " + ", ".join(f"timm:{c}" for c in close) + "?" if close else "see timm.list_models()"
    )
    raise UsageError(f"unknown --arch timm:{name}: not a timm model", path=path, hint=hint)


def _prefixes(cfg_value: Any) -> tuple[str, ...]:
    values = cfg_value if isinstance(cfg_value, (list, tuple)) else [cfg_value]
    return tuple(f"{v}." for v in values if isinstance(v, str) and v)


def _from_weights(timm: Any, name: str, sd: dict[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """(head classes, input channels) the weights imply, from a reference model on the meta device."""
    try:
        with torch.device("meta"):
            ref = timm.create_model(name, pretrained=False)
    except Exception:
        return None, None
    cfg = dict(getattr(ref, "pretrained_cfg", None) or {})
    k_ref = int(getattr(ref, "num_classes", 0) or 0)
    heads = _prefixes(cfg.get("classifier"))
    firsts = _prefixes(cfg.get("first_conv"))
    classes = chans = None
    for k, t in ref.state_dict().items():
        s = sd.get(k)
        if s is None or s.ndim != t.ndim or t.ndim < 1:
            continue
        if (
            k_ref
            and (not heads or k.startswith(heads))
            and t.shape[0] == k_ref
            and s.shape[1:] == t.shape[1:]
            and s.shape[0] != k_ref
        ):
            classes = int(s.shape[0])
        if chans is None and firsts and k.startswith(firsts) and t.ndim == 4 and s.shape[1] != t.shape[1]:
            chans = int(s.shape[1])
    return classes, chans


def _create(timm: Any, name: str, kwargs: dict[str, Any], path: Path) -> torch.nn.Module:
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError:
        if "img_size" not in kwargs:
            raise
        rest = {k: v for k, v in kwargs.items() if k != "img_size"}  # a CNN takes any size
        return timm.create_model(name, pretrained=False, **rest)


def _policy(data: dict[str, Any], notes: list[str]) -> Preprocessing:
    """timm's eval transform (``transforms_imagenet_eval``) as a :class:`Preprocessing`."""
    interpolation = str(data.get("interpolation") or "bicubic").lower()
    if interpolation not in INTERPOLATIONS:
        notes.append(f"timm interpolation {interpolation!r} is not reproduced; bicubic used")
        interpolation = "bicubic"
    mode = str(data.get("crop_mode") or "center")
    if mode not in ("center", "squash"):
        notes.append(f"timm crop_mode {mode!r} is not reproduced; the center crop is used")
    return Preprocessing(
        resize="exact" if mode == "squash" else "shorter",
        crop_pct=float(data.get("crop_pct") or 0.875),
        interpolation=interpolation,
        backend="pil",
        crop_offset="round",
    )


def load_timm_model(
    obj: Any,
    arch: str,
    num_classes: int | None,
    size_flag: tuple[int, int] | None,
    path: Path,
    found: dict[str, list],
    sources: dict[str, str],
    notes: list[str],
) -> tuple[torch.nn.Module, str, list[str] | None, Preprocessing]:
    """(module, ``timm:NAME``, class names or None, preprocessing) for a state_dict and
    ``--arch timm:NAME``; ``found`` gets the pretrained_cfg values, ``sources`` where the
    number of classes and the preprocessing came from."""
    timm = _timm(path)
    name = _check_name(timm, timm_name(arch) or "", path)
    sd = unwrap_state_dict(obj, path)
    inferred, chans = _from_weights(timm, name, sd)
    k_cls = num_classes or inferred or None
    kwargs: dict[str, Any] = {}
    if k_cls:
        kwargs["num_classes"] = k_cls
    if chans:
        kwargs["in_chans"] = chans
    if size_flag is not None:
        kwargs["img_size"] = size_flag
    try:
        model = _create(timm, name, kwargs, path)
    except Exception as e:
        raise ModelLoadError(
            f"cannot build --arch timm:{name}{f' with {k_cls} classes' if k_cls else ''}: {one_line(e)}",
            path=path,
            hint="check --arch, --num-classes and --input-size",
        ) from None
    k_cls = int(getattr(model, "num_classes", 0) or k_cls or 0)
    load_strict(model, sd, f"--arch timm:{name}", k_cls, inferred, num_classes, path)
    sources["num_classes"] = "flag" if num_classes else "state_dict"
    data = timm.data.resolve_data_config(model=model)
    where = f"timm pretrained_cfg of {name}"
    size = tuple(int(v) for v in data["input_size"][-2:])
    found.update(
        input_size=[(size, where)],
        mean=[(_triple(data.get("mean")), where)],
        std=[(_triple(data.get("std")), where)],
    )
    sources["preprocessing"] = where
    names = None
    if k_cls == 1000:
        from torchvision.models._meta import _IMAGENET_CATEGORIES

        names = list(_IMAGENET_CATEGORIES)
        sources["class_names"] = "ImageNet-1k (the head has 1000 classes)"
    return model.eval(), f"timm:{name}", names, _policy(data, notes)


def _triple(values: Any) -> tuple[float, float, float] | None:
    """timm's mean/std as three floats (one value, for a 1-channel config, is repeated)."""
    try:
        v = [float(x) for x in values]
    except (TypeError, ValueError):
        return None
    return (v[0], v[0], v[0]) if len(v) == 1 else tuple(v[:3]) if len(v) == 3 else None  # type: ignore[return-value]
