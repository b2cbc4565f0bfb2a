"""Guided backprop, ε-LRP and DeepLIFT: against Captum, analytic cases, every non-linearity."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import saliaudit
from saliaudit.errors import NotApplicableError
from saliaudit.methods import explain, get_method
from saliaudit.methods.propagation import NONLINEAR_OPS
from saliaudit.model import wrap_module

from .conftest import hook_counts, lazy_importorskip, randomize_batchnorm, real_images

captum_attr = lazy_importorskip("captum.attr")  # only the tests that use Captum need it


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to the range of b."""
    rng = (b.max() - b.min()).clamp(min=1e-12)
    return ((a - b).abs().max() / rng).item()


def captum(cls, model, x, targets, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model).attribute(x.clone(), target=targets, **kw).detach()


# ---------------------------------------------------------------- models


class SepCNN(nn.Module):
    """A ReLU CNN with a separate ReLU module per use (what Captum's hooks need)."""

    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)
        self.act1, self.act2, self.act3 = act(), act(), act()

    def forward(self, x):
        h = self.act1(self.bn1(self.conv1(x)))
        h = self.act2(self.conv2(h))
        h = self.act3(self.conv3(h) + h)  # residual add
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class ReusedCNN(SepCNN):
    """The same network with ONE ReLU module used three times (as torchvision's blocks do)."""

    def __init__(self):
        super().__init__()
        del self.act1, self.act2, self.act3
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.conv2(h))
        h = self.relu(self.conv3(h) + h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class FunctionalCNN(SepCNN):
    """The same network written with F.relu / relu_ / clamp_min."""

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = torch.relu_(self.conv2(h))
        h = (self.conv3(h) + h).clamp_min(0.0)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class TwoReLUBlock(nn.Module):
    """torchvision's BasicBlock with its shared ``relu`` split into two modules."""

    def __init__(self, block: torchvision.models.resnet.BasicBlock):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = block.conv1, block.bn1, block.conv2, block.bn2
        self.downsample = block.downsample
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


def separate_relus(model: nn.Module) -> nn.Module:
    """A copy of a torchvision resnet18 whose blocks use separate ReLU modules."""
    model = copy.deepcopy(model)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, name)
        for i, block in enumerate(layer):
            layer[i] = TwoReLUBlock(block)
    model.relu = nn.ReLU()
    return model


def _cnn(cls=SepCNN, seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_batchnorm(cls(**kw)).eval()


@pytest.fixture(scope="module")
def x():
    return real_images(32, n=2)


@pytest.fixture(scope="module")
def targets():
    return torch.tensor([3, 7])


@pytest.fixture(scope="module")
def cnns():
    sep = _cnn(SepCNN)
    reused = ReusedCNN().eval()
    reused.load_state_dict(sep.state_dict())
    func = FunctionalCNN().eval()
    func.load_state_dict(sep.state_dict())
    return sep, reused, func


@pytest.fixture(scope="module")
def resnets():
    torch.manual_seed(0)
    orig = randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    return orig, separate_relus(orig)


def _grad(model, x, targets):
    xi = x.clone().requires_grad_(True)
    model(xi).gather(1, targets[:, None]).sum().backward()
    return xi.grad.detach()


# ---------------------------------------------------------------- registry


def test_registered():
    for name, params in (
        ("guided_backprop", {}),
        ("epsilon_lrp", {"epsilon": 1e-9}),
        ("deeplift", {"baseline": "black"}),
    ):
        m = get_method(name)
        assert m.family == "propagation" and m.needs_internals and m.params == params
        assert m.reference and m.fn.__doc__


# ---------------------------------------------------------------- against Captum


def test_guided_backprop_matches_captum_cnn(cnns, x, targets):
    sep, reused, func = cnns
    ref = captum(captum_attr.GuidedBackprop, sep, x, targets)
    for model in (sep, reused, func):
        ours = explain(model, x, targets, "guided_backprop")
        assert ours.shape == x.shape
        assert rel_diff(ours, ref) <= 1e-5, type(model).__name__
    # and it is not the plain gradient
    assert rel_diff(_grad(sep, x, targets), ref) > 1e-2


def test_guided_backprop_matches_captum_resnet18(resnets, x, targets):
    orig, fixed = resnets
    ours = explain(orig, x, targets, "guided_backprop")
    ref = captum(captum_attr.GuidedBackprop, fixed, x, targets)
    assert rel_diff(ours, ref) <= 1e-5
    # Captum's guided rule is stateless, so its hooks stay right on the reused relu too
    assert rel_diff(captum(captum_attr.GuidedBackprop, orig, x, targets), ref) <= 1e-5


def test_deeplift_matches_captum_cnn_and_reused_relu_trap(cnns, x, targets):
    sep, reused, func = cnns
    zero = torch.zeros_like(x)
    ref = captum(captum_attr.DeepLift, sep, x, targets, baselines=zero)
    for model in (sep, reused, func):
        ours = explain(model, x, targets, "deeplift", baseline="zero")
        assert rel_diff(ours, ref) <= 1e-5, type(model).__name__
    # Captum issue #1082: Captum itself cannot handle the reused module
    with pytest.raises(RuntimeError, match="more than once"):
        captum(captum_attr.DeepLift, reused, x, targets, baselines=zero)


def test_deeplift_matches_captum_resnet18(resnets, x, targets):
    """resnet18 has a max-pool; with a zero baseline the reference is constant per channel at
    the pool's input, where Captum's max-pool rule reduces to the gradient we keep."""
    orig, fixed = resnets
    ours = explain(orig, x, targets, "deeplift", baseline="zero")
    ref = captum(captum_attr.DeepLift, fixed, x, targets, baselines=torch.zeros_like(x))
    assert rel_diff(ours, ref) <= 1e-5


def _pooled(order: str) -> nn.Module:
    torch.manual_seed(1)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    if order == "pool-relu":
        layers[1], layers[2] = layers[2], layers[1]
    return nn.Sequential(
        *layers,
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()


def test_deeplift_maxpool_convention_documented(x, targets):
    """Max-pool with a non-constant reference (documented convention difference).

    We keep the max-pool gradient. Captum 0.9 has its own max-pool rule, but it only takes
    effect when the pool's input is not a hooked non-linearity's output: in the usual
    ReLU → MaxPool order the ReLU's hook captured the upstream gradient before the pool's
    tensor hook rewrote it, so Captum's result equals ours; in MaxPool → ReLU order it differs.
    """
    base = torch.randn_like(x) * 0.5
    for order, same in (("relu-pool", True), ("pool-relu", False)):
        model = _pooled(order)
        ours = explain(model, x, targets, "deeplift", baseline=base)
        ref = captum(captum_attr.DeepLift, model, x, targets, baselines=base)
        assert (rel_diff(ours, ref) <= 1e-5) == same, order


# ---------------------------------------------------------------- analytic cases


def test_epsilon_lrp_is_grad_x_input_on_relu_nets(cnns, resnets, x, targets):
    for model in (*cnns, resnets[0]):
        gxi = _grad(model, x, targets) * x
        ours = explain(model, x, targets, "epsilon_lrp")
        assert rel_diff(ours, gxi) <= 1e-5, type(model).__name__


def test_linear_model_all_equal(x, targets):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    gxi = _grad(lin, x, targets) * x
    for method, kw in (
        ("epsilon_lrp", {}),
        ("deeplift", {"baseline": "zero"}),
        ("deeplift", {}),
        ("guided_backprop", {}),
    ):
        out = explain(lin, x, targets, method, **kw)
        expected = gxi if method != "guided_backprop" else _grad(lin, x, targets)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["sep", "reused", "resnet18"])
def test_deeplift_summation_to_delta(which, cnns, resnets, x, targets):
    """Rescale's summation-to-delta is exact in exact arithmetic; in float64 so that a small
    delta (resnet18 gives |Δ| ≈ 2e-3, where float32 rounding alone is ~1e-4 of it) is tested."""
    import copy

    model = copy.deepcopy({"sep": cnns[0], "reused": cnns[1], "resnet18": resnets[0]}[which]).double()
    x = x.double()
    zero = torch.zeros_like(x)
    attr = explain(model, x, targets, "deeplift", baseline="zero")
    with torch.no_grad():
        delta = (model(x) - model(zero)).gather(1, targets[:, None]).squeeze(1)
    total = attr.sum((1, 2, 3))
    rel = ((total - delta).abs() / delta.abs().clamp(min=1e-12)).max().item()
    assert rel <= 1e-9, (total, delta)


# ---------------------------------------------------------------- every non-linearity


class MLP(nn.Module):
    """y = W2 · f(W1 · x + b1) + b2 on a flattened image: hand-computable rules."""

    def __init__(self, act, d=12, h=9, k=4):
        super().__init__()
        self.l1, self.l2, self.act = nn.Linear(d, h), nn.Linear(h, k), act

    def forward(self, x):
        return self.l2(self.act(self.l1(x.flatten(1))))


ACTS = {
    "ReLU": nn.ReLU(),
    "ReLU6": nn.ReLU6(),
    "LeakyReLU": nn.LeakyReLU(0.2),
    "Hardswish": nn.Hardswish(),
    "SiLU": nn.SiLU(),
    "GELU": nn.GELU(),
    "ELU": nn.ELU(),
    "Sigmoid": nn.Sigmoid(),
    "Tanh": nn.Tanh(),
    "F.relu": F.relu,
    "clamp": lambda t: t.clamp(-1.0, 1.5),
}


@pytest.mark.parametrize("name", list(ACTS))
def test_rules_by_hand_every_activation(name):
    act = ACTS[name]
    torch.manual_seed(3)
    model = MLP(act).eval()
    with torch.no_grad():
        model.l1.weight.mul_(10.0)  # pre-activations well spread, so ReLU6/clamp clip
    x = torch.randn(3, 3, 2, 2)
    targets = torch.tensor([0, 1, 3])
    w1, b1, w2 = model.l1.weight, model.l1.bias, model.l2.weight[targets]  # w2: (B, h)
    z = x.flatten(1) @ w1.T + b1
    zr = z.detach().requires_grad_(True)
    (fprime,) = torch.autograd.grad(act(zr).sum(), [zr])
    with torch.no_grad():
        fz, fb = act(z), act(b1.expand_as(z))

        def back(mod):  # W1ᵀ · (modified multiplier), reshaped like x
            return (mod @ w1).view_as(x)

        expected = {
            "guided_backprop": back(fprime * w2.clamp(min=0)),
            "epsilon_lrp": back(w2 * fz / (z + 1e-9 * torch.where(z >= 0, 1.0, -1.0))) * x,
            "deeplift": back(w2 * torch.where((z - b1).abs() < 1e-6, fprime, (fz - fb) / (z - b1))) * x,
        }
    for method, exp in expected.items():
        kw = {"baseline": "zero"} if method == "deeplift" else {}
        out = explain(model, x, targets, method, **kw)
        torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-5, msg=f"{name} {method}")
    if name == "ReLU6":
        assert (z > 6).any() and (z < 0).any()
    if name not in ("ReLU", "F.relu", "LeakyReLU"):
        # ε-LRP differs from gradient×input once f(z)/z ≠ f'(z) (not positively homogeneous)
        gxi = _grad(model, x, targets) * x
        assert (explain(model, x, targets, "epsilon_lrp") - gxi).abs().max() > 1e-3


def test_guided_backprop_relu6_tiny_by_hand():
    """x = (1, 2); z = W1 x = (1, 8, 3); ReLU6 passes 1 and 3, clips 8; W2[t] = (−1, 5, 2)."""
    model = MLP(nn.ReLU6(), d=2, h=3, k=1)
    with torch.no_grad():
        model.l1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 4.0], [1.0, 1.0]]))
        model.l1.bias.zero_()
        model.l2.weight.copy_(torch.tensor([[-1.0, 5.0, 2.0]]))
        model.l2.bias.zero_()
    x = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    t = torch.tensor([0])
    # gradient: W1ᵀ (f'(z)·g) = W1ᵀ (−1, 0, 2) = (1, 2)
    torch.testing.assert_close(_grad(model, x, t).flatten(), torch.tensor([1.0, 2.0]))
    # guided: W1ᵀ (f'(z)·max(g, 0)) = W1ᵀ (0, 0, 2) = (2, 2)
    gb = explain(model, x, t, "guided_backprop").flatten()
    torch.testing.assert_close(gb, torch.tensor([2.0, 2.0]))
    # ε-LRP and DeepLIFT (zero reference): W1ᵀ (g·f(z)/z) = W1ᵀ (−1, 3.75, 2) = (1, 17); ⊙ x
    for method in ("epsilon_lrp", "deeplift"):
        torch.testing.assert_close(explain(model, x, t, method).flatten(), torch.tensor([1.0, 34.0]))
    # summation to delta: f(x) − f(0) = −1 + 30 + 6 = 35
    assert explain(model, x, t, "deeplift").sum().item() == pytest.approx(35.0)
    # Captum's GuidedBackprop only overrides nn.ReLU: it silently returns the gradient here
    assert torch.allclose(captum(captum_attr.GuidedBackprop, model, x, t).flatten(), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("act", [nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.SiLU])
def test_guided_backprop_differs_from_gradient(act, x, targets):
    model = _cnn(SepCNN, act=act)
    gb = explain(model, x, targets, "guided_backprop")
    grad = _grad(model, x, targets)
    assert rel_diff(gb, grad) > 1e-2


def test_guided_backprop_ignores_negative_upstream_gradients(x):
    """One ReLU6 layer followed by a head with only negative weights: every upstream gradient
    at the ReLU6 is ≤ 0, so guided backprop is exactly zero (the gradient is not)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    ).eval()
    with torch.no_grad():
        model[0].weight.mul_(6.0)
        model[4].weight.copy_(-model[4].weight.abs())
    t = torch.tensor([0, 1])
    assert _grad(model, x, t).abs().max() > 0
    assert explain(model, x, t, "guided_backprop").abs().max().item() == 0.0


def test_squeeze_excitation_product(x, targets):
    """In h·σ(u): ε-LRP takes the gate σ(u) as a constant, so the signal h takes all relevance
    (signal-take-all, Arras et al. 2017); guided backprop keeps the product's two-sided
    gradient with its rule at σ; DeepLIFT has no rule for the product and is skipped."""
    torch.manual_seed(0)

    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8), nn.Linear(8, 10)

        def forward(self, x):
            h = self.conv(x)
            s = torch.sigmoid(self.fc(h.mean((2, 3))))[:, :, None, None]
            return self.head((h * s).mean((2, 3)))

    model = SE().eval()
    expected = {}
    for method in ("epsilon_lrp", "guided_backprop"):
        xi = x.clone().requires_grad_(True)
        h = model.conv(xi)
        s = torch.sigmoid(model.fc(h.mean((2, 3))))
        if method == "epsilon_lrp":
            s = s.detach()
        else:  # σ'(u) · max(g, 0) at the sigmoid
            s.register_hook(lambda g: g.clamp(min=0))
        model.head((h * s[:, :, None, None]).mean((2, 3))).gather(1, targets[:, None]).sum().backward()
        expected[method] = xi.grad * x if method == "epsilon_lrp" else xi.grad
    for method, exp in expected.items():
        torch.testing.assert_close(explain(model, x, targets, method), exp, rtol=1e-4, atol=1e-6)
    assert rel_diff(expected["epsilon_lrp"], _grad(model, x, targets) * x) > 1e-2
    with pytest.raises(
        NotApplicableError, match=r"no rule for the product of two input-dependent tensors \(mul"
    ):
        explain(model, x, targets, "deeplift")


def test_ops_are_classified():
    assert {
        "relu",
        "hardtanh",
        "leaky_relu",
        "hardswish",
        "silu",
        "gelu",
        "sigmoid",
        "tanh",
        "elu",
        "clamp",
        "clamp_min",
    } <= NONLINEAR_OPS
    assert not {"mul", "add", "exp", "max_pool2d", "conv2d"} & NONLINEAR_OPS


# ---------------------------------------------------------------- .pt2 and LoadedModel


def test_pt2_graph(tmp_path, x, targets):
    model = _cnn(SepCNN, act=nn.ReLU6)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},))
    path = tmp_path / "relu6.pt2"
    torch.export.save(ep, path)
    lm = saliaudit.load_model(path, input_size=32)
    for method in ("guided_backprop", "epsilon_lrp", "deeplift"):
        a = explain(lm, x, targets, method, **({"baseline": "zero"} if method == "deeplift" else {}))
        b = explain(model, x, targets, method, **({"baseline": "zero"} if method == "deeplift" else {}))
        assert rel_diff(a, b) <= 1e-5, method
    assert rel_diff(explain(lm, x, targets, "guided_backprop"), _grad(model, x, targets)) > 1e-2
    # the "black" baseline of a loaded model is a black image after normalization
    mean = torch.tensor(lm.mean).view(1, 3, 1, 1)
    std = torch.tensor(lm.std).view(1, 3, 1, 1)
    black = ((0 - mean) / std).expand_as(x)
    torch.testing.assert_close(
        explain(lm, x, targets, "deeplift"), explain(model, x, targets, "deeplift", baseline=black)
    )


def test_static_batch_pt2(tmp_path, x):
    model = _cnn(SepCNN)
    ep = torch.export.export(model, (x[:1],))
    path = tmp_path / "static.pt2"
    torch.export.save(ep, path)
    lm = saliaudit.load_model(path, input_size=32)
    assert lm.static_batch == 1
    xs = torch.cat([x, x.flip(3)])
    t = torch.tensor([1, 2, 3, 4])
    for method in ("guided_backprop", "deeplift"):
        kw = {"baseline": "zero"} if method == "deeplift" else {}
        torch.testing.assert_close(
            explain(lm, xs, t, method, **kw), explain(model, xs, t, method, **kw), rtol=1e-4, atol=1e-6
        )


# ---------------------------------------------------------------- model untouched


def test_model_unchanged_also_after_exception(cnns, x):
    model = cnns[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    hooks = hook_counts(model)
    for method in ("guided_backprop", "epsilon_lrp", "deeplift"):
        explain(model, x, torch.tensor([0, 1]), method)
        with pytest.raises((RuntimeError, IndexError)):
            explain(model, x, torch.tensor([0, 99]), method)
    assert hook_counts(model) == hooks
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_training_mode_module_not_switched(x, targets):
    model = _cnn(SepCNN).train()
    out = explain(model, x, targets, "guided_backprop")
    assert model.training
    ref = captum(captum_attr.GuidedBackprop, copy.deepcopy(model).eval(), x, targets)
    assert rel_diff(out, ref) <= 1e-5


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_needs_graph(cnns, x, targets):
    from saliaudit.errors import DecompositionError

    scripted = torch.jit.script(cnns[0])
    for method in ("guided_backprop", "epsilon_lrp", "deeplift"):
        with pytest.raises(DecompositionError, match="TorchScript"):
            explain(scripted, x, targets, method)


@pytest.mark.parametrize("method", ["deeplift", "guided_backprop", "epsilon_lrp", "fullgrad", "gradcam"])
def test_graph_methods_leave_no_reference_cycles(resnets, x, targets, method):
    """The graph-interpreting methods free their activations when they return, without waiting
    for the cyclic garbage collector: a per-op callback that referred to its own runner kept
    DeepLIFT's reference activations (about 1 GB for 8 ResNet-50 rows) alive after the call."""
    lm = wrap_module(resnets[0])  # one wrapper: its exported graph is cached across the calls
    fn = get_method(method)
    fn(lm, x, targets)  # warm-up: graph export and caches
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        gc.garbage.clear()
        fn(lm, x, targets)
        gc.collect()
        rows = x.shape[0]  # activations: (rows, C, H, W); evicted cached graphs' weights are not
        tensors = [
            o
            for o in gc.garbage
            if type(o) is torch.Tensor and o.dim() == 4  # not Parameters, not tracing's FakeTensors
            if o.shape[0] == rows
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    # (graph tracing leaves cycles of small Python objects; no activation may be among them)
    assert not tensors, f"{method} left {len(tensors)} tensors in reference cycles"
