"""sMPRT and eMPRT in the randomization check (Hedström et al. 2023): agreement with real
Quantus' stored numbers and with the re-implementation in tests/reference/quantus_mprt.py to
1e-5, the controls FAIL under every measure, the alternatives are reported and a differing
verdict is named, determinism, parameter validation, the plan counts sMPRT's passes, and the
user's model is never modified."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from saliaudit.checks.base import Batch, Measurement
from saliaudit.checks.mprt_variants import discrete_entropy, entropy_ratio, noise_seed, smprt_noise
from saliaudit.checks.randomization import Randomization
from saliaudit.cost import CostContext, Passes
from saliaudit.errors import UsageError
from saliaudit.methods import build_source
from saliaudit.model import wrap_module

from .checks_util import make_batch
from .conftest import hook_counts
from .reference import quantus_mprt as ref

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(lm, x: torch.Tensor, images: list[str], seed: int = 0) -> Batch:
    logits = lm.logits(x)
    return Batch(lm, x, images, logits.argmax(1), logits, [None] * len(images), None, seed, 0, set())


def _tiny(doc: dict):
    model = ref.stored_model(doc)
    lm = wrap_module(model, input_size=(16, 16), mean=(0.0,) * 3, std=(1.0,) * 3)
    x = torch.from_numpy(ref.decode(doc["x"]))
    return model, lm, _batch(lm, x, list(doc["images"]), int(doc["audit_seed"]))


def _unit_noise(images: list[str], seed: int, samples: int, shape: tuple[int, ...]) -> np.ndarray:
    """sMPRT's unit noise as :func:`smprt_noise` defines it: image i's s-th draw is the s-th
    ``torch.randn(shape)`` of a CPU generator seeded by ``noise_seed(seed, image)``."""
    gens = [torch.Generator().manual_seed(noise_seed(seed, name)) for name in images]
    return np.stack(
        [np.stack([torch.randn(shape, generator=g).numpy() for g in gens]) for _ in range(samples - 1)]
    )


SMPRT = {"variant": "smprt", "granularity": "layers", "independent": False, "figure_images": 0}


@pytest.fixture(scope="module")
def quantus_doc() -> dict:
    return ref.load_stored()


@pytest.fixture(scope="module")
def on_quantus_weights(quantus_doc):
    """The check on the stored tiny model, its randomized copies given Quantus' values."""
    doc = quantus_doc
    model, lm, batch = _tiny(doc)
    assert batch.targets.tolist() == doc["targets"]
    check = Randomization(params={**SMPRT, "smprt_samples": doc["smprt"]["nr_samples"]})
    rm = check.models(batch)
    assert [s for s, _ in rm.steps] == doc["layer_order"] == ["fc", "conv2", "conv1"]
    for name in rm.random:
        rm.random[name] = torch.from_numpy(ref.decode(doc["randomized"][name]))
    source = build_source("gradient", post=["signed"])
    maps = source.maps(lm, batch.x, batch.targets)
    ((variant, m),) = check.measure(batch, source, maps).items()
    return {"check": check, "m": m, "variant": variant, "batch": batch, "model": model}


def test_noise_is_the_stored_noise(quantus_doc):
    """saliaudit's sMPRT noise for these images is the unit noise Quantus was given, scaled
    as Quantus scales it (σ = 0.1 · (max − min) per image, added in float64)."""
    doc = quantus_doc
    x = ref.decode(doc["x"])
    z = ref.decode(doc["smprt"]["unit_noise"])
    std = 0.1 * (x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True))
    copies = list(smprt_noise(torch.from_numpy(x), doc["images"], doc["audit_seed"], len(z) + 1, 0.1))
    assert len(copies) == len(z)
    for s, xn in enumerate(copies):
        want = torch.Tensor(x + z[s].astype(np.float64) * std)  # Quantus: torch.Tensor(x + ε)
        torch.testing.assert_close(xn, want, rtol=0, atol=1e-6)


def test_smprt_matches_quantus_per_layer(on_quantus_weights, quantus_doc):
    """SmoothMPRT(layer_order="top_down") on the same model, weights, inputs and noise:
    the similarity of the denoised maps after each cascade step, per image, to 1e-5."""
    scores = quantus_doc["smprt"]["scores"]
    curve = on_quantus_weights["m"].curves["cascading_smprt"]
    for k, layer in enumerate(quantus_doc["layer_order"]):
        np.testing.assert_allclose(curve[:, k], scores[layer], atol=TOL, rtol=0, err_msg=layer)
    # the verdict value per image is the cascade mean (Quantus' return_average_correlation
    # would also average in its "original" entry, a key its code means to skip)
    means = np.mean([scores[layer] for layer in quantus_doc["layer_order"]], axis=0)
    np.testing.assert_allclose(on_quantus_weights["m"].values, means, atol=TOL, rtol=0)


def test_emprt_matches_quantus(on_quantus_weights, quantus_doc):
    """EfficientMPRT: the entropy ratio (scores_fraction_explanation) and its score, the
    relative rise ratio − 1, per image, to 1e-5."""
    m = on_quantus_weights["m"]
    ratio = np.asarray(m.extra["measure_emprt"])
    np.testing.assert_allclose(ratio, quantus_doc["emprt"]["fraction"], atol=TOL, rtol=0)
    np.testing.assert_allclose(ratio - 1.0, quantus_doc["emprt"]["scores"], atol=TOL, rtol=0)
    cell = on_quantus_weights["check"].judge(on_quantus_weights["variant"], copy.deepcopy(m))
    e = cell.series["measures"]["emprt"]
    assert e["rise"] == pytest.approx(float(np.mean(quantus_doc["emprt"]["scores"])), abs=TOL)
    assert e["n"] == 4 and e["bins"] == 100 and len(e["ci"]) == 2


def test_reimplementation_matches_quantus(quantus_doc):
    """The reference re-implementation reproduces real Quantus' stored numbers."""
    doc = quantus_doc
    model = ref.stored_model(doc)
    x, y = ref.decode(doc["x"]), np.asarray(doc["targets"])
    z = ref.decode(doc["smprt"]["unit_noise"])
    got = ref.smprt_scores(model, x, y, z, doc["quantus_seed"])
    for layer, want in doc["smprt"]["scores"].items():
        np.testing.assert_allclose(got[layer], want, atol=1e-6, rtol=0)
    e = ref.emprt_scores(model, x, y, doc["quantus_seed"])
    np.testing.assert_allclose(e["fraction"], doc["emprt"]["fraction"], atol=1e-6, rtol=0)


def test_matches_reimplementation_on_saliaudit_randomization(quantus_doc):
    """The check's own randomization (PyTorch default re-initialization, seeded per module)
    on another input: sMPRT at every step and eMPRT agree with the re-implementation run on
    eager copies holding the same values, to 1e-5."""
    model = ref.stored_model(quantus_doc)
    lm = wrap_module(model, input_size=(16, 16), mean=(0.0,) * 3, std=(1.0,) * 3)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2.0 + 0.5
    images = ["a.png", "b.png", "c.png"]
    batch = _batch(lm, x, images, seed=3)
    samples = 4
    check = Randomization(params={**SMPRT, "smprt_samples": samples})
    source = build_source("gradient", post=["signed"])
    ((variant, m),) = check.measure(batch, source, source.maps(lm, batch.x, batch.targets)).items()
    rm = check.models(batch)
    z = _unit_noise(images, 3, samples, tuple(x.shape[1:]))
    x_np, y = x.numpy(), batch.targets.numpy()
    base = ref.smooth_explanation(model, x_np, y, z)
    flat = base.reshape(3, -1)
    copy_model = copy.deepcopy(model)
    for k, (_, names) in enumerate(rm.steps):
        with torch.no_grad():
            for n in names:
                copy_model.get_parameter(n).copy_(rm.random[n])
        smooth = ref.smooth_explanation(copy_model, x_np, y, z).reshape(3, -1)
        np.testing.assert_allclose(
            m.curves["cascading_smprt"][:, k], ref.correlation_spearman(flat, smooth), atol=TOL
        )
    before = [ref.discrete_entropy(a) for a in ref.quantus_gradient(model, x_np, y)]
    after = [ref.discrete_entropy(a) for a in ref.quantus_gradient(copy_model, x_np, y)]
    ratio_ref = np.asarray(after) / np.asarray(before)
    np.testing.assert_allclose(m.extra["measure_emprt"], ratio_ref, atol=TOL, rtol=0)
    assert variant.label == "gradient/signed"


def test_entropy_and_ratio_edge_cases():
    maps = np.zeros((3, 4, 4), dtype=np.float32)
    maps[1] = np.arange(16, dtype=np.float32).reshape(4, 4)  # 16 distinct values, 100 bins
    maps[2, 0, 0] = 1.0
    h = discrete_entropy(maps, 100)
    assert (
        h[0] == 0.0
        and h[1] == pytest.approx(np.log(16))
        and h[2] == pytest.approx(ref.discrete_entropy(maps[2]))
    )
    ratio, undefined = entropy_ratio(np.array([0.0, 0.0, 2.0]), np.array([0.0, 1.0, 3.0]))
    assert ratio[0] == 1.0 and np.isnan(ratio[1]) and ratio[2] == 1.5
    assert undefined.tolist() == [True, True, False]


# ------------------------------------------------------------------ the sample shapes model
@pytest.fixture(scope="module")
def shapes():
    full = make_batch(n=24)
    return full.select([0, 6, 12, 18, 1, 7, 13, 19])


def _cells(check, batch, names):
    out = {}
    for name in names:
        source = build_source(name, post=["abs"])
        for v, m in check.measure(batch, source, source.maps(batch.model, batch.x, batch.targets)).items():
            out[v.label] = check.judge(v, m)
    return out


@pytest.fixture(scope="module")
def emprt_cells(shapes):
    check = Randomization(params={"variant": "emprt", "independent": False, "max_steps": 3})
    return _cells(check, shapes, ["gradient", "random", "edge"])


@pytest.fixture(scope="module")
def smprt_cells(shapes):
    params = {
        "variant": "smprt",
        "independent": False,
        "max_steps": 3,
        "smprt_samples": 3,
        "verdict": "final",
    }
    return _cells(Randomization(params=params), shapes, ["gradient", "random", "edge"])


@pytest.mark.parametrize("control", ["random/abs", "edge/abs"])
def test_controls_fail_every_measure(emprt_cells, smprt_cells, control):
    """A map that ignores the model keeps its entropy (ratio exactly 1) and its denoised map
    (the same noisy copies on every model: similarity 1): FAIL under eMPRT and sMPRT, and
    every measure reported beside the verdict FAILs too."""
    for cells, value in ((emprt_cells, 1.0), (smprt_cells, 1.0)):
        cell = cells[control]
        assert cell.status == "fail", cell.message
        assert cell.value == pytest.approx(value, abs=1e-12) and cell.ci == pytest.approx([value, value])
        for name, s in cell.series["measures"].items():
            if s["computed"]:
                assert s["status"] == "fail", (name, s)
        assert "the verdict depends on the measure" not in cell.message


def test_emprt_judges_a_rise_and_reports_the_alternatives(emprt_cells):
    cell = emprt_cells["gradient/abs"]
    assert cell.status == "pass" and cell.value > 1.1 and cell.ci[0] > 1.1, cell.message
    assert "eMPRT entropy ratio" in cell.message and cell.metric.startswith("eMPRT")
    assert cell.thresholds == {"fail": 1.0, "warn": 1.1} and cell.series["higher_is_better"] is True
    ms = cell.series["measures"]
    assert ms["emprt"]["selected"] and ms["emprt"]["value"] == pytest.approx(cell.value)
    assert ms["emprt"]["ci"] == pytest.approx(cell.ci) and ms["emprt"]["n"] == cell.n == 8
    assert ms["emprt"]["entropy_randomized"] > ms["emprt"]["entropy_trained"]
    assert ms["mprt"]["computed"] and ms["mprt"]["n"] == 8 and not ms["mprt"]["selected"]
    assert len(ms["mprt"]["per_image"]) == 8 and ms["mprt"]["thresholds"] == {"fail": 0.7, "warn": 0.4}
    assert ms["smprt"]["computed"] is False and "alternatives" in ms["smprt"]["why"]
    # the message names another measure's verdict exactly when it differs
    differs = ms["mprt"]["status"] != cell.status
    assert ms["mprt"]["differs"] is differs
    assert ("MPRT gives " + ms["mprt"]["status"].upper() in cell.message) is differs


def test_smprt_verdict_and_alternatives(smprt_cells):
    cell = smprt_cells["gradient/abs"]
    assert cell.status == "pass", cell.message  # gradients change on the randomized model
    assert cell.metric.startswith("sMPRT") and "denoised maps" in cell.message
    ms = cell.series["measures"]
    assert (
        ms["smprt"]["selected"]
        and ms["smprt"]["samples"] == 3
        and ms["smprt"]["over"] == "fully randomized model"
    )
    assert ms["emprt"]["computed"] and ms["mprt"]["computed"]
    assert "cascading_smprt" not in cell.series  # verdict "final": the last step only


def test_differing_verdict_is_named(shapes):
    """Guided backprop survives the top layers' randomization: the MPRT cascade mean does
    not PASS it, while its entropy rises steeply (eMPRT PASS); the message says so."""
    check = Randomization(params={"independent": False, "max_steps": 4})
    cell = _cells(check, shapes, ["guided_backprop"])["guided_backprop/abs"]
    ms = cell.series["measures"]
    assert cell.status != "pass" and ms["emprt"]["status"] == "pass", cell.message
    assert ms["emprt"]["differs"] is True
    assert "the verdict depends on the measure: eMPRT gives PASS" in cell.message


def test_determinism_and_batch_splits(shapes):
    batch = shapes.select([0, 2, 5])
    params = {
        "variant": "smprt",
        "alternatives": "all",
        "independent": False,
        "max_steps": 2,
        "smprt_samples": 3,
    }
    runs = []
    for _ in range(2):
        check = Randomization(params=params)
        source = build_source("gradient", post=["signed"])
        runs.append(check.measure(batch, source, source.maps(batch.model, batch.x, batch.targets)))
    (v, a), (_, b) = next(iter(runs[0].items())), next(iter(runs[1].items()))
    assert a.values == b.values and a.extra["measure_emprt"] == b.extra["measure_emprt"]
    np.testing.assert_array_equal(a.curves["cascading_smprt"], b.curves["cascading_smprt"])
    check, merged = Randomization(params=params), Measurement()
    for idx in ([0], [1, 2]):
        part = batch.select(idx)
        source = build_source("gradient", post=["signed"])
        merged.extend(check.measure(part, source, source.maps(part.model, part.x, part.targets))[v])
    np.testing.assert_allclose(merged.values, a.values, atol=1e-5)
    np.testing.assert_allclose(merged.extra["measure_emprt"], a.extra["measure_emprt"], atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        {"variant": "xmprt"},
        {"alternatives": "some"},
        {"smprt_samples": 0},
        {"smprt_samples": 2.5},
        {"smprt_noise": -0.1},
        {"emprt_bins": 1},
    ],
)
def test_parameter_validation(bad):
    with pytest.raises(UsageError) as err:
        Randomization(params=bad)
    key = next(iter(bad))
    text = str(err.value)
    assert f"randomization.{key}" in text and "\n" not in text


def test_cost_counts_smprt_passes(shapes):
    ctx = CostContext(method=Passes(backward=1), variants=2, size=(64, 64), model=shapes.model)
    base = Randomization(params={"independent": False, "max_steps": 4})
    steps = base.steps(shapes.model)
    assert steps == 4 and base.cost(ctx).maps == 4
    assert (
        Randomization(params={"independent": False, "max_steps": 4, "variant": "emprt"}).cost(ctx).maps == 4
    )
    mean = Randomization(
        params={"independent": False, "max_steps": 4, "variant": "smprt", "smprt_samples": 5}
    )
    assert mean.cost(ctx).maps == 4 + (4 + 1) * 4
    final = Randomization(
        params={
            "independent": False,
            "max_steps": 4,
            "alternatives": "all",
            "verdict": "final",
            "smprt_samples": 5,
        }
    )
    assert final.cost(ctx).maps == 4 + 2 * 4
    assert [r["param"] for r in final.reductions()][0] == "alternatives"


def test_thresholds_and_info_follow_the_variant():
    e = Randomization(params={"variant": "emprt"}, thresholds={"warn": 1.3})
    assert e.t == {"fail": 1.0, "warn": 1.3} and e.sim_t == {"fail": 0.7, "warn": 0.4}
    info = e.info()
    assert info["higher_is_better"] is True and info["value_range"] is None
    assert info["thresholds"] == {"fail": 1.0, "warn": 1.3}
    s = Randomization(params={"variant": "smprt"}, thresholds={"fail": 0.6})
    assert s.t["fail"] == 0.6 and s.sim_t["fail"] == 0.6 and s.emprt_t == {"fail": 1.0, "warn": 1.1}
    assert s.info()["higher_is_better"] is False and s.info()["value_range"] == [-1.0, 1.0]
    described = Randomization.describe()
    assert set(described["measures"]) == {"mprt", "smprt", "emprt"}
    assert "Hedström" in described["reference"] and described["params"]["variant"] == "mprt"
    assert Randomization().metric.startswith("Spearman rank correlation of |map|")  # default unchanged


def test_user_model_unchanged_and_no_hooks():
    torch.manual_seed(0)
    model = ref.TinyNet().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_counts(model)
    lm = wrap_module(model, input_size=(16, 16), mean=(0.0,) * 3, std=(1.0,) * 3)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    batch = _batch(lm, x, ["p.png", "q.png"])
    x_before = x.clone()
    for params in (
        {**SMPRT, "smprt_samples": 3},
        {"variant": "emprt", "alternatives": "all", "smprt_samples": 2},
    ):
        check = Randomization(params=params)
        for name in ("gradient", "gradcam"):
            source = build_source(name, post=["signed"])
            out = check.measure(batch, source, source.maps(lm, batch.x, batch.targets))
            for v, m in out.items():
                check.judge(v, m)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert hook_counts(model) == hooks == 0 and not model.training
    assert torch.equal(x, x_before)


def test_audit_results_plan_and_report():
    """An audit with eMPRT deciding and sMPRT asked for: check_info turns the direction, the
    controls FAIL as they must, the plan counts sMPRT's passes as the audit ran them, the
    results survive JSON, and the report's section shows the measures table."""
    import json
    from pathlib import Path

    import saliaudit
    from saliaudit.report.html import render_html

    root = Path(__file__).resolve().parents[1]
    params = {
        "variant": "emprt",
        "alternatives": "all",
        "smprt_samples": 3,
        "max_steps": 3,
        "independent": False,
    }
    doc = saliaudit.audit(
        root / "sample_models" / "shapes_vgg.pt2",
        root / "sample_models" / "images" / "shapes",
        methods=["gradient", "random", "edge"],
        checks=["randomization"],
        max_images=4,
        seed=0,
        check_params={"randomization": params},
    ).to_dict()
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    info = doc["check_info"]["randomization"]
    assert info["higher_is_better"] is True and info["thresholds"] == {"fail": 1.0, "warn": 1.1}
    assert info["metric"].startswith("eMPRT") and set(info["measures"]) == {"mprt", "smprt", "emprt"}
    cells = {f"{c['method']}/{c['post']}": c for c in doc["checks"]}
    for label in ("random/signed", "random/abs", "edge/signed", "edge/abs"):
        assert cells[label]["status"] == "fail" and cells[label]["control"] == "expected"
    g = cells["gradient/signed"]
    assert g["value"] > 1.1 and g["series"]["measures"]["smprt"]["computed"]
    assert len(g["series"]["measures"]["smprt"]["per_image"]) == g["n"] == 4
    # per image: 3 cascade maps + (3 + 1) × (3 − 1) denoising maps, one backward pass each
    stage = doc["plan"]["stages"]["check:randomization"]
    assert stage["passes"]["backward"] == stage["counted"]["backward"] == 4 * (3 + 4 * 2)
    html = render_html(doc, examples=1, examples_html=1)
    section = html[html.index('id="check-randomization"') :]
    assert "<h3>Measures</h3>" in section and "eMPRT (verdict)" in section
    assert "<th>MPRT</th>" in section and "<th>sMPRT</th>" in section
    assert "The verdict is decided by eMPRT" in section and "Hedström" in section
