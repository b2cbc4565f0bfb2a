"""The documentation lives in the repository: docs/ covers every registered method and check,
its links resolve, and nothing refers to a document outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from saliaudit.checks import check_names
from saliaudit.methods import method_names

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _product_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in ("saliaudit", "templates"):
        files += [
            p
            for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".ttf", ".pyc")
        ]
    return files


def test_no_reference_to_an_external_design_document():
    offenders = [
        str(p.relative_to(ROOT))
        for p in _product_files()
        if "design.md" in p.read_text(encoding="utf-8", errors="ignore")
    ]
    assert not offenders, f"refer to docs/ instead of design.md in: {offenders}"


def _mentioned(name: str, text: str) -> bool:
    return f"`{name}`" in text or f"## {name}\n" in text


@pytest.mark.parametrize("name", method_names())
def test_every_method_is_documented(name):
    assert _mentioned(name, (DOCS / "methods.md").read_text(encoding="utf-8")), (
        f"method {name!r} is registered but not documented in docs/methods.md"
    )


@pytest.mark.parametrize("name", check_names())
def test_every_check_is_documented(name):
    text = (DOCS / "checks.md").read_text(encoding="utf-8")
    assert f"## {name}\n" in text, f"check {name!r} has no '## {name}' section in docs/checks.md"


def _links() -> list[tuple[Path, str]]:
    out = []
    for page in sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]:
        for target in _LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # external URL or a link inside the page
            out.append((page, target))
    return out


def _anchors(page: Path) -> set[str]:
    """GitHub-style anchors of a Markdown page's headings."""
    anchors = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_relative_links_to_docs_resolve():
    links = _links()
    assert any(page.name == "README.md" and page.parent == ROOT and "docs/" in t for page, t in links), (
        "README.md should point to docs/"
    )
    broken = []
    for page, target in links:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve()
        if page.parent != DOCS and DOCS not in resolved.parents and resolved != DOCS:
            continue  # only links into docs/ (and every link of a docs page) are checked
        if not resolved.exists():
            broken.append(f"{page.relative_to(ROOT)}: {target}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links: " + "; ".join(broken)
