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

Measures (``variant``; :mod:`saliaudit.checks.mprt_variants`, Hedström et al. 2023, the repairs
proposed after Binder et al.): ``mprt`` (default) judges the similarity above; ``smprt`` the same
similarity on denoised maps (the mean of the maps of ``smprt_samples`` noisy copies of the image,
the same copies on every model), over the same steps as ``verdict``; ``emprt`` the rise in
complexity, the ratio of the entropy of the map's ``emprt_bins``-bin value histogram on the fully
randomized model to the trained model's (higher is better; thresholds ``fail`` 1.0, ``warn`` 1.1,
see ``EMPRT_THRESHOLDS``). Whatever decides, the other measures are reported beside it when
affordable: MPRT and eMPRT always (their maps are computed anyway), sMPRT only when selected or
with ``alternatives = "all"`` (``smprt_samples − 1`` map computations per model it compares). When
another measure's thresholds give another verdict, the message says so. Thresholds set by the user
apply to the selected measure; the others keep their defaults (similarities 0.7/0.4).

Copies only: :mod:`saliaudit.checks.reinit` randomizes a deep copy of the graph the methods run,
step by step, and restores it; the user's model is only read. Steps are parameter groups
(``granularity`` ``blocks`` or ``layers``), re-initialized by ``reinit`` (``default`` or
``normal``), seeded per module path.

Results: ``value`` and ``per_image`` are the selected measure (per image: the cascade mean, or
the fully randomized value with ``verdict = "final"``; eMPRT: the entropy ratio). ``series``
holds the curves ``cascading_<metric>`` and ``independent_<metric>`` (x = step names;
``cascading_smprt`` when sMPRT runs over the cascade), ``steps``, ``step_modules`` (step ->
module paths), ``granularity``, ``reinit`` (the scheme in words), ``final`` (every similarity's
mean on the fully randomized model), ``degenerate_pairs``, ``verdict_measure``,
``similarity_thresholds`` and ``measures`` (per measure: ``per_image`` values, ``value``, ``n``,
``ci``, the ``status`` its own thresholds give and whether it ``differs`` from the cell's;
sMPRT when not computed: ``{"computed": false, "why": ...}``); for the first ``figure_images``
example images by name, ``figures[image] = {"steps": ["original", *steps], "maps": [...]}``,
the cascade strip at ≤ 32 px.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import validate
from ..cost import CostContext, Passes
from ..result import CheckResult
from ..resume import Progress
from .base import Batch, Check, Curve, MapSource, Measurement, Variant, register, small_map
from .mprt_variants import (
    ALTERNATIVES,
    EMPRT_THRESHOLDS,
    HEDSTROM,
    MEASURE_SHORT,
    MEASURE_TEXT,
    MEASURES,
    Collector,
)
from .randomization_text import (
    caveats,
    differing_note,
    emprt_message,
    measures_series,
    metric_text,
    point_status,
    similarity_message,
)
from .reinit import (
    GRANULARITIES,
    REINIT_TEXT,
    REINITS,
    RandomizedModels,
    group_parameters,
    module_seed,
    reinit_values,
)
from .similarity import METRICS, Maps, similarity

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


@register
class Randomization(Check):
    name = "randomization"
    resume_state = ("_figures", "_step_modules")
    title = "Model-parameter randomization (cascading and independent)"
    summary = (
        "Does the map change when the model's learned weights are replaced by random "
        "ones? Layers are re-initialized from the output towards the input (cascading) "
        "and one at a time (independent); a map still alike the original on the fully "
        "randomized model does not explain the model (Adebayo et al. 2018). variant = "
        "smprt judges denoised maps instead, emprt the rise of the map's entropy after full "
        "randomization (a ratio, higher is better: fail=1.0, warn=1.1) (Hedström et al. "
        "2023); the measures not selected are reported beside the verdict."
    )
    reference = (
        "Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim, Sanity Checks for Saliency Maps, "
        f"NeurIPS 2018; {HEDSTROM}"
    )
    metric = "Spearman rank correlation of |map| (ABS) with the original, mean over the cascade"
    thresholds = {"fail": 0.7, "warn": 0.4}
    controls_must_fail = frozenset({"random", "edge"})
    interval_verdict = True
    value_range = (-1.0, 1.0)
    short = "rand"
    higher_is_better = False  # a similarity to the maps of the trained model (eMPRT: True)
    order = 30
    curves = {
        **{
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
        },
        "cascading_smprt": Curve(
            "Cascading randomization, denoised maps (sMPRT)",
            "re-initialized up to layer (from the output)",
            "similarity of the denoised maps with the original",
        ),
    }
    params = {
        # the measure that decides: mprt (similarity, Adebayo et al.), smprt (the similarity of
        # denoised maps) or emprt (entropy ratio, higher is better), Hedström et al. 2023
        "variant": "mprt",
        # measures reported beside the verdict: cheap (MPRT and eMPRT, from maps computed
        # anyway) or all (sMPRT too: smprt_samples - 1 map computations per model compared)
        "alternatives": "cheap",
        "metric": "spearman_abs",  # similarity of mprt and smprt: spearman_abs, spearman, ssim or hog
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
        "smprt_samples": 50,  # sMPRT: noisy copies per map, the last noise-free (Quantus' default)
        "smprt_noise": 0.1,  # sMPRT: noise σ as a fraction of the image's value range (Quantus)
        "emprt_bins": 100,  # eMPRT: equal-width histogram bins (Quantus' and the paper's n = 100)
    }

    def __init__(
        self, params: dict[str, Any] | None = None, thresholds: dict[str, float | None] | None = None
    ):
        super().__init__(params, thresholds)
        for key, choices in (
            ("variant", MEASURES),
            ("alternatives", ALTERNATIVES),
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
        validate.integer(
            "randomization.smprt_samples", self.p["smprt_samples"], min=1, hint="1: no noise (plain MPRT)"
        )
        validate.number(
            "randomization.smprt_noise", self.p["smprt_noise"], min=0, hint="0.1: Quantus' default"
        )
        validate.integer("randomization.emprt_bins", self.p["emprt_bins"], min=2, hint="100: the paper's")
        variant = self.p["variant"]
        #: thresholds of the similarity measures (MPRT, sMPRT) and of eMPRT's entropy ratio:
        #: the user's thresholds apply to the selected measure
        self.sim_t = dict(self.t) if variant != "emprt" else dict(type(self).thresholds)
        self.emprt_t = (
            {**EMPRT_THRESHOLDS, **(thresholds or {})} if variant == "emprt" else dict(EMPRT_THRESHOLDS)
        )
        if variant == "emprt":
            self.t = dict(self.emprt_t)
            self.higher_is_better = True
            self.value_range = None
        self.metric = metric_text(self.p)
        self._models: RandomizedModels | None = None
        self._step_modules: dict[str, list[str]] = {}
        self._figures: dict[Variant, dict[str, Any]] = {}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The registry's description plus ``measures``: what each ``variant`` measures and
        its default thresholds."""
        info = super().describe()
        info["measures"] = {
            k: {
                "title": MEASURE_SHORT[k],
                "text": MEASURE_TEXT[k],
                "thresholds": dict(EMPRT_THRESHOLDS if k == "emprt" else cls.thresholds),
                "higher_is_better": k == "emprt",
            }
            for k in MEASURES
        }
        return info

    def info(self) -> dict[str, Any]:
        """As configured: eMPRT turns the direction (higher is better) and drops the range."""
        out = super().info()
        out["higher_is_better"] = bool(self.higher_is_better)
        out["value_range"] = list(self.value_range) if self.value_range else None
        return out

    def computes_smprt(self) -> bool:
        """sMPRT is measured: selected, or asked for beside the verdict."""
        return self.p["variant"] == "smprt" or self.p["alternatives"] == "all"

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
        compared with the original by every measure; with sMPRT, ``smprt_samples − 1`` more
        map computations on the trained model and on each randomized model it compares (every
        cascade step for ``verdict = "mean"``, the last for ``final``)."""
        steps = self.steps(ctx.model)
        runs = steps * (2 if self.p["independent"] else 1)
        passes = Passes(maps=runs, compare=runs * ctx.variants * len(METRICS))
        if self.computes_smprt():
            compared = steps if self.p["verdict"] == "mean" else 1
            extra = (compared + 1) * (int(self.p["smprt_samples"]) - 1)
            passes = passes + Passes(maps=extra, compare=compared * ctx.variants)
        return passes

    def steps(self, model: Any) -> int:
        """Randomization steps of ``model`` at the configured granularity."""
        module = getattr(model, "module", model)
        if not isinstance(module, torch.nn.Module):
            return 1
        return max(1, len(group_parameters(module, self.p["granularity"], self.p["max_steps"])))

    def reductions(self) -> list[dict[str, Any]]:
        out = []
        if self.p["alternatives"] == "all" and self.p["variant"] != "smprt":
            out.append(
                {"param": "alternatives", "value": "cheap", "why": "sMPRT not reported beside the verdict"}
            )
        if self.p["independent"]:
            out.append({"param": "independent", "value": False, "why": "cascading randomization only"})
        if self.p["max_steps"] is None or int(self.p["max_steps"]) > 6:
            out.append({"param": "max_steps", "value": 6, "why": "a cascade of at most 6 coarser steps"})
        if self.p["variant"] == "smprt" and int(self.p["smprt_samples"]) > 10:
            out.append({"param": "smprt_samples", "value": 10, "why": "sMPRT denoises over 10 noisy copies"})
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
        metric, mean_verdict = self.p["metric"], self.p["verdict"] == "mean"
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
        alt = Collector(self.p, source, batch, maps, len(steps), self.computes_smprt())
        # a resumed audit continues after the interrupted run's last finished step
        progress = self.progress or Progress()
        key = {
            "images": list(batch.images),
            "variants": [v.label for v in variants],
            "modes": modes,
            "steps": steps,
        }
        done: dict[str, int] = {}
        saved = progress.load(self.name, key)
        if saved is not None:
            done, curves, degenerate, strips = (
                saved["done"],
                saved["curves"],
                saved["degenerate"],
                saved["strips"],
            )
            alt.restore(saved["alt"])
        for mode in modes:
            it = rm.cascade() if mode == "cascading" else rm.independent()
            for k, (_, model) in enumerate(it):
                if k < done.get(mode, 0):
                    continue  # measured before the interruption (the cascade is still applied)
                out = source.maps(model, batch.x, batch.targets)
                for v in variants:
                    step_maps = Maps(out[v])
                    for metric_k in METRICS:
                        vals, deg = similarity(reference[v], step_maps, metric_k)
                        curves[v][f"{mode}_{metric_k}"][:, k] = vals
                        degenerate[v][f"{mode}_{metric_k}"][:, k] = deg
                    if mode == "cascading":
                        for i in examples:
                            strips[v][i].append(small_map(out[v][i], _STRIP_PX))
                if mode == "cascading":
                    alt.step(k, model, out)
                del out
                done[mode] = k + 1
                state = {"done": done, "curves": curves, "degenerate": degenerate, "strips": strips}
                progress.save(self.name, key, {**state, "alt": alt.state()})
        result: dict[Variant, Measurement] = {}
        for v in variants:
            deg_c = degenerate[v][f"cascading_{metric}"]
            curve = curves[v][f"cascading_{metric}"]
            per, conv, more = alt.per_image(v)
            # per image: the value of each measure, and does it rest on a constant map?
            per["mprt"] = curve.mean(1) if mean_verdict else curve[:, -1]
            conv["mprt"] = deg_c.any(1) if mean_verdict else deg_c[:, -1]
            c = {**curves[v], **more}
            extra: dict[str, Any] = {
                "degenerate_final": [bool(d) for d in deg_c[:, -1]],
                "degenerate_verdict": [bool(d) for d in conv[self.p["variant"]]],
                "degenerate_pairs": [int(sum(d[i].sum() for d in degenerate[v].values())) for i in range(n)],
                "emprt_entropy": alt.entropies(v),
                **{f"measure_{name}": [float(x) for x in values] for name, values in per.items()},
                **{f"final_{m}": [float(x) for x in c[f"cascading_{m}"][:, -1]] for m in METRICS},
            }
            figs = {batch.images[i]: {"steps": ["original"] + steps, "maps": strips[v][i]} for i in examples}
            if figs:
                self._figures.setdefault(v, {}).update(figs)
                extra["figures"] = figs
            result[v] = Measurement(
                values=list(extra[f"measure_{self.p['variant']}"]),
                images=list(batch.images),
                curves=c,
                axes={k: list(steps) for k in c},
                extra=extra,
            )
        return result

    @classmethod
    def caveats(cls, cells: list[CheckResult], context: dict[str, Any]) -> list[dict[str, Any]]:
        """``survives_top_randomization`` and ``resembles_edge``
        (:func:`saliaudit.checks.randomization_text.caveats`)."""
        return caveats(cells, context)

    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        self.release()  # judging starts after the last batch: the copies are no longer needed
        metric, chosen = self.p["metric"], self.p["variant"]
        n = len(m.values)
        deg_final = m.extra.pop("degenerate_final", [])
        deg_verdict = m.extra.pop("degenerate_verdict", [])
        deg_pairs = m.extra.pop("degenerate_pairs", [])
        entropies = m.extra.pop("emprt_entropy", [])
        per = {k: m.extra.pop(f"measure_{k}", None) for k in MEASURES}
        finals = {k: m.extra.pop(f"final_{k}", []) for k in METRICS}
        figs = self._figures.get(variant) or m.extra.get("figures")
        if figs:
            m.extra["figures"] = figs
        else:
            m.extra.pop("figures", None)
        steps = m.axes.get(f"cascading_{metric}") or next(iter(m.axes.values()), [])
        series: dict[str, Any] = {
            "steps": list(steps),
            "granularity": self.p["granularity"],
            "reinit": REINIT_TEXT[self.p["reinit"]],
            "verdict_metric": metric,
            "final": {k: (float(np.mean(v)) if v else None) for k, v in finals.items()},
            "degenerate_pairs": int(sum(deg_pairs)),
            "verdict_measure": chosen,
            "higher_is_better": bool(self.higher_is_better),
            "similarity_thresholds": dict(self.sim_t),
        }
        if self._step_modules:
            series["step_modules"] = self._step_modules
        if not n:
            return self.result(variant, m, "skipped", None, "no image was measured", **series)
        measures = measures_series(
            self.p, f"{self.name}/{variant.label}", per, entropies, self.sim_t, self.emprt_t
        )
        series["measures"] = measures
        value = m.mean()
        status = point_status(value, self.t, bool(self.higher_is_better))
        notes = []
        n_deg = int(sum(bool(d) for d in deg_final))
        if chosen == "mprt" and n_deg:
            notes.append(
                f"{n_deg} of {n} map pairs on the fully randomized model had a constant "
                "map (similarity defined: 1 if both constant, 0 if one)"
            )
        if chosen == "mprt" and series["degenerate_pairs"] > n_deg:
            notes.append(f"{series['degenerate_pairs']} constant-map comparisons over all steps and measures")
        if chosen == "emprt" and measures["emprt"]["undefined"]:
            notes.append(
                f"{measures['emprt']['undefined']} of {n} images had a constant map on the trained "
                "model and a varying one after randomization: ratio undefined, left out"
            )
        if status == "error" or value is None:
            msg = "no finite value was measured"
        elif chosen == "emprt":
            msg = emprt_message(status, value, self.t)
        else:
            msg = similarity_message(self.p, self.t, status, value, m.curves)
        if notes:
            msg += "; " + "; ".join(notes)
        cell = self.result(variant, m, status, value, msg, **series)
        cell = self.mark_degenerate(cell, int(sum(bool(d) for d in deg_verdict)), n)
        cell.message += differing_note(cell.status, measures, chosen)
        return cell
