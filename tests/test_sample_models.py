"""The bundled sample models: they load with their metadata, classify their sample images as
stated in sample_models/README.md, their state_dicts match the .pt2 graphs, masks are valid."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import saliaudit
from saliaudit.data import find_images, iter_decoded
from saliaudit.methods.fullgrad import full_gradients

ROOT = Path(__file__).resolve().parents[1] / "sample_models"
MODELS = {
    "shapes_vgg": ("ShapesVGG", "shapes"),
    "digits_cnn": ("DigitsCNN", "digits"),
    "digits_vit": ("TinyViT", "digits"),
}


def _archs():
    spec = importlib.util.spec_from_file_location("sample_archs", ROOT / "archs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_folder_is_small():
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    assert total < 10 * 2**20


@pytest.mark.parametrize("name", MODELS)
def test_sample_model_accuracy_and_completeness(name):
    lm = saliaudit.load_model(ROOT / f"{name}.pt2")
    assert lm.sources["mean"] == "pt2 metadata" and lm.mean == (0.5, 0.5, 0.5)
    labels = (ROOT / f"{MODELS[name][1].split('_')[0]}_labels.txt").read_text().split()
    assert lm.class_names == labels
    listing = find_images(ROOT / "images" / MODELS[name][1])
    assert sorted(listing.class_names) == sorted(labels)  # folders are sorted by name
    decoded = [d for d in iter_decoded(listing)]
    x = lm.preprocess([d.image for d in decoded])
    truth = torch.tensor([labels.index(listing.class_names[d.entry.label]) for d in decoded])
    pred = lm.logits(x).argmax(1)
    assert (pred == truth).float().mean().item() >= 0.95
    fg = full_gradients(lm, x, pred)
    assert fg.residual.max().item() < 1e-3 and not fg.unaccounted


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_matches_pt2(name):
    cls = getattr(_archs(), MODELS[name][0])
    model = cls().eval()
    model.load_state_dict(torch.load(ROOT / f"{name}.pt", weights_only=True))
    lm = saliaudit.load_model(ROOT / f"{name}.pt2")
    x = torch.randn(3, 3, *lm.input_size)
    torch.testing.assert_close(model(x), lm.logits(x), rtol=1e-5, atol=1e-5)


def test_masks_cover_every_shape_image():
    for folder in ("shapes", "shapes_pairs"):
        for image in sorted((ROOT / "images" / folder).rglob("*.png")):
            rel = image.relative_to(ROOT / "images").with_suffix("")
            masks = sorted((ROOT / "masks" / rel).glob("*.png"))
            assert masks, f"no mask for {rel}"
            if folder == "shapes_pairs":
                assert len(masks) == 2
            for m in masks:
                arr = np.asarray(Image.open(m))
                assert arr.shape == Image.open(image).size[::-1]
                assert set(np.unique(arr)) <= {0, 255} and arr.max() == 255


@pytest.mark.slow  # 123 s: the README's audit (also run from a fresh install by test_fresh_install.py)
def test_quick_start_audit_of_the_sample_model(tmp_path):
    """The README's quick start: audit the bundled shapes model on its sample folder."""
    from typer.testing import CliRunner

    from saliaudit.cli import app

    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["report", str(ROOT / "shapes_vgg.pt2"), str(ROOT / "images" / "shapes"), "-o", str(out), "-q"]
    )
    import json

    doc = json.loads((out / "results.json").read_text())
    # the exit code is the gate: 1 because some methods' maps FAIL on this model (the finding)
    assert result.exit_code == (1 if doc["summary"]["gate_failed"] else 0), result.output
    gating = [c for c in doc["checks"] if c["control"] is None and c["status"] == "fail"]
    assert doc["summary"]["gate_failed"] == bool(gating)
    # the controls fail what they must (the checks work) and never gate by themselves
    controls = [c for c in doc["checks"] if c["control"] is not None]
    assert {c["method"] for c in controls} == {"random", "edge", "edge_signed"}
    must = [
        c
        for c in controls
        if c["check"] in ("class_sensitivity", "randomization") and c["control"] != "reference"
    ]
    assert must and all(c["status"] == "fail" and c["control"] == "expected" for c in must)
    assert doc["summary"]["controls"]["unexpected"] == 0
    assert (out / "report.html").is_file() and (out / "report.pdf").is_file()
    assert doc["inputs"]["loaded"] == doc["inputs"]["found"] > 0
    assert doc["checks"][0]["check"] == "completeness" and doc["checks"][0]["status"] == "pass"
    names = doc["model"]["class_names"]
    imgs = doc["images"]
    assert all(names[r["label"]] == r["label_name"] for r in imgs)  # matched by name, not order
    assert sum(r["label"] == r["predicted"] for r in imgs) >= 0.95 * len(imgs)
    variants = {(m["method"], m["psi"] or m["post"]) for m in doc["maps"]}
    assert len(variants) >= 6 + 2 * (len(doc["methods"]) - 1)  # every ψ and post of every method
    assert len(list((out / "maps").glob("*.jpg"))) == len(variants) * len(imgs)
    # verdicts an auditor can defend, on the sample model: n and intervals, the same location
    # metric for signed and paper ψ, guided backprop not passing the cascade, sign flip with
    # both removal values, edge_signed failing class sensitivity
    cells = {(c["check"], c["method"], c["psi"] or c["post"]): c for c in doc["checks"]}
    assert cells[("class_sensitivity", "edge_signed", "signed")]["status"] == "fail"
    sig, pap = (
        cells[("class_sensitivity", "fullgrad", "signed")],
        cells[("class_sensitivity", "fullgrad", "paper")],
    )
    assert sig["metric"] == pap["metric"]
    assert all(cells[("randomization", "guided_backprop", p)]["status"] != "pass" for p in ("signed", "abs"))
    flips = [
        c for c in doc["checks"] if c["check"] == "sign_flip" and c["status"] in ("pass", "warn", "fail")
    ]
    assert flips and all(c["series"]["other"]["baseline"] != c["series"]["baseline"] for c in flips)
    for c in doc["checks"]:
        if c["status"] in ("pass", "warn", "fail") and c["value"] is not None:
            assert c["n"] >= 1 and c["ci"][0] <= c["value"] <= c["ci"][1], (
                c["variant"] if "variant" in c else c
            )
    assert doc["check_info"]["randomization"]["sample"]["stratified_by"] == "folder label"


@pytest.mark.slow  # a default audit of the sample transformer on 8 digits
def test_default_audit_of_the_sample_vit_explains_the_token_grid(tmp_path):
    """The README's transformer line: a default audit of ``digits_vit`` runs end to end, its
    FullGrad decomposition is exact through attention, and the report says how token terms
    were drawn (the 8×8 patch grid, the class token left out of the maps)."""
    import json

    from typer.testing import CliRunner

    from saliaudit.cli import app

    out = tmp_path / "vit"
    result = CliRunner().invoke(
        app,
        ["report", str(ROOT / "digits_vit.pt2"), str(ROOT / "images" / "digits"), "-o", str(out), "-q",
         "--max-images", "8", "--format", "json,html"],
    )  # fmt: skip
    doc = json.loads((out / "results.json").read_text())
    assert result.exit_code == (1 if doc["summary"]["gate_failed"] else 0), result.output
    fullgrad = next(m for m in doc["methods"] if m["method"] == "fullgrad")
    assert fullgrad["status"] == "ok"
    assert fullgrad["decomposition"] == {"attention_modules": 4, "token_grid": [8, 8], "leading_tokens": 1}
    complete = doc["checks"][0]
    assert complete["check"] == "completeness" and complete["status"] == "pass"
    assert all(
        r["relative_residual"] <= 1e-3 and r["leading_tokens"] is not None for r in doc["completeness"]
    )
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "A token model" in html and "8×8 patch grid" in html and "attention modules" in html
    # the controls still fail what they must on a transformer
    must = [c for c in doc["checks"] if c["check"] == "randomization" and c["method"] in ("random", "edge")]
    assert must and all(c["status"] == "fail" for c in must)
