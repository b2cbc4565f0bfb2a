"""timm architectures (``--arch timm:NAME``) and Hugging Face folders (``save_pretrained``).

Every model is built locally with random weights (nothing is downloaded) and loaded the way a
user would: a state_dict plus ``--arch timm:NAME``, or the folder. The preprocessed tensor is
compared with timm's own eval transform (``timm.data.create_transform``) and with the Hugging
Face image processor on the same PIL images, and the logits with the original model's.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from saliaudit import load_model
from saliaudit.errors import ModelLoadError, UntrustedPickleError, UsageError
from saliaudit.methods import explain
from saliaudit.methods.fullgrad import full_gradients

from .test_cli import _clean_env, assert_one_line_error, report  # noqa: F401
from .tiny_vit import hf_vit_config


@pytest.fixture
def cli():
    from typer.testing import CliRunner

    return CliRunner()


timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def photos(n: int = 3) -> list[Image.Image]:
    """Random RGB images of odd, non-square sizes (the crops have odd margins)."""
    rng = np.random.default_rng(0)
    sizes = [(50, 71), (81, 40), (64, 64)][:n]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def load_results(out) -> dict:
    """results.json, with NaN/Infinity refused (embedded base64 may spell "NaN" by chance, so
    the tokens are refused by the parser, not searched for in the text)."""

    def refuse(token):
        raise AssertionError(f"non-finite token {token} in results.json")

    return json.loads((out / "results.json").read_text(encoding="utf-8"), parse_constant=refuse)


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ---------------------------------------------------------------------------------- timm


def timm_weights(tmp_path, name: str, k: int = 5, fmt: str = "pt", **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=k, **kwargs).eval()
    sd = model.state_dict()
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({key: v.contiguous() for key, v in sd.items()}, str(path))
    elif fmt == "ckpt.pt":  # a training checkpoint: wrapped, with DataParallel's prefix
        torch.save({"epoch": 3, "state_dict": {f"module.{key}": v for key, v in sd.items()}}, path)
    else:
        torch.save(sd, path)
    return model, path


def timm_reference(model, images, **overrides) -> torch.Tensor:
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config(model=model)
    cfg.update(overrides)
    transform = create_transform(**cfg)
    return torch.stack([transform(img) for img in images])


@pytest.mark.parametrize(
    "name, fmt",
    [("resnet10t", "pt"), ("convnext_atto", "safetensors"), ("deit_tiny_patch16_224", "ckpt.pt")],
)
def test_timm_state_dict_loads_as_timm_evaluates(tmp_path, name, fmt):
    model, path = timm_weights(tmp_path, name, fmt=fmt)
    lm = load_model(path, arch=f"timm:{name}")
    assert lm.arch == f"timm:{name}" and lm.format == "state_dict" and lm.num_classes == 5
    where = f"timm pretrained_cfg of {name}"
    for key in ("input_size", "mean", "std", "preprocessing"):
        assert lm.sources[key] == where, (key, lm.sources)
    cfg = model.pretrained_cfg
    assert lm.input_size == tuple(cfg["input_size"][1:]) and lm.mean == tuple(cfg["mean"])
    policy = lm.preprocessing
    assert policy.resize == "shorter" and policy.crop_pct == cfg["crop_pct"]
    assert policy.interpolation == cfg["interpolation"] and policy.backend == "pil"
    assert lm.class_names == [f"class {i}" for i in range(5)] and lm.sources["num_classes"] == "state_dict"

    images = photos()
    x = lm.preprocess(images)
    ref = timm_reference(model, images)
    assert x.shape == ref.shape and torch.allclose(x, ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(lm.logits(x), model(ref), atol=1e-5, rtol=0)


def test_timm_non_square_input_size_and_flags_win(tmp_path):
    """--input-size H,W (non-square) builds the ViT at that size; the flags win over
    pretrained_cfg and say so, the resize policy (crop_pct, bicubic) stays timm's."""
    model, path = timm_weights(tmp_path, "vit_tiny_patch16_224", img_size=(64, 48))
    lm = load_model(path, arch="timm:vit_tiny_patch16_224", input_size="64,48", mean=0.5, std="0.25")
    assert lm.input_size == (64, 48) and lm.mean == (0.5,) * 3 and lm.std == (0.25,) * 3
    assert lm.sources["input_size"] == lm.sources["mean"] == lm.sources["std"] == "flag"
    images = photos()
    ref = timm_reference(model, images, input_size=(3, 64, 48), mean=(0.5,) * 3, std=(0.25,) * 3)
    x = lm.preprocess(images)
    assert x.shape == (3, 3, 64, 48) and torch.allclose(x, ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(lm.logits(x), model(ref), atol=1e-5, rtol=0)
    # the part of each image the model sees (maps are drawn over it) has the input's aspect ratio
    for img in images:
        w, h = lm.visible(img).size
        assert abs(w / h - 48 / 64) < 0.1 and w <= img.width and h <= img.height


def test_timm_1000_classes_get_imagenet_names(tmp_path):
    from torchvision.models import ResNet18_Weights

    _, path = timm_weights(tmp_path, "resnet10t", k=1000)
    lm = load_model(path, arch="timm:resnet10t", input_size=32)
    assert lm.class_names == list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    assert "ImageNet" in lm.sources["class_names"]


def test_timm_unknown_name_suggests_close_names(tmp_path):
    _, path = timm_weights(tmp_path, "resnet10t")
    with pytest.raises(UsageError) as e:
        load_model(path, arch="timm:resnet10")
    assert "timm:resnet10t" in one_line(e.value) and "resnet10t.pt" in str(e.value)


def test_timm_weights_of_another_architecture_are_refused(tmp_path):
    _, path = timm_weights(tmp_path, "resnet10t")
    with pytest.raises(ModelLoadError) as e:
        load_model(path, arch="timm:convnext_atto")
    assert "does not match --arch timm:convnext_atto" in one_line(e.value)


@pytest.mark.parametrize("package, arch_or_folder", [("timm", "timm"), ("transformers", "hf")])
def test_missing_optional_package_is_one_line(tmp_path, monkeypatch, package, arch_or_folder):
    if arch_or_folder == "timm":
        _, path = timm_weights(tmp_path, "resnet10t")
        kwargs = {"arch": "timm:resnet10t"}
    else:
        path, kwargs = vit_folder(tmp_path / "vit"), {}
    monkeypatch.setitem(sys.modules, package, None)  # ``import package`` raises ImportError
    with pytest.raises(ModelLoadError) as e:
        load_model(path, **kwargs)
    text = one_line(e.value)
    extra = "timm" if package == "timm" else "hf"
    assert f"pip install 'saliaudit[{extra}]'" in text and str(path) in text and package in text


# ---------------------------------------------------------------------------- Hugging Face

LABELS = {0: "cat", 1: "dog", 2: "bird"}


def vit(**kwargs):
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    labels = {"id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
    return ViTForImageClassification(hf_vit_config(**labels, **kwargs)).eval()


def vit_folder(folder, processor: dict | None = None, model=None):
    """A ``save_pretrained`` folder; ``processor``: ViTImageProcessor options (``None``: no
    preprocessor_config.json)."""
    from transformers import ViTImageProcessor

    (model or vit()).save_pretrained(folder)
    if processor is not None:
        ViTImageProcessor(**processor).save_pretrained(folder)
    return folder


PROCESSORS = {
    "resize": {"size": {"height": 32, "width": 32}},
    "resize_crop_bicubic": {
        "size": {"height": 40, "width": 44},
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "resample": 3,
    },
    "no_normalize": {"size": {"height": 32, "width": 32}, "do_normalize": False},
}


@pytest.mark.parametrize("kind", list(PROCESSORS))
def test_hf_folder_loads_as_the_image_processor_prepares(tmp_path, kind):
    from transformers import AutoImageProcessor

    model = vit()
    folder = vit_folder(tmp_path / "vit", PROCESSORS[kind], model)
    lm = load_model(folder)
    assert lm.format == "huggingface" and lm.arch == "ViTForImageClassification"
    assert lm.class_names == ["cat", "dog", "bird"] and lm.sources["class_names"] == "config.json id2label"
    assert lm.sources["preprocessing"] == lm.sources["input_size"] == "preprocessor_config.json"
    assert "logits" in lm.sources["output"] and len(lm.sha256) == 64
    assert lm.input_size == (32, 32)
    if kind == "no_normalize":
        assert lm.mean == (0.0,) * 3 and lm.std == (1.0,) * 3 and "do_normalize false" in lm.sources["mean"]
    if kind == "resize_crop_bicubic":
        assert lm.preprocessing.resize_size == (40, 44) and lm.preprocessing.interpolation == "bicubic"

    images = photos()
    processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    ref = processor(images=images, return_tensors="pt")["pixel_values"]
    x = lm.preprocess(images)
    assert x.shape == ref.shape and torch.allclose(x, ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(lm.logits(x), model(pixel_values=ref).logits, atol=1e-5, rtol=0)


def test_hf_folder_without_processor_uses_the_class_defaults_at_image_size(tmp_path):
    from transformers import ViTImageProcessor

    model = vit()
    lm = load_model(vit_folder(tmp_path / "vit", None, model))
    assert lm.input_size == (32, 32) and lm.mean == (0.5,) * 3  # ViTImageProcessor's defaults
    assert "no preprocessor_config.json" in lm.sources["preprocessing"]
    assert "ViTImageProcessor defaults" in lm.sources["mean"]
    ref = ViTImageProcessor(size={"height": 32, "width": 32})(images=photos(), return_tensors="pt")
    assert torch.allclose(lm.preprocess(photos()), ref["pixel_values"], atol=1e-5, rtol=0)


def test_hf_convnext_with_input_size_flag_scales_the_processor_resize(tmp_path):
    """--input-size wins over crop_size; the processor's resize target scales with it."""
    from transformers import ConvNextConfig, ConvNextForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ConvNextConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], num_labels=2, image_size=64)
    folder = tmp_path / "convnext"
    ConvNextForImageClassification(config).eval().save_pretrained(folder)
    crop = {"height": 64, "width": 64}
    ViTImageProcessor(size={"height": 80, "width": 88}, do_center_crop=True, crop_size=crop).save_pretrained(
        folder
    )
    lm = load_model(folder)
    assert lm.input_size == (64, 64) and lm.preprocessing.resize_size == (80, 88)
    assert lm.class_names == ["LABEL_0", "LABEL_1"]
    half = load_model(folder, input_size=32)
    assert half.input_size == (32, 32) and half.sources["input_size"] == "flag"
    assert half.preprocessing.resize_size == (40, 44) and "scaled" in half.sources["preprocessing"]
    assert half.preprocess(photos(1)).shape == (1, 3, 32, 32)


def test_hf_model_runs_fullgrad_and_gradients(tmp_path):
    """The folder's model is an ordinary classifier to the methods: torch.export captures it
    (FullGrad), and the input gradient is the model's own."""
    model = vit()
    lm = load_model(vit_folder(tmp_path / "vit", PROCESSORS["resize"], model))
    x = lm.preprocess(photos(2))
    t = torch.tensor([0, 2])
    fg = full_gradients(lm, x, t)
    assert fg.input_term.shape == x.shape and torch.isfinite(fg.input_term).all()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    torch.testing.assert_close(fg.logits, expected.gather(1, t[:, None])[:, 0], atol=1e-5, rtol=0)
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(pixel_values=xi).logits.gather(1, t[:, None]).sum(), [xi])
    torch.testing.assert_close(explain(lm, x, t, "gradient"), g, atol=1e-5, rtol=1e-4)


def test_hf_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError) as e:
        load_model(empty)
    assert (
        "empty" in one_line(e.value) and "config.json" in str(e.value) and "save_pretrained" in str(e.value)
    )

    from transformers import BertConfig

    text = tmp_path / "bert"
    BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
    ).save_pretrained(text)
    (text / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError) as e:
        load_model(text)
    assert "not an image classifier" in one_line(e.value) and "bert" in str(e.value)

    pickled = tmp_path / "bin_only"
    model = vit()
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(UntrustedPickleError) as e:
        load_model(pickled)
    assert "pytorch_model.bin" in one_line(e.value) and "--trust-model" in str(e.value)
    lm = load_model(pickled, trust_model=True)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(lm.logits(x), model(pixel_values=x).logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ command line


def two_images(folder):
    for i, img in enumerate(photos(2)):
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"img{i}.png")
    return folder


@pytest.mark.parametrize("source", ["timm", "hf"])
def test_report_records_the_preprocessing_and_its_source(cli, tmp_path, source):
    if source == "timm":
        _, model = timm_weights(tmp_path, "resnet10t")
        extra, where = (
            ["--arch", "timm:resnet10t", "--input-size", "48,40"],
            "timm pretrained_cfg of resnet10t",
        )
    else:
        model, extra, where = vit_folder(tmp_path / "vit", PROCESSORS["resize_crop_bicubic"]), [], None
    out = tmp_path / "out"
    result = report(cli, model, two_images(tmp_path / "images"), out, "--fail-on", "never", *extra)
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    m = doc["model"]
    pre = m["preprocessing"]
    assert pre["center_crop"] is True and m["sources"]["preprocessing"] == (
        where or "preprocessor_config.json"
    )
    if source == "timm":
        assert m["arch"] == "timm:resnet10t" and m["input_size"] == [48, 40]
        assert pre["resize"] == "shorter" and pre["crop_pct"] == 0.875 and pre["interpolation"] == "bicubic"
        assert m["sources"]["input_size"] == "flag" and m["sources"]["mean"] == where
    else:
        assert m["format"] == "huggingface" and m["class_names"] == ["cat", "dog", "bird"]
        assert pre["resize_size"] == [40, 44] and pre["backend"] == "tensor_uint8"
    assert [c["check"] for c in doc["checks"]] == ["completeness"] * len(doc["checks"])
    assert len(doc["images"]) == 2
    from saliaudit.report.sections import _preprocessing_row

    ((label, text),) = _preprocessing_row(m)  # the report's summary row
    assert label == "Preprocessing" and "center crop" in text and "bicubic" in text
    assert text.endswith(m["sources"]["preprocessing"])


def test_report_on_a_folder_without_config_is_a_usage_error(cli, tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"x")
    result = report(cli, folder, two_images(tmp_path / "images"), tmp_path / "out")
    assert_one_line_error(result, 2, "not_a_model", "config.json")
    assert not (tmp_path / "out").exists()
