"""Post-processing functions ψ for FullGrad (see docs/methods.md).

A preset is sign handling × rescale × bilinear upsampling to the input size; the processed
terms are summed over channels and layers. FullGrad (Srinivas & Fleuret, NeurIPS 2019) uses
``ψ = bilinearUpsample(rescale(abs(·)))`` (eq. 2) and shows in §6 that the choice of ψ decides
which tests a map passes, so saliaudit computes all of them from one decomposition.

Upsampling is linear and each rescale is one affine map per layer (or per channel), so the
channel sum is taken *before* upsampling: exact, and C times cheaper than upsampling every
channel as the official code does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UsageError

__all__ = ["Psi", "PSI_PRESETS", "TermStats", "psi_names", "get_psi", "reduce_term", "upsample_sum"]


@dataclass(frozen=True)
class Psi:
    """One ψ preset.

    Attributes:
        name: preset name used on the command line and in results.
        sign: ``keep`` | ``abs`` | ``positive`` (max(·,0)) | ``negative`` (max(−·,0)).
        rescale: ``none`` | ``layer`` (min–max over C×H×W per image and layer) |
            ``channel`` (min–max over H×W per image and channel).
        eps: added to the rescale denominator (official FullGrad 1e-6; pytorch-grad-cam 1e-7).
        align_corners: bilinear upsampling convention (official FullGrad: True;
            pytorch-grad-cam resizes with OpenCV, i.e. half-pixel centres: False).
        source: the paper section or implementation it comes from.
    """

    name: str
    sign: str
    rescale: str
    eps: float
    align_corners: bool
    source: str
    description: str

    @property
    def signed(self) -> bool:
        """Whether maps under this ψ keep negative evidence (diverging colour map)."""
        return self.sign == "keep"


PSI_PRESETS: dict[str, Psi] = {
    p.name: p
    for p in [
        Psi(
            "paper",
            "abs",
            "layer",
            1e-6,
            True,
            "FullGrad eq. 2",
            "abs, min-max rescale per layer, bilinear upsample (the paper's choice)",
        ),
        Psi(
            "signed",
            "keep",
            "none",
            0.0,
            True,
            "FullGrad §6 psi_m",
            "signed terms, no rescale, bilinear upsample",
        ),
        Psi("abs", "abs", "none", 0.0, True, "FullGrad §6 psi_mnist", "abs, no rescale, bilinear upsample"),
        Psi(
            "positive",
            "positive",
            "layer",
            1e-6,
            True,
            "FullGrad §4.2, positive part",
            "positive part, min-max rescale per layer",
        ),
        Psi(
            "negative",
            "negative",
            "layer",
            1e-6,
            True,
            "FullGrad §4.2, negative part",
            "negative part, min-max rescale per layer",
        ),
        Psi(
            "per-channel",
            "abs",
            "channel",
            1e-7,
            False,
            "pytorch-grad-cam FullGrad",
            "abs, min-max rescale per channel, bilinear upsample (half-pixel)",
        ),
    ]
}


def psi_names() -> list[str]:
    """All preset names, in the documented order."""
    return list(PSI_PRESETS)


def get_psi(name: str) -> Psi:
    """Look a preset up by name; raises :class:`UsageError` listing the valid ones."""
    try:
        return PSI_PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown ψ preset {name!r}", hint="choose from " + ", ".join(PSI_PRESETS)) from None


class TermStats:
    """Reductions of one ``(B, C, h, w)`` term ``t``, computed lazily and shared by presets.

    Every preset derives from a few passes: the channel sums of ``t`` and ``|t|`` (positive
    part = (t + |t|)/2, negative part = (|t| − t)/2), per-image min/max of ``t`` and ``|t|``,
    and per-channel min/max of ``|t|``. When the term is ``g ⊙ β`` with a per-channel bias
    ``β`` (conv, linear and batch-norm biases), the statistics of ``t`` follow from those of
    the gradient ``g`` and the term is never materialized. Channel sums use a batched matrix
    product, several times faster than ``sum(dim=1)`` on NCHW tensors.

    Args:
        term: the full term ``(B, C, h, w)``; or None when ``grad`` and ``channel_bias`` are given.
        grad: ``g`` with the term's shape.
        channel_bias: ``β``, shape ``(C,)``.
    """

    def __init__(
        self,
        term: torch.Tensor | None = None,
        *,
        grad: torch.Tensor | None = None,
        channel_bias: torch.Tensor | None = None,
    ):
        base = term if term is not None else grad
        self.shape = base.shape
        self.b, self.c = base.shape[0], base.shape[1]
        self.flat = base.reshape(self.b, self.c, -1)
        self.beta = channel_bias
        self._cache: dict[str, torch.Tensor] = {}

    def _get(self, key: str, fn) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def _channel_sum(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``Σ_c weights[b, k, c] · x[b, c, :]`` -> ``(B, k, h*w)``."""
        return torch.bmm(weights.to(x.dtype), x)

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape((self.b,) + tuple(self.shape[2:]))

    @property
    def _abs(self) -> torch.Tensor:
        return self._get("abs", lambda: self.flat.abs())

    def _weights(self, *rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([r.expand(self.b, self.c) for r in rows], dim=1)

    def _signed_sum(self) -> torch.Tensor:
        ones = self.flat.new_ones(self.c)
        return self._spatial(
            self._channel_sum(self.flat, self._weights(ones if self.beta is None else self.beta))
        )

    def _abs_sum(self) -> torch.Tensor:
        ones = self.flat.new_ones(self.c)
        return self._spatial(
            self._channel_sum(self._abs, self._weights(ones if self.beta is None else self.beta.abs()))
        )

    def sum(self, sign: str) -> torch.Tensor:
        """Channel sum of the sign-handled term, ``(B, h, w)``."""
        if sign == "keep":
            return self._get("S", self._signed_sum)
        a = self._get("A", self._abs_sum)
        if sign == "abs":
            return a
        s = self._get("S", self._signed_sum)
        return (s + a) * 0.5 if sign == "positive" else (a - s) * 0.5

    def _channel_minmax(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per (image, channel): min and max of t, min and max of |t|."""

        def compute():
            lo, hi = self.flat.amin(2), self.flat.amax(2)
            alo = self._abs.amin(2)
            ahi = torch.maximum(lo.abs(), hi.abs())
            if self.beta is not None:
                beta = self.beta[None, :].to(lo.dtype)
                lo, hi = torch.minimum(lo * beta, hi * beta), torch.maximum(lo * beta, hi * beta)
                alo, ahi = alo * beta.abs(), ahi * beta.abs()
            return torch.stack([lo, hi, alo, ahi])

        return tuple(self._get("cmm", compute))

    def minmax(self, sign: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image min and max over C×h×w of the sign-handled term."""
        lo, hi, alo, ahi = self._channel_minmax()
        tmin, tmax = lo.amin(1), hi.amax(1)
        if sign == "keep":
            return tmin, tmax
        if sign == "positive":
            return tmin.clamp(min=0), tmax.clamp(min=0)
        if sign == "negative":
            return (-tmax).clamp(min=0), (-tmin).clamp(min=0)
        return alo.amin(1), ahi.amax(1)

    def channel_rescaled_sum(self, eps: float) -> torch.Tensor:
        """Σ_c (|t_c| − min_c) / (max_c − min_c + eps), min/max over h×w."""
        _, _, mn, mx = self._channel_minmax()
        w = 1.0 / (mx - mn + eps)
        scale = w if self.beta is None else w * self.beta.abs()[None, :]
        summed = self._spatial(self._channel_sum(self._abs, scale[:, None, :]))
        return summed - (mn * w).sum(1).reshape((self.b,) + (1,) * (len(self.shape) - 2))


def reduce_term(term: torch.Tensor | TermStats, psis: Sequence[Psi]) -> dict[str, torch.Tensor]:
    """Apply each ψ's sign handling and rescale to one ``(B, C, h, w)`` term; sum channels.

    Returns ``{psi.name: (B, h, w)}`` at the term's own resolution (not yet upsampled).
    """
    stats = term if isinstance(term, TermStats) else TermStats(term)
    out: dict[str, torch.Tensor] = {}
    for psi in psis:
        if psi.rescale == "channel":
            if psi.sign != "abs":
                raise ValueError("per-channel rescale is defined for abs only")
            out[psi.name] = stats.channel_rescaled_sum(psi.eps)
        elif psi.rescale == "none":
            out[psi.name] = stats.sum(psi.sign)
        else:  # per layer: Σ_c (s − mn) / (mx − mn + eps)
            mn, mx = stats.minmax(psi.sign)
            denom = (mx - mn + psi.eps)[:, None, None]
            out[psi.name] = (stats.sum(psi.sign) - stats.c * mn[:, None, None]) / denom
    return out


def upsample_sum(
    maps: Iterable[tuple[str, torch.Tensor]], size: tuple[int, int], psis: Sequence[Psi]
) -> dict[str, torch.Tensor]:
    """Sum per-layer ``(B, h, w)`` maps per ψ, upsampling each resolution once to ``size``.

    ``maps`` yields ``(psi_name, map)``; maps at the same resolution are added first (exact,
    since bilinear upsampling is linear).
    """
    by_res: dict[str, dict[tuple[int, int], torch.Tensor]] = defaultdict(dict)
    for name, m in maps:
        res = (m.shape[-2], m.shape[-1])
        acc = by_res[name]
        acc[res] = acc[res] + m if res in acc else m.clone()
    result: dict[str, torch.Tensor] = {}
    for psi in psis:
        total = None
        for res, m in by_res.get(psi.name, {}).items():
            if res != tuple(size):
                m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=psi.align_corners)[
                    :, 0
                ]
            total = m if total is None else total + m
        result[psi.name] = total
    return result
