"""Saliency methods, registered by name.

Every method maps ``(model, x, targets)`` to a *signed* attribution at input resolution,
``(B, C, H, W)`` (``C = 1`` for CAM methods), then a declared post-processing turns it into a
2-D map. FullGrad registers in :mod:`saliaudit.methods.fullgrad` with its ψ presets as its
post-processings; the comparison methods and the controls register in one module per family,
and plugins with :func:`saliaudit.register_method`. The CLI choices, ``saliaudit methods``,
the docs and the tests pick every entry up from :data:`METHODS`; :func:`build_source` turns
any of them into the :class:`~saliaudit.maps.MapSource` the checks use.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cost import Passes
from ..errors import UsageError
from ..maps import MapSource, Variant

__all__ = [
    "Method",
    "METHODS",
    "register",
    "get_method",
    "method_names",
    "explain",
    "postprocess",
    "POSTPROCESS",
    "build_source",
    "FAMILIES",
    "MethodSource",
]

#: Method families in listing order; a plugin's own family sorts after them.
FAMILIES = ("fullgrad", "gradient", "cam", "propagation", "perturbation", "control")


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
        option: the setting that selects the map variants: ``post`` (``--post``: ``signed``,
            ``abs``) or, for FullGrad, ``psi`` (``--psi``: its ψ presets).
        choices: the variant names ``option`` may take.
        source: the :class:`~saliaudit.maps.MapSource` class built by :func:`build_source`,
            ``source(method, params, variants)``; ``None``: the generic one
            (:class:`MethodSource`).
        reference_input: for methods whose attributions should sum to ``f(x) − f(x̄)``
            (summation-to-delta), ``fn(model, x, **params) -> (K, B, C, H, W)``: the reference
            inputs ``x̄`` (averaged over K); the audit reports the completeness delta.
        origin: ``builtin`` or where a plugin came from.
        cost: the model passes of one map computation per image
            (:class:`~saliaudit.cost.Passes`), or ``cost(params, (H, W)) -> Passes``;
            ``None``: one forward+backward row (none for controls). The audit's plan and
            ``--budget`` are built from it (:meth:`passes`).
        unsupported: ``fn(model, x) -> str | None``: why the method has no rule for this
            model (the audit then reports it SKIPPED with that reason, as it does methods
            that need internals on TorchScript); ``None`` when it can run. ``x`` is an
            example input batch.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    family: str
    params: dict[str, Any] = field(default_factory=dict)
    needs_internals: bool = False
    reference: str = ""
    summary: str = ""
    option: str = "post"
    choices: tuple[str, ...] = ("signed", "abs")
    source: Any = None
    origin: str = "builtin"
    reference_input: Any = None
    cost: Any = None
    unsupported: Any = None

    def passes(self, params: dict[str, Any] | None = None, size: tuple[int, int] = (224, 224)) -> Passes:
        """Model passes of one map computation per image with ``params`` (defaults filled in)
        at input ``size``: what the audit's plan counts for this method."""
        if isinstance(self.cost, Passes):
            return self.cost
        if callable(self.cost):
            return self.cost({**self.params, **(params or {})}, tuple(size))
        return Passes() if self.family == "control" else Passes(backward=1)

    def __call__(self, model: Any, x: torch.Tensor, targets: torch.Tensor, **params: Any) -> torch.Tensor:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise UsageError(
                f"method {self.name} has no parameter {unknown[0]!r}",
                hint="its parameters: " + (", ".join(self.params) or "none"),
            )
        return self.fn(model, x, targets, **params)


METHODS: dict[str, Method] = {}

_loaded = False


def register(
    name: str,
    *,
    family: str,
    needs_internals: bool = False,
    reference: str = "",
    summary: str = "",
    option: str = "post",
    choices: tuple[str, ...] | None = None,
    source: Any = None,
    origin: str = "builtin",
    reference_input: Any = None,
    cost: Any = None,
    unsupported: Any = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register ``fn(model, x, targets, *, param=default, ...)`` under ``name``.

    ``fn`` returns the signed attribution ``(B, C, H, W)``; its keyword-only arguments are the
    method's parameters. A name registered twice keeps the last registration. ``unsupported``
    (see :class:`Method`) says why the method cannot run on a model.
    """
    if option not in ("post", "psi"):
        raise ValueError(f"option must be 'post' or 'psi', not {option!r}")

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        sig = inspect.signature(fn)
        params = {
            p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        doc = (fn.__doc__ or "").strip().splitlines()
        METHODS[name] = Method(
            name,
            fn,
            family,
            params,
            needs_internals,
            reference,
            summary or (doc[0] if doc else ""),
            option,
            tuple(choices or POSTPROCESS),
            source,
            origin,
            reference_input,
            cost,
            unsupported,
        )
        return fn

    return wrap


def _load_families() -> None:
    """Import every module of this package once (each registers its methods). An import
    error inside one is a bug and raises."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    from ..plugins import load_entry_points

    load_entry_points("saliaudit.methods")


def method_names() -> list[str]:
    """All registered methods: by family (:data:`FAMILIES`, then others), then registration."""
    _load_families()
    rank = {f: i for i, f in enumerate(FAMILIES)}
    order = list(METHODS)
    return sorted(order, key=lambda n: (rank.get(METHODS[n].family, len(rank)), order.index(n)))


def get_method(name: str) -> Method:
    """Look a method up by name; :class:`UsageError` lists the valid ones."""
    _load_families()
    try:
        return METHODS[name]
    except KeyError:
        from ..errors import suggest

        raise UsageError(
            f"unknown method {name!r}" + suggest(name, method_names()),
            hint="choose from " + ", ".join(method_names()),
        ) from None


def build_source(
    name: str,
    *,
    psi: list[str] | None = None,
    post: list[str] | None = None,
    params: dict[str, Any] | None = None,
) -> Any:
    """The :class:`~saliaudit.maps.MapSource` of method ``name``: its maps under the chosen
    variants (``psi`` for a method whose :attr:`Method.option` is ``psi``, else ``post``;
    ``None``: all of its choices), with ``params`` over its defaults. The one way sources are
    built, by the audit and by the tests."""
    method = get_method(name)
    chosen = psi if method.option == "psi" else post
    variants = list(method.choices if chosen is None else chosen)
    bad = [v for v in variants if v not in method.choices]
    if bad:
        flag = "--psi" if method.option == "psi" else "--post"
        raise UsageError(
            f"{name} has no {method.option} {bad[0]!r}", hint=f"{flag} takes " + ", ".join(method.choices)
        )
    return (method.source or MethodSource)(method, {**method.params, **(params or {})}, variants)


def explain(
    model: Any, x: torch.Tensor, targets: torch.Tensor | list[int], method: str, **params: Any
) -> torch.Tensor:
    """Signed attribution of ``method`` for ``targets``: ``(B, C, H, W)`` at input resolution.

    ``C`` is the input's channel count, or 1 for CAM methods. The model is not modified and
    every hook is removed, also when an exception is raised.
    """
    targets = torch.as_tensor(targets, dtype=torch.long, device=x.device).reshape(-1)
    if x.dim() != 4 or targets.numel() != x.shape[0]:
        raise UsageError(
            f"x must be (B, C, H, W) with B targets; got x {tuple(x.shape)} and {targets.numel()} targets"
        )
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


class MethodSource(MapSource):
    """A registered comparison method under the ``signed`` and/or ``abs`` post-processing."""

    def __init__(self, method: Method, params: dict[str, Any], posts: list[str]):
        """``method`` with ``params`` (complete: its defaults included) under ``posts``."""
        self.impl, self.params = method, dict(params)
        self.method = method.name
        self.needs_internals = method.needs_internals
        self.model_independent = method.family == "control"
        self.variants = [Variant(method.name, post=p, signed=p == "signed") for p in posts]
        self.last_attribution: torch.Tensor | None = None
        self.collect = False  # keep Σ attribution per image (for completeness deltas)
        self._totals: list[torch.Tensor] = []

    def attribution(self, model: Any, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.impl(model, x, targets, **self.params).detach()

    def maps(self, model: Any, x: torch.Tensor, targets: torch.Tensor) -> dict[Variant, torch.Tensor]:
        a = self.attribution(model, x, targets)
        self.last_attribution = a
        if self.collect:
            self._totals.append(a.reshape(a.shape[0], -1).sum(1))
        return {v: postprocess(a, v.post) for v in self.variants}

    def pop_totals(self) -> torch.Tensor | None:
        """``Σ attribution`` per image of the calls made while :attr:`collect` was on."""
        out = torch.cat(self._totals) if self._totals else None
        self._totals = []
        return out

    def forget(self) -> None:
        self._totals = []
        self.last_attribution = None
