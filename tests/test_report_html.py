"""The HTML report and results.json from a results document alone (docs/report.md).

Built on the synthetic fixture of ``tests/report_fixture.py`` (every check with series and
figures, hostile file name and class label), so it does not depend on the checks.
"""

from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markupsafe import escape

from saliaudit.errors import UsageError
from saliaudit.report.context import check_order, fmt, verdict_rows
from saliaudit.report.figures import FigureMaker, clean_map, decode_image, ranking
from saliaudit.report.html import build_context, render_html
from saliaudit.report.render import load_results, results_json, write_outputs

from .report_fixture import HOSTILE, HOSTILE_LABEL, make_results

SECTIONS = [
    "Saliency audit report",
    "Verdicts",
    "Post-processing caveats",
    "Completeness of the FullGrad decomposition",
    "Class sensitivity",
    "Model-parameter randomization",
    "Pixel perturbation (LeRF and MoRF)",
    "Sensitivity-n",
    "Sign flip (digit flipping, generalized)",
    "Batch-norm folding",
    "Pointing game",
    "Completeness per image",
    "Skipped inputs and errors",
    "Configuration, environment and references",
]


@pytest.fixture(scope="module")
def doc() -> dict:
    return make_results(10, n_examples=6)


@pytest.fixture(scope="module")
def page(doc) -> str:
    return render_html(doc, target="html", examples=3, examples_html=5)


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.headings: list[str] = []
        self._h = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("h1", "h2"):
            self._h = []

    def handle_endtag(self, tag):
        if tag in ("h1", "h2") and self._h is not None:
            self.headings.append("".join(self._h).strip())
            self._h = None

    def handle_data(self, data):
        self.text.append(data)
        if self._h is not None:
            self._h.append(data)


def parse(page: str) -> _Collect:
    p = _Collect()
    p.feed(page)
    return p


def test_sections_in_order(page):
    headings = parse(page).headings
    assert [h for h in headings if h in SECTIONS] == SECTIONS
    assert headings[0] == "Saliency audit report"


def test_hostile_names_escaped(page):
    assert "<script" not in page
    assert str(escape(HOSTILE)) in page  # &lt;script&gt;alert(1)&lt;/script&gt; &#34;x&#34; &amp; ü.png
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page  # the class label
    assert "&lt;img src=x onerror=alert(3)&gt; ü.png" in page  # a skipped input
    text = "".join(parse(page).text)
    assert HOSTILE in text and HOSTILE_LABEL in text  # intact once unescaped
    assert "ü" in page  # UTF-8, not mangled


def test_self_contained(page):
    assert not re.search(r"https?://|file:", page, re.I)
    for tag, attrs in parse(page).tags:
        for key in ("src", "href"):
            if key in attrs:
                value = attrs[key]
                assert value.startswith("data:image/") or (key == "href" and value.startswith("#")), (
                    tag,
                    value[:40],
                )
        assert tag not in ("script", "link", "iframe", "object", "embed")
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert re.search(r"url\((?!data:)", page) is None


def test_verdict_matrix_has_text_not_only_colour(page, doc):
    rows = verdict_rows(doc)
    assert rows[0]["label"] == "fullgrad" and rows[1]["label"] == "fullgrad/paper"
    n_cells = sum(len(r["cells"]) for r in rows)
    assert n_cells == len(doc["checks"])
    matrix = page.split('id="verdicts"')[1].split("</section>")[0]
    for word in ("PASS", "WARN", "FAIL", "ERROR", "SKIPPED"):
        assert word in matrix


def test_caveats_with_numbers(page):
    caveats = page.split('id="caveats"')[1].split("</section>")[0]
    assert "ψ decides" in caveats  # class_sensitivity differs between ψ
    assert "negative_share: 0.41" in caveats
    assert "41% of the bias-gradient mass" in caveats
    assert caveats.count("<tr>") == 1 + 6  # header + one row per ψ


def test_examples_follow_ranking_and_limits(doc):
    fm = FigureMaker(doc)
    ctx_pdf = build_context(doc, target="pdf", examples=2, examples_html=5, figure_maker=fm)
    ctx_html = build_context(doc, target="html", examples=2, examples_html=5, figure_maker=fm)
    ranked = ranking(doc)
    cs_pdf = next(s for s in ctx_pdf["sections"] if s["name"] == "class_sensitivity")["figures"]
    cs_html = next(s for s in ctx_html["sections"] if s["name"] == "class_sensitivity")["figures"]
    pdf_images = [h["image"] for g in cs_pdf["pairs"] for h in g["heads"]]
    html_images = [h["image"] for g in cs_html["pairs"] for h in g["heads"]]
    assert pdf_images == ranked[:2] and pdf_images[0] == HOSTILE
    assert html_images == ranked[:5]
    rnd = next(s for s in ctx_pdf["sections"] if s["name"] == "randomization")["figures"]
    assert [g["head"]["image"] for g in rnd["strips"]] == ranked[:2]
    assert all(len(g["columns"]) <= 8 for g in rnd["strips"])
    assert all(r["src"].startswith("data:image/jpeg;base64,") for g in rnd["strips"] for r in g["rows"])
    rnd_html = next(s for s in ctx_html["sections"] if s["name"] == "randomization")["figures"]
    assert all(r["src"].startswith("data:image/png;base64,") for g in rnd_html["strips"] for r in g["rows"])
    assert len(rnd["strips"][0]["rows"]) == 18  # one row per map variant


def test_colour_bars_follow_sign_handling(doc):
    ctx = build_context(doc, target="html", examples=1, examples_html=1)
    cs = next(s for s in ctx["sections"] if s["name"] == "class_sensitivity")["figures"]
    bars = [str(b) for b in cs["colorbars"]]
    assert len(bars) == 2 and "−max" in bars[0] and "+max" in bars[0] and "−max" not in bars[1]
    only_magnitude = copy.deepcopy(doc)
    only_magnitude["checks"] = [
        c for c in doc["checks"] if not (c["psi"] == "signed" or c["post"] == "signed")
    ]
    ctx = build_context(only_magnitude, target="html", examples=1, examples_html=1)
    cs = next(s for s in ctx["sections"] if s["name"] == "class_sensitivity")["figures"]
    assert [("+max" in str(b)) for b in cs["colorbars"]] == [False]


def test_plots_are_inline_svg_and_escaped(page):
    assert page.count("<svg") > 10
    assert "xmlns" not in page  # no namespace URL (no http string in the report)
    one = copy.deepcopy(make_results(3, n_examples=1))
    for c in one["checks"]:
        if c["check"] == "sensitivity_n":
            c["method"] = "<b>evil</b>"
    out = render_html(one, examples=1, examples_html=1)
    assert "<b>evil" not in out and "&lt;b&gt;evil" in out


def test_hostile_figures_are_refused(doc):
    evil = copy.deepcopy(make_results(3, n_examples=2))
    name = next(iter(evil["figures"]["images"]))
    evil["figures"]["images"][name]["thumbnail"] = "file:///etc/passwd"
    for c in evil["checks"]:
        figs = (c.get("series") or {}).get("figures") or {}
        for fig in figs.values():
            if "perturbed" in fig:
                fig["perturbed"] = [
                    "javascript:alert(1)",
                    "http://127.0.0.1/x.png",
                    "data:image/png;base64,!!!",
                ] + fig["perturbed"][3:]
            if "top1" in fig:
                fig["top1"] = [[1, "x"], [2]]
    out = render_html(evil, examples=2, examples_html=2)
    assert "javascript:" not in out and "127.0.0.1" not in out and "/etc/passwd" not in out
    assert decode_image("data:image/svg+xml;base64,PHN2Zz4=") is None
    assert clean_map([[1, 2], [3]]) is None and clean_map([[1, None]]).tolist() == [[1.0, 0.0]]


def test_results_before_checks_render(tmp_path):
    """A results document without check_info, figures or caveats (before the checks landed)."""
    minimal = {
        "schema_version": "1.0",
        "tool": {"name": "saliaudit", "version": "0.1.0"},
        "run": {"started_at": "2025-01-01T00:00:00+00:00"},
        "config": {"values": {}, "sources": {}},
        "model": {"path": "m.pt2", "sha256": "0" * 64},
        "inputs": {"found": 1, "loaded": 1, "skipped": []},
        "summary": {"status": "pass", "fail_on": "fail", "counts": {"pass": 1}, "gate_failed": False},
        "checks": [
            {
                "check": "completeness",
                "method": "fullgrad",
                "psi": None,
                "status": "pass",
                "value": 1e-7,
                "metric": "max relative residual",
                "thresholds": {"fail": 1e-3},
                "message": "ok",
                "per_image": [],
                "series": {},
            }
        ],
        "completeness": [
            {
                "image": "a.png",
                "target": 0,
                "target_name": "a",
                "logit": 2.0,
                "reconstructed": 2.0,
                "relative_residual": 1e-7,
            }
        ],
    }
    out = render_html(minimal)
    assert "Completeness per image" in out and "No caveat was computed" in out
    paths = write_outputs(minimal, tmp_path, ["json", "html", "junit"])
    assert [p.name for p in paths] == ["results.json", "junit.xml", "report.html"]
    assert json.loads((tmp_path / "results.json").read_text(encoding="utf-8")) == minimal
    empty = {"schema_version": "1.0"}
    assert "No check was run" in render_html(empty)


def test_results_json_round_trip_and_compact(doc, tmp_path):
    text = results_json(doc)

    def refuse(token):
        raise AssertionError(f"non-finite {token}")

    assert json.loads(text, parse_constant=refuse) == doc
    assert text.endswith("\n")
    assert '"x": [0.05, 0.1, 0.2, 0.3, 0.5, 0.7]' in text  # curves on one line
    (tmp_path / "results.json").write_text(text, encoding="utf-8")
    assert load_results(tmp_path / "results.json") == doc


def test_render_gives_the_same_html(doc, tmp_path):
    """What ``report`` wrote and what ``render`` rebuilds from results.json are identical."""
    first, second = tmp_path / "a", tmp_path / "b"
    write_outputs(doc, first, ["json", "html"], examples=2, examples_html=3)
    again = load_results(first / "results.json")
    write_outputs(again, second, ["html"], examples=2, examples_html=3)
    assert (first / "report.html").read_bytes() == (second / "report.html").read_bytes()


def test_settings_come_from_the_results(doc, tmp_path):
    d = copy.deepcopy(doc)
    d["config"]["values"]["examples_html"] = 1  # the HTML shows at least the PDF's examples
    d["config"]["values"]["examples"] = 1
    write_outputs(d, tmp_path, ["html"])
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    cs = page.split('id="check-class-sensitivity"')[1].split("</section>")[0]
    assert cs.count('class="imghead"') == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "not valid JSON"),
        ("[]", "no schema_version"),
        ('{"schema_version": "2.0"}', "unsupported schema_version"),
        ('{"schema_version": "1.0", "checks": {}}', "checks must be a list"),
        (
            '{"schema_version": "1.0", "checks": [{"check": "x", "method": "m", "status": "great"}]}',
            "status 'great'",
        ),
    ],
)
def test_load_results_rejects(tmp_path, text, message):
    path = tmp_path / "results.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError) as err:
        load_results(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError, match="not found"):
        load_results(tmp_path / "missing.json")


def test_helpers():
    assert fmt(None) == "–" and fmt(0.123456) == "0.123" and fmt(1e-7) == "1.00e-07" and fmt(3) == "3"
    assert check_order(
        {"checks": [{"check": "sign_flip"}, {"check": "custom"}, {"check": "completeness"}]}
    ) == ["completeness", "sign_flip", "custom"]


def test_templates_are_packaged():
    from importlib.resources import files

    root = files("saliaudit.templates")
    names = {p.name for p in root.iterdir()}
    assert {
        "report.html.j2",
        "report.css",
        "DejaVuSans.ttf",
        "DejaVuSans-Bold.ttf",
        "DejaVuSansMono.ttf",
        "DejaVu-LICENSE.txt",
    } <= names
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    patterns = re.search(r'"saliaudit.templates" = \[(.*?)\]', pyproject).group(1)
    for name in names - {"__init__.py", "README.md", "__pycache__"}:
        assert any(Path(name).match(p.strip().strip('"')) for p in patterns.split(",")), name
