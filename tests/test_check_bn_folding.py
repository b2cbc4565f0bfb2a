"""bn_folding: the maps of the folded model, derived from the unfolded decomposition, equal the
maps of a model really folded with torch.nn.utils.fusion; verdicts on the sample model."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from saliaudit.checks.base import Variant
from saliaudit.checks.bn_folding import BNFolding, fold_decomposition, folding_pairs
from saliaudit.graph import get_graph
from saliaudit.methods import build_source
from saliaudit.methods.fullgrad import full_gradients
from saliaudit.psi import psi_names

from .checks_util import all_weights, make_batch

PSIS = psi_names()


class Net(nn.Module):
    """conv(bias)+BN, conv(no bias)+BN, a BN that follows a pool (not foldable), linear+BN1d."""

    def __init__(self, conv_bias: bool = True):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1, bias=conv_bias), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.b3 = nn.BatchNorm2d(8)  # after a pool: stays as it is
        self.c3, self.b4 = nn.Conv2d(8, 8, 3, padding=1, bias=conv_bias), nn.BatchNorm2d(8)
        self.fc, self.b5 = nn.Linear(8, 16), nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = self.b3(self.pool(x))
        x = torch.relu(self.b4(self.c3(x)))
        x = x.mean((2, 3))
        return self.head(torch.relu(self.b5(self.fc(x))))


def _randomized(net: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return net.eval()


def _folded(net: Net) -> nn.Module:
    """The deployment tool's folding, on a copy: BN merged into conv/linear, BN -> Identity."""
    f = copy.deepcopy(net)
    for conv, bn in (("c1", "b1"), ("c2", "b2"), ("c3", "b4")):
        setattr(f, conv, fuse_conv_bn_eval(getattr(f, conv), getattr(f, bn)))
        setattr(f, bn, nn.Identity())
    f.fc, f.b5 = fuse_linear_bn_eval(f.fc, f.b5), nn.Identity()
    return f.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _fold_both_ways(conv_bias: bool, dtype: torch.dtype):
    torch.manual_seed(0)
    net = _randomized(Net(conv_bias)).to(dtype)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = _folded(net)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        assert torch.allclose(net(x), folded(x), atol=1e-5)  # the function is unchanged
    targets = net(x).argmax(1)
    fg = full_gradients(net, x, targets)
    pairs = folding_pairs(get_graph(net, x))
    assert len(pairs) == 4  # c1+b1, c2+b2, c3+b4, fc+b5; not the BN after the pool
    derived, merged = fold_decomposition(fg, pairs)
    assert merged == (3 if conv_bias else 1)  # c2 never has a bias; fc always has one
    real = full_gradients(folded, x, targets)  # the really folded model
    assert len(derived.bias_terms) == len(real.bias_terms)
    assert float(real.residual.max()) < 1e-5 and float(derived.residual.max()) < 1e-5
    assert torch.allclose(derived.reconstructed, real.reconstructed, rtol=1e-5, atol=1e-5)
    for k, v in net.state_dict().items():  # the user's model is unchanged
        assert torch.equal(v, before[k]), k
    return fg.saliency_maps(PSIS), derived.saliency_maps(PSIS), real.saliency_maps(PSIS)


def test_merged_maps_equal_the_really_folded_model():
    orig, ours, theirs = _fold_both_ways(True, torch.float64)
    for psi in PSIS:
        assert _rel(ours[psi], theirs[psi]) < 1e-10, psi
    assert _rel(orig["signed"], theirs["signed"]) < 1e-10  # signed: identical before/after
    for psi in ("paper", "abs", "positive", "negative", "per-channel"):
        assert _rel(orig[psi], theirs[psi]) > 1e-3, psi  # |a + b| != |a| + |b|: the map moves
    orig, ours, theirs = _fold_both_ways(True, torch.float32)
    for psi in PSIS:
        # per-channel min-max rescaling divides by channel ranges down to 4e-5 here, which
        # magnifies float32 rounding of the two models' gradients (3e-10) to ~2e-4
        tol = 1e-3 if psi == "per-channel" else 1e-5
        assert _rel(ours[psi], theirs[psi]) < tol, psi
    assert _rel(orig["signed"], theirs["signed"]) < 1e-5


def test_bias_free_convs_leave_every_map_unchanged():
    # the batch-norm's term already is the folded conv's term (ResNet-style convs)
    orig, ours, theirs = _fold_both_ways(False, torch.float64)
    for psi in PSIS:
        assert _rel(ours[psi], theirs[psi]) < 1e-10, psi
        assert _rel(orig[psi], theirs[psi]) < 1e-10, psi


def test_sample_model_numbers_and_verdicts():
    batch = make_batch(n=6)
    weights = all_weights(batch.model)
    source = build_source("fullgrad", psi=PSIS, post=[])
    check = BNFolding()
    assert check.skip_reason(source, batch.model, False) is None
    maps = source.maps(batch.model, batch.x, batch.targets)
    out = check.measure(batch, source, maps)
    assert set(out) == set(maps)
    cells = {v.psi: check.judge(v, m) for v, m in out.items()}
    for psi, c in cells.items():
        m = out[Variant("fullgrad", psi=psi, signed=psi == "signed")]
        assert c.status in ("pass", "warn"), (psi, c.message)
        assert c.value is not None and -1 <= c.value <= 1 + 1e-9
        assert all(0 <= r < 1e-3 for r in m.extra["residual_after"])
        assert all(-1 <= s <= 1 for s in m.extra["ssim"])
        assert "5 batch-norm" in c.message and "2 of these layers carry a bias" in c.message
    assert cells["signed"].value == pytest.approx(1.0, abs=1e-9)
    assert cells["signed"].status == "pass" and "cannot change" in cells["signed"].message
    assert cells["paper"].value < 1 - 1e-6  # two of the five convs carry a bias
    assert len(cells["paper"].series["folded_pairs"]) == 5
    for a, b in zip(weights, all_weights(batch.model)):
        assert torch.equal(a, b)

    strict = BNFolding(thresholds={"warn": 0.9999})
    out = strict.measure(batch, source, maps)
    cell = strict.judge(Variant("fullgrad", psi="paper"), out[Variant("fullgrad", psi="paper")])
    assert cell.status == "warn"
    assert "does not change the function" in cell.message and "Spearman" in cell.message
    cell = strict.judge(
        Variant("fullgrad", psi="signed", signed=True), out[Variant("fullgrad", psi="signed", signed=True)]
    )
    assert cell.status == "pass"
    failing = BNFolding(thresholds={"fail": 0.9999, "warn": None})
    out = failing.measure(batch, source, maps)
    assert (
        failing.judge(Variant("fullgrad", psi="paper"), out[Variant("fullgrad", psi="paper")]).status
        == "fail"
    )


class NoFold(nn.Module):
    """Batch-norm on the input and after a pool, and a conv whose output is used twice."""

    def __init__(self):
        super().__init__()
        self.b0, self.c, self.b1 = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        z = self.c(self.b0(x))
        y = self.b1(z) + z  # z has two users: folding b1 into c would change z
        return self.head(torch.relu(y).mean((2, 3)))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_skipped_without_a_foldable_batch_norm():
    net = NoFold().eval()
    x = torch.randn(2, 3, 8, 8)
    assert folding_pairs(get_graph(net, x)) == []
    source = build_source("fullgrad", psi=["paper", "signed"], post=[])
    check = BNFolding()
    assert check.skip_reason(source, net, False) is None  # no input_size: measure() decides
    model = SimpleNamespace(module=net, exported=None, input_size=(8, 8), device="cpu")
    assert "nothing to fold" in check.skip_reason(source, model, False)
    out = check.measure(_batch(net, x), source, source.maps(net, x, torch.zeros(2, dtype=torch.long)))
    for v, m in out.items():
        cell = check.judge(v, m)
        assert cell.status == "skipped" and "no batch-norm" in cell.message
    scripted = SimpleNamespace(module=torch.jit.script(net), exported=None, input_size=(8, 8), device="cpu")
    assert "TorchScript" in check.skip_reason(source, scripted, False)
    other = build_source("gradient", psi=[], post=["abs"])
    assert check.skip_reason(other, net, False) == "needs a method that provides decomposition"


def _batch(net, x):
    from saliaudit.checks.base import Batch

    logits = net(x).detach()
    return Batch(
        net,
        x,
        [f"{i}.png" for i in range(len(x))],
        torch.zeros(len(x), dtype=torch.long),
        logits,
        [None] * len(x),
    )
