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
(better on average, inconsistent across images); PASS otherwise. A model-independent control
has ``D = 0`` (a constant map ranked by the seeded tie-break, i.e. a random order) and fails.

Removed pixels take each image's mean colour by default, as in
:mod:`~saliaudit.checks.perturbation` (black disrupts models trained on textured images: on the
sample shapes model random black pixels move the log-odds by 8–10 logits). DeepLIFT erased
MNIST pixels to the black background; ``baseline=black`` reproduces that on digit-like data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import validate
from ..errors import UsageError
from ..result import CheckResult
from .base import Batch, Check, MapSource, Measurement, Variant, register
from .removal import (Job, better_than_random, check_baseline,
                      flag_notes, fraction_counts, image_keys, nonfinite_count, power_note,
                      prefix_masks, random_ranks, removal_baseline, run_removals, saliency_ranks,
                      tie_breaks, win_rates)


@register
class SignFlip(Check):
    name = "sign_flip"
    title = "Sign flip: removing the evidence for c rather than c′"
    summary = ("Removing the pixels where map_c − map_c′ is largest should push the model from its "
               "predicted class c towards a contrast class c′ more than removing as many random pixels "
               "(DeepLIFT's digit flipping, Shrikumar et al. 2017 §4.2). Maps that discard the sign "
               "are expected to do worse here than on pixel perturbation (Srinivas & Fleuret 2019 §6).")
    reference = ("Shrikumar, Greenside & Kundaje, Learning Important Features Through Propagating "
                 "Activation Differences, ICML 2017, §4.2; Srinivas & Fleuret, Full-Gradient "
                 "Representation for Neural Network Visualization, NeurIPS 2019, §6")
    metric = "mean advantage over a random order of the log-odds change towards c′ (logits)"
    thresholds = {"min_advantage": 0.0, "alpha": 0.05, "warn_win_rate": 0.75}
    controls_must_fail = frozenset({"random", "edge"})
    params = {
        "pairs": None,  # None: runner-up; or [[c, c′], ...] / "8:3,cat:dog" (indices or names)
        "fractions": [0.01, 0.02, 0.05, 0.1, 0.2],  # share of the pixels removed
        "baseline": "mean",  # per-image mean colour; or black (DeepLIFT's MNIST erasure), zero, blur
        "blur_sigma": 5.0,
        "random_orders": 3,
        "chunk": 64,
        "max_images": None,
    }

    def __init__(self, params: dict[str, Any] | None = None,
                 thresholds: dict[str, float | None] | None = None):
        super().__init__(params, thresholds)
        self.fractions = validate.fractions("sign_flip.fractions", self.p["fractions"])
        check_baseline(self.p)
        validate.integer("sign_flip.random_orders", self.p["random_orders"], min=1)
        validate.integer("sign_flip.chunk", self.p["chunk"], min=1)
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
            self._pairs = [(_resolve(a, names, k, self._pair_notes), _resolve(b, names, k, self._pair_notes))
                           for a, b in self.raw_pairs]
            for a, b in self._pairs:
                if a == b:
                    raise UsageError(f"sign_flip pair {a}:{b} names the same class twice",
                                     hint="give two different classes, e.g. --flip 8:3")
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

    def _random_delta(self, batch: Batch, base: torch.Tensor, counts: list[int], idx: list[int],
                      cs: list[int], cps: list[int]) -> np.ndarray:
        """``(rows, R, K)`` log-odds changes under the random orders (cached per image and pair)."""
        hw = batch.x.shape[2] * batch.x.shape[3]
        draws = int(self.p["random_orders"])
        keys = image_keys(batch.model, batch.x, batch.images)
        rkeys = [(keys[i], c, cp) for i, c, cp in zip(idx, cs, cps)]
        todo = [r for r, k in enumerate(rkeys) if k not in self._random]
        jobs = [Job(idx[r], (lambda r=r: torch.cat([prefix_masks(rk, counts) for rk in
                                                    random_ranks(batch.seed, batch.images[idx[r]], hw, draws)])),
                    [cs[r], cps[r]]) for r in todo]
        outs = run_removals(batch.model, batch.x, base, jobs, chunk=int(self.p["chunk"]))
        for r, out in zip(todo, outs):
            d0 = float(batch.logits[idx[r], cps[r]].double() - batch.logits[idx[r], cs[r]].double())
            o = out.to(torch.float64).cpu().numpy()
            self._random[rkeys[r]] = ((o[:, 1] - o[:, 0]) - d0).reshape(draws, len(counts))
        return np.stack([self._random[k] for k in rkeys]) if rkeys else np.zeros((0, draws, len(counts)))

    def measure(self, batch: Batch, source: MapSource,
                maps: dict[Variant, torch.Tensor]) -> dict[Variant, Measurement]:
        idx, cs, cps, names = self._rows(batch)
        pairs = self.pairs(batch.model)
        class_names = list(getattr(batch.model, "class_names", []) or [])
        # a tuple, not a list: Measurement.extend concatenates lists across batches
        pair_info = ("runner-up" if pairs is None else
                     tuple({"from": a, "to": b, "from_name": _name(class_names, a),
                            "to_name": _name(class_names, b)} for a, b in pairs))
        skipped = [n for i, n in enumerate(batch.images) if i not in set(idx)]
        base_extra = {"pairs": pair_info, "baseline": self.p["baseline"], "skipped": skipped}
        if not idx:
            return {v: Measurement(extra=dict(base_extra), notes=list(self._pair_notes)) for v in maps}
        x = batch.x
        _, _, h, w = x.shape
        hw = h * w
        counts = fraction_counts(self.fractions, hw)
        base = removal_baseline(batch.model, x, self.p["baseline"], sigma=self.p["blur_sigma"])
        rand = self._random_delta(batch, base, counts, idx, cs, cps)  # (rows, R, K)

        dev = x.device
        rows = torch.as_tensor(idx, dtype=torch.long, device=dev)
        contrast_maps = source.maps(batch.model, x[rows], torch.as_tensor(cps, dtype=torch.long, device=dev))
        ties = tie_breaks(batch.seed, [batch.images[i] for i in idx], hw, dev)
        variants = list(maps)
        jobs = []
        for v in variants:
            diff = maps[v][rows].to(dev) - contrast_maps[v].to(dev)
            ranks = saliency_ranks(diff, ties)
            for r in range(len(idx)):
                jobs.append(Job(idx[r], (lambda rk=ranks[r]: prefix_masks(rk, counts)), [cs[r], cps[r]]))
        outs = run_removals(batch.model, x, base, jobs, chunk=int(self.p["chunk"]))
        lg = batch.logits.to(torch.float64)
        cols_c, cols_cp = (torch.as_tensor(v, device=lg.device) for v in (cs, cps))
        d0 = (lg[rows, cols_cp] - lg[rows, cols_c]).cpu().numpy()  # log-odds of c′ vs c on x

        result: dict[Variant, Measurement] = {}
        n = len(idx)
        rand_mean = rand.mean(1)  # (rows, K)
        for vi, v in enumerate(variants):
            o = torch.stack(outs[vi * n:(vi + 1) * n]).to(torch.float64).cpu().numpy()  # (rows, K, 2)
            delta = (o[:, :, 1] - o[:, :, 0]) - d0[:, None]
            with np.errstate(all="ignore"):
                adv = (delta - rand_mean).mean(1)
                adv = np.where(np.isfinite(adv), adv, np.nan)
                wins = win_rates(delta.mean(1), rand.mean(2))
            flags = (["nonfinite_map"] * nonfinite_count(maps[v][rows])
                     + ["nonfinite_output"] * int((~np.isfinite(adv)).sum()))
            result[v] = Measurement(
                values=[float(a) for a in adv], images=list(names),
                curves={"flip": delta, "flip_random": rand_mean},
                axes={"flip": list(self.fractions), "flip_random": list(self.fractions)},
                extra={**base_extra, "flip_advantage": [float(a) for a in adv],
                       "flip_win_rate": [float(a) for a in wins],
                       "classes": [[c, cp] for c, cp in zip(cs, cps)], "flags": flags},
                notes=list(self._pair_notes))
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
        what = ("runner-up contrast" if pairs == "runner-up" or pairs is None else
                "pairs " + ", ".join(f"{p['from_name']}→{p['to_name']}" for p in pairs))
        if not m.values:
            return self.result(variant, m, "skipped", None,
                               f"no image to measure ({what})" + _notes(m))
        kw = {"min_advantage": float(self.t.get("min_advantage") or 0.0),
              "alpha": float(self.t.get("alpha") or 0.05), "draws": int(self.p["random_orders"])}
        test = better_than_random(m.extra.get("flip_advantage", []), m.extra.get("flip_win_rate", []), **kw)
        m.extra["flip_test"] = test
        note = power_note(test)
        if note and note not in m.notes:
            m.notes.append(note)
        if test["mean"] is None:
            return self.result(variant, m, "error", None, "no finite measurement: the model output "
                               "was not finite after removing pixels" + _notes(m))
        flip = float(np.nanmean(m.curves["flip"]))
        rnd = float(np.nanmean(m.curves["flip_random"]))
        consistent = self.t.get("warn_win_rate")
        if not test["better"]:
            status, verdict = "fail", ("no better than a random order" if not test["mean"] > kw["min_advantage"]
                                       else "not significantly better than a random order")
        elif consistent is not None and test["win_rate"] < float(consistent):
            status, verdict = "warn", (f"better than a random order, but it beats fewer than "
                                       f"{100 * float(consistent):.0f}% of the random orders")
        else:
            status, verdict = "pass", "better than a random order"
        sig = f"beats {100 * test['win_rate']:.0f}% of random orders, p={test['p_value']:.2g}"
        msg = (f"{verdict} ({test['n']} images, {what}, {self.p['baseline']} removal): removing the top "
               f"pixels of map_c − map_c′ moves the log-odds towards c′ by {flip:+.3g} on average vs "
               f"{rnd:+.3g} for random pixels (advantage {test['mean']:+.3g}, {sig})" + _notes(m))
        return self.result(variant, m, status, m.mean(), msg)


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
            raise UsageError(f"sign_flip pairs: cannot read {item!r} as a class pair C:C′",
                             hint="e.g. --flip 8:3 or sign_flip.pairs=[[8, 3]] (indices or class names)")
        out.append((pair[0], pair[1]))
    return out


def _resolve(token: str, names: list[str], k: int, notes: list[str]) -> int:
    """A class given by name or index. A name wins over an index (noted when they differ)."""
    by_name = names.index(token) if token in names else None
    by_index = int(token) if token.lstrip("-").isdigit() and 0 <= int(token) < k else None
    if by_name is not None:
        if by_index is not None and by_index != by_name:
            notes.append(f"class {token!r} read as the class named {token!r} (index {by_name}), "
                         f"not index {by_index}")
        return by_name
    if by_index is not None:
        return by_index
    shown = ", ".join(names[:10]) + (" …" if len(names) > 10 else "")
    raise UsageError(f"sign_flip: unknown class {token!r}",
                     hint=f"use a class index 0–{k - 1} or a class name ({shown})")
