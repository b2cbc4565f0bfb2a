"""The comparison methods on the command line: report --methods, explain, methods."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from saliaudit.methods import METHODS, method_names, register

from .test_cli import assets, export_pt2, make_images, report, run, runner, tiny_cnn  # noqa: F401


def test_methods_command_lists_every_method_with_parameters(runner, assets):
    result = run(runner, "methods")
    assert result.exit_code == 0
    for name in method_names():
        assert name in result.output
        for param in METHODS[name].params:
            assert param in result.output
    assert "paper" in result.output and "per-channel" in result.output


def test_explain_writes_a_png_for_fullgrad_and_a_method(runner, assets, tmp_path):
    image = next(assets["images"].glob("*.png"))
    out = tmp_path / "fg.png"
    result = run(runner, "explain", assets["model"], image, "--psi", "signed", "-o", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] > 16
    names = [n for n in method_names() if METHODS[n].option == "post"]
    if names:
        out2 = tmp_path / "m.png"
        result = run(
            runner,
            "explain",
            assets["model"],
            image,
            "--method",
            names[0],
            "--post",
            "abs",
            "--target",
            "1",
            "-o",
            out2,
        )
        assert result.exit_code == 0, result.output
        assert "class 1" in result.output and out2.exists()


@pytest.mark.parametrize("args", [["--method", "nope"], ["--target", "7"], ["-o", "map.jpg"]])
def test_explain_usage_errors(runner, assets, tmp_path, args):
    image = next(assets["images"].glob("*.png"))
    result = run(runner, "explain", assets["model"], image, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_report_with_comparison_methods(runner, assets, tmp_path):
    names = [n for n in method_names() if METHODS[n].family in ("gradient", "control")][:2]
    if not names:
        pytest.skip("no comparison method registered")
    out = tmp_path / "out"
    result = report(
        runner,
        assets["model"],
        assets["images"],
        out,
        "--methods",
        ",".join(["fullgrad", *names]),
        "--psi",
        "paper",
        "--post",
        "signed",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert [m["method"] for m in doc["methods"]] == ["fullgrad", *names]
    assert all(m["status"] == "ok" for m in doc["methods"])
    for name in names:
        maps = [m for m in doc["maps"] if m["method"] == name]
        assert len(maps) == doc["inputs"]["loaded"] and all(m["post"] == "signed" for m in maps)
        assert all((out / m["path"]).is_file() for m in maps)


def test_a_failing_method_is_recorded_and_the_audit_goes_on(runner, assets, tmp_path):
    @register("test_broken", family="gradient", summary="always raises")
    def broken(model, x, targets):
        raise RuntimeError("boom")

    try:
        out = tmp_path / "out"
        result = report(runner, assets["model"], assets["images"], out, "--methods", "fullgrad,test_broken")
        assert result.exit_code == 0, result.output
        doc = json.loads((out / "results.json").read_text())
        entry = next(m for m in doc["methods"] if m["method"] == "test_broken")
        assert entry["status"] == "error" and "boom" in entry["reason"]
        assert doc["checks"][0]["status"] == "pass"
    finally:
        METHODS.pop("test_broken", None)


def test_internals_methods_skipped_on_torchscript(runner, assets, tmp_path):
    @register("test_internal", family="cam", needs_internals=True, summary="needs layers")
    def internal(model, x, targets):
        return torch.zeros(x.shape[0], 1, *x.shape[2:])

    @register("test_plain", family="gradient", summary="gradient only")
    def plain(model, x, targets):
        return torch.ones_like(x)

    try:
        path = tmp_path / "ts.pt"
        torch.jit.trace(tiny_cnn(), torch.rand(1, 3, 16, 16)).save(str(path))
        out = tmp_path / "out"
        result = report(
            runner,
            path,
            assets["images"],
            out,
            "--input-size",
            "16",
            "--methods",
            "fullgrad,test_internal,test_plain",
        )
        assert result.exit_code in (0, 1), result.output
        doc = json.loads((out / "results.json").read_text())
        status = {m["method"]: m for m in doc["methods"]}
        assert status["test_internal"]["status"] == "skipped"
        assert "TorchScript" in status["test_internal"]["reason"]
        assert status["test_plain"]["status"] == "ok"
        assert any(m["method"] == "test_plain" for m in doc["maps"])
        # FullGrad on TorchScript: bias terms unavailable, named, so completeness fails honestly
        assert doc["checks"][0]["status"] == "fail"
        assert "TorchScript" in doc["checks"][0]["message"]
    finally:
        METHODS.pop("test_internal", None)
        METHODS.pop("test_plain", None)
