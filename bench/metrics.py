"""Benchmark: the evidence-per-map checks against their floor and their reference implementations.

For each check (``road``, ``infidelity``, ``max_sensitivity``, ``input_invariance``,
``random_logit`` and ``randomization`` with ``variant = emprt``), on one batch of real
photographs (skimage.data) through a torchvision network with random weights (no download):

* **saliaudit**: ``check.measure(batch, source, maps)`` with its default parameters, on the maps
  of one method (``--method``, default ``gradient``, post-processings ``signed`` and ``abs``:
  two map variants, as in an audit). The maps are computed before the clock starts, as the
  audit shares them between checks.
* **floor**: the passes the check declares (``Check.cost`` + ``Check.shared_cost``, per image ×
  batch) times the calibrated time of one forward row and one forward+backward row of the
  model (:func:`saliaudit.cost.calibrate`, the audit's own calibration), plus its map
  computations × the measured time of one map computation. ``×floor`` = measured / floor.
* **reference**, where one exists, on the same batch, maps and parameters, run once per map
  variant (the references evaluate one attribution at a time): Captum's
  ``metrics.infidelity(normalize=True)`` and ``metrics.sensitivity_max``, pytorch-grad-cam's
  ``ROADCombined`` (MoRF and LeRF over the same removal fractions; one sparse SciPy solve per
  image and fraction), and Quantus' ``ROAD`` when ``quantus`` is importable (it is not a
  dependency: it requires ``opencv-python``, which clashes with ``opencv-python-headless``;
  ``-`` otherwise). ``ref / saliaudit`` = reference time / saliaudit time.

Every cell is one run after a warm-up on one image (a full run of the reference checks
takes minutes on a 2-core CPU); the machine's speed is printed with the floor so that the
ratios, not the seconds, are what to compare.

Run:  python bench/metrics.py [--arch resnet50] [--batch 8] [--size 224] [--threads 2]
                              [--checks road,infidelity,...] [--method gradient] [--no-reference]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saliaudit.checks import check_names, get_check  # noqa: E402
from saliaudit.cost import CostContext, calibrate, rows_limit  # noqa: E402
from saliaudit.errors import SaliauditError  # noqa: E402
from saliaudit.maps import Batch  # noqa: E402
from saliaudit.methods import build_source, get_method  # noqa: E402
from saliaudit.model import wrap_module  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "bench" / "methods.py")
_bm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bm)  # type: ignore[union-attr]
photos = _bm.photos

CHECKS = ("road", "infidelity", "max_sensitivity", "input_invariance", "random_logit", "randomization")
PARAMS: dict[str, dict[str, Any]] = {"randomization": {"variant": "emprt"}}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def make_batch(lm: Any, x: torch.Tensor) -> Batch:
    with torch.no_grad():
        logits = lm.logits(x)
    names = [f"photo_{i}.png" for i in range(x.shape[0])]
    return Batch(lm, x, names, logits.argmax(1), logits, [None] * len(names), None, 0, 0, set())


# ----------------------------------------------------------------------------- references


def ref_infidelity(batch: Batch, maps: dict, check: Any) -> float:
    from captum.metrics import infidelity

    from saliaudit.checks.infidelity import infidelity_perturbations

    n, (h, w), c = int(check.p["n_perturb"]), batch.x.shape[2:], batch.x.shape[1]
    pert = torch.stack(
        [infidelity_perturbations(batch.seed, im, n, h, w, check.p["sigma"]) for im in batch.images]
    )

    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = pert.reshape(-1, 1, h, w).expand(-1, c, h, w)
        return p, inputs - p

    t0 = time.perf_counter()
    for m in maps.values():
        attr = (m / c)[:, None].expand(-1, c, h, w)
        with torch.no_grad():
            infidelity(
                batch.model.logits,
                perturb,
                batch.x,
                attr,
                target=batch.targets.tolist(),
                n_perturb_samples=n,
                normalize=True,
            )
    return time.perf_counter() - t0


def ref_max_sensitivity(batch: Batch, source: Any, maps: dict, check: Any) -> float:
    from captum.metrics import sensitivity_max

    n = int(check.p["n_perturb"])
    t0 = time.perf_counter()
    for v in maps:

        def explain(inputs: Any, target: Any = None, v=v) -> Any:
            x = inputs[0] if isinstance(inputs, tuple) else inputs
            t = torch.as_tensor(target).reshape(-1)
            t = t.repeat_interleave(x.shape[0] // t.numel())
            m = source.maps(batch.model, x, t)[v][:, None]
            return (m,) if isinstance(inputs, tuple) else m

        sensitivity_max(
            explain,
            batch.x,
            perturb_radius=float(check.p["radius"]),
            n_perturb_samples=n,
            max_examples_per_batch=batch.x.shape[0],
            target=batch.targets.tolist(),
        )
    return time.perf_counter() - t0


def ref_road_gradcam(batch: Batch, maps: dict, fractions: list[float]) -> float:
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    metric = ROADCombined(percentiles=[round(f * 100) for f in fractions])
    targets = [ClassifierOutputTarget(int(t)) for t in batch.targets]
    module = batch.model.module
    t0 = time.perf_counter()
    for m in maps.values():
        with torch.no_grad():
            metric(batch.x, m.numpy().astype(np.float32), targets, module)
    return time.perf_counter() - t0


def ref_road_quantus(batch: Batch, maps: dict, fractions: list[float]) -> float | None:
    try:
        import quantus
    except Exception:  # not installed (see the module docstring)
        return None
    metric = quantus.ROAD(
        noise=0.01,
        perturb_func=quantus.perturb_func.noisy_linear_imputation,
        percentages=[f * 100 for f in fractions],
    )
    t0 = time.perf_counter()
    for m in maps.values():
        metric(
            model=batch.model.module,
            x_batch=batch.x.numpy(),
            y_batch=batch.targets.numpy(),
            a_batch=m[:, None].numpy(),
            device="cpu",
        )
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="gradient")
    ap.add_argument("--checks", default=",".join(CHECKS))
    ap.add_argument("--no-reference", action="store_true", help="time saliaudit only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    known = set(check_names())
    names = [c for c in args.checks.split(",") if c]
    missing = [c for c in names if c not in known]
    if missing:
        sys.exit(f"unknown checks: {', '.join(missing)} (saliaudit checks lists them)")

    net = getattr(torchvision.models, args.arch)(weights=None).eval()
    lm = wrap_module(net, input_size=args.size, mean=_bm.IMAGENET_MEAN, std=_bm.IMAGENET_STD)
    x = photos(args.batch, args.size)
    batch = make_batch(lm, x)
    cal = calibrate(lm, args.batch)
    source = build_source(args.method, post=["signed", "abs"])
    source.maps(lm, x[:1], batch.targets[:1])  # warm-up
    map_s, maps = timed(lambda: source.maps(lm, x, batch.targets))
    method_pass = get_method(args.method).passes(source.params, (args.size, args.size))
    ctx = CostContext(method_pass, len(maps), (args.size, args.size), signed=1, model=lm)

    print(
        f"# bench/metrics.py: {args.arch} (random weights), batch {args.batch}, {args.size}², "
        f"method {args.method} (signed, abs), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print(
        f"# one row: forward {cal.forward_s * 1e3:.1f} ms, forward+backward {cal.backward_s * 1e3:.1f} ms; "
        f"{args.method} maps of the batch {map_s:.2f} s"
    )
    head = f"{'check':28s} {'saliaudit s':>11s} {'floor s':>9s} {'×floor':>7s}   {'reference':34s} {'ref s':>8s} {'ref/ours':>8s}"
    print(head)
    print("-" * len(head))
    for name in names:
        check = get_check(name)(params=PARAMS.get(name))
        per_image = check.cost(ctx) + check.shared_cost(ctx)
        total = per_image * args.batch
        floor = cal.floor(total) + total.maps * map_s / args.batch
        small = batch.select([0])
        try:
            with rows_limit(cal.rows()):
                check.measure(small, source, {v: m[:1] for v, m in maps.items()})  # warm-up
                check = get_check(name)(params=PARAMS.get(name))
                ours, _ = timed(lambda c=check: c.measure(batch, source, maps))
        except SaliauditError as err:  # e.g. input_invariance on a zero-padded first layer
            print(f"{name:28s} skipped: {str(err).splitlines()[0]}", flush=True)
            continue
        refs: list[tuple[str, float | None]] = []
        if not args.no_reference:
            if name == "infidelity":
                refs.append(("captum.metrics.infidelity", ref_infidelity(batch, maps, check)))
            elif name == "max_sensitivity":
                refs.append(
                    ("captum.metrics.sensitivity_max", ref_max_sensitivity(batch, source, maps, check))
                )
            elif name == "road":
                fr = [float(f) for f in check.p["fractions"]]
                refs.append(("pytorch-grad-cam ROADCombined", ref_road_gradcam(batch, maps, fr)))
                refs.append(("quantus.ROAD", ref_road_quantus(batch, maps, fr)))
        label = name + (
            f" ({', '.join(f'{k}={v}' for k, v in PARAMS[name].items())})" if name in PARAMS else ""
        )
        ratio = ours / floor if floor > 0 else float("nan")
        first = refs[0] if refs else ("-", None)
        for i, (ref, t) in enumerate(refs or [first]):
            lead = (
                f"{label:28s} {ours:11.2f} {floor:9.2f} {ratio:7.2f}"
                if i == 0
                else f"{'':28s} {'':11s} {'':9s} {'':7s}"
            )
            ref_s = f"{t:8.2f}" if t is not None else f"{'-':>8s}"
            rel = f"{t / ours:8.2f}" if t is not None else f"{'-':>8s}"
            print(f"{lead}   {ref:34s} {ref_s} {rel}", flush=True)


if __name__ == "__main__":
    main()
