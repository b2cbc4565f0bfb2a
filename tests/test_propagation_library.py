"""ε-LRP, guided backprop and DeepLIFT on library models (random weights, built locally):
timm, torchvision and Hugging Face ViTs (fused and written-out attention), a Swin
transformer (window attention) and ConvNeXt (LayerNorm in a CNN)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from saliaudit.graph import get_graph
from saliaudit.methods import explain, get_method
from saliaudit.methods.propagation_rules import plan_rules

from .tiny_vit import hf_vit

torch.set_num_threads(2)


def _target_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(x)
    t = logits.argmax(1)
    return t, logits.gather(1, t[:, None])[:, 0]


def _zero_biases(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights where the library starts from zero (heads), then every bias, class or
    position token and running mean zeroed: the network under ε-LRP's constants is linear."""
    gen = torch.Generator().manual_seed(seed)
    bias_like = ("bias", "cls_token", "class_token", "pos_embed", "position_embeddings", "running_mean")
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point():
                continue
            if any(b in name for b in bias_like):
                p.zero_()
            elif p.abs().sum() == 0 or name.endswith("head.weight") or "classifier" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def _hf_vit(attn: str) -> nn.Module:
    pytest.importorskip("transformers")
    return hf_vit(attn_implementation=attn)


def _timm(name: str, **kw) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=3, **kw)


def _torchvision_vit() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=3
    )


LIBRARY = {
    "timm_vit": (lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), 32),
    "torchvision_vit": (_torchvision_vit, 32),
    "hf_vit_eager": (lambda: _hf_vit("eager"), 32),
    "hf_vit_sdpa": (lambda: _hf_vit("sdpa"), 32),
    "timm_swin": (
        lambda: _timm(
            "swin_tiny_patch4_window7_224",
            img_size=56,
            depths=(1, 1),
            num_heads=(1, 2),
            embed_dim=16,
            window_size=7,
        ),
        56,
    ),
    "timm_convnext": (lambda: _timm("convnext_atto"), 32),
}


@pytest.mark.parametrize("name", list(LIBRARY))
def test_library_models_conserve_and_skip(name):
    """Without biases, ε-LRP's relevance sums to the logit on timm, torchvision and Hugging
    Face transformers (fused and written-out attention, window attention) and on ConvNeXt
    (LayerNorm in a CNN); DeepLIFT is skipped on all of them, guided backprop on attention."""
    build, size = LIBRARY[name]
    model = _zero_biases(build())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    t, logit = _target_logits(model, x)
    assert logit.abs().min() > 1e-3
    total = explain(model, x, t, "epsilon_lrp").sum((1, 2, 3))
    torch.testing.assert_close(total, logit, rtol=1e-4, atol=1e-5)
    assert "DeepLIFT (Rescale) has no rule for" in get_method("deeplift").unsupported(model, x)
    gb = get_method("guided_backprop").unsupported(model, x)
    assert (gb is None) == (name == "timm_convnext"), gb


def test_rule_analysis_is_cheap_on_a_large_graph():
    """The analysis runs before every call: a ViT-B/16 graph (~500 ops) takes milliseconds."""
    model = _timm("vit_base_patch16_224", img_size=32, patch_size=16).eval()
    gm = get_graph(model, torch.zeros(1, 3, 32, 32))
    t0 = time.perf_counter()
    plan = plan_rules(gm, "epsilon")
    assert time.perf_counter() - t0 < 0.5
    assert plan.problem is None and len(plan.cuts) == 12 and len(plan.norms) == 25
