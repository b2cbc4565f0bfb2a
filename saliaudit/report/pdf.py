"""``report.pdf``: the report's HTML turned into PDF by WeasyPrint.

* The URL fetcher serves ``data:`` URIs only and refuses every other URL (``file:``, ``http:``,
  relative paths), so a crafted file name or class label in the results cannot make the
  renderer read a local file or reach the network. Every image and the bundled font are
  ``data:`` URIs already.
* Document metadata (title, author, description, keywords, dates) comes from the results; the
  dates come from ``SOURCE_DATE_EPOCH`` when it is set, which with a fixed file identifier
  makes the PDF byte-identical for the same results.
* A missing WeasyPrint or Pango raises :class:`PdfUnavailableError` (exit 3) with a one-line
  install hint.

Importing WeasyPrint sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`` process-wide; the
flag is restored after the import and after every render, since the image loader relies on
truncated files being refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote_to_bytes

from ..errors import EXIT_CANNOT_RUN, SaliauditError
from .figures import FigureMaker
from .html import render_html

__all__ = [
    "PdfUnavailableError",
    "load_weasyprint",
    "render_pdf",
    "pdf_from_html",
    "data_url",
    "INSTALL_HINT",
]

INSTALL_HINT = (
    "WeasyPrint needs the Pango libraries: on Debian/Ubuntu apt-get install libpango-1.0-0 "
    "libpangoft2-1.0-0, on macOS brew install pango; saliaudit doctor says what is missing"
)
_DATA = re.compile(r"data:([^,;]*)((?:;[^,;]*)*?)(;base64)?,(.*)\Z", re.S | re.I)


class PdfUnavailableError(SaliauditError):
    """WeasyPrint or its Pango libraries are missing: the PDF cannot be written (exit 3)."""

    exit_code = EXIT_CANNOT_RUN


class RefusedURL(ValueError):
    """The report tried to load something that is not a ``data:`` URI."""


@contextmanager
def _keep_truncated_flag() -> Iterator[None]:
    from PIL import ImageFile

    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def load_weasyprint() -> Any:
    """Import WeasyPrint (and so Pango); :class:`PdfUnavailableError` when it cannot load."""
    with _keep_truncated_flag():
        try:
            import weasyprint
        except Exception as err:  # ImportError, or OSError when Pango's libraries are missing
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise PdfUnavailableError(
                f"cannot write report.pdf: WeasyPrint or Pango is not available ({first})", hint=INSTALL_HINT
            ) from None
    return weasyprint


def data_url(url: str) -> tuple[bytes, str]:
    """(bytes, MIME type) of a ``data:`` URL; :class:`RefusedURL` for anything else."""
    m = _DATA.match(url.strip()) if isinstance(url, str) else None
    if not m:
        raise RefusedURL(f"saliaudit only loads data: URIs in reports, refused {url[:80]!r}")
    mime = (m.group(1) or "text/plain").strip().lower()
    try:
        body = base64.b64decode(m.group(4), validate=False) if m.group(3) else unquote_to_bytes(m.group(4))
    except (binascii.Error, ValueError) as err:
        raise RefusedURL(f"malformed data: URI ({err})") from None
    return body, mime


def _fetcher(weasyprint: Any) -> Any:
    urls = weasyprint.urls
    if hasattr(urls, "URLFetcher"):  # WeasyPrint >= 66

        class DataOnlyFetcher(urls.URLFetcher):
            def fetch(self, url: str, headers: Any = None) -> Any:
                body, mime = data_url(url)
                return urls.URLFetcherResponse(url, body, {"Content-Type": mime})

        return DataOnlyFetcher(allowed_protocols=("data",), fail_on_errors=False)

    def fetch(url: str, timeout: int = 10, ssl_context: Any = None) -> dict[str, Any]:
        body, mime = data_url(url)
        return {"string": body, "mime_type": mime, "redirected_url": url}

    return fetch


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def pdf_dates(doc: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, str]:
    """``created``/``modified`` for the PDF: SOURCE_DATE_EPOCH when set, else run start/now."""
    env = os.environ if environ is None else environ
    sde = str(env.get("SOURCE_DATE_EPOCH", "")).strip()
    if sde:
        try:
            when = _iso(int(sde))
            return {"created": when, "modified": when}
        except (ValueError, OverflowError, OSError):
            pass
    started = str((doc.get("run") or {}).get("started_at") or "") if isinstance(doc.get("run"), dict) else ""
    return {"created": started, "modified": _iso(datetime.now(timezone.utc).timestamp())}


def render_pdf(
    doc: dict[str, Any],
    *,
    examples: int = 6,
    examples_html: int = 24,
    page_size: str = "a4",
    figure_maker: FigureMaker | None = None,
    environ: dict[str, str] | None = None,
) -> bytes:
    """The PDF bytes of the report of ``doc``; raises :class:`PdfUnavailableError`."""
    weasyprint = load_weasyprint()
    html = render_html(
        doc,
        target="pdf",
        examples=examples,
        examples_html=examples_html,
        page_size=page_size,
        meta=pdf_dates(doc, environ),
        figure_maker=figure_maker,
    )
    return pdf_from_html(weasyprint, html, environ)


def pdf_from_html(weasyprint: Any, html: str, environ: dict[str, str] | None = None) -> bytes:
    """The PDF bytes of a self-contained HTML document (``data:`` URIs only, a file
    identifier from the HTML, ``SOURCE_DATE_EPOCH`` honoured): the report's and the
    comparison's one path through WeasyPrint."""
    options: dict[str, Any] = {}
    known = getattr(weasyprint, "DEFAULT_OPTIONS", {})
    ident = hashlib.sha256(html.encode("utf-8")).hexdigest()[:32].encode("ascii")
    if "pdf_identifier" in known:
        options["pdf_identifier"] = ident
    elif "identifier" in known:
        options["identifier"] = ident
    with _keep_truncated_flag(), _source_date_epoch(environ):
        document = weasyprint.HTML(string=html, base_url=None, url_fetcher=_fetcher(weasyprint))
        return document.write_pdf(**options)


@contextmanager
def _source_date_epoch(environ: dict[str, str] | None) -> Iterator[None]:
    """Expose the given SOURCE_DATE_EPOCH to fontTools while the fonts are subset (it stamps
    the subset font's ``head.modified`` with it, else with the current time)."""
    sde = (environ or {}).get("SOURCE_DATE_EPOCH") if environ is not None else None
    if sde is None or os.environ.get("SOURCE_DATE_EPOCH") == sde:
        yield
        return
    saved = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = str(sde)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)
        else:
            os.environ["SOURCE_DATE_EPOCH"] = saved
