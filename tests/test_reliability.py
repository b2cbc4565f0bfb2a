"""Reliability under real use (issue 6): the corpus of bad models and images, out-of-memory
retries, the output folder of a previous run, and reproducible subsets.

Every corpus entry runs the real command line (in-process, ``typer.testing.CliRunner``) into a
*previous saliaudit output* (marker, results.json, overlays) that also holds a file of the
user's, and asserts: the one-line message naming the file and the remedy, the exit code, no
traceback (``--debug`` shows one), and that nothing in the folder was lost or half-written.
Models and images are generated here; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from typer.testing import CliRunner

import saliaudit.data
from saliaudit.checks.runner import is_oom, oom_split
from saliaudit.cli import app
from saliaudit.data import find_images
from saliaudit.report.output import LOCK, MARKER

from . import test_cli as cli
from .test_cli import (
    META,
    _Payload,
    assert_one_line_error,
    make_images,
    report,
    run,
    tiny_cnn,
    write_png,
)

# the fixtures of test_cli (assigned, so that test parameters of the same name do not shadow imports)
assets, runner, _clean_env = cli.assets, cli.runner, cli._clean_env


def load_results(out: Path) -> dict:
    """results.json, complete and strict JSON (no NaN/Infinity tokens)."""

    def refuse(token):
        raise AssertionError(f"non-finite token {token} in results.json")

    return json.loads((out / "results.json").read_text(encoding="utf-8"), parse_constant=refuse)


FAST = ("--methods", "fullgrad", "--checks", "completeness", "--format", "json", "-q")


# --------------------------------------------------------------------------- a model that runs out of memory

if not hasattr(getattr(torch.ops, "saliaudit_test", object()), "oom_gate"):

    @torch.library.custom_op("saliaudit_test::oom_gate", mutates_args=())
    def oom_gate(x: torch.Tensor, limit: int, grad_oom: bool) -> torch.Tensor:
        """Identity that behaves like a device running out of memory: on batches larger than
        ``limit``, and (``grad_oom``) whenever a gradient is recorded through it."""
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {x.shape[0]} GiB (batch {x.shape[0]})"
            )
        return x.clone()

    @oom_gate.register_fake
    def _(x, limit, grad_oom):
        return torch.empty_like(x)

    def _oom_setup(ctx, inputs, output):
        if inputs[2]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB (backward)")

    oom_gate.register_autograd(lambda ctx, grad: (grad, None, None), setup_context=_oom_setup)


class Gated(torch.nn.Module):
    """tiny_cnn behind the out-of-memory gate (kept as one op in the exported graph)."""

    def __init__(self, limit: int, grad_oom: bool = False):
        super().__init__()
        self.net, self.limit, self.grad_oom = tiny_cnn(), limit, grad_oom

    def forward(self, x):
        return self.net(torch.ops.saliaudit_test.oom_gate(x, self.limit, self.grad_oom))


class Head(torch.nn.Module):
    """tiny_cnn with a broken output."""

    def __init__(self, kind: str):
        super().__init__()
        self.net, self.kind = tiny_cnn(), kind

    def forward(self, x):
        y = self.net(x)
        if self.kind == "nan":
            return y * float("nan")
        if self.kind == "inf":
            return y + float("inf")
        if self.kind == "3d":
            return y[:, :, None]
        if self.kind == "tuple":
            return y, y
        if self.kind == "nan_on_bright":  # finite on the blank validation batch, NaN on bright images
            bright = x.mean((1, 2, 3)) > 0.5
            return torch.where(bright[:, None], torch.full_like(y, float("nan")), y)
        return y


def export(module: torch.nn.Module, path: Path, *, static: bool = False, meta: dict | None = None) -> Path:
    x = torch.rand(1 if static else 2, 3, 16, 16)
    dyn = None if static else ({0: torch.export.Dim("batch", min=1, max=64)},)
    ep = torch.export.export(module, (x,), dynamic_shapes=dyn)
    torch.export.save(ep, str(path), extra_files={"saliaudit.json": json.dumps(meta or META)})
    return path


def squeezenet(k: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.squeezenet1_1(num_classes=k).eval()


# --------------------------------------------------------------------------- a previous output folder


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def previous(assets, tmp_path_factory) -> Path:
    """A real previous saliaudit output: marker, results.json and overlays."""
    out = tmp_path_factory.mktemp("previous") / "out"
    result = CliRunner().invoke(
        app, ["report", str(assets["model"]), str(assets["images"]), "-o", str(out), *FAST, "--psi", "paper"]
    )
    assert result.exit_code == 0, result.output
    assert (out / MARKER).is_file() and list((out / "maps").glob("*.jpg"))
    return out


@pytest.fixture
def prev_out(previous, tmp_path):
    """A copy of the previous output with a file of the user's in it; ``check()`` asserts that
    nothing of the user's was lost or changed, nothing is half-written, and the folder holds
    exactly what the new results.json lists (the earlier run's files it did not rewrite are
    gone)."""
    out = tmp_path / "previous_out"
    shutil.copytree(previous, out)
    (out / "my notes.txt").write_text("the user's own file\n", encoding="utf-8")
    before = snapshot(out)
    ours = {m["path"] for m in load_results(out)["manifest"]} | {"results.json", MARKER}
    users = set(before) - ours
    assert users == {"my notes.txt"}

    class Folder:
        path = out

        @staticmethod
        def check() -> dict:
            after = snapshot(out)
            for rel in users:  # saliaudit's own files may be rewritten or removed, the user's not
                assert after.get(rel) == before[rel], rel
            assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
            assert not (out / LOCK).exists()
            for p in out.rglob("*.png"):
                with Image.open(p) as im:
                    im.verify()
            doc = load_results(out)  # complete, valid JSON
            listed = {m["path"]: (m["sha256"], m["bytes"]) for m in doc["manifest"]}
            assert set(listed) == set(after) - users - {"results.json", MARKER}
            for rel, (digest, size) in listed.items():
                assert after[rel][0] == digest and (out / rel).stat().st_size == size, rel
            return doc

    return Folder()


def debug_run(runner, model, images, out, *extra):
    return run(runner, "--debug", "report", model, images, "-o", out, *FAST, *extra)


# --------------------------------------------------------------------------- models that cannot be audited


def _truncated_pt2(tmp, assets):
    data = assets["model"].read_bytes()
    (tmp / "half.pt2").write_bytes(data[: len(data) // 2])
    return tmp / "half.pt2", []


def _truncated_state_dict(tmp, assets):
    torch.save(squeezenet().state_dict(), tmp / "full.pth")
    data = (tmp / "full.pth").read_bytes()
    (tmp / "cut.pth").write_bytes(data[: len(data) // 3])
    return tmp / "cut.pth", ["--arch", "squeezenet1_1"]


def _empty(tmp, assets):
    (tmp / "empty.pt2").write_bytes(b"")
    return tmp / "empty.pt2", []


def _directory(tmp, assets):
    (tmp / "model_dir.pt2").mkdir()
    return tmp / "model_dir.pt2", []


def _missing(tmp, assets):
    return tmp / "no_such_model.pt2", []


def _unsupported(tmp, assets):
    (tmp / "model.onnx").write_bytes(b"\x08\x07not a torch model")
    return tmp / "model.onnx", []


def _wrong_arch(tmp, assets):
    torch.save(squeezenet().state_dict(), tmp / "squeeze.pth")
    return tmp / "squeeze.pth", ["--arch", "resnet18", "--input-size", "32"]


def _wrong_num_classes(tmp, assets):
    torch.save(squeezenet(3).state_dict(), tmp / "squeeze3.pth")
    return tmp / "squeeze3.pth", ["--arch", "squeezenet1_1", "--num-classes", "5", "--input-size", "32"]


def _no_arch(tmp, assets):
    torch.save(tiny_cnn().state_dict(), tmp / "weights.pt")
    return tmp / "weights.pt", []


def _static_size(tmp, assets):
    return export(tiny_cnn(), tmp / "static16.pt2", static=True), ["--input-size", "32"]


def _bad_output(kind):
    def build(tmp, assets):
        return export(Head(kind), tmp / f"out_{kind}.pt2"), []

    return build


def _pickled_module(tmp, assets):
    torch.save(tiny_cnn(), tmp / "whole_module.pt")
    return tmp / "whole_module.pt", []


def _malicious(tmp, assets):
    path = tmp / "evil.pt"
    with open(path, "wb") as fh:
        torch.save({"model": tiny_cnn(), "x": _Payload(tmp / "PWNED")}, fh)
    return path, []


def _oom_at_load(tmp, assets):
    return export(Gated(limit=0), tmp / "huge.pt2"), []


# (id, builder, exit code, what the one line must say besides the file name: the problem and the remedy);
# a path that is missing or a folder, or a flag the file needs (--arch, --trust-model): usage, 2
MODEL_CORPUS = [
    ("truncated_pt2", _truncated_pt2, 3, ["truncated or corrupt", "re-save or re-download"]),
    ("truncated_state_dict", _truncated_state_dict, 3, ["truncated", "re-save or re-download"]),
    ("empty", _empty, 3, ["empty", "re-save or re-download"]),
    ("directory", _directory, 2, ["not a file", "not a folder"]),
    ("missing", _missing, 2, ["not found", "check the MODEL path"]),
    ("unsupported_type", _unsupported, 3, ["unsupported", ".pt2"]),
    ("wrong_arch", _wrong_arch, 3, ["does not match --arch resnet18", "check --arch"]),
    ("wrong_num_classes", _wrong_num_classes, 3, ["3 classes", "--num-classes"]),
    ("state_dict_without_arch", _no_arch, 2, ["state_dict", "--arch"]),
    ("pt2_static_size_vs_input_size", _static_size, 3, ["--input-size 32,32", "16,16", "omit --input-size"]),
    ("outputs_nan", _bad_output("nan"), 3, ["NaN/Inf", "check the weights"]),
    ("outputs_inf", _bad_output("inf"), 3, ["NaN/Inf", "check the weights"]),
    ("output_not_batch_classes", _bad_output("3d"), 3, ["(batch, classes)", "wrap the model"]),
    ("output_tuple", _bad_output("tuple"), 3, ["(batch, classes)", "wrap the model"]),
    ("pickled_module_untrusted", _pickled_module, 2, ["runs code", "--trust-model", "torch.export"]),
    ("malicious_pickle", _malicious, 2, ["runs code", "--trust-model"]),
    ("out_of_memory_at_load", _oom_at_load, 3, ["out of memory", "--device cpu"]),
]


@pytest.mark.parametrize(
    "build, code, needles", [c[1:] for c in MODEL_CORPUS], ids=[c[0] for c in MODEL_CORPUS]
)
def test_model_corpus(runner, assets, prev_out, tmp_path, build, code, needles):
    models = tmp_path / "models"
    models.mkdir()
    model, extra = build(models, assets)
    result = report(runner, model, assets["images"], prev_out.path, "--no-overlays", *extra)
    line = assert_one_line_error(result, code, model.name, *needles)
    doc = prev_out.check()
    if doc["summary"]["status"] == "error":  # a failed run records why (the previous results are replaced)
        assert doc["summary"]["reason"] in line

    debug = debug_run(runner, model, assets["images"], prev_out.path, "--no-overlays", *extra)
    assert debug.exit_code == code, debug.output
    assert "Traceback (most recent call last)" in debug.output
    assert [ln for ln in debug.output.splitlines() if ln.strip()][-1] == line
    prev_out.check()
    assert not (models / "PWNED").exists()  # the malicious payload never ran, --debug or not


def test_malicious_pickle_refused_with_trust_flag_missing_and_payload_proven(runner, assets, tmp_path):
    """The payload does run when unpickled (so its absence above means something)."""
    import pickle

    marker = tmp_path / "CHECK"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


# --------------------------------------------------------------------------- models that are audited, with a note


def test_training_mode_pickled_module_is_audited_in_eval_mode(runner, assets, prev_out, tmp_path):
    model = tiny_cnn().train()
    path = tmp_path / "train_mode.pt"
    torch.save(model, path)
    result = report(
        runner,
        path,
        assets["images"],
        prev_out.path,
        "--trust-model",
        "--input-size",
        "16",
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--no-overlays",
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    doc = prev_out.check()
    assert doc["summary"]["status"] == "pass"
    assert any("training mode" in n and "eval mode" in n for n in doc["model"]["notes"])
    assert doc["inputs"]["loaded"] == 3


def test_training_mode_pt2_is_noted(runner, assets, prev_out, tmp_path):
    path = export(tiny_cnn().train(), tmp_path / "train_graph.pt2")
    result = report(runner, path, assets["images"], prev_out.path, "--no-overlays")
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
    doc = prev_out.check()
    assert any("training mode" in n and "model.eval()" in n for n in doc["model"]["notes"])
    assert doc["inputs"]["loaded"] == 3


@pytest.mark.slow  # 5 s
def test_checkpoint_saved_on_gpu_loads_on_cpu(runner, assets, prev_out, tmp_path, monkeypatch):
    path = tmp_path / "gpu_ckpt.pth"
    model = squeezenet()
    with monkeypatch.context() as mp:  # storages tagged cuda:0, as torch.save writes them on a GPU
        mp.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    assert b"cuda:0" in path.read_bytes()
    result = report(
        runner,
        path,
        assets["images"],
        prev_out.path,
        "--arch",
        "squeezenet1_1",
        "--input-size",
        "32",
        "--no-overlays",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    doc = prev_out.check()
    assert doc["model"]["format"] == "state_dict" and doc["model"]["num_classes"] == 3
    assert doc["run"]["device"] == "cpu" and doc["inputs"]["loaded"] == 3


def test_torchscript_is_audited_with_the_limitation_named(runner, assets, prev_out, tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.trace(tiny_cnn(), torch.rand(1, 3, 16, 16)).save(str(path))
    result = report(runner, path, assets["images"], prev_out.path, "--input-size", "16", "--no-overlays")
    # FullGrad on TorchScript cannot see the biases: completeness fails, honestly, with the reason
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    doc = prev_out.check()
    assert doc["model"]["format"] == "torchscript"
    assert any("TorchScript" in x for x in doc["model"]["limitations"])
    cell = doc["checks"][0]
    assert cell["status"] == "fail" and "TorchScript" in cell["message"]


def test_model_with_nan_on_some_images_skips_those_images(runner, assets, prev_out, tmp_path):
    path = export(Head("nan_on_bright"), tmp_path / "nan_some.pt2")
    images = make_images(tmp_path / "imgs", 3)
    Image.new("RGB", (16, 16), (250, 250, 250)).save(images / "bright.png")
    result = report(runner, path, images, prev_out.path, "--no-overlays")
    # 1 of 4 images dropped is over the default --max-skipped 0.1: the cells pass, the gate fails
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    doc = prev_out.check()
    skipped = {s["path"]: s["reason"] for s in doc["inputs"]["skipped"]}
    assert list(skipped) == ["bright.png"]
    assert "NaN/Inf" in skipped["bright.png"] and "--mean" in skipped["bright.png"]
    assert doc["inputs"]["loaded"] == 3 and len(doc["completeness"]) == 3
    assert doc["summary"]["status"] == "pass" and doc["summary"]["gate_failed"] is True
    assert doc["summary"]["dropped"]["exceeded"] is True


# --------------------------------------------------------------------------- images


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def image_corpus(folder: Path) -> dict[str, tuple[str, str]]:
    """Every bad image kind of docs/usage.md ("Images"), next to two good images.

    Returns ``{file: ("skipped", words of the reason) | ("note", words of a note) | ("ok", "")}``.
    """
    rng = np.random.default_rng(7)
    write_png(folder / "good0.png", 16, 16, seed=100)
    write_png(folder / "good1.png", 20, 18, seed=101)
    (folder / "text.png").write_text("this is not an image\n", encoding="utf-8")
    data = (folder / "good0.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    arr16 = rng.integers(0, 65535, (18, 18), dtype=np.uint16)
    Image.fromarray(arr16).save(folder / "deep16.png")  # 16-bit grayscale
    Image.fromarray(rng.integers(0, 256, (17, 17), dtype=np.uint8), "L").save(folder / "gray.png")
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert(
        "P", palette=Image.ADAPTIVE, colors=16
    ).save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("CMYK").save(
        folder / "cmyk.jpg", quality=95
    )
    exif = Image.Exif()
    exif[0x0112] = 6
    (folder / "rotated.jpg").write_bytes(
        _jpeg_bytes(Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)), exif=exif)
    )
    (folder / "really_a_jpeg.png").write_bytes(
        _jpeg_bytes(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    )
    write_png(folder / "huge.png", 200, 200, seed=102)  # 40,000 pixels > --max-pixels 20000
    shutil.copy(folder / "good1.png", folder / "zz_duplicate.png")
    write_png(folder / "locked.png", 16, 16, seed=103)  # reading it is refused (monkeypatched)
    return {
        "good0.png": ("ok", ""),
        "good1.png": ("ok", ""),
        "gray.png": ("ok", ""),
        "palette.png": ("ok", ""),
        "cmyk.jpg": ("ok", ""),
        "text.png": ("skipped", "not an image|remove it or fix the file"),
        "truncated.png": ("skipped", "truncated or corrupt|re-export or re-download"),
        "empty.png": ("skipped", "empty file|remove it or re-export"),
        "huge.png": ("skipped", "image too large|downscale it or raise --max-pixels"),
        "zz_duplicate.png": ("skipped", "duplicate of good1.png|audited once"),
        "locked.png": ("skipped", "permission denied|chmod +r"),
        "deep16.png": ("note", "16-bit image scaled to 8 bits"),
        "alpha.png": ("note", "alpha composited on black"),
        "rotated.jpg": ("note", "EXIF orientation 6 applied"),
        "really_a_jpeg.png": ("note", "extension .png but content is JPEG"),
    }


def _deny(monkeypatch, name: str) -> None:
    real = saliaudit.data._read_bytes

    def read(path):
        if Path(path).name == name:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(saliaudit.data, "_read_bytes", read)


def test_image_corpus_skips_with_reasons_and_goes_on(runner, assets, prev_out, tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    expected = image_corpus(folder)
    _deny(monkeypatch, "locked.png")
    result = report(
        runner,
        assets["model"],
        folder,
        prev_out.path,
        *("--max-pixels", "20000", "--psi", "paper", "--max-skipped", "1"),  # most files are bad
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    doc = prev_out.check()
    skipped = {s["path"]: s["reason"] for s in doc["inputs"]["skipped"]}
    notes = {r["image"]: r["notes"] for r in doc["images"]}
    assert doc["inputs"]["found"] == len(expected)
    assert set(skipped) == {f for f, (kind, _) in expected.items() if kind == "skipped"}
    assert set(notes) == {f for f, (kind, _) in expected.items() if kind != "skipped"}
    for name, (kind, words) in expected.items():
        if kind == "skipped":
            reason = skipped[name]
            assert "\n" not in reason and all(w in reason for w in words.split("|")), (name, reason)
        elif kind == "note":
            assert any(words in n for n in notes[name]), (name, notes[name])
    # the audited images all have an overlay (written atomically, next to the previous ones)
    assert {m["image"] for m in doc["maps"]} == set(notes)
    assert all((prev_out.path / m["path"]).is_file() for m in doc["maps"])


def test_no_usable_image_exit_4_and_debug(runner, assets, prev_out, tmp_path):
    folder = tmp_path / "all_bad"
    folder.mkdir()
    (folder / "a.png").write_text("not an image", encoding="utf-8")
    (folder / "b.jpg").write_bytes(b"")
    result = report(runner, assets["model"], folder, prev_out.path)
    line = assert_one_line_error(result, 4, "all_bad", "a.png", "remove it or fix the file")
    doc = prev_out.check()
    assert doc["summary"]["status"] == "error" and doc["summary"]["reason"] in line
    debug = debug_run(runner, assets["model"], folder, prev_out.path)
    assert debug.exit_code == 4 and "Traceback (most recent call last)" in debug.output
    assert [ln for ln in debug.output.splitlines() if ln.strip()][-1] == line
    prev_out.check()


def test_good_run_into_previous_output_keeps_the_users_files(runner, assets, prev_out):
    result = report(runner, assets["model"], assets["images"], prev_out.path, "--psi", "paper,abs")
    assert result.exit_code == 0, result.output
    doc = prev_out.check()
    assert doc["summary"]["status"] == "pass" and len(doc["maps"]) == 6


# --------------------------------------------------------------------------- out of memory


def test_oom_in_prediction_and_decomposition_retries_in_halves(runner, assets, tmp_path):
    """A device that fits 2 images: --batch-size 8 halves down to 2 and measures every image,
    with the numbers of --batch-size 2."""
    model = export(Gated(limit=2), tmp_path / "fits_two.pt2")
    images = make_images(tmp_path / "imgs", 6)
    docs = {}
    for bs in (8, 2):
        out = tmp_path / f"bs{bs}"
        result = report(runner, model, images, out, "--batch-size", str(bs), "--psi", "paper,abs")
        assert result.exit_code == 0, result.output
        docs[bs] = load_results(out)
    big, small = docs[8], docs[2]
    assert big["run"]["oom_retries"] > 0 and small["run"]["oom_retries"] == 0
    assert big["inputs"]["loaded"] == 6 and len(big["completeness"]) == 6
    assert [c["status"] for c in big["checks"]] == ["pass"]
    for a, b in zip(big["completeness"], small["completeness"], strict=True):
        assert a["image"] == b["image"] and a["target"] == b["target"]
        assert a["logit"] == pytest.approx(b["logit"], rel=1e-5, abs=1e-6)
        assert a["reconstructed"] == pytest.approx(b["reconstructed"], rel=1e-4, abs=1e-5)
    assert [(r["image"], r["predicted"]) for r in big["images"]] == [
        (r["image"], r["predicted"]) for r in small["images"]
    ]
    assert [r["score"] for r in big["images"]] == pytest.approx([r["score"] for r in small["images"]])
    assert sorted((m["image"], m["psi"]) for m in big["maps"]) == sorted(
        (m["image"], m["psi"]) for m in small["maps"]
    )


def test_oom_even_for_one_image_gives_error_cells(runner, assets, prev_out, tmp_path):
    model = export(Gated(limit=64, grad_oom=True), tmp_path / "no_room.pt2")
    result = report(runner, model, assets["images"], prev_out.path, "--no-overlays")
    assert result.exit_code == 1, result.output  # ERROR counts as FAIL for the gate
    assert "Traceback" not in result.output
    doc = prev_out.check()
    assert doc["run"]["oom_retries"] > 0
    assert doc["inputs"]["loaded"] == 3  # the prediction fitted; the gradient pass did not
    (cell,) = doc["checks"]
    assert cell["status"] == "error"
    assert "\n" not in cell["message"]
    assert "out of memory" in cell["message"] and "--device cpu" in cell["message"]
    (method,) = doc["methods"]
    assert method["status"] == "error" and "\n" not in method["reason"]
    assert doc["summary"]["status"] == "error"


def test_oom_split_halves_down_to_one_image_and_counts_retries():
    class _Rows:  # the rows of a tensor as oom_split sees a batch
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return int(self.x.shape[0])

        def select(self, index):
            return _Rows(self.x[index[0] : index[-1] + 1])

    sizes, retries = [], []

    def fn(rows, _maps):
        sizes.append(len(rows))
        if len(rows) > 1:
            raise RuntimeError("CUDA error: out of memory")
        return rows.x * 2

    x = torch.arange(5.0).reshape(5, 1)
    out = oom_split(fn, _Rows(x), {}, lambda a, b: torch.cat([a, b]), retries.append)
    assert torch.equal(out, x * 2)
    assert min(sizes) == 1 and sizes[0] == 5 and len(retries) == 4
    assert is_oom(torch.OutOfMemoryError("x")) and is_oom(RuntimeError("MPS backend out of memory"))
    assert not is_oom(ValueError("out of memory"))  # only the allocator's errors

    def bug(rows, _maps):
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        oom_split(bug, _Rows(x), {}, lambda a, b: a, retries.append)
    assert len(retries) == 4  # a bug is not retried


def test_fullgrad_merged_from_halves_equals_one_pass():
    """The decomposition retried in halves gives the terms, maps and residuals of one pass,
    also for per-image (implicit) biases."""
    from saliaudit.methods.fullgrad import FullGradients, full_gradients
    from saliaudit.model import wrap_module

    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.SiLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 3),
    ).eval()
    lm = wrap_module(m, input_size=16)
    x = torch.randn(5, 3, 16, 16)
    t = lm.logits(x).argmax(1)
    whole = full_gradients(lm, x, t)
    merged = FullGradients.cat(
        full_gradients(lm, x[:2], t[:2]),
        FullGradients.cat(full_gradients(lm, x[2:3], t[2:3]), full_gradients(lm, x[3:], t[3:])),
    )
    assert any(term.bias.shape[0] == 5 for term in whole.bias_terms.values())  # implicit (SiLU)
    assert set(merged.bias_terms) == set(whole.bias_terms)
    for name in ("logits", "reconstructed", "residual", "input_term"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name))
    for k, term in whole.bias_terms.items():
        torch.testing.assert_close(merged.bias_terms[k].value, term.value)
    a, b = whole.saliency_maps(), merged.saliency_maps()
    for psi in a:
        torch.testing.assert_close(b[psi], a[psi], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- subsets


def test_sample_same_seed_same_subset_other_seed_other_subset(runner, assets, tmp_path):
    images = make_images(tmp_path / "many", 12)
    subsets = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"out_{name}"
        result = report(
            runner,
            assets["model"],
            images,
            out,
            "--sample",
            "4",
            "--seed",
            str(seed),
            "--no-overlays",
            "--psi",
            "paper",
        )
        assert result.exit_code == 0, result.output
        doc = load_results(out)
        assert doc["config"]["values"]["sample"] == 4 and doc["run"]["seed"] == seed
        subsets[name] = [r["image"] for r in doc["images"]]
    expected = {s: [e.rel for e in find_images(images, sample=4, seed=s).entries] for s in (3, 4)}
    assert expected[3] != expected[4]  # the two seeds do pick different subsets of 12
    assert subsets["a"] == subsets["b"] == expected[3]
    assert subsets["c"] == expected[4]
    # --max-images caps the sample, keeping its order
    out = tmp_path / "capped"
    result = report(
        runner,
        assets["model"],
        images,
        out,
        "--sample",
        "4",
        "--seed",
        "3",
        "--max-images",
        "2",
        "--no-overlays",
        "--psi",
        "paper",
    )
    assert result.exit_code == 0, result.output
    assert [r["image"] for r in load_results(out)["images"]] == expected[3][:2]


def test_audit_decomposes_each_batch_once_for_its_top1_classes(tmp_path, monkeypatch):
    """The audit's decomposition, halved on out-of-memory, is the one the maps, figures and
    checks reuse: no (images, targets) pair is decomposed twice."""
    from collections import Counter

    from saliaudit.config import resolve_config
    from saliaudit.engine import run_audit
    from saliaudit.methods import fullgrad

    calls: Counter = Counter()
    seen = set()
    real = fullgrad.full_gradients

    def oom_once_per_batch(model, x, targets):
        key = (tuple(x.shape), round(float(x.double().sum()), 6), tuple(targets.tolist()))
        calls[key] += 1
        if x.shape[0] == 4 and key not in seen:  # the whole batch does not fit, once
            seen.add(key)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, x, targets)

    monkeypatch.setattr(fullgrad, "full_gradients", oom_once_per_batch)
    root = Path(__file__).resolve().parents[1] / "sample_models"
    cfg = resolve_config(
        {
            "methods": "fullgrad",
            "checks": "completeness",
            "overlays": False,
            "batch_size": 4,
            "max_images": 8,
            "format": "json",
        },
        cwd=tmp_path,
        environ={},
    )
    result = run_audit(root / "shapes_vgg.pt2", root / "images" / "shapes", cfg, tmp_path)
    assert len(result.images) == 8 and result.run["oom_retries"] >= 2
    # each full-batch key: one failed try; each half: one pass (twice would be recomputation)
    assert all(n == 1 for n in calls.values()), calls
    assert sum(1 for k in calls if k[0][0] == 2) >= 4
    assert all(r.relative_residual < 1e-3 for r in result.completeness)
