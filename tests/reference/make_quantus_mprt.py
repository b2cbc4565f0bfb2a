"""Writes ``quantus_mprt.json``: real Quantus' sMPRT and eMPRT numbers on a tiny deterministic
model, for tests/test_check_mprt_variants.py. Not run by the tests (Quantus is not a dependency).

Run from the repository root with Quantus installed in a scratch directory (never in the main
environment: it requires ``opencv-python``, which clashes with ``opencv-python-headless``)::

    pip install --no-deps --target /tmp/qpkg quantus==0.6.0
    # quantus/evaluation.py imports pandas only to return DataFrames; a stub suffices
    mkdir -p /tmp/qstub/pandas && echo 'def __getattr__(n): raise ImportError(n)' > /tmp/qstub/pandas/__init__.py
    PYTHONPATH=/tmp/qpkg:/tmp/qstub:. python tests/reference/make_quantus_mprt.py

What it stores: the model's trained and fully randomized weights (Quantus' own top-down
randomization, seed 42), the inputs and targets, sMPRT's unit noise (Quantus draws it with the
unseeded ``np.random.randn``; here that function is replaced, during the call only, by one that
returns saliaudit's draws for these images, so both sides denoise with the same noise), and the
scores: ``SmoothMPRT`` per layer, ``EfficientMPRT``'s relative rise and
``scores_fraction_explanation`` (the entropy ratio). It also checks that the re-implementation
in ``quantus_mprt.py`` reproduces them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from saliaudit.checks.mprt_variants import noise_seed  # noqa: E402
from tests.reference.quantus_mprt import (  # noqa: E402
    STORED,
    TinyNet,
    emprt_scores,
    encode,
    random_layer_models,
    smprt_scores,
)

SEED = 0  # the audit seed of saliaudit's sMPRT noise
QUANTUS_SEED = 42  # Quantus' layer-randomization seed (its default)
SAMPLES = 5  # sMPRT nr_samples: 4 noisy copies and the noise-free one
NOISE = 0.1  # Quantus' default noise_magnitude
IMAGES = [f"img{i}.png" for i in range(4)]


def unit_noise(shape: tuple[int, ...]) -> np.ndarray:
    """saliaudit's sMPRT unit noise ``(N − 1, B, C, H, W)``: image i's s-th draw is the s-th
    ``torch.randn((C, H, W))`` of a CPU generator seeded by ``noise_seed(SEED, image)``."""
    gens = [torch.Generator().manual_seed(noise_seed(SEED, name)) for name in IMAGES]
    draws = [
        torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in gens])
        for _ in range(SAMPLES - 1)
    ]
    return torch.stack(draws).numpy()


def main() -> None:
    import quantus

    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(len(IMAGES), 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    x_np, y_np = x.numpy(), y.numpy()
    z = unit_noise(tuple(x.shape))

    calls = {"n": 0}
    real_randn = np.random.randn

    def injected_randn(*shape: int) -> np.ndarray:
        draw = z[calls["n"] % (SAMPLES - 1)]
        assert tuple(shape) == draw.shape, (shape, draw.shape)
        calls["n"] += 1
        return draw.astype(np.float64)

    smprt = quantus.SmoothMPRT(
        layer_order="top_down",
        seed=QUANTUS_SEED,
        nr_samples=SAMPLES,
        noise_magnitude=NOISE,
        disable_warnings=True,
        display_progressbar=False,
    )
    np.random.randn = injected_randn
    try:
        s_scores = smprt(
            model=model,
            x_batch=x_np,
            y_batch=y_np,
            a_batch=None,
            explain_func=quantus.explain,
            explain_func_kwargs={"method": "Gradient"},
            device="cpu",
            batch_size=64,
        )
    finally:
        np.random.randn = real_randn
    # a_batch, the original model and three layers: 5 denoised batches of N − 1 draws each
    assert calls["n"] == 5 * (SAMPLES - 1), calls

    emprt = quantus.EfficientMPRT(
        layer_order="top_down",
        seed=QUANTUS_SEED,
        compute_extra_scores=True,
        disable_warnings=True,
        display_progressbar=False,
    )
    e_scores = emprt(
        model=model,
        x_batch=x_np,
        y_batch=y_np,
        a_batch=None,
        explain_func=quantus.explain,
        explain_func_kwargs={"method": "Gradient"},
        device="cpu",
        batch_size=64,
    )  # softmax (its default) only for the model-output entropies; maps are of the logits

    randomized = None
    order = []
    for name, m in random_layer_models(model, QUANTUS_SEED):
        order.append(name)
        randomized = m
    assert randomized is not None

    doc = {
        "about": (
            "Real Quantus numbers for saliaudit's sMPRT/eMPRT tests; written by "
            "tests/reference/make_quantus_mprt.py (see its docstring)."
        ),
        "versions": {
            "quantus": quantus.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "images": IMAGES,
        "audit_seed": SEED,
        "quantus_seed": QUANTUS_SEED,
        "x": encode(x_np),
        "targets": [int(t) for t in y_np],
        "weights": {k: encode(v.detach().numpy()) for k, v in model.state_dict().items()},
        "randomized": {k: encode(v.detach().numpy()) for k, v in randomized.state_dict().items()},
        "layer_order": order,
        "smprt": {
            "nr_samples": SAMPLES,
            "noise_magnitude": NOISE,
            "unit_noise": encode(z),
            "call": "SmoothMPRT(layer_order='top_down', seed=42, nr_samples=5, noise_magnitude=0.1); "
            "explain_func=quantus.explain, method='Gradient'",
            "scores": {k: [float(v) for v in vals] for k, vals in s_scores.items()},
        },
        "emprt": {
            "n_bins": 100,
            "call": "EfficientMPRT(layer_order='top_down', seed=42, compute_extra_scores=True); "
            "explain_func=quantus.explain, method='Gradient'",
            "scores": [float(v) for v in e_scores],
            "fraction": [float(v) for v in emprt.scores_extra["scores_fraction_explanation"]],
        },
    }

    # the re-implementation must give the same numbers
    ref_s = smprt_scores(model, x_np, y_np, z, QUANTUS_SEED, NOISE)
    ref_e = emprt_scores(model, x_np, y_np, QUANTUS_SEED)
    for k, vals in doc["smprt"]["scores"].items():
        np.testing.assert_allclose(ref_s[k], vals, atol=1e-6)
    np.testing.assert_allclose(ref_e["scores"], doc["emprt"]["scores"], atol=1e-6)
    np.testing.assert_allclose(ref_e["fraction"], doc["emprt"]["fraction"], atol=1e-6)

    STORED.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({"smprt": doc["smprt"]["scores"], "emprt": doc["emprt"]}, indent=1)[:2000])


if __name__ == "__main__":
    main()
