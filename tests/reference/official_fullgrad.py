"""Test-only re-implementation of the official FullGrad code (idiap/fullgrad-saliency).

A slow, literal transcription of ``saliency/tensor_extractor.py`` and ``saliency/fullgrad.py``
(Srinivas & Fleuret, NeurIPS 2019): biases collected from Conv2d / Linear / BatchNorm2d modules
in module order, output gradients collected by module backward hooks in backward order and
paired in reverse, ``_postProcess`` = abs + per-layer min-max (eps 1e-6), bilinear upsampling
with ``align_corners=True``, summed over channels. Correct only for sequential networks without
implicit biases (e.g. VGG-BN): that is the point of comparing against it there.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class OfficialFullGrad:
    def __init__(self, model: nn.Module):
        self.model = model
        self.biases: list[torch.Tensor] = []
        self.feature_grads: list[torch.Tensor] = []
        self.handles = []
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                self.handles.append(m.register_backward_hook(self._grads))  # as the official code
                b = self._bias(m)
                if b is not None:
                    self.biases.append(b)

    @staticmethod
    def _bias(m: nn.Module) -> torch.Tensor | None:
        if isinstance(m, nn.BatchNorm2d):
            return (-(m.running_mean * m.weight / torch.sqrt(m.running_var + m.eps)) + m.bias).data
        return None if m.bias is None else m.bias.data

    def _grads(self, module, in_grad, out_grad):
        if module.bias is not None:
            self.feature_grads.append(out_grad[0])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def decompose(self, image: torch.Tensor, target: torch.Tensor):
        self.feature_grads = []
        image = image.clone().requires_grad_()
        out = self.model(image)
        scalar = -1.0 * F.nll_loss(out, target.flatten(), reduction="sum")
        input_grad = torch.autograd.grad(scalar, image)[0]
        L = len(self.biases)
        terms = []
        for i in range(L):
            g = self.feature_grads[L - 1 - i]
            shape = [1] * g.dim()
            shape[1] = self.biases[i].size(0)
            terms.append(g * self.biases[i].view(shape).expand_as(g))
        return input_grad, terms, out

    @staticmethod
    def post_process(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        x = abs(x)
        flat = x.view((x.size(0), -1))
        temp, _ = flat.min(1, keepdim=True)
        x = x - temp.unsqueeze(1).unsqueeze(1)
        flat = x.view((x.size(0), -1))
        temp, _ = flat.max(1, keepdim=True)
        return x / (temp.unsqueeze(1).unsqueeze(1) + eps)

    def saliency(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input_grad, terms, _ = self.decompose(image, target)
        cam = self.post_process(input_grad * image).sum(1, keepdim=True)
        for t in terms:
            if t.dim() == image.dim():
                up = F.interpolate(
                    self.post_process(t), size=image.shape[2:], mode="bilinear", align_corners=True
                )
                cam = cam + up.sum(1, keepdim=True)
        return cam[:, 0]
