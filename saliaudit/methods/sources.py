"""The generic map source: a registered method under its ``signed``/``abs`` post-processings.

A method with its own source (FullGrad: one map per ψ preset from one decomposition)
declares it when it registers; :func:`saliaudit.methods.build_source` picks the right one.
"""

from __future__ import annotations

from typing import Any

import torch

from ..maps import MapSource, Variant
from . import Method, postprocess

__all__ = ["MethodSource"]


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

    def attribution(self, model: Any, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.impl(model, x, targets, **self.params).detach()

    def maps(self, model: Any, x: torch.Tensor, targets: torch.Tensor) -> dict[Variant, torch.Tensor]:
        a = self.attribution(model, x, targets)
        self.last_attribution = a
        return {v: postprocess(a, v.post) for v in self.variants}
