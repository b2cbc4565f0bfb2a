"""Token layouts of vision transformers: which patch of the image a token stands for.

A ViT-like model cuts the image into a grid of ``h × w`` patches (its patch-embedding
convolution's output grid) and works on ``(B, T, C)`` values with ``T = p + h·w``: ``p``
leading tokens that stand for no patch (the class token, DeiT's distillation token, register
tokens), then the patch tokens in row-major order (Dosovitskiy et al., ICLR 2021; Touvron et
al., ICML 2021). Swin keeps the grid as ``(B, H, W, C)`` (Liu et al., ICCV 2021), a 4-D layout
the graph tracks like channels-last.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["MAX_PREFIX", "TokenGrid", "token_grid"]

#: At most this many leading tokens without a patch (class, distillation, registers).
MAX_PREFIX = 8


class TokenGrid:
    """``p`` leading tokens without a patch, then an ``h × w`` grid of patch tokens."""

    def __init__(self, prefix: int, h: int, w: int):
        self.prefix, self.h, self.w = prefix, h, w

    def __repr__(self) -> str:
        return f"TokenGrid(prefix={self.prefix}, grid={self.h}x{self.w})"

    @property
    def tokens(self) -> int:
        return self.prefix + self.h * self.w

    def patches(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` (or ``(B, 1, C)``, the same for every token) as ``(B, C, h, w)``."""
        if t.shape[1] == 1:
            return t.reshape(t.shape[0], 1, 1, t.shape[2]).permute(0, 3, 1, 2)
        return t[:, self.prefix :].reshape(t.shape[0], self.h, self.w, t.shape[2]).permute(0, 3, 1, 2)

    def leading(self, t: torch.Tensor) -> torch.Tensor:
        """The ``p`` leading tokens of ``(B, T, C)`` (``(B, 1, C)`` stays as it is)."""
        return t if t.shape[1] == 1 else t[:, : self.prefix]


def token_grid(n_tokens: int, grids: Iterable[tuple[int, int]]) -> TokenGrid | None:
    """The grid among ``grids`` (the patch grids seen in the model) that explains ``n_tokens``
    tokens with the fewest leading ones, or None."""
    best: TokenGrid | None = None
    for h, w in grids:
        p = n_tokens - h * w
        if 0 <= p <= MAX_PREFIX and (best is None or p < best.prefix):
            best = TokenGrid(p, h, w)
    return best
