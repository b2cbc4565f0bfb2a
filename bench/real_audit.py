"""Benchmark: a default audit of real-size ImageNet networks, per stage against its floor.

For each model (torchvision architectures with random weights, saved as a state_dict; no
download) and each image count, generates that many 224² images procedurally (a coloured
shape on a textured background), runs the real command line in a subprocess::

    python -m saliaudit report MODEL.pt IMAGES --arch NAME -o OUT --format json -q \
        --fail-on never [--profile P] [--budget B] [--device D]

and prints, from the ``plan`` the audit stores in results.json, per stage: the images it
measured, the planned passes (forward rows, forward+backward rows, map comparisons), the floor
(planned passes × the measured time of one pass of the model), the estimate, the measured time
and the ratios measured / floor and measured / estimate; then the totals, the peak RSS of the
child (``ru_maxrss`` from ``os.wait4``), the wall time and the output sizes. With two image
counts (``--images 8,64``) it also prints the ratio of their peak RSS (memory must not grow
with the number of images).

Run:  python bench/real_audit.py [--models resnet50,mobilenet_v3_large] [--images 8]
                                 [--profile standard] [--budget 10m] [--device cpu]
                                 [--threads 2] [--keep DIR] [--extra "--checks ..."]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    """``n`` distinct PNGs in two class folders (so that samples can be stratified)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = folder / f"class_{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        base = rng.integers(30, 220, 3)
        arr = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        draw = ImageDraw.Draw(img)
        r = int(rng.integers(size // 8, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if i % 2:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
        img.save(cls / f"img_{i:04d}.png")
    return folder


def make_model(arch: str, folder: Path, seed: int = 0) -> Path:
    import torch
    import torchvision

    torch.manual_seed(seed)
    path = folder / f"{arch}.pt"
    if not path.exists():
        torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), path)
    return path


def run(model: Path, arch: str, images: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "saliaudit", "report", str(model), str(images), "--arch", arch]
    cmd += ["-o", str(out), "--format", "json", "-q", "--fail-on", "never", "--force"]
    cmd += ["--profile", args.profile, "--device", args.device]
    if args.budget:
        cmd += ["--budget", args.budget]
    cmd += shlex.split(args.extra or "")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"audit failed (exit {code}):\n{output}")
    doc = json.loads((out / "results.json").read_text())
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    maps = out / "maps"
    sizes["maps/"] = sum(p.stat().st_size for p in maps.rglob("*") if p.is_file()) if maps.exists() else 0
    return {"wall_s": wall, "peak_rss": usage.ru_maxrss * 1024, "plan": doc.get("plan") or {}, "sizes": sizes}


def show(arch: str, n: int, r: dict) -> None:
    plan = r["plan"]
    cal = plan.get("calibration") or {}
    print(f"\n## {arch}, {n} images, profile {plan.get('profile')}, budget {plan.get('budget_s')}")
    print(
        f"one pass at {cal.get('batch')} rows: forward {1000 * cal.get('forward_s_per_row', 0):.1f} ms, "
        f"forward+backward {1000 * cal.get('backward_s_per_row', 0):.1f} ms per image; "
        f"rows per pass {cal.get('rows_per_pass')}"
    )
    head = f"{'stage':32s} {'img':>4s} {'fwd':>7s} {'fwd+bwd':>8s} {'cmp':>7s} {'floor s':>8s} {'est s':>8s} {'meas s':>8s} {'÷floor':>7s} {'÷est':>6s}"
    print(head)
    for name, st in (plan.get("stages") or {}).items():
        p = st["passes"]
        meas = st.get("measured_s")
        if not (st["estimated_s"] or meas):
            continue
        rf, re_ = st.get("ratio_to_floor"), st.get("ratio_to_estimate")
        print(
            f"{name:32s} {st['images']:>4d} {p['forward']:>7.0f} {p['backward']:>8.0f} {p['compare']:>7.0f} "
            f"{st['floor_s']:>8.2f} {st['estimated_s']:>8.2f} {meas if meas is not None else float('nan'):>8.2f} "
            f"{rf if rf is not None else float('nan'):>7.2f} {re_ if re_ is not None else float('nan'):>6.2f}"
        )
    print(
        f"planned stages: floor {plan.get('floor_s'):.1f} s, estimate {plan.get('estimated_s'):.1f} s, "
        f"measured {plan.get('measured_s'):.1f} s (÷estimate {plan.get('ratio_to_estimate')}); "
        f"unplanned {plan.get('unplanned_s')}"
    )
    print(
        f"audit {plan.get('total_s'):.1f} s, command wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss'] / 1e9:.2f} GB "
        f"(estimated {plan.get('estimated_peak_bytes', 0) / 1e9:.2f} GB)"
    )
    sizes = r["sizes"]
    print(
        "outputs: "
        + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(sizes.items()))
        + f"; total {sum(sizes.values()) / 1e6:.2f} MB"
    )
    for red in plan.get("reductions") or []:
        print(f"reduced: {red['check']}.{red['param']} {red['from']} → {red['to']} ({red['why']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet50,mobilenet_v3_large")
    ap.add_argument("--images", default="8", help="image counts, e.g. 8 or 8,64")
    ap.add_argument("--profile", default="standard")
    ap.add_argument("--budget", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--extra", default="", help="more options for saliaudit report")
    ap.add_argument("--keep", type=Path, default=None, help="keep models, images and outputs here")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="saliaudit-real-"))
    work.mkdir(parents=True, exist_ok=True)
    counts = [int(c) for c in args.images.split(",")]
    try:
        for arch in args.models.split(","):
            model = make_model(arch, work)
            peaks = {}
            for n in counts:
                images = work / f"images_{n}"
                if not images.exists():
                    make_images(images, n)
                r = run(model, arch, images, work / f"out_{arch}_{n}", args)
                show(arch, n, r)
                peaks[n] = r["peak_rss"]
            if len(peaks) > 1:
                lo, hi = min(peaks), max(peaks)
                print(f"\npeak RSS {hi} vs {lo} images: {peaks[hi] / peaks[lo]:.3f}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
