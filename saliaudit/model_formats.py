"""Reading a model file: format sniffing and the per-format loaders behind :func:`saliaudit.model.load_model`.

Formats are told apart by content, never by unpickling: a ``.pt2`` (torch.export) archive, TorchScript, a
``torch.save`` file (a state_dict, or a pickled ``nn.Module`` that is only unpickled with ``--trust-model``)
and safetensors. A state_dict becomes a model in :mod:`saliaudit.model_arch`. Everything is loaded on the
CPU; the user's file is only read.

The value parsers shared by flags and file metadata (:func:`parse_size`, :func:`parse_triple`) live here
so that this module does not import :mod:`saliaudit.model`, which re-exports them.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from saliaudit.errors import ModelLoadError, UntrustedPickleError, UsageError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _numbers(value: Any, cast: Any, n: int, what: str, hint: str) -> list:
    """1 or ``n`` numbers from ``"a,b"``, a number or a sequence (one value is repeated)."""
    try:
        if isinstance(value, bool) or (
            isinstance(value, Sequence) and any(isinstance(v, bool) for v in value)
        ):
            raise TypeError
        if isinstance(value, str):
            vals = [cast(p) for p in re.split(r"[,x×\s]+", value.strip().lower()) if p]
        else:
            vals = [cast(v) for v in (value if isinstance(value, Sequence) else [value])]
    except (TypeError, ValueError):
        vals = []
    vals = vals * n if len(vals) == 1 else vals
    if len(vals) != n:
        raise UsageError(f"invalid {what} {value!r}: need 1 or {n} numbers", hint=hint)
    return vals


def parse_size(value: int | str | Sequence[int] | None) -> tuple[int, int] | None:
    """``224`` -> ``(224, 224)``; ``"224,192"`` -> ``(224, 192)`` as (H, W); ``None`` -> ``None``."""
    if value is None:
        return None
    hint = "use --input-size 224 or 224,192 (height,width)"
    h, w = _numbers(value, operator.index if not isinstance(value, str) else int, 2, "--input-size", hint)
    if not (1 <= h <= 16384 and 1 <= w <= 16384):
        raise UsageError(f"invalid --input-size {value!r}: sizes must be between 1 and 16384", hint=hint)
    return h, w


def parse_triple(value: str | float | Sequence[float] | None, name: str) -> tuple[float, float, float] | None:
    """``"0.5,0.5,0.5"`` or one value (repeated x3) -> 3 floats; ``std`` must be > 0."""
    if value is None:
        return None
    hint = f"use --{name} 0.485,0.456,0.406 (one value per RGB channel) or a single value"
    a, b, c = _numbers(value, float, 3, f"--{name}", hint)
    if not all(math.isfinite(v) and (v > 0 or name != "std") for v in (a, b, c)):
        raise UsageError(
            f"invalid --{name} {value!r}: values must be finite{' and > 0' if name == 'std' else ''}",
            hint=hint,
        )
    return a, b, c


def one_line(exc: BaseException, limit: int = 240) -> str:
    """First meaningful line of an exception message, without ANSI escapes."""
    text = _ANSI.sub("", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _detect_format(path: Path) -> str:
    """'pt2' | 'torchscript' | 'torch' | 'safetensors', by content (no unpickling)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n == "archive_format" or n.endswith("/archive_format") for n in names):
            return "pt2"
        if any(n.endswith("constants.pkl") or n.startswith("code/") or "/code/" in n for n in names):
            return "torchscript"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch"
        raise ModelLoadError(
            "is a zip archive but not a PyTorch model",
            path=path,
            hint="pass a .pt2 (torch.export.save), a state_dict .pt/.pth/.safetensors, or TorchScript",
        )
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        raise ModelLoadError(
            "is a truncated or corrupt zip archive (its end is missing)",
            path=path,
            hint="re-save or re-download the model file",
        )
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        return "safetensors"
    ext = path.suffix.lower()
    if ext == ".pt2":
        raise ModelLoadError(
            "is not a torch.export archive (not a zip file: truncated or wrong format)",
            path=path,
            hint="re-export it with torch.export.save(ep, 'model.pt2')",
        )
    if ext == ".safetensors":
        raise ModelLoadError(
            "is not a valid safetensors file (truncated or wrong format)",
            path=path,
            hint="re-save it with safetensors.torch.save_file",
        )
    if ext in (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar"):
        return "torch"  # legacy (non-zip) torch.save format
    raise ModelLoadError(
        f"unsupported model file type {ext or '(no extension)'!r}",
        path=path,
        hint="pass a .pt2 (torch.export), a .pt/.pth/.safetensors state_dict with --arch, or TorchScript",
    )


def inspect_file(path: Path) -> tuple[str, str]:
    """(sha256, format) of an existing, non-empty regular file (see :func:`_detect_format`), or
    of a Hugging Face model folder (:func:`saliaudit.model_hf.inspect_folder`)."""
    if not path.exists():
        raise UsageError("model file not found", path=path, hint="check the MODEL path")
    if path.is_dir():
        from saliaudit.model_hf import inspect_folder

        return inspect_folder(path)
    if not path.is_file():
        raise UsageError("is not a file", path=path, hint="pass the model file itself")
    try:
        if path.stat().st_size == 0:
            raise ModelLoadError("model file is empty", path=path, hint="re-save or re-download the model")
        return _sha256(path), _detect_format(path)
    except OSError as e:
        raise ModelLoadError(
            f"cannot read model file: {one_line(e)}", path=path, hint="check permissions"
        ) from None
    except zipfile.BadZipFile as e:
        raise ModelLoadError(
            f"corrupt zip archive: {one_line(e)}", path=path, hint="re-save the model"
        ) from None


def _load_weights(path: Path, fmt: str, trust_model: bool) -> Any:
    """safetensors, or torch.load(weights_only=True); a pickled object only with trust_model."""
    if fmt == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = _ANSI.sub("", str(e))
        if "truncated" in text.lower() or "Weights only load failed" not in text:
            raise ModelLoadError(
                f"corrupt or truncated model file: {one_line(e)}",
                path=path,
                hint="re-save or re-download the model",
            ) from None
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        if not trust_model:
            raise UntrustedPickleError(
                f"holds a pickled Python object{what}; unpickling runs code from the file, so it was not loaded",
                path=path,
                hint="pass --trust-model if you trust the file's source, or export the model with "
                "torch.export.save to .pt2, or save model.state_dict() and pass --arch",
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelLoadError(
            f"cannot unpickle the model (--trust-model): {type(e).__name__}: {one_line(e)}",
            path=path,
            hint="the model's class must be importable; or export to .pt2 with torch.export.save",
        ) from None


def read_torch_file(path: Path, fmt: str, trust_model: bool) -> tuple[Any, str]:
    """(loaded object, format): ``"pickle"`` when it is (or wraps under ``"model"``) an ``nn.Module``."""
    obj = _load_weights(path, fmt, trust_model)
    if isinstance(obj, dict) and isinstance(obj.get("model"), torch.nn.Module):
        obj = obj["model"]
    return obj, "pickle" if isinstance(obj, torch.nn.Module) else fmt


def load_torchscript(path: Path, notes: list[str]) -> torch.nn.Module:
    """A TorchScript module on the CPU (the caller puts it in eval mode)."""
    with warnings.catch_warnings():
        # PyTorch deprecates TorchScript (torch.jit.load warns FutureWarning on every call); the
        # notice is for the model's author, not for the auditor, and saliaudit reports
        # TorchScript's limitations itself
        warnings.filterwarnings("ignore", r"`?torch\.jit\.\w+`? is deprecated", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    if module.training:
        notes.append(
            "TorchScript module was saved in training mode; audited in eval mode (a traced module "
            "keeps the mode it was traced in)"
        )
    return module


def _pt2_info(ep: torch.export.ExportedProgram, path: Path | None) -> dict[str, Any]:
    """Static batch / spatial size, batch range and training-mode batch_norm from the graph."""
    users = [
        n for n in ep.graph.nodes if n.op == "placeholder" and n.name in set(ep.graph_signature.user_inputs)
    ]
    if (
        len(users) != 1
        or not isinstance(users[0].meta.get("val"), torch.Tensor)
        or users[0].meta["val"].ndim != 4
    ):
        raise ModelLoadError(
            "the exported graph does not take one (batch, C, H, W) image tensor",
            path=path,
            hint="export the classifier with a single image batch input",
        )
    shape = list(users[0].meta["val"].shape)
    info: dict[str, Any] = {"static_batch": None, "size": None, "min_batch": 1, "max_batch": None}
    if isinstance(shape[1], int) and shape[1] != 3:
        raise ModelLoadError(
            f"the exported graph takes {shape[1]} channels, not 3",
            path=path,
            hint="saliaudit audits RGB image classifiers; a 1-channel (grey) model is fed the images' "
            "luminance when loaded as a state_dict with --arch (or a module), not as a .pt2",
        )
    if isinstance(shape[0], int):
        info["static_batch"] = shape[0]
    else:
        try:
            vr = ep.range_constraints[shape[0].node.expr]
            info["min_batch"] = max(1, int(vr.lower))
            info["max_batch"] = int(vr.upper) if vr.upper.is_finite else None
        except Exception:
            pass
    if isinstance(shape[2], int) and isinstance(shape[3], int):
        info["size"] = (shape[2], shape[3])
    info["train_bn"] = any(
        n.op == "call_function" and "batch_norm" in str(n.target) and len(n.args) > 5 and n.args[5] is True
        for n in ep.graph.nodes
    )
    return info


def load_pt2(
    path: Path,
    size_flag: tuple[int, int] | None,
    kw: dict[str, Any],
    found: dict[str, list],
    sources: dict[str, str],
    notes: list[str],
) -> list[str] | None:
    """torch.export archive: metadata defaults, static batch/size from the graph; returns class names."""
    extra = {"saliaudit.json": ""}
    ep = torch.export.load(str(path), extra_files=extra)
    try:
        meta = json.loads(extra.get("saliaudit.json") or "{}")
        meta = meta if isinstance(meta, dict) else {}
    except ValueError:
        meta = {}
        notes.append("saliaudit.json metadata in the .pt2 is not valid JSON; ignored")
    info = _pt2_info(ep, path)
    if info["size"] is not None:
        if size_flag is not None and size_flag != info["size"]:
            raise ModelLoadError(
                f"--input-size {size_flag[0]},{size_flag[1]} conflicts with the static input "
                f"size {info['size'][0]},{info['size'][1]} of the exported graph",
                path=path,
                hint="omit --input-size or re-export with dynamic shapes for H and W",
            )
        found["input_size"] = [(info["size"], "graph")]
    for key, parse in (("input_size", parse_size), ("mean", parse_triple), ("std", parse_triple)):
        try:
            value = parse(meta.get(key)) if key == "input_size" else parse(meta.get(key), key)
            found.setdefault(key, []).append((value, "pt2 metadata"))
        except UsageError:
            notes.append(f"invalid {key} in the .pt2 metadata ignored")
    if info["train_bn"]:
        notes.append(
            "the graph was exported in training mode (batch_norm uses batch statistics, so logits "
            "depend on the batch); re-export after model.eval()"
        )
    if any(t.device.type != "cpu" for t in ep.state_dict.values()):
        from torch.export.passes import move_to_device_pass

        ep = move_to_device_pass(ep, "cpu")
    kw.update(
        module=ep.module(),
        exported=ep,
        static_batch=info["static_batch"],
        max_batch=info["max_batch"],
        min_batch=info["min_batch"],
    )
    if isinstance(meta.get("class_names"), list):
        sources["class_names"] = "pt2 metadata"
        return [str(x) for x in meta["class_names"]]
    return None
