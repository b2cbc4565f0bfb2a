"""Gradient-based comparison methods: gradient, grad×input, integrated gradients, SmoothGrad.

All of them only need ``x -> logits`` and autograd (``needs_internals=False``), so they also run
on TorchScript models. Every method works batched on ``x``'s device: the perturbed / scaled
copies of the images are sent through the model in chunks of ``internal_batch`` rows, and the
weighted gradients are accumulated on the device (no numpy round trip). The model is never
modified: gradients are taken with :func:`torch.autograd.grad` with respect to the input only.

Baselines come from :mod:`saliaudit.methods.baselines` (re-exported here). Integrated
gradients sums to ``f(x) − f(x')`` only up to its quadrature error (on the sample shapes model
with 32 steps: median 2 % of the delta, up to 5 %); gradient × input sums to ``f(x) − f(0)`` only
for bias-free piecewise-linear networks. The audit measures this summation-to-delta for every
method with a ``reference_input`` and reports it per image (``attribution_completeness``,
informational); :func:`integrated_gradients_delta` computes it for one attribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import validate
from ..cost import Passes, rows_per_pass
from ..errors import UsageError
from . import register
from .baselines import BASELINES, black_value, gaussian_blur, generator, make_baselines
from .common import as_targets, forward_fn, input_gradient, picked

__all__ = [
    "BASELINES",
    "IG_METHODS",
    "IGDelta",
    "black_value",
    "gaussian_blur",
    "grad_x_input",
    "gradient",
    "integrated_gradients",
    "integrated_gradients_delta",
    "make_baselines",
    "quadrature",
    "smoothgrad",
    "smoothgrad_noise",
    "smoothgrad_sq",
]

#: Quadrature rules of integrated gradients (Captum's names and conventions).
IG_METHODS = ("riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle", "gausslegendre")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def quadrature(steps: int, method: str = "riemann_trapezoid") -> tuple[list[float], list[float]]:
    """``(step_sizes, alphas)`` of an IG quadrature rule; the weights sum to 1.

    ``riemann_left/right/middle``: ``steps`` sizes ``1/steps`` at Captum's nodes.
    ``riemann_trapezoid``: nodes ``torch.linspace(0, 1, steps)`` (Captum's), weights
    ``1/(steps−1)`` with the two end weights halved — the trapezoid rule. Documented
    difference: Captum 0.9 uses ``1/steps`` there (its weights sum to ``1 − 1/steps``), so its
    trapezoid attribution is exactly ours × ``(steps−1)/steps``, and its completeness error
    does not vanish for a linear model. ``gausslegendre``: Gauss–Legendre nodes and weights on
    [0, 1] (Golub–Welsch in float64; Captum's, which come from numpy's ``leggauss``).
    """
    if method not in IG_METHODS:
        raise UsageError(
            f"unknown integration method {method!r}", hint="choose from " + ", ".join(IG_METHODS)
        )
    n = validate.integer("steps", steps, min=1 if method == "gausslegendre" else 2)
    if method == "gausslegendre":
        k = torch.arange(1, n, dtype=torch.float64)
        off = k / torch.sqrt(4 * k * k - 1)
        jac = torch.diag(off, 1) + torch.diag(off, -1)
        nodes, vecs = torch.linalg.eigh(jac)
        weights = 2 * vecs[0] ** 2
        return (0.5 * weights).tolist(), (0.5 * (1 + nodes)).tolist()
    sizes = [1.0 / n] * n
    if method == "riemann_trapezoid":
        sizes = [1.0 / (n - 1)] * n  # node spacing 1/(n-1); Captum uses 1/n (weights sum to 1 - 1/n)
        sizes[0] /= 2
        sizes[-1] /= 2
        alphas = torch.linspace(0, 1, n).tolist()
    elif method == "riemann_left":
        alphas = torch.linspace(0, 1 - 1 / n, n).tolist()
    elif method == "riemann_middle":
        alphas = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n).tolist()
    else:
        alphas = torch.linspace(1 / n, 1, n).tolist()
    return sizes, alphas


def _chunked_gradients(
    forward: Callable[[torch.Tensor], torch.Tensor],
    total: int,
    internal_batch: int,
    rows: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    consume: Callable[[torch.Tensor, torch.Tensor], None],
    device: torch.device,
) -> None:
    """For flat row indices ``0..total-1`` in chunks: ``inputs, targets = rows(idx)``, then
    ``consume(idx, ∂f_target/∂inputs)``. One forward+backward per chunk."""
    for start in range(0, total, internal_batch):
        idx = torch.arange(start, min(start + internal_batch, total), device=device)
        inputs, tgt = rows(idx)
        xi = inputs.detach().requires_grad_(True)
        with torch.enable_grad():
            score = picked(forward(xi), tgt)
            (grad,) = torch.autograd.grad(score.sum(), [xi])
        consume(idx, grad.detach())


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------


@register(
    "gradient",
    family="gradient",
    reference="Simonyan, Vedaldi & Zisserman 2013, arXiv:1312.6034",
    summary="plain input gradient ∂f_c/∂x (vanilla saliency, signed)",
)
def gradient(model: Any, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Plain input gradient ("vanilla saliency"), signed.

    Definition: ``A = ∂f_c(x)/∂x`` where ``f_c`` is the target logit (pre-softmax).
    Simonyan et al. take ``max_c |A|``; here the signed gradient is returned and the declared
    post-processing (``signed`` / ``abs``) reduces channels. Equals Captum's
    ``Saliency(abs=False)``.

    Parameters: none.
    Returns: ``(B, C, H, W)`` on ``x``'s device, one forward and one backward pass.
    Paper: Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks", 2013.
    """
    targets = as_targets(targets, x)
    grad, _ = input_gradient(model, x, targets)
    return grad


def zero_reference(model: Any, x: torch.Tensor, **_: Any) -> torch.Tensor:
    """The all-zero input in model space, ``(1, B, C, H, W)``: the reference of
    gradient × input and ε-LRP (whose attributions sum to ``f(x) − f(0)`` only for
    bias-free piecewise-linear networks: the delta measures what the biases hold)."""
    return torch.zeros_like(x).unsqueeze(0)


def ig_reference(
    model: Any,
    x: torch.Tensor,
    *,
    baseline: str = "black",
    n_baselines: int = 1,
    blur_sigma: float = 5.0,
    seed: int = 0,
    **_: Any,
) -> torch.Tensor:
    """The baselines integrated gradients integrates from, ``(K, B, C, H, W)``."""
    return make_baselines(model, x, baseline, n=n_baselines, blur_sigma=blur_sigma, seed=seed)


@register(
    "grad_x_input",
    family="gradient",
    reference="Shrikumar et al. 2016, arXiv:1605.01713",
    summary="gradient × input (equals ε-LRP on ReLU nets)",
    reference_input=zero_reference,
)
def grad_x_input(model: Any, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Gradient × input, signed.

    Definition: ``A = x ⊙ ∂f_c(x)/∂x``. On networks of ReLUs (and max-pooling) with the
    ε-rule's ε → 0 it equals ε-LRP (Ancona et al. 2018, Prop. 3); on a linear model it equals
    integrated gradients, DeepLIFT and occlusion-1 with a zero baseline (Prop. 4). Equals
    Captum's ``InputXGradient``.

    Parameters: none.
    Returns: ``(B, C, H, W)`` on ``x``'s device, one forward and one backward pass.
    Paper: Shrikumar, Greenside, Shcherbina & Kundaje, "Not Just a Black Box", 2016.
    """
    targets = as_targets(targets, x)
    grad, _ = input_gradient(model, x, targets)
    return grad * x.detach()


def _ig(
    model: Any,
    x: torch.Tensor,
    targets: torch.Tensor,
    bases: torch.Tensor,
    steps: int,
    method: str,
    internal_batch: int,
) -> torch.Tensor:
    """IG averaged over baselines ``bases`` (K, B, C, H, W)."""
    sizes, alphas = quadrature(steps, method)
    internal_batch = validate.integer("internal_batch", rows_per_pass(internal_batch), min=1)
    forward = forward_fn(model)
    x = x.detach()
    k, b = bases.shape[0], x.shape[0]
    n = len(alphas)
    alpha_t = torch.tensor(alphas, dtype=torch.float32).to(dtype=x.dtype, device=x.device)
    size_t = torch.tensor(sizes).float().to(dtype=x.dtype, device=x.device)
    total = torch.zeros_like(bases)  # Σ_s w_s ∇f(b + α_s (x − b)), per baseline and image
    flat_total = total.view(k * b, *x.shape[1:])
    # flat row r -> (baseline kk, step s, image i), image fastest (Captum's layout)
    per_k = n * b

    def rows(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kk, rem = idx // per_k, idx % per_k
        s, i = rem // b, rem % b
        base = bases[kk, i]
        a = alpha_t[s].view(-1, 1, 1, 1)
        return base + a * (x[i] - base), targets[i]

    def consume(idx: torch.Tensor, grad: torch.Tensor) -> None:
        kk, rem = idx // per_k, idx % per_k
        s, i = rem // b, rem % b
        flat_total.index_add_(0, kk * b + i, grad * size_t[s].view(-1, 1, 1, 1))

    _chunked_gradients(forward, k * per_k, internal_batch, rows, consume, x.device)
    return (total * (x.unsqueeze(0) - bases)).mean(0)


@register(
    "integrated_gradients",
    family="gradient",
    reference="Sundararajan, Taly & Yan 2017, ICML",
    summary="integrated gradients from a baseline (black/mean/blur/uniform-noise), optionally averaged",
    reference_input=ig_reference,
    cost=lambda p, _size: Passes(backward=int(p["steps"]) * int(p["n_baselines"])),
)
def integrated_gradients(
    model: Any,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int = 32,
    baseline: str = "black",
    n_baselines: int = 1,
    integration: str = "riemann_trapezoid",
    blur_sigma: float = 5.0,
    seed: int = 0,
    internal_batch: int | None = None,
) -> torch.Tensor:
    """Integrated gradients, signed, optionally averaged over several sampled baselines.

    Definition: ``A = (x − x') ⊙ ∫₀¹ ∂f_c(x' + α(x − x'))/∂x dα``, the integral by the
    quadrature rule ``integration`` with ``steps`` nodes (Captum's conventions, see
    :func:`quadrature`). With ``n_baselines = K > 1`` the K attributions from baselines
    ``x'_1..x'_K`` (see :func:`make_baselines`) are averaged; completeness then reads
    ``Σ A ≈ f(x) − mean_k f(x'_k)``, reported by :func:`integrated_gradients_delta`.

    Parameters:
        steps=32: quadrature nodes (≥ 2 for Riemann rules).
        baseline="black": ``black`` (the preprocessed black image: ``(0 − mean)/std`` for a
            LoadedModel, else zeros), ``mean`` (per-image channel mean), ``blur`` (gaussian
            blur, σ = ``blur_sigma``; σ_k ~ U(0, blur_sigma) when sampled) or ``uniform-noise``.
        n_baselines=1: number of baselines averaged over (sensible for uniform-noise and blur).
        integration="riemann_trapezoid": or ``riemann_left/right/middle``, ``gausslegendre``
            (Captum's ``method``, renamed: ``explain(..., method=...)`` names the method;
            our trapezoid weights sum to 1, Captum's to ``1 − 1/steps``, see :func:`quadrature`).
        blur_sigma=5.0, seed=0: blur width; seed of the sampled baselines.
        internal_batch=None: rows per forward+backward pass (default: the audit's batch size).
    Returns: ``(B, C, H, W)`` on ``x``'s device; cost ``steps × n_baselines`` gradient rows per image.
    Paper: Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017.
    """
    targets = as_targets(targets, x)
    bases = make_baselines(model, x, baseline, n=n_baselines, blur_sigma=blur_sigma, seed=seed)
    return _ig(model, x, targets, bases, steps, integration, internal_batch)


@dataclass(frozen=True)
class IGDelta:
    """Completeness of integrated gradients, per image (all ``(B,)`` tensors).

    ``total = Σ A``, ``expected = f(x) − mean_k f(x'_k)``, ``delta = total − expected`` (Captum's
    convergence delta), ``relative = |delta| / max(|expected|, 1e-6)``.
    """

    total: torch.Tensor
    expected: torch.Tensor
    delta: torch.Tensor
    relative: torch.Tensor

    @property
    def error(self) -> torch.Tensor:
        """The reported convergence error ``|delta|``."""
        return self.delta.abs()


def integrated_gradients_delta(
    model: Any, x: torch.Tensor, targets: Any, attribution: torch.Tensor, baseline_tensor: torch.Tensor
) -> IGDelta:
    """Completeness check of an IG ``attribution``: compare ``Σ A`` with ``f(x) − f(x')``.

    ``baseline_tensor`` is ``(B, C, H, W)`` or ``(K, B, C, H, W)`` (the K averaged baselines,
    as from :func:`make_baselines`); computed in ``x``'s dtype with two forward passes.
    """
    targets = as_targets(targets, x)
    forward = forward_fn(model)
    bases = baseline_tensor if baseline_tensor.dim() == 5 else baseline_tensor.unsqueeze(0)
    k, b = bases.shape[:2]
    with torch.no_grad():
        fx = picked(forward(x.detach()), targets)
        fb = picked(forward(bases.reshape(k * b, *x.shape[1:])), targets.repeat(k)).view(k, b).mean(0)
    total = attribution.detach().reshape(b, -1).sum(1).to(fx.dtype)
    expected = fx - fb
    delta = total - expected
    return IGDelta(total, expected, delta, delta.abs() / expected.abs().clamp_min(1e-6))


def smoothgrad_noise(x: torch.Tensor, samples: int, noise: float, seed: int) -> torch.Tensor:
    """The SmoothGrad perturbations ``(samples, B, C, H, W)``.

    ``ε_s = σ_i · z_s`` with ``z = torch.randn((samples, C, H, W), generator=Generator(x.device)
    .manual_seed(seed))`` shared by the images of the batch and ``σ_i = noise · (max x_i − min x_i)``.
    """
    samples = validate.integer("samples", samples, min=1)
    noise = validate.number("noise", noise, min=0)
    gen = generator(x.device, seed)
    _, c, h, w = x.shape
    z = torch.randn((samples, 1, c, h, w), generator=gen, device=x.device, dtype=x.dtype)
    flat = x.detach().reshape(x.shape[0], -1)
    sigma = noise * (flat.amax(1) - flat.amin(1))
    return z * sigma.view(1, -1, 1, 1, 1)


def _smooth(
    model: Any,
    x: torch.Tensor,
    targets: torch.Tensor,
    samples: int,
    noise: float,
    seed: int,
    internal_batch: int,
    square: bool,
) -> torch.Tensor:
    targets = as_targets(targets, x)
    internal_batch = validate.integer("internal_batch", rows_per_pass(internal_batch), min=1)
    eps = smoothgrad_noise(x, samples, noise, seed)
    x = x.detach()
    b = x.shape[0]
    forward = forward_fn(model)
    acc = torch.zeros_like(x)

    def rows(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, i = idx // b, idx % b
        return x[i] + eps[s, i], targets[i]

    def consume(idx: torch.Tensor, grad: torch.Tensor) -> None:
        acc.index_add_(0, idx % b, grad * grad if square else grad)

    _chunked_gradients(forward, samples * b, internal_batch, rows, consume, x.device)
    return acc / samples


@register(
    "smoothgrad",
    family="gradient",
    reference="Smilkov et al. 2017, arXiv:1706.03825",
    summary="mean input gradient over gaussian-noised copies of the image",
    cost=lambda p, _size: Passes(backward=int(p["samples"])),
)
def smoothgrad(
    model: Any,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    samples: int = 16,
    noise: float = 0.15,
    seed: int = 0,
    internal_batch: int | None = None,
) -> torch.Tensor:
    """SmoothGrad: the input gradient averaged over noisy copies, signed.

    Definition: ``A = (1/n) Σ_s ∂f_c(x + ε_s)/∂x`` with ``ε_s ~ N(0, σ²)``,
    ``σ = noise · (max x − min x)`` per image (the paper's noise level as a fraction of the
    input range). The noise is drawn from ``seed`` on ``x``'s device, see
    :func:`smoothgrad_noise` (unit noise shared by the images of a batch).

    Parameters:
        samples=16: number of noisy copies n.
        noise=0.15: σ as a fraction of each image's value range.
        seed=0: noise seed.  internal_batch=None: rows per forward+backward pass (default: the audit's batch size).
    Returns: ``(B, C, H, W)`` on ``x``'s device; ``samples`` gradient rows per image.
    Paper: Smilkov, Thorat, Kim, Viégas & Wattenberg, "SmoothGrad: removing noise by adding noise", 2017.
    """
    return _smooth(model, x, targets, samples, noise, seed, internal_batch, square=False)


@register(
    "smoothgrad_sq",
    family="gradient",
    reference="Hooker et al. 2019, NeurIPS (ROAR)",
    summary="mean squared input gradient over gaussian-noised copies (SmoothGrad-Squared)",
    cost=lambda p, _size: Passes(backward=int(p["samples"])),
)
def smoothgrad_sq(
    model: Any,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    samples: int = 16,
    noise: float = 0.15,
    seed: int = 0,
    internal_batch: int | None = None,
) -> torch.Tensor:
    """SmoothGrad-Squared: the mean of squared gradients over noisy copies (≥ 0).

    Definition: ``A = (1/n) Σ_s (∂f_c(x + ε_s)/∂x)²`` with the same noise as
    :func:`smoothgrad` (same ``samples``, ``noise``, ``seed`` give the same ε_s). Non-negative
    by construction, so its ``signed`` and ``abs`` post-processings coincide.

    Parameters:
        samples=16: number of noisy copies.
        noise=0.15: σ as a fraction of each image's value range.
        seed=0: noise seed.  internal_batch=None: rows per forward+backward pass (default: the audit's batch size).
    Returns: ``(B, C, H, W)`` on ``x``'s device.
    Paper: Hooker, Erhan, Kindermans & Kim, "A Benchmark for Interpretability Methods in Deep
    Neural Networks", NeurIPS 2019 (SG-SQ); noise model of Smilkov et al. 2017.
    """
    return _smooth(model, x, targets, samples, noise, seed, internal_batch, square=True)
