"""Sensitivity-n (Ancona, Ceolini, Öztireli & Gross, ICLR 2018, §4).

An attribution satisfies *sensitivity-n* when, for every subset ``S`` of ``n`` input
features, the sum of the attributions of ``S`` equals the output change when ``S`` is
removed: ``Σ_{i∈S} R_i = f(x) − f(x_{S←baseline})``. No method satisfies it for all n unless
the model is linear (then gradient × input does, with the zero baseline). Ancona et al. measure
how close a method comes with the Pearson correlation, over random subsets of size ``n``,
between the two sides, and plot it against ``n`` on a log scale.

Here, per image and for ``points`` values of ``n`` log-spaced from 1 feature to
``max_fraction`` (80 %) of the features, ``subsets`` random subsets (default 100, as Ancona
et al.) are drawn — seeded by the audit seed, the image name and ``n``, so every method is
scored on the same subsets — and removed. Features are ``patches`` (default: squares of
``patch`` pixels, ``input size / 16`` by default, i.e. a 16 × 16 grid, as the ImageNet
experiments of Ancona et al. use patches) or single ``pixels`` (all channels of one location).
The attribution of a feature is the sum of the 2-D map over it; the output is the logit of the
top-1 class. Removed features take the ``zero`` baseline by default — the model input's zero
(the normalization mean colour), the reference of gradient × input, ε-LRP and DeepLIFT-Rescale
in Ancona et al. (``black``, ``mean`` and ``blur`` are available).

The output changes do not depend on the map: they are computed once per image (``points ×
subsets`` forward passes, batched ``chunk`` at a time) and shared by every method and variant;
this is why the default ``max_images`` is 16 (1,600 subsets per n).

A constant map (e.g. all-zero) makes every subset's attribution sum equal: the correlation is
undefined and is reported as 0 with a note (never NaN); likewise when the output does not
change across subsets. Verdict by a test, not a fixed bar: at each n the method's per-image
correlations are compared with the ``random`` control's on the same images and subsets
(one-sided Wilcoxon signed-rank), corrected over the n values (Bonferroni-Holm) and over the
audit (Benjamini–Hochberg); the method PASSES only when it is significantly above the control
at some n, else WARN. The value reported is the curve's maximum (over n) of the mean
correlation, with its 95 % interval over images at that n; ``warn``/``fail`` thresholds can
be set on it as well.
"""

from __future__ import annotations

import math
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
    image_generator,
    image_keys,
    nonfinite_count,
    removal_baseline,
    run_removals,
)

FEATURES = ("patches", "pixels")


@register
class SensitivityN(Check):
    name = "sensitivity_n"
    title = "Sensitivity-n: attribution sums against output changes"
    summary = (
        "For random subsets of n features, the sum of their attributions should track how "
        "much the output drops when they are removed (Ancona et al., ICLR 2018). The Pearson "
        "correlation is plotted against n; only a linear model can reach 1 at every n."
    )
    reference = (
        "Ancona, Ceolini, Öztireli & Gross, Towards better understanding of gradient-based "
        "attribution methods for Deep Neural Networks, ICLR 2018"
    )
    metric = "max over n of the mean Pearson correlation (attribution sum vs output change)"
    thresholds = {"warn": None, "fail": None}  # judged against the controls, not a fixed bar
    controls_must_fail = frozenset({"random"})
    verdict_from_controls = True  # PASS only when significantly above the controls
    value_range = (-1.0, 1.0)
    short = "sens-n"
    higher_is_better = True  # a correlation the map should have
    order = 50
    curves = {
        "correlation": Curve(
            "Sensitivity-n (higher is better)",
            "n (pixels removed, log scale)",
            "Pearson correlation",
            primary=True,
        )
    }
    params = {
        "features": "patches",  # or "pixels"
        "patch": None,  # patch side in pixels (None: input size / 16)
        "points": 8,  # values of n, log-spaced
        "max_fraction": 0.8,  # largest n as a share of the features
        "subsets": 100,  # random subsets per n and image (Ancona et al.)
        "baseline": "zero",  # zero (model input 0), black, mean or blur
        "blur_sigma": 5.0,
        "chunk": None,  # rows per pass (None: from the model's activation memory)
        "max_images": 16,
    }

    def __init__(
        self, params: dict[str, Any] | None = None, thresholds: dict[str, float | None] | None = None
    ):
        super().__init__(params, thresholds)
        validate.choice("sensitivity_n.features", self.p["features"], FEATURES)
        check_baseline(self.p)
        validate.integer("sensitivity_n.points", self.p["points"], min=1)
        validate.integer("sensitivity_n.subsets", self.p["subsets"], min=3)
        validate.rows("sensitivity_n.chunk", self.p["chunk"])
        if self.p["patch"] is not None:
            validate.integer("sensitivity_n.patch", self.p["patch"], min=1)
        validate.fraction("sensitivity_n.max_fraction", self.p["max_fraction"], hint="e.g. max_fraction=0.8")
        self._changes: dict[tuple[Any, ...], np.ndarray] = {}  # image key -> (points, subsets)

    # ----------------------------------------------------------------------------------------
    def layout(self, h: int, w: int) -> tuple[torch.Tensor, int, int]:
        """``(feature index of each pixel (H·W,), number of features, patch side)``."""
        if self.p["features"] == "pixels":
            return torch.arange(h * w), h * w, 1
        p = int(self.p["patch"]) if self.p["patch"] is not None else max(1, round(min(h, w) / 16))
        cols = math.ceil(w / p)
        rr = torch.arange(h).div(p, rounding_mode="floor")
        cc = torch.arange(w).div(p, rounding_mode="floor")
        return (rr[:, None] * cols + cc[None, :]).reshape(-1), math.ceil(h / p) * cols, p

    def sizes(self, n_features: int) -> list[int]:
        """The subset sizes n: ``points`` log-spaced values from 1 to ``max_fraction`` of the
        features (distinct, so fewer with few features)."""
        top = max(1, int(math.floor(float(self.p["max_fraction"]) * n_features)))
        pts = int(self.p["points"])
        return sorted({int(round(v)) for v in np.geomspace(1, top, pts)} if pts > 1 else {top})

    def subsets(self, seed: int, name: str, n_features: int, n: int) -> torch.Tensor:
        """``(subsets, F)`` bool: the random subsets of ``n`` features of image ``name`` (CPU;
        the ``n`` smallest of float64 uniform draws per row, seeded per image and n)."""
        gen = image_generator(seed, name, "sensitivity-n", n_features, n)
        u = torch.rand((int(self.p["subsets"]), n_features), generator=gen, dtype=torch.float64)
        kth = u.kthvalue(n, dim=1, keepdim=True).values
        return u <= kth

    def _output_changes(
        self, batch: Batch, base: torch.Tensor, pid: torch.Tensor, n_features: int, ns: list[int]
    ) -> np.ndarray:
        """``(B, points, subsets)`` ``f(x) − f(x̃)`` of the top-1 logit (map-independent: cached)."""
        keys = image_keys(batch.model, batch.x, batch.images)
        todo = [i for i, k in enumerate(keys) if k not in self._changes]
        dev = batch.x.device
        pid_dev = pid.to(dev)
        jobs = []
        for i in todo:
            t = int(batch.targets[i])
            for n in ns:
                jobs.append(
                    Job(
                        i,
                        (
                            lambda i=i, n=n: self.subsets(batch.seed, batch.images[i], n_features, n).to(dev)[
                                :, pid_dev
                            ]
                        ),
                        [t],
                    )
                )
        outs = run_removals(batch.model, batch.x, base, jobs, chunk=rows_per_pass(self.p["chunk"], "forward"))
        for j, i in enumerate(todo):
            f0 = float(batch.logits[i, int(batch.targets[i])].double())
            rows = [f0 - outs[j * len(ns) + q][:, 0].double().cpu().numpy() for q in range(len(ns))]
            self._changes[keys[i]] = np.stack(rows)
        return np.stack([self._changes[k] for k in keys])

    def shared_cost(self, ctx: CostContext) -> Passes:
        """``subsets`` removals at each of ``points`` sizes n, once per image (every method's
        correlation uses the same output changes)."""
        return Passes(forward=int(self.p["points"]) * int(self.p["subsets"]))

    def reductions(self) -> list[dict[str, Any]]:
        subsets = int(self.p["subsets"])
        return (
            [{"param": "subsets", "value": subsets // 2, "why": "half the random subsets per n"}]
            if subsets >= 40
            else []
        )

    def measure(
        self, batch: Batch, source: MapSource, maps: dict[Variant, torch.Tensor]
    ) -> dict[Variant, Measurement]:
        x = batch.x
        b, _, h, w = x.shape
        if b == 0:
            return {v: Measurement() for v in maps}
        pid, n_features, patch = self.layout(h, w)
        ns = self.sizes(n_features)
        base = removal_baseline(batch.model, x, self.p["baseline"], sigma=self.p["blur_sigma"])
        changes = self._output_changes(batch, base, pid, n_features, ns)  # (B, P, S)

        variants = list(maps)
        dev = x.device
        # attribution of each feature: the map summed over the feature's pixels, (V, B, F)
        fs = torch.zeros((len(variants), b, n_features), dtype=torch.float64, device=dev)
        idx = pid.to(dev).expand(b, -1)
        for vi, v in enumerate(variants):
            fs[vi].scatter_add_(1, idx, maps[v].detach().to(dev, torch.float64).reshape(b, -1))
        fs = torch.nan_to_num(fs, nan=0.0, posinf=0.0, neginf=0.0).cpu()
        corr = np.zeros((len(variants), b, len(ns)))
        undefined_map = np.zeros((len(variants), b), dtype=bool)
        undefined_out = np.zeros(b, dtype=bool)
        for i in range(b):
            for q, n in enumerate(ns):
                sel = self.subsets(batch.seed, batch.images[i], n_features, n).to(torch.float64)
                sums = (sel @ fs[:, i].T).numpy().T  # (V, S)
                d = changes[i, q]
                for vi in range(len(variants)):
                    r, bad_a, bad_d = _pearson(sums[vi], d)
                    corr[vi, i, q] = r
                    undefined_map[vi, i] |= bad_a
                    undefined_out[i] |= bad_d
        result: dict[Variant, Measurement] = {}
        for vi, v in enumerate(variants):
            flags = (
                ["constant_map"] * int(undefined_map[vi].sum())
                + ["constant_output"] * int(undefined_out.sum())
                + ["nonfinite_map"] * nonfinite_count(maps[v])
            )
            result[v] = Measurement(
                values=[float(c) for c in corr[vi].mean(1)],
                images=list(batch.images),
                curves={"correlation": corr[vi]},
                axes={"correlation": list(ns)},
                # tuples, not lists: Measurement.extend concatenates lists across batches
                extra={
                    "n_fraction": tuple(n / n_features for n in ns),
                    "features": self.p["features"],
                    "n_features": n_features,
                    "patch": patch,
                    "baseline": self.p["baseline"],
                    "subsets": int(self.p["subsets"]),
                    "flags": flags,
                },
            )
        return result

    # ----------------------------------------------------------------------------------------
    def judge(self, variant: Variant, m: Measurement) -> CheckResult:
        """Provisional verdict of one cell: PASS when the curve is finite (and above
        ``warn``/``fail`` when set); the audit then tests it against the controls
        (:meth:`control_test`) and keeps the PASS only when the correlation is significantly
        above theirs at some n."""
        flag_notes(m)
        if not m.values or "correlation" not in m.curves:
            return self.result(variant, m, "skipped", None, "no image was measured")
        per = np.asarray(m.curves["correlation"], dtype=np.float64)  # (images, n values)
        curve = np.nanmean(per, 0)
        ns = list(m.axes.get("correlation", []))
        best = int(np.nanargmax(curve))
        value = float(curve[best])
        m.values = [float(v) for v in per[:, best]]  # per image: the correlation at that n
        warn, fail = self.t.get("warn"), self.t.get("fail")
        if fail is not None and value < float(fail):
            status = "fail"
        elif warn is not None and value < float(warn):
            status = "warn"
        else:
            status = "pass"
        feats = f"{m.extra.get('n_features')} {m.extra.get('features')}"
        shape = ", ".join(f"n={n}: {c:.2f}" for n, c in zip(ns, curve))
        msg = (
            f"mean Pearson correlation of attribution sums with output changes peaks at "
            f"{value:.2f} for n={ns[best]} of {feats} ({len(m.values)} images, "
            f"{m.extra.get('subsets')} subsets per n, {m.extra.get('baseline')} baseline; "
            f"{shape})"
        )
        if status != "pass":
            msg = f"below the threshold at every n: {msg}"
        if m.notes:
            msg += "; " + "; ".join(m.notes)
        rows = [[float(v) for v in row] for row in per]
        return self.result(variant, m, status, value, msg, per_image_curve=rows, n_values=ns)

    def control_test(self, cell: CheckResult, control: CheckResult) -> tuple[int, float | None]:
        """At each n, a one-sided Wilcoxon signed-rank test over the shared images that the
        method's correlation is above the control's (the same subsets: they are seeded by the
        image and n); the smallest p-value, Bonferroni-corrected over the n values (= Holm's
        smallest adjusted p), is the cell's p-value against that control."""
        from .. import stats

        mine = _by_image(cell)
        theirs = _by_image(control)
        shared = [k for k in mine if k in theirs]
        if not shared:
            return 0, None
        a = np.array([mine[k] for k in shared])
        b = np.array([theirs[k] for k in shared])
        if a.shape != b.shape or a.ndim != 2:
            return len(shared), None
        ps = [stats.paired_better(a[:, q], b[:, q], higher_is_better=True)[1] for q in range(a.shape[1])]
        ps = [p for p in ps if p is not None]
        if not ps:
            return len(shared), None
        return len(shared), min(1.0, len(ps) * min(ps))


def _by_image(cell: CheckResult) -> dict[str, list[float]]:
    rows = cell.series.get("per_image_curve") or []
    return {str(p.get("image")): row for p, row in zip(cell.per_image, rows)}


def _pearson(a: np.ndarray, d: np.ndarray) -> tuple[float, bool, bool]:
    """Pearson correlation of two float64 vectors; ``(0, …)`` with the flags of which side was
    constant (relative spread ≤ 1e-9) when it is undefined."""
    sa, sd = a.std(), d.std()
    flat_a = not sa > 1e-9 * max(float(np.abs(a).mean()), 1e-300)
    flat_d = not sd > 1e-9 * max(float(np.abs(d).mean()), 1e-300)
    if flat_a or flat_d or not (np.isfinite(sa) and np.isfinite(sd)):
        return 0.0, bool(flat_a), bool(flat_d)
    r = float(np.mean((a - a.mean()) * (d - d.mean())) / (sa * sd))
    return (max(-1.0, min(1.0, r)) if np.isfinite(r) else 0.0), False, False
