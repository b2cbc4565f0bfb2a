"""Methods as sources of 2-D maps under each of their variants (used by the checks).

FullGrad gives one map per ψ preset from one decomposition per (batch, targets, model);
a comparison method gives its ``signed`` and ``abs`` post-processings from one attribution.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks.base import MapSource, Variant
from ..psi import get_psi
from . import Method, get_method, postprocess
from .fullgrad import FullGradients, full_gradients

__all__ = ["FullGradSource", "MethodSource", "make_source"]


class FullGradSource(MapSource):
    """FullGrad under the selected ψ presets (Srinivas & Fleuret 2019, eq. 2 and §6)."""

    method = "fullgrad"
    needs_internals = False  # on TorchScript the decomposition reports what it cannot account

    def __init__(self, psis: list[str]):
        self.psis = list(psis)
        self.variants = [Variant("fullgrad", psi=p, signed=get_psi(p).signed) for p in self.psis]
        self._cache: list[tuple[Any, torch.Tensor, torch.Tensor, FullGradients]] = []

    def decompose(self, model: Any, x: torch.Tensor, targets: torch.Tensor) -> FullGradients:
        """The decomposition, cached for the first (the batch's top-1 classes, which most
        checks come back to) and the last (model, x, targets) it was asked for."""
        for m, xx, t, fg in self._cache:
            if m is model and xx is x and t.shape == targets.shape and torch.equal(t, targets):
                return fg
        fg = full_gradients(model, x, targets)
        self._cache = self._cache[:1] + [(model, x, targets.clone(), fg)]
        return fg

    def maps(self, model: Any, x: torch.Tensor, targets: torch.Tensor) -> dict[Variant, torch.Tensor]:
        fg = self.decompose(model, x, targets)
        out = fg.saliency_maps(self.psis)
        return {v: out[v.psi].detach() for v in self.variants}

    def prime(self, model: Any, x: torch.Tensor, targets: torch.Tensor, fg: FullGradients) -> None:
        """Make ``fg`` the first cached decomposition of (model, x, targets), e.g. one the
        audit computed in halves after an out-of-memory error, so maps and checks reuse it."""
        self._cache = [(model, x, targets.clone(), fg)]

    def forget(self) -> None:
        """Drop the cached decompositions (frees their gradients)."""
        self._cache = []


class MethodSource(MapSource):
    """A registered comparison method under the ``signed`` and/or ``abs`` post-processing."""

    def __init__(self, method: Method, params: dict[str, Any], posts: list[str]):
        self.impl, self.params = method, dict(params)
        self.method = method.name
        self.needs_internals = method.needs_internals
        self.model_independent = method.family == "control"
        self.variants = [Variant(method.name, post=p, signed=p == "signed") for p in posts]
        self.last_attribution: torch.Tensor | None = None

    def attribution(self, model: Any, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.impl(model, x, targets, **self.params).detach()

    def maps(self, model: Any, x: torch.Tensor, targets: torch.Tensor) -> dict[Variant, torch.Tensor]:
        a = self.attribution(model, x, targets)
        self.last_attribution = a
        return {v: postprocess(a, v.post) for v in self.variants}


def make_source(name: str, *, psis: list[str], posts: list[str],
                params: dict[str, Any] | None = None) -> MapSource:
    """The map source of method ``name`` (``fullgrad`` or a registered method)."""
    if name == "fullgrad":
        return FullGradSource(psis)
    method = get_method(name)
    return MethodSource(method, {**method.params, **(params or {})}, posts)
