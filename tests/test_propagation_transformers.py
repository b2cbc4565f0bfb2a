"""Propagation methods on attention and normalization: ε-LRP with the rules of Ali et al.
(ICML 2022) against a written-out implementation and conservation; guided backprop and
DeepLIFT SKIPPED with the op they have no rule for; the skip reaches the audit's report."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliaudit.errors import DecompositionError, NotApplicableError
from saliaudit.methods import explain, get_method

from .conftest import lazy_importorskip
from .tiny_vit import cp_lrp, cp_lrp_forward, tiny_vit

torch.set_num_threads(2)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to the range of b."""
    return ((a - b).abs().max() / (b.max() - b.min()).clamp(min=1e-12)).item()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _grad_x_input(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    xi = x.clone().requires_grad_(True)
    model(xi).gather(1, targets[:, None]).sum().backward()
    return (xi.grad * x).detach()


def _target_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(x)
    t = logits.argmax(1)
    return t, logits.gather(1, t[:, None])[:, 0]


# ---------------------------------------------------------------- ε-LRP (Ali et al. 2022)


def test_epsilon_lrp_equals_cp_lrp_written_out(x):
    """Attention probabilities, LayerNorm σ and GELU ratios constant, then gradient × input:
    the fused attention (run with q, k detached) gives the rule written out."""
    model = tiny_vit()
    t, _ = _target_logits(model, x)
    ours = explain(model, x, t, "epsilon_lrp")
    assert rel_diff(ours, cp_lrp(model, x, t)) <= 1e-5
    assert rel_diff(ours, _grad_x_input(model, x, t)) > 0.05  # the rules change the map


def test_epsilon_lrp_conserves_the_logit_without_biases(x):
    """No biases, class token or position embedding: the relevance sums to the logit, which
    gradient × input (LayerNorm is scale-invariant) does not."""
    model = tiny_vit(biases=False)
    t, logit = _target_logits(model, x)
    assert logit.abs().min() > 1e-2
    total = explain(model, x, t, "epsilon_lrp").sum((1, 2, 3))
    torch.testing.assert_close(total, logit, rtol=1e-5, atol=1e-6)
    gxi = _grad_x_input(model, x, t).sum((1, 2, 3))
    assert ((gxi - logit).abs() / logit.abs()).min() > 0.1


def test_epsilon_lrp_conserves_up_to_the_biases_share(x):
    """With biases the relevance sums to f(x) − F̃(0): F̃ is the network with CP-LRP's
    constants frozen at x (affine in the input), so F̃(0) is the biases' share."""
    model = tiny_vit()
    t, logit = _target_logits(model, x)
    with torch.no_grad():
        _, frozen = cp_lrp_forward(model, x)
        share = cp_lrp_forward(model, torch.zeros_like(x), frozen)[0].gather(1, t[:, None])[:, 0]
    total = explain(model, x, t, "epsilon_lrp").sum((1, 2, 3))
    assert (share.abs() > 1e-2).all()  # a real share, not a rounding error
    torch.testing.assert_close(total, logit - share, rtol=1e-5, atol=1e-5)


class _WrittenNorms(nn.Module):
    """LayerNorm written out ((x − μ)/sqrt(var + ε)) and RMSNorm as x · rsqrt(mean x² + ε)."""

    def __init__(self, rms: bool):
        super().__init__()
        torch.manual_seed(0)
        self.rms = rms
        self.inp, self.ln, self.out = nn.Linear(12, 8), nn.LayerNorm(8), nn.Linear(8, 3)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor, written: bool = True) -> torch.Tensor:
        h, w, b = self.inp(x.flatten(1)), self.ln.weight, self.ln.bias
        if not written:
            n = F.rms_norm(h, (8,), w, 1e-5) if self.rms else self.ln(h)
        elif self.rms:
            n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w
        else:
            var = h.var(-1, keepdim=True, unbiased=False)
            n = (h - h.mean(-1, keepdim=True)) / torch.sqrt(var + 1e-5) * w + b
        return self.out(F.gelu(n))


class _Fused(nn.Module):
    def __init__(self, inner: _WrittenNorms):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, written=False)


@pytest.mark.parametrize("rms", [False, True])
def test_written_out_norms_get_the_ln_rule(rms):
    """A division by σ (and a product with rsqrt) takes the divisor as constant: the same map
    as the fused op with the LN-rule, and not the plain gradient."""
    written = _WrittenNorms(rms).eval()
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2, 0])
    a, b = explain(written, x, t, "epsilon_lrp"), explain(_Fused(written).eval(), x, t, "epsilon_lrp")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert rel_diff(a, _grad_x_input(written, x, t)) > 0.05


# ---------------------------------------------------------------- skipped, with the op named


def test_guided_backprop_and_deeplift_name_the_op_they_have_no_rule_for(x):
    model = tiny_vit()
    t, _ = _target_logits(model, x)
    gb = get_method("guided_backprop").unsupported(model, x)
    assert "guided backprop has no rule for attention" in gb and "scaled_dot_product_attention" in gb
    assert "blocks.0.attn" in gb
    dl = get_method("deeplift").unsupported(model, x)
    assert dl.startswith("DeepLIFT (Rescale) has no rule for")
    assert "layer_norm in blocks.0.norm1" in dl and "scaled_dot_product_attention" in dl
    assert get_method("epsilon_lrp").unsupported(model, x) is None
    for method in ("guided_backprop", "deeplift"):
        with pytest.raises(NotApplicableError, match="has no rule for") as err:
            explain(model, x, t, method)
        assert isinstance(err.value, DecompositionError) and "docs/methods.md" in str(err.value)


class _Products(nn.Module):
    """``kind``: ``glu`` a(x)·b(x) (no gate), ``softmax`` a softmax that weights nothing,
    ``se`` a squeeze-excitation gate h·σ(W·mean h)."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.conv, self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():  # a gate that reacts to its input
            self.a.weight.mul_(4.0)
            self.b.weight.mul_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        if self.kind == "se":
            s = torch.sigmoid(self.b(F.relu(self.a(h.mean((2, 3))))))
            return self.head((h * s[:, :, None, None]).mean((2, 3)))
        p = h.mean((2, 3))
        if self.kind == "glu":
            return self.head(self.a(p) * self.b(p))
        return self.head(torch.softmax(self.a(p), -1))


@pytest.mark.parametrize(
    "kind, method, needle",
    [
        ("glu", "epsilon_lrp", "ε-LRP has no rule for the product of two input-dependent tensors (mul)"),
        ("glu", "deeplift", "the product of two input-dependent tensors (mul)"),
        ("softmax", "epsilon_lrp", "a softmax that does not weight a product (softmax)"),
        ("softmax", "guided_backprop", "guided backprop has no rule for softmax (softmax)"),
        ("se", "deeplift", "DeepLIFT (Rescale) has no rule for the product of two input-dependent tensors"),
    ],
)
def test_no_rule_means_skipped(kind, method, needle, x):
    model = _Products(kind).eval()
    reason = get_method(method).unsupported(model, x)
    assert reason is not None and needle in reason, reason


def test_squeeze_excitation_gate_is_constant_in_lrp_and_gradient_in_guided(x):
    """ε-LRP: in h·σ(s) the gate σ(s) is a constant and the signal h takes all relevance
    (signal-take-all, Arras et al. 2017). Guided backprop keeps the product's gradient."""
    model = _Products("se").eval()
    t = torch.tensor([0, 2])
    xi = x.clone().requires_grad_(True)
    h = F.relu(model.conv(xi))
    s = torch.sigmoid(model.b(F.relu(model.a(h.mean((2, 3)))))).detach()
    model.head((h * s[:, :, None, None]).mean((2, 3))).gather(1, t[:, None]).sum().backward()
    ours = explain(model, x, t, "epsilon_lrp")
    assert rel_diff(ours, xi.grad * x) <= 1e-5
    assert rel_diff(ours, _grad_x_input(model, x, t)) > 1e-2  # the gate's branch got relevance
    with torch.no_grad():  # no biases in h's path: the relevance sums to the logit minus the head bias
        logit = model(x).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(
        ours.sum((1, 2, 3)) + model.head.bias[t] + _conv_bias_share(model, x, t), logit
    )
    assert get_method("guided_backprop").unsupported(model, x) is None


def _conv_bias_share(model: _Products, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The conv bias's share of the logit with the gate and the ReLU pattern frozen at x."""
    with torch.no_grad():
        z = model.conv(x)
        h = F.relu(z)
        s = torch.sigmoid(model.b(F.relu(model.a(h.mean((2, 3))))))
        bias = model.conv.bias[None, :, None, None] * (z > 0)
        return (model.head.weight[t] * (bias * s[:, :, None, None]).mean((2, 3))).sum(1)


# ---------------------------------------------------------------- Captum, for the docs


def test_captum_is_silently_the_gradient_on_a_vit(x):
    """What docs/methods.md says of Captum 0.9 on a ViT: its DeepLift hooks no op of it (GELU,
    fused attention and LayerNorm are not in its list), so it returns gradient × input, which
    misses f(x) − f(0) by a wide margin; its GuidedBackprop returns the plain gradient."""
    captum_attr = lazy_importorskip("captum.attr")
    model = tiny_vit()
    t, _ = _target_logits(model, x)
    zero = torch.zeros_like(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dl = captum_attr.DeepLift(model).attribute(x.clone(), target=t, baselines=zero).detach()
        gb = captum_attr.GuidedBackprop(model).attribute(x.clone(), target=t).detach()
    gxi = _grad_x_input(model, x, t)
    assert rel_diff(dl, gxi) <= 1e-6 and rel_diff(gb * x, gxi) <= 1e-6
    with torch.no_grad():
        delta = (model(x) - model(zero)).gather(1, t[:, None])[:, 0]
    assert (((dl.sum((1, 2, 3)) - delta) / delta).abs() > 0.2).all()


# ---------------------------------------------------------------- the audit's report


@pytest.fixture(scope="module")
def vit_pt2(tmp_path_factory) -> Path:
    """The tiny ViT exported to .pt2 (dynamic batch) with saliaudit metadata."""
    ep = torch.export.export(
        tiny_vit(),
        (torch.rand(2, 3, 32, 32),),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
    )
    meta = {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "class_names": ["a", "b", "c"]}
    path = tmp_path_factory.mktemp("vit") / "vit.pt2"
    torch.export.save(ep, str(path), extra_files={"saliaudit.json": json.dumps(meta)})
    return path


def _cli(*args) -> Any:
    from typer.testing import CliRunner

    from saliaudit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_report_records_skipped_methods_with_reasons(vit_pt2, tmp_path):
    """``saliaudit report`` on a tiny ViT exported to .pt2: guided backprop and DeepLIFT are
    SKIPPED with the op they have no rule for, ε-LRP and the gradient are measured."""
    from .test_cli import make_images

    images, out = make_images(tmp_path / "images", 3), tmp_path / "out"
    methods = "gradient,guided_backprop,epsilon_lrp,deeplift"
    result = _cli(
        "report", vit_pt2, images, "-o", out, "--format", "json", "-q", "--methods", methods,
        "--checks", "class_sensitivity",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    entries = {m["method"]: m for m in doc["methods"]}
    assert entries["gradient"]["status"] == entries["epsilon_lrp"]["status"] == "ok"
    assert entries["guided_backprop"]["status"] == entries["deeplift"]["status"] == "skipped"
    assert "no rule for attention" in entries["guided_backprop"]["reason"]
    assert "layer_norm in blocks.0.norm1" in entries["deeplift"]["reason"]
    cells = {c["method"]: c for c in doc["checks"] if c["check"] == "class_sensitivity"}
    for method in ("guided_backprop", "deeplift"):
        assert cells[method]["status"] == "skipped"
        assert cells[method]["message"].startswith(f"{method} was skipped: ")
        assert entries[method]["reason"] in cells[method]["message"]
    for method in ("gradient", "epsilon_lrp"):
        assert cells[method]["status"] in ("pass", "warn", "fail"), cells[method]
        assert cells[method]["value"] is not None


def test_methods_model_lists_the_methods_without_a_rule(vit_pt2):
    result = _cli("methods", "--model", vit_pt2)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # unwrapped
    assert "an audit reports them as skipped" in text
    assert "guided_backprop: guided backprop has no rule for attention" in text
    assert "deeplift: DeepLIFT (Rescale) has no rule for" in text
    assert "epsilon_lrp:" not in text
