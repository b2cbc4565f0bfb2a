"""The randomization check's words and summaries: the measures beside its verdict
(``series["measures"]``, each judged through its own 95 % interval), its messages, and its
caveats (maps that survive the randomization of the top layers, maps that resemble the edge
control). The numbers come from :mod:`saliaudit.checks.randomization` and
:mod:`saliaudit.checks.mprt_variants` (Adebayo et al., NeurIPS 2018; Hedström et al. 2023,
arXiv:2401.06465).
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from .. import stats
from ..result import CheckResult
from .base import higher_is_worse
from .mprt_variants import MEASURE_SHORT, MEASURE_TEXT, MEASURES
from .similarity import METRIC_NAMES

__all__ = [
    "SIMILARITY_SHORT",
    "interval_status",
    "summarize",
    "measures_series",
    "emprt_message",
    "similarity_message",
    "differing_note",
    "metric_text",
    "point_status",
    "caveats",
]

#: Short names of the similarity measures, for messages.
SIMILARITY_SHORT = {
    "spearman_abs": "Spearman ABS",
    "spearman": "signed Spearman",
    "ssim": "SSIM",
    "hog": "HOG Spearman",
}


def interval_status(
    iv: stats.Interval, thresholds: dict[str, float | None], higher_is_better: bool
) -> tuple[str, bool]:
    """``(status, inconclusive)`` of an interval, as :meth:`Check.result` decides a check
    judged by its interval (one image: inconclusive WARN)."""
    status, inconclusive = stats.decide(
        iv, fail=thresholds.get("fail"), warn=thresholds.get("warn"), higher_is_better=higher_is_better
    )
    if iv.n < 2:
        return "warn", True
    return status, inconclusive


def summarize(
    name: str,
    values: list[float],
    *,
    thresholds: dict[str, float | None],
    higher_is_better: bool,
    bounds: tuple[float, float] | None,
    seed: int,
    undefined: int = 0,
) -> dict[str, Any]:
    """One measure's entry of ``series["measures"]``: the per-image values (``None`` where
    undefined), ``value`` (their mean), ``n``, the 95 % ``ci``, and the ``status`` its
    thresholds give through the interval (``inconclusive`` when it lies across one)."""
    per_image = [float(v) if np.isfinite(v) else None for v in values]
    iv = stats.mean_interval(values, seed=seed, bounds=bounds)
    out: dict[str, Any] = {
        "computed": True,
        "measure": MEASURE_TEXT[name],
        "higher_is_better": bool(higher_is_better),
        "thresholds": dict(thresholds),
        "per_image": per_image,
        "undefined": int(undefined),
    }
    if iv is None:
        return {**out, "value": None, "n": 0, "ci": None, "ci_method": None, "status": "error"}
    status, inconclusive = interval_status(iv, thresholds, higher_is_better)
    return {
        **out,
        "value": iv.mean,
        "n": iv.n,
        "ci": [iv.lo, iv.hi],
        "ci_method": iv.method,
        "status": status,
        "inconclusive": bool(inconclusive),
    }


def measures_series(
    params: dict[str, Any],
    label: str,
    per: dict[str, list[float] | None],
    entropies: list[list[float]],
    sim_t: dict[str, float | None],
    emprt_t: dict[str, float | None],
) -> dict[str, Any]:
    """``series["measures"]`` of one cell (``label``: ``randomization/<variant>``): every
    measure's per-image values, mean, interval and the verdict its own thresholds give; for
    sMPRT when it was not computed, why. The selected measure's interval uses the cell's seed."""
    chosen, out = params["variant"], {}
    for name in MEASURES:
        values = per.get(name)
        if values is None:
            more = int(params["smprt_samples"]) - 1
            out[name] = {
                "computed": False,
                "measure": MEASURE_TEXT[name],
                "why": 'not computed: not selected, and alternatives is "cheap" (alternatives = '
                f'"all" computes it: {more} more map computations per model compared)',
            }
            continue
        emprt = name == "emprt"
        entry = summarize(
            name,
            values,
            thresholds=emprt_t if emprt else sim_t,
            higher_is_better=emprt,
            bounds=None if emprt else (-1.0, 1.0),
            seed=zlib.crc32((label if name == chosen else f"{label}/{name}").encode()),
            undefined=int(sum(1 for v in values if not np.isfinite(v))) if emprt else 0,
        )
        entry["selected"] = name == chosen
        if emprt:
            h = np.asarray(entropies, dtype=np.float64).reshape(-1, 2)
            entry["entropy_trained"] = float(h[:, 0].mean()) if len(h) else None
            entry["entropy_randomized"] = float(h[:, 1].mean()) if len(h) else None
            entry["bins"] = int(params["emprt_bins"])
            # Quantus' EfficientMPRT score: the relative rise, ratio − 1
            entry["rise"] = None if entry["value"] is None else entry["value"] - 1.0
        else:
            entry["similarity"] = params["metric"]
            entry["over"] = "cascade mean" if params["verdict"] == "mean" else "fully randomized model"
        if name == "smprt":
            entry["samples"], entry["noise"] = int(params["smprt_samples"]), float(params["smprt_noise"])
        out[name] = entry
    return out


def emprt_message(status: str, value: float, thresholds: dict[str, float | None]) -> str:
    """The finding in words when eMPRT decides."""
    fail, warn = thresholds.get("fail"), thresholds.get("warn")
    what = f"eMPRT entropy ratio {value:.2f}"
    if status == "fail":
        return (
            f"the map does not grow more complex when the weights are randomized ({what} ≤ "
            f"{fail:g}): the map does not depend on the learned weights"
        )
    if status == "warn":
        return f"the map grows only a little more complex when the weights are randomized ({what} ≤ {warn:g})"
    bound = warn if warn is not None else fail
    return f"the map grows more complex when the weights are randomized ({what}" + (
        f" > {bound:g})" if bound is not None else ")"
    )


def differing_note(status: str, measures: dict[str, Any], chosen: str) -> str:
    """``"; the verdict depends on the measure: ..."`` when another computed measure's
    thresholds give another verdict than ``status`` (marks each entry's ``differs``); else
    an empty string."""
    if status not in ("pass", "warn", "fail"):
        return ""
    differ = []
    for name, s in measures.items():
        if s.get("selected") or not s.get("computed") or s.get("status") not in ("pass", "warn", "fail"):
            continue
        s["differs"] = s["status"] != status
        if s["differs"]:
            lo, hi = s["ci"]
            unsure = ", inconclusive" if s.get("inconclusive") else ""
            differ.append(
                f"{MEASURE_SHORT[name]} gives {s['status'].upper()}{unsure} ({s['value']:.2f}, "
                f"95 % CI [{lo:.2f}, {hi:.2f}], n = {s['n']})"
            )
    if not differ:
        return ""
    return (
        f"; the verdict depends on the measure: {'; '.join(differ)}, where "
        f"{MEASURE_SHORT[chosen]} gives {status.upper()}"
    )


def similarity_message(
    params: dict[str, Any], thresholds: dict[str, float | None], status: str, value: float, curves: dict
) -> str:
    """The finding in words when MPRT or sMPRT decides (``curves``: the cell's per-image
    curves, for the fully randomized value)."""
    fail, warn = thresholds.get("fail"), thresholds.get("warn")
    smprt = params["variant"] == "smprt"
    short = ("sMPRT " if smprt else "") + SIMILARITY_SHORT[params["metric"]]
    maps = "denoised maps" if smprt else "maps"
    mean = params["verdict"] == "mean"
    where = "averaged over the cascade" if mean else "on the fully randomized model"
    curve = curves.get("cascading_smprt" if smprt else f"cascading_{params['metric']}")
    final = float(np.nanmean(np.asarray(curve)[:, -1])) if mean and curve is not None and len(curve) else None
    tail = f"; fully randomized {final:.2f}" if final is not None and np.isfinite(final) else ""
    shown = f"{short} {value:.2f} {where}"
    if status == "fail":
        return (
            f"{maps} on the randomized models resemble the original ({shown} ≥ {fail:g}{tail}): "
            "the map does not depend on the learned weights"
        )
    if status == "warn":
        return (
            f"{maps} on the randomized models still resemble the original ({shown} ≥ {warn:g}"
            f"{tail}): the map depends only partly on the learned weights"
        )
    bound = warn if warn is not None else fail
    return (
        f"{maps} change when the weights are randomized ({shown}"
        + (f" < {bound:g}" if bound is not None else "")
        + f"{tail})"
    )


def point_status(value: float | None, thresholds: dict[str, float | None], higher_is_better: bool) -> str:
    """The point estimate against the thresholds (the interval decides in ``Check.result``);
    for a higher-is-better value FAIL at or below ``fail``, WARN at or below ``warn``."""
    if not higher_is_better:
        return higher_is_worse(value, thresholds)
    if value is None or not np.isfinite(value):
        return "error"
    fail, warn = thresholds.get("fail"), thresholds.get("warn")
    if fail is not None and value <= fail:
        return "fail"
    return "warn" if warn is not None and value <= warn else "pass"


def metric_text(params: dict[str, Any]) -> str:
    """What the cell's ``value`` is, for the selected measure (the result's ``metric``)."""
    where = "mean over the cascade steps" if params["verdict"] == "mean" else "fully randomized model"
    sim = METRIC_NAMES[params["metric"]]
    setting = f"cascading, {params['granularity']}"
    if params["variant"] == "smprt":
        return (
            f"sMPRT: {sim} of denoised maps (mean of {params['smprt_samples']} noisy copies, "
            f"σ = {params['smprt_noise']:g} × the image's range), original vs randomized model, "
            f"{where} ({setting})"
        )
    if params["variant"] == "emprt":
        return (
            f"eMPRT: entropy of the map's {params['emprt_bins']}-bin value histogram, fully "
            f"randomized over trained model ({setting})"
        )
    return f"{sim}, original vs randomized model, {where} ({setting})"


def caveats(cells: list[CheckResult], context: dict[str, Any]) -> list[dict[str, Any]]:
    """``survives_top_randomization`` (maps alike the original while at least the top third
    of the cascade is randomized: they do not reflect the top layers, Adebayo et al. 2018,
    guided backprop in Fig. 2) and ``resembles_edge`` (maps more alike the model-independent
    edge control than their own maps on the fully randomized model)."""
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
    fail = (c.series.get("similarity_thresholds") or c.thresholds).get("fail")
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
