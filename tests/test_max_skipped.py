"""Images the model cannot handle count: ``--max-skipped`` fails the gate when more than that
fraction of the images is dropped (here: NaN logits), the cover and the summaries say how
many were dropped and why; and the validation probe respects ``--batch-size 1``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saliaudit.report.sections import cover_view
from saliaudit.result import dropped_inputs, dropped_text

from .test_cli import META, _clean_env, report, runner, tiny_cnn  # noqa: F401  (fixtures)

torch.set_num_threads(1)


class NanOnBright(torch.nn.Module):
    """tiny_cnn, but NaN logits for an image whose normalized mean is above 0 (a bright one)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        bright = x.mean(dim=(1, 2, 3)) > 0
        return torch.where(bright[:, None], torch.full_like(logits, float("nan")), logits)


class OneAtATime(torch.nn.Module):
    """tiny_cnn that refuses any batch but one image (like a model with a hard-coded batch of 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            raise RuntimeError(f"this model runs one image at a time, got a batch of {x.shape[0]}")
        return self.net(x)


def _png(path: Path, lo: int, hi: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(lo, hi, (16, 16, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def nan_case(tmp_path_factory) -> dict[str, Path]:
    """A .pt2 model that gives NaN on bright images, and 3 images of which 1 is bright."""
    root = tmp_path_factory.mktemp("nan")
    ep = torch.export.export(
        NanOnBright().eval(),
        (torch.rand(2, 3, 16, 16),),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
    )
    model = root / "nan.pt2"
    torch.export.save(ep, str(model), extra_files={"saliaudit.json": json.dumps(META)})
    images = root / "images"
    _png(images / "dark0.png", 0, 90, 0)
    _png(images / "dark1.png", 0, 90, 1)
    _png(images / "bright.png", 180, 256, 2)
    return {"model": model, "images": images}


def _doc(out: Path) -> dict:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_a_third_dropped_fails_the_gate_by_default(runner, nan_case, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    result = report(runner, nan_case["model"], nan_case["images"], out, "--psi", "paper", "--no-overlays")
    assert result.exit_code == 1, result.output
    assert "1 of 3 images (33 %) dropped, more than --max-skipped 0.1 allows" in result.output
    doc = _doc(out)
    s = doc["summary"]
    assert s["gate_failed"] is True
    assert s["counts"]["fail"] == 0 and s["counts"]["error"] == 0  # the cells alone would pass
    assert s["dropped"]["n"] == 1 and s["dropped"]["of"] == 3 and s["dropped"]["exceeded"] is True
    assert s["dropped"]["reasons"] == [{"reason": "the model output NaN/Inf for this image", "n": 1}]
    assert [x["path"] for x in doc["inputs"]["skipped"]] == ["bright.png"]
    cover = cover_view(doc)
    assert cover["gate_text"].startswith("The gate failed: 1 of 3 images (33 %) dropped")
    assert "NaN/Inf" in cover["gate_text"]


def test_max_skipped_half_passes_the_gate_and_still_says_what_was_dropped(
    runner,  # noqa: F811
    nan_case,
    tmp_path,
):
    out = tmp_path / "out"
    result = report(
        runner,
        nan_case["model"],
        nan_case["images"],
        out,
        "--psi",
        "paper",
        "--no-overlays",
        "--max-skipped",
        "0.5",
    )
    assert result.exit_code == 0, result.output
    doc = _doc(out)
    assert doc["summary"]["gate_failed"] is False and doc["summary"]["dropped"]["exceeded"] is False
    assert doc["config"]["values"]["max_skipped"] == 0.5
    assert "1 of 3 images (33 %) dropped, within --max-skipped 0.5" in cover_view(doc)["gate_text"]


def test_fail_on_never_ignores_dropped_images(runner, nan_case, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    result = report(
        runner, nan_case["model"], nan_case["images"], out, "--psi", "paper", "--fail-on", "never"
    )
    assert result.exit_code == 0, result.output
    assert _doc(out)["summary"]["dropped"]["exceeded"] is True


def test_dropped_counts_exclude_duplicates_and_group_reasons():
    inputs = {
        "loaded": 6,
        "skipped": [
            {"path": "a.png", "reason": "cannot decode; replace it"},
            {"path": "b.png", "reason": "cannot decode; replace it"},
            {"path": "c.png", "reason": "duplicate of d.png (same file content); audited once"},
        ],
    }
    d = dropped_inputs(inputs, 0.25)
    assert (d["n"], d["of"], d["exceeded"]) == (2, 8, False)
    assert d["reasons"] == [{"reason": "cannot decode", "n": 2}]
    assert dropped_inputs(inputs, 0.2)["exceeded"] is True
    assert dropped_text(dropped_inputs({"loaded": 3, "skipped": []}, 0.1)) is None


def test_bad_max_skipped_is_a_usage_error(runner, nan_case, tmp_path):  # noqa: F811
    result = report(runner, nan_case["model"], nan_case["images"], tmp_path / "o", "--max-skipped", "1.5")
    assert result.exit_code == 2, result.output
    assert "--max-skipped" in result.output


def test_a_batch_one_model_runs_with_batch_size_1(runner, tmp_path):  # noqa: F811
    model = tmp_path / "one.pt"
    torch.save(OneAtATime().eval(), model)
    images = tmp_path / "images"
    for i in range(3):
        _png(images / f"{i}.png", 0, 256, i)
    common = ["--trust-model", "--input-size", "16", "--psi", "paper", "--no-overlays"]
    refused = report(runner, model, images, tmp_path / "a", *common)
    assert refused.exit_code == 3, refused.output  # probed with 2 images: not a working classifier
    assert "batch of 2" in refused.output
    out = tmp_path / "b"
    result = report(runner, model, images, out, *common, "--batch-size", "1")
    assert result.exit_code == 0, result.output
    doc = _doc(out)
    assert doc["inputs"]["loaded"] == 3
    assert any("one image at a time" in n for n in doc["model"]["notes"])
