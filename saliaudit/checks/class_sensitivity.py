"""Class sensitivity: does the map change with the explained class?

A map that explains the decision for class c should differ from the map for a class the model
rejects. Following Khakzar, Baselizadeh & Navab (*Rethinking Positive Aggregation and
Propagation of Gradients in Gradient-based Saliency Methods*) and the class-sensitivity
experiment requested of the FullGrad paper (Srinivas & Fleuret 2019, with Adebayo et al.'s
similarity measures), each image's map for its top-1 class is compared with its map for the
lowest-scoring class (``argmin`` of the logits). The primary measure is the Spearman rank
correlation of the two maps' HOG features (Khakzar's measure; lower is better; they report
Grad-CAM 0.03, gradients 0.44, FullGrad 0.48 and guided backprop 0.99 on VGG-16); the check
also reports the raw Spearman correlation with and without absolute values and SSIM
(:mod:`saliaudit.checks.similarity`), and the same four measures for the top-1 class against
the runner-up (the class the model nearly chose). Verdict on the mean over images of the
``metric`` parameter (default ``hog``), for signed and unsigned maps alike, judged through its
95 % interval: FAIL when the whole interval is ≥ 0.7, PASS when it is below 0.4, else WARN.

Model- and class-independent maps (the ``random`` and ``edge`` controls) give identical maps
for both classes, similarity 1 and FAIL. A constant map (an all-zero Grad-CAM for a class with
no positive evidence) has a defined similarity (0 against a non-constant map) and is counted
in a note.

Results: ``value`` and ``per_image`` are the verdict metric (top-1 vs lowest); ``series``
holds ``lowest`` and ``runner_up`` (mean of every metric), ``verdict_metric``,
``degenerate_pairs`` and, for the first ``figure_images`` example images by name,
``figures[image] = {"top1", "top1_class", "lowest", "lowest_class"}`` (maps at ≤ 48 px).
HOG uses unsigned orientations on min–max normalized maps, so a map and its negation have the
same HOG features: the verdict asks *where* the evidence lies. A signed map whose lowest-class
map is merely the negation of its top-1 map puts its evidence on the same pixels for both
classes and is not class-sensitive; the signed Spearman is reported beside the verdict (a value
near −1 says the class flips the sign, not the place) and the ``edge_signed`` control, built to
score −1 there, must FAIL.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import validate
from ..cost import CostContext, Passes
from ..errors import UsageError
from ..result import CheckResult
from .base import Batch, Check, MapSource, Measurement, Variant, higher_is_worse, register, small_map
from .similarity import METRIC_NAMES, METRICS, Maps, similarity

__all__ = ["ClassSensitivity"]

_SHORT = {
    "spearman_abs": "Spearman ABS",
    "spearman": "signed Spearman",
    "ssim": "SSIM",
    "hog": "HOG Spearman",
}
_PAIRS = ("lowest", "runner_up")


def pair_message(
    other: str, short: str, value: float | None, status: str, t: dict[str, Any], empty: str
) -> str:
    """The verdict sentence of a top-1 vs ``other`` map similarity (lower is better)."""
    fail, warn = t.get("fail"), t.get("warn")
    if status == "fail":
        return (
            f"maps for the top-1 and {other} are alike ({short} {value:.2f} ≥ {fail:g}): "
            "the map does not depend on the class"
        )
    if status == "warn":
        return (
            f"maps for the top-1 and {other} are partly alike ({short} {value:.2f} ≥ "
            f"{warn:g}): the map depends only weakly on the class"
        )
    if status == "pass":
        bound = warn if warn is not None else fail
        return (
            f"maps for the top-1 and {other} differ ({short} {value:.2f}"
            + (f" < {bound:g}" if bound is not None else "")
            + "): the map depends on the class"
        )
    return empty


@register
class ClassSensitivity(Check):
    name = "class_sensitivity"
    resume_state = ("_figures",)
    title = "Class sensitivity (top-1 vs lowest-scoring class)"
    summary = (
        "Does the map change when another class is explained? The maps for the top-1 "
        "class and for the lowest-scoring class are compared by the Spearman correlation "
        "of their HOG features; alike maps do not explain the class (Khakzar et al.; "
        "Srinivas & Fleuret 2019; Adebayo et al. 2018)."
    )
    reference = (
        "Khakzar, Baselizadeh & Navab, Rethinking Positive Aggregation and Propagation "
        "of Gradients in Gradient-based Saliency Methods, 2020; Srinivas & Fleuret, "
        "Full-Gradient Representation for Neural Network Visualization, NeurIPS 2019; "
        "Adebayo et al., Sanity Checks for Saliency Maps, NeurIPS 2018"
    )
    metric = "Spearman of HOG features, top-1 vs lowest class"
    thresholds = {"fail": 0.7, "warn": 0.4}
    controls_must_fail = frozenset({"random", "edge", "edge_signed"})
    interval_verdict = True
    value_range = (-1.0, 1.0)
    short = "class"
    higher_is_better = False  # a similarity of maps that should differ
    order = 20
    ranks_examples = True  # images whose maps ignore the class are shown first
    shows_class_maps = True
    params = {
        # verdict metric for every map: hog (Khakzar et al.), spearman_abs, spearman or ssim;
        # where the evidence lies (hog, spearman_abs) rather than its sign is the default
        "metric": "hog",
        "max_images": None,  # all images
        "figure_images": 3,  # example images (first by name) whose two maps are stored
        # a PASS resting on constant maps for more than this share of the images is a WARN
        "max_degenerate_share": 0.25,
    }

    def __init__(
        self, params: dict[str, Any] | None = None, thresholds: dict[str, float | None] | None = None
    ):
        super().__init__(params, thresholds)
        validate.choice("class_sensitivity.metric", self.p["metric"], METRICS)
        validate.integer(
            "class_sensitivity.figure_images", self.p["figure_images"], min=0, hint="0: no figures"
        )
        validate.integer(
            "class_sensitivity.max_images",
            self.p["max_images"],
            min=1,
            allow_none=True,
            hint="null: all images",
        )
        name = "Spearman of HOG features" if self.p["metric"] == "hog" else METRIC_NAMES[self.p["metric"]]
        self.metric = f"{name}, top-1 vs lowest class"
        self._figures: dict[Variant, dict[str, Any]] = {}

    def skip_reason(self, source: MapSource, model: Any, has_masks: bool) -> str | None:
        k = getattr(model, "num_classes", None)
        if k is not None and k < 2:
            return "needs a model with at least 2 classes"
        return super().skip_reason(source, model, has_masks)

    def cost(self, ctx: CostContext) -> Passes:
        """The maps of the lowest and the runner-up class, each compared by every measure."""
        return Passes(maps=2, compare=2 * ctx.variants * len(METRICS))

    def measure(
        self, batch: Batch, source: MapSource, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        variants = list(maps)
        n = len(batch)
        if n == 0:
            return {v: Measurement() for v in variants}
        logits = batch.logits.detach()
        if logits.shape[1] < 2:
            raise UsageError("class sensitivity needs a model with at least 2 classes")
        lowest = logits.argmin(1).to(batch.x.device)
        ranked = torch.sort(logits, dim=1, descending=True, stable=True).indices
        top1 = batch.targets.to(batch.x.device)
        # runner-up: the best class other than the top-1 target
        runner = torch.where(
            ranked[:, 0].to(top1.device) == top1, ranked[:, 1].to(top1.device), ranked[:, 0].to(top1.device)
        )
        other = {"lowest": source.maps(batch.model, batch.x, lowest)}
        other["runner_up"] = source.maps(batch.model, batch.x, runner)
        same = (lowest == top1).cpu().numpy()  # all logits equal: no lowest class
        shown = set(sorted(batch.examples)[: int(self.p["figure_images"])])
        examples = [i for i, name in enumerate(batch.images) if name in shown]
        out: dict[Variant, Measurement] = {}
        for v in variants:
            metric = self._metric(v)
            extra: dict[str, Any] = {}
            ref = Maps(maps[v])
            for pair in _PAIRS:
                cmp = Maps(other[pair][v])
                for m in METRICS:
                    vals, deg = similarity(ref, cmp, m)
                    extra[f"{pair}_{m}"] = [float(x) for x in vals]
                    if pair == "lowest" and m == metric:
                        extra["degenerate"] = [bool(d) for d in deg]
            values = [float("nan") if same[i] else extra[f"lowest_{metric}"][i] for i in range(n)]
            extra["no_lowest"] = [bool(s) for s in same]
            figs = {
                batch.images[i]: {
                    "top1": small_map(maps[v][i]),
                    "top1_class": int(top1[i]),
                    "lowest": small_map(other["lowest"][v][i]),
                    "lowest_class": int(lowest[i]),
                }
                for i in examples
            }
            if figs:
                self._figures.setdefault(v, {}).update(figs)
                extra["figures"] = figs
            out[v] = Measurement(values=values, images=list(batch.images), extra=extra)
        return out

    def _metric(self, v: Variant) -> str:
        """The verdict metric, the same for signed and unsigned maps."""
        return self.p["metric"]

    def _metric_text(self, metric: str) -> str:
        name = "Spearman of HOG features" if metric == "hog" else METRIC_NAMES[metric]
        return f"{name}, top-1 vs lowest class"

    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        cell = self._judge(variant, m)
        cell.metric = self._metric_text(self._metric(variant))
        return cell

    def _judge(self, variant: Variant, m: Measurement) -> CheckResult:
        metric = self._metric(variant)
        per_metric = {pair: {k: m.extra.pop(f"{pair}_{k}", []) for k in METRICS} for pair in _PAIRS}
        degenerate = m.extra.pop("degenerate", [])
        no_lowest = m.extra.pop("no_lowest", [])
        figs = self._figures.get(variant) or m.extra.get("figures")
        if figs:
            m.extra["figures"] = figs
        else:
            m.extra.pop("figures", None)

        def mean(xs: list[float]) -> float | None:
            f = [x for x in xs if np.isfinite(x)]
            return float(np.mean(f)) if f else None

        series: dict[str, Any] = {
            "verdict_metric": metric,
            "metrics": {k: METRIC_NAMES[k] for k in METRICS},
            "lowest": {k: mean(per_metric["lowest"][k]) for k in METRICS},
            "runner_up": {k: mean(per_metric["runner_up"][k]) for k in METRICS},
            "degenerate_pairs": int(sum(bool(d) for d in degenerate)),
        }
        n = len(m.values)
        if not n:
            return self.result(variant, m, "skipped", None, "no image was measured", **series)
        value = m.mean()
        status = higher_is_worse(value, self.t)
        notes = []
        if series["degenerate_pairs"]:
            notes.append(
                f"{series['degenerate_pairs']} of {n} map pairs had a constant map "
                "(similarity defined: 1 if both constant, 0 if one)"
            )
        if any(no_lowest):
            notes.append(
                f"{sum(bool(x) for x in no_lowest)} images where every class scores the same were left out"
            )
        msg = pair_message(
            "the lowest class",
            _SHORT[metric],
            value,
            status,
            self.t,
            "no finite similarity was measured (every class scores the same on every image)",
        )
        signed_rho = series["lowest"].get("spearman")
        if variant.signed and signed_rho is not None and metric != "spearman":
            msg += f"; signed Spearman {signed_rho:.2f}"
            if signed_rho <= -0.4 and status != "pass":
                notes.append(
                    "the lowest-class map is close to the negation of the top-1 map: "
                    "the class flips the sign of the evidence, not where it lies"
                )
        ru = series["runner_up"].get(metric)
        if ru is not None and status != "error":
            msg += f"; top-1 vs runner-up {ru:.2f}"
        if notes:
            msg += "; " + "; ".join(notes)
        cell = self.result(variant, m, status, value, msg, **series)
        return self.mark_degenerate(cell, int(sum(bool(d) for d in degenerate)), n)
