"""Validating a loaded classifier, and the one place where its input and output are adapted.

saliaudit feeds a model ``(B, 3, H, W)`` float images and reads ``(B, K)`` float logits. Two kinds
of model are adapted to that here, by :class:`Adapted`, a small ``nn.Module`` around the user's
model (kept as the child ``model``, never changed):

* a model whose forward returns a tuple, list, dict, dataclass or Hugging Face ``ModelOutput``:
  its logits are picked, automatically when that is unambiguous (the ``logits`` key or attribute,
  else the only 2-D float tensor with one row per image), else by ``--output-key`` (a key,
  attribute name or tuple index);
* a model whose first convolution takes one channel: the RGB input becomes its luminance
  ``0.299 R + 0.587 G + 0.114 B`` (ITU-R 601-2, PIL's ``convert("L")`` weights) in front of it,
  so that every method, check and mask keeps working on 3-channel images; with equal per-channel
  mean and std, the luminance of the normalized channels is the normalized grey image.

Layer names of an adapted model start with ``model.`` (e.g. ``--cam-layer model.layer4``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from saliaudit.errors import ModelLoadError, UsageError
from saliaudit.model_formats import one_line

if TYPE_CHECKING:  # pragma: no cover
    from saliaudit.model import LoadedModel

__all__ = ["Adapted", "LUMA", "choose_output", "input_channels", "pick", "validate"]

#: ITU-R 601-2 luma weights, as PIL's ``Image.convert("L")``; they sum to 1.
LUMA = (0.299, 0.587, 0.114)


def pick(out: Any, selector: tuple[str, Any]) -> Any:
    """``out[i]`` (``("index", i)``), ``out[key]`` (``("key", k)``) or ``out.name`` (``("attr", n)``)."""
    kind, which = selector
    return getattr(out, which) if kind == "attr" else out[which]


class Adapted(torch.nn.Module):
    """The user's ``model`` behind a view that takes ``(B, 3, H, W)`` and returns logits."""

    def __init__(
        self, model: torch.nn.Module, selector: tuple[str, Any] | None = None, luminance: bool = False
    ):
        super().__init__()
        self.model = model
        self.selector = selector
        self.luminance = luminance
        self.training = model.training  # not train(): that would recurse into the user's model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.luminance:
            x = x[:, 0:1] * LUMA[0] + x[:, 1:2] * LUMA[1] + x[:, 2:3] * LUMA[2]
        out = self.model(x)
        return out if self.selector is None else pick(out, self.selector)


def _entries(out: Any) -> tuple[str, list[tuple[tuple[str, Any], Any]]] | None:
    """(what the output is, [(selector, value)]) of a structured output, else ``None``."""
    if isinstance(out, Mapping):
        return f"{type(out).__name__} output", [(("key", k), v) for k, v in out.items()]
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__} output", [(("index", i), v) for i, v in enumerate(out)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        fields = [f.name for f in dataclasses.fields(out)]
        return f"{type(out).__name__} output", [(("attr", n), getattr(out, n)) for n in fields]
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return f"{type(out).__name__} output", [(("attr", "logits"), out.logits)]
    return None


def _shown(selector: tuple[str, Any]) -> str:
    return str(selector[1]) if selector[0] != "key" else repr(selector[1])


def _is_logits(v: Any, rows: int) -> bool:
    return isinstance(v, torch.Tensor) and v.ndim == 2 and v.shape[0] == rows and v.is_floating_point()


def choose_output(out: Any, key: str | int | None, rows: int, where: str) -> tuple[tuple[str, Any], str]:
    """(selector, how it was chosen) of the logits in a structured model output: ``key`` if
    given, else the ``logits`` entry, else the only ``(rows, K)`` float tensor. An ambiguous
    output (:class:`ModelLoadError`) or an unknown key (:class:`UsageError`) lists the entries."""
    found = _entries(out)
    if found is None:
        raise ModelLoadError(
            f"the model returns {type(out).__name__}, not logits",
            path=where,
            hint="wrap the model so that forward returns a (batch, classes) tensor",
        )
    what, items = found

    def listing() -> str:
        return ", ".join(
            f"{_shown(s)} {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
            for s, v in items[:8]
        )

    if key is not None:
        text = str(key).strip()
        for selector, _ in items:
            if str(selector[1]) == text:
                return selector, f"{_shown(selector)} of the model's {what} (--output-key)"
        raise UsageError(
            f"--output-key {text!r} is not in the model's {what}",
            path=where,
            hint=f"use one of: {listing()}",
        )
    for selector, value in items:
        if selector[1] == "logits" and isinstance(value, torch.Tensor):
            return selector, f"'logits' of the model's {what}"
    candidates = [(s, v) for s, v in items if _is_logits(v, rows)]
    if len(candidates) == 1:
        selector = candidates[0][0]
        return selector, f"{_shown(selector)} of the model's {what} (its only (batch, classes) tensor)"
    why = "several" if candidates else "no"
    raise ModelLoadError(
        f"the model returns a {what} with {why} (batch, classes) float tensors, so the logits are ambiguous",
        path=where,
        hint=f"pass --output-key KEY (a key, attribute name or index) naming the logits among: {listing()}; "
        "or wrap the model so that forward returns them",
    )


def input_channels(module: torch.nn.Module) -> int | None:
    """Input channels of the first ``Conv2d`` (``None`` without one, e.g. TorchScript)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            return int(m.in_channels)
    return None


def _reexport(lm: LoadedModel, wrapper: torch.nn.Module, example: torch.Tensor, where: str) -> None:
    """A ``.pt2`` behind :class:`Adapted`: re-captured with the same batch range, so that the
    graph methods see the logits."""
    dyn = None
    if not lm.static_batch:
        dim = torch.export.Dim("batch", min=lm.min_batch, max=lm.max_batch or 4096)
        dyn = ({0: dim},)
    try:
        ep = torch.export.export(wrapper, (example,), dynamic_shapes=dyn, strict=False)
    except Exception as e:
        raise ModelLoadError(
            f"cannot capture the exported graph behind its output selection: {one_line(e)}",
            path=where,
            hint="export the model so that forward returns the (batch, classes) logits",
        ) from None
    lm.exported, lm.module = ep, ep.module()


def _uniform(lm: LoadedModel, where: str) -> None:
    """A 1-channel model needs one mean and one std (its grey input is normalized once)."""
    for name in ("mean", "std"):
        values = getattr(lm, name)
        if max(values) - min(values) <= 1e-12:
            continue
        if lm.sources.get(name) == "flag":
            raise UsageError(
                f"the model takes 1 channel (grey) but --{name} gives three different values",
                path=where,
                hint=f"pass one value, e.g. --{name} {values[0]:g}",
            )
        one = sum(w * v for w, v in zip(LUMA, values))
        setattr(lm, name, (one, one, one))
        lm.notes.append(
            f"1-channel model: {name} {tuple(round(v, 4) for v in values)} ({lm.sources.get(name)}) "
            f"reduced to {one:.4g} by the luminance weights; pass --{name} to choose it"
        )
        lm.sources[name] = f"{lm.sources.get(name)}, luminance-weighted"


def _adapt(
    lm: LoadedModel, selector: tuple[str, Any] | None, luminance: bool, shape: tuple, where: str
) -> Any:
    """Put :class:`Adapted` around ``lm.module`` (re-exporting a ``.pt2``); returns its output."""
    inner = lm.module
    if isinstance(inner, Adapted):  # the HF wrapper, or a second pass: add to it
        selector = selector or inner.selector
        luminance = luminance or inner.luminance
        inner = inner.model
    wrapper = Adapted(inner, selector, luminance)
    example = torch.zeros(shape, device=lm.device)
    if lm.exported is not None:
        _reexport(lm, wrapper, example, where)
    else:
        lm.module = wrapper
    with torch.no_grad():
        return lm.module(example)


def _run(lm: LoadedModel, shape: tuple) -> Any:
    with torch.no_grad():
        return lm.module(torch.zeros(shape, device=lm.device))


def _fail(e: Exception, shape: tuple, b: int, where: str) -> ModelLoadError:
    oom = isinstance(e, getattr(torch, "OutOfMemoryError", ())) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )
    hint = (
        "out of memory on the device: use --device cpu, a smaller --input-size, or free the device's memory"
        if oom
        else "check --input-size and that the file holds an image classifier"
        + ("; a model that runs one image at a time needs --batch-size 1" if b > 1 else "")
    )
    return ModelLoadError(
        f"running the model on a blank {shape} batch failed: {one_line(e)}", path=where, hint=hint
    )


def validate(
    lm: LoadedModel,
    num_classes: int | None,
    where: str,
    batch_size: int | None = None,
    output_key: str | int | None = None,
) -> int:
    """Run once on a zero batch of ``min(2, batch_size)`` rows (what the graph accepts);
    returns the number of classes. A 1-channel model gets the luminance adapter, a structured
    output its selection (recorded in ``lm.sources``). With ``batch_size`` 1, a model that
    fails on 2 rows gets ``max_batch = 1``: every pass then runs one image at a time."""
    b = lm.static_batch or max(min(2, batch_size or 2), lm.min_batch)
    if lm.max_batch:
        b = min(b, lm.max_batch)
    shape = (b, 3, *lm.input_size)
    try:
        out = _run(lm, shape)
    except Exception as e:
        if lm.exported is not None or input_channels(lm.module) != 1:
            raise _fail(e, shape, b, where) from None
        try:
            out = _adapt(lm, None, True, shape, where)
        except Exception as e2:
            raise _fail(e2, shape, b, where) from None
        _uniform(lm, where)
        lm.sources["channels"] = "1-channel model: RGB images fed as luminance 0.299 R + 0.587 G + 0.114 B"
    if not isinstance(out, torch.Tensor):
        selector, how = choose_output(out, output_key, b, where)
        out = _adapt(lm, selector, False, shape, where)
        lm.sources["output"] = how
    elif output_key is not None and not (isinstance(lm.module, Adapted) and lm.module.selector):
        lm.notes.append(f"--output-key {output_key} ignored: the model returns one tensor")
    _check_logits(out, b, where)
    if b == 1 and not lm.static_batch and (lm.max_batch or 2) >= 2:
        _probe_two_rows(lm)
    k = int(out.shape[1])
    if num_classes is not None and num_classes != k:
        raise UsageError(
            f"--num-classes {num_classes} but the model outputs {k} classes",
            path=where,
            hint=f"omit --num-classes or pass --num-classes {k}",
        )
    return k


def _check_logits(out: torch.Tensor, b: int, where: str) -> None:
    if out.ndim != 2 or out.shape[0] != b:
        raise ModelLoadError(
            f"output shape {tuple(out.shape)} is not (batch, classes); saliaudit audits classifiers "
            "that return one logits tensor",
            path=where,
            hint="wrap the model so that forward returns a (batch, classes) tensor",
        )
    if not out.is_floating_point():
        raise ModelLoadError(
            f"output dtype {out.dtype} is not floating point logits",
            path=where,
            hint="return float logits from forward",
        )
    if not torch.isfinite(out).all():
        raise ModelLoadError(
            "the model outputs NaN/Inf on a blank input",
            path=where,
            hint="check the weights (a corrupted or diverged checkpoint?) and --input-size",
        )


def _probe_two_rows(lm: LoadedModel) -> None:
    """A model validated on one row: if it fails on two, cap every pass at one row (and say so)."""
    try:
        out = _run(lm, (2, 3, *lm.input_size))
        ok = isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == 2
        why = (
            ""
            if ok
            else f"output {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    except Exception as e:
        ok, why = False, one_line(e)
    if not ok:
        lm.max_batch = 1
        lm.notes.append(f"the model fails on a batch of 2 ({why}); every pass runs one image at a time")
