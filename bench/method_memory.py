"""Benchmark: peak and retained memory of one map computation per method, on a real-size model.

Each method runs in its own child process (so that one method's allocator state cannot hide
or inflate another's): the child builds the torchvision network with random weights (no
download), computes the method's maps once on one image (warm-up: graph export, caches), then
reads its resident set size (``base``), resets the kernel's peak counter
(``/proc/self/clear_refs``, Linux) and computes the maps of ``--rows`` images ``--repeats``
times. It prints, in MB:

* ``peak - base``: the most memory the computation held at once (activations, autograd's saved
  tensors, the method's own buffers) — what the rows per pass must keep bounded;
* ``after - base``: what is still resident after the call returned and
  :func:`saliaudit.cost.release_memory` ran — anything above zero is memory the method keeps
  alive (a cache, a reference cycle) or the allocator does not give back.

Measured (2 cores, resnet50, 8 rows, 224²) before and after the fix of the reference cycles in
the propagation methods: DeepLIFT peak − base 2550 → 1660 MB, after − base 2371 → −250 MB.

Linux only (``/proc``). Run:
    python bench/method_memory.py [--arch resnet50] [--rows 8] [--size 224]
                                  [--methods fullgrad,gradient,...] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch, torchvision
sys.path.insert(0, {root!r})
from saliaudit.cost import release_memory, rows_limit
from saliaudit.methods import get_method
from saliaudit.model import wrap_module

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.set_num_threads({threads})
torch.manual_seed(0)
net = getattr(torchvision.models, {arch!r})(weights=None).eval()
lm = wrap_module(net, input_size={size})
x = torch.randn({rows}, 3, {size}, {size})
with torch.no_grad():
    t = lm.logits(x).argmax(1)
fn = get_method({method!r})
with rows_limit({{"backward": {rows}, "forward": {rows}}}):
    fn(lm, x[:1], t[:1])
    release_memory()
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    t0 = time.perf_counter()
    for _ in range({repeats}):
        a = fn(lm, x, t)
        del a
        release_memory()
    seconds = (time.perf_counter() - t0) / {repeats}
print(json.dumps({{"base": base, "peak": status("VmHWM"), "after": status("VmRSS"), "seconds": seconds}}))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--methods",
        default="fullgrad,gradient,grad_x_input,integrated_gradients,smoothgrad,gradcam,guided_backprop,epsilon_lrp,deeplift",
    )
    args = ap.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("bench/method_memory.py needs Linux (/proc/self/clear_refs)")
    print(f"# {args.arch} (random weights), {args.rows} rows, {args.size}², {args.threads} threads")
    print(f"{'method':24s} {'base MB':>8s} {'peak-base MB':>13s} {'after-base MB':>14s} {'s/call':>7s}")
    for method in args.methods.split(","):
        code = CHILD.format(
            root=str(ROOT),
            threads=args.threads,
            arch=args.arch,
            size=args.size,
            rows=args.rows,
            method=method,
            repeats=args.repeats,
        )
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{method:24s} failed: {last}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mb = 1e6
        print(
            f"{method:24s} {r['base'] / mb:8.0f} {(r['peak'] - r['base']) / mb:13.0f} "
            f"{(r['after'] - r['base']) / mb:14.0f} {r['seconds']:7.2f}   ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
