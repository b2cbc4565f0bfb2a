"""Pointing games: does the map's maximum lie on the object of the explained class?

``pointing_game`` (Zhang, Bargal, Lin, Brandt, Shen & Sclaroff, *Top-down Neural Attention by
Excitation Backprop*, ECCV 2016): a *hit* when the maximum of the map for the predicted class
lies on that class's object mask, up to a tolerance (15 px in the paper, at 224 px inputs;
here ``params["tolerance"]`` px at ``params["reference_size"]`` px, scaled to the model's input
by its short side: 4.3 px at 64 px, 2.1 px at 32 px). The value is the hit rate over the images
that have a mask for their predicted class; the others are left out, with the reason.

``restricted_pointing_game`` (the restricted variant used by Khakzar, Baselizadeh & Navab,
*Rethinking Positive Aggregation and Propagation of Gradients in Gradient-based Saliency
Methods*, 2020, for images with several objects): only images holding objects of at least two
classes count. For every class ``c`` present, the map *for class c* is searched for its
maximum over the objects only (the union of the image's masks), and it is a hit when that
maximum lies on ``c``'s object rather than on another one. No tolerance applies (it would let a
point between two objects count for both). A map that ignores the class points at the same
object whatever the class, so it scores exactly ``1/k`` on an image with ``k`` classes: the
game measures class sensitivity where the plain game cannot.

Shared rules. Signed maps are searched for their maximum, i.e. the strongest *positive*
evidence. When several pixels share the maximum (plateaus, a constant map), the image scores
the share of them that hit, which is the expected score of picking one at random: a constant
map scores the chance level instead of an arbitrary corner. Both games are informational: with
the default thresholds (``fail`` and ``warn`` None) the cell passes and states the hit rate;
with thresholds set, lower is worse (FAIL below ``fail``, WARN below ``warn``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import SaliauditError
from ..result import CheckResult
from .base import Batch, Check, MapSource, Measurement, Variant, register

__all__ = ["PointingGame", "RestrictedPointingGame", "scaled_tolerance", "tolerance_region", "point_scores"]


def scaled_tolerance(tolerance: float, reference_size: float, size: tuple[int, int]) -> float:
    """The tolerance in input pixels: ``tolerance`` px at ``reference_size`` px, scaled by the
    input's short side."""
    return float(tolerance) * min(size) / float(reference_size)


def tolerance_region(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within Euclidean distance ``radius`` of the mask (the mask itself when 0)."""
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0 or not mask.any():
        return mask
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~mask) <= radius


def point_scores(
    maps: torch.Tensor, regions: np.ndarray, search: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per map: the share of its maximal pixels inside ``regions``.

    Args:
        maps: ``(N, H, W)`` maps.
        regions: ``(N, H, W)`` bool, where a maximum counts as a hit.
        search: ``(N, H, W)`` bool, where the maximum is searched (all pixels if None).

    Returns ``(score, ties, first)``: the score in [0, 1] (NaN when the searched part of a map
    has no finite value), the number of maximal pixels, and the first maximum's ``(row, col)``.
    """
    n, _, w = maps.shape
    flat = maps.detach().reshape(n, -1)
    ok = torch.isfinite(flat)
    if search is not None:
        ok = ok & torch.as_tensor(search.reshape(n, -1), device=flat.device)
    vals = torch.where(ok, flat, torch.full_like(flat, -float("inf")))
    top = vals.amax(1, keepdim=True)
    maxima = ((vals == top) & ok).cpu().numpy()
    ties = maxima.sum(1)
    hits = (maxima & regions.reshape(n, -1)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(ties > 0, hits / np.maximum(ties, 1), np.nan)
    first = np.argmax(maxima, axis=1)
    return score, ties, np.stack([first // w, first % w], 1)


def _lower_is_worse(value: float, t: dict[str, float | None]) -> str:
    if t.get("fail") is not None and value < t["fail"]:
        return "fail"
    if t.get("warn") is not None and value < t["warn"]:
        return "warn"
    return "pass"


def _check_mask(mask: np.ndarray, shape: tuple[int, int], image: str) -> np.ndarray:
    m = np.asarray(mask, dtype=bool)
    if m.shape != tuple(shape):
        raise SaliauditError(
            f"the mask of {image} is {m.shape[1]}x{m.shape[0]} but the maps are {shape[1]}x{shape[0]}",
            hint="load masks with saliaudit.masks.load_masks at the input size",
        )
    return m


class _Game(Check):
    resume_state = ("_figures",)
    metric = "hit rate"
    thresholds = {"fail": None, "warn": None}
    needs_masks = True
    higher_is_better = True  # a hit rate
    informational = True  # no default thresholds: a number, not a verdict
    interval_verdict = True  # with thresholds set, judged through the interval of the rate
    value_range = (0.0, 1.0)

    def __init__(
        self, params: dict[str, Any] | None = None, thresholds: dict[str, float | None] | None = None
    ):
        super().__init__(params, thresholds)
        self._figures: dict[Variant, dict[str, Any]] = {}

    def _excluded(self, batch: Batch, i: int, reason: str) -> dict[str, str]:
        return {"image": batch.images[i], "reason": reason}

    def _figure(self, v: Variant, image: str, fig: dict[str, Any]) -> None:
        self._figures.setdefault(v, {})[image] = fig

    def _judge(
        self, variant: Variant, m: Measurement, what: str, chance_text: str, extra_text: str = ""
    ) -> CheckResult:
        excluded = m.extra.get("excluded", [])
        reasons: dict[str, int] = {}
        for e in excluded:
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
        left_out = "; ".join(f"{k}: {v} image(s)" for k, v in sorted(reasons.items()))
        figures = {"figures": self._figures.get(variant, {})}
        finite = [x for x in m.values if np.isfinite(x)]
        if not finite:
            why = f"no image qualifies ({left_out})" if left_out else "no image was measured"
            return self.result(variant, m, "skipped", None, why + _notes(m), **figures)
        rate = float(np.mean(finite))
        status = _lower_is_worse(rate, self.t)
        signed = (
            " (signed map: its maximum, the strongest positive evidence, is the point)"
            if variant.signed
            else ""
        )
        judged = (
            ""
            if self.t.get("fail") is None and self.t.get("warn") is None
            else f"; thresholds fail < {self.t.get('fail')}, warn < {self.t.get('warn')}"
        )
        info = "; informational (set thresholds to judge)" if not judged else judged
        msg = (
            f"{what} for {variant.label}{signed}: hit rate {rate:.3f} over {len(finite)} "
            f"image(s); {chance_text}{extra_text}{info}"
        )
        if left_out:
            msg += f"; left out: {left_out}"
        return self.result(variant, m, status, rate, msg + _notes(m), **figures)


@register
class PointingGame(_Game):
    name = "pointing_game"
    short = "point"
    order = 80
    title = "Pointing game"
    summary = (
        "Does the maximum of the map for the predicted class lie on that class's object "
        "(given masks, with a small tolerance)? The hit rate is compared with the chance "
        "that a random point hits (Zhang et al., Top-down Neural Attention by "
        "Excitation Backprop, ECCV 2016)."
    )
    reference = (
        "Zhang, Bargal, Lin, Brandt, Shen & Sclaroff, Top-down Neural Attention by "
        "Excitation Backprop, ECCV 2016"
    )
    metric = "hit rate (max of the map inside the class mask)"
    params = {"tolerance": 15.0, "reference_size": 224}

    def measure(
        self, batch: Batch, source: MapSource, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        if not maps:
            return {}
        shape = tuple(next(iter(maps.values())).shape[-2:])
        radius = scaled_tolerance(self.p["tolerance"], self.p["reference_size"], shape)
        names = list(getattr(batch.model, "class_names", []) or [])
        rows, regions, chance, excluded = [], [], [], []
        for i in range(len(batch)):
            masks = batch.masks[i] if batch.masks else None
            t = int(batch.targets[i])
            if not masks:
                excluded.append(self._excluded(batch, i, "no masks for the image"))
            elif t not in masks:
                excluded.append(self._excluded(batch, i, "no mask for the predicted class"))
            else:
                region = tolerance_region(_check_mask(masks[t], shape, batch.images[i]), radius)
                rows.append(i)
                regions.append(region)
                chance.append(float(region.mean()))
        out: dict[Variant, Measurement] = {}
        region_arr = np.stack(regions) if regions else np.zeros((0,) + shape, bool)
        for v, m in maps.items():
            values = [float("nan")] * len(batch)
            chances = [float("nan")] * len(batch)
            notes = []
            if rows:
                score, ties, first = point_scores(m[rows], region_arr)
                for j, i in enumerate(rows):
                    values[i], chances[i] = float(score[j]), chance[j]
                    if batch.images[i] in batch.examples:
                        t = int(batch.targets[i])
                        self._figure(
                            v,
                            batch.images[i],
                            {
                                "point": [int(first[j][0]), int(first[j][1])],
                                "hit": float(score[j]),
                                "class": names[t] if t < len(names) else t,
                            },
                        )
                flat = ties > 1
                if flat.any():
                    notes.append("maps with several equal maxima score the share of them that hit")
                if np.isnan(score).any():
                    notes.append("maps without a finite value are left out")
            out[v] = Measurement(
                values=values,
                images=list(batch.images),
                notes=notes,
                extra={"excluded": list(excluded), "chance": chances, "tolerance_px": radius},
            )
        return out

    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        chance = [c for c, v in zip(m.extra.get("chance", []), m.values) if np.isfinite(c) and np.isfinite(v)]
        radius = m.extra.get("tolerance_px", 0.0)
        chance_text = (
            f"a uniformly random point would hit {np.mean(chance):.3f} (mask area "
            f"within the tolerance of {radius:.1f} px = {self.p['tolerance']:g} px at "
            f"{self.p['reference_size']} px)"
            if chance
            else ""
        )
        return self._judge(variant, m, "the map's maximum lies on the predicted class's object", chance_text)


@register
class RestrictedPointingGame(_Game):
    name = "restricted_pointing_game"
    short = "rpoint"
    order = 81
    title = "Restricted pointing game"
    summary = (
        "On images with objects of two or more classes, does the map for each class put "
        "its maximum on that class's object rather than on the other one? A map that "
        "ignores the class scores exactly 1/k (Khakzar, Baselizadeh & Navab, Rethinking "
        "Positive Aggregation and Propagation of Gradients, 2020)."
    )
    reference = (
        "Khakzar, Baselizadeh & Navab, Rethinking Positive Aggregation and Propagation "
        "of Gradients in Gradient-based Saliency Methods, ICML 2020 WHI workshop "
        "(arXiv 2012.00362); pointing game of Zhang et al., ECCV 2016"
    )
    metric = "restricted hit rate (max over the objects inside the class's object)"
    params = {}

    def measure(
        self, batch: Batch, source: MapSource, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        if not maps:
            return {}
        shape = tuple(next(iter(maps.values())).shape[-2:])
        names = list(getattr(batch.model, "class_names", []) or [])
        rows: list[tuple[int, int]] = []  # (image position, class)
        excluded = []
        masks_of: dict[int, dict[int, np.ndarray]] = {}
        for i in range(len(batch)):
            masks = batch.masks[i] if batch.masks else None
            if not masks:
                excluded.append(self._excluded(batch, i, "no masks for the image"))
            elif len(masks) < 2:
                excluded.append(self._excluded(batch, i, "objects of fewer than two classes"))
            else:
                masks_of[i] = {c: _check_mask(mk, shape, batch.images[i]) for c, mk in masks.items()}
                rows += [(i, c) for c in sorted(masks)]
        out: dict[Variant, Measurement] = {}
        if not rows:
            return {
                v: Measurement(
                    values=[float("nan")] * len(batch),
                    images=list(batch.images),
                    extra={
                        "excluded": list(excluded),
                        "per_class": [],
                        "chance": [float("nan")] * len(batch),
                    },
                )
                for v in maps
            }
        # maps for the other present classes (the predicted class's map is given)
        other = [(i, c) for i, c in rows if c != int(batch.targets[i])]
        other_maps: dict[Variant, torch.Tensor] = {}
        if other:
            idx = torch.as_tensor([i for i, _ in other], device=batch.x.device)
            cls = torch.as_tensor([c for _, c in other], device=batch.x.device)
            other_maps = source.maps(batch.model, batch.x[idx], cls)
        pos = {r: j for j, r in enumerate(other)}
        search = np.stack([np.logical_or.reduce(list(masks_of[i].values())) for i, _ in rows])
        hit_region = np.stack([masks_of[i][c] for i, c in rows])
        for v, m in maps.items():
            stack = torch.stack([m[i] if (i, c) not in pos else other_maps[v][pos[(i, c)]] for i, c in rows])
            score, ties, first = point_scores(stack, hit_region, search)
            per_image: dict[int, list[float]] = {}
            per_class = []
            for j, (i, c) in enumerate(rows):
                per_image.setdefault(i, []).append(float(score[j]))
                per_class.append(
                    {
                        "image": batch.images[i],
                        "class": names[c] if c < len(names) else c,
                        "hit": float(score[j]),
                    }
                )
                if batch.images[i] in batch.examples:
                    fig = self._figures.setdefault(v, {}).setdefault(batch.images[i], {})
                    fig[str(names[c] if c < len(names) else c)] = {
                        "point": [int(first[j][0]), int(first[j][1])],
                        "hit": float(score[j]),
                    }
            values = [
                float(np.mean(per_image[i])) if i in per_image else float("nan") for i in range(len(batch))
            ]
            chance = [1.0 / len(masks_of[i]) if i in masks_of else float("nan") for i in range(len(batch))]
            notes = []
            if (ties > 1).any():
                notes.append("maps with several equal maxima on the objects score the share of them that hit")
            out[v] = Measurement(
                values=values,
                images=list(batch.images),
                notes=notes,
                extra={"excluded": list(excluded), "per_class": per_class, "chance": chance},
            )
        return out

    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        chance = [c for c, v in zip(m.extra.get("chance", []), m.values) if np.isfinite(c) and np.isfinite(v)]
        chance_text = (
            f"a map that ignores the class scores {np.mean(chance):.3f} (1/k for k classes per image)"
            if chance
            else ""
        )
        return self._judge(
            variant,
            m,
            "the map for each present class puts its maximum on that class's object rather than another",
            chance_text,
        )


def _notes(m: Measurement) -> str:
    return ("; " + "; ".join(m.notes)) if m.notes else ""
