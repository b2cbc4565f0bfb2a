"""Benchmark: FullGrad decomposition + all six ψ against the floor, and peer implementations.

The floor is the one forward + backward pass that any gradient saliency map needs: the model's
eager forward and the gradient of the target logits with respect to the input (parameters
frozen), on the same batch, in the same process. Reported as a ratio (lower is better).

Run:  python bench/fullgrad.py [--arch resnet50|vit_b_16|swin_t] [--batch 8] [--size 224] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saliaudit.graph import get_graph  # noqa: E402
from saliaudit.methods.fullgrad import full_gradients  # noqa: E402
from saliaudit.psi import PSI_PRESETS  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.arch, weights=None).eval()
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.requires_grad_(False)
        if p.abs().sum() == 0:  # zero-initialized heads and class tokens: random, as trained
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    x = torch.rand(args.batch, 3, args.size, args.size)
    targets = torch.arange(args.batch) % 1000
    print(
        f"{args.arch}, batch {args.batch}, {args.size}x{args.size}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )

    def floor():
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        return torch.autograd.grad(out.gather(1, targets[:, None]).sum(), [xi])[0]

    t0 = time.perf_counter()
    get_graph(model, x)  # one-off torch.export capture, cached per model
    export_s = time.perf_counter() - t0

    def ours():
        fg = full_gradients(model, x, targets)
        return fg.saliency_maps(list(PSI_PRESETS))

    def ours_decomposition_only():
        return full_gradients(model, x, targets).residual

    t_floor = timed(floor, args.repeats)
    t_ours = timed(ours, args.repeats)
    t_dec = timed(ours_decomposition_only, args.repeats)
    rows = [
        ("floor: forward + input gradient", t_floor),
        ("saliaudit decomposition only", t_dec),
        ("saliaudit decomposition + 6 psi", t_ours),
    ]
    fg = full_gradients(model, x, targets)
    print(
        f"one-off graph capture (torch.export): {export_s:.2f} s; "
        f"max completeness residual {fg.residual.max().item():.2e}"
    )
    del fg

    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from reference.official_fullgrad import OfficialFullGrad

        ref_model = copy.deepcopy(model)
        for m in ref_model.modules():
            if isinstance(m, torch.nn.ReLU):
                m.inplace = False
        official = OfficialFullGrad(ref_model)
        rows.append(
            ("official formulas (paper psi only)", timed(lambda: official.saliency(x, targets), args.repeats))
        )
        official.remove()
    except ImportError as err:
        print(f"official formulas not importable: {err}")
    except Exception as err:  # the official formulas know convolutions and batch-norm only
        print(f"official formulas: not applicable to {args.arch} ({type(err).__name__}: {err})")
    try:
        from pytorch_grad_cam import FullGrad
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam_model = copy.deepcopy(model)
        for m in cam_model.modules():
            if isinstance(m, torch.nn.ReLU):
                m.inplace = False
        cam = FullGrad(model=cam_model, target_layers=[])
        cam_targets = [ClassifierOutputTarget(int(t)) for t in targets]
        rows.append(
            (
                "pytorch-grad-cam FullGrad (one psi)",
                timed(lambda: cam(input_tensor=x.clone(), targets=cam_targets), args.repeats),
            )
        )
    except ImportError as err:
        print(f"pytorch-grad-cam not importable: {err}")
    except Exception as err:
        print(f"pytorch-grad-cam FullGrad: fails on {args.arch} ({type(err).__name__}: {str(err)[:120]})")

    print(f"{'what':40s} {'seconds':>9s} {'x floor':>8s}")
    for name, t in rows:
        print(f"{name:40s} {t:9.3f} {t / t_floor:8.2f}")


if __name__ == "__main__":
    main()
