"""The ``saliaudit`` command line: options → config → audit → render.

The command line is the only place that catches errors and maps them to exit codes
(docs/report.md, "Exit codes"): 0 no check reached ``--fail-on`` · 1 the gate failed
(``compare``, ``--baseline``: a cell regressed) · 2 usage error · 3 the audit could not run ·
4 no usable images · 5 no verdict · 130 interrupted (Ctrl-C or SIGTERM; a partial results.json
is kept).

This module is the entry point (``saliaudit.cli:main``) and the table of commands, in the order
``saliaudit --help`` lists them. The app, the error-to-exit-code mapping and the option helpers
are in ``cli_common``; each command's body is in its own module (``cli_report``, ``cli_render``,
``cli_compare``, ``cli_info``, ``cli_explain``).
"""

from __future__ import annotations

import typer

from . import __version__
from .cli_common import _DEBUG, _Command, app
from .cli_compare import compare
from .cli_explain import explain
from .cli_info import checks_command, doctor, methods_command
from .cli_render import render
from .cli_report import report, write_results
from .errors import EXIT_OK

__all__ = ["app", "main", "write_results"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"saliaudit {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    _DEBUG["on"] = debug


app.command(cls=_Command, short_help="Audit MODEL on IMAGES and write the report.")(report)
app.command(cls=_Command, short_help="Rebuild the report from a results.json.")(render)
app.command(cls=_Command, short_help="Compare two audits: regressions, improvements, what differs.")(compare)
app.command("methods", cls=_Command, short_help="List the saliency methods and their parameters.")(
    methods_command
)
app.command("checks", cls=_Command, short_help="List the sanity checks, thresholds and parameters.")(
    checks_command
)
app.command(cls=_Command, short_help="Write one saliency map of one image as a PNG.")(explain)
app.command(cls=_Command, short_help="Check the environment (torch, devices, PDF backend).")(doctor)


def main() -> None:
    """Console-script entry point (``saliaudit`` and ``python -m saliaudit``)."""
    app(prog_name="saliaudit")
