"""Contracts that every registered method and check keeps, built-in or plugin.

Methods: the right shape, finite, deterministic, the model untouched (weights, mode, hooks),
one map per declared variant. Checks: no NaN reaches the results, the results survive a
JSON round trip, and each check's must-fail controls do not PASS it on the sample model.
Parametrized over the registries, so a new entry is covered without editing this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import saliaudit
from saliaudit.checks import check_names, get_check
from saliaudit.methods import build_source, explain, get_method, method_names

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sample_models" / "shapes_vgg.pt2"
IMAGES = ROOT / "sample_models" / "images" / "shapes"
MASKS = ROOT / "sample_models" / "masks" / "shapes"

#: Cheaper values for parameters that only set the cost (applied when a method has them).
CHEAP = {"steps": 4, "samples": 3, "patch": 8, "stride": 8}


def _cheap(name: str) -> dict:
    return {k: v for k, v in CHEAP.items() if k in get_method(name).params}


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.3, 0.3)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def _hooks(net: nn.Module) -> int:
    from torch.nn.modules import module as m

    local = sum(
        len(mod._forward_hooks)
        + len(mod._forward_pre_hooks)
        + len(mod._backward_hooks)
        + len(getattr(mod, "_backward_pre_hooks", {}))
        for mod in net.modules()
    )
    return local + len(m._global_forward_hooks) + len(m._global_backward_hooks)


@pytest.mark.parametrize("name", method_names())
def test_method_contract_on_a_module(name):
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.requires_grad for p in net.parameters()]
    hooks = _hooks(net)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x_before = x.clone()
    targets = torch.tensor([0, 3])
    a = explain(net, x, targets, name, **_cheap(name))
    b = explain(net, x, targets, name, **_cheap(name))
    assert a.dim() == 4 and a.shape[0] == 2 and a.shape[1] in (1, 3)
    assert tuple(a.shape[2:]) == (16, 16)
    assert bool(torch.isfinite(a).all())
    assert torch.equal(a, b), "the same inputs must give the same numbers"
    assert torch.equal(x, x_before)
    assert not net.training and _hooks(net) == hooks
    assert [p.requires_grad for p in net.parameters()] == grads
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"{name} changed {k}"

    source = build_source(name, params=_cheap(name))
    maps = source.maps(net, x, targets)
    assert list(maps) == source.variants and source.variants
    for v, m in maps.items():
        assert v.method == name and tuple(m.shape) == (2, 16, 16)
        assert bool(torch.isfinite(m).all())
    assert _hooks(net) == hooks


@pytest.mark.parametrize("name", method_names())
def test_method_hooks_removed_after_an_exception(name):
    net = _net()
    hooks = _hooks(net)
    calls = {"n": 0}

    def boom(module, inputs, output):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("boom")

    handle = net[4].register_forward_hook(boom)
    x = torch.randn(1, 3, 16, 16)
    try:
        explain(net, x, [1], name, **_cheap(name))
    except RuntimeError as err:
        assert "boom" in str(err)
    finally:
        handle.remove()
    assert _hooks(net) == hooks


@pytest.fixture(scope="module")
def audit_doc() -> dict:
    """One small audit: every check on one method and the controls (sample shapes model)."""
    method_names()
    result = saliaudit.audit(
        MODEL,
        IMAGES,
        methods=["fullgrad", "gradient", "random", "edge", "edge_signed"],
        psi=["paper", "signed"],
        max_images=8,
        masks=str(MASKS),
        overlays=False,
        seed=0,
        check_params={
            "randomization": {"max_images": 4},
            "sensitivity_n": {"max_images": 4},
            "road": {"max_images": 4},
        },
    )
    return result.to_dict()


def test_results_are_finite_and_survive_a_json_round_trip(audit_doc):
    text = json.dumps(audit_doc, allow_nan=False)
    assert json.loads(text) == audit_doc
    assert {c["check"] for c in audit_doc["checks"]} == set(check_names())


@pytest.mark.parametrize("check", check_names())
def test_check_contract(audit_doc, check):
    cells = [c for c in audit_doc["checks"] if c["check"] == check]
    assert cells, f"{check} produced no cell"
    for c in cells:
        assert c["status"] in ("pass", "warn", "fail", "error", "skipped")
        assert c["status"] != "error", c["message"]
        if c["status"] in ("pass", "warn", "fail") and c["value"] is not None:
            # every judged cell: n and a 95 % interval that holds its value
            assert isinstance(c["n"], int) and c["n"] >= 1, c
            lo, hi = c["ci"]
            assert lo <= c["value"] <= hi and c["ci_method"], c
        for p in c.get("per_image", []):
            assert p["value"] is None or isinstance(p["value"], (int, float))
    for control in get_check(check).controls_must_fail:
        judged = [c for c in cells if c["method"] == control and c["status"] != "skipped"]
        assert judged, f"{check} did not judge the control {control}"
        assert all(c["status"] != "pass" for c in judged), (
            f"the {control} control passes {check}: the check cannot tell it from a real map"
        )
