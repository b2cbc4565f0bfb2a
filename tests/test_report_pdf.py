"""report.pdf: WeasyPrint output of the report templates (docs/report.md).

One A4 PDF of the synthetic sample audit is rendered per module and inspected with poppler's
``pdftotext``/``pdfinfo`` (pypdf as a fallback for the text): sections in order, hostile names
intact, page numbers, metadata, nothing drawn outside the page. A small US Letter report is
rendered twice with ``SOURCE_DATE_EPOCH`` to check that the bytes are identical.
"""

from __future__ import annotations

import builtins
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import ImageFile

from saliaudit.report import pdf as pdfmod
from saliaudit.report.render import write_outputs

from .report_fixture import HOSTILE, HOSTILE_LABEL, make_results
from .test_report_html import SECTIONS

try:  # load_weasyprint restores Pillow's LOAD_TRUNCATED_IMAGES, which tests/test_data relies on
    weasyprint = pdfmod.load_weasyprint()
except pdfmod.PdfUnavailableError as err:
    pytest.skip(str(err), allow_module_level=True)

HAVE_POPPLER = shutil.which("pdftotext") is not None and shutil.which("pdfinfo") is not None


def pdf_text(path: Path) -> str:
    """The PDF's text in reading order: pdftotext, else pypdf, else skip."""
    if shutil.which("pdftotext"):
        return subprocess.run(
            ["pdftotext", "-enc", "UTF-8", str(path), "-"], capture_output=True, check=True, timeout=120
        ).stdout.decode("utf-8")
    pypdf = pytest.importorskip("pypdf", reason="neither pdftotext nor pypdf is available")
    return "\n".join(p.extract_text() or "" for p in pypdf.PdfReader(str(path)).pages)


def pdf_info(path: Path) -> dict[str, str]:
    if not HAVE_POPPLER:
        pytest.skip("pdfinfo (poppler-utils) not installed")
    out = subprocess.run(
        ["pdfinfo", "-isodates", str(path)], capture_output=True, check=True, timeout=60
    ).stdout.decode("utf-8")
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines()) if v}


def flat(text: str) -> str:
    return " ".join(text.replace("\u00ad", "").split())


@pytest.fixture(scope="module")
def a4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pdf-a4")
    write_outputs(make_results(10, n_examples=3), out, ["pdf"], examples=3, page_size="a4", environ={})
    return out / "report.pdf"


@pytest.fixture(scope="module")
def letter(tmp_path_factory) -> tuple[Path, Path]:
    doc = make_results(4, n_examples=1, comparison=("gradient", "edge"))
    paths = []
    for name in ("one", "two"):
        out = tmp_path_factory.mktemp(f"pdf-letter-{name}")
        write_outputs(
            doc, out, ["pdf"], examples=1, page_size="letter", environ={"SOURCE_DATE_EPOCH": "1700000000"}
        )
        paths.append(out / "report.pdf")
    return paths[0], paths[1]


def test_pdf_opens_with_sections_in_order(a4):
    data = a4.read_bytes()
    assert data.startswith(b"%PDF-") and b"%%EOF" in data[-64:]
    text = flat(pdf_text(a4))
    positions = [text.find(s) for s in SECTIONS]
    assert all(p >= 0 for p in positions), [s for s, p in zip(SECTIONS, positions) if p < 0]
    # the contents list on the cover names every section first: look after it, in order
    pos = text.find("Configuration, environment and references")
    for section in SECTIONS[1:]:
        found = text.find(section, pos + 1)
        assert found > pos, f"{section!r} missing or out of order"
        pos = found


def test_pdf_hostile_text_intact(a4):
    text = flat(pdf_text(a4))
    assert HOSTILE in text
    assert HOSTILE_LABEL in text
    assert "&lt;" not in text and "&amp;" not in text and "&#34;" not in text


def test_pdf_pages_numbered_and_metadata(a4):
    text = pdf_text(a4)
    info = pdf_info(a4)
    pages = int(info["Pages"])
    assert pages > 10
    assert f"Page 1 of {pages}" in text and f"Page {pages} of {pages}" in text
    assert "A4" in info["Page size"]
    assert info["Title"] == "saliaudit report: shapes_vgg.pt2"
    assert info["Author"].startswith("saliaudit ")
    assert info["CreationDate"].startswith("2025-06-01T12:00:00")
    fonts = subprocess.run(["pdffonts", str(a4)], capture_output=True, timeout=60).stdout.decode()
    names = [ln.split()[0] for ln in fonts.splitlines()[2:] if ln.strip()]
    assert names and all("DejaVu-Sans" in n for n in names), names  # the bundled family only
    assert all(" yes yes " in ln for ln in fonts.splitlines()[2:] if ln.strip())  # embedded subsets


def _words_outside(path: Path) -> list[str]:
    """Words whose box leaves the page (an overflowing table or a clipped figure)."""
    out = subprocess.run(
        ["pdftotext", "-bbox", str(path), "-"], capture_output=True, check=True, timeout=120
    ).stdout.decode("utf-8")
    bad = []
    for page in re.finditer(r'<page width="([\d.]+)" height="([\d.]+)">(.*?)</page>', out, re.S):
        w, h = float(page.group(1)), float(page.group(2))
        for m in re.finditer(
            r'<word xMin="([\d.-]+)" yMin="([\d.-]+)" xMax="([\d.-]+)" yMax="([\d.-]+)">(.*?)</word>',
            page.group(3),
        ):
            x0, y0, x1, y1 = map(float, m.groups()[:4])
            # 10 mm margins are the least the stylesheet leaves; text beyond them overflowed
            if x0 < 28 or y0 < 14 or x1 > w - 28 or y1 > h - 14:
                bad.append(m.group(5))
    return bad


@pytest.mark.skipif(not HAVE_POPPLER, reason="poppler-utils not installed")
def test_pdf_nothing_outside_the_page(a4, letter):
    assert _words_outside(a4) == []
    assert _words_outside(letter[0]) == []


def test_pdf_letter_and_byte_identical(letter):
    one, two = letter
    assert one.read_bytes() == two.read_bytes()
    info = pdf_info(one)
    assert "letter" in info["Page size"]
    assert info["CreationDate"].startswith("2023-11-14T22:13:20")
    assert info["ModDate"].startswith("2023-11-14T22:13:20")


def test_fetcher_serves_data_uris_only():
    fetcher = pdfmod._fetcher(weasyprint)
    assert pdfmod.data_url("data:text/plain;base64,aGk=") == (b"hi", "text/plain")
    assert pdfmod.data_url("data:,a%20b") == (b"a b", "text/plain")
    for url in (
        "file:///etc/passwd",
        "http://127.0.0.1:9/x.png",
        "https://example.invalid/a.css",
        "/etc/passwd",
        "../secret.png",
        "ftp://x/y",
    ):
        with pytest.raises(pdfmod.RefusedURL):
            fetcher(url)


def test_crafted_references_are_not_fetched(tmp_path):
    """A file name or label that makes it into markup as a URL still reaches no file."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not read")
    calls = []
    base = pdfmod._fetcher(weasyprint)

    class Spy(type(base)):
        def fetch(self, url, headers=None):
            calls.append(url)
            return super().fetch(url, headers)

    html = (
        f'<html><head><link rel="stylesheet" href="file://{secret}"></head><body>'
        f'<img src="file://{secret}"><img src="{secret}"><img src="http://127.0.0.1:9/x.png">'
        f'<p style="background: url(file://{secret})">x</p></body></html>'
    )
    pdf = weasyprint.HTML(
        string=html, base_url=None, url_fetcher=Spy(allowed_protocols=("data",))
    ).write_pdf()
    assert pdf.startswith(b"%PDF")
    assert calls, "WeasyPrint did not ask the fetcher"
    assert all(not c.startswith("data:") for c in calls)  # every one refused by data_url


def test_missing_weasyprint_writes_the_rest(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_weasyprint(name, *args, **kwargs):
        if name == "weasyprint" or name.startswith("weasyprint."):
            raise OSError(
                "cannot load library 'libpango-1.0-0': libpango-1.0-0: cannot open shared object file"
            )
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_weasyprint)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    doc = make_results(3, n_examples=1)
    with pytest.raises(pdfmod.PdfUnavailableError) as err:
        write_outputs(doc, tmp_path, ["html", "pdf", "json", "junit"], examples=1, examples_html=1)
    message = str(err.value)
    assert err.value.exit_code == 3 and "\n" not in message
    assert "saliaudit doctor" in message and "libpango-1.0-0 libpangoft2-1.0-0" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junit.xml", "report.html", "results.json"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_import_keeps_pillow_truncated_flag(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    pdfmod.load_weasyprint()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
