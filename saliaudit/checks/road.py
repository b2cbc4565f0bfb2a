"""ROAD: Remove And Debias (Rong et al., ICML 2022): MoRF and LeRF with noisy linear
imputation, each against a random order.

Removing pixels to a constant leaks the removal mask: the model can see *where* pixels were
removed, and its output then says more about the shape of the mask than about the pixels'
importance (Rong et al. §3 show that the mask alone lets a classifier recover the class).
ROAD fills removed pixels instead by noisy linear imputation
(:mod:`~saliaudit.checks.imputation`): each removed pixel is the weighted mean of its 8
neighbours, solved jointly, plus Gaussian noise of standard deviation ``noise`` (default 0.01
as in the reference), in the model's input space (the normalized tensor, as
pytorch-grad-cam's ``ROADMostRelevantFirst`` takes it).

For removal fractions ``k`` (``fractions``, default 10 %, 20 %, …, 90 % of the pixels, the
reference's) and the top-1 class ``c`` with output ``f`` (``output``: the logit by default, or
the softmax probability), the check measures the change ``Δ(k) = f(x̃) − f(x)``, as
pytorch-grad-cam's ``PerturbationConfidenceMetric`` returns it:

* **MoRF** removes the ``k`` most salient pixels: the output should drop (lower Δ is better);
* **LeRF** removes the ``k`` least salient pixels: it should barely change (higher Δ is
  better).

Both are compared with removing as many pixels in ``random_orders`` random orders per image,
imputed the same way (seeded by the audit seed and the image name, shared by every method and
cached per image; random removal is the same from either end, so one set serves both). Per
image, MoRF advantage = mean over k of (random Δ − MoRF Δ) and LeRF advantage = mean over k of
(LeRF Δ − random Δ), in units of the output. The per-image value is their average, which is
exactly the ROAD score of the reference's ``ROADCombined``, ``mean_k (Δ_LeRF − Δ_MoRF) / 2``
(the random terms cancel).

Removal semantics: ``round(k · H·W)`` pixels (at most H·W − 1: a mask that keeps nothing has
no imputation), ranked by the map's value as given (:func:`~saliaudit.checks.removal.
saliency_ranks`; ties broken by a seeded permutation). pytorch-grad-cam's ``percentile=p``
instead *keeps* the pixels below the p-th percentile (MoRF) or above the (100 − p)-th (LeRF):
its percentile ``p`` is our fraction ``1 − p/100``, up to how ``np.percentile`` interpolates;
over 10 … 90 % the two averages cover the same fractions.

Noise: one field ``noise · N(0, 1)`` per image and fraction (seeded by the audit seed and the
image name), added to whatever that fraction removes, whichever order removed it: every
method and the random orders meet the same noise, so comparisons between them are not blurred
by it, and the numbers do not depend on the batch composition.

Verdict: MoRF and LeRF are each "better than random" when the mean advantage exceeds
``min_advantage`` and the exact rank test of :func:`~saliaudit.checks.removal.better_than_random`
(the map beats the random orders more often than a random order would) gives p < ``alpha``.
PASS if better on both, WARN on one, FAIL on neither; the message gives each advantage with
n and its 95 % interval.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from .. import validate
from ..cost import CostContext, Passes, rows_per_pass
from ..result import CheckResult
from .base import Batch, Check, Curve, MapSource, Measurement, Variant, register
from .imputation import run_imputed
from .removal import (
    Job,
    flag_notes,
    fraction_counts,
    image_generator,
    image_keys,
    nonfinite_count,
    order_tests,
    power_note,
    prefix_masks,
    random_ranks,
    saliency_ranks,
    target_output,
    tie_breaks,
    win_rates,
)

OUTPUTS = ("logit", "probability")


@register
class Road(Check):
    name = "road"
    title = "ROAD: MoRF and LeRF with noisy linear imputation, against a random order"
    summary = (
        "Removing the most salient pixels should lower the top-class output (MoRF) and removing "
        "the least salient ones should barely change it (LeRF), with removed pixels filled by "
        "noisy linear imputation from their neighbours so that the removal mask leaks little "
        "(ROAD, Rong et al. 2022). Both must do clearly better than a random order imputed the "
        "same way."
    )
    reference = (
        "Rong, Leemann, Borisov, Kasneci & Kasneci, A Consistent and Efficient Evaluation "
        "Strategy for Attribution Methods, ICML 2022"
    )
    metric = "ROAD score, mean over fractions of (LeRF change − MoRF change) / 2, in units of the output"
    thresholds = {"min_advantage": 0.0, "alpha": 0.05}
    controls_must_fail = frozenset({"random"})
    short = "road"
    higher_is_better = True
    order = 45
    imputes = True  # the plan times the imputation (Passes.impute)
    curves = {
        "morf": Curve(
            "ROAD MoRF: most salient removed first (lower is better)",
            "fraction of pixels removed",
            "change of the output",
            primary=True,
            baseline="random",
        ),
        "lerf": Curve(
            "ROAD LeRF: least salient removed first (higher is better)",
            "fraction of pixels removed",
            "change of the output",
            primary=True,
            baseline="random",
        ),
        "random": Curve("ROAD, random order", "fraction of pixels removed", "change of the output"),
    }
    params = {
        "fractions": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],  # share of the pixels removed
        "output": "logit",  # or "probability" (softmax of the top class)
        "noise": 0.01,  # std of the imputation noise, in the model's input space
        "random_orders": 3,  # random orders per image
        "chunk": None,  # rows per pass (None: from the model's activation memory)
        "max_images": 16,  # a class-stratified sample: the imputation is costly on a CPU
    }

    def __init__(
        self, params: dict[str, Any] | None = None, thresholds: dict[str, float | None] | None = None
    ):
        super().__init__(params, thresholds)
        self.fractions = validate.fractions("road.fractions", self.p["fractions"])
        if self.fractions[-1] >= 1:
            raise validate.InvalidValue(
                "road.fractions",
                self.p["fractions"],
                "fractions in (0, 1)",
                "removing every pixel leaves the imputation nothing to start from",
            )
        validate.choice("road.output", self.p["output"], OUTPUTS)
        validate.number("road.noise", self.p["noise"], min=0)
        validate.integer("road.random_orders", self.p["random_orders"], min=1)
        validate.rows("road.chunk", self.p["chunk"])
        self._random: dict[tuple[Any, ...], np.ndarray] = {}  # image key -> (R, K) outputs

    # ----------------------------------------------------------------------------------------
    def cost(self, ctx: CostContext) -> Passes:
        """MoRF and LeRF at every fraction for every variant: one imputed image and one
        forward row each."""
        rows = ctx.variants * 2 * len(self.fractions)
        return Passes(forward=rows, impute=rows)

    def shared_cost(self, ctx: CostContext) -> Passes:
        """The random orders at every fraction, once per image."""
        rows = int(self.p["random_orders"]) * len(self.fractions)
        return Passes(forward=rows, impute=rows)

    def reductions(self) -> list[dict[str, Any]]:
        f = self.fractions
        out = []
        if len(f) > 5:
            out.append({"param": "fractions", "value": f[::2], "why": f"{len(f[::2])} removal fractions"})
        if len(f) > 3:
            out.append(
                {
                    "param": "fractions",
                    "value": [f[0], f[len(f) // 2], f[-1]],
                    "why": "three removal fractions",
                }
            )
        return out

    # ----------------------------------------------------------------------------------------
    def _counts(self, hw: int) -> list[int]:
        return [min(c, hw - 1) for c in fraction_counts(self.fractions, hw)]

    def _noise(self, batch: Batch, i: int) -> torch.Tensor | None:
        """``(K, C, H, W)`` noise of image ``i``: one field per fraction, seeded by the image."""
        sigma = float(self.p["noise"])
        if sigma == 0:
            return None
        _, c, h, w = batch.x.shape
        gen = image_generator(batch.seed, batch.images[i], "road-noise", c, h, w)
        return sigma * torch.randn((len(self.fractions), c, h, w), generator=gen)

    def _columns(self, target: int) -> list[int] | None:
        return None if self.p["output"] == "probability" else [target]

    def _outputs(self, logits: torch.Tensor, target: int) -> torch.Tensor:
        if self.p["output"] == "probability":
            t = torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
            return target_output(logits, t, "probability")
        return logits[:, 0].to(torch.float64)

    def _run(self, batch: Batch, jobs: list[Job]) -> list[torch.Tensor]:
        return run_imputed(
            batch.model,
            batch.x,
            jobs,
            lambda i: self._noise(batch, i),
            len(self.fractions),
            chunk=rows_per_pass(self.p["chunk"], "forward"),
        )

    def _random_outputs(self, batch: Batch, counts: list[int]) -> np.ndarray:
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
        for i, out in zip(todo, self._run(batch, jobs)):
            vals = self._outputs(out, int(batch.targets[i])).cpu().numpy()
            self._random[keys[i]] = vals.reshape(draws, len(counts))
        return np.stack([self._random[k] for k in keys])

    def measure(
        self, batch: Batch, source: MapSource, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        x = batch.x
        b, _, h, w = x.shape
        if b == 0:
            return {v: Measurement() for v in maps}
        hw = h * w
        counts = self._counts(hw)
        k = len(counts)
        f0 = target_output(batch.logits, batch.targets, self.p["output"]).cpu().numpy()
        rand = self._random_outputs(batch, counts) - f0[:, None, None]  # (B, R, K) changes
        rand_mean = rand.mean(1)
        ties = tie_breaks(batch.seed, batch.images, hw, x.device)
        variants = list(maps)
        jobs = []
        for v in variants:
            ranks = saliency_ranks(maps[v], ties)
            for i in range(b):
                both = partial(_both_ends, ranks[i], counts)
                jobs.append(Job(i, both, self._columns(int(batch.targets[i]))))
        outs = self._run(batch, jobs)

        result: dict[Variant, Measurement] = {}
        for vi, v in enumerate(variants):
            vals = torch.stack([self._outputs(outs[vi * b + i], int(batch.targets[i])) for i in range(b)])
            vals = vals.cpu().numpy() - f0[:, None]
            lerf, morf = vals[:, :k], vals[:, k:]
            with np.errstate(all="ignore"):
                lerf_adv = _finite((lerf - rand_mean).mean(1))
                morf_adv = _finite((rand_mean - morf).mean(1))
                lerf_win = win_rates(lerf.mean(1), rand.mean(2))
                morf_win = win_rates(-morf.mean(1), -rand.mean(2))
            flags = ["nonfinite_map"] * nonfinite_count(maps[v]) + ["nonfinite_output"] * int(
                (~np.isfinite(lerf_adv) | ~np.isfinite(morf_adv)).sum()
            )
            result[v] = Measurement(
                values=[float(a) for a in (lerf_adv + morf_adv) / 2],
                images=list(batch.images),
                curves={"morf": morf, "lerf": lerf, "random": rand_mean},
                axes={c: list(self.fractions) for c in ("morf", "lerf", "random")},
                extra={
                    "morf_advantage": [float(a) for a in morf_adv],
                    "lerf_advantage": [float(a) for a in lerf_adv],
                    "morf_win_rate": [float(a) for a in morf_win],
                    "lerf_win_rate": [float(a) for a in lerf_win],
                    "output": self.p["output"],
                    "noise": float(self.p["noise"]),
                    "flags": flags,
                },
            )
        return result

    # ----------------------------------------------------------------------------------------
    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        if not m.values:
            flag_notes(m)
            return self.result(variant, m, "skipped", None, "no image was measured")
        tests = order_tests(m, self.t, self.p["random_orders"], ("morf", "lerf"))
        for part, test in tests.items():
            test["ci"] = _interval(m.extra.get(f"{part}_advantage", []), f"{variant.label}/{part}")
            m.extra[f"{part}_test"] = test
        flag_notes(m)
        note = power_note(tests["morf"])
        if note and note not in m.notes:
            m.notes.append(note)
        morf, lerf = tests["morf"], tests["lerf"]
        if morf["mean"] is None or lerf["mean"] is None:
            return self.result(
                variant,
                m,
                "error",
                None,
                "no finite measurement: the model output was not finite after imputation" + _notes(m),
            )
        wins = int(morf["better"]) + int(lerf["better"])
        status = {2: "pass", 1: "warn", 0: "fail"}[wins]
        verdict = {
            2: "better than a random order on both MoRF and LeRF",
            1: "better than a random order on " + ("MoRF only" if morf["better"] else "LeRF only"),
            0: "no better than a random order on MoRF or LeRF",
        }[wins]
        cur = {c: float(np.nanmean(m.curves[c])) for c in ("morf", "lerf", "random")}
        out = "logit" if self.p["output"] == "logit" else "probability"
        rule = (
            f"each counts as better when its mean advantage is above {tests['morf']['min_advantage']:g} and "
            f"the map beats the random orders more often than chance (exact rank test, p < {tests['morf']['alpha']:g})"
        )
        msg = (
            f"{verdict} ({morf['n']} images, noisy linear imputation σ={float(self.p['noise']):g}, "
            f"top-class {out}). MoRF change {cur['morf']:+.3g} vs random {cur['random']:+.3g}: "
            f"advantage {_adv(morf)}; LeRF change {cur['lerf']:+.3g} vs random: advantage "
            f"{_adv(lerf)}; {rule}" + _notes(m)
        )
        return self.result(variant, m, status, m.mean(), msg)


def _both_ends(ranks: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The LeRF masks at every count, then the MoRF masks."""
    return torch.cat([prefix_masks(ranks, counts, least=True), prefix_masks(ranks, counts)])


def _interval(values: Sequence[float], label: str) -> list[float] | None:
    """The 95 % BCa bootstrap interval of the mean of the finite ``values`` (seeded)."""
    from .. import stats

    iv = stats.mean_interval(list(values), seed=zlib.crc32(f"road/{label}".encode()))
    return None if iv is None else [iv.lo, iv.hi]


def _adv(test: dict[str, Any]) -> str:
    ci = test.get("ci")
    ci_text = f" [95 % CI {ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else ""
    return (
        f"{test['mean']:+.3g}{ci_text}, beats {100 * test['win_rate']:.0f}% of random orders "
        f"(p={test['p_value']:.2g})"
    )


def _finite(a: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(a), a, np.nan)


def _notes(m: Measurement) -> str:
    return ("; " + "; ".join(m.notes)) if m.notes else ""
