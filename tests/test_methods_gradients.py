"""Gradient, perturbation and control methods: agreement with Captum, analytic cases, controls.

Captum is a test-only dependency (never imported by saliaudit/). Tolerance: max |ours − ref|
≤ 1e-5 × (max − min of the reference map).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from saliaudit.errors import UsageError
from saliaudit.methods import explain, get_method, method_names
from saliaudit.methods.gradients import (
    gaussian_blur,
    integrated_gradients_delta,
    make_baselines,
    quadrature,
)
from saliaudit.model import wrap_module

from .conftest import lazy_importorskip, randomize_batchnorm, real_images

captum_attr = lazy_importorskip("captum.attr")  # only the tests that use Captum need it

TOL = 1e-5
MINE = [
    "gradient",
    "grad_x_input",
    "integrated_gradients",
    "smoothgrad",
    "smoothgrad_sq",
    "occlusion",
    "random",
    "edge",
]


def small_cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 12, 3, padding=1, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(12, 10),
    ).eval()


@pytest.fixture(scope="module")
def cnn() -> torch.nn.Module:
    return small_cnn()


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(1)
    return randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()


@pytest.fixture(scope="module")
def models(cnn, resnet):
    return {"cnn": cnn, "resnet18": resnet}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return real_images(32, 2)


TARGETS = torch.tensor([3, 7])


def captum_scale(steps: int, integration: str = "riemann_trapezoid") -> float:
    """Documented convention difference: Captum 0.9's trapezoid weights are 1/steps (summing to
    1 − 1/steps) where the trapezoid rule's are 1/(steps − 1); Captum's IG = ours × this."""
    return (steps - 1) / steps if integration == "riemann_trapezoid" else 1.0


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach()
    span = (ref.max() - ref.min()).clamp_min(1e-30)
    return ((ours - ref).abs().max() / span).item()


def captum(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn().detach()


def linear_model(seed: int = 0, c: int = 3, h: int = 8, w: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * h * w, 5)).eval()


# ------------------------------------------------------------------ agreement with Captum


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_gradient_and_grad_x_input_match_captum(models, x, name):
    m = models[name]
    ref = captum(lambda: captum_attr.Saliency(m).attribute(x, target=TARGETS, abs=False))
    assert rel_err(explain(m, x, TARGETS, method="gradient"), ref) <= TOL
    ref = captum(lambda: captum_attr.InputXGradient(m).attribute(x, target=TARGETS))
    assert rel_err(explain(m, x, TARGETS, method="grad_x_input"), ref) <= TOL


@pytest.mark.parametrize(
    "name,integration,steps",
    [
        ("cnn", "riemann_trapezoid", 32),
        ("resnet18", "riemann_trapezoid", 32),
        ("cnn", "gausslegendre", 16),
        ("resnet18", "gausslegendre", 16),
        ("cnn", "riemann_middle", 8),
    ],
)
def test_integrated_gradients_matches_captum(models, x, name, integration, steps):
    m = models[name]
    ig = captum_attr.IntegratedGradients(m)
    ours = explain(
        m, x, TARGETS, method="integrated_gradients", steps=steps, integration=integration, internal_batch=7
    )  # odd chunking on purpose
    ref = captum(
        lambda: ig.attribute(
            x, target=TARGETS, n_steps=steps, method=integration, baselines=torch.zeros_like(x)
        )
    )
    assert rel_err(ours * captum_scale(steps, integration), ref) <= TOL


@pytest.mark.parametrize("baseline", ["mean", "blur"])
def test_integrated_gradients_baselines_match_captum(resnet, x, baseline):
    ig = captum_attr.IntegratedGradients(resnet)
    base = make_baselines(resnet, x, baseline)[0]
    ours = explain(resnet, x, TARGETS, method="integrated_gradients", baseline=baseline, steps=16)
    ref = captum(
        lambda: ig.attribute(x, target=TARGETS, n_steps=16, method="riemann_trapezoid", baselines=base)
    )
    assert rel_err(ours * captum_scale(16), ref) <= TOL


def test_integrated_gradients_black_uses_model_normalization(cnn, x):
    lm = wrap_module(cnn, input_size=32, num_classes=10)  # ImageNet mean/std
    mean = torch.tensor(lm.mean).view(1, 3, 1, 1)
    std = torch.tensor(lm.std).view(1, 3, 1, 1)
    black = ((0 - mean) / std).expand_as(x)
    assert torch.allclose(make_baselines(lm, x, "black")[0], black)
    assert torch.equal(make_baselines(cnn, x, "black")[0], torch.zeros_like(x))  # bare module: zeros
    ig = captum_attr.IntegratedGradients(cnn)
    ref = captum(
        lambda: ig.attribute(x, target=TARGETS, n_steps=16, method="riemann_trapezoid", baselines=black)
    )
    assert (
        rel_err(explain(lm, x, TARGETS, method="integrated_gradients", steps=16) * captum_scale(16), ref)
        <= TOL
    )
    # uniform noise of a LoadedModel lies in [black, white] of model space
    u = make_baselines(lm, x, "uniform-noise", n=3)
    assert u.shape == (3, *x.shape)
    assert (u >= black - 1e-6).all() and (u <= (1 - mean) / std + 1e-6).all()


def test_integrated_gradients_averages_sampled_baselines(cnn, x):
    bases = make_baselines(cnn, x, "uniform-noise", n=3, seed=5)
    assert not torch.equal(bases[0], bases[1])
    ours = explain(
        cnn,
        x,
        TARGETS,
        method="integrated_gradients",
        baseline="uniform-noise",
        n_baselines=3,
        seed=5,
        steps=8,
    )
    ig = captum_attr.IntegratedGradients(cnn)
    ref = torch.stack(
        [
            captum(
                lambda b=b: ig.attribute(
                    x, target=TARGETS, n_steps=8, method="riemann_trapezoid", baselines=b
                )
            )
            for b in bases
        ]
    ).mean(0)
    assert rel_err(ours * captum_scale(8), ref) <= TOL
    # sampled blur widths differ; same seed -> same result
    blurs = make_baselines(cnn, x, "blur", n=2, seed=1)
    assert not torch.allclose(blurs[0], blurs[1])
    again = explain(
        cnn,
        x,
        TARGETS,
        method="integrated_gradients",
        baseline="uniform-noise",
        n_baselines=3,
        seed=5,
        steps=8,
    )
    assert torch.equal(ours, again)


def test_quadrature_matches_captum():
    approximation_parameters = pytest.importorskip(
        "captum.attr._utils.approximation_methods"
    ).approximation_parameters

    for method in ("riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle", "gausslegendre"):
        sizes_f, alphas_f = approximation_parameters(method)
        sizes, alphas = quadrature(12, method)
        assert abs(sum(sizes) - 1) < 1e-12  # a quadrature rule on [0, 1]
        np.testing.assert_allclose(np.array(sizes) * captum_scale(12, method), sizes_f(12), atol=1e-12)
        np.testing.assert_allclose(alphas, alphas_f(12), atol=1e-12)


@pytest.mark.parametrize(
    "name,patch,stride", [("cnn", 8, 4), ("resnet18", 8, 4), ("cnn", 5, 3), ("resnet18", 7, 5), ("cnn", 3, 3)]
)
def test_occlusion_matches_captum(models, x, name, patch, stride):
    m = models[name]
    ours = explain(m, x, TARGETS, method="occlusion", patch=patch, stride=stride, internal_batch=50)
    ref = captum(
        lambda: captum_attr.Occlusion(m).attribute(
            x,
            target=TARGETS,
            sliding_window_shapes=(3, patch, patch),
            strides=(3, stride, stride),
            baselines=0.0,
            perturbations_per_eval=64,
        )
    )
    assert rel_err(ours, ref) <= TOL
    assert torch.equal(ours[:, 0], ours[:, 2])  # the same value in every channel (Captum's convention)


def test_occlusion_mean_baseline_matches_captum(cnn, x):
    base = make_baselines(cnn, x, "mean")[0]
    ours = explain(cnn, x, TARGETS, method="occlusion", baseline="mean")
    ref = captum(
        lambda: captum_attr.Occlusion(cnn).attribute(
            x, target=TARGETS, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), baselines=base
        )
    )
    assert rel_err(ours, ref) <= TOL


def direct_smoothgrad(model, x, targets, samples, noise, seed, square):
    """Independent re-implementation with the documented noise recipe."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((samples, 1, *x.shape[1:]), generator=gen)
    sigma = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    acc = torch.zeros_like(x)
    for s in range(samples):
        xi = (x + z[s] * sigma.view(-1, 1, 1, 1)).requires_grad_(True)
        out = model(xi)[torch.arange(x.shape[0]), targets].sum()
        (g,) = torch.autograd.grad(out, xi)
        acc += g * g if square else g
    return acc / samples


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_smoothgrad_matches_direct(models, x, name):
    m = models[name]
    for method, square in (("smoothgrad", False), ("smoothgrad_sq", True)):
        ours = explain(m, x, TARGETS, method=method, samples=4, noise=0.2, seed=3, internal_batch=5)
        ref = direct_smoothgrad(m, x, TARGETS, 4, 0.2, 3, square)
        assert rel_err(ours, ref) <= TOL
        if square:
            assert (ours >= 0).all()


def test_smoothgrad_zero_noise_is_gradient(cnn, x):
    assert (
        rel_err(
            explain(cnn, x, TARGETS, method="smoothgrad", samples=2, noise=0.0),
            explain(cnn, x, TARGETS, method="gradient"),
        )
        <= TOL
    )


def test_smoothgrad_is_batch_invariant(cnn, x):
    both = explain(cnn, x, TARGETS, method="smoothgrad", samples=4)
    one = explain(cnn, x[1:], TARGETS[1:], method="smoothgrad", samples=4)
    assert torch.allclose(both[1:], one, atol=1e-6)


# ------------------------------------------------------------------ analytic cases


def test_linear_model_ancona_prop4():
    m = linear_model()
    torch.manual_seed(2)
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 2, 4])
    gxi = explain(m, x, t, method="grad_x_input")
    ig = explain(m, x, t, method="integrated_gradients", steps=4)
    occ = explain(m, x, t, method="occlusion", patch=1, stride=1)
    # occlusion replicates the per-pixel drop over channels; with a 1×1×C window it is Σ_c gxi
    assert torch.allclose(gxi, ig, atol=1e-5)
    assert torch.allclose(occ[:, :1], gxi.sum(1, keepdim=True), atol=1e-5)
    # a per-channel window (Captum's (1, 1, 1) window) is exactly gxi: check Captum agrees with ours
    ref = captum(
        lambda: captum_attr.Occlusion(m).attribute(
            x, target=t, sliding_window_shapes=(3, 1, 1), strides=(3, 1, 1), baselines=0.0
        )
    )
    assert rel_err(occ, ref) <= TOL
    w = m[1].weight[t].view(3, 3, 8, 8)
    assert torch.allclose(gxi, w * x, atol=1e-6)


def test_integrated_gradients_completeness(cnn, x):
    errors = []
    for steps in (4, 32, 128):
        for baseline in ("black", "mean"):
            a = explain(cnn, x, TARGETS, method="integrated_gradients", steps=steps, baseline=baseline)
            bases = make_baselines(cnn, x, baseline)
            d = integrated_gradients_delta(cnn, x, TARGETS, a, bases)
            with torch.no_grad():
                fx = cnn(x)[torch.arange(2), TARGETS]
                fb = cnn(bases[0])[torch.arange(2), TARGETS]
            # Σ IG ≈ f(x) − f(x') within the reported convergence error
            assert torch.allclose(d.expected, fx - fb, atol=1e-5)
            assert ((a.sum(dim=(1, 2, 3)) - (fx - fb)).abs() <= d.error + 1e-5).all()
            if baseline == "black":
                errors.append(d.error.max().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01 * (fx - fb).abs().max().item() + 1e-4


def test_integrated_gradients_completeness_averaged(cnn, x):
    bases = make_baselines(cnn, x, "uniform-noise", n=4)
    errors = []
    for steps in (4, 128):
        a = explain(
            cnn,
            x,
            TARGETS,
            method="integrated_gradients",
            steps=steps,
            baseline="uniform-noise",
            n_baselines=4,
        )
        d = integrated_gradients_delta(cnn, x, TARGETS, a, bases)
        assert ((d.total - d.expected).abs() <= d.error + 1e-6).all()
        errors.append(d.error.max().item())
    assert errors[1] < errors[0]


def test_gaussian_blur_matches_scipy():
    from scipy.ndimage import gaussian_filter

    torch.manual_seed(0)
    img = torch.rand(1, 2, 64, 64, dtype=torch.float64)
    ours = gaussian_blur(img, 2.0)
    ref = gaussian_filter(img.numpy(), sigma=(0, 0, 2.0, 2.0), mode="nearest", truncate=4.0)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-10)


# ------------------------------------------------------------------ controls


def test_random_control(cnn, resnet, x):
    a = explain(cnn, x, TARGETS, method="random")
    b = explain(resnet, x, torch.tensor([0, 1]), method="random")
    assert a.shape == x.shape
    assert torch.equal(a, b)  # model- and target-independent
    assert torch.equal(a, explain(cnn, x, TARGETS, method="random"))  # deterministic
    assert not torch.allclose(a[0], a[1])  # different images, different noise
    assert torch.equal(explain(cnn, x[1:], TARGETS[1:], method="random"), a[1:])  # batch-independent
    x2 = x.clone()
    x2[0, 0, 0, 0] += 1e-3
    assert not torch.allclose(explain(cnn, x2, TARGETS, method="random")[0], a[0])
    assert abs(a.mean().item()) < 0.1 and abs(a.std().item() - 1) < 0.1


def test_edge_control(cnn, resnet, x):
    from scipy.ndimage import sobel

    a = explain(cnn, x, TARGETS, method="edge")
    assert a.shape == (2, 1, 32, 32)
    assert torch.equal(a, explain(resnet, x, torch.tensor([0, 1]), method="edge"))
    arr = x.double().numpy()
    ref = np.zeros((2, 1, 32, 32))
    for i in range(2):
        for c in range(3):
            ref[i, 0] += np.hypot(sobel(arr[i, c], axis=0), sobel(arr[i, c], axis=1))
    assert np.abs(a.double().numpy() - ref).max() <= TOL * (ref.max() - ref.min())


# ------------------------------------------------------------------ registry and hygiene


def test_registry_lists_methods_with_params():
    names = method_names()
    for name in MINE:
        assert name in names
    m = get_method("integrated_gradients")
    assert m.params == {
        "steps": 32,
        "baseline": "black",
        "n_baselines": 1,
        "integration": "riemann_trapezoid",
        "blur_sigma": 5.0,
        "seed": 0,
        "internal_batch": None,
    }
    assert get_method("smoothgrad").params == {
        "samples": 16,
        "noise": 0.15,
        "seed": 0,
        "internal_batch": None,
    }
    assert get_method("occlusion").params["patch"] == 8 and get_method("occlusion").params["stride"] == 4
    assert get_method("gradient").params == {} and get_method("random").params == {}
    for name in MINE:
        meth = get_method(name)
        assert not meth.needs_internals
        assert meth.reference and meth.summary and len(meth.fn.__doc__.splitlines()) <= 40
    assert get_method("random").family == "control" and get_method("edge").family == "control"
    assert get_method("occlusion").family == "perturbation"


@pytest.mark.parametrize("name", MINE)
def test_explain_shape_device_and_model_untouched(resnet, x, name):
    lm = wrap_module(resnet, input_size=32, num_classes=10)
    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    flags = {k: p.requires_grad for k, p in resnet.named_parameters()}
    resnet.layer1[0].conv1.weight.requires_grad_(False)  # a mixed state must survive too
    flags["layer1.0.conv1.weight"] = False
    fast = {
        "integrated_gradients": {"steps": 4},
        "smoothgrad": {"samples": 2},
        "smoothgrad_sq": {"samples": 2},
        "occlusion": {"patch": 16, "stride": 16},
    }.get(name, {})
    try:
        for model in (resnet, lm):
            out = explain(model, x, [3, 7], method=name, **fast)
            assert out.shape == (2, 1 if name == "edge" else 3, 32, 32)
            assert out.device == x.device and out.dtype == x.dtype
            assert torch.isfinite(out).all()
            assert not out.requires_grad
        for k, v in resnet.state_dict().items():
            assert torch.equal(v, state[k]), k
        assert {k: p.requires_grad for k, p in resnet.named_parameters()} == flags
        assert all(p.grad is None for p in resnet.parameters())
        assert not resnet.training
    finally:
        resnet.layer1[0].conv1.weight.requires_grad_(True)


@pytest.mark.parametrize(
    "name,params",
    [
        ("gradient", {"steps": 3}),
        ("integrated_gradients", {"method": "x"}),
        ("occlusion", {"size": 3}),
        ("random", {"seed": 1}),
    ],
)
def test_unknown_parameter_is_usage_error(cnn, x, name, params):
    with pytest.raises(UsageError):
        explain(cnn, x, TARGETS, method=name, **params) if "method" not in params else get_method(name)(
            cnn, x, TARGETS, **params
        )


@pytest.mark.parametrize(
    "name,params",
    [
        ("integrated_gradients", {"baseline": "white"}),
        ("integrated_gradients", {"steps": 1}),
        ("integrated_gradients", {"integration": "simpson"}),
        ("smoothgrad", {"samples": 0}),
        ("occlusion", {"patch": 64}),
        ("occlusion", {"patch": 4, "stride": 5}),
        ("occlusion", {"baseline": "uniform-noise"}),
    ],
)
def test_bad_parameter_values_are_usage_errors(cnn, x, name, params):
    with pytest.raises(UsageError):
        explain(cnn, x, TARGETS, method=name, **params)


def test_training_mode_model_is_not_switched(x):
    m = small_cnn()
    m.train()
    explain(m, x, TARGETS, method="integrated_gradients", steps=4)
    explain(m, x, TARGETS, method="occlusion", patch=16, stride=16)
    assert m.training


def test_static_batch_models_and_float64(cnn, x):
    lm = wrap_module(cnn, input_size=32, num_classes=10)
    ref = {
        name: explain(lm, x, TARGETS, method=name, **kw)
        for name, kw in (
            ("integrated_gradients", {"steps": 4}),
            ("smoothgrad", {"samples": 3}),
            ("occlusion", {"patch": 8, "stride": 8}),
        )
    }
    lm.static_batch = 3  # a .pt2 exported with a static batch: chunks padded to 3 rows
    for name, kw in (
        ("integrated_gradients", {"steps": 4}),
        ("smoothgrad", {"samples": 3}),
        ("occlusion", {"patch": 8, "stride": 8}),
    ):
        assert rel_err(explain(lm, x, TARGETS, method=name, internal_batch=5, **kw), ref[name]) <= TOL
    m64 = small_cnn().double()
    x64 = x.double()
    for name in MINE:
        out = explain(m64, x64, TARGETS, method=name)
        assert out.dtype == torch.float64
