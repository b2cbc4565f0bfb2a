"""Benchmark: what ``--resume`` saves after an interruption, in seconds.

Runs the real command line three times in subprocesses on the same model and images::

    python -m saliaudit report MODEL IMAGES -o OUT --format json -q --fail-on never [EXTRA]

1. uninterrupted, into its own folder (the reference time and numbers);
2. the same audit, sent SIGINT as soon as the given fraction of its units of work (batch ×
   method) is saved in ``OUT/.saliaudit-state/units`` (the time until the interrupt is the
   work that was done);
3. ``--resume`` in the interrupted folder;

and prints the wall time of each, the resumed run's time as a fraction of the uninterrupted
one, the units and randomization steps it reused, and whether its numbers equal the
uninterrupted run's (results.json without the run-specific parts: timings, plan, run,
manifest, config).

Run:  python bench/resume.py [--model sample_models/digits_cnn.pt2]
                             [--images sample_models/images/digits] [--at 0.5]
                             [--threads 2] [--extra "--max-images 16"]
      python bench/resume.py --model resnet50.pt --extra "--arch resnet50" --images DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("run", "timings", "plan", "manifest", "config")


def command(model: str, images: str, out: Path, extra: list[str], resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "saliaudit", "report", model, images, "-o", str(out)]
    cmd += ["--format", "json", "-q", "--fail-on", "never", *extra]
    return cmd + (["--resume"] if resume else [])


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL)
    if done.returncode not in (0, 1):
        sys.exit(f"bench/resume.py: the audit exited {done.returncode}: {shlex.join(cmd)}")
    return time.perf_counter() - t0


def interrupted(cmd: list[str], env: dict[str, str], units: Path, total: int, at: float) -> tuple[float, int]:
    """Start ``cmd``; SIGINT once ``at`` of ``total`` units are saved. (seconds, units saved)"""
    want = max(1, int(round(at * total)))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    while proc.poll() is None:
        if units.is_dir() and len(list(units.glob("*.json"))) >= want:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    proc.wait()
    saved = len(list(units.glob("*.json"))) if units.is_dir() else 0
    return time.perf_counter() - t0, saved


def numbers(path: Path) -> dict:
    doc = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in doc.items() if k not in VOLATILE}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "sample_models" / "digits_cnn.pt2"))
    ap.add_argument("--images", default=str(ROOT / "sample_models" / "images" / "digits"))
    ap.add_argument("--at", type=float, default=0.5, help="fraction of the units saved at the interrupt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="more report options, one string")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    extra = shlex.split(args.extra)
    with tempfile.TemporaryDirectory() as tmp:
        full, out = Path(tmp) / "full", Path(tmp) / "out"
        t_full = run(command(args.model, args.images, full, extra), env)
        doc = json.loads((full / "results.json").read_text(encoding="utf-8"))
        total = len(doc["images"]) and -(-len(doc["images"]) // int(doc["config"]["values"]["batch_size"]))
        total *= len(doc["methods"])
        t_int, saved = interrupted(
            command(args.model, args.images, out, extra),
            env,
            out / ".saliaudit-state" / "units",
            total,
            args.at,
        )
        t_res = run(command(args.model, args.images, out, extra, resume=True), env)
        res = json.loads((out / "results.json").read_text(encoding="utf-8"))
        same = numbers(out / "results.json") == numbers(full / "results.json")
    resumed = res.get("run", {}).get("resumed", {})
    print(f"model {args.model}  images {len(doc['images'])}  units {total}  options {args.extra or '-'}")
    print(f"{'run':<28}{'wall s':>10}")
    print(f"{'uninterrupted':<28}{t_full:>10.1f}")
    print(f"{'interrupted (SIGINT)':<28}{t_int:>10.1f}   {saved} of {total} units saved")
    print(f"{'--resume':<28}{t_res:>10.1f}   {t_res / t_full:.2f} of the uninterrupted time")
    print(
        f"reused: {resumed.get('units_reused', 0)} units, {resumed.get('steps_reused', 0)} "
        f"in-unit step records; numbers equal to the uninterrupted run: {same}"
    )


if __name__ == "__main__":
    main()
