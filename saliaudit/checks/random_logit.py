"""Random logit: does the map for the top-1 class differ from the map for a random other class?

Sixt, Granz & Landgraf (*When Explanations Lie: Why Many Modified BP Attributions Fail*,
ICML 2020) and Quantus' ``RandomLogit`` compare the explanation of the predicted class with
the explanation of one randomly chosen other class: a map that explains the decision for class
c must change when another class is explained. Unlike :mod:`class_sensitivity` (the *lowest*
class, a fixed and often extreme choice), the other class is drawn at random per image,
uniformly among the ``K − 1`` classes other than the top-1, with a CPU generator seeded by the
audit seed and the image name (:func:`saliaudit.checks.removal.image_generator`, salt
``"random_logit"``): the same class for every method and every batch split, never the top-1.

Similarity: the four measures of :mod:`saliaudit.checks.similarity`; the verdict metric is the
``metric`` parameter (default ``hog``, the Spearman correlation of HOG features, as in
class_sensitivity: *where* the evidence lies, not its sign). Lower is better; the verdict goes
through the 95 % interval of the mean: FAIL when the whole interval is ≥ 0.7, PASS when it is
below 0.4, else WARN. Model- and class-independent maps (``random``, ``edge``) and the
``edge_signed`` control (whose evidence lies on the same pixels for every class) must FAIL.

Results: ``value`` and ``per_image`` are the verdict metric; ``series`` holds ``means`` (the
mean of every metric), ``verdict_metric``, ``classes`` (image -> the random class) and
``degenerate_pairs``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import validate
from ..cost import CostContext, Passes
from ..errors import UsageError
from ..result import CheckResult
from .base import Batch, Check, MapSource, Measurement, Variant, higher_is_worse, register
from .class_sensitivity import pair_message
from .removal import image_generator
from .similarity import METRIC_NAMES, METRICS, Maps, similarity

__all__ = ["RandomLogit", "random_classes"]

_SHORT = {
    "spearman_abs": "Spearman ABS",
    "spearman": "signed Spearman",
    "ssim": "SSIM",
    "hog": "HOG Spearman",
}


def random_classes(seed: int, names: list[str], top1: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One class per image, uniform among the ``num_classes − 1`` classes other than its top-1,
    drawn from :func:`image_generator` ``(seed, name, "random_logit")``: independent of the
    batch, the method and everything but the seed, the image name and its top-1 class."""
    if num_classes < 2:
        raise UsageError("random_logit needs a model with at least 2 classes")
    out = []
    for name, t in zip(names, top1.tolist()):
        r = int(torch.randint(num_classes - 1, (1,), generator=image_generator(seed, name, "random_logit")))
        out.append(r if r < int(t) else r + 1)
    return torch.as_tensor(out, dtype=torch.long, device=top1.device)


@register
class RandomLogit(Check):
    name = "random_logit"
    title = "Random logit (top-1 vs a random other class)"
    short = "rlogit"
    summary = (
        "Does the map change when a random other class is explained? The maps for the top-1 "
        "class and for one randomly drawn other class are compared by the Spearman correlation "
        "of their HOG features; alike maps do not explain the class (Sixt et al., ICML 2020)."
    )
    reference = (
        "Sixt, Granz & Landgraf, When Explanations Lie: Why Many Modified BP Attributions "
        "Fail, ICML 2020; Hedström et al., Quantus (RandomLogit), JMLR 2023"
    )
    metric = "Spearman of HOG features, top-1 vs a random other class"
    thresholds = {"fail": 0.7, "warn": 0.4}
    controls_must_fail = frozenset({"random", "edge", "edge_signed"})
    interval_verdict = True
    value_range = (-1.0, 1.0)
    higher_is_better = False  # a similarity of maps that should differ
    order = 22
    params = {
        # verdict metric: hog (default), spearman_abs, spearman or ssim
        "metric": "hog",
        "max_images": None,  # all images
        # a PASS resting on constant maps for more than this share of the images is a WARN
        "max_degenerate_share": 0.25,
    }

    def __init__(
        self, params: dict[str, Any] | None = None, thresholds: dict[str, float | None] | None = None
    ):
        super().__init__(params, thresholds)
        validate.choice("random_logit.metric", self.p["metric"], METRICS)
        validate.integer(
            "random_logit.max_images", self.p["max_images"], min=1, allow_none=True, hint="null: all images"
        )
        self.metric = self._metric_text(self.p["metric"])

    @staticmethod
    def _metric_text(metric: str) -> str:
        name = "Spearman of HOG features" if metric == "hog" else METRIC_NAMES[metric]
        return f"{name}, top-1 vs a random other class"

    def skip_reason(self, source: MapSource, model: Any, has_masks: bool) -> str | None:
        k = getattr(model, "num_classes", None)
        if k is not None and k < 2:
            return "needs a model with at least 2 classes"
        return super().skip_reason(source, model, has_masks)

    def cost(self, ctx: CostContext) -> Passes:
        """The map of one random other class, compared by every measure."""
        return Passes(maps=1, compare=ctx.variants * len(METRICS))

    def measure(
        self, batch: Batch, source: MapSource, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        variants = list(maps)
        if len(batch) == 0:
            return {v: Measurement() for v in variants}
        top1 = batch.targets.to(batch.x.device)
        other = random_classes(batch.seed, list(batch.images), top1, int(batch.logits.shape[1]))
        other_maps = source.maps(batch.model, batch.x, other)
        classes = {name: int(c) for name, c in zip(batch.images, other.tolist())}
        metric = self.p["metric"]
        out: dict[Variant, Measurement] = {}
        for v in variants:
            ref, cmp = Maps(maps[v]), Maps(other_maps[v])
            extra: dict[str, Any] = {"classes": dict(classes)}
            values: list[float] = []
            for m in METRICS:
                vals, deg = similarity(ref, cmp, m)
                extra[f"sim_{m}"] = [float(x) for x in vals]
                if m == metric:
                    values = [float(x) for x in vals]
                    extra["degenerate"] = [bool(d) for d in deg]
            out[v] = Measurement(values=values, images=list(batch.images), extra=extra)
        return out

    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        metric = self.p["metric"]
        per_metric = {k: m.extra.pop(f"sim_{k}", []) for k in METRICS}
        degenerate = m.extra.pop("degenerate", [])

        def mean(xs: list[float]) -> float | None:
            f = [x for x in xs if np.isfinite(x)]
            return float(np.mean(f)) if f else None

        series: dict[str, Any] = {
            "verdict_metric": metric,
            "metrics": {k: METRIC_NAMES[k] for k in METRICS},
            "means": {k: mean(per_metric[k]) for k in METRICS},
            "degenerate_pairs": int(sum(bool(d) for d in degenerate)),
        }
        n = len(m.values)
        if not n:
            return self.result(variant, m, "skipped", None, "no image was measured", **series)
        value = m.mean()
        status = higher_is_worse(value, self.t)
        msg = pair_message(
            "a random other class", _SHORT[metric], value, status, self.t, "no finite similarity was measured"
        )
        signed_rho = series["means"].get("spearman")
        if variant.signed and signed_rho is not None and metric != "spearman":
            msg += f"; signed Spearman {signed_rho:.2f}"
        if series["degenerate_pairs"]:
            msg += (
                f"; {series['degenerate_pairs']} of {n} map pairs had a constant map "
                "(similarity defined: 1 if both constant, 0 if one)"
            )
        cell = self.result(variant, m, status, value, msg, **series)
        cell.metric = self._metric_text(metric)
        return self.mark_degenerate(cell, series["degenerate_pairs"], n)
