"""Benchmark: every saliency method of saliaudit against the floor, next to Captum and pytorch-grad-cam.

The floor is the one forward + backward pass that any gradient saliency map needs: the model's
eager forward and the gradient of the target logits with respect to the input (parameters
frozen), on the same batch, in the same process. Every registered method
(``saliaudit.methods.method_names()``, FullGrad included) runs through ``saliaudit.methods.explain`` with
its default parameters (``Method.params``) and the top-1 class as target; next to it, when
importable, the matching Captum and pytorch-grad-cam implementation with the same parameters
(same steps, samples, window, stride, baseline, internal batch and CAM layer). ``-`` marks a
method without a matching reference. Each cell: one warm-up run, then ``--repeats`` timed
runs, each between two floor runs (the machine's speed may drift, on a shared machine a lot);
``seconds`` is the median time, ``×floor`` the median of each run's time over the mean of its two
neighbouring floor runs. A run longer than ``--budget`` seconds is not repeated: that first run
is the measurement (the ``runs`` column says how many runs each cell used, ``1*`` = that one).

Run:  python bench/methods.py [--arch resnet50] [--batch 8] [--size 224] [--repeats 3]
                              [--methods gradient,occlusion,...] [--budget 120] [--threads 2]
      python bench/methods.py --quick     # resnet18, batch 2, 64x64, 1 repeat (used by the tests)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saliaudit.graph import get_graph  # noqa: E402
from saliaudit.methods import METHODS, explain, method_names  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: skimage.data photographs shipped with scikit-image (nothing is downloaded).
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "immunohistochemistry",
    "hubble_deep_field",
)


# --------------------------------------------------------------------------- inputs and timing


def photos(batch: int, size: int) -> torch.Tensor:
    """``batch`` real photographs (skimage.data, cycled), resized to ``size``², ImageNet-normalized.
    Falls back to seeded smooth noise when scikit-image is not installed."""
    try:
        import skimage.data
        from PIL import Image
    except ImportError:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 3, max(size // 8, 1), max(size // 8, 1), generator=gen)
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    else:
        imgs = []
        for i in range(batch):
            a = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
            if a.ndim == 2:
                a = np.stack([a] * 3, axis=-1)
            im = Image.fromarray(np.ascontiguousarray(a[..., :3]).astype(np.uint8))
            side = min(im.size)  # centre square crop, then resize
            left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
            imgs.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
        x = torch.stack(imgs)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Timer:
    """Times a function against the floor, the two run alternately.

    On a shared machine the speed changes from minute to minute, so every timed run of a method
    is paired with floor runs taken just before and after it, and the ratio of the pair is the
    measurement: ``×floor`` is the median of those per-run ratios, ``seconds`` the median of
    the raw times. Every floor run is kept for the floor row.
    """

    def __init__(self, floor: Callable[[], Any], repeats: int, budget: float):
        self.floor, self.repeats, self.budget = floor, repeats, budget
        floor()  # warm-up
        self.floors = [timed(floor)]

    def _floor(self) -> float:
        self.floors.append(timed(self.floor))
        return self.floors[-1]

    def measure(self, fn: Callable[[], Any]) -> tuple[float, float, str]:
        """``(seconds, ratio to the floor, runs)``: medians over ``repeats`` runs after a
        warm-up run, or, when the first run took longer than ``budget`` seconds, that first run
        alone (``runs = "1*"``)."""
        before = self.floors[-1]
        first = timed(fn)
        after = self._floor()
        if first > self.budget:
            return first, first / ((before + after) / 2), "1*"
        times, ratios = [], []
        for _ in range(self.repeats):
            before = self.floors[-1]
            times.append(timed(fn))
            ratios.append(times[-1] / ((before + self._floor()) / 2))
        return statistics.median(times), statistics.median(ratios), str(self.repeats)


def no_inplace(model: torch.nn.Module, *, trainable: bool = False) -> torch.nn.Module:
    """A copy with non-inplace ReLUs (hook-based libraries need them)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, torch.nn.ReLU):
            mod.inplace = False
    for p in m.parameters():
        p.requires_grad_(trainable)
    return m


def unique_activations(model: torch.nn.Module) -> torch.nn.Module:
    """An fx copy of ``model`` in which every call of an activation module has its own module.

    Captum's DeepLift raises on a ReLU module used more than once (torchvision's
    BasicBlock/Bottleneck reuse ``self.relu``); this is the rewrite a Captum user needs.
    """
    gm = torch.fx.symbolic_trace(no_inplace(model))
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        count = seen.get(node.target, 0)
        seen[node.target] = count + 1
        if count:
            name = f"{node.target.replace('.', '_')}_use{count}"
            gm.add_submodule(name, copy.deepcopy(gm.get_submodule(node.target)))
            node.target = name
    gm.recompile()
    return gm.eval()


# --------------------------------------------------------------------------- references


def captum_reference(
    name: str,
    params: dict[str, Any],
    model: torch.nn.Module,
    hook_model: torch.nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    cam_module: torch.nn.Module | None,
) -> tuple[str, Callable[[], Any]] | None:
    """``(what, fn)`` running Captum's counterpart of ``name`` with the same parameters, or None.

    Captum's gradient-only attributions run ``model``, the very module saliaudit runs (its
    in-place ReLUs make the backward pass slower: saliaudit's integrated gradients on resnet50
    took 66-70 s on it and 60 s on a copy without them, Captum's 60 s on that copy); its
    hook-based ones (guided backprop, DeepLift, LayerGradCam) need ``hook_model``, a copy
    without in-place ReLUs, with ``cam_module`` inside it.
    """
    try:
        import captum.attr as ca
    except ImportError:
        return None
    b = x.shape[0]
    tgt = targets.tolist()
    from saliaudit.cost import rows_per_pass

    rows = rows_per_pass(params.get("internal_batch"))  # the same chunks as saliaudit's
    per_eval = max(1, rows // b)
    if name == "gradient":
        s = ca.Saliency(model)
        return "Saliency(abs=False)", lambda: s.attribute(x, target=tgt, abs=False)
    if name == "grad_x_input":
        s = ca.InputXGradient(model)
        return "InputXGradient", lambda: s.attribute(x, target=tgt)
    if name == "integrated_gradients":
        if params["baseline"] != "black" or params["n_baselines"] != 1:
            return None
        ig = ca.IntegratedGradients(model)
        return (
            f"IntegratedGradients(n_steps={params['steps']}, {params['integration']})",
            lambda: ig.attribute(
                x,
                baselines=0.0,
                target=tgt,
                n_steps=params["steps"],
                method=params["integration"],
                internal_batch_size=rows,
            ),
        )
    if name in ("smoothgrad", "smoothgrad_sq"):
        nt = ca.NoiseTunnel(ca.Saliency(model))
        # saliaudit: σ = noise·(max − min) per image; Captum takes one σ: the batch's range
        sigma = float(params["noise"]) * float(x.max() - x.min())
        return (
            f"NoiseTunnel(Saliency, {name}, nt_samples={params['samples']})",
            lambda: nt.attribute(
                x,
                nt_type=name,
                nt_samples=params["samples"],
                nt_samples_batch_size=per_eval,
                stdevs=sigma,
                target=tgt,
                abs=False,
            ),
        )
    if name == "guided_backprop":
        gb = ca.GuidedBackprop(hook_model)
        return "GuidedBackprop", lambda: gb.attribute(x, target=tgt)
    if name == "deeplift":
        if params["baseline"] not in ("black", "zero"):
            return None
        dl = ca.DeepLift(unique_activations(hook_model))  # black = zeros for a bare module
        return "DeepLift (fx copy, one ReLU per call)", lambda: dl.attribute(x, baselines=0.0, target=tgt)
    if name == "occlusion":
        if params["baseline"] != "black":
            return None
        occ = ca.Occlusion(model)
        c, p, s = x.shape[1], int(params["patch"]), int(params["stride"])
        return (
            f"Occlusion(window {p}, stride {s})",
            lambda: occ.attribute(
                x,
                sliding_window_shapes=(c, p, p),
                strides=(c, s, s),
                baselines=0.0,
                target=tgt,
                perturbations_per_eval=per_eval,
            ),
        )
    if name == "gradcam" and cam_module is not None:
        lgc = ca.LayerGradCam(hook_model, cam_module)

        def run() -> torch.Tensor:
            a = lgc.attribute(x, target=tgt, relu_attributions=bool(params["relu"]))
            return ca.LayerAttribution.interpolate(a, tuple(x.shape[-2:]), "bilinear")

        return "LayerGradCam + bilinear upsampling", run
    return None


def gradcam_reference(
    name: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    cam_module: torch.nn.Module | None,
) -> tuple[str, Callable[[], Any], Any] | None:
    """``(what, fn, cam)`` running pytorch-grad-cam's counterpart of ``name``, or None."""
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None
    classes = {"gradcam": pgc.GradCAM, "gradcam_pp": pgc.GradCAMPlusPlus, "fullgrad": pgc.FullGrad}
    if name not in classes or (name != "fullgrad" and cam_module is None):
        return None
    cam = classes[name](model=model, target_layers=[] if name == "fullgrad" else [cam_module])
    # parameters stay frozen; the input gradient makes the layer's gradient flow, as in the floor
    cam.compute_input_gradient = True
    cam_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    return classes[name].__name__, lambda: cam(input_tensor=x.clone(), targets=cam_targets), cam


# --------------------------------------------------------------------------- main


def fmt_s(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t:.1f}" if t >= 100 else f"{t:.3f}" if t >= 0.1 else f"{t:.2g}"


def fmt_r(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.1f}" if r >= 10 else f"{r:.2f}" if r >= 0.1 else f"{r:.2g}"


def row(name: str, cells: list[tuple[float | None, float | None, str]]) -> str:
    """One table row: method | runs | seconds | ×floor for saliaudit, Captum, pytorch-grad-cam."""
    runs = "/".join(r for _, _, r in cells)
    return f"| {name} | {runs} | " + " | ".join(f"{fmt_s(t)} | {fmt_r(r)}" for t, r, _ in cells) + " |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset [default: fullgrad and every registered method]",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=120.0,
        help="a run longer than this (seconds) is measured once, not repeated",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-references", action="store_true", help="time saliaudit only")
    ap.add_argument(
        "--quick", action="store_true", help="resnet18, batch 2, 64x64, 1 repeat (a smoke run for the tests)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.arch, args.batch, args.size, args.repeats = "resnet18", 2, 64, 1
    all_names = method_names()  # FullGrad first, then every registered method
    # the slowest last (occlusion: thousands of forward passes), so the table fills up first
    default = sorted(all_names, key=lambda n: n == "occlusion")
    names = default if not args.methods else [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in all_names]
    if unknown:
        ap.error(f"unknown method {unknown[0]!r}; choose from " + ", ".join(all_names))

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")  # Captum's hook notices, torch deprecations
    model = torchvision.models.get_model(args.arch, weights=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = photos(args.batch, args.size)
    with torch.no_grad():
        targets = model(x).argmax(1)

    versions = [f"torch {torch.__version__}"]
    for mod in ("captum", "pytorch_grad_cam"):
        try:
            m = __import__(mod)
            versions.append(f"{mod} {getattr(m, '__version__', 'installed')}")
        except ImportError:
            versions.append(f"{mod} not importable")
    print(
        f"python bench/methods.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(), flush=True
    )
    print(
        f"{datetime.date.today().isoformat()} · {args.arch}, random weights, batch {args.batch}, "
        f"{args.size}x{args.size} skimage photos, top-1 targets · {', '.join(versions)} · "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()} · "
        f"median of {args.repeats} after a warm-up; budget {args.budget:g} s · "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )

    def floor() -> torch.Tensor:
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        return torch.autograd.grad(out.gather(1, targets[:, None]).sum(), [xi])[0]

    timer = Timer(floor, args.repeats, args.budget)
    t0 = time.perf_counter()
    get_graph(model, x)  # one-off torch.export capture, cached per model (CAM, propagation)
    export_s = time.perf_counter() - t0
    from saliaudit.methods.layers import find_cam_layer  # after method_names(): registry order

    try:
        cam_layer = find_cam_layer(model, x)
        cam_module = model.get_submodule(cam_layer)
    except Exception:  # noqa: BLE001 - a layer that is no module path: CAM references left out
        cam_layer, cam_module = None, None
    print(
        f"one-off graph capture (torch.export) {export_s:.2f} s, not in the times below; "
        f"CAM layer {cam_layer}"
    )

    ref_model = no_inplace(model)
    cam_model = no_inplace(model)
    ref_cam = ref_model.get_submodule(cam_layer) if cam_module is not None else None
    pgc_cam = cam_model.get_submodule(cam_layer) if cam_module is not None else None
    rows, notes = [], []
    for name in names:
        params = dict(METHODS[name].params)
        cells: list[tuple[float | None, float | None, str]] = []
        try:
            cells.append(timer.measure(lambda name=name: explain(model, x, targets, method=name)))
        except Exception as err:  # noqa: BLE001 - reported, the table goes on
            cells.append((None, None, "-"))
            notes.append(f"{name}: saliaudit failed: {type(err).__name__}: {err}")
        refs, pg = [], None
        if not args.no_references:
            refs.append(captum_reference(name, params, model, ref_model, x, targets, ref_cam))
            pg = gradcam_reference(name, cam_model, x, targets, pgc_cam)
            refs.append(pg[:2] if pg else None)
        for lib, ref in zip(("Captum", "pytorch-grad-cam"), refs):
            if ref is None:
                cells.append((None, None, "-"))
                continue
            what, fn = ref
            try:
                cells.append(timer.measure(fn))
                notes.append(f"{name}: {lib} {what}")
            except Exception as err:  # noqa: BLE001
                cells.append((None, None, "-"))
                notes.append(f"{name}: {lib} {what} failed: {type(err).__name__}: {str(err)[:200]}")
            gc.collect()
        if pg is not None:
            pg[2].activations_and_grads.release()  # remove pytorch-grad-cam's hooks
        while len(cells) < 3:
            cells.append((None, None, "-"))
        rows.append((name, cells))
        # the row as soon as it is measured (stderr), so that an interrupted run keeps its rows
        print(f"  {row(name, cells)}  (floor now {timer.floors[-1]:.3f} s)", file=sys.stderr, flush=True)

    print()
    print("| method | runs | saliaudit s | ×floor | Captum s | ×floor | pytorch-grad-cam s | ×floor |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    floors = timer.floors
    print(
        f"| floor: forward + input gradient | {len(floors)} | {statistics.median(floors):.3f} | 1.00"
        " | | | | |"
    )
    for name, cells in rows:
        print(row(name, cells))
    print()
    print(
        f"floor runs: median {statistics.median(floors):.3f} s, min {min(floors):.3f} s, "
        f"max {max(floors):.3f} s over {len(floors)} runs interleaved with the methods."
    )
    print(
        "seconds: median of the runs; ×floor: median of each run's time over the mean of the "
        "floor runs just before and after it."
    )
    print("runs: saliaudit/Captum/pytorch-grad-cam; 1* = one run longer than the budget, not repeated.")
    for note in notes:
        print(f"- {note}")
    bad = [n for n, cells in rows if cells[0][1] is None or not math.isfinite(cells[0][1])]
    if bad:
        sys.exit(f"saliaudit failed on: {', '.join(bad)}")


if __name__ == "__main__":
    main()
