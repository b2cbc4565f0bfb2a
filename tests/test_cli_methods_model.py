"""``saliaudit methods --model``: what each method will do, the CAM layer per model format
(vision transformers included); the methods benchmark runs.

The layer the command prints must be the one the CAM methods use
(:func:`saliaudit.methods.cam.find_cam_layer` on the loaded model) and one of the layers
``--cam-layer`` accepts (:func:`saliaudit.methods.cam.cam_layers`); on TorchScript, where layer
activations are not available, the command says the CAM methods are skipped and why.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import saliaudit
from saliaudit.methods import METHODS, method_names
from saliaudit.methods.cam import cam_layers, find_cam_layer

from .test_cli import _clean_env, run, tiny_cnn  # noqa: F401  (_clean_env: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
CAM_LINE = re.compile(
    r"^CAM layer for (.+?): (\S+) \(override with --cam-layer\); "
    r"layers: (.+)$",
    re.MULTILINE,
)


@pytest.fixture
def cli_runner() -> CliRunner:
    return CliRunner()


def unwrapped(output: str) -> str:
    """The output with the paragraph that starts with "CAM layer for" on one line (the
    listing wraps to the terminal width)."""
    head, sep, tail = output.partition("CAM layer for")
    return head + sep + " ".join(tail.split("\n")) if sep else output


def cam_line(output: str) -> tuple[str, list[str]]:
    match = CAM_LINE.search(unwrapped(output).rstrip())
    assert match, output
    return match.group(2), match.group(3).split(", ")


def expected_layers(path: Path, **kwargs) -> tuple[str, list[str]]:
    lm = saliaudit.load_model(path, **kwargs)
    example = torch.zeros(1, 3, *lm.input_size)
    return find_cam_layer(lm, example), cam_layers(lm, example)


def test_methods_model_pt2_lists_the_cam_layer(cli_runner):
    path = ROOT / "sample_models" / "shapes_vgg.pt2"
    result = run(cli_runner, "methods", "--model", path)
    assert result.exit_code == 0, result.output
    layer, layers = cam_line(result.output)
    want, want_layers = expected_layers(path)
    assert layer == want
    assert layer in want_layers and layers == want_layers
    assert layers[-1] == layer  # the default is the deepest spatial layer offered
    # the listing of the methods is still there
    for name in method_names():
        assert name in result.output


def test_methods_model_state_dict_resnet18_uses_layer4(cli_runner, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    result = run(cli_runner, "methods", "--model", path, "--arch", "resnet18", "--input-size", "64")
    assert result.exit_code == 0, result.output
    layer, layers = cam_line(result.output)
    assert layer == "layer4"
    want, want_layers = expected_layers(path, arch="resnet18", input_size="64")
    assert want == "layer4" and layer in want_layers and layers == want_layers
    text = method_lines(result.output)["gradcam"]
    assert text.startswith(
        "layer layer4, 512 channels on a 2×2 grid; default: the input of the global pooling"
    )
    assert {"layer1", "layer2", "layer3", "conv1"} <= set(layers)


def test_methods_model_torchscript_says_cam_methods_are_skipped(cli_runner, tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.trace(tiny_cnn(), torch.rand(1, 3, 16, 16)).save(str(path))
    result = run(cli_runner, "methods", "--model", path, "--input-size", "16")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert not CAM_LINE.search(result.output)
    line = next(ln for ln in unwrapped(result.output).splitlines() if ln.startswith("CAM layer for"))
    assert "not available" in line and "skipped" in line and "TorchScript" in line
    lines = method_lines(result.output)
    for name, m in METHODS.items():
        assert lines[name].startswith("skipped: needs layer internals") == m.needs_internals, name
    skipped = line.split("Skipped:")[1]
    for name, m in METHODS.items():
        if m.needs_internals:  # what an audit of this model would report SKIPPED
            assert name in skipped, (name, line)
        else:
            assert name not in skipped.replace(",", " ").split(), (name, line)


def test_methods_model_without_spatial_layer_says_cam_cannot_run(cli_runner, tmp_path):
    path = tmp_path / "mlp.pt2"
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    torch.export.save(torch.export.export(mlp, (torch.rand(2, 3, 8, 8),)), str(path))
    result = run(cli_runner, "methods", "--model", path, "--input-size", "8")
    assert result.exit_code == 0, result.output
    line = next(ln for ln in unwrapped(result.output).splitlines() if ln.startswith("CAM layer for"))
    assert "not available" in line and "no spatial" in line and "cannot run" in line
    for name, m in METHODS.items():
        if m.family == "cam":
            assert name in line


def method_lines(output: str) -> dict[str, str]:
    """The per-method section ("On MODEL ..., each method:"): {method: text}, one entry per
    method of a line that names several, continuation lines (indented by 4) joined."""
    section = re.split(r"each\s+method:\n", output, maxsplit=1)[1].split("\n\n", 1)[0]
    entries: list[str] = []
    for line in section.splitlines():
        if line.startswith("    "):
            entries[-1] += " " + line.strip()
        else:
            entries.append(line.strip())
    out = {}
    for entry in entries:
        names, text = entry.split(": ", 1)
        for name in names.split(", "):
            out[name] = text
    return out


def test_methods_model_vit_pt2_token_layer_and_fullgrad_terms(cli_runner, tmp_path):
    """A timm ViT exported to .pt2: the CAM methods read blocks.11.norm1's tokens on the 14×14
    patch grid without the class token, FullGrad takes attention as single ops and keeps the
    class token's share out of the map; each statement checked against the library."""
    timm = pytest.importorskip("timm")
    from saliaudit.methods.fullgrad import full_gradients

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5).eval()
    path = tmp_path / "vit.pt2"
    torch.export.save(torch.export.export(model, (torch.rand(1, 3, 224, 224),), strict=False), path)
    result = run(cli_runner, "methods", "--model", path)
    assert result.exit_code == 0, result.output
    lines = method_lines(result.output)
    assert set(lines) == set(method_names())
    assert all("skipped" not in text and "cannot run" not in text for text in lines.values()), lines
    for name in ("gradcam", "gradcam_pp", "gradcam_abs"):
        assert lines[name].startswith(
            "layer blocks.11.norm1, tokens 197 = 1 leading + 14×14 patches, 192 channels; "
            "the leading token is left out of the map"
        ), lines[name]
    assert lines["cumulative_gradcam"].endswith("blocks.10, blocks.11.norm1")
    fg_line = lines["fullgrad"]
    for part in (
        "attention modules taken as single ops (12)",
        "token terms drawn on the 14×14 patch grid",
        "the class token's share left out of the map",
    ):
        assert part in fg_line, fg_line
    layer, layers = cam_line(result.output)
    want, want_layers = expected_layers(path)
    assert layer == want == "blocks.11.norm1" and layers == want_layers
    # the statements are the library's: FullGrad's terms on the same model and input
    lm = saliaudit.load_model(path)
    fg = full_gradients(lm, torch.zeros(1, 3, 224, 224), [0])
    attention = [t for t in fg.bias_terms.values() if t.op == "attention"]
    leading = [t for t in fg.bias_terms.values() if t.name.endswith("[leading tokens]")]
    assert {t.name.removesuffix("[leading tokens]") for t in attention} == {
        f"blocks.{i}.attn.attention" for i in range(12)
    }
    assert leading and all(t.grad.shape[1] == 1 and not t.spatial for t in leading)
    patches = fg.bias_terms[leading[0].name.removesuffix("[leading tokens]")]
    assert patches.spatial and tuple(patches.grad.shape[-2:]) == (14, 14)
    assert f"({len(leading)} terms, kept in the completeness)" in fg_line
    assert f"{len(fg.bias_terms)} bias terms, {len(fg.spatial_terms)} drawn on the image" in fg_line


def test_methods_model_missing_file_is_one_line_error(cli_runner, tmp_path):
    """A MODEL that does not exist: a usage error (2), before the listing is printed."""
    result = run(cli_runner, "methods", "--model", tmp_path / "nope.pt2")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("saliaudit: error:") and "nope.pt2" in lines[0]


@pytest.mark.slow  # 60 s: every method through bench/methods.py
def test_bench_methods_quick_lists_every_method_with_a_finite_ratio():
    # one thread: two OpenMP threads on a busy 2-core machine can be 100x slower (spin-waits)
    proc = subprocess.run(
        [sys.executable, "bench/methods.py", "--quick", "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 8 and cells[0] not in ("method", "---"):
            rows[cells[0]] = cells
    assert "floor: forward + input gradient" in rows, proc.stdout
    for name in method_names():
        assert name in rows, (name, proc.stdout)
        seconds, ratio = float(rows[name][2]), float(rows[name][3])
        assert math.isfinite(seconds) and seconds > 0, rows[name]
        assert math.isfinite(ratio) and ratio > 0, rows[name]
        runs = rows[name][1].split("/")
        assert len(runs) == 3 and runs[0] in ("1", "1*"), rows[name]
    # references with the same parameters where one exists (test extras), '-' elsewhere
    if importlib.util.find_spec("captum"):
        assert rows["gradient"][4] != "-" and rows["occlusion"][4] != "-"
    if importlib.util.find_spec("pytorch_grad_cam"):
        assert rows["gradcam"][6] != "-" and rows["gradcam_pp"][6] != "-"
    assert rows["epsilon_lrp"][4] == "-" and rows["random"][4] == rows["random"][6] == "-"
