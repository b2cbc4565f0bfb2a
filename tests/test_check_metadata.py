"""Each check is the single source of truth about itself: a check registered from outside the
package (here, a toy check defined in this test) shows up in ``saliaudit checks``, the terminal
verdict table, ``results.json`` (cells and ``check_info``), the HTML report and JUnit without
editing any other module; results written before ``check_info`` carried every field still
render."""

from __future__ import annotations

import copy
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from saliaudit.checks import CHECKS, check_names, get_check
from saliaudit.checks.base import Check, Curve, Measurement, register
from saliaudit.cli import app
from saliaudit.report.context import check_info, check_order
from saliaudit.report.html import render_html
from saliaudit.report.junit import render_junit
from saliaudit.report.terminal import verdict_table

ROOT = Path(__file__).resolve().parents[1] / "sample_models"
TOY = "toy_mean_abs"
FIELDS = (
    "title",
    "short",
    "summary",
    "reference",
    "metric",
    "higher_is_better",
    "order",
    "thresholds",
    "params",
    "curves",
    "controls_must_fail",
    "requires",
    "needs_masks",
    "ranks_examples",
    "shows_class_maps",
    "informational",
)


def _define_toy() -> type[Check]:
    """The toy check, registered with the public decorator (as a plugin would)."""

    @register
    class ToyMeanAbs(Check):
        name = TOY
        title = "Toy check: mean absolute saliency"
        short = "toy"
        summary = "Mean of |map| per image; a map that is zero everywhere explains nothing."
        reference = "a test of saliaudit's check registry"
        metric = "mean |map| per image"
        higher_is_better = True
        order = 5  # before every built-in check
        thresholds = {"fail": 0.0}
        params = {"bands": 4}
        curves = {
            "toy_profile": Curve("Toy profile of |map| by band", "band of pixels", "mean |map|", primary=True)
        }

        def measure(self, batch, source, maps):
            out = {}
            for v, m in maps.items():
                flat = m.detach().abs().double().flatten(1)
                bands = torch.stack(
                    [b.mean(1) for b in torch.tensor_split(flat, int(self.p["bands"]), dim=1)], 1
                )
                out[v] = Measurement(
                    values=flat.mean(1).tolist(),
                    images=list(batch.images),
                    curves={"toy_profile": bands.numpy()},
                    axes={"toy_profile": list(range(bands.shape[1]))},
                )
            return out

        def judge(self, variant, m):
            value = m.mean()
            ok = value is not None and value > float(self.t["fail"])
            return self.result(
                variant,
                m,
                "pass" if ok else "fail",
                value,
                f"mean |map| {value:.3g}" if value is not None else "no value",
            )

    return ToyMeanAbs


TOY_METHOD = "toy_centre_map"


def _define_toy_method() -> None:
    """A toy method, registered with the public decorator from this test module."""
    import saliaudit

    @saliaudit.register_method(TOY_METHOD, family="gradient", reference="a test of the registry")
    def toy_centre(model, x, targets, *, width: float = 0.25):
        """A centred Gaussian bump scaled by the target logit (toy)."""
        h, w = x.shape[2:]
        yy = torch.linspace(-1, 1, h).view(-1, 1)
        xx = torch.linspace(-1, 1, w).view(1, -1)
        bump = torch.exp(-(xx**2 + yy**2) / width)
        logit = model(x).gather(1, targets.view(-1, 1)).detach()
        return (bump * logit.view(-1, 1, 1)).unsqueeze(1)


@pytest.fixture
def toy() -> Iterator[type[Check]]:
    from saliaudit.methods import METHODS, method_names

    check_names()  # the built-in checks first
    method_names()
    cls = _define_toy()
    _define_toy_method()
    try:
        yield cls
    finally:
        CHECKS.pop(TOY, None)
        METHODS.pop(TOY_METHOD, None)
    assert TOY not in check_names() and TOY_METHOD not in method_names()


@pytest.fixture
def audited(toy, tmp_path, monkeypatch) -> dict[str, Any]:
    """One small audit through the CLI: the toy check only, two cheap methods, 4 images."""
    for key in list(os.environ):
        if key.startswith("SALIAUDIT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "report",
            str(ROOT / "shapes_vgg.pt2"),
            str(ROOT / "images" / "shapes"),
            "-o",
            str(out),
            "--methods",
            f"gradient,random,{TOY_METHOD}",
            "--checks",
            TOY,
            "--max-images",
            "4",
            "--batch-size",
            "4",
            "--format",
            "json,html,junit",
            "--no-overlays",
            "--examples",
            "1",
            "--examples-html",
            "2",
            "--fail-on",
            "never",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return {"output": result.output, "doc": doc, "out": out}


def test_builtin_checks_declare_what_the_product_needs():
    names = check_names()
    assert {
        "completeness",
        "class_sensitivity",
        "randomization",
        "perturbation",
        "sensitivity_n",
        "sign_flip",
        "bn_folding",
        "pointing_game",
        "restricted_pointing_game",
    } <= set(names)
    orders = [get_check(n).order for n in names]
    assert orders == sorted(orders)
    for n in names:
        info = get_check(n).describe()
        assert set(FIELDS) <= set(info), n
        assert info["title"] and info["metric"] and info["summary"] and info["reference"], n
        assert info["short"] and len(info["short"]) <= 6, n
        assert isinstance(info["higher_is_better"], bool), n
        for curve in info["curves"].values():
            assert curve["title"] and set(curve) >= {"xlabel", "ylabel", "primary", "baseline"}
        json.dumps(info)  # JSON-ready
    assert len({get_check(n).short for n in names}) == len(names)  # distinct column heads


def test_toy_check_everywhere(audited, toy):
    doc, output, out = audited["doc"], audited["output"], audited["out"]
    # results.json: cells and check_info
    cells = [c for c in doc["checks"] if c["check"] == TOY]
    assert {(c["method"], c["post"]) for c in cells} == {
        (m, p) for m in ("gradient", "random", TOY_METHOD) for p in ("signed", "abs")
    }
    # the toy method: in the results, the terminal table, the HTML, JUnit and the listing
    entry = next(m for m in doc["methods"] if m["method"] == TOY_METHOD)
    assert entry["status"] == "ok" and entry["params"] == {"width": 0.25}
    assert f"{TOY_METHOD}/signed" in output
    methods_listing = CliRunner().invoke(app, ["methods"])
    assert methods_listing.exit_code == 0 and TOY_METHOD in methods_listing.output
    assert "A centred Gaussian bump" in methods_listing.output
    assert all(c["status"] == "pass" and c["value"] > 0 for c in cells)
    info = doc["check_info"][TOY]
    assert set(FIELDS) <= set(info)
    assert info["title"] == toy.title and info["short"] == "toy" and info["higher_is_better"] is True
    assert info["curves"]["toy_profile"]["title"] == "Toy profile of |map| by band"
    assert info["params"] == {"bands": 4} and info["thresholds"] == {"fail": 0.0}
    for name, entry in doc["check_info"].items():
        assert entry["title"] and entry["short"] and entry["metric"], name
        assert isinstance(entry["higher_is_better"], bool), name
    # terminal verdict table (the report command prints it)
    assert "saliaudit verdicts" in output and TOY in output
    # HTML: its own section with title, summary and curve
    html = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="check-toy-mean-abs"' in html
    assert toy.title in html and "a map that is zero everywhere explains nothing" in html
    assert "Toy profile of |map| by band" in html
    # JUnit: one test case per cell, named by the check, with its title
    root = ET.fromstring((out / "junit.xml").read_text(encoding="utf-8"))
    cases = [c for c in root.iter("testcase") if c.get("classname") == TOY]
    assert len(cases) == 6
    assert any(TOY_METHOD in (c.get("name") or "") for c in cases)
    assert TOY_METHOD in (out / "report.html").read_text(encoding="utf-8")
    props = {p.get("name"): p.get("value") for p in cases[0].iter("property")}
    assert props["check_title"] == toy.title and props["higher_is_better"] == "true"
    # saliaudit checks lists it
    listing = CliRunner().invoke(app, ["checks"])
    assert listing.exit_code == 0 and TOY in listing.output and toy.title in listing.output
    assert check_order(doc)[0] == TOY


def test_results_without_the_new_check_info_fields_render(audited, toy):
    old = copy.deepcopy(audited["doc"])
    keep = ("title", "summary", "reference", "metric", "thresholds", "params")
    old["check_info"] = {k: {f: v[f] for f in keep} for k, v in old["check_info"].items()}
    for m in old["methods"]:
        m.pop("option", None)
        m.pop("variants", None)
    assert check_info(old, TOY)["short"] == "toy"  # from the registered class
    html = render_html(old, examples=1, examples_html=1)
    assert "Toy profile of |map| by band" in html
    assert TOY in render_junit(old)
    assert verdict_table(old, 200) is not None
    # a check nobody registered (and no check_info at all): generic defaults
    stranger = copy.deepcopy(audited["doc"])
    stranger.pop("check_info")
    for c in stranger["checks"]:
        c["check"] = "unknown_check"
    info = check_info(stranger, "unknown_check")
    assert info["title"] == "Unknown check" and info["short"] == "unknow" and info["curves"] == {}
    html = render_html(stranger, examples=1, examples_html=1)
    assert "Unknown check" in html
    table, _ = verdict_table(stranger, 200)
    assert table.columns[1].header == "unknown_check"
    assert "unknown_check" in render_junit(stranger)
