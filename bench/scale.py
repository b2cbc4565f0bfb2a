"""Benchmark: memory and time of an audit as the image folder grows (issue 6, "Scale").

Generates N small, distinct 64×64 PNG images procedurally (a shape of a random class on a
textured background, as the sample model ``shapes_vgg`` expects) in a temporary folder, then
runs the real command line in a subprocess per size::

    python -m saliaudit report sample_models/shapes_vgg.pt2 DIR -o OUT \
        --methods fullgrad --checks completeness --no-overlays --format json -q

and measures the child's peak resident set size (``ru_maxrss`` of exactly that child, from
``os.wait4``: no helper process and no psutil needed). Memory must be bounded by the batch,
not the folder: the acceptance criterion is peak RSS(2000) / peak RSS(200) ≤ 1.5.

Most of a run's RSS is importing torch (the CUDA build maps several hundred MB even on a CPU
run), so the peak RSS of a child that only imports saliaudit's audit modules is measured too
and the table also shows the audit's own memory above that baseline, and its ratio.

A second configuration, ``--config-set full``, runs the default methods and checks (still with
``--no-overlays``, JSON only). Measured on 2 cores: 24 images 87 s, 96 images 143 s (1.5 s per
image: randomization and sensitivity_n stop at their ``max_images`` = 16, perturbation and
sign_flip measure every image), peak RSS 1.41 GB and 1.50 GB. Its sizes are given with
``--full-sizes`` (default 8,16).

A third mode, ``--ranks 1,2``, measures one audit (``--ranks-images`` images, FullGrad and
Grad-CAM with the completeness and randomization checks) in one process and under
``torchrun --standalone --nproc-per-node R`` (README, "Scaling out"): wall time, the
speed-up over one process, and whether results.json (without the run-specific keys) equals
the single process's. The ``--threads`` are shared out: each of R ranks gets threads / R.

Run:  python bench/scale.py [--sizes 200,2000] [--batch-size 8] [--threads 2]
                            [--config-set fast|full|both] [--full-sizes 20,200] [--keep DIR]
      python bench/scale.py --ranks 1,2 [--ranks-images 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sample_models" / "shapes_vgg.pt2"
FAST = ["--methods", "fullgrad", "--checks", "completeness"]


def make_images(folder: Path, n: int, seed: int = 0, size: int = 64) -> Path:
    """``n`` distinct PNGs: a circle, square, triangle or cross on a noisy textured background."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(40, 200, 3)
        noise = rng.normal(0, 25, (size, size, 3))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        draw = ImageDraw.Draw(img)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        r = int(rng.integers(size // 8, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        kind = i % 4
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif kind == 2:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        else:
            w = max(2, r // 3)
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
        img.save(folder / f"img{i:05d}.png")
    return folder


def measure(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[int, float, float, str]:
    """(exit code, wall seconds, peak RSS in MB, stderr tail) of one child process."""
    t0 = time.perf_counter()
    with open(cwd / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it has been reaped
    wall = time.perf_counter() - t0
    # ru_maxrss: kilobytes on Linux, bytes on macOS
    rss = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    tail = (cwd / "stderr.txt").read_text(errors="replace")[-2000:]
    return proc.returncode, wall, rss, tail


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALIAUDIT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def baseline(work: Path, args: argparse.Namespace) -> float:
    """Peak RSS (MB) of a child that imports what an audit imports, and does nothing."""
    code = "import torch, torchvision, saliaudit.cli, saliaudit.engine, saliaudit.checks"
    _, _, rss, tail = measure([sys.executable, "-c", code], child_env(args), work)
    return rss


def run_set(
    name: str,
    extra: list[str],
    sizes: list[int],
    folders: dict[int, Path],
    work: Path,
    args: argparse.Namespace,
    base: float,
) -> list[tuple[int, float, float]]:
    env = child_env(args)
    rows = []
    print(
        f"\n[{name}] {' '.join(extra) or '(default methods and checks)'} --no-overlays "
        f"--batch-size {args.batch_size} --device {args.device}"
    )
    print(f"{'images':>7} {'wall s':>8} {'s/image':>8} {'peak RSS MB':>12} {'above imports MB':>17}  exit")
    for n in sizes:
        out = work / f"out_{name}_{n}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "saliaudit",
            "report",
            str(MODEL),
            str(folders[n]),
            "-o",
            str(out),
            *extra,
            "--no-overlays",
            "--format",
            "json",
            "-q",
            "--batch-size",
            str(args.batch_size),
            "--device",
            args.device,
        ]
        code, wall, rss, tail = measure(cmd, env, work)
        print(f"{n:>7} {wall:>8.1f} {wall / n:>8.3f} {rss:>12.1f} {rss - base:>17.1f}  {code}", flush=True)
        if code not in (0, 1):
            print(tail, file=sys.stderr)
        rows.append((n, wall, rss))
    if len(rows) >= 2:
        (n0, _, r0), (n1, _, r1) = rows[0], rows[-1]
        verdict = "OK" if r1 / r0 <= 1.5 else "EXCEEDS 1.5"
        print(
            f"peak RSS ratio {n1}/{n0}: {r1 / r0:.3f} ({verdict}); above the imports: "
            f"{(r1 - base) / max(r0 - base, 1e-9):.3f} ({r1 - r0:+.1f} MB)"
        )
    return rows


RANKED = ["--methods", "fullgrad,gradcam", "--checks", "completeness,randomization", "--profile", "quick"]
VOLATILE = ("run", "timings", "plan", "manifest", "config")


def run_ranks(ranks: list[int], folder: Path, work: Path, args: argparse.Namespace) -> None:
    """One audit in 1 process and under torchrun with R processes: wall time, speed-up, and
    the results against the single process's."""
    import json

    print(
        f"\n[ranks] {' '.join(RANKED)} --no-overlays --batch-size {args.batch_size} --device {args.device}, "
        f"{args.threads} threads shared by the ranks"
    )
    print(f"{'ranks':>6} {'wall s':>8} {'speed-up':>9} {'same results':>13}  exit")
    first: tuple[float, dict] | None = None
    for r in ranks:
        env = child_env(args)
        env["OMP_NUM_THREADS"] = str(max(1, args.threads // r))
        out = work / f"out_ranks_{r}"
        shutil.rmtree(out, ignore_errors=True)
        audit = ["-m", "saliaudit", "report", str(MODEL), str(folder), "-o", str(out), *RANKED]
        audit += ["--no-overlays", "--format", "json", "-q", "--batch-size", str(args.batch_size)]
        audit += ["--device", args.device]
        launch = [sys.executable]
        if r > 1:
            launch += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(r)]
        code, wall, _, tail = measure(launch + audit, env, work)
        doc = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
        numbers = {k: v for k, v in doc.items() if k not in VOLATILE}
        if first is None:
            first = (wall, numbers)
        same = "yes" if numbers and numbers == first[1] else "no"
        print(f"{r:>6} {wall:>8.1f} {first[0] / wall:>8.2f}x {same:>13}  {code}", flush=True)
        if code not in (0, 1):
            print(tail, file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200,2000", help="image counts of the fast set")
    ap.add_argument("--full-sizes", default="8,16", help="image counts of the full set")
    ap.add_argument("--config-set", choices=("fast", "full", "both"), default="fast")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: temp)")
    ap.add_argument("--ranks", default=None, help="process counts of one audit (torchrun), e.g. 1,2")
    ap.add_argument("--ranks-images", type=int, default=32, help="images of the --ranks audit")
    args = ap.parse_args()
    if args.ranks:
        work = args.keep or Path(tempfile.mkdtemp(prefix="saliaudit-ranks-"))
        work.mkdir(parents=True, exist_ok=True)
        print(f"saliaudit scale-out benchmark · {platform.platform()} · {os.cpu_count()} CPUs")
        try:
            folder = make_images(work / f"images_{args.ranks_images}", args.ranks_images)
            run_ranks([int(r) for r in args.ranks.split(",")], folder, work, args)
        finally:
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    full_sizes = [int(s) for s in args.full_sizes.split(",")]
    work = args.keep or Path(tempfile.mkdtemp(prefix="saliaudit-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"saliaudit scale benchmark · python {platform.python_version()} · "
        f"{platform.platform()} · {os.cpu_count()} CPUs · work folder {work}"
    )
    try:
        needed = sorted(set(sizes) | (set(full_sizes) if args.config_set != "fast" else set()))
        t0 = time.perf_counter()
        folders = {n: make_images(work / f"images_{n}", n) for n in needed}
        print(f"generated {', '.join(map(str, needed))} images in {time.perf_counter() - t0:.1f} s")
        base = baseline(work, args)
        print(f"peak RSS of importing torch, torchvision and saliaudit: {base:.1f} MB")
        if args.config_set in ("fast", "both"):
            run_set("fast", FAST, sizes, folders, work, args, base)
        if args.config_set in ("full", "both"):
            run_set("full", [], full_sizes, folders, work, args, base)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
