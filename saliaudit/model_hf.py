"""A Hugging Face model folder (``save_pretrained``): ``pip install 'saliaudit[hf]'``.

MODEL may be a folder with ``config.json`` and ``model.safetensors`` (optionally sharded, and an
optional ``preprocessor_config.json``). It is loaded with
``AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)`` in float32,
strictly (a weight missing from the folder is an error, not a random initialization), and put
behind :class:`~saliaudit.model_adapt.Adapted`, which returns the output's ``logits``. Class
names come from ``config.id2label``; the preprocessing from the image processor
(``preprocessor_config.json``: size, crop_size, resample, rescale, normalization), or without
that file from the defaults of the model type's image processor at the config's ``image_size``.
Safetensors are not pickles: no ``--trust-model`` is needed, except for a folder that only holds
``pytorch_model.bin``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from saliaudit.errors import ModelLoadError, UntrustedPickleError, UsageError
from saliaudit.model_adapt import Adapted
from saliaudit.model_formats import one_line
from saliaudit.model_hf_pre import processor_policy

__all__ = ["HF_HINT", "inspect_folder", "load_hf_folder"]

HF_HINT = "pip install 'saliaudit[hf]'"
_SAFE = ("model.safetensors", "model.safetensors.index.json")
_BIN = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_FOLDER_HINT = (
    "pass the model file itself (not a folder), or a Hugging Face folder written by save_pretrained "
    "(config.json and model.safetensors)"
)


def _files(folder: Path) -> list[Path]:
    """The files that define the model: configs and weights (shards included), in name order."""
    keep = []
    for p in sorted(folder.iterdir()):
        name = p.name
        if p.is_file() and (
            name in ("config.json", "preprocessor_config.json")
            or name.endswith((".safetensors", ".safetensors.index.json"))
            or name.startswith("pytorch_model")
        ):
            keep.append(p)
    return keep


def inspect_folder(folder: Path) -> tuple[str, str]:
    """(sha256, ``"huggingface"``) of a model folder: SHA-256 over the names and contents of
    its configs and weights. A folder without ``config.json`` is a usage error."""
    if not (folder / "config.json").is_file():
        raise UsageError(
            "is a folder without config.json: not a file, and not a Hugging Face model folder",
            path=folder,
            hint=_FOLDER_HINT,
        )
    h = hashlib.sha256()
    try:
        for p in _files(folder):
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    except OSError as e:
        raise ModelLoadError(
            f"cannot read the model folder: {one_line(e)}", path=folder, hint="check permissions"
        ) from None
    return h.hexdigest(), "huggingface"


@contextlib.contextmanager
def _quiet_offline() -> Iterator[None]:
    """No network (``HF_HUB_OFFLINE``), no progress bars, no log lines, for one call."""
    from transformers.utils import logging as hf_logging

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _transformers(folder: Path) -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(
            "a Hugging Face model folder needs the transformers package, which is not installed",
            path=folder,
            hint=HF_HINT,
        ) from None
    return transformers


def _config(transformers: Any, folder: Path) -> Any:
    try:
        with _quiet_offline():
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"config.json cannot be read by transformers {transformers.__version__}: {one_line(e)}",
            path=folder,
            hint="save the model with save_pretrained, or upgrade transformers",
        ) from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

    if type(config) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "no architecture"
        raise ModelLoadError(
            f"config.json describes a {config.model_type} model ({archs}), not an image classifier",
            path=folder,
            hint="pass a folder saved from an image classification model (AutoModelForImageClassification, "
            "e.g. ViTForImageClassification)",
        )
    return config


def _weights(folder: Path, trust_model: bool) -> bool:
    """Whether to load safetensors (else a trusted ``pytorch_model.bin``)."""
    if any((folder / n).is_file() for n in _SAFE):
        return True
    if any((folder / n).is_file() for n in _BIN):
        if not trust_model:
            raise UntrustedPickleError(
                "holds pytorch_model.bin (a pickle: loading it runs code from the file) and no model.safetensors",
                path=folder,
                hint="pass --trust-model if you trust its source, or re-save it with save_pretrained "
                "(which writes model.safetensors)",
            )
        return False
    raise ModelLoadError(
        "has config.json but no model.safetensors",
        path=folder,
        hint="save the model with save_pretrained (it writes model.safetensors)",
    )


def _model(transformers: Any, folder: Path, safetensors: bool) -> torch.nn.Module:
    try:
        with _quiet_offline():
            model, info = transformers.AutoModelForImageClassification.from_pretrained(
                str(folder),
                local_files_only=True,
                use_safetensors=safetensors,
                dtype=torch.float32,
                output_loading_info=True,
            )
    except Exception as e:
        raise ModelLoadError(
            f"transformers cannot load the model: {type(e).__name__}: {one_line(e)}",
            path=folder,
            hint="check that the folder is complete (save_pretrained) and the transformers version",
        ) from None
    bad = {k: list(v or []) for k, v in (info or {}).items() if k in ("missing_keys", "mismatched_keys")}
    if any(bad.values()):
        parts = [
            f"{len(v)} {k.replace('_', ' ')} ({', '.join(map(str, v[:3]))})" for k, v in bad.items() if v
        ]
        raise ModelLoadError(
            f"the weights do not match config.json: {'; '.join(parts)}",
            path=folder,
            hint="re-save the model with save_pretrained (its weights would be randomly initialized)",
        )
    return model.eval()


def _class_names(config: Any) -> list[str] | None:
    labels = getattr(config, "id2label", None) or {}
    try:
        index = {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        return None
    n = len(index)
    return [index[i] for i in range(n)] if n and all(i in index for i in range(n)) else None


def load_hf_folder(
    folder: Path,
    trust_model: bool,
    found: dict[str, list],
    sources: dict[str, str],
    notes: list[str],
) -> tuple[torch.nn.Module, str, list[str] | None, Any]:
    """(module returning logits, architecture name, class names or None, Preprocessing) of a
    ``save_pretrained`` folder; ``found`` gets the processor's input size, mean and std."""
    transformers = _transformers(folder)
    config = _config(transformers, folder)
    safetensors = _weights(folder, trust_model)
    model = _model(transformers, folder, safetensors)
    policy, size, mean, std, where, norm = processor_policy(transformers, folder, config, notes)
    found.update(input_size=[(size, where)], mean=[(mean, norm)], std=[(std, norm)])
    sources["preprocessing"] = where
    sources["output"] = f"'logits' of the Hugging Face {type(model).__name__} output"
    names = _class_names(config)
    if names:
        sources["class_names"] = "config.json id2label"
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    return Adapted(model, ("key", "logits")), str(arch), names, policy
