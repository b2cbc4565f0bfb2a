"""The input-invariance check (Kindermans et al. 2017): a constant input shift absorbed exactly by
the first layer's bias leaves the gradient's map unchanged (PASS) and changes gradient × input's
and integrated gradients' (black baseline) maps (FAIL); the user's model is never modified; a
first layer that cannot absorb the shift (zero padding, the sample .pt2) is SKIPPED with the
reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from saliaudit.checks import get_check
from saliaudit.checks.base import Batch
from saliaudit.checks.input_invariance import (
    InputInvariance,
    NotCompensable,
    l1_similarity,
    relative_errors,
    shifted_model,
)
from saliaudit.errors import UsageError
from saliaudit.methods import build_source
from saliaudit.model import load_model, wrap_module

from .checks_util import SAMPLES, all_weights


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(first: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        first,
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),  # later layers may pad: only the first layer sees x + c
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 4),
    ).eval()


def _batch(lm, n=6) -> Batch:
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(n, 3, 32, 32, generator=g) - 0.5) / 0.5
    logits = lm.logits(x)
    return Batch(
        lm, x, [f"img{i}.png" for i in range(n)], logits.argmax(1), logits, [None] * n, None, 0, 0, set()
    )


@pytest.fixture(scope="module")
def model():
    net = _net(nn.Conv2d(3, 6, 5, stride=2))  # no padding: the shift is absorbed exactly
    with torch.no_grad():
        net[3].running_mean.uniform_(-0.3, 0.3)
    return wrap_module(net, input_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture(scope="module")
def cells(model):
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    batch = _batch(model)
    check = get_check("input_invariance")()
    assert check.skip_reason(build_source("gradient"), model, False) is None
    out = {}
    for name, params in (
        ("gradient", None),
        ("grad_x_input", None),
        ("integrated_gradients", {"steps": 8, "baseline": "black"}),
    ):
        source = build_source(name, post=["signed", "abs"], params=params)
        maps = source.maps(model, batch.x, batch.targets)
        for v, m in check.measure(batch, source, maps).items():
            out[v.label] = check.judge(v, m)
    for label, r in out.items():
        print(f"input_invariance {label}: {r.status} {r.value:.4f} ci={r.ci} means={r.series['means']}")
    after = model.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "the user's model changed"
    return out


@pytest.mark.parametrize("post", ["signed", "abs"])
def test_gradient_passes(cells, post):
    r = cells[f"gradient/{post}"]
    assert r.status == "pass", r.message
    assert r.value == pytest.approx(1.0, abs=1e-5)
    assert r.series["max_logit_error"] < 1e-4
    assert "absorbed by 0" in r.message and r.n == 6


@pytest.mark.parametrize("method", ["grad_x_input", "integrated_gradients"])
@pytest.mark.parametrize("post", ["signed", "abs"])
def test_input_dependent_references_fail(cells, method, post):
    r = cells[f"{method}/{post}"]
    assert r.status == "fail", r.message
    assert r.value < 0.8 and r.ci[1] < 0.8
    assert "the map changes" in r.message


def test_compensated_copy_is_exact_and_the_model_untouched(model):
    batch = _batch(model)
    weights = all_weights(model)
    shift = torch.tensor([-2.0, 1.0, 0.5])
    s = shifted_model(model, batch.x, shift)
    assert s.model.module is not model.module
    assert float(relative_errors(model, s, batch.x).max()) < 1e-5
    # the bias moved by exactly Σ_kernel W · c
    w, b = model.module[0].weight.detach(), model.module[0].bias.detach()
    expected = b - (w * shift.view(1, 3, 1, 1)).sum((1, 2, 3))
    new_bias = dict(s.model.module.named_parameters())["0.bias"]
    torch.testing.assert_close(new_bias.detach(), expected, rtol=1e-6, atol=1e-6)
    for a, c in zip(weights, all_weights(model)):
        assert torch.equal(a, c)


def test_first_layer_without_bias_and_linear_first_layer():
    x = (torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) - 0.5) * 2
    shift = torch.tensor([-2.0, -2.0, -2.0])
    nobias = wrap_module(_net(nn.Conv2d(3, 6, 5, stride=2, bias=False)), input_size=(32, 32))
    s = shifted_model(nobias, x, shift)
    assert float(relative_errors(nobias, s, x).max()) < 1e-5
    assert nobias.module[0].bias is None
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    lm = wrap_module(lin, input_size=(32, 32))
    s = shifted_model(lm, x, shift)
    assert float(relative_errors(lm, s, x).max()) < 1e-5
    assert s.layer == "1"


def test_zero_padding_and_the_sample_model_are_skipped_with_the_reason():
    padded = wrap_module(_net(nn.Conv2d(3, 6, 7, stride=2, padding=1)), input_size=(32, 32))
    reason = InputInvariance().skip_reason(build_source("gradient"), padded, False)
    assert reason and "pads the input with zeros" in reason and "borders" in reason
    lm = load_model(SAMPLES / "shapes_vgg.pt2")
    weights = all_weights(lm)
    reason = InputInvariance().skip_reason(build_source("gradient"), lm, False)
    assert reason.startswith("cannot shift the input exactly") and "padding [1, 1]" in reason
    for a, b in zip(weights, all_weights(lm)):
        assert torch.equal(a, b)
    with pytest.raises(NotCompensable, match="not a convolution or a linear"):
        shifted_model(
            wrap_module(
                nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(3 * 32 * 32, 2)), input_size=(32, 32)
            ),
            torch.zeros(2, 3, 32, 32),
            torch.ones(3),
        )


def test_l1_similarity_and_params():
    a = torch.tensor([[[1.0, -1.0], [0.0, 2.0]]])
    np.testing.assert_allclose(l1_similarity(a, a), [1.0])
    np.testing.assert_allclose(l1_similarity(a, -a), [0.0])
    np.testing.assert_allclose(l1_similarity(a, torch.zeros_like(a)), [0.0])
    np.testing.assert_allclose(l1_similarity(torch.zeros_like(a), torch.zeros_like(a)), [1.0])
    np.testing.assert_allclose(l1_similarity(a, 2 * a), [1 - 4 / 12])
    with pytest.raises(UsageError):
        InputInvariance(params={"metric": "pearson"})
    assert InputInvariance(params={"metric": "spearman_abs"}).metric.startswith(
        "Spearman rank correlation of |map|"
    )
    assert InputInvariance.thresholds == {"fail": 0.8, "warn": 0.95} and InputInvariance.higher_is_better
