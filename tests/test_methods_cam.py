"""CAM methods (saliaudit.methods.cam): layer choice, agreement with pytorch-grad-cam and a
textbook hook-based re-implementation, Khakzar's diagnostics, and model hygiene.

pytorch-grad-cam is a test-only dependency; saliaudit never imports it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from saliaudit import load_model
from saliaudit.errors import DecompositionError, UsageError
from saliaudit.methods import explain, get_method
from saliaudit.methods.cam import (
    cam_layers,
    cumulative_gradcam,
    cumulative_layers,
    find_cam_layer,
    gradcam,
    gradcam_abs,
    gradcam_pp,
    layer_cam,
)

from .conftest import hook_counts, randomize_batchnorm, real_images

TARGETS = [0, 3, 5, 9]


class SmallCNN(nn.Module):
    """A plain ReLU CNN with named conv blocks and a functional global mean pool."""

    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(1)
    return SmallCNN().eval(), real_images(32, 4)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(2)
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    return model, real_images(64, 4)


@pytest.fixture(scope="module")
def resnet_pt2(resnet, tmp_path_factory):
    model, x = resnet
    path = tmp_path_factory.mktemp("cam") / "resnet18.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
    torch.export.save(ep, path)
    return load_model(path)


def minmax(m: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's scale_cam_image per map: (m − min) / (1e-7 + max(m − min))."""
    m = m - m.amin(dim=(-2, -1), keepdim=True)
    return m / (1e-7 + m.amax(dim=(-2, -1), keepdim=True))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours − ref| per map, relative to the reference map's range, worst over the batch."""
    rng = (ref.amax(dim=(-2, -1)) - ref.amin(dim=(-2, -1))).clamp(min=1e-12)
    return float(((ours - ref).abs().amax(dim=(-2, -1)) / rng).max())


# --------------------------------------------------------------------------- layer choice


def test_automatic_layer_resnet_and_small_cnn(small, resnet):
    model, x = resnet
    assert find_cam_layer(model, x) == "layer4"
    layers = cam_layers(model, x)
    assert layers[-1] == "layer4" and "layer3" in layers and "fc" not in layers
    model, x = small
    assert find_cam_layer(model, x) == "block3"
    assert cam_layers(model, x)[-1] == "block3"


def test_automatic_layer_on_pt2_same_name_same_maps(resnet, resnet_pt2):
    model, x = resnet
    assert resnet_pt2.exported is not None
    assert find_cam_layer(resnet_pt2, x) == "layer4"
    for fn in (gradcam, gradcam_pp, gradcam_abs, cumulative_gradcam):
        a, b = fn(model, x, torch.tensor(TARGETS)), fn(resnet_pt2, x, torch.tensor(TARGETS))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert cumulative_layers(resnet_pt2, x) == cumulative_layers(model, x)


def test_static_batch_pt2_runs_in_chunks(small, tmp_path):
    model, x = small
    ep = torch.export.export(model, (x[:1],), strict=False)  # static batch size 1
    path = tmp_path / "small_static.pt2"
    torch.export.save(ep, path)
    loaded = load_model(path)
    assert loaded.static_batch == 1
    x3, t3 = x[:3], torch.tensor(TARGETS[:3])
    torch.testing.assert_close(gradcam(loaded, x3, t3), gradcam(model, x3, t3), rtol=1e-5, atol=1e-7)


def test_layer_override_by_name(resnet):
    model, x = resnet
    t = torch.tensor(TARGETS)
    # the module's output: "layer4" and its last block "layer4.1" are the same value
    torch.testing.assert_close(gradcam(model, x, t, layer="layer4.1"), gradcam(model, x, t))
    l3 = gradcam(model, x, t, layer="layer3")
    ref = textbook_gradcam(model, x, t, "layer3")
    assert rel_err(l3[:, 0], ref[:, 0]) <= 1e-5
    # an fx node name is accepted too: the last node of layer3 is layer3's output
    from saliaudit.graph import get_graph, module_path

    gm = get_graph(model, x)
    node = [n for n in gm.graph.nodes if n.op == "call_function" and module_path(n).startswith("layer3.")][-1]
    assert node.name != "layer3"
    torch.testing.assert_close(
        layer_cam(model, x, t, layer=node.name), layer_cam(model, x, t, layer="layer3")
    )
    assert layer_cam(model, x, t, layer="layer3").shape[-2:] == (4, 4)


def test_bad_layer_name_suggests(resnet):
    model, x = resnet
    with pytest.raises(UsageError, match="layer4") as err:
        gradcam(model, x, torch.tensor(TARGETS), layer="layr4")
    assert "did you mean" in str(err.value)
    with pytest.raises(UsageError, match="not spatial"):
        gradcam(model, x, torch.tensor(TARGETS), layer="fc")


# --------------------------------------------------------------------------- references


def textbook_gradcam(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, name: str, relu: bool = True
) -> torch.Tensor:
    """Selvaraju et al. eq. 1–2 with a forward hook on an eager copy of the model."""
    model = copy.deepcopy(model)
    for m in model.modules():  # an in-place ReLU would overwrite the hooked activation
        if isinstance(m, nn.ReLU):
            m.inplace = False
    module = dict(model.named_modules())[name]
    store = {}
    handle = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        logits = model(x)
        a = store["a"]
        (g,) = torch.autograd.grad(logits[torch.arange(len(x)), targets].sum(), [a])
    finally:
        handle.remove()
    cam = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True).detach()
    cam = cam.clamp(min=0) if relu else cam
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("which", ["small", "resnet"])
def test_matches_textbook_hook_implementation(which, small, resnet):
    model, x = small if which == "small" else resnet
    name = "block3" if which == "small" else "layer4"
    t = torch.tensor(TARGETS)
    for relu in (True, False):
        ours = gradcam(model, x, t, relu=relu)
        ref = textbook_gradcam(model, x, t, name, relu=relu)
        err = rel_err(ours[:, 0], ref[:, 0])
        assert err <= 1e-5, err  # measured: 0 (bitwise equal) on both models


@pytest.mark.parametrize("which", ["small", "resnet"])
@pytest.mark.parametrize("method", ["gradcam", "gradcam_pp"])
def test_agrees_with_pytorch_grad_cam(which, method, small, resnet):
    """Same layer, same targets (ClassifierOutputTarget).

    Convention difference: pytorch-grad-cam returns ``minmax(cv2.resize(minmax(cam)))`` with
    ``minmax(m) = (m − min m) / (1e-7 + max(m − min m))`` per image (scale_cam_image, applied
    once per layer and once after aggregating layers); saliaudit keeps the unnormalized map.
    We compare twice:

    1. at the layer's resolution, before any rescaling or resizing: our ``layer_cam`` against
       ``np.maximum(get_cam_image(...), 0)`` computed by the library from the activations and
       gradients its own hooks recorded (this is its ``get_cam_weights`` applied as in
       ``compute_cam_per_layer``);
    2. at the input resolution: their final map against the same min–max applied to ours at
       the same stages (min–max, our bilinear ``align_corners=False`` upsampling, min–max).
       OpenCV's INTER_LINEAR uses the same half-pixel centres. On resnet18 at 64² the layer is
       2×2, so every low-resolution value appears in the upsampled map and min–max commutes
       with upsampling: there we also apply ``minmax∘minmax`` to our returned map directly.
    """
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x = small if which == "small" else resnet
    ours_fn = {"gradcam": gradcam, "gradcam_pp": gradcam_pp}[method]
    cls = {"gradcam": pgc.GradCAM, "gradcam_pp": pgc.GradCAMPlusPlus}[method]
    ref_model = copy.deepcopy(model)
    layer = ref_model.block3 if which == "small" else ref_model.layer4[-1]
    t = torch.tensor(TARGETS)
    tg = [ClassifierOutputTarget(int(c)) for c in TARGETS]
    with cls(model=ref_model, target_layers=[layer]) as cam:
        theirs = torch.from_numpy(cam(input_tensor=x.clone(), targets=tg))
        acts = cam.activations_and_grads.activations[0].cpu().numpy()
        grads = cam.activations_and_grads.gradients[0].cpu().numpy()
        raw = torch.from_numpy(np.maximum(cam.get_cam_image(x, layer, tg, acts, grads), 0))

    low = layer_cam(model, x, t, weighting=method)[:, 0]
    assert raw.abs().max() > 0
    err_low = rel_err(low, raw)
    assert err_low <= 1e-5, err_low  # measured ≤ 2.1e-6 (resnet18 Grad-CAM++)

    ours = ours_fn(model, x, t)
    up = F.interpolate(low[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, up)
    staged = minmax(
        F.interpolate(minmax(low)[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    )
    assert (staged - theirs).abs().max() <= 1e-5  # range of theirs is [0, 1]; measured ≤ 2.5e-6
    if which == "resnet":
        assert (minmax(minmax(ours[:, 0])) - theirs).abs().max() <= 1e-5


def test_gradcam_pp_matches_closed_form(resnet):
    """Chattopadhyay eq. 19 (exp score) written out with a hook, independent of our graph code."""
    model, x = resnet
    t = torch.tensor(TARGETS)
    m = copy.deepcopy(model)
    store = {}
    handle = m.layer4.register_forward_hook(lambda mod, i, o: store.__setitem__("a", o))
    try:
        logits = m(x)
        (g,) = torch.autograd.grad(logits[torch.arange(4), t].sum(), [store["a"]])
    finally:
        handle.remove()
    a = store["a"].detach().double()
    g = g.double()
    denom = 2 * g**2 + a.sum((2, 3), keepdim=True) * g**3
    alpha = torch.where(g != 0, g**2 / (denom + 1e-6), torch.zeros_like(g))
    w = (alpha * g.clamp(min=0)).sum((2, 3), keepdim=True)
    ref = (w * a).sum(1).clamp(min=0)
    assert rel_err(layer_cam(model, x, t, weighting="gradcam_pp")[:, 0].double(), ref) <= 1e-5


# --------------------------------------------------------------------------- diagnostics


def test_gradcam_abs_bounds_signed_gradcam(resnet, small):
    for model, x in (resnet, small):
        t = torch.tensor(TARGETS)
        signed = gradcam(model, x, t, relu=False)
        absolute = gradcam_abs(model, x, t)
        assert (absolute >= 0).all()
        assert (absolute >= signed.abs() - 1e-6).all()
        assert (absolute >= gradcam(model, x, t) - 1e-6).all()
        # channels cancel in the signed sum: abs aggregation is strictly larger somewhere
        assert (absolute - signed.abs()).amax() > 1e-3 * absolute.amax()


def test_cumulative_gradcam_sums_several_layers(resnet, small):
    model, x = resnet
    t = torch.tensor(TARGETS)
    layers = cumulative_layers(model, x)
    assert len(layers) > 1
    assert layers[-1] == "layer4" and {"layer1", "layer2", "layer3", "layer4.0"} <= set(layers)
    # independent check: the textbook hook implementation, one eager pass per layer
    total = sum(textbook_gradcam(model, x, t, name) for name in layers)
    ours = cumulative_gradcam(model, x, t)
    assert rel_err(ours[:, 0], total[:, 0]) <= 1e-5
    assert not torch.allclose(ours, gradcam(model, x, t))
    model, x = small
    layers = cumulative_layers(model, x)
    assert len(layers) > 1 and layers[-1] == "block3"
    assert cumulative_layers(model, x, layer="block2")[-1] == "block2"


# --------------------------------------------------------------------------- hygiene


def test_model_unchanged_and_no_hooks_also_after_an_exception(resnet):
    model, x = resnet
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    hooks = hook_counts(model)
    t = torch.tensor(TARGETS)
    for fn in (gradcam, gradcam_pp, gradcam_abs, cumulative_gradcam):
        fn(model, x, t)
    with pytest.raises(UsageError, match="out of range"):
        gradcam(model, x, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(UsageError):
        gradcam_pp(model, x, t, layer="nope")
    assert hook_counts(model) == hooks
    assert not model.training
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_registry_and_explain(small):
    model, x = small
    for name in ("gradcam", "gradcam_pp", "gradcam_abs", "cumulative_gradcam"):
        m = get_method(name)
        assert m.family == "cam" and m.needs_internals and m.reference
        assert m.params["layer"] is None
        out = explain(model, x, TARGETS, method=name)
        assert out.shape == (4, 1, 32, 32) and out.dtype == x.dtype
    assert get_method("gradcam").params == {"layer": None, "relu": True}
    assert get_method("gradcam_pp").params == {"layer": None, "relu": True}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_raises_clearly(small):
    model, x = small
    scripted = torch.jit.trace(model, x)
    with pytest.raises(DecompositionError, match="TorchScript"):
        gradcam(scripted, x, torch.tensor(TARGETS))
