"""Shared helpers of the saliency methods: targets, a differentiable forward, input gradients
(parameter checks: :mod:`saliaudit.validate`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import UsageError

__all__ = ["as_targets", "forward_fn", "input_gradient", "picked"]


def as_targets(targets: Any, x: torch.Tensor) -> torch.Tensor:
    """``targets`` as a long tensor ``(B,)`` on ``x``'s device; :class:`UsageError` unless
    ``x`` is ``(B, C, H, W)`` with one target per image."""
    t = torch.as_tensor(targets, dtype=torch.long, device=x.device).reshape(-1)
    if x.dim() != 4 or t.numel() != x.shape[0]:
        raise UsageError(
            f"x must be (B, C, H, W) with B targets; got x {tuple(x.shape)} and {t.numel()} targets"
        )
    return t


def forward_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A differentiable ``x -> logits`` for a LoadedModel or ``nn.Module`` (never mutated).

    A ``.pt2`` graph exported with a static batch size runs on chunks of exactly that size
    (the last chunk padded by repeating its last row), a model with ``max_batch`` (a bounded
    dynamic batch, or one that runs only one image at a time) on chunks of at most that size;
    autograd flows through the chunks.
    A module left in training mode runs as an eval-mode copy.
    """
    module = getattr(model, "module", model)
    if isinstance(module, torch.nn.Module) and module.training and _mode_matters(module):
        import copy

        module = copy.deepcopy(module).eval()
    static = getattr(model, "static_batch", None)
    size = static or getattr(model, "max_batch", None)
    if not size:
        return module
    pad_to = static or getattr(model, "min_batch", 1)

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= size and x.shape[0] >= pad_to:
            return module(x)
        outs = []
        for start in range(0, x.shape[0], size):
            chunk = x[start : start + size]
            n = chunk.shape[0]
            if n < pad_to:
                chunk = torch.cat([chunk, chunk[-1:].expand(pad_to - n, *chunk.shape[1:])])
            outs.append(module(chunk)[:n])
        return torch.cat(outs)

    return run


def _mode_matters(module: torch.nn.Module) -> bool:
    """Whether train/eval mode can change ``module``'s output: not for a graph (torch.export,
    fx) whose submodules are only graphs and attribute holders (its ops were fixed when it
    was captured), so such a graph is used as it is, without a copy per call."""
    import torch.fx

    def inert(m: torch.nn.Module) -> bool:
        # attribute holders, graphs, and torch.export's own helpers (its guard function)
        kind = type(m)
        return (
            kind is torch.nn.Module
            or isinstance(m, torch.fx.GraphModule)
            or kind.__module__.startswith(("torch.export", "torch._export", "torch.fx"))
        )

    return not all(inert(m) for m in module.modules())


def picked(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The target logits ``(B,)``."""
    return logits.gather(1, targets.view(-1, 1)).squeeze(1)


def input_gradient(
    model: Any,
    x: torch.Tensor,
    targets: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂f_target/∂x, f_target(x))`` for a batch, one forward and one backward pass."""
    forward = forward or forward_fn(model)
    xi = x.detach().requires_grad_(True)
    with torch.enable_grad():
        score = picked(forward(xi), targets)
        (grad,) = torch.autograd.grad(score.sum(), [xi])
    return grad.detach(), score.detach()
