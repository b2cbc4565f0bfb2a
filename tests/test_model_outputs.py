"""Model outputs that are not one tensor (tuple, dict, dataclass; ``--output-key``), 1-channel
models, and the resize/crop policy of :class:`saliaudit.preprocess.Preprocessing`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from saliaudit import load_model
from saliaudit.errors import ModelLoadError, UsageError
from saliaudit.methods import explain
from saliaudit.methods.fullgrad import full_gradients
from saliaudit.model import wrap_module
from saliaudit.model_adapt import LUMA
from saliaudit.preprocess import Preprocessing

from .conftest import hook_counts
from .test_cli import _clean_env, assert_one_line_error, report  # noqa: F401


@pytest.fixture
def cli():
    from typer.testing import CliRunner

    return CliRunner()


@dataclasses.dataclass
class Out:
    scores: torch.Tensor
    features: torch.Tensor


class Multi(torch.nn.Module):
    """A small CNN whose forward returns logits together with other tensors."""

    def __init__(self, kind: str, channels: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.conv = torch.nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)
        self.aux = torch.nn.Linear(4, 5)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        pooled = f.mean((2, 3))
        y = self.fc(pooled)
        if self.kind == "tensor":
            return y
        if self.kind == "tuple":  # one (B, K) tensor among others: unambiguous
            return f, y, pooled.sum(1)
        if self.kind == "dict_logits":
            return {"aux": self.aux(pooled), "logits": y}
        if self.kind == "dataclass":
            return Out(scores=y, features=f)
        return y, self.aux(pooled)  # "two": two (B, K) tensors


def x16(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "kind, picked, how",
    [
        ("tuple", 1, "only (batch, classes)"),
        ("dict_logits", "logits", "'logits'"),
        ("dataclass", "scores", "only"),
    ],
)
def test_structured_outputs_are_picked_automatically(kind, picked, how):
    m = Multi(kind).eval()
    before = hook_counts(m)
    lm = wrap_module(m, input_size=16)
    assert how in lm.sources["output"] and lm.num_classes == 3
    x = x16()
    with torch.no_grad():
        raw = m(x)
        expected = getattr(raw, picked) if kind == "dataclass" else raw[picked]
        torch.testing.assert_close(lm.logits(x), expected)
    # the methods see an ordinary classifier: FullGrad (torch.export) and the input gradient
    t = torch.tensor([0, 2])
    fg = full_gradients(lm, x, t)
    assert float(fg.residual.max()) < 1e-4
    xi = x.clone().requires_grad_(True)
    out = m(xi)
    logits = getattr(out, picked) if kind == "dataclass" else out[picked]
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), [xi])
    torch.testing.assert_close(explain(lm, x, t, "gradient"), g)
    assert hook_counts(m) == before and not m.training


def test_ambiguous_output_asks_for_output_key_which_selects_it(tmp_path):
    m = Multi("two").eval()
    with pytest.raises(ModelLoadError) as e:
        wrap_module(m, input_size=16)
    text = str(e.value)
    assert "--output-key" in text and "ambiguous" in text and "\n" not in text
    lm = wrap_module(m, input_size=16, output_key="1")
    assert lm.num_classes == 5 and "--output-key" in lm.sources["output"]
    with torch.no_grad():
        torch.testing.assert_close(lm.logits(x16()), m(x16())[1])
    with pytest.raises(UsageError) as e:
        wrap_module(m, input_size=16, output_key="logits")
    assert "'logits'" in str(e.value) and "use one of" in str(e.value)


def test_pt2_with_a_dict_output_is_recaptured_with_its_batch_range(tmp_path):
    m = Multi("dict_logits").eval()
    batch = torch.export.Dim("batch", min=1, max=8)
    ep = torch.export.export(m, (x16(),), dynamic_shapes=({0: batch},))
    path = tmp_path / "dict.pt2"
    torch.export.save(ep, str(path))
    lm = load_model(path, input_size=16)
    assert "'logits'" in lm.sources["output"] and lm.max_batch == 8
    x = x16(3)
    with torch.no_grad():
        torch.testing.assert_close(lm.logits(x), m(x)["logits"])
    fg = full_gradients(lm, x, torch.tensor([0, 1, 2]))
    assert float(fg.residual.max()) < 1e-4


def test_cli_output_key(cli, tmp_path):
    """A pickled model with two (batch, classes) outputs: one line asking for --output-key
    (nothing run), then the audit with --output-key records the choice."""
    model = tmp_path / "two.pt"
    torch.save(Multi("two").eval(), model)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    flags = ("--trust-model", "--input-size", "16")
    result = report(cli, model, images, tmp_path / "out1", *flags)
    assert_one_line_error(result, 3, "two.pt", "--output-key")
    out = tmp_path / "out2"
    result = report(cli, model, images, out, *flags, "--output-key", "0", "--fail-on", "never")
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert "--output-key" in doc["model"]["sources"]["output"] and doc["model"]["num_classes"] == 3
    assert doc["config"]["values"]["output_key"] == "0" and doc["config"]["sources"]["output_key"] == "flag"


# ------------------------------------------------------------------------------ 1 channel


def test_one_channel_model_is_fed_the_luminance(tmp_path):
    import torchvision

    torch.manual_seed(0)
    grey = torchvision.models.resnet18(num_classes=4)
    grey.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    grey.eval()
    path = tmp_path / "grey.pt"
    torch.save(grey.state_dict(), path)
    with pytest.raises(ModelLoadError):  # torchvision's resnet18 takes 3 channels: no guessing
        load_model(path, arch="resnet18", input_size=32)

    lm = wrap_module(grey, input_size=32)  # ImageNet's mean/std: reduced to one value each
    assert "luminance" in lm.sources["channels"] and "luminance-weighted" in lm.sources["mean"]
    assert (
        len(set(lm.mean)) == 1
        and abs(lm.mean[0] - sum(w * v for w, v in zip(LUMA, (0.485, 0.456, 0.406)))) < 1e-9
    )
    assert any("1-channel model" in n for n in lm.notes)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8))
    x = lm.preprocess([img])
    assert x.shape == (1, 3, 32, 32)
    lum = (x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(lm.logits(x), grey(lum))
        # the grey image PIL makes, normalized once: equal up to PIL's 8-bit rounding of L
        g = torch.from_numpy(np.asarray(img.convert("L").resize((32, 32), Image.BILINEAR), np.float32))
        direct = grey(((g / 255 - lm.mean[0]) / lm.std[0])[None, None])
    assert float((lm.logits(x) - direct).abs().max()) < 0.05 * float(direct.abs().max())
    with pytest.raises(UsageError) as e:
        wrap_module(grey, input_size=32, mean="0.4,0.5,0.6")
    assert "1 channel" in str(e.value) and "--mean" in str(e.value)


def test_timm_one_channel_state_dict(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1).eval()
    torch.save(m.state_dict(), tmp_path / "grey.pt")
    lm = load_model(tmp_path / "grey.pt", arch="timm:resnet10t", input_size=48, mean=0.5, std=0.25)
    assert "luminance" in lm.sources["channels"] and lm.mean == (0.5,) * 3
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            lm.logits(x), m((x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True))
        )


# ------------------------------------------------------------------------------ preprocessing


def test_default_preprocessing_is_unchanged():
    """The default policy is saliaudit's transform: float image, resized straight (bilinear,
    antialiased), clamped to [0, 1]."""
    from torchvision.transforms.v2 import functional as F

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), np.uint8))
    t = F.to_dtype(F.pil_to_tensor(img), torch.float32, scale=True)
    expected = F.resize(t, [24, 20], interpolation=F.InterpolationMode.BILINEAR, antialias=True).clamp(0, 1)
    assert torch.equal(Preprocessing().pixels(img, (24, 20)), expected)
    assert Preprocessing().visible_box(img.size, (24, 20)) == (0, 0, 53, 37)
    assert Preprocessing().to_dict()["center_crop"] is False


def test_hf_pil_processor_policy_matches_it():
    pytest.importorskip("transformers")
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, s, np.uint8)) for s in ((33, 47, 3), (60, 31, 3))]
    proc = ViTImageProcessorPil(
        size={"height": 27, "width": 30},
        do_center_crop=True,
        crop_size={"height": 20, "width": 22},
        resample=3,
    )
    ref = torch.as_tensor(np.stack(proc(images=images)["pixel_values"]))
    policy = Preprocessing(
        resize="exact", resize_size=(27, 30), interpolation="bicubic", backend="pil", crop_offset="floor"
    )
    mean = torch.tensor(proc.image_mean).view(3, 1, 1)
    std = torch.tensor(proc.image_std).view(3, 1, 1)
    x = torch.stack([(policy.pixels(img, (20, 22)) - mean) / std for img in images])
    assert x.shape == ref.shape and torch.allclose(x, ref.float(), atol=1e-5, rtol=0)


def test_masks_follow_the_resize_and_crop(tmp_path):
    """A mask drawn where an object is stays aligned with it after a shorter-side resize and
    an odd center crop."""
    from saliaudit.masks import load_masks

    policy = Preprocessing(resize="shorter", crop_pct=0.8, interpolation="bilinear", backend="pil")
    w, h = 90, 60
    arr = np.zeros((h, w, 3), np.uint8)
    arr[20:40, 50:70] = 255  # a white square right of the center
    img = Image.fromarray(arr)
    mask_dir = tmp_path / "masks" / "a"
    mask_dir.mkdir(parents=True)
    Image.fromarray(arr[..., 0]).save(mask_dir / "sq.png")
    size = (32, 32)
    crop = policy.geometry(img.size, size)
    masks = load_masks(tmp_path / "masks", "a.png", ["sq"], size, image_size=img.size, crop=crop)
    seen = policy.pixels(img, size)[0] > 0.5
    assert masks[0].shape == size and masks[0].any()
    agree = (torch.from_numpy(masks[0]) == seen).float().mean()
    assert agree > 0.99, float(agree)  # stretched to 32x32 without the crop, it is 0.87
    # what the maps are drawn over: 90x60 -> shorter side 40 (60x40), crop 32 at (top 4, left
    # 14), i.e. x 21..69 and y 6..54 of the original
    assert policy.visible_box(img.size, size) == (21, 6, 69, 54)
