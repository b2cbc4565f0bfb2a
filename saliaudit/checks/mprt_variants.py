"""sMPRT and eMPRT, Hedström et al.'s repairs of the model-parameter randomization test.

Hedström, Weber, Lapuschkin & Höhne, *Sanity Checks Revisited: An Exploration to Repair the
Model Parameter Randomisation Test*, XAI in Action workshop, NeurIPS 2023 (arXiv:2401.06465),
written after Binder et al.'s critique of top-down randomization (CVPR 2023). The
randomization check (:mod:`saliaudit.checks.randomization`) selects one of three measures
with its ``variant`` parameter and reports the others beside it:

* ``mprt`` — Adebayo et al.'s similarity of each map with the original map.
* ``smprt`` (Smooth MPRT) — the same similarity on *denoised* maps: a method's map of image
  ``x`` is replaced by the mean of its maps of ``N`` noisy copies ``x + ε_s``,
  ``ε_s ~ N(0, σ²)`` with ``σ = noise × (max x − min x)`` over the image's channels and pixels,
  the last copy noise-free (``ε_N = 0``), as Quantus' ``SmoothMPRT`` (``nr_samples = 50``,
  ``noise_magnitude = 0.1``). The noise of image ``x`` is drawn from a CPU generator seeded
  by ``crc32(f"{seed}/smprt/{image}")`` (:func:`smprt_noise`), so the trained and the
  randomized models see *the same* noisy copies (Quantus draws new noise per model, from
  NumPy's global generator): the only difference between the two denoised maps is the
  weights, and a map that ignores the model stays identical (the controls measure 1).
* ``emprt`` (Efficient MPRT) — the rise in complexity: the ratio ``H(map on the fully
  randomized model) / H(map on the trained model)`` of the discrete entropy of the map's value
  histogram (:func:`discrete_entropy`: ``bins`` equal-width bins over the map's own range,
  Quantus' default ``n_bins = 100``; natural log). Quantus' ``EfficientMPRT`` score is the
  relative rise ``ratio − 1`` (``scores_fraction_explanation`` is the ratio itself).
  A trained-model map with entropy 0 (constant) leaves the ratio undefined (NaN, counted);
  both constant: 1.

:class:`Collector` gathers both along the randomization check's cascade;
:mod:`saliaudit.checks.randomization_text` summarizes and words them.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..maps import MapSource, Variant
from .similarity import Maps, similarity

__all__ = [
    "MEASURES",
    "ALTERNATIVES",
    "EMPRT_THRESHOLDS",
    "HEDSTROM",
    "MEASURE_TEXT",
    "MEASURE_SHORT",
    "discrete_entropy",
    "entropy_ratio",
    "noise_seed",
    "smprt_noise",
    "denoised_maps",
    "Collector",
]

#: The measures ``variant`` selects from, in report order.
MEASURES = ("mprt", "smprt", "emprt")
#: ``alternatives``: ``cheap`` reports the measures computed from maps the check has anyway
#: (MPRT and eMPRT); ``all`` also computes sMPRT (its noisy copies cost map computations).
ALTERNATIVES = ("cheap", "all")
#: eMPRT thresholds on the entropy ratio (higher is better). 1.0 is exactly what a map that
#: ignores the weights measures (the random and edge controls): a whole interval at or below
#: it is no evidence of a rise, FAIL. A PASS needs the whole interval above 1.1, a rise of at
#: least 10 %: Hedström et al. rank methods by the score and give no threshold, and a rise of a
#: few % is what a histogram that merely shifts gives (FullGrad on the sample shapes model,
#: ratio 1.06), so it stays a WARN.
EMPRT_THRESHOLDS: dict[str, float | None] = {"fail": 1.0, "warn": 1.1}
HEDSTROM = (
    "Hedström, Weber, Lapuschkin & Höhne, Sanity Checks Revisited: An Exploration to Repair the "
    "Model Parameter Randomisation Test, XAI in Action workshop, NeurIPS 2023 (arXiv:2401.06465)"
)
MEASURE_SHORT = {"mprt": "MPRT", "smprt": "sMPRT", "emprt": "eMPRT"}
#: One sentence per measure: what it measures, with the paper (report and ``check_info``).
MEASURE_TEXT = {
    "mprt": (
        "MPRT: the similarity of each map with the map of the trained model while the weights "
        "are randomized from the output towards the input; lower is better (Adebayo et al., "
        "NeurIPS 2018)."
    ),
    "smprt": (
        "sMPRT (Smooth MPRT): the same similarity on denoised maps, each the mean of the maps of "
        "N noisy copies of the image (Gaussian noise, σ a fraction of the image's value range, "
        "the same copies for every model), so that noise in a method's maps does not pass for "
        "a change; lower is better (Hedström et al. 2023)."
    ),
    "emprt": (
        "eMPRT (Efficient MPRT): the ratio of the entropy of the map's value histogram (100 "
        "bins) on the fully randomized model to that on the trained model; a map that "
        "explains the model becomes more complex when its weights are destroyed (ratio > 1), "
        "a map that ignores them keeps 1; higher is better (Hedström et al. 2023)."
    ),
}


def discrete_entropy(maps: Any, bins: int = 100) -> np.ndarray:
    """Quantus' ``discrete_entropy`` of each map of a ``(B, H, W)`` batch: the Shannon entropy
    (nats) of the counts of ``np.histogram(map, bins)`` (equal-width bins over the map's own
    min–max; a constant map falls into one bin: 0). The histogram is taken in the maps' own
    precision (float32 maps: float32 bin edges, as Quantus on a float32 explanation)."""
    if isinstance(maps, torch.Tensor):
        t = maps.detach().cpu()
        a = (t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)).numpy()
    else:
        a = np.asarray(maps)
    a = a.reshape(a.shape[0], -1)
    out = np.zeros(a.shape[0])
    for i, row in enumerate(a):
        counts, _ = np.histogram(row, bins=int(bins))
        p = counts[counts > 0] / counts.sum()
        out[i] = float(-(p * np.log(p)).sum()) if p.size else 0.0
    return out


def entropy_ratio(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ratio, undefined)``: ``after / before`` per image; where ``before`` is 0 the ratio is
    1 if ``after`` is 0 too (both constant: no rise), else NaN; ``undefined`` marks both."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    zero = before <= 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(zero, np.where(after <= 0.0, 1.0, np.nan), after / np.where(zero, 1.0, before))
    return ratio, zero


def noise_seed(seed: int, image: str) -> int:
    """The seed of one image's sMPRT noise: ``crc32(f"{seed}/smprt/{image}")``."""
    return zlib.crc32(f"{int(seed)}/smprt/{image}".encode())


def smprt_noise(
    x: torch.Tensor, images: list[str], seed: int, samples: int, noise: float
) -> Iterator[torch.Tensor]:
    """The ``samples − 1`` noisy copies of the batch ``x`` (``(B, C, H, W)`` each), in order.

    Image ``i``'s unit noise ``z_s`` is the ``s``-th ``torch.randn((C, H, W))`` of a CPU
    generator seeded by :func:`noise_seed`; ``σ_i = noise · (max x_i − min x_i)`` in ``x``'s
    dtype, and the copy is ``x_i + σ_i z_s`` computed in float64 and cast back, as Quantus
    (``x_batch + np.random.randn(*x.shape) * std``). The noise-free ``N``-th copy is ``x``
    itself and is not yielded. Independent of the batch composition and the device."""
    gens = [torch.Generator().manual_seed(noise_seed(seed, name)) for name in images]
    flat = x.detach().reshape(x.shape[0], -1)
    sigma = (float(noise) * (flat.amax(1) - flat.amin(1))).to(torch.float64)
    shape = (1,) * (x.dim() - 1)
    base = x.detach().to(torch.float64)
    for _ in range(int(samples) - 1):
        z = torch.stack([torch.randn(tuple(x.shape[1:]), generator=g, dtype=torch.float32) for g in gens])
        z = z.to(device=x.device, dtype=torch.float64)
        yield (base + z * sigma.view(-1, *shape)).to(x.dtype)


def denoised_maps(
    source: MapSource,
    model: Any,
    x: torch.Tensor,
    targets: torch.Tensor,
    plain: dict[Variant, torch.Tensor],
    images: list[str],
    seed: int,
    samples: int,
    noise: float,
) -> dict[Variant, torch.Tensor]:
    """sMPRT's denoised maps: per variant, the mean of the maps of ``x``'s noisy copies
    (:func:`smprt_noise`) and of ``plain``, the maps of ``x`` itself (the noise-free copy),
    computed in float64 on the CPU: ``samples − 1`` map computations."""
    acc = {v: plain[v].detach().to("cpu", torch.float64).clone() for v in plain}
    for xn in smprt_noise(x, images, seed, samples, noise):
        out = source.maps(model, xn, targets)
        for v in acc:
            acc[v] += out[v].detach().to("cpu", torch.float64)
        del out
    return {v: a / int(samples) for v, a in acc.items()}


class Collector:
    """eMPRT's entropies and sMPRT's similarities of one batch, gathered along the cascade.

    ``params`` are the randomization check's; ``steps`` the cascade's length. Created with the
    trained model's ``maps`` (their entropies, and with ``smprt`` their denoised versions);
    :meth:`step` is given each cascade step's model and maps; :meth:`per_image` returns, per
    measure, the per-image values and which rest on a convention."""

    def __init__(
        self,
        params: dict[str, Any],
        source: MapSource,
        batch: Any,
        maps: dict[Variant, torch.Tensor],
        steps: int,
        smprt: bool,
    ):
        self.source, self.batch, self.smprt = source, batch, smprt
        self.bins, self.last = int(params["emprt_bins"]), steps - 1
        self.mean = params["verdict"] == "mean"
        self.metric = params["metric"]
        self.noisy = (batch.images, batch.seed, int(params["smprt_samples"]), float(params["smprt_noise"]))
        self.h0 = {v: discrete_entropy(m, self.bins) for v, m in maps.items()}
        self.h1: dict[Variant, np.ndarray] = {}
        n = len(batch)
        if smprt:  # the trained model's denoised maps
            ref = denoised_maps(source, batch.model, batch.x, batch.targets, maps, *self.noisy)
            self.ref = {v: Maps(m) for v, m in ref.items()}
            self.values = {v: np.full((n, steps), np.nan) for v in maps}
            self.degenerate = {v: np.zeros((n, steps), dtype=bool) for v in maps}

    def step(self, k: int, model: Any, out: dict[Variant, torch.Tensor]) -> None:
        """Cascade step ``k`` (``model`` and its maps ``out``)."""
        if k == self.last:  # eMPRT: the fully randomized model
            self.h1 = {v: discrete_entropy(m, self.bins) for v, m in out.items()}
        if self.smprt and (self.mean or k == self.last):
            b = self.batch
            dn = denoised_maps(self.source, model, b.x, b.targets, out, *self.noisy)
            for v, m in dn.items():
                self.values[v][:, k], self.degenerate[v][:, k] = similarity(self.ref[v], Maps(m), self.metric)

    def state(self) -> dict[str, Any]:
        """What :meth:`step` gathered so far (saved with each randomization step)."""
        out: dict[str, Any] = {"h1": self.h1}
        if self.smprt:
            out.update(values=self.values, degenerate=self.degenerate)
        return out

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` of an interrupted run."""
        self.h1 = state["h1"]
        if self.smprt:
            self.values, self.degenerate = state["values"], state["degenerate"]

    def per_image(
        self, v: Variant
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(values, conventions, curves)`` of variant ``v``: eMPRT's ratio (and sMPRT's
        similarity, mean over the cascade or final), the images whose value rests on a
        constant map, and ``cascading_smprt`` when sMPRT ran over the cascade."""
        ratio, zero = entropy_ratio(self.h0[v], self.h1[v])
        values, conv, curves = {"emprt": ratio}, {"emprt": zero & ~np.isnan(ratio)}, {}
        if self.smprt:
            s, d = self.values[v], self.degenerate[v]
            values["smprt"] = s.mean(1) if self.mean else s[:, -1]
            conv["smprt"] = d.any(1) if self.mean else d[:, -1]
            if self.mean:
                curves["cascading_smprt"] = s
        return values, conv, curves

    def entropies(self, v: Variant) -> list[list[float]]:
        """Per image: ``[H on the trained model, H on the fully randomized model]``."""
        return [[float(a), float(b)] for a, b in zip(self.h0[v], self.h1[v])]
