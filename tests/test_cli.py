"""End-to-end tests of the ``saliaudit`` command line (docs/usage.md and docs/report.md).

The CLI runs in-process through ``typer.testing.CliRunner`` on small models exported on the fly
and small PNG files; one test runs ``python -m saliaudit`` in a subprocess for the real entry path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from typer.testing import CliRunner

from saliaudit import __version__
from saliaudit.cli import app
from saliaudit.psi import PSI_PRESETS
from saliaudit.report.output import MARKER

META = {"input_size": [16, 16], "mean": [0.5] * 3, "std": [0.5] * 3, "class_names": ["a", "b", "c"]}
STATUSES = {"pass", "warn", "fail", "error", "skipped"}


# --------------------------------------------------------------------------- helpers / fixtures


def tiny_cnn(seed: int = 0) -> torch.nn.Module:
    """Conv → BN (random statistics) → ReLU → pool → Linear, in eval mode, with logits of order 1."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )
    with torch.no_grad():
        bn = m[1]
        bn.running_mean.copy_(torch.rand(4, generator=gen) - 0.5)
        bn.running_var.copy_(torch.rand(4, generator=gen) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(4, generator=gen) + 0.5)
        bn.bias.copy_(torch.rand(4, generator=gen) - 0.5)
        # logits far from 0, so that the *relative* residual measures the decomposition,
        # not float32 cancellation around a logit of 1e-5
        m[5].weight.copy_(torch.rand(3, 4, generator=gen) * 4 - 2)
        m[5].bias.copy_(torch.tensor([2.0, 1.5, 1.0]))
    return m.eval()


def export_pt2(path: Path, seed: int = 0) -> Path:
    m = tiny_cnn(seed)
    ep = torch.export.export(
        m, (torch.rand(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},)
    )
    torch.export.save(ep, str(path), extra_files={"saliaudit.json": json.dumps(META)})
    return path


def write_png(path: Path, w: int, h: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def make_images(folder: Path, n: int = 3) -> Path:
    sizes = [(16, 16), (24, 20), (40, 32), (20, 40), (32, 32), (36, 18)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        write_png(folder / f"img{i}.png", w, h, seed=i)
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_results(out: Path) -> dict:
    text = (out / "results.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text

    def refuse(token):  # json accepts NaN/Infinity by default: make them fatal
        raise AssertionError(f"non-finite token {token} in results.json")

    return json.loads(text, parse_constant=refuse)


def error_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.strip()]


def assert_one_line_error(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    line = lines[0]
    assert line.startswith("saliaudit: error:"), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Models and images shared by the module (never modified by the tests that read them)."""
    root = tmp_path_factory.mktemp("assets")
    model = export_pt2(root / "model.pt2")
    images = make_images(root / "images", 3)
    return {"root": root, "model": model, "images": images}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    """No SALIAUDIT_* variable leaks in; no config file is found above the test folder.

    Importing WeasyPrint (``saliaudit doctor`` does) sets the process-wide
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True``, which would let truncated PNGs through in
    the in-process runs that follow; each test starts from Pillow's default.
    """
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    for key in list(os.environ):
        if key.startswith("SALIAUDIT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def run(runner: CliRunner, *args, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env, catch_exceptions=True)


def report(runner: CliRunner, model: Path, images: Path, out: Path, *extra, env=None):
    """``saliaudit report`` as these plumbing tests need it: FullGrad and completeness only
    unless the test picks methods or checks (the checks have their own tests)."""
    pick = [] if any(str(e) == "--methods" for e in extra) else ["--methods", "fullgrad"]
    pick += [] if any(str(e) == "--checks" for e in extra) else ["--checks", "completeness"]
    return run(runner, "report", model, images, "-o", out, "--format", "json", "-q", *pick, *extra, env=env)


# --------------------------------------------------------------------------- basic commands


def test_version(runner):
    result = run(runner, "--version")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"saliaudit {__version__}"


def test_doctor_lists_torch(runner):
    result = run(runner, "doctor")
    assert result.exit_code == 0, result.output
    assert "torch" in result.output
    assert torch.__version__.split("+")[0] in result.output


def test_no_arguments_shows_help(runner):
    result = run(runner)
    assert "report" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- a good run


def test_report_json_contract(runner, assets, tmp_path):
    out = tmp_path / "out"
    model_sha = sha256(assets["model"])
    result = report(runner, assets["model"], assets["images"], out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    doc = load_results(out)

    assert isinstance(doc["schema_version"], str) and doc["schema_version"]
    assert doc["tool"] == {"name": "saliaudit", "version": __version__}

    run_ = doc["run"]
    for key in ("started_at", "duration_s", "seed", "device", "versions"):
        assert key in run_, key
    assert run_["seed"] == 0
    assert isinstance(run_["duration_s"], float) and run_["duration_s"] > 0
    assert run_["device"] in ("cpu", "cuda", "mps") or run_["device"].startswith("cuda")
    assert run_["versions"]["torch"] == torch.__version__
    assert run_["versions"]["saliaudit"] == __version__

    cfg = doc["config"]
    assert set(cfg["values"]) == set(cfg["sources"])
    assert cfg["values"]["format"] == ["json"] and cfg["sources"]["format"] == "flag"
    assert cfg["values"]["output"] == str(out) and cfg["sources"]["output"] == "flag"
    assert cfg["values"]["batch_size"] == 8 and cfg["sources"]["batch_size"] == "default"
    assert cfg["values"]["psi"] == list(PSI_PRESETS)

    model = doc["model"]
    assert model["path"] == str(assets["model"])
    assert model["sha256"] == model_sha
    assert model["format"] == "pt2"
    assert model["num_classes"] == 3
    assert model["input_size"] == [16, 16]
    assert model["class_names"] == ["a", "b", "c"]

    inputs = doc["inputs"]
    assert inputs["found"] == 3 and inputs["loaded"] == 3 and inputs["skipped"] == []

    summary = doc["summary"]
    assert summary["status"] == "pass"
    assert summary["fail_on"] == "fail"
    assert set(summary["counts"]) == STATUSES
    assert summary["counts"]["pass"] == len(doc["checks"])

    comp_checks = [c for c in doc["checks"] if c["check"] == "completeness"]
    assert len(comp_checks) == 1
    check = comp_checks[0]
    assert check["status"] == "pass"
    assert check["method"] == "fullgrad" and check["psi"] is None
    assert check["thresholds"] == {"fail": 1e-3}
    for key in ("value", "metric", "message", "per_image", "series"):
        assert key in check, key
    assert len(check["per_image"]) == 3
    for c in doc["checks"]:
        assert c["status"] in STATUSES

    names = sorted(p.name for p in assets["images"].iterdir())
    records = doc["completeness"]
    assert sorted(r["image"] for r in records) == names
    for r in records:
        assert r["target"] in (0, 1, 2)
        assert math.isfinite(r["logit"]) and math.isfinite(r["reconstructed"])
        assert 0 <= r["relative_residual"] < 1e-3
        assert r["relative_residual"] == pytest.approx(
            abs(r["logit"] - r["reconstructed"]) / max(abs(r["logit"]), 1e-6), rel=1e-3, abs=1e-9
        )

    timings = doc["timings"]
    assert timings["total_s"] > 0
    assert isinstance(timings["per_stage"], dict) and timings["per_stage"]
    assert all(v >= 0 for v in timings["per_stage"].values())

    # one overlay per image per ψ, and the records point to them
    maps = doc["maps"]
    assert len(maps) == 3 * len(PSI_PRESETS)
    assert {(m["image"], m["psi"]) for m in maps} == {(n, p) for n in names for p in PSI_PRESETS}
    pngs = sorted((out / "maps").glob("*.jpg"))
    assert len(pngs) == 3 * len(PSI_PRESETS)
    assert {(out / m["path"]).resolve() for m in maps} == {p.resolve() for p in pngs}
    for m in maps:
        assert not Path(m["path"]).is_absolute()
        with Image.open(out / m["path"]) as im:
            im.verify()
    assert (out / MARKER).is_file()


def test_report_terminal_summary(runner, assets, tmp_path):
    """Without -q the verdict table and the overall line are printed (progress on stderr)."""
    out = tmp_path / "out"
    result = run(
        runner,
        "report",
        assets["model"],
        assets["images"],
        "-o",
        out,
        "--no-overlays",
        "--psi",
        "paper",
        "--methods",
        "fullgrad",
        "--checks",
        "completeness",
    )
    assert result.exit_code == 0, result.output
    assert "completeness" in result.output
    assert "PASS" in result.output
    assert "results.json" in result.output


def test_psi_limits_maps(runner, assets, tmp_path):
    out = tmp_path / "out"
    result = report(runner, assets["model"], assets["images"], out, "--psi", "paper,signed")
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    assert doc["config"]["values"]["psi"] == ["paper", "signed"]
    assert {m["psi"] for m in doc["maps"]} == {"paper", "signed"}
    assert len(doc["maps"]) == 3 * 2
    files = sorted(p.name for p in (out / "maps").iterdir())
    assert len(files) == 6
    assert all(".fullgrad.paper." in f or ".fullgrad.signed." in f for f in files)


def test_max_images(runner, assets, tmp_path):
    out = tmp_path / "out"
    result = report(runner, assets["model"], assets["images"], out, "--max-images", "2", "--no-overlays")
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    assert doc["inputs"]["loaded"] == 2
    assert len(doc["completeness"]) == 2
    assert doc["config"]["values"]["max_images"] == 2
    assert doc["config"]["sources"]["max_images"] == "flag"


def test_sample_is_reproducible(runner, tmp_path, assets):
    images = make_images(tmp_path / "many", 6)
    picked = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        result = report(
            runner,
            assets["model"],
            images,
            out,
            "--sample",
            "2",
            "--seed",
            "3",
            "--no-overlays",
            "--psi",
            "paper",
        )
        assert result.exit_code == 0, result.output
        doc = load_results(out)
        assert doc["run"]["seed"] == 3
        picked.append([r["image"] for r in doc["completeness"]])
    assert len(picked[0]) == 2
    assert picked[0] == picked[1]
    assert set(picked[0]) <= {f"img{i}.png" for i in range(6)}


def test_no_overlays_writes_no_maps(runner, assets, tmp_path):
    out = tmp_path / "out"
    result = report(runner, assets["model"], assets["images"], out, "--no-overlays")
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    assert doc["maps"] == []
    assert doc["config"]["values"]["overlays"] == "none"
    assert not (out / "maps").exists() or not any((out / "maps").iterdir())
    assert len(doc["completeness"]) == 3


# --------------------------------------------------------------------------- images


def test_bad_images_are_skipped_with_reasons(runner, assets, tmp_path):
    images = make_images(tmp_path / "imgs", 2)
    (images / "x.png").write_text("this is not an image\n")
    good = (images / "img0.png").read_bytes()
    (images / "truncated.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    # 2 of 4 dropped: over the default --max-skipped 0.1, which would fail the gate
    result = report(runner, assets["model"], images, out, "--no-overlays", "--max-skipped", "0.5")
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    assert doc["inputs"]["found"] == 4
    assert doc["inputs"]["loaded"] == 2
    skipped = {s["path"]: s["reason"] for s in doc["inputs"]["skipped"]}
    assert set(skipped) == {"x.png", "truncated.png"}
    assert all(reason.strip() for reason in skipped.values())
    assert "not an image" in skipped["x.png"]
    assert "truncated" in skipped["truncated.png"] or "corrupt" in skipped["truncated.png"]
    assert sorted(r["image"] for r in doc["completeness"]) == ["img0.png", "img1.png"]
    assert doc["summary"]["status"] == "pass"


def test_empty_image_folder_exit_4(runner, assets, tmp_path):
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    result = report(runner, assets["model"], empty, tmp_path / "out")
    assert_one_line_error(result, 4, "empty_folder")


def test_all_images_bad_exit_4(runner, assets, tmp_path):
    images = tmp_path / "all_bad"
    images.mkdir()
    (images / "x.png").write_text("not an image")
    good = write_png(tmp_path / "good.png", 20, 20, seed=1).read_bytes()
    (images / "cut.png").write_bytes(good[:60])
    out = tmp_path / "out"
    result = report(runner, assets["model"], images, out)
    line = assert_one_line_error(result, 4, "all_bad")
    assert "x.png" in line or "cut.png" in line
    # a partial results.json records why
    doc = load_results(out)
    assert doc["summary"]["status"] == "error"
    assert len(doc["inputs"]["skipped"]) == 2


# --------------------------------------------------------------------------- models


def test_missing_model_exit_2(runner, assets, tmp_path):
    """A path the user named that does not exist is a usage error, found before anything is written."""
    missing = tmp_path / "no_such_model.pt2"
    result = report(runner, missing, assets["images"], tmp_path / "out")
    assert_one_line_error(result, 2, "no_such_model.pt2")
    assert not (tmp_path / "out").exists()


def test_truncated_pt2_exit_3(runner, assets, tmp_path):
    data = assets["model"].read_bytes()
    for name, cut in (("head.pt2", data[:500]), ("half.pt2", data[: len(data) // 2])):
        bad = tmp_path / name
        bad.write_bytes(cut)
        result = report(runner, bad, assets["images"], tmp_path / f"out_{name}")
        assert_one_line_error(result, 3, name)


def test_directory_as_model_exit_2(runner, assets, tmp_path):
    folder = tmp_path / "model_folder"
    folder.mkdir()
    result = report(runner, folder, assets["images"], tmp_path / "out")
    assert_one_line_error(result, 2, "model_folder")
    assert not (tmp_path / "out").exists()


def test_pickled_module_refused_without_trust(runner, assets, tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save(tiny_cnn(), path)
    result = report(runner, path, assets["images"], tmp_path / "out")
    assert_one_line_error(result, 2, "pickled.pt", "--trust-model")  # a flag the input needs: usage
    # with --trust-model the same file is audited
    result = report(
        runner,
        path,
        assets["images"],
        tmp_path / "out2",
        "--trust-model",
        "--input-size",
        "16",
        "--no-overlays",
        "--psi",
        "paper",
    )
    assert result.exit_code == 0, result.output
    doc = load_results(tmp_path / "out2")
    assert doc["model"]["format"] == "pickle"
    assert doc["config"]["sources"]["trust_model"] == "flag"


class _Payload:
    """Unpickling this object would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickle_never_runs(runner, assets, tmp_path):
    marker = tmp_path / "PWNED"
    for i, obj in enumerate([_Payload(marker), {"model": tiny_cnn(), "x": _Payload(marker)}]):
        path = tmp_path / f"evil{i}.pt"
        with open(path, "wb") as fh:  # the classic zip torch.save layout, holding the payload
            torch.save(obj, fh)
        if i == 0:
            # sanity: the payload works when unpickled
            check = tmp_path / "CHECK"
            with open(tmp_path / "plain.pkl", "wb") as fh:
                pickle.dump(_Payload(check), fh)
            pickle.loads((tmp_path / "plain.pkl").read_bytes())
            assert check.exists()
        result = report(runner, path, assets["images"], tmp_path / f"out{i}")
        assert_one_line_error(result, 2, path.name, "--trust-model")
        assert not marker.exists()


def test_state_dict_without_arch_exit_2(runner, assets, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_cnn().state_dict(), path)
    result = report(runner, path, assets["images"], tmp_path / "out")
    assert_one_line_error(result, 2, "weights.pt", "--arch")


# --------------------------------------------------------------------------- option values


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--fail-on", "maybe"),
        ("--batch-size", "0"),
        ("--psi", "nope"),
        ("--format", "pdfx"),
        ("--max-images", "0"),
        ("--seed", "-1"),
    ],
)
def test_bad_option_values_exit_2(runner, assets, tmp_path, flag, value):
    out = tmp_path / "out"
    result = report(runner, assets["model"], assets["images"], out, flag, value)
    assert_one_line_error(result, 2, flag, value)
    assert not out.exists()  # nothing is written on a usage error


def test_non_integer_option_is_a_usage_error(runner, assets, tmp_path):
    result = report(runner, assets["model"], assets["images"], tmp_path / "out", "--batch-size", "abc")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- the --fail-on gate


def test_fail_on_gate(runner, assets, tmp_path):
    env = {"SALIAUDIT_COMPLETENESS_TOLERANCE": "1e-30"}
    out = tmp_path / "out"
    result = report(runner, assets["model"], assets["images"], out, "--no-overlays", env=env)
    assert result.exit_code == 1, result.output
    doc = load_results(out)
    assert doc["summary"]["status"] == "fail"
    assert doc["summary"]["fail_on"] == "fail"
    assert doc["summary"]["counts"]["fail"] == 1
    assert doc["checks"][0]["status"] == "fail"
    assert doc["checks"][0]["thresholds"] == {"fail": 1e-30}
    assert doc["config"]["sources"]["completeness_tolerance"] == "environment"

    result = report(
        runner, assets["model"], assets["images"], out, "--no-overlays", "--fail-on", "never", env=env
    )
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    assert doc["summary"]["status"] == "fail"  # the verdict is still recorded
    assert doc["summary"]["fail_on"] == "never"

    # --fail-on warn is stricter than fail: a FAIL trips it too
    result = report(
        runner, assets["model"], assets["images"], out, "--no-overlays", "--fail-on", "warn", env=env
    )
    assert result.exit_code == 1, result.output


# --------------------------------------------------------------------------- configuration


def test_config_precedence(runner, assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "saliaudit.toml").write_text("batch_size = 2\nseed = 5\n", encoding="utf-8")
    common = ("--no-overlays", "--psi", "paper")

    def go(name, *extra, env=None):
        out = tmp_path / name
        result = report(runner, assets["model"], assets["images"], out, *common, *extra, env=env)
        assert result.exit_code == 0, result.output
        return load_results(out)

    file_source = f"config file {(tmp_path / 'saliaudit.toml').resolve()}"

    doc = go("from_file")
    values, sources = doc["config"]["values"], doc["config"]["sources"]
    assert values["batch_size"] == 2 and sources["batch_size"] == file_source
    assert values["seed"] == 5 and sources["seed"] == file_source
    assert doc["run"]["seed"] == 5
    assert sources["fail_on"] == "default" and values["fail_on"] == "fail"
    assert sources["psi"] == "flag"
    assert doc["config"]["file"] == str((tmp_path / "saliaudit.toml").resolve())

    doc = go("from_env", env={"SALIAUDIT_SEED": "7"})
    values, sources = doc["config"]["values"], doc["config"]["sources"]
    assert values["seed"] == 7 and sources["seed"] == "environment"
    assert values["batch_size"] == 2 and sources["batch_size"] == file_source
    assert doc["run"]["seed"] == 7

    doc = go("from_flag", "--seed", "9", env={"SALIAUDIT_SEED": "7"})
    values, sources = doc["config"]["values"], doc["config"]["sources"]
    assert values["seed"] == 9 and sources["seed"] == "flag"
    assert values["batch_size"] == 2 and sources["batch_size"] == file_source
    assert doc["run"]["seed"] == 9


def test_explicit_config_file(runner, assets, tmp_path):
    cfg = tmp_path / "elsewhere" / "audit.toml"
    cfg.parent.mkdir()
    cfg.write_text('psi = ["signed"]\nfail-on = "never"\noverlays = false\n', encoding="utf-8")
    (tmp_path / "saliaudit.toml").write_text("seed = 5\n", encoding="utf-8")  # not used
    out = tmp_path / "out"
    result = report(runner, assets["model"], assets["images"], out, "--config", cfg)
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    values, sources = doc["config"]["values"], doc["config"]["sources"]
    assert values["psi"] == ["signed"] and sources["psi"] == f"config file {cfg}"
    assert values["fail_on"] == "never" and sources["fail_on"] == f"config file {cfg}"
    assert values["overlays"] == "none"
    assert values["seed"] == 0 and sources["seed"] == "default"
    assert doc["maps"] == []


def test_missing_explicit_config_exit_2(runner, assets, tmp_path):
    result = report(
        runner, assets["model"], assets["images"], tmp_path / "out", "--config", tmp_path / "nope.toml"
    )
    assert_one_line_error(result, 2, "nope.toml")


def test_pyproject_tool_table(runner, assets, tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.saliaudit]\nbatch_size = 3\npsi = "abs"\n', encoding="utf-8"
    )
    monkeypatch.chdir(project / "sub")  # found by walking up
    out = tmp_path / "out"
    result = report(runner, assets["model"], assets["images"], out, "--no-overlays")
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    src = f"config file {(project / 'pyproject.toml').resolve()}"
    assert doc["config"]["values"]["batch_size"] == 3
    assert doc["config"]["sources"]["batch_size"] == src
    assert doc["config"]["values"]["psi"] == ["abs"]


def test_unknown_key_in_config_file_exit_2(runner, assets, tmp_path):
    (tmp_path / "saliaudit.toml").write_text("batch_size = 2\nbogus_setting = 1\n", encoding="utf-8")
    out = tmp_path / "out"
    result = report(runner, assets["model"], assets["images"], out)
    assert_one_line_error(result, 2, "bogus_setting", "saliaudit.toml")
    assert not out.exists()


def test_invalid_value_in_config_file_exit_2(runner, assets, tmp_path):
    (tmp_path / "saliaudit.toml").write_text('batch_size = "many"\n', encoding="utf-8")
    result = report(runner, assets["model"], assets["images"], tmp_path / "out")
    assert_one_line_error(result, 2, "batch_size", "saliaudit.toml", "'many'")


def test_malformed_config_file_exit_2(runner, assets, tmp_path):
    (tmp_path / "saliaudit.toml").write_text("batch_size = = 2\n", encoding="utf-8")
    result = report(runner, assets["model"], assets["images"], tmp_path / "out")
    assert_one_line_error(result, 2, "saliaudit.toml")


def test_invalid_env_value_exit_2(runner, assets, tmp_path):
    result = report(
        runner, assets["model"], assets["images"], tmp_path / "out", env={"SALIAUDIT_BATCH_SIZE": "zero"}
    )
    assert_one_line_error(result, 2, "SALIAUDIT_BATCH_SIZE", "'zero'")


def test_unknown_env_variable_exit_2(runner, assets, tmp_path):
    result = report(
        runner, assets["model"], assets["images"], tmp_path / "out", env={"SALIAUDIT_BATCHSIZE": "2"}
    )
    assert_one_line_error(result, 2, "SALIAUDIT_BATCHSIZE")


# --------------------------------------------------------------------------- the output folder


def test_non_empty_foreign_output_folder(runner, assets, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    precious = out / "thesis.txt"
    precious.write_text("do not touch", encoding="utf-8")
    before = (precious.read_bytes(), precious.stat().st_mtime_ns)

    result = report(runner, assets["model"], assets["images"], out, "--no-overlays")
    assert_one_line_error(result, 3, "mine", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"]
    assert (precious.read_bytes(), precious.stat().st_mtime_ns) == before

    result = report(runner, assets["model"], assets["images"], out, "--no-overlays", "--force")
    assert result.exit_code == 0, result.output
    assert (precious.read_bytes(), precious.stat().st_mtime_ns) == before
    assert (out / "results.json").is_file()
    assert load_results(out)["config"]["sources"]["force"] == "flag"


def test_output_path_is_a_file(runner, assets, tmp_path):
    target = tmp_path / "report.txt"
    target.write_text("keep", encoding="utf-8")
    result = report(runner, assets["model"], assets["images"], target)
    assert_one_line_error(result, 3, "report.txt")
    assert target.read_text(encoding="utf-8") == "keep"


def test_rerun_into_previous_output(runner, assets, tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        result = report(runner, assets["model"], assets["images"], out, "--psi", "paper")
        assert result.exit_code == 0, result.output
    doc = load_results(out)
    assert len(doc["maps"]) == 3
    assert len(list((out / "maps").glob("*.jpg"))) == 3


def test_default_output_folder(runner, assets, tmp_path):
    result = run(
        runner,
        "report",
        assets["model"],
        assets["images"],
        "-q",
        "--no-overlays",
        "--methods",
        "fullgrad",
        "--checks",
        "completeness",
    )
    assert result.exit_code == 0, result.output
    doc = load_results(tmp_path / "saliaudit-report")
    assert doc["config"]["sources"]["output"] == "default"


# --------------------------------------------------------------------------- the user's model file


def test_model_file_never_written(runner, tmp_path):
    model = export_pt2(tmp_path / "user_model.pt2", seed=1)
    os.utime(model, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    before = (sha256(model), model.stat().st_mtime_ns, model.stat().st_size)
    images = make_images(tmp_path / "imgs", 2)

    result = report(runner, model, images, tmp_path / "ok", "--psi", "paper")
    assert result.exit_code == 0, result.output
    assert load_results(tmp_path / "ok")["model"]["sha256"] == before[0]
    assert (sha256(model), model.stat().st_mtime_ns, model.stat().st_size) == before

    # failing runs: the gate (exit 1) and no usable image (exit 4)
    result = report(
        runner,
        model,
        images,
        tmp_path / "gate",
        "--no-overlays",
        env={"SALIAUDIT_COMPLETENESS_TOLERANCE": "1e-30"},
    )
    assert result.exit_code == 1, result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = report(runner, model, empty, tmp_path / "noimg")
    assert result.exit_code == 4, result.output
    assert (sha256(model), model.stat().st_mtime_ns, model.stat().st_size) == before


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_numbers(runner, assets, tmp_path):
    docs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        result = report(
            runner,
            assets["model"],
            assets["images"],
            out,
            "--seed",
            "4",
            "--no-overlays",
            "--batch-size",
            "2",
        )
        assert result.exit_code == 0, result.output
        docs.append(load_results(out))
    a, b = docs
    assert a["completeness"] == b["completeness"]
    assert [c["value"] for c in a["checks"]] == [c["value"] for c in b["checks"]]
    assert [c["status"] for c in a["checks"]] == [c["status"] for c in b["checks"]]
    assert a["images"] == b["images"]
    assert sorted(a["timings"]["per_stage"]) == sorted(b["timings"]["per_stage"])


def test_batch_size_does_not_change_numbers(runner, assets, tmp_path):
    docs = []
    for bs in (1, 8):
        out = tmp_path / f"bs{bs}"
        result = report(
            runner, assets["model"], assets["images"], out, "--batch-size", str(bs), "--no-overlays"
        )
        assert result.exit_code == 0, result.output
        docs.append(load_results(out))
    for r1, r8 in zip(docs[0]["completeness"], docs[1]["completeness"]):
        assert r1["image"] == r8["image"] and r1["target"] == r8["target"]
        assert r1["logit"] == pytest.approx(r8["logit"], rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- the real entry point


@pytest.mark.slow  # 8.5 s: a new interpreter imports torch
def test_python_dash_m_entry_point(assets, tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALIAUDIT_")}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [
        sys.executable,
        "-m",
        "saliaudit",
        "report",
        str(assets["model"]),
        str(assets["images"]),
        "-o",
        str(out),
        "--format",
        "json",
        "--psi",
        "paper,signed",
        "--methods",
        "fullgrad",
        "--checks",
        "completeness",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "results.json" in proc.stderr  # terminal summary goes to stderr
    doc = load_results(out)
    assert doc["summary"]["status"] == "pass"
    assert len(doc["maps"]) == 6

    # a usage error through the real entry point: exit 2, one line on stderr
    proc = subprocess.run(
        cmd + ["--fail-on", "maybe"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        "saliaudit: error: invalid --fail-on: expected one of fail, warn, never, got 'maybe'"
    ]


@pytest.mark.parametrize("signame", ["SIGINT", pytest.param("SIGTERM", marks=pytest.mark.slow)])  # 5 s each
def test_interrupted_run_keeps_partial_results_exit_130(assets, tmp_path, signame):
    import signal
    import time

    images = make_images(tmp_path / "many", n=200)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALIAUDIT_")}
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [
        sys.executable,
        "-m",
        "saliaudit",
        "report",
        str(assets["model"]),
        str(images),
        "-o",
        str(out),
        "--batch-size",
        "1",
        "--methods",
        "fullgrad",
        "--checks",
        "completeness",
        "--format",
        "json",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240

    def started() -> bool:  # overlays of the third image exist: two batches (of 1) are complete
        return (out / "maps").is_dir() and len(list((out / "maps").glob("*.jpg"))) > 2 * 6

    while not started():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the audit never started"
        time.sleep(0.2)
    proc.send_signal(getattr(signal, signame))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    doc = load_results(out)
    assert doc["summary"]["status"] == "error"
    assert "interrupted" in doc["summary"]["reason"]
    assert 0 < doc["inputs"]["loaded"] < 200
    assert len(doc["completeness"]) == doc["inputs"]["loaded"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
