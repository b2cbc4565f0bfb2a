"""``saliaudit render``: rebuild the report from a results.json, without the model."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import _bug, _fail, _folder_lines, _help, _like, _parse_option, err_console
from .cli_report import write_results
from .config import SETTINGS
from .errors import EXIT_OK, SaliauditError


def render(
    results: Path = typer.Argument(
        ..., metavar="RESULTS", help="results.json written by saliaudit report.", show_default=False
    ),
    output: str | None = typer.Option(
        None,
        "-o",
        "--output",
        metavar="FOLDER",
        help=_help("output folder", "the folder of RESULTS"),
        show_default=False,
    ),
    format: str = typer.Option(
        "html,pdf",
        "--format",
        metavar="LIST",
        help=_help(SETTINGS["format"].help, "html,pdf"),
        show_default=False,
    ),
    page_size: str | None = _like(
        "page_size", "--page-size", metavar="SIZE", default="as in the results, else a4"
    ),
    examples: int | None = _like("examples", "--examples", metavar="K", default="as in the results, else 6"),
    examples_html: int | None = _like(
        "examples_html", "--examples-html", metavar="K", default="as in the results, else 24"
    ),
    force: bool = typer.Option(False, "--force", help=_help(SETTINGS["force"].help), show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not list the files written."),
) -> None:
    """Rebuild the HTML/PDF (and JSON/JUnit) report from a results.json, without the model."""
    from .preflight import check_environment, planned_files
    from .report.output import OutputFolder, Planned
    from .report.render import load_results

    out = None
    try:
        formats = _parse_option("--format", format, SETTINGS["format"].parse)
        size = _parse_option("--page-size", page_size, SETTINGS["page_size"].parse)
        n_pdf = _parse_option("--examples", examples, SETTINGS["examples"].parse)
        n_html = _parse_option("--examples-html", examples_html, SETTINGS["examples_html"].parse)
        doc = load_results(results)
        check_environment(formats)
        out = OutputFolder(Path(output) if output else results.parent, force=force)
        out.prepare(Planned(files=planned_files(formats)))
        written, pdf_error = write_results(
            out, doc, formats, examples=n_pdf, examples_html=n_html, page_size=size
        )
        for p in written if not quiet else []:
            err_console.print(f"wrote {p}", markup=False)
        if pdf_error is not None:  # the other formats are written: exit 3 with its message
            raise pdf_error
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
    raise typer.Exit(EXIT_OK)
