"""Outputs that scale with the number of images: JPEG overlays for the report's example images
only (``--overlays examples``, the default), every image (``all``) or none; results.json keeps
maps for the example images only, so an image beyond them adds a few per-image numbers.

Runs the bundled sample model (``sample_models/shapes_vgg.pt2``) in-process on copies of its
shapes images, with FullGrad and two or three fast checks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from saliaudit.cli import app
from saliaudit.report.html import build_context
from saliaudit.report.render import results_json

from .test_cli import _clean_env  # noqa: F401  (autouse: no SALIAUDIT_* variable, no config file)

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
MODEL = SAMPLES / "shapes_vgg.pt2"
FAST = ["--format", "json", "-q", "--fail-on", "never", "--methods", "fullgrad"]


def shapes(folder: Path, n: int) -> Path:
    """``n`` sample images, one class after the other (ImageFolder layout)."""
    root = SAMPLES / "images" / "shapes"
    by_class = [sorted(d.iterdir()) for d in sorted(root.iterdir()) if d.is_dir()]
    picked = [files[k] for k in range(max(map(len, by_class))) for files in by_class if k < len(files)]
    for f in picked[:n]:
        (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, folder / f.parent.name / f.name)
    return folder


def audit(out: Path, images: Path, *extra: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["report", str(MODEL), str(images), "-o", str(out), *FAST, *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def is_map(v: Any) -> bool:
    """A stored small map: the compact float16 encoding (or nested lists, the older form)."""
    if isinstance(v, dict):
        return set(v) == {"shape", "scale", "f16"}
    return isinstance(v, list) and bool(v) and all(isinstance(r, list) for r in v)


def stored_maps(doc: Any) -> int:
    """How many 2-D maps the document holds."""
    if is_map(doc):
        return 1
    items = doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list) else []
    return sum(stored_maps(v) for v in items)


def without_maps(doc: Any) -> Any:
    """The document with every 2-D map replaced by an empty list (the per-image numbers stay)."""
    if is_map(doc):
        return []
    if isinstance(doc, dict):
        return {k: without_maps(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [without_maps(v) for v in doc]
    return doc


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> Path:
    return shapes(tmp_path_factory.mktemp("four"), 4)


VARIANTS = ["--psi", "paper,signed", "--checks", "completeness", "--examples-html", "2"]


@pytest.mark.parametrize(
    "how, examples_only",
    [([], True), (["--overlays", "examples"], True), (["--overlays", "all"], False)],
)
def test_overlays_for_the_examples_by_default_or_for_every_image(tmp_path, four, how, examples_only):
    doc = audit(tmp_path / "out", four, *VARIANTS, *how)
    examples = set(doc["figures"]["images"])
    assert len(examples) == 2
    shown = examples if examples_only else {r["image"] for r in doc["images"]}
    assert len(shown) == (2 if examples_only else 4)
    files = sorted((tmp_path / "out" / "maps").iterdir())
    assert len(files) == len(shown) * 2  # two variants (ψ paper and signed) per image
    records = doc["maps"]
    assert {(m["image"], m["psi"]) for m in records} == {(i, p) for i in shown for p in ("paper", "signed")}
    assert sorted(tmp_path / "out" / m["path"] for m in records) == files


@pytest.mark.parametrize("how", [["--overlays", "none"], ["--no-overlays"]])
def test_no_overlays(tmp_path, four, how):
    doc = audit(tmp_path / "out", four, *VARIANTS, *how)
    assert doc["maps"] == [] and doc["config"]["values"]["overlays"] == "none"
    assert not (tmp_path / "out" / "maps").exists()


@pytest.mark.parametrize("value, files", [("true", 2), ("false", 0)])
def test_old_boolean_in_a_config_file(tmp_path, four, value, files):
    """``overlays = true`` (the former default) now means the example images; false, none."""
    (tmp_path / "saliaudit.toml").write_text(f"overlays = {value}\n", encoding="utf-8")
    doc = audit(tmp_path / "out", four, "--psi", "paper", "--checks", "completeness", "--examples-html", "2")
    assert doc["config"]["values"]["overlays"] == ("examples" if value == "true" else "none")
    assert len(doc["maps"]) == files


def test_results_grow_by_a_few_numbers_per_image_beyond_the_examples(tmp_path, four):
    """4 vs 8 images, 2 examples: the maps stored are the examples' only (as many for 8 as
    for 4), and results.json without them grows by a few hundred bytes per image.

    Measured: 0.29 kB per image (its ``images`` and ``completeness`` records and one
    one-line ``per_image`` entry per cell, 5 cells here; 364 cells with every default method
    and check). The bound, 1 kB, leaves room for other names and numbers and still catches a
    single map stored per image: a 32-px randomization strip map is 1024 values (≈ 2.7 kB
    encoded), a 48-px figure map 2304 (≈ 6 kB)."""
    eight = shapes(tmp_path / "eight", 8)
    common = [
        "--methods",
        "fullgrad,gradient",
        "--psi",
        "paper",
        "--examples-html",
        "2",
        "--overlays",
        "none",
    ]
    common += ["--checks", "completeness,class_sensitivity,bn_folding"]
    docs = [audit(tmp_path / f"out{n}", images, *common) for n, images in ((4, four), (8, eight))]
    assert stored_maps(docs[0]) == stored_maps(docs[1]) > 0
    examples = [set(d["figures"]["images"]) for d in docs]
    assert all(len(e) == 2 for e in examples)
    for d, e in zip(docs, examples):
        cells = [c for c in d["checks"] if c["check"] != "completeness"]
        assert all(set(c["series"].get("figures", {})) <= e for c in cells)
        assert any(c["series"].get("figures") for c in cells)
    sizes = [len(results_json(without_maps(d)).encode()) for d in docs]
    assert (sizes[1] - sizes[0]) / 4 < 1000, sizes


def test_report_figures_show_the_example_images_only(tmp_path, four):
    """The HTML embeds figures for the example images and no others (here the class
    sensitivity section draws them from the check's stored maps)."""
    doc = audit(
        tmp_path / "out", four, "--psi", "paper", "--checks", "class_sensitivity", "--examples-html", "2"
    )
    assert doc["figures"]["maps"] == []  # the check stores the maps its section shows
    ctx = build_context(doc, target="html", examples_html=24)
    section = next(s for s in ctx["sections"] if s["name"] == "class_sensitivity")
    heads = {h["image"] for p in section["figures"]["pairs"] for h in p["heads"]}
    assert heads and heads <= set(doc["figures"]["images"])
    assert all(cell for p in section["figures"]["pairs"] for r in p["rows"] for cell in r["cells"])
