"""The preprocessing of a Hugging Face model folder, read from its image processor.

``preprocessor_config.json`` is loaded with ``AutoImageProcessor.from_pretrained(folder,
local_files_only=True)``, so that the class defaults of the processor fill what the file leaves
out; without the file, the default processor of the model type is used at the config's
``image_size``. Reproduced: ``size`` (``height``/``width``: resized to that size; ``shortest_edge``:
the shorter side, aspect ratio kept; ConvNeXT's ``crop_pct``), ``do_center_crop``/``crop_size``,
``resample``, ``do_rescale``/``rescale_factor``, ``do_normalize``/``image_mean``/``image_std``;
the backend (torchvision: 8-bit tensors; PIL) decides which library resizes. A size the policy
cannot express (``longest_edge``, ``max_height``) falls back to a plain resize, and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saliaudit.preprocess import Preprocessing

__all__ = ["processor_policy"]

_PIL_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_DEFAULT_MEAN = (0.485, 0.456, 0.406)
_DEFAULT_STD = (0.229, 0.224, 0.225)


def _size(v: Any) -> dict[str, int]:
    """A processor's size (``SizeDict``, dict or int) as a plain dict of the keys that are set."""
    keys = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")
    if isinstance(v, int):
        return {"height": v, "width": v}
    if isinstance(v, dict):
        return {k: int(v[k]) for k in keys if v.get(k)}
    return {k: int(getattr(v, k)) for k in keys if getattr(v, k, None)}


def _interpolation(resample: Any) -> str:
    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        return value.lower() if value.lower() in _PIL_NAMES.values() else "bilinear"
    try:
        return _PIL_NAMES.get(int(value), "bilinear")
    except (TypeError, ValueError):
        return "bilinear"


def _triple(v: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if v is None:
        return default
    if isinstance(v, (int, float)):
        return (float(v),) * 3  # type: ignore[return-value]
    vals = [float(x) for x in v]
    return (vals[0],) * 3 if len(vals) == 1 else tuple(vals[:3])  # type: ignore[return-value]


def _default_processor(transformers: Any, config: Any) -> Any:
    """The model type's image processor with its class defaults (``None`` if there is none)."""
    from transformers.models.auto import image_processing_auto as ipa

    names = ipa.IMAGE_PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if isinstance(names, dict):
        pil_first = config.model_type in getattr(ipa, "DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS", ())
        name = (names.get("pil") if pil_first else None) or names.get("torchvision") or names.get("pil")
    elif isinstance(names, (tuple, list)):
        name = next((n for n in names if n), None)
    else:
        name = names
    cls = ipa.get_image_processor_class_from_name(name) if name else None
    return cls() if cls is not None else None


def _config_size(config: Any) -> tuple[int, int] | None:
    s = getattr(config, "image_size", None)
    if isinstance(s, int):
        return s, s
    if isinstance(s, (list, tuple)) and len(s) == 2:
        return int(s[0]), int(s[1])
    return None


def _geometry(proc: Any, notes: list[str]) -> tuple[str, tuple[int, int] | None, tuple[int, int] | None]:
    """(resize mode, resize target, input size) of the processor; input ``None`` if unsupported."""
    size = _size(getattr(proc, "size", None) or {})
    crop = _size(getattr(proc, "crop_size", None) or {}) if getattr(proc, "do_center_crop", False) else {}
    crop_hw = (crop["height"], crop["width"]) if "height" in crop and "width" in crop else None
    if not getattr(proc, "do_resize", True):
        notes.append(
            "the image processor does not resize (do_resize false); images are resized to its input size"
        )
    if "height" in size and "width" in size:
        hw = (size["height"], size["width"])
        return "exact", hw, crop_hw or hw
    if "shortest_edge" in size and not ({"longest_edge", "max_height"} & set(size)):
        s = size["shortest_edge"]
        pct = getattr(proc, "crop_pct", None)
        if pct:  # ConvNeXT: shorter side to s / crop_pct, crop s (a warp to s x s from 384 on)
            return ("shorter", (int(s / pct),) * 2, (s, s)) if s < 384 else ("exact", (s, s), (s, s))
        if crop_hw is None:
            notes.append(
                f"the image processor keeps the aspect ratio without a crop (inputs of varying size); "
                f"saliaudit center-crops to {s}×{s}"
            )
        return "shorter", (s, s), crop_hw or (s, s)
    notes.append(f"the image processor's size {size} is not reproduced; images are resized to the input size")
    return "stretch", None, crop_hw


def processor_policy(
    transformers: Any, folder: Path, config: Any, notes: list[str]
) -> tuple[Preprocessing, tuple[int, int] | None, Any, Any, str, str]:
    """(policy, input size, mean, std, source, source of mean and std) of a model folder's
    image processor."""
    has_file = (folder / "preprocessor_config.json").is_file()
    proc: Any = None
    if has_file:
        from saliaudit.model_hf import _quiet_offline

        try:
            with _quiet_offline():
                proc = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            notes.append(f"preprocessor_config.json not usable ({type(e).__name__}); defaults used")
    where = "preprocessor_config.json"
    from_file = proc is not None
    if proc is None:
        try:
            proc = _default_processor(transformers, config)
        except Exception:
            proc = None
        missing = "no preprocessor_config.json" if not has_file else "preprocessor_config.json not usable"
        if proc is None:
            where = f"config.json image_size and saliaudit's defaults ({missing})"
            return Preprocessing(), _config_size(config), None, None, where, where
        where = f"{type(proc).__name__} defaults at config.json image_size ({missing})"
    mode, target, size = _geometry(proc, notes)
    policy = Preprocessing(
        resize=mode,
        resize_size=target,
        interpolation=_interpolation(getattr(proc, "resample", 2)),
        backend="tensor_uint8" if _torchvision_backend(proc) else "pil",
        crop_offset="floor",
        rescale=float(getattr(proc, "rescale_factor", 1 / 255)) if getattr(proc, "do_rescale", True) else 1.0,
    )
    if mode == "stretch":
        policy = Preprocessing(interpolation=policy.interpolation, rescale=policy.rescale)
    if not from_file:
        wanted = _config_size(config)
        if wanted and size and wanted != size:
            policy, size = policy.scaled(size, wanted), wanted
    if size is None:
        size = _config_size(config)
    norm_where = where
    if getattr(proc, "do_normalize", True):
        mean = _triple(getattr(proc, "image_mean", None), _DEFAULT_MEAN)
        std = _triple(getattr(proc, "image_std", None), _DEFAULT_STD)
    else:  # the model normalizes inside its forward, or expects [0, 1] (or 0..255) input
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        norm_where = f"{where} (do_normalize false: mean 0, std 1)"
    return policy, size, mean, std, where, norm_where


def _torchvision_backend(proc: Any) -> bool:
    backend = getattr(proc, "backend", None)
    if isinstance(backend, str):
        return backend == "torchvision"
    return type(proc).__name__.endswith("Fast")
