"""Write the requested outputs of a results document: used by ``report`` and ``render``.

:func:`write_outputs` takes the ``results.json`` dictionary only, never the model, so
``saliaudit render results.json -o OUT`` rebuilds exactly what the audit wrote. Every file is
written atomically. The PDF comes last: when WeasyPrint or Pango is missing, the other formats
are already on disk when :class:`~saliaudit.report.pdf.PdfUnavailableError` (exit 3) is raised.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .context import STATUSES, as_dict
from .figures import FigureMaker
from .output import FILES, atomic_write

__all__ = ["write_outputs", "load_results", "results_json", "FILES", "ORDER", "report_settings"]

#: The order formats are written in: the PDF last, so that a missing PDF backend leaves the
#: other formats on disk.
ORDER = ("json", "junit", "html", "pdf")
DEFAULTS = {"examples": 6, "examples_html": 24, "page_size": "a4"}


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _flat(items: list) -> bool:
    return all(_scalar(v) or (isinstance(v, list) and all(_scalar(w) for w in v)) for v in items)


def _record(v: Any) -> bool:
    """A small dict of scalars (a per-image record such as ``{image, value}``): one line."""
    return isinstance(v, dict) and 0 < len(v) <= 4 and all(_scalar(w) for w in v.values())


def _dump(obj: Any, level: int) -> str:
    if isinstance(obj, dict) and obj and not (level > 1 and _record(obj)):
        pad = "  " * (level + 1)
        body = ",\n".join(
            f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {_dump(v, level + 1)}" for k, v in obj.items()
        )
        return "{\n" + body + "\n" + "  " * level + "}"
    if isinstance(obj, (list, tuple)) and obj and not _flat(list(obj)):
        pad = "  " * (level + 1)
        return "[\n" + ",\n".join(pad + _dump(v, level + 1) for v in obj) + "\n" + "  " * level + "]"
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def results_json(doc: dict[str, Any]) -> str:
    """The results document as written to ``results.json``: UTF-8, finite numbers, indented by
    two spaces, with lists of numbers (curves, small maps) and small records of scalars
    (``per_image`` entries) kept on one line."""
    return _dump(doc, 0) + "\n"


def report_settings(doc: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """``examples``, ``examples_html`` and ``page_size``: the given value, else the one the
    results were produced with, else the default."""
    values = as_dict(as_dict(doc.get("config")).get("values"))
    out = {}
    for key, default in DEFAULTS.items():
        v = overrides.get(key)
        if v is None:
            v = values.get(key)
        if key == "page_size":
            v = str(v).lower() if str(v).lower() in ("a4", "letter") else default
        else:
            v = v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default
        out[key] = v
    return out


def write_outputs(
    doc: dict[str, Any],
    out_dir: Path,
    formats: list[str],
    *,
    examples: int | None = None,
    examples_html: int | None = None,
    page_size: str | None = None,
    environ: dict[str, str] | None = None,
    on_format: Callable[[str], None] | None = None,
    manifest: Callable[[], list[dict[str, Any]]] | None = None,
) -> list[Path]:
    """Write ``formats`` (json, junit, html, pdf) of ``doc`` into ``out_dir``; returns the paths.
    ``on_format(name)`` is called before each format is rendered (progress).

    With ``manifest`` (a report run), ``results.json`` is written last, also when another
    format failed, with ``manifest()`` (the files of the run written so far) as its
    ``manifest``; without it, first and as ``doc`` is."""
    out_dir = Path(out_dir)
    unknown = sorted(set(formats) - set(FILES))
    if unknown:
        raise UsageError(f"unknown output format {unknown[0]!r}", hint="choose from " + ", ".join(FILES))
    settings = report_settings(doc, examples=examples, examples_html=examples_html, page_size=page_size)
    written: list[Path] = []
    figures = FigureMaker(doc) if ("html" in formats or "pdf" in formats) else None
    last = manifest is not None and "json" in formats

    def write(fmt_name: str) -> None:
        path = out_dir / FILES[fmt_name]
        if on_format is not None:
            on_format(fmt_name)
        if fmt_name == "json":
            data: str | bytes = results_json(doc if manifest is None else {**doc, "manifest": manifest()})
        elif fmt_name == "junit":
            from .junit import render_junit

            data = render_junit(doc)
        elif fmt_name == "html":
            from .html import render_html

            data = render_html(doc, target="html", figure_maker=figures, **settings)
        else:
            from .pdf import render_pdf

            data = render_pdf(doc, figure_maker=figures, environ=environ, **settings)
        written.append(atomic_write(path, data))

    try:
        for fmt_name in ORDER:
            if fmt_name in formats and not (last and fmt_name == "json"):
                write(fmt_name)
    finally:
        if last:
            write("json")
    return written


def load_results(
    path: Path, *, version_hint: str = "render it with the saliaudit version that wrote it"
) -> dict[str, Any]:
    """Read and validate a ``results.json``; :class:`UsageError` (exit 2) names the file.
    ``version_hint`` says what to do with a file of an unsupported schema version."""
    path = Path(path)
    hint = "pass the results.json that saliaudit report wrote"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError("results file not found", path=path, hint=hint) from None
    except IsADirectoryError:
        raise UsageError("is a folder, not a results file", path=path, hint=hint) from None
    except UnicodeDecodeError:
        raise UsageError("not a results file (not UTF-8 text)", path=path, hint=hint) from None
    except OSError as err:
        raise UsageError(f"cannot read the results file ({err.strerror})", path=path, hint=hint) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(
            f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})", path=path, hint=hint
        ) from None
    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise UsageError("not a saliaudit results document (no schema_version)", path=path, hint=hint)
    version = str(doc.get("schema_version"))
    if version.split(".")[0] != "1":
        raise UsageError(
            f"unsupported schema_version {version!r} (this saliaudit reads 1.x)",
            path=path,
            hint=version_hint,
        )
    for key, kind in (
        ("checks", list),
        ("summary", dict),
        ("model", dict),
        ("inputs", dict),
        ("config", dict),
        ("run", dict),
        ("tool", dict),
    ):
        if key in doc and doc[key] is not None and not isinstance(doc[key], kind):
            raise UsageError(
                f"malformed results: {key} must be a{'n object' if kind is dict else ' list'}",
                path=path,
                hint=hint,
            )
    for i, c in enumerate(doc.get("checks") or []):
        if (
            not isinstance(c, dict)
            or not isinstance(c.get("check"), str)
            or not isinstance(c.get("method"), str)
        ):
            raise UsageError(
                f"malformed results: checks[{i}] needs a check and a method", path=path, hint=hint
            )
        if str(c.get("status")) not in STATUSES:
            raise UsageError(
                f"malformed results: checks[{i}] has status {c.get('status')!r} "
                f"(expected one of {', '.join(STATUSES)})",
                path=path,
                hint=hint,
            )
    return doc
