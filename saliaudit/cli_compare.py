"""``saliaudit compare`` (and the comparison of ``report --baseline``)."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import _bug, _fail, _folder_lines, _help, _like, _parse_option, err_console
from .config import SETTINGS
from .errors import SaliauditError, UsageError, suggest


def compare(
    old: Path = typer.Argument(
        ..., metavar="OLD", help="results.json of the earlier audit.", show_default=False
    ),
    new: Path = typer.Argument(
        ..., metavar="NEW", help="results.json of the later audit.", show_default=False
    ),
    output: str = typer.Option(
        "saliaudit-compare",
        "-o",
        "--output",
        metavar="FOLDER",
        help=_help("output folder", "saliaudit-compare"),
        show_default=False,
    ),
    format: str = typer.Option(
        "html,pdf,json",
        "--format",
        metavar="LIST",
        help=_help("comma-separated output formats: html, pdf, json (diff.json), junit", "html, pdf, json"),
        show_default=False,
    ),
    fail_on: str = typer.Option(
        "regression",
        "--fail-on",
        metavar="LEVEL",
        help=_help("when to exit 1: regression (a cell regressed) or never", "regression"),
        show_default=False,
    ),
    page_size: str | None = _like("page_size", "--page-size", metavar="SIZE", default="a4"),
    force: bool = typer.Option(False, "--force", help=_help(SETTINGS["force"].help), show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only one line: the regressions and the gate."),
) -> None:
    """Compare two audits cell by cell: old and new verdicts and values, each change with its
    95 % interval, what differs between the audits; exit 1 on a regression (--fail-on)."""
    from .compare import FAIL_ON, load_audit
    from .preflight import check_environment, planned_files
    from .report.compare_html import COMPARE_FILES
    from .report.output import OutputFolder, Planned

    out = None
    try:
        formats = _parse_option("--format", format, SETTINGS["format"].parse)
        size = _parse_option("--page-size", page_size, SETTINGS["page_size"].parse) or "a4"
        if fail_on not in FAIL_ON:
            raise UsageError(
                f"invalid --fail-on: expected regression or never, got {fail_on!r}{suggest(fail_on, FAIL_ON)}"
            )
        before, after = (old, load_audit(old)), (new, load_audit(new))
        check_environment(formats)
        out = OutputFolder(Path(output), force=force)
        out.prepare(Planned(files=planned_files(formats, COMPARE_FILES)))
        code = _comparison(out.path, before, after, formats, fail_on, ("compare", size), quiet)
    except SaliauditError as err:
        _fail(err, err.exit_code)
    except typer.Exit:
        raise
    except Exception as err:  # an unexpected bug: one line, the traceback with --debug
        _bug(err)
    finally:
        if out is not None:
            out.close()
            _folder_lines(out, quiet)
    raise typer.Exit(code)


def _comparison(
    out: Path,
    old: tuple[Path, dict],
    new: tuple[Path, dict],
    formats: list[str],
    fail_on: str,
    files: tuple[str, str],
    quiet: bool,
) -> int:
    """Compare and write the comparison (``files``: ``compare`` or ``baseline`` names, page
    size), print its summary; the exit code of its gate (3 without a PDF backend)."""
    from .report.compare_html import compare_and_write

    lines, code, pdf_error = compare_and_write(
        old,
        new,
        out,
        formats,
        fail_on=fail_on,
        baseline=files[0] == "baseline",
        page_size=files[1],
        quiet=quiet,
    )
    for line in lines:
        err_console.print(line, markup=False, soft_wrap=True)
    if pdf_error is not None:  # the other formats are written
        err_console.print(f"saliaudit: error: {pdf_error}", markup=False, soft_wrap=True)
        return pdf_error.exit_code
    return code
