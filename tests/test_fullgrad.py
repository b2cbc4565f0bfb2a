"""FullGrad decomposition: completeness on real architectures, ψ against the official formulas."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import saliaudit
from saliaudit.methods.fullgrad import full_gradients
from saliaudit.psi import PSI_PRESETS, get_psi, reduce_term

from .conftest import hook_counts, randomize_batchnorm, real_images
from .reference.official_fullgrad import OfficialFullGrad

ARCHS = [
    "resnet18",
    "resnet50",
    "vgg11_bn",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",
]


def _tv(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.get_model(name, weights=None, num_classes=10)).eval()


@pytest.fixture(scope="module")
def images():
    return real_images(64, n=2)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_completeness_both_formats_both_dtypes(arch, images, tmp_path):
    model = _tv(arch)
    pt2 = tmp_path / f"{arch}.pt2"
    ep = torch.export.export(
        model, (images,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},)
    )
    torch.export.save(ep, pt2)
    sd = tmp_path / f"{arch}.pt"
    torch.save(model.state_dict(), sd)
    loaded = {
        "pt2": saliaudit.load_model(pt2, input_size=64),
        "state_dict": saliaudit.load_model(sd, arch=arch, num_classes=10, input_size=64),
    }
    for fmt, lm in loaded.items():
        targets = lm.logits(images).argmax(1)
        for dtype, tol in ((torch.float32, 1e-3), (torch.float64, 1e-4)):
            fg = full_gradients(lm, images.to(dtype), targets)
            assert fg.residual.max().item() < tol, (fmt, dtype, fg.residual.tolist())
            assert not fg.unaccounted
            assert torch.isfinite(fg.saliency("paper")).all()
    # both formats decompose the same function identically (same names, same logits)
    a = full_gradients(loaded["pt2"], images, torch.tensor([1, 2]))
    b = full_gradients(loaded["state_dict"], images, torch.tensor([1, 2]))
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    assert len(a.bias_terms) == len(b.bias_terms)


class Shuffled(nn.Module):
    """Modules declared in another order than they run; a residual branch; a clipping ReLU6."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 5)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.clip = nn.ReLU6()
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        h = self.clip(self.bn1(self.conv1(x)) * 4.0)  # scaled so that ReLU6 clips
        r = self.bn2(self.conv2(h))
        h = F.relu(h + r)  # residual branch, functional ReLU
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def test_completeness_shuffled_residual_relu6(images):
    torch.manual_seed(1)
    model = randomize_batchnorm(Shuffled()).eval()
    for dtype, tol in ((torch.float32, 1e-3), (torch.float64, 1e-4)):
        fg = full_gradients(model, images.to(dtype), torch.tensor([0, 3]))
        assert fg.residual.max().item() < tol
        clip = [t for t in fg.bias_terms.values() if t.op == "hardtanh"]
        assert len(clip) == 1 and clip[0].kind == "implicit"
        # the ReLU6 really clips here, so its implicit bias carries part of the logit
        assert clip[0].total().abs().max().item() > 1e-3
    # the official pairing by module order cannot decompose this model: it pairs a bias with
    # the wrong layer's gradient (shape error) or misses the ReLU6 bias (incomplete)
    ref = OfficialFullGrad(copy.deepcopy(model))
    try:
        g, terms, out = ref.decompose(images, torch.tensor([0, 3]))
        official = ((g * images).sum() + sum(t.sum() for t in terms)).item()
        logit = out.gather(1, torch.tensor([[0], [3]])).sum().item()
        assert abs(official - logit) > 1e-3 * abs(logit)
    except RuntimeError as err:
        assert "size" in str(err)
    finally:
        ref.remove()


def test_signed_map_sums_to_logit(images):
    model = _tv("resnet18")
    fg = full_gradients(model, images.double(), torch.tensor([4, 7]))
    signed = [get_psi("signed")]
    total = reduce_term(fg.input_term, signed)["signed"].sum((1, 2))
    for t in fg.bias_terms.values():
        if t.spatial:
            total = total + reduce_term(t.stats, signed)["signed"].sum((1, 2))
        else:
            total = total + t.total()
    torch.testing.assert_close(total, fg.logits.double(), rtol=1e-10, atol=1e-10)


def test_paper_psi_matches_official_vgg11_bn(images):
    model = _tv("vgg11_bn")
    targets = torch.tensor([2, 5])
    ref_model = copy.deepcopy(model)
    for m in ref_model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # the official hooks need the layer outputs unmodified
    ref = OfficialFullGrad(ref_model)
    expected = ref.saliency(images, targets).detach()
    ref.remove()
    ours = full_gradients(model, images, targets).saliency("paper")
    scale = (expected.amax() - expected.amin()).item()
    assert (ours - expected).abs().max().item() <= 1e-5 * scale


def test_per_channel_psi_matches_pytorch_grad_cam(images):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import FullGrad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _tv("vgg11_bn")
    ref_model = copy.deepcopy(model)
    for m in ref_model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    cam = FullGrad(model=ref_model, target_layers=[])
    targets = [2, 5]
    expected = torch.from_numpy(
        cam(input_tensor=images.clone(), targets=[ClassifierOutputTarget(t) for t in targets])
    )
    ours = full_gradients(model, images, torch.tensor(targets)).saliency("per-channel")
    # pytorch-grad-cam min-max normalizes the final map for display; do the same to ours
    flat = ours.reshape(2, -1)
    ours = (
        (flat - flat.amin(1, keepdim=True))
        / (1e-7 + (flat - flat.amin(1, keepdim=True)).amax(1, keepdim=True))
    ).reshape(ours.shape)
    assert (ours - expected).abs().max().item() < 1e-4


def test_all_psi_from_one_decomposition(images):
    fg = full_gradients(_tv("mobilenet_v3_small"), images, torch.tensor([0, 1]))
    maps = fg.saliency_maps()
    assert set(maps) == set(PSI_PRESETS)
    for name, m in maps.items():
        assert m.shape == (2, 64, 64) and torch.isfinite(m).all(), name
    # the parts add up: positive - negative has the sign of the signed map's layers
    assert (maps["abs"] >= 0).all() and (maps["paper"] >= 0).all()
    # a layer-rescaled map is bounded by the number of channels summed
    assert maps["paper"].max() <= sum(t.grad.shape[1] for t in fg.spatial_terms) + 3


def test_model_untouched_also_after_exception(images):
    model = _tv("resnet18").train()  # a user model left in training mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_counts(model)
    full_gradients(model, images, torch.tensor([0, 1]))
    with pytest.raises((IndexError, RuntimeError)):
        full_gradients(model, images, torch.tensor([0, 99]))  # target out of range
    assert model.training
    assert hook_counts(model) == hooks
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_unaccounted_op_is_named_not_hidden(images):
    @torch.library.custom_op("saliaudit_test::softclip", mutates_args=())
    def softclip(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) + 0.5

    @softclip.register_fake
    def _(x):
        return torch.empty_like(x)

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    softclip.register_autograd(backward, setup_context=setup)

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.ops.saliaudit_test.softclip(self.conv(x))
            return self.fc(h.mean((2, 3)))

    fg = full_gradients(Custom().eval(), images, torch.tensor([0, 1]))
    assert any("softclip" in u for u in fg.unaccounted)
    assert fg.residual.max().item() > 1e-3  # the op's implicit bias is missing, and shown


@pytest.mark.slow  # 5 s
def test_torchscript_reports_residual(images, tmp_path):
    model = _tv("resnet18")
    path = tmp_path / "ts.pt"
    torch.jit.trace(model, images).save(str(path))
    lm = saliaudit.load_model(path, input_size=64)
    fg = full_gradients(lm, images, torch.tensor([0, 1]))
    assert fg.bias_terms == {} and fg.unaccounted
    assert "TorchScript" in fg.unaccounted[0]
    assert fg.residual.max().item() > 1e-3


def test_static_batch_pt2_runs_any_batch(tmp_path):
    model = _tv("resnet18")
    x = real_images(64, n=3)
    ep = torch.export.export(model, (x[:1],))
    path = tmp_path / "static.pt2"
    torch.export.save(ep, path)
    lm = saliaudit.load_model(path)
    assert lm.static_batch == 1
    fg = full_gradients(lm, x, torch.tensor([1, 2, 3]))
    assert fg.input_term.shape[0] == 3 and fg.residual.max().item() < 1e-3
    torch.testing.assert_close(
        fg.logits, model(x).gather(1, torch.tensor([[1], [2], [3]]))[:, 0], rtol=1e-4, atol=1e-4
    )


def test_deterministic(images):
    model = _tv("mobilenet_v2")
    a = full_gradients(model, images, torch.tensor([1, 2])).saliency_maps()
    b = full_gradients(model, images, torch.tensor([1, 2])).saliency_maps()
    for k in a:
        assert torch.equal(a[k], b[k])


def test_api_validates_arguments(images):
    from saliaudit.errors import UsageError

    model = _tv("resnet18")
    with pytest.raises(UsageError):
        full_gradients(model, images[0], torch.tensor([0]))
    with pytest.raises(UsageError):
        full_gradients(model, images, torch.tensor([0]))
    with pytest.raises(UsageError):
        full_gradients(model, images, torch.tensor([0, 1])).saliency("nope")
