"""A new user's first hour: ``explain`` gives a readable PNG and usage errors for the wrong
variant flag or class name; the report's configuration shows the model's effective values and
their sources; ``report -q`` prints one line; the progress names what runs and advances."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from saliaudit.cli import app
from saliaudit.config import resolve_config
from saliaudit.engine import run_audit
from saliaudit.report.overlay import _font, _text_size, render_explanation
from saliaudit.report.sections import MODEL_SOURCES, configuration_view

ROOT = Path(__file__).resolve().parent.parent / "sample_models"
MODEL = ROOT / "shapes_vgg.pt2"
IMAGE = ROOT / "images" / "shapes" / "square" / "000.png"
TINY = ("--methods", "gradient", "--checks", "class_sensitivity", "--max-images", "2", "--no-overlays")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    """No SALIAUDIT_* variable leaks in; no config file is found above the test folder."""
    for key in list(os.environ):
        if key.startswith("SALIAUDIT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


def error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saliaudit: error: "), result.output
    return lines[0]


def title_fits(path: Path) -> tuple[str, list[str]]:
    """The full title recorded in the PNG, and its lines as drawn, each measured to fit."""
    with Image.open(path) as im:
        im.load()
        title, lines = im.text["Title"], json.loads(im.text["saliaudit:title_lines"])
        width = im.width
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font(18)
    assert all(_text_size(probe, line, font)[0] <= width for line in lines)
    return title, lines


# --------------------------------------------------------------------------- explain


def test_explain_writes_a_large_png_with_the_whole_title(tmp_path):
    out = tmp_path / "map.png"
    result = invoke("explain", MODEL, IMAGE, "-o", out)
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert max(im.size) >= 512
    title, lines = title_fits(out)
    assert title == "fullgrad psi=paper · 000.png · top-1 class 1 (square), logit " + title.rsplit(" ", 1)[1]
    assert " ".join(lines) == title


def test_a_long_title_is_wrapped_never_clipped():
    title = "integrated_gradients abs · " + "a_very_long_image_name_" * 12 + ".png · class 3 (cross)"
    img = Image.open(IMAGE)
    rendered, lines = render_explanation(img, [[0.0, 1.0], [2.0, 3.0]], signed=False, title=title, size=64)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert len(lines) > 1
    assert all(_text_size(probe, t, _font(18))[0] <= rendered.width for t in lines)
    assert "".join(lines).replace(" ", "") == title.replace(" ", "")


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("--method", "gradcam", "--psi", "abs"), "--post"),
        (("--method", "fullgrad", "--post", "abs"), "--psi"),
    ],
)
def test_explain_refuses_the_variant_flag_of_the_other_kind(tmp_path, args, flag):
    line = error_line(invoke("explain", MODEL, IMAGE, *args, "-o", tmp_path / "m.png"), 2)
    assert f"use {flag}" in line
    assert not (tmp_path / "m.png").exists()


def test_explain_target_by_class_name(tmp_path):
    out = tmp_path / "m.png"
    result = invoke("explain", MODEL, IMAGE, "--method", "gradient", "--target", "square", "-o", out)
    assert result.exit_code == 0, result.output
    assert "class 1 (square)" in result.output
    title, _ = title_fits(out)
    assert title.startswith("gradient signed · 000.png · class 1 (square)")
    line = error_line(invoke("explain", MODEL, IMAGE, "--target", "squre", "-o", out), 2)
    assert "did you mean 'square'" in line and "circle" in line


# --------------------------------------------------------------------------- report -q and the configuration


@pytest.fixture(scope="module")
def quiet_audit(tmp_path_factory):
    where = tmp_path_factory.mktemp("quiet")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)
        for key in list(os.environ):
            if key.startswith("SALIAUDIT_"):
                mp.delenv(key)
        out = where / "out"
        result = invoke(
            "report", MODEL, ROOT / "images" / "shapes", "-o", out, *TINY, "--format", "json", "-q"
        )
    return result, out


def test_quiet_prints_exactly_one_line(quiet_audit):
    result, out = quiet_audit
    assert result.exit_code in (0, 1), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    status = doc["summary"]["status"].upper()
    gate = "failed" if doc["summary"]["gate_failed"] else "passed"
    assert lines[0] == (
        f"saliaudit: {status} · gate --fail-on fail {gate} (exit {result.exit_code}) · "
        f"results: {out / 'results.json'}"
    )


def test_configuration_shows_the_model_values_and_sources(quiet_audit):
    _, out = quiet_audit
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = {r["name"]: r for r in configuration_view(doc)["rows"]}
    sources = doc["model"]["sources"]
    assert rows["mean"]["value"] == "0.5, 0.5, 0.5" and rows["std"]["value"] == "0.5, 0.5, 0.5"
    assert rows["mean"]["source"] == ".pt2 metadata" == MODEL_SOURCES[sources["mean"]]
    assert rows["input_size"]["value"] == "64×64"
    assert rows["input_size"]["source"] == MODEL_SOURCES[sources["input_size"]]
    assert rows["input_size"]["source"].startswith(".pt2")
    assert rows["batch_size"]["source"] == "default"  # settings the model does not resolve


def test_a_given_setting_keeps_its_own_source():
    doc = {
        "config": {"values": {"mean": [0.1, 0.2, 0.3]}, "sources": {"mean": "flag"}},
        "model": {"mean": [0.1, 0.2, 0.3], "sources": {"mean": "flag"}},
    }
    (row,) = configuration_view(doc)["rows"]
    assert row == {"name": "mean", "value": "0.1, 0.2, 0.3", "source": "flag"}


# --------------------------------------------------------------------------- progress


def test_progress_names_the_stage_and_advances(tmp_path):
    flags = {
        "methods": "gradient,random",
        "checks": "class_sensitivity,sign_flip",
        "max_images": 4,
        "batch_size": 2,
        "overlays": False,
        "output": str(tmp_path / "out"),
    }
    cfg = resolve_config(flags, environ={}, cwd=tmp_path)
    calls: list[tuple[str, int, int | None]] = []
    run_audit(MODEL, ROOT / "images" / "shapes", cfg, tmp_path / "out", progress=lambda *a: calls.append(a))
    done = [d for _, d, _ in calls]
    totals = {t for _, _, t in calls}
    assert done == sorted(done) and len(set(done)) > 4
    # 2 batches × 2 methods × (1 + 2 checks) + judging, known from the start
    assert totals == {2 * 2 * 3 + 1} and done[-1] == 2 * 2 * 3 + 1
    names = [d for d, _, _ in calls]
    assert "batch 2/2 · check sign_flip" in names and "batch 1/2 · method gradient" in names
    assert "judging" in names
