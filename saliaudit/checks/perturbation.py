"""Pixel perturbation: LeRF (Srinivas & Fleuret 2019, §5.1) and MoRF (Samek et al. 2017),
each against a random order.

For removal fractions ``k`` (``fractions``, default 1, 2, 5, 10, 20 % of the pixels) and the
top-1 class ``c`` with output ``f`` (``output``: the logit by default, or the softmax
probability):

* **LeRF** removes the ``k`` least salient pixels and measures the absolute fractional change
  ``|f(x̃) − f(x)| / |f(x)|`` (FullGrad §5.1; lower is better: pixels a map calls
  unimportant should not matter);
* **MoRF** removes the ``k`` most salient pixels and measures the fractional drop
  ``(f(x) − f(x̃)) / |f(x)|`` (Samek et al. 2017's region perturbation, Hooker et al. 2019's
  "most relevant first"; higher is better).

Both are compared with removing the same number of pixels in a random order (``random_orders``
draws per image, seeded by the audit seed and the image name, so every method meets the same
random orders; their curves are averaged). Per image:

* LeRF advantage = mean over k of (random change − map change),
* MoRF advantage = mean over k of (map drop − random drop),

both in units of ``|f(x)|`` (positive = better than random); the per-image value is their
average. Saliency is the map's value as given (:func:`~saliaudit.checks.removal.saliency_ranks`):
for a signed map the most salient pixel is the largest signed value, so LeRF removes the
strongest *negative* evidence first — which changes the output, as FullGrad §6 discusses —
while an abs map ranks by magnitude. Ties are broken by a seeded random permutation.

Verdict: LeRF and MoRF are each "better than random" when the mean advantage exceeds
``min_advantage`` and the exact rank test of :func:`~saliaudit.checks.removal.better_than_random`
(the map's order beats the random orders more often than a random order would; valid for any
number of images) gives p < ``alpha``. PASS if better on both, WARN on one, FAIL on neither.

Removed pixels take each image's mean colour by default (``baseline``: ``mean``; also
``black``, ``zero``, ``blur``). FullGrad §5.1 blackens pixels, but black is far outside the
distribution of most images: on the sample shapes model (textured backgrounds) removing 1 % of
the pixels at random already changes the top logit by ~590 % with black against ~6 % with the
mean colour, so every map "fails" and the curves measure the artefact. Blur keeps low
frequencies, so removal only bites at edges and the ``edge`` control beats random on MoRF
(measured). The per-image mean is in range for any image and preprocessing — the
uninformative fill of Hooker et al.'s ROAR, per image instead of per dataset. When random
removal of the smallest fraction already changes the output by more than 50 %, the message
says the baseline disrupts the model.

Caveat: a spatially smooth map removes contiguous regions while the random order removes
scattered pixels; a contiguous patch of one colour can move the model more than scattered
pixels, which penalizes smooth maps on LeRF. The curves are there to look at.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import validate
from ..cost import CostContext, Passes, rows_per_pass
from ..result import CheckResult
from .base import Batch, Check, Curve, MapSource, Measurement, Variant, register
from .removal import (
    Job,
    check_baseline,
    flag_notes,
    fraction_counts,
    image_keys,
    nonfinite_count,
    order_tests,
    power_note,
    prefix_masks,
    random_ranks,
    removal_baseline,
    run_removals,
    saliency_ranks,
    target_output,
    tie_breaks,
    win_rates,
)

OUTPUTS = ("logit", "probability")
_TINY = 1e-3  # |f(x)| below this makes fractional changes unstable (noted; FLAG_TEXT)
_DISRUPTIVE = 0.5  # random removal of the smallest fraction changing f by more than this: noted


@register
class Perturbation(Check):
    name = "perturbation"
    title = "Pixel perturbation (LeRF and MoRF) against a random order"
    summary = (
        "Removing the pixels a map calls least salient should barely change the top-class "
        "output (LeRF, Srinivas & Fleuret 2019 §5.1), and removing the most salient ones "
        "should lower it (MoRF, Samek et al. 2017). Both must do clearly better than "
        "removing as many pixels in a random order."
    )
    reference = (
        "Srinivas & Fleuret, Full-Gradient Representation for Neural Network "
        "Visualization, NeurIPS 2019, §5.1; Samek et al., Evaluating the Visualization of "
        "What a Deep Neural Network Has Learned, IEEE TNNLS 2017; Hooker et al., A "
        "Benchmark for Interpretability Methods in Deep Neural Networks, NeurIPS 2019"
    )
    metric = "mean advantage over a random order (LeRF and MoRF averaged, in units of |f(x)|)"
    thresholds = {"min_advantage": 0.0, "alpha": 0.05}
    controls_must_fail = frozenset({"random"})
    short = "pert"
    higher_is_better = True  # an advantage over a random order
    order = 40
    curves = {
        "lerf": Curve(
            "LeRF: least salient removed first (lower is better)",
            "fraction of pixels removed",
            "|fractional change| of the output",
            primary=True,
            baseline="lerf_random",
        ),
        "morf": Curve(
            "MoRF: most salient removed first (higher is better)",
            "fraction of pixels removed",
            "drop of the output",
            primary=True,
            baseline="morf_random",
        ),
        "lerf_random": Curve(
            "LeRF, random order", "fraction of pixels removed", "|fractional change| of the output"
        ),
        "morf_random": Curve("MoRF, random order", "fraction of pixels removed", "drop of the output"),
    }
    params = {
        "fractions": [0.01, 0.02, 0.05, 0.1, 0.2],  # share of the pixels removed
        "output": "logit",  # or "probability" (softmax of the top class)
        "baseline": "mean",  # per-image mean colour; or black (FullGrad §5.1), zero, blur
        "blur_sigma": 5.0,  # σ in pixels of the blur baseline
        "random_orders": 3,  # random orders per image, averaged
        "chunk": None,  # rows per pass (None: from the model's activation memory)
        "max_images": None,
    }

    def __init__(
        self, params: dict[str, Any] | None = None, thresholds: dict[str, float | None] | None = None
    ):
        super().__init__(params, thresholds)
        self.fractions = validate.fractions("perturbation.fractions", self.p["fractions"])
        validate.choice("perturbation.output", self.p["output"], OUTPUTS)
        check_baseline(self.p)
        validate.integer("perturbation.random_orders", self.p["random_orders"], min=1)
        validate.rows("perturbation.chunk", self.p["chunk"])
        self._random: dict[tuple[Any, ...], np.ndarray] = {}  # image key -> (R, K) outputs

    # ----------------------------------------------------------------------------------------
    def _columns(self, target: int) -> list[int] | None:
        return None if self.p["output"] == "probability" else [target]

    def _outputs(self, logits: torch.Tensor, target: int) -> torch.Tensor:
        """The tracked output of each row of a job's result (see :meth:`_columns`)."""
        if self.p["output"] == "probability":
            t = torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
            return target_output(logits, t, "probability")
        return logits[:, 0].to(torch.float64)

    def _random_outputs(self, batch: Batch, base: torch.Tensor, counts: list[int]) -> np.ndarray:
        """``(B, R, K)`` outputs under the random orders (map-independent: cached per image)."""
        hw = batch.x.shape[2] * batch.x.shape[3]
        draws = int(self.p["random_orders"])
        keys = image_keys(batch.model, batch.x, batch.images)
        todo = [i for i, k in enumerate(keys) if k not in self._random]
        jobs = []
        for i in todo:
            ranks = random_ranks(batch.seed, batch.images[i], hw, draws)
            jobs.append(
                Job(
                    i,
                    (lambda r=ranks: torch.cat([prefix_masks(rk, counts) for rk in r])),
                    self._columns(int(batch.targets[i])),
                )
            )
        outs = run_removals(batch.model, batch.x, base, jobs, chunk=rows_per_pass(self.p["chunk"], "forward"))
        for i, out in zip(todo, outs):
            vals = self._outputs(out, int(batch.targets[i])).cpu().numpy()
            self._random[keys[i]] = vals.reshape(draws, len(counts))
        return np.stack([self._random[k] for k in keys])

    def cost(self, ctx: CostContext) -> Passes:
        """LeRF and MoRF removal at every fraction for every variant (forward rows)."""
        return Passes(forward=ctx.variants * 2 * len(self.fractions))

    def shared_cost(self, ctx: CostContext) -> Passes:
        """The random removal orders at every fraction, once per image."""
        return Passes(forward=int(self.p["random_orders"]) * len(self.fractions))

    def reductions(self) -> list[dict[str, Any]]:
        if len(self.fractions) <= 3:
            return []
        keep = [self.fractions[0], self.fractions[len(self.fractions) // 2], self.fractions[-1]]
        return [{"param": "fractions", "value": keep, "why": "three removal fractions"}]

    def measure(
        self, batch: Batch, source: MapSource, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        x = batch.x
        b, _, h, w = x.shape
        if b == 0:
            return {v: Measurement() for v in maps}
        hw = h * w
        counts = fraction_counts(self.fractions, hw)
        n_k = len(counts)
        base = removal_baseline(batch.model, x, self.p["baseline"], sigma=self.p["blur_sigma"])
        f0 = target_output(batch.logits, batch.targets, self.p["output"]).cpu().numpy()
        rand = self._random_outputs(batch, base, counts)  # (B, R, K)
        ties = tie_breaks(batch.seed, batch.images, hw, x.device)

        variants = list(maps)
        jobs = []
        for v in variants:
            ranks = saliency_ranks(maps[v], ties)
            for i in range(b):
                jobs.append(
                    Job(
                        i,
                        (
                            lambda r=ranks[i]: torch.cat(
                                [prefix_masks(r, counts, least=True), prefix_masks(r, counts)]
                            )
                        ),
                        self._columns(int(batch.targets[i])),
                    )
                )
        outs = run_removals(batch.model, x, base, jobs, chunk=rows_per_pass(self.p["chunk"], "forward"))

        denom = np.maximum(np.abs(f0), 1e-12)[:, None]
        with np.errstate(all="ignore"):
            rand_change_d = np.abs(rand - f0[:, None, None]) / denom[:, None]  # (B, R, K)
            rand_drop_d = (f0[:, None, None] - rand) / denom[:, None]
            rand_change, rand_drop = rand_change_d.mean(1), rand_drop_d.mean(1)  # (B, K)
        tiny = int((np.abs(f0) < _TINY).sum())
        result: dict[Variant, Measurement] = {}
        for vi, v in enumerate(variants):
            vals = (
                torch.stack([self._outputs(outs[vi * b + i], int(batch.targets[i])) for i in range(b)])
                .cpu()
                .numpy()
            )
            lerf_out, morf_out = vals[:, :n_k], vals[:, n_k:]
            with np.errstate(all="ignore"):
                lerf = np.abs(lerf_out - f0[:, None]) / denom
                morf = (f0[:, None] - morf_out) / denom
                lerf_adv = _finite((rand_change - lerf).mean(1))
                morf_adv = _finite((morf - rand_drop).mean(1))
                # scores, higher = better, for the win rate against each random order
                lerf_win = win_rates(-lerf.mean(1), -rand_change_d.mean(2))
                morf_win = win_rates(morf.mean(1), rand_drop_d.mean(2))
            flags = (
                ["tiny_output"] * tiny
                + ["nonfinite_map"] * nonfinite_count(maps[v])
                + ["nonfinite_output"] * int((~np.isfinite(lerf_adv) | ~np.isfinite(morf_adv)).sum())
            )
            result[v] = Measurement(
                values=[float(v_) for v_ in (lerf_adv + morf_adv) / 2],
                images=list(batch.images),
                curves={"lerf": lerf, "lerf_random": rand_change, "morf": morf, "morf_random": rand_drop},
                axes={k: list(self.fractions) for k in ("lerf", "lerf_random", "morf", "morf_random")},
                extra={
                    "lerf_advantage": [float(a) for a in lerf_adv],
                    "morf_advantage": [float(a) for a in morf_adv],
                    "lerf_win_rate": [float(a) for a in lerf_win],
                    "morf_win_rate": [float(a) for a in morf_win],
                    "baseline": self.p["baseline"],
                    "output": self.p["output"],
                    "flags": flags,
                },
            )
        return result

    # ----------------------------------------------------------------------------------------
    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        if not m.values:
            flag_notes(m)
            return self.result(variant, m, "skipped", None, "no image was measured")
        tests = order_tests(m, self.t, self.p["random_orders"])
        lerf, morf = tests["lerf"], tests["morf"]
        m.extra["lerf_test"], m.extra["morf_test"] = lerf, morf
        flag_notes(m)
        note = power_note(lerf)
        if note and note not in m.notes:
            m.notes.append(note)
        if lerf["mean"] is None or morf["mean"] is None:
            return self.result(
                variant,
                m,
                "error",
                None,
                "no finite measurement: the model output was not finite after removing pixels" + _notes(m),
            )
        wins = int(lerf["better"]) + int(morf["better"])
        status = {2: "pass", 1: "warn", 0: "fail"}[wins]
        cur = {k: float(np.nanmean(m.curves[k])) for k in ("lerf", "lerf_random", "morf", "morf_random")}
        out = "logit" if self.p["output"] == "logit" else "probability"
        first = float(np.nanmean(m.curves["lerf_random"][:, 0]))
        if np.isfinite(first) and first > _DISRUPTIVE:
            note = (
                f"removing {_pct(self.fractions[0])} of the pixels at random already changes "
                f"the output by {_pct(first)}: the {self.p['baseline']} baseline itself "
                "disrupts the model (out-of-distribution pixels), so the curves measure "
                "that more than the map; consider another baseline"
            )
            if note not in m.notes:
                m.notes.append(note)
        verdict = {
            2: "better than a random order on both",
            1: "better than a random order on " + ("LeRF only" if lerf["better"] else "MoRF only"),
            0: "no better than a random order on LeRF or MoRF",
        }[wins]
        msg = (
            f"{verdict} ({lerf['n']} images, {self.p['baseline']} removal, top-class {out}). "
            f"LeRF |change| {_pct(cur['lerf'])} vs random {_pct(cur['lerf_random'])}, "
            f"advantage {lerf['mean']:+.3g}{_p(lerf)}; "
            f"MoRF drop {_pct(cur['morf'])} vs random {_pct(cur['morf_random'])}, "
            f"advantage {morf['mean']:+.3g}{_p(morf)}" + _notes(m)
        )
        return self.result(variant, m, status, m.mean(), msg)


def _finite(a: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(a), a, np.nan)


def _pct(v: float) -> str:
    return f"{100 * v:.3g}%" if np.isfinite(v) else "n/a"


def _p(test: dict[str, Any]) -> str:
    return f", beats {100 * test['win_rate']:.0f}% of random orders (p={test['p_value']:.2g})"


def _notes(m: Measurement) -> str:
    return ("; " + "; ".join(m.notes)) if m.notes else ""
