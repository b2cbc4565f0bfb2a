"""Benchmark: rendering the report of a large audit (issue: a 200-image audit's PDF stays under
15 MB and renders in under 60 s).

The results are the synthetic audit of ``tests/report_fixture.py`` (FullGrad under six ψ, six
comparison methods under signed and abs, every check with its curves and example figures) for
``--images`` images. Each output is written the way ``saliaudit report`` and ``saliaudit
render`` write it (``report.render.write_outputs``); wall time and this process's CPU time are
printed per format (CPU time is the better figure on a shared machine), with file sizes and
the PDF's page count.

Run:  python bench/report.py [--images 200] [--examples 6] [--examples-html 24]
                             [--page-size a4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from report_fixture import make_results  # noqa: E402

from saliaudit.report.render import FILES, load_results, results_json, write_outputs  # noqa: E402

LIMIT_MB, LIMIT_S = 15.0, 60.0


def _pages(path: Path) -> int | str:
    if shutil.which("pdfinfo"):
        info = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True).stdout
        m = re.search(r"^Pages:\s+(\d+)", info, re.M)
        if m:
            return int(m.group(1))
    try:
        import pypdf

        return len(pypdf.PdfReader(str(path)).pages)
    except ImportError:
        return "?"


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - w, time.process_time() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--examples", type=int, default=6)
    ap.add_argument("--examples-html", type=int, default=24)
    ap.add_argument("--page-size", default="a4", choices=("a4", "letter"))
    ap.add_argument("--out", type=Path, default=None, help="keep the outputs here")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="saliaudit-bench-report-"))
    out.mkdir(parents=True, exist_ok=True)

    doc, w, c = timed(lambda: make_results(args.images))
    print(f"synthetic results: {args.images} images, {len(doc['checks'])} verdict cells ({w:.1f} s to build)")
    (out / "results.json").write_text(results_json(doc), encoding="utf-8")
    doc = load_results(out / "results.json")  # exactly what `saliaudit render` reads
    settings = dict(examples=args.examples, examples_html=args.examples_html, page_size=args.page_size)
    rows = []
    for fmt in ("json", "junit", "html", "pdf"):  # each alone: builds its own figures
        _, w, c = timed(lambda fmt=fmt: write_outputs(doc, out, [fmt], **settings))
        rows.append((fmt, w, c, (out / FILES[fmt]).stat().st_size))
    _, w_all, c_all = timed(lambda: write_outputs(doc, out, ["html", "pdf"], **settings))
    pdf = (out / "report.pdf").read_bytes()
    pages = _pages(out / "report.pdf")
    print(f"{'output':<14}{'wall s':>8}{'cpu s':>8}{'size MB':>10}")
    for fmt, w, c, size in rows:
        print(f"{fmt:<14}{w:>8.1f}{c:>8.1f}{size / 1e6:>10.2f}")
    print(f"{'html+pdf':<14}{w_all:>8.1f}{c_all:>8.1f}{'':>10}  (together, as report/render write them)")
    size_mb = len(pdf) / 1e6
    print(
        f"report.pdf: {pages} pages, {size_mb:.2f} MB (limit {LIMIT_MB:g} MB); "
        f"html+pdf render {w_all:.1f} s wall, {c_all:.1f} s CPU (limit {LIMIT_S:g} s)"
    )
    print(
        json.dumps(
            {
                "images": args.images,
                "examples": args.examples,
                "pdf_mb": round(size_mb, 2),
                "pdf_pages": pages,
                "render_wall_s": round(w_all, 1),
                "render_cpu_s": round(c_all, 1),
            }
        )
    )
    print(f"outputs in {out}")
    return 0 if size_mb < LIMIT_MB else 1


if __name__ == "__main__":
    sys.exit(main())
