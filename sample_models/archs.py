"""Architectures of the sample models shipped with saliaudit.

Plain ``torch.nn`` code with no dependency on saliaudit, so the state_dicts in this folder
(``shapes_vgg.pt``, ``digits_cnn.pt``, ``digits_vit.pt``) can be loaded anywhere::

    import torch
    from archs import ShapesVGG
    model = ShapesVGG()
    model.load_state_dict(torch.load("shapes_vgg.pt", weights_only=True))

Both models expect ``(image_in_[0,1] - 0.5) / 0.5`` per channel (mean = std = 0.5).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ShapesVGG", "DigitsCNN", "TinyViT", "MEAN", "STD"]

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def _conv_bn_relu(cin: int, cout: int, bias: bool) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=bias),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=False),
    ]


class ShapesVGG(nn.Module):
    """Small VGG-style CNN with batch-norm for 64x64 RGB input.

    features: conv(3->16, bias) BN ReLU, conv(16->16) BN ReLU, maxpool 2
              conv(16->32, bias) BN ReLU, conv(32->32) BN ReLU, maxpool 2
              conv(32->64) BN ReLU, maxpool 2                      -> 64 x 8 x 8
    pool:     AdaptiveAvgPool2d(1)                                  -> 64
    classifier: Linear(64->64) ReLU Linear(64->num_classes)

    Convolutions 1 and 3 carry an explicit bias, the others do not (their bias is the
    batch-norm's), so both kinds of bias appear in a FullGrad decomposition.
    """

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(3, 16, bias=True),
            *_conv_bn_relu(16, 16, bias=False),
            nn.MaxPool2d(2),
            *_conv_bn_relu(16, 32, bias=True),
            *_conv_bn_relu(32, 32, bias=False),
            nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64, bias=False),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(64, 64),
            nn.ReLU(inplace=False),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class DigitsCNN(nn.Module):
    """Small CNN with batch-norm for 32x32 3-channel input (grayscale digit x3).

    features: conv(3->16, bias) BN ReLU, maxpool 2                 -> 16 x 16 x 16
              conv(16->32) BN ReLU, maxpool 2                      -> 32 x 8 x 8
              conv(32->64) BN ReLU, maxpool 2                      -> 64 x 4 x 4
    classifier: flatten (1024) Linear(1024->64) ReLU Linear(64->num_classes)
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(3, 16, bias=True),
            nn.MaxPool2d(2),
            *_conv_bn_relu(16, 32, bias=False),
            nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64, bias=False),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 4 * 4, 64),
            nn.ReLU(inplace=False),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class _Attention(nn.Module):
    """Multi-head self-attention (fused scaled dot-product attention, as timm's)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) (GELU)."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A tiny vision transformer (Dosovitskiy et al., ICLR 2021).

    patches:  conv(3->dim, patch x patch, stride patch)              -> (size/patch)² tokens
    tokens:   [class token] + patches, + learned position embedding
    blocks:   depth x pre-norm (multi-head self-attention; MLP dim->2·dim->dim, GELU)
    head:     LayerNorm, Linear(dim->num_classes) on the class token

    The sample ``digits_vit``: 32x32 input, 4x4 patches (an 8 x 8 grid, 65 tokens), dimension
    64, 4 blocks of 4 heads.
    """

    def __init__(
        self,
        num_classes: int = 10,
        size: int = 32,
        patch: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
    ) -> None:
        super().__init__()
        tokens = 1 + (size // patch) ** 2
        self.patch = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])
