"""Plugins and the public API: a method registered from outside the package is listed,
audited, reported and gated like a built-in one; entry points; one-line errors."""

from __future__ import annotations

import json
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from PIL import ImageFile
from typer.testing import CliRunner

import saliaudit
from saliaudit import plugins
from saliaudit.checks import check_names
from saliaudit.checks.base import CHECKS
from saliaudit.cli import app
from saliaudit.methods import METHODS, get_method, method_names

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sample_models" / "shapes_vgg.pt2"
IMAGES = ROOT / "sample_models" / "images" / "shapes"

PLUGIN = '''
import saliaudit
import torch


@saliaudit.register_method("toy_plugin_map", reference="a test plugin")
def toy(model, x, targets, *, scale: float = 2.0):
    """Input times a constant (independent of the model)."""
    return x * scale
'''


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No config file or SALIAUDIT_* variable leaks in; the registries are restored."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    for key in [k for k in __import__("os").environ if k.startswith("SALIAUDIT_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    method_names()  # the built-ins are registered before the snapshot
    check_names()
    methods, checks, loaded = dict(METHODS), dict(CHECKS), dict(plugins._loaded)
    yield
    METHODS.clear()
    METHODS.update(methods)
    CHECKS.clear()
    CHECKS.update(checks)
    plugins._loaded.clear()
    plugins._loaded.update(loaded)


def _plugin_file(tmp_path: Path, text: str = PLUGIN, name: str = "toy_plugin.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


def test_plugin_file_method_is_listed_audited_reported_and_gated(tmp_path):
    plugin = _plugin_file(tmp_path)
    listing = _invoke("methods", "--plugin", plugin)
    assert listing.exit_code == 0, listing.output
    assert "toy_plugin_map" in listing.output and "Input times a constant" in listing.output

    out = tmp_path / "out"
    res = _invoke(
        "report",
        MODEL,
        IMAGES,
        "-o",
        out,
        "--plugin",
        plugin,
        "-q",
        "--methods",
        "toy_plugin_map,gradient",
        "--checks",
        "class_sensitivity",
        "--max-images",
        "4",
        "--format",
        "json,html,junit",
        "--no-overlays",
    )
    assert res.exit_code in (0, 1), res.output
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    entry = next(m for m in doc["methods"] if m["method"] == "toy_plugin_map")
    assert entry["status"] == "ok" and entry["params"] == {"scale": 2.0}
    assert doc["config"]["values"]["plugins"] == [str(plugin.resolve())]
    assert doc["config"]["sources"]["plugins"] == "flag"
    cells = [c for c in doc["checks"] if c["method"] == "toy_plugin_map"]
    assert {c["post"] for c in cells} == {"signed", "abs"}
    assert all(c["check"] == "class_sensitivity" and c["status"] in ("pass", "warn", "fail") for c in cells)
    # x·scale does not depend on the class: its maps for two classes are identical, so the
    # check must FAIL it, and the gate (--fail-on fail) fails with it
    assert all(c["status"] == "fail" for c in cells), [c["message"] for c in cells]
    assert res.exit_code == 1
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "toy_plugin_map" in html
    cases = [
        tc.get("name", "") + tc.get("classname", "")
        for tc in ET.parse(out / "junit.xml").getroot().iter("testcase")
    ]
    assert any("toy_plugin_map" in c for c in cases)


def test_plugin_in_config_file_is_resolved_against_the_file(tmp_path):
    sub = tmp_path / "project"
    sub.mkdir()
    _plugin_file(sub)
    (sub / "saliaudit.toml").write_text('plugins = ["toy_plugin.py"]\n', encoding="utf-8")
    from saliaudit.config import resolve_config

    cfg = resolve_config({"methods": "toy_plugin_map"}, config_file=sub / "saliaudit.toml", environ={})
    assert cfg.plugins == [str((sub / "toy_plugin.py").resolve())]
    assert cfg.sources["plugins"].startswith("config file")
    assert cfg.methods == ["toy_plugin_map"]


@pytest.mark.parametrize(
    "text,needle",
    [
        ("raise RuntimeError('boom')\n", "failed to load: RuntimeError: boom"),
        ("import saliaudit_no_such_module\n", "ModuleNotFoundError"),
    ],
)
def test_broken_plugin_is_a_one_line_usage_error(tmp_path, text, needle):
    plugin = _plugin_file(tmp_path, text, "broken.py")
    res = _invoke("report", MODEL, IMAGES, "-o", tmp_path / "out", "--plugin", plugin)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output
    assert lines[0].startswith("saliaudit: error:") and needle in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_plugin_file_and_module(tmp_path):
    for spec in (str(tmp_path / "nope.py"), "saliaudit_no_such_plugin_module"):
        res = _invoke("checks", "--plugin", spec)
        assert res.exit_code == 2 and "not found" in res.output, res.output


def test_entry_point_plugins_are_discovered(tmp_path, monkeypatch):
    """An installed package registers through the ``saliaudit.methods`` entry-point group."""
    site = tmp_path / "site"
    (site / "toy_ep_pkg").mkdir(parents=True)
    (site / "toy_ep_pkg" / "__init__.py").write_text(
        textwrap.dedent('''
        import saliaudit

        @saliaudit.register_method("toy_ep_map", family="gradient", reference="entry point")
        def toy(model, x, targets):
            """Zeros."""
            return x * 0
        '''),
        encoding="utf-8",
    )
    dist = site / "toy_ep_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-ep-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[saliaudit.methods]\ntoy = toy_ep_pkg\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "_entry_points_loaded", set())
    try:
        plugins.load_entry_points("saliaudit.methods")
        method = get_method("toy_ep_map")
        assert method.family == "gradient" and "toy-ep-pkg" in method.origin
        assert "toy_ep_map" in method_names()
    finally:
        sys.modules.pop("toy_ep_pkg", None)


def test_register_check_refuses_a_non_check():
    with pytest.raises(TypeError, match="subclass of saliaudit.Check"):
        saliaudit.register_check(object)


def test_public_api_audit_render_explain(tmp_path):
    result = saliaudit.audit(
        MODEL,
        IMAGES,
        methods=["gradient", "random"],
        checks=["class_sensitivity"],
        max_images=3,
        overlays=False,
    )
    assert isinstance(result, saliaudit.AuditResult)
    assert len(result.images) == 3
    assert {c.method for c in result.checks} == {"gradient", "random"}
    files = saliaudit.render(result, tmp_path / "out", formats=["json", "html"])
    assert {p.name for p in files} == {"results.json", "report.html"}
    again = saliaudit.render(tmp_path / "out" / "results.json", tmp_path / "again", formats=["json"])
    assert (
        json.loads(again[0].read_text(encoding="utf-8"))["checks"]
        == json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))["checks"]
    )

    lm = saliaudit.load_model(MODEL)
    x = torch.rand(2, 3, *lm.input_size)
    a = saliaudit.explain(lm, x, [0, 1], "fullgrad")
    assert a.shape == (2, 1, *lm.input_size)
    fg = saliaudit.full_gradients(lm, x, [0, 1])
    assert torch.allclose(a[:, 0], fg.saliency("signed"))
    assert set(saliaudit.__all__) >= {
        "load_model",
        "full_gradients",
        "explain",
        "audit",
        "render",
        "register_method",
        "register_check",
        "Check",
    }


def test_no_submodule_shadows_a_public_function():
    """Importing ``saliaudit.X`` binds the submodule to the package attribute ``X``: a module
    named like a public function would replace it (``saliaudit.explain`` became a module)."""
    import pkgutil

    modules = {m.name for m in pkgutil.iter_modules(saliaudit.__path__)}
    assert not modules & set(saliaudit.__all__), modules & set(saliaudit.__all__)
