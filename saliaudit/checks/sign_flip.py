"""Sign flip: DeepLIFT's digit flipping (Shrikumar et al. 2017, §4.2), generalized.

For an image predicted as class ``c`` and a contrast class ``c′`` — the runner-up by default,
or configured pairs (``pairs``, ``--flip 8:3``: only images predicted as 8, contrast 3;
classes by index or by name) — the map of the difference ``D = map_c − map_c′`` says which
pixels are evidence for ``c`` *rather than* ``c′``. Removing the top ``k`` of ``D``
(``fractions``, up to 20 % as DeepLIFT's 157 of 784 MNIST pixels) should move the model
towards ``c′``: the change in log-odds

    Δ(k) = [logit_c′(x̃) − logit_c(x̃)] − [logit_c′(x) − logit_c(x)]

should be large (higher is better). As in :mod:`~saliaudit.checks.perturbation`, the map's
order is compared with removing as many pixels in ``random_orders`` random orders (seeded by
the audit seed and the image name: the same for every method); the per-image value is the
mean over k of ``Δ_map − mean Δ_random`` (in logits).

The test is sign-sensitive by construction: an abs map ranks "evidence against c′" and
"evidence for c′" alike, so FullGrad §6 expects ψ that keep the sign to do better here and abs
ψ better on pixel perturbation — the per-variant cells put those numbers side by side.

Verdict: "better than random" = the mean advantage exceeds ``min_advantage`` and the exact
rank test of :func:`~saliaudit.checks.removal.better_than_random` (the map's order beats the
random orders more often than a random order would) gives p < ``alpha``. FAIL when not better;
WARN when better but the map beats fewer than ``warn_win_rate`` (75 %) of the random orders
(better on average, inconsistent across images); PASS otherwise. A control whose map does not
depend on the class (``random``, ``edge``) has ``D = 0``: no pixel is evidence for ``c`` over
``c′``, nothing is removed, and it fails. (``edge_signed`` flips sign with the class, so
``D = 2E > 0``: it is a reference here, not a must-fail control.)

As DeepLIFT defines it, only pixels where ``D > 0`` are removed (up to each fraction's
budget; the random orders remove as many pixels), so a map with no evidence for ``c`` over
``c′`` removes nothing. Removed pixels take the method's own reference where it has one that
removal supports (black for DeepLIFT and for integrated gradients from a black baseline, the
model input's zero for gradient × input and ε-LRP: DeepLIFT erased MNIST pixels to its black
reference) and each image's mean colour otherwise (black disrupts models trained on textured
images). The other value (black for mean, mean otherwise) is measured too: the cell reports
its verdict, and a ``baseline_dependent`` caveat names the cells whose verdict changes with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import validate
from ..cost import CostContext, Passes, rows_per_pass
from ..errors import UsageError
from ..result import CheckResult
from .base import Batch, Check, Curve, MapSource, Measurement, Variant, register
from .removal import (
    REMOVAL_BASELINES,
    Job,
    better_than_random,
    check_baseline,
    flag_notes,
    fraction_counts,
    image_keys,
    nonfinite_count,
    power_note,
    prefix_masks,
    random_ranks,
    removal_baseline,
    run_removals,
    saliency_ranks,
    tie_breaks,
    win_rates,
)


@register
class SignFlip(Check):
    name = "sign_flip"
    title = "Sign flip: removing the evidence for c rather than c′"
    summary = (
        "Removing the pixels where map_c − map_c′ is largest should push the model from its "
        "predicted class c towards a contrast class c′ more than removing as many random pixels "
        "(DeepLIFT's digit flipping, Shrikumar et al. 2017 §4.2). Maps that discard the sign "
        "are expected to do worse here than on pixel perturbation (Srinivas & Fleuret 2019 §6)."
    )
    reference = (
        "Shrikumar, Greenside & Kundaje, Learning Important Features Through Propagating "
        "Activation Differences, ICML 2017, §4.2; Srinivas & Fleuret, Full-Gradient "
        "Representation for Neural Network Visualization, NeurIPS 2019, §6"
    )
    metric = "mean advantage over a random order of the log-odds change towards c′ (logits)"
    thresholds = {"min_advantage": 0.0, "alpha": 0.05, "warn_win_rate": 0.75}
    controls_must_fail = frozenset({"random", "edge"})
    short = "sign"
    higher_is_better = True  # an advantage over a random order
    order = 60
    curves = {
        "flip": Curve(
            "Sign flip: log-odds change towards the contrast class (higher is better)",
            "fraction of pixels removed",
            "change in log-odds",
            primary=True,
            baseline="flip_random",
        ),
        "flip_random": Curve("Sign flip, random order", "fraction of pixels removed", "change in log-odds"),
    }
    params = {
        "pairs": None,  # None: runner-up; or [[c, c′], ...] / "8:3,cat:dog" (indices or names)
        "fractions": [0.01, 0.02, 0.05, 0.1, 0.2],  # share of the pixels removed
        # auto: the method's own reference (black for DeepLIFT and IG from black, zero for
        # gradient × input and ε-LRP), else the per-image mean colour; or black, zero, mean, blur
        "baseline": "auto",
        "other_baseline": "auto",  # measured too (black for mean, mean otherwise); none: skip
        "blur_sigma": 5.0,
        "random_orders": 3,
        "chunk": None,  # rows per pass (None: from the model's activation memory)
        "max_images": None,
    }

    def __init__(
        self, params: dict[str, Any] | None = None, thresholds: dict[str, float | None] | None = None
    ):
        super().__init__(params, thresholds)
        self.fractions = validate.fractions("sign_flip.fractions", self.p["fractions"])
        for key in ("baseline", "other_baseline"):
            value = self.p[key]
            if value not in ("auto", None, "none"):
                check_baseline({"baseline": value, "blur_sigma": self.p["blur_sigma"]})
        validate.integer("sign_flip.random_orders", self.p["random_orders"], min=1)
        validate.rows("sign_flip.chunk", self.p["chunk"])
        self.raw_pairs = _parse_pairs(self.p["pairs"])
        self._pairs: list[tuple[int, int]] | None = None
        self._pair_notes: list[str] = []
        self._random: dict[tuple[Any, ...], np.ndarray] = {}

    # ----------------------------------------------------------------------------------------
    def pairs(self, model: Any) -> list[tuple[int, int]] | None:
        """The configured pairs as class indices (``None``: runner-up contrast)."""
        if self.raw_pairs is None:
            return None
        if self._pairs is None:
            names = list(getattr(model, "class_names", []) or [])
            k = int(getattr(model, "num_classes", len(names)))
            self._pairs = [
                (_resolve(a, names, k, self._pair_notes), _resolve(b, names, k, self._pair_notes))
                for a, b in self.raw_pairs
            ]
            for a, b in self._pairs:
                if a == b:
                    raise UsageError(
                        f"sign_flip pair {a}:{b} names the same class twice",
                        hint="give two different classes, e.g. --flip 8:3",
                    )
        return self._pairs

    def _rows(self, batch: Batch) -> tuple[list[int], list[int], list[int], list[str]]:
        """Measured rows: image position, class c, contrast c′, row name."""
        pairs = self.pairs(batch.model)
        pred = [int(t) for t in batch.targets.tolist()]
        idx, cs, cps, names = [], [], [], []
        if pairs is None:
            if batch.logits.shape[1] < 2:
                raise UsageError("sign_flip needs at least two classes")
            runner = batch.logits.topk(2, dim=1).indices[:, 1].tolist()
            return list(range(len(pred))), pred, [int(r) for r in runner], list(batch.images)
        for i, c in enumerate(pred):
            matching = [cp for a, cp in pairs if a == c]
            for cp in matching:  # one row per pair; the name says which when there are several
                idx.append(i)
                cs.append(c)
                cps.append(cp)
                names.append(batch.images[i] if len(matching) == 1 else f"{batch.images[i]} [{c}→{cp}]")
        return idx, cs, cps, names

    def baselines(self, source: MapSource) -> tuple[str, str | None]:
        """``(primary, other)`` removal values for ``source``'s method. ``auto``: the method's
        own reference where it has one that removal supports (black for DeepLIFT and
        integrated gradients from a black baseline, zero for gradient × input and ε-LRP), the
        image mean otherwise (DeepLIFT's digit flipping erased pixels to its reference);
        the other baseline is black for mean and mean for any other."""
        primary = self.p["baseline"]
        if primary == "auto":
            primary = "mean"
            from ..methods import METHODS

            method = METHODS.get(source.method)
            if method is not None and method.reference_input is not None:
                ref = str(getattr(source, "params", {}).get("baseline", "zero"))
                primary = ref if ref in REMOVAL_BASELINES else "mean"
        other = self.p["other_baseline"]
        if other == "auto":
            other = "black" if primary == "mean" else "mean"
        return primary, (None if other in (None, "none", primary) else other)

    def _random_delta(
        self,
        batch: Batch,
        base: torch.Tensor,
        counts: np.ndarray,
        idx: list[int],
        cs: list[int],
        cps: list[int],
        kind: str,
    ) -> np.ndarray:
        """``(rows, R, K)`` log-odds changes when as many pixels as the map removes (per row
        and fraction: ``counts``) are removed in the seeded random orders (cached)."""
        hw = batch.x.shape[2] * batch.x.shape[3]
        draws = int(self.p["random_orders"])
        keys = image_keys(batch.model, batch.x, batch.images)
        rkeys = [
            (keys[i], c, cp, kind, tuple(int(v) for v in counts[r]))
            for r, (i, c, cp) in enumerate(zip(idx, cs, cps))
        ]
        todo = [r for r, k in enumerate(rkeys) if k not in self._random]
        jobs = [
            Job(
                idx[r],
                (
                    lambda r=r: torch.cat(
                        [
                            prefix_masks(rk, [int(v) for v in counts[r]])
                            for rk in random_ranks(batch.seed, batch.images[idx[r]], hw, draws)
                        ]
                    )
                ),
                [cs[r], cps[r]],
            )
            for r in todo
        ]
        outs = run_removals(batch.model, batch.x, base, jobs, chunk=rows_per_pass(self.p["chunk"], "forward"))
        for r, out in zip(todo, outs):
            d0 = float(batch.logits[idx[r], cps[r]].double() - batch.logits[idx[r], cs[r]].double())
            o = out.to(torch.float64).cpu().numpy()
            self._random[rkeys[r]] = ((o[:, 1] - o[:, 0]) - d0).reshape(draws, counts.shape[1])
        return np.stack([self._random[k] for k in rkeys]) if rkeys else np.zeros((0, draws, counts.shape[1]))

    def cost(self, ctx: CostContext) -> Passes:
        """The maps of the contrast class, then for every variant and removal baseline the
        removals at each fraction (forward rows)."""
        bases = 2 if self.p["other_baseline"] else 1
        draws = int(self.p["random_orders"]) * len(self.fractions)
        # random orders are re-run where a signed map has fewer positive pixels than a
        # fraction removes (about half of the signed maps, measured on the sample model)
        return Passes(
            maps=1, forward=ctx.variants * bases * len(self.fractions) + 0.5 * ctx.signed * bases * draws
        )

    def shared_cost(self, ctx: CostContext) -> Passes:
        """The random removal orders per baseline and fraction (cached per image)."""
        bases = 2 if self.p["other_baseline"] else 1
        return Passes(forward=bases * int(self.p["random_orders"]) * len(self.fractions))

    def measure(
        self, batch: Batch, source: MapSource, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        idx, cs, cps, names = self._rows(batch)
        pairs = self.pairs(batch.model)
        class_names = list(getattr(batch.model, "class_names", []) or [])
        # a tuple, not a list: Measurement.extend concatenates lists across batches
        pair_info = (
            "runner-up"
            if pairs is None
            else tuple(
                {"from": a, "to": b, "from_name": _name(class_names, a), "to_name": _name(class_names, b)}
                for a, b in pairs
            )
        )
        skipped = [n for i, n in enumerate(batch.images) if i not in set(idx)]
        primary, other = self.baselines(source)
        base_extra = {"pairs": pair_info, "baseline": primary, "other_baseline": other, "skipped": skipped}
        if not idx:
            return {v: Measurement(extra=dict(base_extra), notes=list(self._pair_notes)) for v in maps}
        x = batch.x
        hw = x.shape[2] * x.shape[3]
        budget = np.asarray(fraction_counts(self.fractions, hw))
        dev = x.device
        rows = torch.as_tensor(idx, dtype=torch.long, device=dev)
        contrast_maps = source.maps(batch.model, x[rows], torch.as_tensor(cps, dtype=torch.long, device=dev))
        ties = tie_breaks(batch.seed, [batch.images[i] for i in idx], hw, dev)
        lg = batch.logits.to(torch.float64)
        cols_c, cols_cp = (torch.as_tensor(v, device=lg.device) for v in (cs, cps))
        d0 = (lg[rows, cols_cp] - lg[rows, cols_c]).cpu().numpy()  # log-odds of c′ vs c on x
        n = len(idx)
        result: dict[Variant, Measurement] = {}
        for v in maps:
            diff = maps[v][rows].to(dev) - contrast_maps[v].to(dev)
            ranks = saliency_ranks(diff, ties)
            # DeepLIFT: only pixels with a positive difference are evidence for c over c′
            positive = (torch.nan_to_num(diff, nan=0.0) > 0).reshape(n, -1).sum(1).cpu().numpy()
            counts = np.minimum(budget[None, :], positive[:, None])  # (rows, K)
            per_base: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
            for kind in [primary] + ([other] if other else []):
                base = removal_baseline(batch.model, x, kind, sigma=self.p["blur_sigma"])
                rand = self._random_delta(batch, base, counts, idx, cs, cps, kind)  # (rows, R, K)
                jobs = [
                    Job(
                        idx[r],
                        (lambda rk=ranks[r], cnt=counts[r]: prefix_masks(rk, [int(c) for c in cnt])),
                        [cs[r], cps[r]],
                    )
                    for r in range(n)
                ]
                outs = run_removals(
                    batch.model, x, base, jobs, chunk=rows_per_pass(self.p["chunk"], "forward")
                )
                o = torch.stack(outs).to(torch.float64).cpu().numpy()  # (rows, K, 2)
                delta = (o[:, :, 1] - o[:, :, 0]) - d0[:, None]
                rand_mean = rand.mean(1)
                with np.errstate(all="ignore"):
                    adv = (delta - rand_mean).mean(1)
                    adv = np.where(np.isfinite(adv), adv, np.nan)
                    wins = win_rates(delta.mean(1), rand.mean(2))
                per_base[kind] = (delta, rand_mean, adv, wins)
            delta, rand_mean, adv, wins = per_base[primary]
            flags = ["nonfinite_map"] * nonfinite_count(maps[v][rows]) + ["nonfinite_output"] * int(
                (~np.isfinite(adv)).sum()
            )
            extra = {
                **base_extra,
                "flip_advantage": [float(a) for a in adv],
                "flip_win_rate": [float(a) for a in wins],
                "removed_share": [float(c) / hw for c in counts[:, -1]],
                "classes": [[c, cp] for c, cp in zip(cs, cps)],
                "flags": flags,
            }
            if other:
                extra["other_advantage"] = [float(a) for a in per_base[other][2]]
                extra["other_win_rate"] = [float(a) for a in per_base[other][3]]
            result[v] = Measurement(
                values=[float(a) for a in adv],
                images=list(names),
                curves={"flip": delta, "flip_random": rand_mean},
                axes={"flip": list(self.fractions), "flip_random": list(self.fractions)},
                extra=extra,
                notes=list(self._pair_notes),
            )
        return result

    # ----------------------------------------------------------------------------------------
    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        flag_notes(m)
        # skipped image names are concatenated across batches; keep only their number
        n_skipped = m.extra.get("skipped_images", 0) + len(m.extra.pop("skipped", None) or [])
        m.extra["skipped_images"] = n_skipped
        if n_skipped:
            note = f"{n_skipped} image(s) skipped: their predicted class is not the first class of a pair"
            if note not in m.notes:
                m.notes.append(note)
        pairs = m.extra.get("pairs")
        what = (
            "runner-up contrast"
            if pairs == "runner-up" or pairs is None
            else "pairs " + ", ".join(f"{p['from_name']}→{p['to_name']}" for p in pairs)
        )
        if not m.values:
            return self.result(variant, m, "skipped", None, f"no image to measure ({what})" + _notes(m))
        kw = {
            "min_advantage": float(self.t.get("min_advantage") or 0.0),
            "alpha": float(self.t.get("alpha") or 0.05),
            "draws": int(self.p["random_orders"]),
        }
        test = better_than_random(m.extra.get("flip_advantage", []), m.extra.get("flip_win_rate", []), **kw)
        m.extra["flip_test"] = test
        note = power_note(test)
        if note and note not in m.notes:
            m.notes.append(note)
        if test["mean"] is None:
            return self.result(
                variant,
                m,
                "error",
                None,
                "no finite measurement: the model output was not finite after removing pixels" + _notes(m),
            )
        flip = float(np.nanmean(m.curves["flip"]))
        rnd = float(np.nanmean(m.curves["flip_random"]))
        status, verdict = self._status(test, kw)
        primary, other = m.extra.get("baseline"), m.extra.get("other_baseline")
        sig = f"beats {100 * test['win_rate']:.0f}% of random orders, p={test['p_value']:.2g}"
        msg = (
            f"{verdict} ({test['n']} images, {what}, {primary} removal of the pixels where "
            f"map_c − map_c′ > 0): removing them moves the log-odds towards c′ by {flip:+.3g} "
            f"on average vs {rnd:+.3g} for random pixels (advantage {test['mean']:+.3g}, {sig})"
        )
        series: dict[str, Any] = {}
        if other and m.extra.get("other_advantage"):
            alt = better_than_random(m.extra.pop("other_advantage"), m.extra.pop("other_win_rate"), **kw)
            alt_status, _ = self._status(alt, kw)
            series["other"] = {"baseline": other, "status": alt_status, "test": alt}
            series["baseline_dependent"] = alt_status != status
            msg += (
                f"; with {other} removal: {alt_status.upper()} (advantage {alt['mean']:+.3g})"
                if alt["mean"] is not None
                else f"; with {other} removal: no finite measurement"
            )
            if alt_status != status:
                msg += " — the verdict depends on the removal value"
        return self.result(variant, m, status, m.mean(), msg + _notes(m), **series)

    def _status(self, test: dict[str, Any], kw: dict[str, Any]) -> tuple[str, str]:
        consistent = self.t.get("warn_win_rate")
        if not test["better"]:
            return "fail", (
                "no better than a random order"
                if not (test["mean"] or 0) > kw["min_advantage"]
                else "not significantly better than a random order"
            )
        if consistent is not None and test["win_rate"] < float(consistent):
            return "warn", (
                f"better than a random order, but it beats fewer than "
                f"{100 * float(consistent):.0f}% of the random orders"
            )
        return "pass", "better than a random order"

    @classmethod
    def caveats(cls, cells: list[CheckResult], context: dict[str, Any]) -> list[dict[str, Any]]:
        """``baseline_dependent``: the maps whose verdict changes with the removal value (one
        caveat listing them all, with each verdict under both values)."""
        changed = [
            c
            for c in cells
            if c.series.get("baseline_dependent")
            and c.status in ("pass", "warn", "fail")
            and c.control is None
        ]
        if not changed:
            return []
        judged = [c for c in cells if c.status in ("pass", "warn", "fail") and c.control is None]
        rows = {
            c.variant: {
                "baseline": c.series.get("baseline"),
                "status": c.status,
                "other_baseline": (c.series.get("other") or {}).get("baseline"),
                "other_status": (c.series.get("other") or {}).get("status"),
            }
            for c in changed
        }
        shown = "; ".join(
            f"{v}: {r['status'].upper()} with {r['baseline']}, "
            f"{str(r['other_status']).upper()} with {r['other_baseline']}"
            for v, r in list(rows.items())[:8]
        )
        more = f"; and {len(rows) - 8} more" if len(rows) > 8 else ""
        return [
            {
                "kind": "baseline_dependent",
                "check": cells[0].check,
                "numbers": rows,
                "message": (
                    f"{cells[0].check}: the verdict of {len(rows)} of {len(judged)} "
                    "maps changes with the value removed pixels take, so the removal "
                    "value, not the map alone, decides it (out-of-distribution pixels): "
                    f"{shown}{more}."
                ),
            }
        ]


def _notes(m: Measurement) -> str:
    return ("; " + "; ".join(m.notes)) if m.notes else ""


def _name(names: list[str], i: int) -> str:
    return names[i] if 0 <= i < len(names) else str(i)


def _parse_pairs(v: Any) -> list[tuple[str, str]] | None:
    """``None``, ``"8:3,cat:dog"``, ``["8:3"]`` or ``[[8, 3]]`` -> ``[("8", "3"), ...]``."""
    if v is None or v == "" or v == []:
        return None
    items = str(v).split(",") if isinstance(v, str) else list(v)
    out = []
    for item in items:
        pair = item.split(":") if isinstance(item, str) else list(item)
        pair = [str(p).strip() for p in pair]
        if len(pair) != 2 or not all(pair):
            raise UsageError(
                f"sign_flip pairs: cannot read {item!r} as a class pair C:C′",
                hint="e.g. --flip 8:3 or sign_flip.pairs=[[8, 3]] (indices or class names)",
            )
        out.append((pair[0], pair[1]))
    return out


def _resolve(token: str, names: list[str], k: int, notes: list[str]) -> int:
    """A class given by name or index. A name wins over an index (noted when they differ)."""
    by_name = names.index(token) if token in names else None
    by_index = int(token) if token.lstrip("-").isdigit() and 0 <= int(token) < k else None
    if by_name is not None:
        if by_index is not None and by_index != by_name:
            notes.append(
                f"class {token!r} read as the class named {token!r} (index {by_name}), not index {by_index}"
            )
        return by_name
    if by_index is not None:
        return by_index
    shown = ", ".join(names[:10]) + (" …" if len(names) > 10 else "")
    raise UsageError(
        f"sign_flip: unknown class {token!r}", hint=f"use a class index 0–{k - 1} or a class name ({shown})"
    )
