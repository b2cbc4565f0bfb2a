"""A tiny vision transformer for the propagation tests, and CP-LRP written out by hand.

``TinyViT``: patch 8 on 32×32 input (16 patches and a class token), 2 pre-norm blocks of
dimension 32 with 2 heads (fused ``F.scaled_dot_product_attention``, as timm's), GELU MLP,
final LayerNorm, linear head on the class token.

:func:`cp_lrp_forward` is the textbook form of ε-LRP with the rules of Ali et al. (ICML 2022):
the same network in plain PyTorch with the attention probabilities, the LayerNorm standard
deviations and the GELU ratios ``gelu(z)/z`` taken as constants; its gradient × input is the
relevance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 2, classes: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 17, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def tiny_vit(seed: int = 0, biases: bool = True) -> TinyViT:
    """A seeded TinyViT in eval mode: zero-initialized parameters (class token, position
    embedding, LayerNorm biases) drawn at random, LayerNorm gains perturbed; ``biases=False``
    zeroes every bias, the class token and the position embedding."""
    torch.manual_seed(seed)
    model = TinyViT()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            if "norm" in name and name.endswith("weight"):
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            if not biases and (name.endswith("bias") or name in ("cls_token", "pos")):
                p.zero_()
    return model.eval()


def cp_lrp_forward(
    m: TinyViT, x: torch.Tensor, frozen: list[torch.Tensor] | None = None, eps: float = 1e-9
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of ``m`` written out with CP-LRP's constants (attention probabilities, LayerNorm
    σ, GELU ratios), and those constants; with ``frozen`` (the constants of another input)
    the network is affine in ``x``, so ``frozen`` at ``x = 0`` gives the biases' share."""
    given = list(frozen) if frozen is not None else None
    record: list[torch.Tensor] = []

    def const(value: torch.Tensor) -> torch.Tensor:
        v = given.pop(0) if given is not None else value.detach()
        record.append(v)
        return v

    def ln(mod: nn.LayerNorm, h: torch.Tensor) -> torch.Tensor:
        mu = h.mean(-1, keepdim=True)
        sd = const(((h - mu) ** 2).mean(-1, keepdim=True).add(mod.eps).sqrt())
        return (h - mu) / sd * mod.weight + mod.bias

    def gelu(z: torch.Tensor) -> torch.Tensor:
        return z * const(F.gelu(z) / (z + eps * torch.where(z >= 0, 1.0, -1.0)))

    h = m.patch(x).flatten(2).transpose(1, 2)
    h = torch.cat([m.cls_token.expand(h.shape[0], -1, -1), h], 1) + m.pos
    for blk in m.blocks:
        a, (b, t, c) = blk.attn, h.shape
        qkv = a.qkv(ln(blk.norm1, h)).reshape(b, t, 3, a.heads, c // a.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        p = const(torch.softmax(q @ k.transpose(-2, -1) / (c // a.heads) ** 0.5, -1))
        h = h + a.proj((p @ v).transpose(1, 2).reshape(b, t, c))
        h = h + blk.fc2(gelu(blk.fc1(ln(blk.norm2, h))))
    return m.head(ln(m.norm, h)[:, 0]), record


def cp_lrp(m: TinyViT, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Gradient × input of :func:`cp_lrp_forward`: CP-LRP's relevance of every input value."""
    xi = x.detach().clone().requires_grad_(True)
    logits, _ = cp_lrp_forward(m, xi)
    (g,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), [xi])
    return (g * x).detach()


# ----------------------------------------------------------------------------- shared helpers
def randomize_zero_parameters(model: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """Libraries initialize class tokens, heads and biases to zero: that would hide a lost
    class-token or bias share. Draw them at random (seeded); eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def hf_vit_config(**kwargs):
    """A tiny Hugging Face ``ViTConfig``: 32×32 input, 8×8 patches, 2 layers of width 32,
    3 labels (``kwargs`` override)."""
    from transformers import ViTConfig

    base = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    return ViTConfig(**{**base, **kwargs})


class HFLogits(nn.Module):
    """A Hugging Face classifier as a plain module: pixel values in, ``logits`` out."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(pixel_values=x).logits


def hf_vit(seed: int = 0, **kwargs) -> HFLogits:
    """A seeded tiny ``ViTForImageClassification`` (:func:`hf_vit_config`) behind
    :class:`HFLogits`, in eval mode."""
    from transformers import ViTForImageClassification

    torch.manual_seed(seed)
    return HFLogits(ViTForImageClassification(hf_vit_config(**kwargs))).eval()
