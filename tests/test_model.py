"""Tests for saliaudit.model: every model format, the error paths, and wrap_module."""

from __future__ import annotations

import builtins
import copy
import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from saliaudit.errors import ModelLoadError, UntrustedPickleError, UsageError
from saliaudit.model import (
    IMAGENET_MEAN,
    TORCHSCRIPT_LIMITATION,
    LoadedModel,
    load_model,
    parse_size,
    parse_triple,
    resolve_device,
    wrap_module,
)

SIZE = 32


class Tiny(torch.nn.Module):
    """A small conv classifier with BatchNorm and Dropout (mode-dependent layers)."""

    def __init__(self, k: int = 5):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(4, k)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(self.drop(x))


class BadOutput(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x):
        y = self.fc(x.mean((2, 3)))
        if self.kind == "nan":
            return y * float("nan")
        if self.kind == "3d":
            return y[:, :, None]
        if self.kind == "tuple":
            return y, y
        return y


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one intra-op thread (and CI boxes are often oversubscribed)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN statistics so that eval/train differ
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, SIZE, SIZE)


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns


def assert_one_line(err: Exception, name: str) -> None:
    text = str(err)
    assert "\n" not in text
    assert name in text


# ---------------------------------------------------------------- parse helpers


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        (224, (224, 224)),
        ("224", (224, 224)),
        ("224,192", (224, 192)),
        (" 64 , 32 ", (64, 32)),
        ("64x48", (64, 48)),
        ([32], (32, 32)),
        ((48, 40), (48, 40)),
    ],
)
def test_parse_size_ok(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "abc", "0", "-3", "1,2,3", "22.5", True, [0, 4], 3.5, "100000"])
def test_parse_size_bad(value):
    with pytest.raises(UsageError) as e:
        parse_size(value)
    assert "\n" not in str(e.value) and "--input-size" in str(e.value)


def test_parse_triple():
    assert parse_triple(None, "mean") is None
    assert parse_triple("0.5,0.25,0.125", "mean") == (0.5, 0.25, 0.125)
    assert parse_triple("0.5", "std") == (0.5, 0.5, 0.5)
    assert parse_triple([0.1, 0.2, 0.3], "mean") == (0.1, 0.2, 0.3)
    assert parse_triple(0.5, "mean") == (0.5, 0.5, 0.5)
    assert parse_triple("-0.5", "mean") == (-0.5, -0.5, -0.5)
    for bad, name in [
        ("0.5,0.5", "mean"),
        ("a,b,c", "mean"),
        ("0,1,1", "std"),
        ("-1", "std"),
        ("nan", "mean"),
        ("inf,1,1", "std"),
        ([], "mean"),
    ]:
        with pytest.raises(UsageError) as e:
            parse_triple(bad, name)
        assert f"--{name}" in str(e.value) and "\n" not in str(e.value)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(UsageError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError) as e:
            resolve_device("cuda")
        assert "--device cpu" in str(e.value)


# ---------------------------------------------------------------- .pt2


def test_pt2_dynamic_with_metadata(tmp_path, x):
    tiny = Tiny(k=10).eval()
    auto = torch.export.Dim.AUTO
    ep = torch.export.export(
        tiny, (x[:2],), dynamic_shapes=({0: torch.export.Dim("b", max=64), 2: auto, 3: auto},)
    )
    meta = {
        "input_size": [SIZE, SIZE],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "class_names": [f"c{i}" for i in range(10)],
    }
    p = tmp_path / "m.pt2"
    torch.export.save(ep, p, extra_files={"saliaudit.json": json.dumps(meta)})
    before = fingerprint(p)
    lm = load_model(p, mean="0.4")
    assert fingerprint(p) == before
    assert lm.sha256 == before[0]
    assert lm.format == "pt2" and lm.exported is not None and lm.static_batch is None
    assert lm.input_size == (SIZE, SIZE) and lm.sources["input_size"] == "pt2 metadata"
    assert lm.mean == (0.4, 0.4, 0.4) and lm.sources["mean"] == "flag"
    assert lm.std == (0.25, 0.25, 0.25) and lm.sources["std"] == "pt2 metadata"
    assert lm.class_names == meta["class_names"] and lm.sources["class_names"] == "pt2 metadata"
    assert lm.num_classes == 10
    torch.testing.assert_close(lm.logits(x), tiny(x).detach())
    assert not any("training mode" in n for n in lm.notes)


def test_pt2_static_batch_and_size(tmp_path, resnet, x):
    ep = torch.export.export(resnet, (x[:1],))
    p = tmp_path / "static.pt2"
    torch.export.save(ep, p)
    lm = load_model(p)
    assert lm.static_batch == 1 and lm.input_size == (SIZE, SIZE) and lm.sources["input_size"] == "graph"
    assert lm.class_names == [f"class {i}" for i in range(10)] and lm.sources["class_names"] == "default"
    out = lm.logits(x)  # batch 3 through a batch-1 graph
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, resnet(x).detach())
    assert load_model(p, input_size=SIZE).input_size == (SIZE, SIZE)
    with pytest.raises(ModelLoadError) as e:
        load_model(p, input_size="64,48")
    assert_one_line(e.value, "static.pt2")
    assert "64,48" in str(e.value) and f"{SIZE},{SIZE}" in str(e.value) and "dynamic" in str(e.value)


def test_pt2_static_batch_padding(tmp_path, x):
    tiny = Tiny().eval()
    x5 = torch.cat([x, x[:2]])
    p = tmp_path / "b2.pt2"
    torch.export.save(torch.export.export(tiny, (x5[:2],)), p)
    lm = load_model(p)
    assert lm.static_batch == 2 and lm.num_classes == 5
    torch.testing.assert_close(lm.logits(x5), tiny(x5).detach())  # 5 = 2 + 2 + 1 padded
    assert lm.logits(x5[:0]).shape == (0, 5)
    data = p.read_bytes()
    (tmp_path / "trunc.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path / "trunc.pt2")
    assert_one_line(e.value, "trunc.pt2")


def test_pt2_training_mode_graph_noted(tmp_path, x):
    m = Tiny().train()
    ep = torch.export.export(m, (x[:2],))
    p = tmp_path / "train.pt2"
    torch.export.save(ep, p)
    lm = load_model(p, input_size=SIZE)
    assert any("training mode" in n for n in lm.notes)


def test_pt2_to_device_roundtrip(tmp_path, x):
    tiny = Tiny().eval()
    ep = torch.export.export(tiny, (x[:2],), dynamic_shapes=({0: torch.export.Dim("b")},))
    p = tmp_path / "d.pt2"
    torch.export.save(ep, p)
    lm = load_model(p, device="cpu")
    assert lm.to("cpu") is lm
    if torch.cuda.is_available():
        g = lm.to("cuda")
        assert g.device.type == "cuda" and g.exported is not lm.exported
        torch.testing.assert_close(g.logits(x).cpu(), tiny(x).detach(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            load_model(p, device="cuda").logits(x).cpu(), tiny(x).detach(), atol=1e-4, rtol=1e-4
        )


# ---------------------------------------------------------------- state_dict


def test_state_dict_module_prefix_nested(tmp_path, resnet, x):
    sd = {"module." + k: v for k, v in resnet.state_dict().items()}
    p = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": sd, "optimizer": {"lr": 0.1}}, p)
    before = fingerprint(p)
    lm = load_model(p, arch="resnet18", input_size=SIZE)
    assert fingerprint(p) == before
    assert lm.format == "state_dict" and lm.arch == "resnet18" and lm.num_classes == 10
    assert lm.sources["num_classes"] == "state_dict"
    assert lm.mean == IMAGENET_MEAN and lm.sources["mean"] == "torchvision weights"
    assert lm.sources["input_size"] == "flag"
    assert lm.class_names[0] == "class 0"  # 10 classes: no ImageNet categories
    torch.testing.assert_close(lm.logits(x), resnet(x).detach())


def test_state_dict_imagenet_head_gets_categories(tmp_path, x):
    m = torchvision.models.resnet18().eval()
    p = tmp_path / "in1k.pt"
    torch.save({"model": m.state_dict()}, p)
    lm = load_model(p, arch="resnet18", input_size=SIZE)
    assert lm.num_classes == 1000 and lm.class_names[0] == "tench"
    assert lm.sources["class_names"] == "torchvision weights"
    lm2 = load_model(p, arch="resnet18")
    assert lm2.input_size == (224, 224) and lm2.sources["input_size"] == "torchvision weights"


def test_safetensors(tmp_path, resnet, x):
    from safetensors.torch import save_file

    p = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(p))
    lm = load_model(p, arch="resnet18", num_classes=10, input_size=SIZE)
    assert lm.format == "state_dict" and lm.sources["num_classes"] == "flag"
    torch.testing.assert_close(lm.logits(x), resnet(x).detach())


def test_state_dict_wrong_arch(tmp_path, resnet):
    p = tmp_path / "r18.pt"
    torch.save(resnet.state_dict(), p)
    with pytest.raises(ModelLoadError) as e:
        load_model(p, arch="resnet34", input_size=SIZE)
    assert_one_line(e.value, "r18.pt")
    assert "missing" in str(e.value) and "--arch" in str(e.value)
    with pytest.raises(ModelLoadError) as e:
        load_model(p, arch="mobilenet_v3_small", input_size=SIZE)
    assert_one_line(e.value, "r18.pt")


def test_state_dict_wrong_num_classes(tmp_path, resnet):
    p = tmp_path / "r18.pt"
    torch.save(resnet.state_dict(), p)
    with pytest.raises(ModelLoadError) as e:
        load_model(p, arch="resnet18", num_classes=7, input_size=SIZE)
    assert_one_line(e.value, "r18.pt")
    assert "fc.weight" in str(e.value) and "10 classes" in str(e.value) and "--num-classes" in str(e.value)


def test_unknown_arch_and_missing_arch(tmp_path, resnet):
    p = tmp_path / "r18.pt"
    torch.save(resnet.state_dict(), p)
    with pytest.raises(UsageError) as e:
        load_model(p, arch="resnet19")
    assert_one_line(e.value, "r18.pt")
    assert "resnet18" in str(e.value)
    with pytest.raises(UsageError) as e:
        load_model(p)
    assert_one_line(e.value, "r18.pt")
    assert "state_dict" in str(e.value) and "--arch" in str(e.value)


def test_checkpoint_saved_on_gpu(tmp_path, resnet, x, monkeypatch):
    p = tmp_path / "gpu.pt"
    with monkeypatch.context() as mp:
        mp.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(resnet.state_dict(), p)
    lm = load_model(p, arch="resnet18", input_size=SIZE)
    assert lm.device == torch.device("cpu")
    torch.testing.assert_close(lm.logits(x), resnet(x).detach())


# ---------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript(tmp_path, resnet, x, how):
    sm = torch.jit.script(resnet) if how == "script" else torch.jit.trace(resnet, x[:1])
    p = tmp_path / f"{how}.pt"
    sm.save(str(p))
    before = fingerprint(p)
    lm = load_model(p, input_size=SIZE)
    assert fingerprint(p) == before
    assert lm.format == "torchscript" and TORCHSCRIPT_LIMITATION in lm.limitations
    assert lm.sources["num_classes"] == "model output"
    torch.testing.assert_close(lm.logits(x), resnet(x).detach())


# ---------------------------------------------------------------- pickles


class Evil:
    marker = ""

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_refused(tmp_path, writer):
    marker = tmp_path / "MARKER"
    evil = Evil()
    evil.marker = str(marker)
    p = tmp_path / "model.pt"
    if writer == "torch":
        torch.save({"model": evil}, p)
    else:
        with open(p, "wb") as f:
            pickle.dump(evil, f)
    with pytest.raises(UntrustedPickleError) as e:
        load_model(p)
    assert_one_line(e.value, "model.pt")
    assert "--trust-model" in str(e.value) and "runs code" in str(e.value)
    assert not marker.exists()


def test_trusted_pickle_training_mode(tmp_path, resnet, x):
    m = copy.deepcopy(resnet).train()
    p = tmp_path / "whole.pt"
    torch.save(m, p)
    with pytest.raises(UntrustedPickleError) as e:
        load_model(p, input_size=SIZE)
    assert "ResNet" in str(e.value)
    lm = load_model(p, input_size=SIZE, trust_model=True)
    assert lm.format == "pickle" and not lm.module.training
    assert any("training mode" in n for n in lm.notes)
    torch.testing.assert_close(lm.logits(x), resnet(x).detach())
    # a dict holding the module under "model"
    torch.save({"model": resnet, "epoch": 1}, p)
    assert load_model(p, input_size=SIZE, trust_model=True).format == "pickle"


# ---------------------------------------------------------------- broken files


def test_broken_files(tmp_path, resnet):
    p = tmp_path / "good.pt"
    torch.save(resnet.state_dict(), p)
    data = p.read_bytes()
    cases = {
        "trunc.pt": data[: len(data) // 2],
        "empty.pt": b"",
        "random.pt2": os.urandom(2048),
        "random.pt": os.urandom(2048),
        "trunc.safetensors": b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":',
        "model.onnx": b"not a model at all",
    }
    for name, content in cases.items():
        f = tmp_path / name
        f.write_bytes(content)
        with pytest.raises(ModelLoadError) as e:
            load_model(f, arch="resnet18", input_size=SIZE)
        assert_one_line(e.value, name)
    d = tmp_path / "adir.pt"
    d.mkdir()
    # a folder or a missing path: a usage error (exit 2), like any path the user named wrongly
    with pytest.raises(UsageError) as e:
        load_model(d)
    assert_one_line(e.value, "adir.pt")
    with pytest.raises(UsageError) as e:
        load_model(tmp_path / "nope.pt2")
    assert_one_line(e.value, "nope.pt2")


def test_zip_that_is_not_a_model(tmp_path):
    import zipfile

    p = tmp_path / "images.pt"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("a.txt", "hello")
    with pytest.raises(ModelLoadError) as e:
        load_model(p)
    assert_one_line(e.value, "images.pt")


def test_non_state_dict_payload(tmp_path):
    p = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), p)
    with pytest.raises(ModelLoadError) as e:
        load_model(p, arch="resnet18")
    assert_one_line(e.value, "tensor.pt")


# ---------------------------------------------------------------- output validation


@pytest.mark.parametrize(
    "kind, text", [("nan", "NaN/Inf"), ("3d", "(batch, classes)"), ("tuple", "(batch, classes)")]
)
def test_bad_outputs(tmp_path, kind, text):
    p = tmp_path / f"{kind}.pt"
    torch.save(BadOutput(kind).eval(), p)
    with pytest.raises(ModelLoadError) as e:
        load_model(p, input_size=8, trust_model=True)
    assert_one_line(e.value, f"{kind}.pt")
    assert text in str(e.value)
    with pytest.raises(ModelLoadError):
        wrap_module(BadOutput(kind).eval(), input_size=8)


def test_labels(tmp_path, x):
    m = Tiny(k=3).eval()
    p = tmp_path / "tiny.pt"
    torch.jit.script(m).save(str(p))
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n\n  dog \nbird\n", encoding="utf-8")
    lm = load_model(p, input_size=SIZE, labels=labels)
    assert lm.class_names == ["cat", "dog", "bird"] and lm.sources["class_names"] == "labels file"
    assert load_model(p, input_size=SIZE, labels=["a", "b", "c"]).class_names == ["a", "b", "c"]
    labels.write_text("cat\ndog\n", encoding="utf-8")
    with pytest.raises(UsageError) as e:
        load_model(p, input_size=SIZE, labels=labels)
    assert_one_line(e.value, "labels.txt")
    with pytest.raises(UsageError):
        load_model(p, input_size=SIZE, num_classes=4)


# ---------------------------------------------------------------- wrap_module and preprocessing


def _hooks(module: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules()
    )


def test_wrap_module_does_not_mutate(resnet, x):
    user = copy.deepcopy(resnet).train()
    for p in user.layer1.parameters():
        p.requires_grad_(False)
    weights = {k: v.clone() for k, v in user.state_dict().items()}
    grads = {k: p.requires_grad for k, p in user.named_parameters()}
    lm = wrap_module(user, input_size=SIZE, labels=[str(i) for i in range(10)])
    assert user.training and all(m.training for m in user.modules())
    assert lm.module is not user and not lm.module.training
    assert any("training mode" in n for n in lm.notes)
    lm.logits(x)
    assert all(torch.equal(weights[k], v) for k, v in user.state_dict().items())
    assert grads == {k: p.requires_grad for k, p in user.named_parameters()}
    assert _hooks(user) == 0 and _hooks(lm.module) == 0
    assert lm.format == "module" and lm.num_classes == 10 and lm.class_names[3] == "3"
    torch.testing.assert_close(lm.logits(x), resnet(x).detach())
    ev = copy.deepcopy(resnet)
    assert wrap_module(ev, input_size=SIZE).module is ev  # eval-mode module is used as is


def test_preprocess(resnet):
    lm = wrap_module(resnet, input_size="32,24", mean=0.5, std=0.5)
    imgs = [
        Image.new("RGB", (100, 60), (255, 0, 0)),
        Image.new("L", (20, 20), 0),
        Image.new("RGBA", (5, 7), (0, 0, 255, 128)),
    ]
    t = lm.preprocess(imgs)
    assert t.shape == (3, 3, 32, 24) and t.dtype == torch.float32
    torch.testing.assert_close(t[0, 0], torch.ones(32, 24))
    torch.testing.assert_close(t[0, 1], -torch.ones(32, 24))
    torch.testing.assert_close(t[1], -torch.ones(3, 32, 24))
    assert lm.logits(t).shape == (3, 10)
    assert isinstance(lm, LoadedModel)
