"""Benchmark: a default audit's time per stage against its floor, and Quantus side by side.

1. The default audit (every default method, every ψ, every check; overlays and report
   rendering off) of MODEL on IMAGES, run in this process through ``saliaudit.engine.run_audit``;
   its time per stage is printed with its ratio to the floor.
2. The floor: the forward and backward passes no audit can avoid, i.e. one forward pass and the
   input gradient of the top-1 logit for every image, in the audit's batches, same process.
3. The checks that Quantus also implements, on the same model, images and gradient maps:
   saliaudit's ``randomization``, ``class_sensitivity``, ``perturbation`` and ``sensitivity_n``
   (``--methods gradient --post abs``) against Quantus' ``MPRT``, ``RandomLogit``,
   ``PixelFlipping`` and ``SensitivityN`` with ``explain_func=quantus.explain``
   (``method="Saliency"``, Captum's |gradient|), when Quantus is importable.

The two libraries do not do the same amount of work per check, so the table prints what each
computed (map computations, forward passes) next to its time:

- MPRT re-initializes every parametrized layer top-down, one explanation per layer and
  image; saliaudit's cascade goes by blocks, and it also runs the independent variant.
- RandomLogit compares the map of the target with that of one random other class; saliaudit
  compares top-1 with the lowest class and with the runner-up (three maps per image) under
  three similarity measures.
- PixelFlipping removes ``features_in_step`` pixels per step until the image is gone, one
  forward pass per step; saliaudit removes 5 fractions in LeRF and MoRF order and 3 random
  orders, batched.
- SensitivityN evaluates, for each n, one subset per step; saliaudit draws 100 random patch
  subsets per n at 8 values of n, batched.

Quantus is a bench-only dependency (it requires the GUI ``opencv-python``, which clashes with
the ``opencv-python-headless`` saliaudit uses), so install it without its dependencies::

    pip install --no-deps quantus==0.6.0 && pip install pandas cachetools matplotlib tqdm

Run:  python bench/audit.py [--model M.pt2] [--images DIR] [--batch-size 8] [--threads 2]
                            [--no-quantus] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sample_models"))

from saliaudit.config import resolve_config  # noqa: E402
from saliaudit.data import find_images, iter_decoded  # noqa: E402
from saliaudit.engine import run_audit  # noqa: E402
from saliaudit.model import load_model  # noqa: E402

MATCHING = (
    ("randomization", "MPRT"),
    ("class_sensitivity", "RandomLogit"),
    ("perturbation", "PixelFlipping"),
    ("sensitivity_n", "SensitivityN"),
)


def _audit(model: Path, images: Path, flags: dict[str, Any], out: Path) -> dict[str, Any]:
    cfg = resolve_config({"overlays": False, "format": "json", "force": True, **flags}, cwd=out, environ={})
    t0 = time.perf_counter()
    result = run_audit(model, images, cfg, out)
    return {
        "wall_s": time.perf_counter() - t0,
        "per_stage": dict(result.timings["per_stage"]),
        "images": len(result.images),
        "checks": result.checks,
    }


def _images(model_path: Path, images: Path) -> tuple[Any, torch.Tensor]:
    lm = load_model(model_path)
    decoded = [d.image for d in iter_decoded(find_images(images)) if hasattr(d, "image")]
    return lm, lm.preprocess(decoded)


def _floor(lm: Any, x: torch.Tensor, batch: int, repeats: int) -> float:
    """Median time of one forward pass + input gradient of the top-1 logit over all images."""

    def once() -> None:
        for i in range(0, len(x), batch):
            xi = x[i : i + batch].clone().requires_grad_(True)
            out = lm.module(xi)
            t = out.argmax(1, keepdim=True)
            torch.autograd.grad(out.gather(1, t).sum(), [xi])

    once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _quantus(x: torch.Tensor, y: np.ndarray, state_dict: Path, batch: int) -> dict[str, tuple[float, str]]:
    """Quantus' matching metrics with Saliency explanations; ``{metric: (seconds, work)}``."""
    import quantus
    from archs import ShapesVGG

    model = ShapesVGG()
    model.load_state_dict(torch.load(state_dict, weights_only=True))
    model.eval()
    xb = x.numpy().astype(np.float32)
    n, _, h, w = xb.shape
    layers = sum(1 for m in model.modules() if list(m.parameters(recurse=False)))
    common = dict(
        model=model,
        x_batch=xb,
        y_batch=y,
        a_batch=None,
        explain_func=quantus.explain,
        explain_func_kwargs={"method": "Saliency"},
        device="cpu",
        batch_size=batch,
    )
    step = 64
    metrics: list[tuple[str, Callable[[], Any], str]] = [
        (
            "MPRT",
            lambda: quantus.MPRT(
                layer_order="top_down",
                similarity_func=quantus.similarity_func.correlation_spearman,
                disable_warnings=True,
            )(**common),
            f"{layers} layers × {n} images explanations",
        ),
        (
            "RandomLogit",
            lambda: quantus.RandomLogit(num_classes=4, disable_warnings=True)(**common),
            f"2 × {n} explanations, SSIM",
        ),
        (
            "PixelFlipping",
            lambda: quantus.PixelFlipping(
                features_in_step=step, perturb_baseline="black", disable_warnings=True
            )(**common),
            f"{h * w // step} steps of {step} px × {n} images forward passes",
        ),
        (
            "SensitivityN",
            lambda: quantus.SensitivityN(
                features_in_step=step,
                n_max_percentage=0.8,
                similarity_func=quantus.similarity_func.correlation_pearson,
                perturb_baseline="black",
                disable_warnings=True,
            )(**common),
            f"{int(h * w * 0.8) // step} n values, {step} px steps × {n} images",
        ),
    ]
    out = {}
    for name, fn, work in metrics:
        t0 = time.perf_counter()
        try:
            fn()
            out[name] = (time.perf_counter() - t0, work)
        except Exception as err:  # a peer library failing is reported, not fatal
            out[name] = (float("nan"), f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "sample_models" / "shapes_vgg.pt2")
    ap.add_argument(
        "--state-dict",
        type=Path,
        default=ROOT / "sample_models" / "shapes_vgg.pt",
        help="the same weights as a ShapesVGG state_dict, for Quantus",
    )
    ap.add_argument("--images", type=Path, default=ROOT / "sample_models" / "images" / "shapes")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-quantus", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm, x = _images(args.model, args.images)
    floor = _floor(lm, x, args.batch_size, args.repeats)
    print(
        f"model {args.model.name}, {len(x)} images {tuple(x.shape[2:])}, batch {args.batch_size}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"floor (forward + input gradient of every image, median of {args.repeats}): {floor:.3f} s\n")

    with tempfile.TemporaryDirectory() as tmp:
        full = _audit(args.model, args.images, {"batch_size": args.batch_size}, Path(tmp) / "full")
        grad = _audit(
            args.model,
            args.images,
            {
                "batch_size": args.batch_size,
                "methods": "gradient",
                "post": "abs",
                "checks": ",".join(c for c, _ in MATCHING),
            },
            Path(tmp) / "grad",
        )
    print(
        f"default audit: {full['images']} images, {len(full['checks'])} verdict cells, "
        f"{full['wall_s']:.1f} s wall = {full['wall_s'] / floor:.0f}× the floor"
    )
    print(f"{'stage':<32}{'s':>9}{'× floor':>10}")
    for stage, sec in sorted(full["per_stage"].items(), key=lambda kv: -kv[1]):
        print(f"{stage:<32}{sec:>9.2f}{sec / floor:>10.1f}")
    stats_s = full["per_stage"].get("statistics", float("nan"))
    print(
        f"statistics of the verdicts (intervals, paired tests against the controls, FDR): "
        f"{stats_s:.2f} s = {100 * stats_s / full['wall_s']:.2f}% of the audit"
    )

    print(
        "\nmatching checks on gradient maps (saliaudit --methods gradient --post abs) vs Quantus 'Saliency':"
    )
    q: dict[str, tuple[float, str]] = {}
    if not args.no_quantus:
        try:
            y = lm.module(x).argmax(1).numpy()
            q = _quantus(x.detach(), y, args.state_dict, args.batch_size)
        except ImportError as err:
            print(f"  Quantus not importable ({err}); see this file's docstring to install it")
    print(
        f"{'saliaudit check':<20}{'s':>8}{'× floor':>9}   {'Quantus':<15}{'s':>8}{'× floor':>9}  Quantus work"
    )
    for check, metric in MATCHING:
        s = grad["per_stage"].get(f"check:{check}", float("nan"))
        qs, work = q.get(metric, (float("nan"), "not run"))
        print(f"{check:<20}{s:>8.2f}{s / floor:>9.1f}   {metric:<15}{qs:>8.2f}{qs / floor:>9.1f}  {work}")
    print(
        f"\n(method gradient itself: {grad['per_stage'].get('method:gradient', float('nan')):.3f} s; "
        f"the whole gradient-only audit: {grad['wall_s']:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
