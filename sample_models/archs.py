"""Architectures of the sample models shipped with saliaudit.

Plain ``torch.nn`` code with no dependency on saliaudit, so the state_dicts in this folder
(``shapes_vgg.pt``, ``digits_cnn.pt``) can be loaded anywhere::

    import torch
    from archs import ShapesVGG
    model = ShapesVGG()
    model.load_state_dict(torch.load("shapes_vgg.pt", weights_only=True))

Both models expect ``(image_in_[0,1] - 0.5) / 0.5`` per channel (mean = std = 0.5).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ShapesVGG", "DigitsCNN", "MEAN", "STD"]

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
