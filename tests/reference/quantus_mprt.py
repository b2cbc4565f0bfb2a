"""A slow, faithful re-implementation of Quantus' sMPRT and eMPRT formulas, to test saliaudit's
randomization check against (tests/test_check_mprt_variants.py); plus the tiny model and the
stored numbers of real Quantus (``quantus_mprt.json``, written by ``make_quantus_mprt.py``).

Quantus cannot be a dependency (it requires ``opencv-python``, which clashes with
``opencv-python-headless``), so each formula is written out here with plain loops, NumPy,
SciPy and Captum, with the file and lines of Quantus 0.6.0 (the ``quantus-0.6.0`` wheel,
https://github.com/understandable-machine-intelligence-lab/Quantus) it mirrors:

* ``quantus/metrics/randomisation/smooth_mprt.py`` — ``SmoothMPRT`` (Hedström et al. 2023).
* ``quantus/metrics/randomisation/efficient_mprt.py`` — ``EfficientMPRT``.
* ``quantus/functions/{explanation_func,similarity_func,normalise_func,complexity_func}.py``
  and ``quantus/helpers/model/pytorch_model.py`` — the helpers they call.

The one input that is not a formula is sMPRT's noise: Quantus draws it with the unseeded
``np.random.randn`` (smooth_mprt.py l. 646), so both sides are given the same unit draws ``z``.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
from torch import nn

STORED = Path(__file__).with_name("quantus_mprt.json")


class TinyNet(nn.Module):
    """The reference model: two convolutions and a linear layer (three randomization steps,
    ``fc``, ``conv2``, ``conv1`` from the output), 3×16×16 inputs, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(h), 1))


# --------------------------------------------------------------------------- explanations
def quantus_gradient(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``quantus.explain(model, x, y, method="Gradient")`` with Captum: explanation_func.py
    l. 509-518 (eval mode, ``torch.Tensor(inputs)`` in float32, requires grad), l. 597-602
    (``Saliency(model).attribute(inputs, target, abs=False)``), l. 528-542 (sum over the
    channel axis 1, keepdims) and l. 714-718 (to NumPy): ``(B, 1, H, W)`` float32."""
    from captum.attr import Saliency

    model.eval()
    inputs = torch.Tensor(x)
    inputs.requires_grad_()
    targets = torch.as_tensor(y)
    a = Saliency(model).attribute(inputs=inputs, target=targets, abs=False).sum(axis=(1,), keepdims=True)
    return a.cpu().detach().numpy()


def random_layer_models(model: nn.Module, seed: int = 42) -> Iterator[tuple[str, nn.Module]]:
    """``PyTorchModel.get_random_layer_generator(order="top_down", seed)``, pytorch_model.py
    l. 319-332: one deep copy; the modules with ``reset_parameters`` in reverse
    ``named_modules`` order, each reset after ``torch.manual_seed(seed + 1)`` and kept
    (cascading)."""
    random_layer_model = copy.deepcopy(model)
    modules = [m for m in random_layer_model.named_modules() if hasattr(m[1], "reset_parameters")]
    for name, module in modules[::-1]:
        torch.manual_seed(seed + 1)
        module.reset_parameters()
        yield name, random_layer_model


# --------------------------------------------------------------------------- sMPRT
def normalise_by_average_second_moment_estimate(a: np.ndarray) -> np.ndarray:
    """normalise_func.py l. 222-250: ``a / sqrt(mean(a²))`` over *all* axes (the whole batch);
    unchanged when ``a`` is all zeros or the moment is 0."""
    if np.all(a == 0.0):
        return a
    axes = tuple(range(np.ndim(a)))
    second = np.sqrt(np.sum(a**2, axis=axes, keepdims=True) / np.prod([a.shape[n] for n in axes]))
    if np.all(second != 0):
        a = a / second
    return a


def smooth_explanation(
    model: nn.Module, x: np.ndarray, y: np.ndarray, z: np.ndarray, noise_magnitude: float = 0.1
) -> np.ndarray:
    """``SmoothMPRT.explain_smooth_batch`` with ``normalise = abs = True`` (its defaults):
    smooth_mprt.py l. 585-586 (``std = noise_magnitude · (max − min)`` per image over every
    non-batch axis), l. 639-653 (N explanations of ``x + ε_s`` with ``ε_s = z_s · std`` for
    s < N − 1 and ``ε_{N−1} = 0``, each divided by N and summed in the explanation's float32),
    l. 595-599 (normalise, then abs). ``z``: the unit draws ``(N − 1, *x.shape)``."""
    nr_samples = len(z) + 1
    dims = tuple(range(1, x.ndim))
    std = noise_magnitude * (x.max(axis=dims, keepdims=True) - x.min(axis=dims, keepdims=True))
    smooth = None
    for n in range(nr_samples):
        epsilon = np.zeros_like(x) if n == nr_samples - 1 else np.asarray(z[n], dtype=np.float64) * std
        a = quantus_gradient(model, x + epsilon, y)
        smooth = a / nr_samples if smooth is None else smooth + a / nr_samples
    return np.abs(normalise_by_average_second_moment_estimate(smooth))


def correlation_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """similarity_func.py l. 38-48 (``batched=True``): the diagonal of
    ``scipy.stats.spearmanr(a, b, axis=1)`` between the rows of ``a`` and of ``b``."""
    corr = scipy.stats.spearmanr(a, b, axis=1)[0]
    if not np.shape(corr):
        return np.array([corr])
    return np.diag(corr[: len(a), len(a) :])


def smprt_scores(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    seed: int = 42,
    noise_magnitude: float = 0.1,
) -> dict[str, list[float]]:
    """``SmoothMPRT(layer_order="top_down")(...)`` as a dict ``{"original": ..., layer: ...}``
    of per-image similarities: smooth_mprt.py l. 349-399 (the denoised map of the trained
    model compared with itself, then with the denoised map after each cascade step, each
    flattened per image). ``return_last_correlation`` (l. 443-456) is the last layer's list;
    ``return_average_correlation`` (l. 420-441) would also average in "original" (it skips a
    key named "orig"), which the check does not mirror."""
    a_batch = smooth_explanation(model, x, y, z, noise_magnitude)
    flat = a_batch.reshape(len(a_batch), -1)
    scores = {"original": correlation_spearman(flat, flat).tolist()}
    for name, random_model in random_layer_models(model, seed):
        perturbed = smooth_explanation(random_model, x, y, z, noise_magnitude)
        scores[name] = correlation_spearman(flat, perturbed.reshape(len(perturbed), -1)).tolist()
    return scores


# --------------------------------------------------------------------------- eMPRT
def discrete_entropy(a: np.ndarray, n_bins: int = 100) -> float:
    """complexity_func.py l. 100-104: ``scipy.stats.entropy`` of ``np.histogram(a, n_bins)``'s
    counts. ``EfficientMPRT``'s default ``n_bins`` is 100: no ``rule`` in
    ``complexity_func_kwargs`` leaves ``find_n_bins`` at ``n_bins_default`` (efficient_mprt.py
    l. 344-357, 726-739)."""
    histogram, _ = np.histogram(a, bins=n_bins)
    return float(scipy.stats.entropy(pk=histogram))


def emprt_scores(
    model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int = 42, n_bins: int = 100
) -> dict[str, list[float]]:
    """``EfficientMPRT(layer_order="top_down")`` (``skip_layers = True``, ``abs = normalise =
    False``, efficient_mprt.py l. 88-93): the entropy of each raw explanation on the trained
    model (l. 368-390) and on the fully randomized model (l. 399-422, only the last layer);
    ``scores`` the relative rise ``(b − a) / a`` (l. 442-444), ``fraction`` ``b / a``
    (``scores_fraction_explanation``, l. 455-459)."""
    before = [discrete_entropy(a, n_bins) for a in quantus_gradient(model, x, y)]
    last = None
    for _, random_model in random_layer_models(model, seed):
        last = random_model
    assert last is not None
    after = [discrete_entropy(a, n_bins) for a in quantus_gradient(last, x, y)]
    return {
        "entropy_before": before,
        "entropy_after": after,
        "scores": [(b - a) / a for a, b in zip(before, after)],
        "fraction": [b / a if a != 0 else float("nan") for a, b in zip(before, after)],
    }


# --------------------------------------------------------------------------- stored numbers
def encode(a: Any) -> dict[str, Any]:
    """A float32 array as JSON: shape and little-endian base64 bytes (exact)."""
    arr = np.ascontiguousarray(np.asarray(a, dtype="<f4"))
    return {"shape": list(arr.shape), "f4": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode(d: dict[str, Any]) -> np.ndarray:
    """The array :func:`encode` stored."""
    return np.frombuffer(base64.b64decode(d["f4"]), dtype="<f4").reshape(d["shape"]).copy()


def load_stored() -> dict[str, Any]:
    """``quantus_mprt.json``: inputs, weights, noise and real Quantus' numbers."""
    return json.loads(STORED.read_text(encoding="utf-8"))


def stored_model(doc: dict[str, Any], key: str = "weights") -> TinyNet:
    """The tiny model with the stored trained (``weights``) or fully randomized
    (``randomized``) parameters."""
    model = TinyNet()
    model.load_state_dict({k: torch.from_numpy(decode(v)) for k, v in doc[key].items()})
    return model.eval()
