"""Model-parameter randomization (Adebayo et al., *Sanity Checks for Saliency Maps*, NeurIPS 2018).

A map that explains the model must change when the model's learned weights are destroyed.
**Cascading** randomization re-initializes the parameters step by step from the output towards
the input (step k: the last k groups randomized); **independent** randomization re-initializes
one group at a time, the rest trained. For every step, each method's map for the *original*
top-1 class is compared with its map on the trained model by the four similarities of
:mod:`saliaudit.checks.similarity` (Spearman of ``|map|``, signed Spearman, SSIM, Spearman of
HOG features), giving curves over the steps. The verdict uses the whole cascade: the ``metric``
(default Adebayo's main one, the Spearman rank correlation with absolute values) averaged over
the cascading steps (the area under the cascading curve), so that a map that survives the
randomization of the top layers cannot PASS; judged through its 95 % interval over images
(FAIL when the whole interval is ≥ 0.7, PASS below 0.4). ``verdict = "final"`` judges the fully
randomized model alone, Adebayo's headline number, which is reported either way.
Top-down randomization has known limits (Binder et al., CVPR 2023): randomizing the top
layers can leave a map that depends on the input alone looking "changed", and a near-constant
output after randomization makes similarities noisy; the independent curve and the controls
are reported for that reason.
Model-independent maps (the ``random`` and ``edge`` controls) do not change at all, measure 1.0
and FAIL: nothing is special-cased.

Copies only: :mod:`saliaudit.checks.reinit` randomizes a deep copy of the graph the methods run,
step by step, and restores it; the user's model is only read. Steps are parameter groups
(``granularity`` ``blocks`` or ``layers``), re-initialized by ``reinit`` (``default`` or
``normal``), seeded per module path.

Results: ``value`` and ``per_image`` are the verdict metric (per image: the cascade mean);
``series`` holds the curves ``cascading_<metric>`` and ``independent_<metric>`` (x = step
names), ``steps``, ``step_modules`` (step -> module paths), ``granularity``, ``reinit`` (the
scheme in words), ``final`` (every metric's mean on the fully randomized model) and
``degenerate_pairs``; for the first ``figure_images`` example images by name, ``figures[image]
= {"steps": ["original", *steps], "maps": [...]}``, the cascade strip at ≤ 32 px.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import validate
from ..cost import CostContext, Passes
from ..result import CheckResult
from .base import Batch, Check, Curve, MapSource, Measurement, Variant, higher_is_worse, register, small_map
from .reinit import (
    GRANULARITIES,
    REINIT_TEXT,
    REINITS,
    RandomizedModels,
    group_parameters,
    module_seed,
    reinit_values,
)
from .similarity import METRIC_NAMES, METRICS, Maps, similarity

__all__ = [
    "Randomization",
    "RandomizedModels",
    "GRANULARITIES",
    "REINITS",
    "REINIT_TEXT",
    "group_parameters",
    "reinit_values",
    "module_seed",
]

_STRIP_PX = 32  # cascade-strip maps: at most 32 px on the long side (8 maps per image)
_SHORT = {
    "spearman_abs": "Spearman ABS",
    "spearman": "signed Spearman",
    "ssim": "SSIM",
    "hog": "HOG Spearman",
}


@register
class Randomization(Check):
    name = "randomization"
    title = "Model-parameter randomization (cascading and independent)"
    summary = (
        "Does the map change when the model's learned weights are replaced by random "
        "ones? Layers are re-initialized from the output towards the input (cascading) "
        "and one at a time (independent); a map still alike the original on the fully "
        "randomized model does not explain the model (Adebayo et al. 2018)."
    )
    reference = (
        "Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim, Sanity Checks for Saliency Maps, NeurIPS 2018"
    )
    metric = "Spearman rank correlation of |map| (ABS) with the original, mean over the cascade"
    thresholds = {"fail": 0.7, "warn": 0.4}
    controls_must_fail = frozenset({"random", "edge"})
    interval_verdict = True
    value_range = (-1.0, 1.0)
    short = "rand"
    higher_is_better = False  # a similarity to the maps of the trained model
    order = 30
    curves = {
        f"{mode}_{m}": Curve(
            f"{mode.capitalize()} randomization" + (" (signed)" if m == "spearman" else ""),
            "re-initialized up to layer (from the output)"
            if mode == "cascading"
            else "the one layer re-initialized",
            {
                "spearman_abs": "Spearman of |map| with the original",
                "spearman": "signed Spearman with the original",
                "ssim": "SSIM with the original",
                "hog": "Spearman of HOG features",
            }[m],
            primary=m == "spearman_abs",
        )
        for mode in ("cascading", "independent")
        for m in METRICS
    }
    params = {
        "metric": "spearman_abs",  # verdict metric: spearman_abs, spearman, ssim or hog
        # final: the fully randomized model (Adebayo et al.'s headline comparison); mean: the
        # similarity averaged over the cascade steps (area under the cascading curve), which
        # also penalizes maps that survive the randomization of the top layers. Either way the
        # curve is in the results and the caveats name maps that survive the top layers.
        "verdict": "mean",
        "granularity": "blocks",  # blocks or layers
        "max_steps": None,  # merge consecutive steps into at most this many (None: all)
        "reinit": "default",  # default (PyTorch reset_parameters) or normal
        "independent": True,  # also independent (one group at a time) randomization
        "max_images": 16,  # expensive: steps × methods map computations per image
        "figure_images": 3,  # example images (first by name) that get a cascade strip
        # a PASS resting on constant maps for more than this share of the images is a WARN
        "max_degenerate_share": 0.25,
    }

    def __init__(
        self, params: dict[str, Any] | None = None, thresholds: dict[str, float | None] | None = None
    ):
        super().__init__(params, thresholds)
        for key, choices in (
            ("metric", METRICS),
            ("granularity", GRANULARITIES),
            ("reinit", REINITS),
            ("verdict", ("mean", "final")),
        ):
            validate.choice(f"randomization.{key}", self.p[key], choices)
        validate.boolean("randomization.independent", self.p["independent"])
        validate.integer(
            "randomization.max_steps", self.p["max_steps"], min=1, allow_none=True, hint="null: every step"
        )
        validate.integer("randomization.figure_images", self.p["figure_images"], min=0, hint="0: no strips")
        validate.integer(
            "randomization.max_images", self.p["max_images"], min=1, allow_none=True, hint="null: all images"
        )
        where = "mean over the cascade steps" if self.p["verdict"] == "mean" else "fully randomized model"
        self.metric = (
            f"{METRIC_NAMES[self.p['metric']]}, original vs randomized model, {where} "
            f"(cascading, {self.p['granularity']})"
        )
        self._models: RandomizedModels | None = None
        self._step_modules: dict[str, list[str]] = {}
        self._figures: dict[Variant, dict[str, Any]] = {}

    # ----------------------------------------------------------------------------------------
    def models(self, batch: Batch) -> RandomizedModels:
        """The randomized copies for ``batch``'s model (created once, shared by all methods)."""
        key = (id(batch.model), int(batch.seed), batch.x.dtype, batch.x.device)
        if self._models is None or self._models.key != key or self._models.model is not batch.model:
            self._models = None
            self._models = RandomizedModels(
                batch.model, batch.x, batch.seed, self.p["granularity"], self.p["reinit"], self.p["max_steps"]
            )
            self._step_modules = self._models.modules
        return self._models

    def release(self) -> None:
        """Free the working copy and the randomized values."""
        self._models = None

    def cost(self, ctx: CostContext) -> Passes:
        """The maps on every randomization step (cascading, and independent when on), each
        compared with the original by every measure."""
        runs = self.steps(ctx.model) * (2 if self.p["independent"] else 1)
        return Passes(maps=runs, compare=runs * ctx.variants * len(METRICS))

    def steps(self, model: Any) -> int:
        """Randomization steps of ``model`` at the configured granularity."""
        module = getattr(model, "module", model)
        if not isinstance(module, torch.nn.Module):
            return 1
        return max(1, len(group_parameters(module, self.p["granularity"], self.p["max_steps"])))

    def reductions(self) -> list[dict[str, Any]]:
        out = []
        if self.p["independent"]:
            out.append({"param": "independent", "value": False, "why": "cascading randomization only"})
        if self.p["max_steps"] is None or int(self.p["max_steps"]) > 6:
            out.append({"param": "max_steps", "value": 6, "why": "a cascade of at most 6 coarser steps"})
        return out

    def measure(
        self, batch: Batch, source: MapSource, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        variants = list(maps)
        n = len(batch)
        if n == 0:
            return {v: Measurement() for v in variants}
        rm = self.models(batch)
        steps = [s for s, _ in rm.steps]
        modes = ["cascading"] + (["independent"] if self.p["independent"] else [])
        curves = {
            v: {f"{mode}_{metric}": np.zeros((n, len(steps))) for mode in modes for metric in METRICS}
            for v in variants
        }
        degenerate = {
            v: {
                f"{mode}_{metric}": np.zeros((n, len(steps)), dtype=bool)
                for mode in modes
                for metric in METRICS
            }
            for v in variants
        }
        shown = set(sorted(batch.examples)[: int(self.p["figure_images"])])
        examples = [i for i, name in enumerate(batch.images) if name in shown]
        strips: dict[Variant, dict[int, list[list[list[float]]]]] = {
            v: {i: [small_map(maps[v][i], _STRIP_PX)] for i in examples} for v in variants
        }
        reference = {v: Maps(maps[v]) for v in variants}  # ranks, HOG features: once
        for mode in modes:
            it = rm.cascade() if mode == "cascading" else rm.independent()
            for k, (_, model) in enumerate(it):
                out = source.maps(model, batch.x, batch.targets)
                for v in variants:
                    step_maps = Maps(out[v])
                    for metric in METRICS:
                        vals, deg = similarity(reference[v], step_maps, metric)
                        curves[v][f"{mode}_{metric}"][:, k] = vals
                        degenerate[v][f"{mode}_{metric}"][:, k] = deg
                    if mode == "cascading":
                        for i in examples:
                            strips[v][i].append(small_map(out[v][i], _STRIP_PX))
                del out
        result: dict[Variant, Measurement] = {}
        metric = self.p["metric"]
        for v in variants:
            c = curves[v]
            curve = c[f"cascading_{metric}"]
            final = curve.mean(1) if self.p["verdict"] == "mean" else curve[:, -1]
            extra: dict[str, Any] = {
                "degenerate_final": [bool(d) for d in degenerate[v][f"cascading_{metric}"][:, -1]],
                # per image: does its verdict value rest on a constant map (any cascade step)?
                "degenerate_verdict": [
                    bool(d)
                    for d in (
                        degenerate[v][f"cascading_{metric}"].any(1)
                        if self.p["verdict"] == "mean"
                        else degenerate[v][f"cascading_{metric}"][:, -1]
                    )
                ],
                "degenerate_pairs": [int(sum(d[i].sum() for d in degenerate[v].values())) for i in range(n)],
            }
            for m in METRICS:
                extra[f"final_{m}"] = [float(x) for x in c[f"cascading_{m}"][:, -1]]
            figs = {batch.images[i]: {"steps": ["original"] + steps, "maps": strips[v][i]} for i in examples}
            if figs:
                self._figures.setdefault(v, {}).update(figs)
                extra["figures"] = figs
            result[v] = Measurement(
                values=[float(x) for x in final],
                images=list(batch.images),
                curves=dict(c),
                axes={k: list(steps) for k in c},
                extra=extra,
            )
        return result

    @classmethod
    def caveats(cls, cells: list[CheckResult], context: dict[str, Any]) -> list[dict[str, Any]]:
        """``survives_top_randomization`` (maps alike the original while at least the top
        third of the cascade is randomized: they do not reflect the top layers, Adebayo et al.
        2018, guided backprop in Fig. 2) and ``resembles_edge`` (maps more alike the
        model-independent edge control than their own maps on the fully randomized model)."""
        out = [c for c in (_survivor(c) for c in cells) if c is not None]
        rand = {}
        for c in cells:
            final = (c.series.get("final") or {}).get(c.series.get("verdict_metric", "spearman_abs"))
            if isinstance(final, (int, float)):
                rand[c.variant] = float(final)
        for variant, sim_edge in sorted(context.get("edge_similarity", {}).items()):
            if variant.startswith("edge/") or variant not in rand:
                continue
            if sim_edge > rand[variant] and sim_edge >= 0.3:
                out.append(
                    {
                        "kind": "resembles_edge",
                        "variant": variant,
                        "numbers": {"edge_similarity": sim_edge, "randomized_similarity": rand[variant]},
                        "message": (
                            f"{variant} maps resemble the model-independent edge control "
                            f"(Spearman {sim_edge:.2f}) more than their own maps on the fully "
                            f"randomized model ({rand[variant]:.2f}): they may show image "
                            "structure rather than what the model uses (Adebayo et al. 2018)."
                        ),
                    }
                )
        return out

    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        self.release()  # judging starts after the last batch: the copies are no longer needed
        metric = self.p["metric"]
        n = len(m.values)
        deg_final = m.extra.pop("degenerate_final", [])
        deg_verdict = m.extra.pop("degenerate_verdict", [])
        deg_pairs = m.extra.pop("degenerate_pairs", [])
        finals = {k: m.extra.pop(f"final_{k}", []) for k in METRICS}
        figs = self._figures.get(variant) or m.extra.get("figures")
        if figs:
            m.extra["figures"] = figs
        else:
            m.extra.pop("figures", None)
        steps = next(iter(m.axes.values()), [])
        series: dict[str, Any] = {
            "steps": list(steps),
            "granularity": self.p["granularity"],
            "reinit": REINIT_TEXT[self.p["reinit"]],
            "verdict_metric": metric,
            "final": {k: (float(np.mean(v)) if v else None) for k, v in finals.items()},
            "degenerate_pairs": int(sum(deg_pairs)),
        }
        if self._step_modules:
            series["step_modules"] = self._step_modules
        if not n:
            return self.result(variant, m, "skipped", None, "no image was measured", **series)
        value = m.mean()
        status = higher_is_worse(value, self.t)
        n_deg = int(sum(bool(d) for d in deg_final))
        notes = []
        if n_deg:
            notes.append(
                f"{n_deg} of {n} map pairs on the fully randomized model had a constant "
                "map (similarity defined: 1 if both constant, 0 if one)"
            )
        if series["degenerate_pairs"] > n_deg:
            notes.append(f"{series['degenerate_pairs']} constant-map comparisons over all steps and measures")
        short = _SHORT[metric]
        fail, warn = self.t.get("fail"), self.t.get("warn")
        where = (
            "averaged over the cascade" if self.p["verdict"] == "mean" else "on the fully randomized model"
        )
        final = series["final"].get(metric)
        tail = f"; fully randomized {final:.2f}" if final is not None and self.p["verdict"] == "mean" else ""
        if status == "fail":
            msg = (
                f"maps on the randomized models resemble the original ({short} {value:.2f} "
                f"{where} ≥ {fail:g}{tail}): the map does not depend on the learned weights"
            )
        elif status == "warn":
            msg = (
                f"maps on the randomized models still resemble the original ({short} "
                f"{value:.2f} {where} ≥ {warn:g}{tail}): the map depends only partly on the "
                "learned weights"
            )
        elif status == "pass":
            bound = warn if warn is not None else fail
            msg = (
                f"maps change when the weights are randomized ({short} {value:.2f} {where}"
                + (f" < {bound:g}" if bound is not None else "")
                + f"{tail})"
            )
        else:
            msg = "no finite similarity was measured"
        if notes:
            msg += "; " + "; ".join(notes)
        cell = self.result(variant, m, status, value, msg, **series)
        return self.mark_degenerate(cell, int(sum(bool(d) for d in deg_verdict)), n)


def _is_control(method: str) -> bool:
    from ..methods import METHODS, method_names

    return method in method_names() and METHODS[method].family == "control"


def _survivor(c: CheckResult) -> dict[str, Any] | None:
    """The ``survives_top_randomization`` caveat of one cell, if its cascade supports it."""
    if c.status not in ("pass", "warn", "fail") or c.control is not None or _is_control(c.method):
        return None
    metric = c.series.get("verdict_metric", "spearman_abs")
    curve = c.series.get(f"cascading_{metric}") or {}
    mean, steps = curve.get("mean") or [], curve.get("x") or []
    fail = c.thresholds.get("fail")
    if not mean or fail is None or len(mean) < 3:
        return None
    kept = 0
    for v in mean:
        if v is None or v < fail:
            break
        kept += 1
    if not (kept >= -(-len(mean) // 3) and kept < len(mean)):
        return None
    return {
        "kind": "survives_top_randomization",
        "variant": c.variant,
        "numbers": {"steps_kept": kept, "steps": len(mean), "curve": dict(zip(map(str, steps), mean))},
        "message": (
            f"{c.variant} maps stay alike the original (similarity ≥ {fail:g}) "
            f"until {steps[kept]} is randomized ({kept} of {len(mean)} cascade "
            f"steps, values {', '.join(f'{v:.2f}' for v in mean[: kept + 1])}): "
            "they do not reflect the top layers of the model (Adebayo et al. 2018)."
        ),
    }
