"""FullGrad through vision transformers: attention modules as single ops, token terms on the
patch grid, exact completeness (Srinivas & Fleuret 2019, eq. 1) on torchvision, timm and
Hugging Face models with random weights (built locally, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from saliaudit.methods.fullgrad import full_gradients
from saliaudit.tokens import TokenGrid, token_grid

from .tiny_vit import hf_vit, randomize_zero_parameters

torch.set_num_threads(2)


_randomize_zero_parameters = randomize_zero_parameters


def _check_exact(model: nn.Module, size: int, batch: int = 2, dtype=torch.float32, tol: float = 1e-3):
    model = _randomize_zero_parameters(model).to(dtype)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.no_grad():
        logits = model(x)
    targets = logits.argmax(1)
    fg = full_gradients(model, x, targets)
    assert fg.unaccounted == []
    torch.testing.assert_close(fg.logits, logits.gather(1, targets[:, None])[:, 0])
    assert fg.logits.abs().min() > 1e-3  # a residual relative to a real logit
    assert float(fg.residual.max()) <= tol, fg.residual
    return fg


def _vit_hf():
    pytest.importorskip("transformers")
    return hf_vit()


def test_token_grid_maps_row_major_patches_after_the_leading_tokens():
    grid = token_grid(2 + 3 * 4, [(7, 7), (3, 4)])
    assert (grid.prefix, grid.h, grid.w) == (2, 3, 4)
    assert token_grid(50, [(3, 4)]) is None  # 38 leading tokens: not a ViT layout
    t = torch.arange(2 * 14 * 5, dtype=torch.float32).reshape(2, 14, 5)
    p = grid.patches(t)
    assert p.shape == (2, 5, 3, 4)
    # token 2 + r*4 + c, channel k sits at (k, r, c)
    for b, r, c, k in [(0, 0, 0, 0), (1, 2, 3, 4), (0, 1, 2, 3)]:
        assert p[b, k, r, c] == t[b, 2 + r * 4 + c, k]
    assert torch.equal(grid.leading(t), t[:, :2])
    assert TokenGrid(0, 2, 2).patches(torch.ones(1, 1, 3)).shape == (1, 3, 1, 1)  # broadcast


def test_sample_like_vit_is_exact_and_draws_every_block_on_the_patch_grid():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_models"))
    from archs import TinyViT

    torch.manual_seed(0)
    fg = _check_exact(TinyViT(num_classes=4, size=64, patch=8), 64)
    ops = {t.op for t in fg.bias_terms.values()}
    assert {"attention", "layer_norm", "gelu", "linear", "conv2d", "add", "cat"} <= ops, ops
    attention = [t for t in fg.bias_terms.values() if t.op == "attention" and t.spatial]
    assert len(attention) == 4 and all(t.grad.shape[-2:] == (8, 8) for t in attention)
    # the class token's share is a term of its own, in the completeness and in no map
    leading = [t for t in fg.bias_terms.values() if "[leading tokens]" in t.name]
    assert leading and not any(t.spatial for t in leading)
    assert any(float(t.total().abs().max()) > 0 for t in leading)
    m = fg.saliency("paper")
    assert m.shape == (2, 64, 64) and torch.isfinite(m).all()


def test_float64_decomposition_is_exact_to_1e_6():
    fg = _check_exact(_vit_hf(), 32, dtype=torch.float64, tol=1e-6)
    assert any(t.op == "attention" for t in fg.bias_terms.values())


def _through_loader(lm, size: int, batch: int = 1):
    """The decomposition of a loaded model (as a user loads it) on random inputs."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    logits = lm.logits(x)
    targets = logits.argmax(1)
    fg = full_gradients(lm, x, targets)
    assert fg.unaccounted == []
    assert fg.logits.abs().min() > 1e-3
    torch.testing.assert_close(fg.logits, logits.gather(1, targets[:, None])[:, 0], rtol=1e-4, atol=1e-5)
    assert float(fg.residual.max()) <= 1e-3, fg.residual
    return fg


def test_hugging_face_vit_folder_is_exact_in_float32(tmp_path):
    """A ``save_pretrained`` folder, loaded as ``saliaudit report FOLDER``."""
    from saliaudit import load_model

    model = _randomize_zero_parameters(_vit_hf().m)
    model.save_pretrained(tmp_path / "vit")
    lm = load_model(tmp_path / "vit")
    fg = _through_loader(lm, 32, batch=2)
    assert fg.layout["token_grid"] == [4, 4] and fg.layout["leading_tokens"] == 1


@pytest.mark.parametrize("arch", ["vit_b_16", "swin_t"])
def test_torchvision_transformers_are_exact(arch, tmp_path):
    """A state_dict loaded with ``--arch vit_b_16`` / ``--arch swin_t``."""
    torchvision = pytest.importorskip("torchvision")
    from saliaudit import load_model

    torch.manual_seed(0)
    model = _randomize_zero_parameters(torchvision.models.get_model(arch, weights=None))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fg = _through_loader(load_model(tmp_path / "m.pt", arch=arch), 224)
    if arch == "swin_t":  # (B, H, W, C) throughout: every term before the pooling is spatial
        nonspatial = [t for t in fg.bias_terms.values() if not t.spatial]
        assert all(t.grad.dim() == 2 for t in nonspatial), [t.name for t in nonspatial]
        assert sum(t.op == "attention" for t in fg.bias_terms.values()) == 12
    else:
        assert fg.layout == {"attention_modules": 12, "token_grid": [14, 14], "leading_tokens": 1}


@pytest.mark.parametrize(
    "name",
    [
        "deit_tiny_patch16_224",
        "deit_tiny_distilled_patch16_224",
        "vit_tiny_patch16_224",
        "swin_tiny_patch4_window7_224",
        "convnext_atto",
    ],
)
def test_timm_models_are_exact(name, tmp_path):
    """A state_dict loaded with ``--arch timm:NAME``."""
    timm = pytest.importorskip("timm")
    from saliaudit import load_model

    torch.manual_seed(0)
    model = _randomize_zero_parameters(timm.create_model(name, pretrained=False))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fg = _through_loader(load_model(tmp_path / "m.pt", arch=f"timm:{name}"), 224)
    if "swin" in name:  # timm's Swin reshapes to (B, H·W, C) and back: still on the image
        nonspatial = [t.name for t in fg.bias_terms.values() if not t.spatial]
        assert nonspatial == ["head.fc.linear"], nonspatial
    if "distilled" in name:  # class and distillation tokens: 2 leading tokens
        assert fg.layout["leading_tokens"] == 2
        lead = next(t for t in fg.bias_terms.values() if "[leading tokens]" in t.name)
        assert lead.grad.shape[1] == 2


def test_class_token_share_is_not_lost():
    """The class token is a constant joined to the patch tokens (``cat``): its value is a bias
    of that op. With a large class token, dropping it would leave a large residual."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_models"))
    from archs import TinyViT

    torch.manual_seed(0)
    model = TinyViT(num_classes=4, size=64, patch=8)
    with torch.no_grad():
        model.cls_token.normal_(0, 1.0)
    fg = _check_exact(model, 64)
    cat = [t for t in fg.bias_terms.values() if t.op == "cat"]
    assert cat and any(float(t.total().abs().max()) > 1e-4 for t in cat)


def test_leading_tokens_caveat_is_raised_only_when_the_interval_is_above_the_threshold():
    from saliaudit.caveats import LEADING_SHARE, leading_tokens_caveat
    from saliaudit.result import CompletenessRecord

    def records(shares):
        return [
            CompletenessRecord(f"{i}.png", 0, "a", 2.0, 2.0, 0.0, [], 2.0 * s) for i, s in enumerate(shares)
        ]

    high = leading_tokens_caveat(records([0.6, 0.7, 0.8, 0.65, 0.75, 0.7]))
    assert high is not None and high["kind"] == "leading_tokens_share"
    assert high["numbers"]["n"] == 6 and high["numbers"]["ci"][0] > LEADING_SHARE
    assert "70%" in high["message"]
    assert leading_tokens_caveat(records([0.05, 0.1, 0.08, 0.12])) is None
    # a mean above the threshold whose interval reaches below it is not enough
    assert leading_tokens_caveat(records([0.0, 0.9, 0.0, 0.9])) is None
    assert leading_tokens_caveat([CompletenessRecord("a.png", 0, "a", 1.0, 1.0, 0.0)]) is None  # a CNN


def test_static_batch_export_is_exact(tmp_path):
    """A .pt2 exported with a fixed batch size: the batch dimension cannot be told from the
    graph's symbols, so values whose first dimension is not the batch size mark the modules."""
    import sys
    from pathlib import Path

    from saliaudit import load_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_models"))
    from archs import TinyViT

    torch.manual_seed(0)
    model = _randomize_zero_parameters(TinyViT(num_classes=4, size=32, patch=4))
    ep = torch.export.export(model, (torch.zeros(2, 3, 32, 32),))  # static batch 2
    torch.export.save(ep, str(tmp_path / "static.pt2"))
    lm = load_model(tmp_path / "static.pt2", input_size=32, mean=0.5, std=0.5)
    fg = _through_loader(lm, 32, batch=3)  # padded to chunks of 2
    assert fg.layout["attention_modules"] == 4 and fg.layout["token_grid"] == [8, 8]
