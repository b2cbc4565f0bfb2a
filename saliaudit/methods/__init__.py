"""Saliency methods, registered by name.

Every method maps ``(model, x, targets)`` to a *signed* attribution at input resolution,
``(B, C, H, W)`` (``C = 1`` for CAM methods), then a declared post-processing turns it into a
2-D map. FullGrad (with its ψ presets) lives in :mod:`saliaudit.methods.fullgrad`; the
comparison methods of design.md §3 register here with :func:`register`, and the CLI choices,
``saliaudit methods``, the docs and the tests pick every entry up from :data:`METHODS`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UsageError

__all__ = ["Method", "METHODS", "register", "get_method", "method_names", "explain",
           "postprocess", "POSTPROCESS"]


@dataclass(frozen=True)
class Method:
    """A registered saliency method.

    Attributes:
        name: registry name (``--methods``).
        fn: ``fn(model, x, targets, **params) -> (B, C, H, W)`` signed attribution.
        family: ``gradient``, ``cam``, ``propagation``, ``perturbation`` or ``control``.
        params: parameter name -> default, from ``fn``'s keyword-only arguments.
        needs_internals: True when the method needs layer internals (hooks or the graph);
            such methods are SKIPPED on TorchScript models.
        reference: the paper.
        summary: one line for ``saliaudit methods``.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    family: str
    params: dict[str, Any] = field(default_factory=dict)
    needs_internals: bool = False
    reference: str = ""
    summary: str = ""

    def __call__(self, model: Any, x: torch.Tensor, targets: torch.Tensor, **params: Any) -> torch.Tensor:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise UsageError(f"method {self.name} has no parameter {unknown[0]!r}",
                             hint="its parameters: " + (", ".join(self.params) or "none"))
        return self.fn(model, x, targets, **params)


METHODS: dict[str, Method] = {}

#: Modules that register methods when imported (one file per family).
_FAMILIES = ("gradients", "cam", "propagation", "perturbation", "controls")


def register(name: str, *, family: str, needs_internals: bool = False, reference: str = "",
             summary: str = "") -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register ``fn(model, x, targets, *, param=default, ...)`` under ``name``."""

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        sig = inspect.signature(fn)
        params = {p.name: p.default for p in sig.parameters.values()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}
        doc = (fn.__doc__ or "").strip().splitlines()
        METHODS[name] = Method(name, fn, family, params, needs_internals, reference,
                               summary or (doc[0] if doc else ""))
        return fn

    return wrap


def _load_families() -> None:
    for module in _FAMILIES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{module}":
                raise


def method_names() -> list[str]:
    """All registered comparison methods, in registration order."""
    _load_families()
    return list(METHODS)


def get_method(name: str) -> Method:
    """Look a method up by name; :class:`UsageError` lists the valid ones."""
    _load_families()
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}",
                         hint="choose from fullgrad, " + ", ".join(METHODS)) from None


def explain(model: Any, x: torch.Tensor, targets: torch.Tensor | list[int], method: str,
            **params: Any) -> torch.Tensor:
    """Signed attribution of ``method`` for ``targets``: ``(B, C, H, W)`` at input resolution.

    ``C`` is the input's channel count, or 1 for CAM methods. The model is not modified and
    every hook is removed, also when an exception is raised.
    """
    targets = torch.as_tensor(targets, dtype=torch.long, device=x.device).reshape(-1)
    if x.dim() != 4 or targets.numel() != x.shape[0]:
        raise UsageError(f"x must be (B, C, H, W) with B targets; got x {tuple(x.shape)} and "
                         f"{targets.numel()} targets")
    if method == "fullgrad":
        from .fullgrad import full_gradients

        if params:
            raise UsageError("fullgrad takes no parameters here; choose ψ with --psi")
        return full_gradients(model, x, targets).saliency("signed")[:, None]
    return get_method(method)(model, x, targets, **params)


#: Post-processings of comparison methods: channel reduction by sum, with or without sign.
POSTPROCESS = {"signed": "sum over channels, sign kept", "abs": "sum over channels of |·|"}


def postprocess(attribution: torch.Tensor, mode: str = "signed") -> torch.Tensor:
    """``(B, C, H, W)`` attribution -> ``(B, H, W)`` map: ``signed`` Σ_c a, ``abs`` Σ_c |a|."""
    if mode == "signed":
        return attribution.sum(1)
    if mode == "abs":
        return attribution.abs().sum(1)
    raise UsageError(f"unknown post-processing {mode!r}", hint="choose signed or abs")
