"""A synthetic but realistic ``results.json`` document for the report tests and the benchmark.

It follows /work/notes/results_contract.md (schema 1.0 with the check content): FullGrad under
all six ψ and six comparison methods (two of them the controls) under ``signed`` and ``abs``,
every check with its series and figures, computed caveats, completeness per image, skipped
inputs, a method that errored, a check cell that errored, and hostile names (an image file
name and a class label with ``<script>``, quotes, ``&`` and non-ASCII text) so that the
renderers are tested for escaping without depending on the real checks.

Deterministic: the same arguments give the same document.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from PIL import Image, ImageDraw

PSIS = ("paper", "signed", "abs", "positive", "negative", "per-channel")
COMPARISON = ("gradient", "integrated_gradients", "gradcam", "guided_backprop", "random", "edge")
HOSTILE = '<script>alert(1)</script> "x" & ü.png'
HOSTILE_LABEL = '<script>alert(2)</script> "tri" & ü'
CLASSES = ["circle", "cross", "square", HOSTILE_LABEL]
STEPS = [
    "original",
    "classifier.3",
    "classifier.0",
    "features.24",
    "features.17",
    "features.10",
    "features.3",
    "features.0",
]
FRACTIONS = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7]
SENS_N = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]

CHECK_INFO = {
    "completeness": {
        "title": "Completeness of the FullGrad decomposition",
        "summary": "Does the FullGrad decomposition add up to the logit? The input-gradient term "
        "plus every bias term must equal f(x); missing biases leave part of the model "
        "unexplained (Srinivas & Fleuret 2019, eq. 1).",
        "reference": "Srinivas & Fleuret, Full-Gradient Representation for Neural Network "
        "Visualization, NeurIPS 2019",
        "metric": "max relative residual",
        "thresholds": {"fail": 1e-3},
        "params": {},
    },
    "class_sensitivity": {
        "title": "Class sensitivity",
        "summary": "Do the maps for the top-1 class and for the lowest-scoring class differ? "
        "Positive aggregation and propagation make maps class-insensitive (Khakzar et "
        "al.); the Spearman correlation of their HOG features should be low.",
        "reference": "Khakzar, Baselizadeh & Navab, Rethinking Positive Aggregation and "
        "Propagation of Gradients in Gradient-based Saliency Methods, 2020",
        "metric": "Spearman of HOG features (top-1 vs lowest class)",
        "thresholds": {"fail": 0.7, "warn": 0.4},
        "params": {"max_images": 64},
    },
    "randomization": {
        "title": "Model-parameter randomization",
        "summary": "Do the maps change when the model's weights are re-initialized, layer by layer "
        "from the output? A map that survives randomization does not explain the "
        "trained model (Adebayo et al. 2018).",
        "reference": "Adebayo et al., Sanity Checks for Saliency Maps, NeurIPS 2018",
        "metric": "Spearman of |map| on the fully randomized model",
        "thresholds": {"fail": 0.7, "warn": 0.4},
        "params": {"granularity": "blocks", "max_images": 16},
    },
    "perturbation": {
        "title": "Pixel perturbation (LeRF and MoRF)",
        "summary": "Removing the least salient pixels should barely change the output and removing "
        "the most salient should change it most, better than a random order. This is "
        "FullGrad's pixel-perturbation test (Srinivas & Fleuret 2019, §5.1).",
        "reference": "Srinivas & Fleuret, NeurIPS 2019, §5.1; Samek et al., 2017",
        "metric": "area between the LeRF curve and its random baseline",
        "thresholds": {},
        "params": {"fractions": FRACTIONS, "max_images": 64},
    },
    "sensitivity_n": {
        "title": "Sensitivity-n",
        "summary": "For random subsets of n pixels, does the sum of their attributions track the "
        "output change when they are removed? No method satisfies it for every n "
        "unless the model is linear (Ancona et al. 2018).",
        "reference": "Ancona, Ceolini, Öztireli & Gross, Towards better understanding of "
        "gradient-based attribution methods, ICLR 2018",
        "metric": "max Pearson correlation over n",
        "thresholds": {"warn": 0.1},
        "params": {"subsets": 100, "max_images": 16},
    },
    "sign_flip": {
        "title": "Sign flip (digit flipping, generalized)",
        "summary": "Removing the pixels that favour the predicted class over the runner-up should "
        "move the log-odds towards the runner-up, faster than a random order. Maps "
        "without sign cannot tell the two classes apart (Shrikumar et al. 2017).",
        "reference": "Shrikumar, Greenside & Kundaje, Learning Important Features Through "
        "Propagating Activation Differences, ICML 2017",
        "metric": "log-odds change at 20% removed, relative to random",
        "thresholds": {},
        "params": {"pairs": "runner-up"},
    },
    "bn_folding": {
        "title": "Batch-norm folding",
        "summary": "Folding batch-norm into the preceding convolution does not change the function, "
        "so the decomposition must stay complete and the maps should not change. This "
        "was asked for by the NeurIPS reviewers of FullGrad.",
        "reference": "Srinivas & Fleuret, NeurIPS 2019 (reviews)",
        "metric": "SSIM of maps before and after folding",
        "thresholds": {"warn": 0.9},
        "params": {},
    },
    "pointing_game": {
        "title": "Pointing game",
        "summary": "Does the maximum of the map fall inside the object's mask? The restricted "
        "variant only counts images where the object is small (Khakzar et al.).",
        "reference": "Zhang et al., Top-down Neural Attention by Excitation Backprop, ECCV 2016",
        "metric": "hit rate",
        "thresholds": {},
        "params": {},
    },
}


def _png_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _shape_image(kind: int, rng: np.random.RandomState, size: int) -> Image.Image:
    bg = tuple(int(v) for v in rng.randint(150, 230, 3))
    fg = tuple(int(v) for v in rng.randint(10, 120, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    c = size / 2 + rng.uniform(-size / 8, size / 8, 2)
    r = size * rng.uniform(0.2, 0.3)
    box = [c[0] - r, c[1] - r, c[0] + r, c[1] + r]
    if kind == 0:
        d.ellipse(box, fill=fg)
    elif kind == 1:
        w = r / 3
        d.rectangle([c[0] - w, c[1] - r, c[0] + w, c[1] + r], fill=fg)
        d.rectangle([c[0] - r, c[1] - w, c[0] + r, c[1] + w], fill=fg)
    elif kind == 2:
        d.rectangle(box, fill=fg)
    else:
        d.polygon([(c[0], c[1] - r), (c[0] - r, c[1] + r), (c[0] + r, c[1] + r)], fill=fg)
    arr = np.asarray(img, dtype=np.int16) + rng.randint(-12, 13, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _blob(rng: np.random.RandomState, n: int, signed: bool, sharp: float = 0.25) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    cy, cx = 0.5 + rng.uniform(-0.12, 0.12, 2)
    m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sharp**2))
    m += 0.15 * rng.randn(n, n)
    if signed:
        m -= 0.6 * np.exp(-((yy - 1 + cy) ** 2 + (xx - 1 + cx) ** 2) / (2 * (sharp * 0.8) ** 2))
    else:
        m = np.abs(m)
    return m


def _small(a: np.ndarray) -> list[list[float]]:
    return [[float(f"{v:.4g}") for v in row] for row in a.tolist()]


def _curve(x: list, mean: list[float], rng: np.random.RandomState) -> dict:
    return {
        "x": list(x),
        "mean": [round(float(v), 4) for v in mean],
        "std": [round(abs(float(v)) * 0.2 + 0.02 + 0.01 * rng.rand(), 4) for v in mean],
    }


def variants(comparison: tuple[str, ...] = COMPARISON) -> list[tuple[str, str | None, str | None, bool]]:
    """(method, psi, post, signed) of every map variant in the fixture."""
    out = [("fullgrad", p, None, p == "signed") for p in PSIS]
    out += [(m, None, post, post == "signed") for m in comparison for post in ("signed", "abs")]
    return out


def make_results(
    n_images: int = 24,
    *,
    n_examples: int = 8,
    map_px: int = 24,
    thumb_px: int = 96,
    seed: int = 0,
    comparison: tuple[str, ...] = COMPARISON,
) -> dict:
    """The results document of a synthetic audit of ``n_images`` images (hostile name first);
    ``comparison`` picks the comparison methods (fewer make a smaller, faster document)."""
    rng = np.random.RandomState(seed)
    images = [HOSTILE] + [f"{CLASSES[i % 3]}/{CLASSES[i % 3]}_{i:03d}.png" for i in range(1, n_images)]
    labels = [3] + [i % 3 for i in range(1, n_images)]
    preds = [3 if i % 7 else (labels[i] + 1) % 4 for i in range(n_images)]
    preds[0] = 3
    ranking = list(images)
    order = rng.permutation(n_images - 1) + 1
    ranking = [images[0]] + [images[i] for i in order]
    examples = ranking[:n_examples]
    vs = variants(comparison)

    fig_images = {}
    image_records = []
    for i, name in enumerate(images):
        img = _shape_image(labels[i], rng, thumb_px)
        lowest = (preds[i] + 2) % 4
        score = round(float(rng.uniform(0.55, 0.99)), 4)
        fig_images[name] = {
            "thumbnail": _png_uri(img),
            "predicted": preds[i],
            "predicted_name": CLASSES[preds[i]],
            "lowest": lowest,
            "lowest_name": CLASSES[lowest],
            "score": score,
        }
        image_records.append(
            {
                "image": name,
                "sha256": f"{i:064x}",
                "label": labels[i],
                "predicted": preds[i],
                "predicted_name": CLASSES[preds[i]],
                "score": score,
                "notes": ["grayscale converted to RGB"] if i == 5 else [],
                "label_name": CLASSES[labels[i]],
            }
        )

    fig_maps = []
    for name in examples:
        info = fig_images[name]
        for method, psi, post, signed in vs:
            for kind, target in (("top1", info["predicted"]), ("lowest", info["lowest"])):
                fig_maps.append(
                    {
                        "image": name,
                        "method": method,
                        "psi": psi,
                        "post": post,
                        "signed": signed,
                        "kind": kind,
                        "target": target,
                        "data": _small(_blob(rng, map_px, signed)),
                    }
                )

    checks = []

    def cell(
        check,
        method,
        psi,
        post,
        status,
        value,
        message,
        *,
        series=None,
        thresholds=None,
        metric=None,
        spread=None,
    ):
        per = [
            {"image": im, "value": None if value is None else round(float(value + 0.05 * rng.randn()), 4)}
            for im in images
        ]
        checks.append(
            {
                "check": check,
                "method": method,
                "psi": psi,
                "post": post,
                "status": status,
                "value": value,
                "metric": metric or CHECK_INFO[check]["metric"],
                "thresholds": thresholds if thresholds is not None else dict(CHECK_INFO[check]["thresholds"]),
                "message": message,
                "spread": spread
                if spread is not None
                else (None if value is None else round(0.05 + 0.1 * rng.rand(), 4)),
                "per_image": [] if value is None else per,
                "series": series or {},
                "params": dict(CHECK_INFO[check]["params"]),
            }
        )

    residuals = [float(10 ** rng.uniform(-8, -5)) for _ in images]
    cell(
        "completeness",
        "fullgrad",
        None,
        None,
        "pass",
        max(residuals),
        f"the decomposition adds up to the logit on all {n_images} images (worst relative "
        f"residual {max(residuals):.2e} ≤ 0.001)",
        series={"unaccounted": []},
    )

    cs_values = {
        "fullgrad": {
            "paper": 0.48,
            "signed": 0.08,
            "abs": 0.52,
            "positive": 0.31,
            "negative": 0.29,
            "per-channel": 0.61,
        },
        "gradient": {"signed": 0.12, "abs": 0.44},
        "integrated_gradients": {"signed": 0.1, "abs": 0.39},
        "gradcam": {"signed": 0.03, "abs": 0.05},
        "guided_backprop": {"signed": 0.97, "abs": 0.99},
        "random": {"signed": 1.0, "abs": 1.0},
        "edge": {"signed": 1.0, "abs": 1.0},
    }
    for method, psi, post, signed in vs:
        v = cs_values[method][psi or post]
        status = "fail" if v >= 0.7 else "warn" if v >= 0.4 else "pass"
        figs = {}
        for name in examples[:6]:
            info = fig_images[name]
            figs[name] = {
                "top1": _small(_blob(rng, map_px, signed)),
                "lowest": _small(_blob(rng, map_px, signed)),
                "lowest_class": info["lowest"],
            }
        cell(
            "class_sensitivity",
            method,
            psi,
            post,
            status,
            v,
            f"maps for the top-1 and the lowest class correlate at {v:.2f} "
            f"({'≥' if status != 'pass' else '<'} {0.7 if status == 'fail' else 0.4})",
            series={
                "spearman_hog": v,
                "spearman_raw": round(v * 0.9, 3),
                "ssim": round(min(1.0, v * 1.1), 3),
                "figures": figs,
            },
        )

    for method, psi, post, signed in vs:
        if method in ("random", "edge"):
            final = 1.0
        elif method == "guided_backprop":
            final = 0.91
        elif psi in ("abs", "paper", "per-channel") or post == "abs":
            final = 0.45 + 0.1 * rng.rand()
        else:
            final = 0.1 + 0.1 * rng.rand()
        status = "fail" if final >= 0.7 else "warn" if final >= 0.4 else "pass"
        curve = [1.0 + (final - 1.0) * (i / (len(STEPS) - 1)) ** 0.7 for i in range(len(STEPS))]
        ind = [1.0] + [0.3 + 0.5 * rng.rand() for _ in STEPS[1:]]
        figs = {}
        for name in examples[:6]:
            base = _blob(rng, map_px, signed)
            maps = []
            for i in range(len(STEPS)):
                w = (i / (len(STEPS) - 1)) * (1 - final)
                noise = _blob(rng, map_px, signed, sharp=0.6)
                maps.append(_small((1 - w) * base + w * noise))
            figs[name] = {"steps": list(STEPS), "maps": maps}
        cell(
            "randomization",
            method,
            psi,
            post,
            status,
            round(final, 4),
            f"on the fully randomized model the maps still correlate at {final:.2f} with the "
            "original" + (" (a control: expected)" if method in ("random", "edge") else ""),
            series={
                "cascading_spearman_abs": _curve(STEPS, curve, rng),
                "cascading_ssim": _curve(STEPS, [v * 0.8 for v in curve], rng),
                "independent_spearman_abs": _curve(STEPS[1:], ind[1:], rng),
                "figures": figs,
            },
        )

    pert_examples = examples[:4]
    for method, psi, post, _signed in vs:
        good = method not in ("random", "edge") and not (psi == "negative")
        lerf = [f * (0.15 if good else 0.55) for f in FRACTIONS]
        lerf_r = [f * 0.55 for f in FRACTIONS]
        morf = [min(1.0, f * (1.6 if good else 0.6)) for f in FRACTIONS]
        morf_r = [f * 0.6 for f in FRACTIONS]
        status = "pass" if good else ("fail" if method in ("random", "edge") else "warn")
        figs = {}
        for name in pert_examples:
            thumb = Image.open(
                io.BytesIO(base64.b64decode(fig_images[name]["thumbnail"].split(",", 1)[1]))
            ).convert("RGB")
            uris = []
            for f in FRACTIONS:
                arr = np.asarray(thumb).copy()
                mask = rng.rand(*arr.shape[:2]) < f
                arr[mask] = 128
                uris.append(_png_uri(Image.fromarray(arr).resize((48, 48))))
            figs[name] = {"perturbed": uris, "fractions": list(FRACTIONS), "order": "morf"}
        area = round(sum(a - b for a, b in zip(lerf_r, lerf)) / len(FRACTIONS), 4)
        cell(
            "perturbation",
            method,
            psi,
            post,
            status,
            area,
            (
                "better than random on LeRF and MoRF"
                if good
                else "no better than random on " + ("LeRF and MoRF" if status == "fail" else "MoRF")
            ),
            series={
                "lerf": _curve(FRACTIONS, lerf, rng),
                "lerf_random": _curve(FRACTIONS, lerf_r, rng),
                "morf": _curve(FRACTIONS, morf, rng),
                "morf_random": _curve(FRACTIONS, morf_r, rng),
                "figures": figs,
            },
        )

    for method, psi, post, _signed in vs:
        if (
            method == "guided_backprop"
            and post == "abs"
            or (method == "gradient" and post == "abs" and "guided_backprop" not in comparison)
        ):
            checks.append(
                {
                    "check": "sensitivity_n",
                    "method": method,
                    "psi": None,
                    "post": post,
                    "status": "error",
                    "value": None,
                    "metric": CHECK_INFO["sensitivity_n"]["metric"],
                    "thresholds": {"warn": 0.1},
                    "message": 'RuntimeError: CUDA out of memory in "sensitivity_n" <batch 3> & more',
                    "spread": None,
                    "per_image": [],
                    "series": {},
                    "params": {},
                }
            )
            continue
        peak = 0.05 if method == "random" else 0.2 + 0.6 * rng.rand()
        corr = [peak * math.exp(-((math.log2(n) - 5) ** 2) / 18) for n in SENS_N]
        status = "warn" if max(corr) < 0.1 else "pass"
        cell(
            "sensitivity_n",
            method,
            psi,
            post,
            status,
            round(max(corr), 4),
            f"correlation peaks at {max(corr):.2f}" + (" and stays below 0.1" if status == "warn" else ""),
            series={"correlation": _curve(SENS_N, corr, rng)},
        )

    for method, psi, post, signed in vs:
        signed_ok = signed and method not in ("random", "edge")
        flip = [f * (3.0 if signed_ok else 0.9) for f in FRACTIONS]
        flip_r = [f * 1.0 for f in FRACTIONS]
        status = "pass" if signed_ok else ("warn" if method not in ("random", "edge") else "fail")
        cell(
            "sign_flip",
            method,
            psi,
            post,
            status,
            round(flip[2] - flip_r[2], 4),
            "removing the evidence for the predicted class moves the log-odds towards the "
            "runner-up" + (" faster than random" if signed_ok else ", no faster than random"),
            series={"flip": _curve(FRACTIONS, flip, rng), "flip_random": _curve(FRACTIONS, flip_r, rng)},
        )

    for psi in PSIS:
        v = round(0.999 - 0.2 * (psi == "per-channel"), 4)
        cell(
            "bn_folding",
            "fullgrad",
            psi,
            None,
            "pass" if v >= 0.9 else "warn",
            v,
            f"maps before and after folding batch-norm have SSIM {v:.3f}; the decomposition stays complete",
            series={"ssim": v, "residual_after": 2.1e-7},
        )
    for method, psi, post, _ in vs:
        cell("pointing_game", method, psi, post, "skipped", None, "needs object masks (--masks DIR)")

    completeness = [
        {
            "image": im,
            "target": preds[i],
            "target_name": CLASSES[preds[i]],
            "logit": round(float(4 + 3 * rng.rand()), 4),
            "reconstructed": None,
            "relative_residual": residuals[i],
            "unaccounted": [],
        }
        for i, im in enumerate(images)
    ]
    for rec in completeness:
        rec["reconstructed"] = round(rec["logit"] * (1 - rec["relative_residual"]), 7)

    caveats = [
        {
            "kind": "abs_discards",
            "message": "Under ψ=paper, abs discards the sign of 41% of the "
            "bias-gradient mass (mean over 24 images): the map shows where evidence is, not which "
            "class it supports.",
            "numbers": {"negative_share": 0.41, "images": n_images},
        },
        {
            "kind": "psi_changes_verdict",
            "message": "class_sensitivity passes under ψ=signed "
            "(0.08) and fails or warns under ψ=paper (0.48), abs (0.52) and per-channel (0.61): the "
            "post-processing, not the model, decides this verdict.",
            "numbers": {"signed": 0.08, "paper": 0.48, "abs": 0.52, "per-channel": 0.61},
        },
        {
            "kind": "resembles_edge",
            "message": "guided_backprop/abs maps correlate at 0.83 with the "
            "edge-detector control: they may show image edges rather than the model's evidence.",
            "numbers": {"spearman_with_edge": 0.83},
        },
        {
            "kind": "choose_psi_by_metric",
            "message": "No ψ passes every check on this model: "
            "choose ψ by the metric that matters for your use (signed for sign_flip, paper for "
            "perturbation).",
            "numbers": {},
        },
    ]

    counts = {s: 0 for s in ("pass", "warn", "fail", "error", "skipped")}
    for c in checks:
        counts[c["status"]] += 1
    methods = [
        {
            "method": "fullgrad",
            "family": "fullgrad",
            "params": {"psi": list(PSIS)},
            "reference": "Srinivas & Fleuret, NeurIPS 2019",
            "status": "ok",
            "reason": None,
        }
    ]
    refs = {
        "gradient": "Simonyan et al., 2013",
        "integrated_gradients": "Sundararajan et al., ICML 2017",
        "gradcam": "Selvaraju et al., ICCV 2017",
        "guided_backprop": "Springenberg et al., 2014",
        "random": "control",
        "edge": "control (Sobel)",
    }
    methods += [
        {
            "method": m,
            "family": "comparison",
            "params": {},
            "reference": refs[m],
            "status": "ok",
            "reason": None,
        }
        for m in comparison
    ]
    methods.append(
        {
            "method": "occlusion",
            "family": "perturbation",
            "params": {"window": 8},
            "reference": "Zeiler & Fergus, ECCV 2014",
            "status": "error",
            "reason": 'RuntimeError: shape mismatch <3, 64> & "x"',
        }
    )
    values = {
        "output": "out",
        "format": ["html", "pdf", "json", "junit"],
        "psi": list(PSIS),
        "methods": ["fullgrad", *comparison],
        "post": ["signed", "abs"],
        "cam_layer": None,
        "max_images": None,
        "sample": None,
        "batch_size": 8,
        "seed": 0,
        "device": "auto",
        "fail_on": "fail",
        "arch": None,
        "num_classes": None,
        "input_size": None,
        "mean": None,
        "std": None,
        "labels": "shapes_labels.txt",
        "trust_model": False,
        "max_pixels": 64000000,
        "completeness_tolerance": 0.001,
        "checks": None,
        "thresholds": {"class_sensitivity": {"fail": 0.7}},
        "check_params": {},
        "flip": None,
        "masks": None,
        "overlays": True,
        "force": False,
        "examples": 6,
        "examples_html": 24,
        "page_size": "a4",
        "annotations": False,
    }
    sources = {k: "default" for k in values}
    sources.update(
        {
            "output": "flag",
            "format": "flag",
            "methods": "flag",
            "labels": "config file /work/proj/saliaudit.toml",
            "thresholds": "config file /work/proj/saliaudit.toml",
            "batch_size": "environment",
        }
    )
    return {
        "schema_version": "1.0",
        "tool": {"name": "saliaudit", "version": "0.1.0"},
        "run": {
            "started_at": "2025-06-01T12:00:00+00:00",
            "duration_s": 312.5,
            "seed": 0,
            "device": "cpu",
            "versions": {
                "saliaudit": "0.1.0",
                "python": "3.11.7",
                "torch": "2.10.0",
                "torchvision": "0.25.0",
                "numpy": "2.1.0",
                "pillow": "11.0.0",
                "platform": "Linux-6.1-x86_64",
            },
        },
        "config": {"values": values, "sources": sources, "file": "/work/proj/saliaudit.toml"},
        "model": {
            "path": "sample_models/shapes_vgg.pt2",
            "sha256": "ab" * 32,
            "format": "export",
            "arch": None,
            "num_classes": 4,
            "input_size": [64, 64],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "static_batch": None,
            "class_names": list(CLASSES),
            "sources": {"class_names": "labels file"},
            "limitations": [],
            "notes": ["exported with a dynamic batch size"],
        },
        "inputs": {
            "source": "sample_models/images/shapes",
            "found": n_images + 3,
            "loaded": n_images,
            "skipped": [
                {"path": "broken/truncated.png", "reason": "truncated file"},
                {"path": "notes.txt", "reason": "not an image (text/plain)"},
                {
                    "path": "bad/<img src=x onerror=alert(3)> ü.png",
                    "reason": "decompression bomb: 90000000 pixels > 64000000",
                },
            ],
            "class_names_from_folders": False,
        },
        "summary": {"status": "fail", "fail_on": "fail", "counts": counts, "gate_failed": True},
        "checks": checks,
        "check_info": {k: dict(v) for k, v in CHECK_INFO.items()},
        "caveats": caveats,
        "completeness": completeness,
        "images": image_records,
        "maps": [
            {
                "image": images[0],
                "method": "fullgrad",
                "psi": "paper",
                "target": 3,
                "path": "maps/hostile.fullgrad.paper.png",
                "signed": False,
                "post": None,
            }
        ],
        "methods": methods,
        "figures": {"images": fig_images, "maps": fig_maps, "ranking": ranking},
        "timings": {
            "total_s": 312.5,
            "per_stage": {"load": 1.2, "decompose": 40.1, "checks": 260.3, "write": 10.9},
        },
    }
