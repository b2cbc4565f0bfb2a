"""saliaudit.validate: one rule for parameter values, used by the config, checks and methods."""

from __future__ import annotations

import numpy as np
import pytest

from saliaudit import validate
from saliaudit.checks import get_check
from saliaudit.errors import EXIT_USAGE, UsageError
from saliaudit.validate import InvalidValue


def message(fn, *args, **kw) -> str:
    with pytest.raises(InvalidValue) as info:
        fn(*args, **kw)
    assert isinstance(info.value, UsageError) and info.value.exit_code == EXIT_USAGE
    return str(info.value)


# --------------------------------------------------------------------------- integer


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.int32(9)])
def test_integer_accepts_int_types(value):
    got = validate.integer("n", value, min=1, max=9)
    assert got == int(value) and type(got) is int


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 3.0, 2.5, "3", None, [3], float("nan")])
def test_integer_rejects_bools_floats_text(value):
    """The rule: bools are not integers, and neither is 3.0 (nor text: parse it first)."""
    text = message(validate.integer, "perturbation.chunk", value, min=0)
    assert text == f"invalid perturbation.chunk: expected an integer at least 0, got {value!r}"


@pytest.mark.parametrize(
    "kw, value, expected",
    [
        ({"min": 1}, 0, "an integer at least 1"),
        ({"max": 5}, 6, "an integer at most 5"),
        ({"min": 1, "max": 4096}, 4097, "an integer between 1 and 4096"),
        ({"min": 1, "allow_none": True}, -1, "an integer at least 1 or null"),
    ],
)
def test_integer_range_messages(kw, value, expected):
    assert message(validate.integer, "x", value, **kw) == f"invalid x: expected {expected}, got {value!r}"


def test_integer_bounds_inclusive_and_none():
    assert validate.integer("x", 1, min=1, max=1) == 1
    assert validate.integer("x", None, min=1, allow_none=True) is None
    message(validate.integer, "x", None, min=1)


def test_hint_is_kept():
    assert message(validate.integer, "x", 0, min=1, hint="null: all images").endswith("(null: all images)")


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.25), np.float64(2.0), np.int64(2)])
def test_number_accepts_reals(value):
    got = validate.number("x", value, min=0)
    assert got == float(value) and type(got) is float


@pytest.mark.parametrize("value", [True, "1", None, float("nan"), float("inf"), -float("inf"), [1.0]])
def test_number_rejects(value):
    message(validate.number, "x", value)


def test_number_bounds():
    assert validate.number("noise", 0, min=0) == 0.0
    assert (
        message(validate.number, "blur_sigma", 0, min=0, min_open=True)
        == "invalid blur_sigma: expected a positive number, got 0"
    )
    assert (
        message(validate.number, "x", 2, min=0, max=1)
        == "invalid x: expected a number between 0 and 1, got 2"
    )
    assert (
        message(validate.number, "x", 1, min=0, max=1, max_open=True)
        == "invalid x: expected a number in [0, 1), got 1"
    )
    assert message(validate.number, "x", -1, min=0) == "invalid x: expected a number at least 0, got -1"


@pytest.mark.parametrize(
    "value, ok", [(1, True), (1e-9, True), (0.5, True), (0, False), (1.01, False), (True, False)]
)
def test_fraction(value, ok):
    if ok:
        assert validate.fraction("f", value) == float(value)
    else:
        assert "expected a number in (0, 1]" in message(validate.fraction, "f", value)


def test_fractions():
    assert validate.fractions("fractions", [0.1, 0.05, 0.1, 1]) == [0.05, 0.1, 1.0]
    assert validate.fractions("fractions", 0.2) == [0.2]
    assert validate.fractions("fractions", (np.float32(0.5),)) == [0.5]
    for bad in ([], [0], [0.5, 1.5], "0.5", None, [True], {"a": 0.5}, [float("nan")]):
        assert "expected a list of fractions in (0, 1]" in message(validate.fractions, "fractions", bad)


# --------------------------------------------------------------------------- choice, boolean


def test_choice():
    assert validate.choice("metric", "hog", ("hog", "ssim")) == "hog"
    assert (
        message(validate.choice, "metric", "HOG", ("hog", "ssim"))
        == "invalid metric: expected one of hog, ssim, got 'HOG'"
    )
    message(validate.choice, "metric", None, ("hog",))


def test_boolean():
    assert validate.boolean("b", True) is True and validate.boolean("b", np.bool_(False)) is False
    for bad in (1, 0, "true", None):
        assert "expected true or false" in message(validate.boolean, "b", bad)


# --------------------------------------------------------------------------- used everywhere


@pytest.mark.parametrize(
    "check, params, text",
    [
        (
            "perturbation",
            {"chunk": 3.0},
            "invalid perturbation.chunk: expected an integer at least 1 or null, got 3.0",
        ),
        ("perturbation", {"random_orders": True}, "invalid perturbation.random_orders"),
        ("perturbation", {"fractions": [0.5, 2]}, "invalid perturbation.fractions"),
        (
            "perturbation",
            {"output": "logits"},
            "invalid perturbation.output: expected one of logit, probability",
        ),
        ("sign_flip", {"chunk": 0}, "invalid sign_flip.chunk: expected an integer at least 1 or null, got 0"),
        (
            "sign_flip",
            {"baseline": "blur", "blur_sigma": 0},
            "invalid blur_sigma: expected a positive number",
        ),
        (
            "sensitivity_n",
            {"subsets": 2},
            "invalid sensitivity_n.subsets: expected an integer at least 3, got 2",
        ),
        ("sensitivity_n", {"points": 8.0}, "invalid sensitivity_n.points"),
        (
            "sensitivity_n",
            {"max_fraction": 1.5},
            "invalid sensitivity_n.max_fraction: expected a number in (0, 1]",
        ),
        ("sensitivity_n", {"baseline": "white"}, "invalid baseline: expected one of black, zero, mean, blur"),
        (
            "class_sensitivity",
            {"max_images": 0},
            "invalid class_sensitivity.max_images: expected an integer at least 1 or null, got 0",
        ),
        ("class_sensitivity", {"figure_images": True}, "invalid class_sensitivity.figure_images"),
        ("class_sensitivity", {"metric": "pearson"}, "invalid class_sensitivity.metric: expected one of"),
        ("randomization", {"max_images": 2.0}, "invalid randomization.max_images"),
        ("randomization", {"independent": 1}, "invalid randomization.independent: expected true or false"),
        ("randomization", {"granularity": "x"}, "invalid randomization.granularity"),
    ],
)
def test_checks_use_the_rule(check, params, text):
    assert message(get_check(check), params).startswith(text)


def test_checks_accept_their_defaults_and_numpy_ints():
    for name in ("perturbation", "sign_flip", "sensitivity_n", "class_sensitivity", "randomization"):
        get_check(name)()
    get_check("perturbation")({"chunk": np.int64(16)})
    get_check("class_sensitivity")({"max_images": None, "figure_images": 0})


def test_methods_use_the_rule():
    import torch

    from saliaudit.methods import explain

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    ).eval()
    x, t = torch.zeros(1, 3, 8, 8), torch.tensor([0])
    for method, params, text in [
        ("integrated_gradients", {"steps": 4.0}, "invalid steps: expected an integer at least 2, got 4.0"),
        ("smoothgrad", {"samples": True}, "invalid samples: expected an integer at least 1"),
        ("smoothgrad", {"noise": -0.1}, "invalid noise: expected a number at least 0, got -0.1"),
        ("occlusion", {"patch": 2.0}, "invalid patch: expected an integer at least 1"),
    ]:
        assert message(explain, net, x, t, method=method, **params).startswith(text)
    assert explain(net, x, t, method="smoothgrad", samples=np.int64(2), noise=0).shape[0] == 1
