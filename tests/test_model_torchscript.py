"""Loading a TorchScript model shows the auditor no PyTorch deprecation FutureWarning
(``torch.jit.load`` warns on every call since PyTorch deprecated TorchScript)."""

from __future__ import annotations

import warnings

import torch

from saliaudit.model import load_model


def _scripted(path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()
    with warnings.catch_warnings():  # the test's own use of TorchScript may warn
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(net).save(str(path))
    return path


def test_loading_torchscript_emits_no_future_warning(tmp_path):
    path = _scripted(tmp_path / "model.ts.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = load_model(path, input_size=16)
        logits = lm.logits(torch.zeros(2, 3, 16, 16))
    assert lm.format == "torchscript" and logits.shape == (2, 3)
    future = [
        f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, FutureWarning)
    ]
    assert not future, future


def test_filter_is_local(tmp_path):
    """The suppression is scoped to saliaudit's own call: the process's warning filters are
    unchanged afterwards (the user's own torch.jit calls still warn)."""
    path = _scripted(tmp_path / "model.ts.pt")
    before = list(warnings.filters)
    load_model(path, input_size=16)
    assert warnings.filters == before
