"""End to end: the sample audit of ``sample_models/shapes_vgg.pt2`` as a user runs it, all four
formats, and the PDF's sections in order (docs/report.md).

Skipped until the checks fill ``check_info`` in the results (the check content lands
separately); remove the skip marker's condition then.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sample_models" / "shapes_vgg.pt2"
IMAGES = ROOT / "sample_models" / "images" / "shapes"

pytestmark = pytest.mark.slow


def _text(pdf: Path) -> str:
    if shutil.which("pdftotext"):
        return subprocess.run(
            ["pdftotext", "-enc", "UTF-8", str(pdf), "-"], capture_output=True, check=True, timeout=120
        ).stdout.decode("utf-8")
    try:
        import pypdf
    except ImportError:
        pytest.skip("neither pdftotext (poppler-utils) nor pypdf is available")
    return "\n".join(p.extract_text() or "" for p in pypdf.PdfReader(str(pdf)).pages)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    if not MODEL.is_file():
        pytest.skip("sample model not present")
    out = tmp_path_factory.mktemp("e2e") / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALIAUDIT_")}
    env["SOURCE_DATE_EPOCH"] = "1700000000"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "saliaudit",
            "report",
            str(MODEL),
            str(IMAGES),
            "-o",
            str(out),
            "--format",
            "html,pdf,json,junit",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
        cwd=out.parent,
    )
    results = out / "results.json"
    doc = json.loads(results.read_text(encoding="utf-8")) if results.is_file() else {}
    if not doc.get("check_info"):  # before the check content lands; the lead un-skips this
        last = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        pytest.skip(f"no check_info in the results yet (exit {proc.returncode}: {last})")
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    return out


def test_sample_audit_pdf_sections_in_order(sample):
    doc = json.loads((sample / "results.json").read_text(encoding="utf-8"))
    text = " ".join(_text(sample / "report.pdf").split())
    titles = [doc["check_info"][c]["title"] for c in doc["check_info"]]
    sections = [
        "Verdicts",
        "Post-processing caveats",
        *titles,
        "Completeness per image",
        "Skipped inputs and errors",
        "Configuration, environment and references",
    ]
    pos = text.find("Saliency audit report")
    assert pos >= 0
    pos = text.find("Configuration, environment and references", pos)  # end of the contents list
    for section in sections:
        found = text.find(section, pos + 1)
        assert found > pos, f"{section!r} missing or out of order in report.pdf"
        pos = found


def test_sample_audit_outputs(sample):
    doc = json.loads((sample / "results.json").read_text(encoding="utf-8"))
    page = (sample / "report.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "file:" not in page
    root = ET.fromstring((sample / "junit.xml").read_bytes())
    assert len(root.findall("testsuite/testcase")) == len(doc["checks"])
    again = sample.parent / "again"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "saliaudit",
            "render",
            str(sample / "results.json"),
            "-o",
            str(again),
            "--format",
            "html",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert (again / "report.html").read_bytes() == (sample / "report.html").read_bytes()
