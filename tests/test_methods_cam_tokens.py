"""CAM methods on vision transformers: the token layer, its patch grid, and agreement with
pytorch-grad-cam's documented recipe (tutorials/vision_transformers.md: ``target_layers =
[model.blocks[-1].norm1]`` and a ``reshape_transform`` that drops the class token and lays the
196 patch tokens out as a 14×14 image).

timm models with random weights, built locally; the parameters libraries initialize to zero
(class token, head) are drawn at random (seeded) so that no map is trivially zero.
pytorch-grad-cam is a test-only dependency.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliaudit import load_model
from saliaudit.errors import UsageError
from saliaudit.methods.cam import (
    cam_layers,
    cumulative_gradcam,
    cumulative_layers,
    find_cam_layer,
    gradcam,
    gradcam_pp,
    layer_cam,
)
from saliaudit.methods.layers import layer_info

from .conftest import hook_counts, real_images
from .test_methods_cam import minmax, rel_err
from .tiny_vit import hf_vit, randomize_zero_parameters

timm = pytest.importorskip("timm")
TARGETS = [3, 7]


_randomize_zero_parameters = randomize_zero_parameters


def _timm(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _randomize_zero_parameters(timm.create_model(name, pretrained=False, num_classes=10))


@pytest.fixture(scope="module")
def vit():
    return _timm("vit_tiny_patch16_224"), real_images(224, 2)


@pytest.fixture(scope="module")
def swin():
    return _timm("swin_tiny_patch4_window7_224"), real_images(224, 1)


def vit_reshape(tensor: torch.Tensor, height: int = 14, width: int = 14, lead: int = 1) -> torch.Tensor:
    """pytorch-grad-cam's documented ``reshape_transform`` for ViT (usage_examples/
    vit_example.py), with the number of leading tokens it drops as a parameter (1 there)."""
    result = tensor[:, lead:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def swin_reshape(tensor: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's Swin ``reshape_transform`` (usage_examples/swinT_example.py) reshapes
    ``(B, 49, C)`` to ``(B, 7, 7, C)`` and moves channels first. timm ≥ 0.9 Swin blocks already
    return ``(B, 7, 7, C)``, where its ``reshape(B, 7, 7, tensor.size(2))`` would read W as C;
    only the channel move is left. saliaudit needs no transform at all: the channels-last
    layout is inferred from the graph."""
    assert tensor.dim() == 4 and tensor.shape[1] == tensor.shape[2] == 7
    return tensor.permute(0, 3, 1, 2)


def pgc_cam(
    method: str, model: nn.Module, layer_of, x: torch.Tensor, reshape
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the layer-resolution map before any rescaling, the final map) of pytorch-grad-cam,
    as in tests/test_methods_cam.py: ``np.maximum(get_cam_image(...), 0)`` from the
    activations and gradients its own hooks recorded, and its min–max-resized output."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    ref = copy.deepcopy(model)
    layer = layer_of(ref)
    cls = {"gradcam": pgc.GradCAM, "gradcam_pp": pgc.GradCAMPlusPlus}[method]
    tg = [ClassifierOutputTarget(int(c)) for c in TARGETS[: len(x)]]
    with cls(model=ref, target_layers=[layer], reshape_transform=reshape) as cam:
        final = torch.from_numpy(cam(input_tensor=x.clone(), targets=tg))
        acts = cam.activations_and_grads.activations[0].cpu().numpy()
        grads = cam.activations_and_grads.gradients[0].cpu().numpy()
        raw = torch.from_numpy(np.maximum(cam.get_cam_image(x, layer, tg, acts, grads), 0))
    return raw, final


def staged(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """pytorch-grad-cam's stages applied to our low-resolution map: min–max, resize, min–max."""
    up = F.interpolate(minmax(low)[:, None], size=size, mode="bilinear", align_corners=False)
    return minmax(up[:, 0])


# --------------------------------------------------------------------------- layer choice


def test_vit_default_layer_is_the_last_blocks_norm1(vit):
    model, x = vit
    assert find_cam_layer(model, x) == "blocks.11.norm1"
    info = layer_info(model, x)
    assert (info.tokens, info.prefix, info.h, info.w, info.channels) == (197, 1, 14, 14, 192)
    assert str(info).startswith("layer blocks.11.norm1, tokens 197 = 1 leading + 14×14 patches")
    assert "leading token" in info.reason
    layers = cam_layers(model, x)
    assert layers[-1] == "blocks.11.norm1" and {"patch_embed.proj", "blocks.0", "blocks.10"} <= set(layers)
    assert "norm" not in layers and "blocks.11" not in layers


def test_deit_distilled_drops_both_leading_tokens():
    """DeiT's class and distillation tokens both lead; the head reads only them, so the default
    is again the input of the last attention, and the map is the 14×14 patches only."""
    model, x = _timm("deit_tiny_distilled_patch16_224"), real_images(224, 2)
    assert find_cam_layer(model, x) == "blocks.11.norm1"
    info = layer_info(model, x)
    assert (info.tokens, info.prefix, info.h, info.w) == (198, 2, 14, 14)
    low = layer_cam(model, x, torch.tensor(TARGETS))[:, 0]
    assert low.shape == (2, 14, 14)
    raw, _ = pgc_cam("gradcam", model, lambda m: m.blocks[-1].norm1, x, lambda t: vit_reshape(t, lead=2))
    assert raw.abs().max() > 0
    assert rel_err(low, raw) <= 1e-5  # measured 3.1e-7
    with pytest.raises(RuntimeError):  # the documented transform (one leading token) cannot apply
        pgc_cam("gradcam", model, lambda m: m.blocks[-1].norm1, x, vit_reshape)


def _hf_vit() -> nn.Module:
    pytest.importorskip("transformers")
    return hf_vit()


def _tv_vit() -> nn.Module:
    import torchvision

    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=3
    ).eval()


@pytest.mark.parametrize(
    "build, want",
    [
        (_tv_vit, "encoder.layers.encoder_layer_1.ln_1"),  # before self_attention
        (_hf_vit, "m.vit.layers.1.layernorm_before"),  # before attention
        # a token-mean readout reads every patch token of the last block's output
        (
            lambda: timm.create_model(
                "vit_tiny_patch16_224", num_classes=3, global_pool="avg", img_size=32, patch_size=8
            ),
            "blocks",
        ),
    ],
    ids=["torchvision", "huggingface", "timm-avg-pool"],
)
def test_other_vits_default_layer(build, want):
    torch.manual_seed(0)
    model = _randomize_zero_parameters(build())
    x = real_images(32, 2)
    assert find_cam_layer(model, x) == want
    info = layer_info(model, x)
    assert (info.tokens, info.prefix, info.h, info.w) == (17, 1, 4, 4)
    low = layer_cam(model, x, torch.tensor([0, 2]), relu=False)
    assert low.shape == (2, 1, 4, 4) and low.abs().amin(dim=(2, 3)).gt(0).all()


# --------------------------------------------------------------------------- pytorch-grad-cam


@pytest.mark.parametrize("method", ["gradcam", "gradcam_pp"])
def test_vit_matches_pytorch_grad_cam(method, vit):
    """The documented ViT recipe, compared before and after pytorch-grad-cam's rescaling."""
    model, x = vit
    raw, final = pgc_cam(method, model, lambda m: m.blocks[-1].norm1, x, vit_reshape)
    low = layer_cam(model, x, torch.tensor(TARGETS), weighting=method)[:, 0]
    assert low.shape == raw.shape == (2, 14, 14) and raw.abs().max() > 0
    err = rel_err(low, raw)
    assert err <= 1e-5, err  # measured ≤ 6.3e-7
    ours = {"gradcam": gradcam, "gradcam_pp": gradcam_pp}[method](model, x, torch.tensor(TARGETS))
    up = F.interpolate(low[:, None], size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, up)
    assert (staged(low, (224, 224)) - final).abs().max() <= 1e-5


def test_vit_after_the_last_attention_the_patches_get_no_gradient(vit):
    """Why the default is not the last token value: pytorch-grad-cam at ``model.norm`` records
    a zero gradient on every patch token (the head reads the class token), so its map is zero;
    saliaudit refuses that layer instead of returning a blank map."""
    model, x = vit
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    ref = copy.deepcopy(model)
    tg = [ClassifierOutputTarget(int(c)) for c in TARGETS]
    with pgc.GradCAM(model=ref, target_layers=[ref.norm], reshape_transform=vit_reshape) as cam:
        cam(input_tensor=x.clone(), targets=tg)
        assert float(cam.activations_and_grads.gradients[0].abs().max()) == 0.0
    for layer in ("norm", "blocks.11", "blocks.11.attn", "blocks.11.mlp.fc1"):
        with pytest.raises(UsageError, match="do not reach the logits") as err:
            gradcam(model, x, torch.tensor(TARGETS), layer=layer)
        assert "blocks.11.norm1" in err.value.hint


def test_vit_cam_layer_override(vit):
    model, x = vit
    t = torch.tensor(TARGETS)
    raw, _ = pgc_cam("gradcam", model, lambda m: m.blocks[5].norm1, x, vit_reshape)
    low = layer_cam(model, x, t, layer="blocks.5.norm1")[:, 0]
    assert rel_err(low, raw) <= 1e-5
    assert not torch.allclose(low, layer_cam(model, x, t)[:, 0])
    # a block's output (the residual stream) and the patch embedding's NCHW output are accepted
    assert layer_cam(model, x, t, layer="blocks.10").shape == (2, 1, 14, 14)
    assert layer_cam(model, x, t, layer="patch_embed.proj").shape == (2, 1, 14, 14)
    with pytest.raises(UsageError, match="did you mean") as err:
        gradcam(model, x, t, layer="blocks.11.norm")
    assert "blocks.11.norm1" in str(err.value) + str(err.value.hint)
    with pytest.raises(UsageError, match="not spatial"):
        gradcam(model, x, t, layer="head")


def test_vit_cumulative_gradcam_sums_the_block_outputs(vit):
    model, x = vit
    t = torch.tensor(TARGETS)
    layers = cumulative_layers(model, x)
    assert layers[-1] == "blocks.11.norm1"
    assert [f"blocks.{i}" for i in range(11)] == [n for n in layers if n.startswith("blocks.")][:-1]
    total = sum(gradcam(model, x, t, layer=name) for name in layers)
    torch.testing.assert_close(cumulative_gradcam(model, x, t), total, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- Swin


def test_swin_default_layer_and_pytorch_grad_cam(swin):
    """Swin pools the mean of its last (B, 7, 7, C) value, as a CNN: the default is the input
    of that pooling (the final norm), whose every position gets a gradient. pytorch-grad-cam's
    Swin tutorial names ``model.layers[-1].blocks[-1].norm1``: the same maps there with
    ``--cam-layer``. Both layers are channels-last values whose layout the runner lost at a
    (B, H·W, C) reshape; saliaudit infers it."""
    model, x = swin
    t = torch.tensor(TARGETS[:1])
    assert find_cam_layer(model, x) == "norm"
    info = layer_info(model, x)
    assert (info.tokens, info.h, info.w, info.channels) == (None, 7, 7, 768)
    assert "global mean" in info.reason
    for ours_layer, layer_of in (
        (None, lambda m: m.norm),
        ("layers.3.blocks.1.norm1", lambda m: m.layers[-1].blocks[-1].norm1),
    ):
        raw, final = pgc_cam("gradcam", model, layer_of, x, swin_reshape)
        low = layer_cam(model, x, t, layer=ours_layer)[:, 0]
        assert low.shape == raw.shape == (1, 7, 7) and raw.abs().max() > 0
        assert rel_err(low, raw) <= 1e-5, ours_layer  # measured ≤ 4.3e-6
        assert (staged(low, (224, 224)) - final).abs().max() <= 1e-5
    # stage outputs at 28×28 and 14×14 are CAM layers too
    assert layer_cam(model, x, t, layer="layers.1").shape == (1, 1, 28, 28)
    assert layer_cam(model, x, t, layer="layers.2.blocks.5.norm2").shape == (1, 1, 14, 14)


def test_layout_inference_tiles_the_image():
    """A layout-less (B, a, b, c) value is channels-last when a × b cells of one integer
    stride tile the input (ceil division), channels-first when b × c do, else neither."""
    from saliaudit.methods.token_layers import _tiles

    assert _tiles(7, 7, (224, 224)) and _tiles(56, 56, (224, 224)) and _tiles(14, 10, (224, 160))
    assert _tiles(1, 1, (224, 224)) and _tiles(113, 113, (225, 225))  # stride 2, padded
    assert not _tiles(7, 768, (224, 224)) and not _tiles(1, 5, (224, 224))
    assert not _tiles(14, 14, (224, 160)) and not _tiles(3, 197, (224, 224))


# --------------------------------------------------------------------------- .pt2 and hygiene


def test_vit_pt2_same_layer_same_maps(vit, tmp_path):
    model, x = vit
    path = tmp_path / "vit.pt2"
    torch.export.save(torch.export.export(model, (x[:1],), strict=False), path)  # static batch 1
    loaded = load_model(path)
    assert find_cam_layer(loaded, x) == "blocks.11.norm1"
    t = torch.tensor(TARGETS)
    torch.testing.assert_close(gradcam(loaded, x, t), gradcam(model, x, t), rtol=1e-5, atol=1e-7)


def test_vit_model_unchanged_no_hooks(vit):
    """The NaN probes that find the default layer run on the graph, never on the model."""
    model, x = vit
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_counts(model)
    fresh = copy.deepcopy(model)  # a new graph: the layer index (and its NaN runs) built again
    find_cam_layer(fresh, x)
    gradcam(fresh, x, torch.tensor(TARGETS))
    assert hook_counts(fresh) == hooks
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.isfinite(fresh(x)).all()
