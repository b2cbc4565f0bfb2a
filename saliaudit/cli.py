"""The ``saliaudit`` command line: options → config → audit → render.

This is the only place that catches errors and maps them to exit codes (docs/report.md, "Exit codes"):
0 no check reached ``--fail-on`` · 1 the gate failed (``compare``, ``--baseline``: a cell
regressed) · 2 usage error · 3 the audit could not run · 4 no usable images · 5 no verdict ·
130 interrupted (Ctrl-C or SIGTERM; a partial results.json is kept).
"""

from __future__ import annotations

import signal
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

try:  # Typer >= 0.20 vendors Click; its exceptions are the ones raised
    from typer._click import exceptions as click
except ImportError:  # pragma: no cover - older Typer on the Click package
    from click import exceptions as click

from . import __version__
from .config import SETTINGS
from .errors import (
    EXIT_CANNOT_RUN,
    EXIT_GATE,
    EXIT_INTERRUPTED,
    EXIT_NO_IMAGES,
    EXIT_NO_VERDICT,
    EXIT_OK,
    EXIT_USAGE,
    ImageError,
    SaliauditError,
    UsageError,
    suggest,
)

if TYPE_CHECKING:
    from .report.output import OutputFolder
    from .report.pdf import PdfUnavailableError
    from .result import AuditResult

err_console = Console(stderr=True, highlight=False)
_DEBUG = {"on": False}


def _error_line(message: str) -> None:
    err_console.print(f"saliaudit: error: {message}", markup=False, soft_wrap=True)


def _click_message(err: click.ClickException) -> str:
    """Click's own usage errors (unknown option, bad value, missing argument) in saliaudit's
    one-line style: ``message (hint)``."""
    ctx = getattr(err, "ctx", None)
    where = f"run '{ctx.command_path} --help'" if ctx is not None else "run 'saliaudit --help'"
    if isinstance(err, click.NoSuchOption):
        known = [o for p in ctx.command.params for o in p.opts + p.secondary_opts] if ctx else []
        return f"unknown option {err.option_name}{suggest(err.option_name, known)} ({where})"
    if isinstance(err, click.UsageError) and "No such command" in err.message and ctx is not None:
        word = err.message.split("'")[1] if "'" in err.message else ""
        commands = getattr(ctx.command, "commands", {})
        return f"unknown command {word!r}{suggest(word, commands)} ({where})"
    message = err.format_message().strip().rstrip(".")
    message = message[:1].lower() + message[1:]
    return f"{message} ({where})" if isinstance(err, click.UsageError) else message


class _Group(TyperGroup):
    """The ``saliaudit`` group: Click's usage errors print one ``saliaudit: error:`` line and
    exit 2, like every other usage error (no boxed panel)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        try:
            rv = super().main(
                args=args,
                prog_name=prog_name or "saliaudit",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except click.NoArgsIsHelpError as err:
            click.echo(err.ctx.get_help())
            rv = EXIT_OK
        except click.ClickException as err:
            if _DEBUG["on"]:
                err_console.print(traceback.format_exc(), markup=False)
            _error_line(_click_message(err))
            rv = err.exit_code if isinstance(err, click.UsageError) else EXIT_USAGE
        except typer.Abort:
            err_console.print("saliaudit: interrupted", markup=False)
            rv = EXIT_INTERRUPTED
        except UsageError as err:  # raised before a command body runs
            _error_line(str(err))
            rv = err.exit_code
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


class _Command(TyperCommand):
    """A command whose help names its arguments by their metavar (``MODEL IMAGES``, not
    ``{model} {images}`` or ``MODEL <path>``)."""

    def collect_usage_pieces(self, ctx):  # noqa: D102
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                name = p.metavar or str(p.name).upper()
                pieces.append(name if p.required else f"[{name}]")
        return pieces

    def format_options(self, ctx, formatter):  # noqa: D102
        args, opts = [], []
        for p in self.get_params(ctx):
            record = p.get_help_record(ctx)
            if record is None:
                continue
            if p.param_type_name == "argument":
                args.append((p.metavar or str(p.name).upper(), getattr(p, "help", None) or ""))
            else:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


app = typer.Typer(
    name="saliaudit",
    cls=_Group,
    rich_markup_mode=None,
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Audit whether the saliency maps of a PyTorch image classifier can be trusted.",
)


class Interrupted(BaseException):
    """Raised from the SIGTERM handler (Ctrl-C raises KeyboardInterrupt)."""


def _fail(err: BaseException, code: int) -> NoReturn:
    if _DEBUG["on"]:
        err_console.print(traceback.format_exc(), markup=False)
    _error_line(str(err))
    raise typer.Exit(code)


def _bug(err: Exception) -> NoReturn:
    """An unexpected exception (a bug in saliaudit): one line and exit 3, the traceback with --debug."""
    _fail(
        RuntimeError(f"unexpected {type(err).__name__}: {err} (rerun with --debug and report it)"),
        EXIT_CANNOT_RUN,
    )


def _version(value: bool) -> None:
    if value:
        typer.echo(f"saliaudit {__version__}")
        raise typer.Exit(EXIT_OK)


def _sentence(text: str) -> str:
    first = text.split(" ", 1)[0]
    if (
        first.islower() and first.rstrip(":").replace("-", "").isalpha()
    ):  # not a name such as sign_flip, cpu or ::error::
        text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else f"{text}."


def _help(text: str, default: str | None = None) -> str:
    """Help text as a sentence, with the default (Typer would put a ``show_default`` string in
    parentheses, and Rich markup would swallow a literal ``[default: ...]``)."""
    return _sentence(text) + (f" Default: {default}." if default is not None else "")


def _setting(name: str, *decls: str, metavar: str | None = None) -> Any:
    """A ``report`` option for the setting ``name``: its help and the default shown by
    ``--help`` come from :data:`saliaudit.config.SETTINGS`, which also supplies the value when
    the flag is not given (``None`` here means "not given"). Numbers are taken as text and
    parsed by the setting, so ``--batch-size abc`` is reported like ``SALIAUDIT_BATCH_SIZE=abc``."""
    setting = SETTINGS[name]
    return typer.Option(
        None,
        *(decls or (f"--{name.replace('_', '-')}",)),
        help=_help(setting.help, setting.default_text()),
        show_default=False,
        metavar=metavar,
    )


def _like(name: str, *decls: str, metavar: str | None = None, default: str | None = None) -> Any:
    """An option of another command that means what the setting ``name`` means."""
    setting = SETTINGS[name]
    shown = (
        default if default is not None else (setting.default_text() if setting.default is not None else None)
    )
    return typer.Option(None, *decls, help=_help(setting.help, shown), show_default=False, metavar=metavar)


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    _DEBUG["on"] = debug


_CONFIG_HELP = _help("TOML configuration file", "the nearest saliaudit.toml or pyproject.toml upwards")
_MODEL_HELP = (
    "Model file: .pt2, state_dict (.pt/.pth/.safetensors with --arch), TorchScript, "
    "or a pickled module with --trust-model."
)


@app.command(cls=_Command, short_help="Audit MODEL on IMAGES and write the report.")
def report(
    model: Path = typer.Argument(..., metavar="MODEL", help=_MODEL_HELP, show_default=False),
    images: Path = typer.Argument(
        ...,
        metavar="IMAGES",
        help="Image folder (recursive; ImageFolder layout gives labels), a list file or one image.",
        show_default=False,
    ),
    output: str | None = _setting("output", "-o", "--output", metavar="FOLDER"),
    format: str | None = _setting("format", metavar="LIST"),
    config: Path | None = typer.Option(
        None,
        "--config",
        metavar="FILE",
        help=_CONFIG_HELP,
        show_default=False,
    ),
    methods: str | None = _setting("methods", metavar="LIST"),
    psi: str | None = _setting("psi", metavar="LIST"),
    post: str | None = _setting("post", metavar="LIST"),
    cam_layer: str | None = _setting("cam_layer", metavar="NAME"),
    checks: str | None = _setting("checks", metavar="LIST"),
    threshold: list[str] | None = _setting("thresholds", "--threshold", metavar="CHECK.NAME=VALUE"),
    check_param: list[str] | None = _setting("check_params", "--check-param", metavar="CHECK.NAME=VALUE"),
    method_param: list[str] | None = _setting("method_params", "--method-param", metavar="METHOD.NAME=VALUE"),
    flip: str | None = _setting("flip", metavar="C:C'"),
    masks: str | None = _setting("masks", metavar="FOLDER"),
    max_images: str | None = _setting("max_images", metavar="N"),
    sample: str | None = _setting("sample", metavar="N"),
    batch_size: str | None = _setting("batch_size", metavar="N"),
    profile: str | None = _setting("profile", metavar="NAME"),
    budget: str | None = _setting("budget", metavar="DURATION"),
    seed: str | None = _setting("seed", metavar="INTEGER"),
    device: str | None = _setting("device", metavar="DEVICE"),
    fail_on: str | None = _setting("fail_on", metavar="LEVEL"),
    arch: str | None = _setting("arch", metavar="NAME"),
    num_classes: str | None = _setting("num_classes", metavar="K"),
    input_size: str | None = _setting("input_size", metavar="H,W"),
    mean: str | None = _setting("mean", metavar="R,G,B"),
    std: str | None = _setting("std", metavar="R,G,B"),
    labels: str | None = _setting("labels", metavar="FILE"),
    trust_model: bool | None = _setting("trust_model"),
    max_pixels: str | None = _setting("max_pixels", metavar="N"),
    overlays: str | None = _setting("overlays", metavar="MODE"),
    no_overlays: bool = typer.Option(False, "--no-overlays", help="Same as --overlays none."),
    force: bool | None = _setting("force"),
    examples: str | None = _setting("examples", metavar="K"),
    examples_html: str | None = _setting("examples_html", metavar="K"),
    page_size: str | None = _setting("page_size", metavar="SIZE"),
    annotations: bool | None = _setting("annotations", "--annotations/--no-annotations"),
    plugin: list[str] | None = _setting("plugins", "--plugin", metavar="MODULE"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or table on the terminal."),
    baseline: Path | None = typer.Option(
        None,
        "--baseline",
        metavar="RESULTS",
        help=_help(
            "results.json of an earlier audit: compare with it (diff.json, compare.html, compare.pdf "
            "in the output folder) and exit 1 on a regression unless --fail-on never",
            "none",
        ),
        show_default=False,
    ),
) -> None:
    """Audit MODEL on IMAGES and write the results (and maps) to the output folder.

    Every option can also be set as SALIAUDIT_NAME in the environment or in saliaudit.toml;
    exit codes: 0 pass, 1 the --fail-on gate failed, 2 usage error, 3 the audit could not run,
    4 no usable images, 130 interrupted.
    """
    from .config import resolve_config

    flags: dict[str, Any] = dict(
        output=output,
        format=format,
        psi=psi,
        methods=methods,
        post=post,
        cam_layer=cam_layer,
        checks=checks,
        thresholds=threshold or None,
        check_params=check_param or None,
        method_params=method_param or None,
        flip=flip,
        masks=masks,
        max_images=max_images,
        sample=sample,
        batch_size=batch_size,
        profile=profile,
        budget=budget,
        seed=seed,
        device=device,
        fail_on=fail_on,
        arch=arch,
        num_classes=num_classes,
        input_size=input_size,
        mean=mean,
        std=std,
        labels=labels,
        trust_model=trust_model,
        max_pixels=max_pixels,
        overlays=overlays,
        force=force,
        examples=examples,
        examples_html=examples_html,
        page_size=page_size,
        annotations=annotations,
        plugins=plugin or None,
    )
    try:
        flags["overlays"] = _overlays_flag(overlays, no_overlays)
        cfg = resolve_config(flags, config_file=config)
        _check_inputs(model=model, images=images)
        old = None
        if baseline is not None:  # a bad baseline is a usage error, before the audit runs
            from .compare import load_audit

            old = (baseline, load_audit(baseline))
    except SaliauditError as err:
        _fail(err, err.exit_code)
    code = _run_report(model, images, cfg, quiet, baseline=old)
    raise typer.Exit(code)


def _overlays_flag(overlays: str | None, no_overlays: bool) -> str | None:
    """``--overlays MODE``, with ``--no-overlays`` as ``--overlays none`` (both given: they
    must agree)."""
    if not no_overlays:
        return overlays
    try:
        mode = None if overlays is None else SETTINGS["overlays"].parse(overlays)
    except ValueError:
        return overlays  # resolve_config reports the invalid value
    if mode not in (None, "none"):
        raise UsageError(f"--no-overlays contradicts --overlays {overlays}", hint="pass one of them")
    return "none"


def _check_inputs(
    *, model: Path | None = None, images: Path | None = None, image: Path | None = None
) -> None:
    """The paths the user named exist and are of the right kind (usage errors, exit 2), before
    a model is loaded or anything is written."""
    from .model_formats import inspect_file

    if model is not None and (not model.exists() or not model.is_file()):
        inspect_file(model)  # its message: not found, or a folder
    if images is not None and not images.exists():
        hint = "broken symbolic link" if images.is_symlink() else "check the IMAGES path"
        raise UsageError("image source does not exist", path=images, hint=hint)
    if image is not None:
        if not image.exists():
            raise UsageError("image file not found", path=image, hint="check the IMAGE path")
        if image.is_dir():
            raise UsageError(
                "is a folder, not an image file",
                path=image,
                hint="pass one image; saliaudit report audits a folder",
            )


def _run_report(
    model: Path, images: Path, cfg, quiet: bool, baseline: tuple[Path, dict] | None = None
) -> int:
    from .engine import new_result, run_audit
    from .model import resolve_device
    from .report.output import OutputFolder
    from .report.terminal import print_summary, progress_bar, quiet_line

    out = OutputFolder(Path(cfg.output), force=cfg.force)
    result = None
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # noqa: ARG001
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    try:
        out.prepare()
        result = new_result(cfg, datetime.now(timezone.utc), resolve_device(cfg.device))
        from .report.plan_text import plan_lines

        def show_plan(plan) -> None:
            if not quiet:
                for line in plan_lines(result.plan):
                    err_console.print(line, markup=False, soft_wrap=True)

        with progress_bar(err_console, quiet) as progress:
            run_audit(model, images, cfg, out.path, progress=progress, result=result, on_plan=show_plan)
            doc = result.to_dict()
            hook = progress.rendering(cfg.format) if progress else None
            # on pdf_error, the rest is written
            _, pdf_error = write_results(out, doc, cfg.format, on_format=hook)
            if progress:
                progress.finish()
        _ci_outputs(doc, cfg.annotations)
        if not quiet:
            print_summary(err_console, doc, out.path, cfg.format)

        def compared(code: int) -> int:  # --baseline: the worse of the two exit codes
            if baseline is None:
                return code
            gate = "never" if cfg.fail_on == "never" else "regression"
            try:  # the audit is done and written: a failing comparison does not change its results
                other = _comparison(
                    out.path,
                    baseline,
                    (out.path / "results.json", doc),
                    cfg.format,
                    gate,
                    ("baseline", cfg.page_size),
                    quiet,
                )
            except SaliauditError as err:
                _error_line(f"the comparison with --baseline failed: {err}")
                other = err.exit_code
            return max(
                code, other, key=lambda c: {EXIT_GATE: 1, EXIT_NO_VERDICT: 2, EXIT_CANNOT_RUN: 3}.get(c, 0)
            )

        if pdf_error is not None:
            err_console.print(f"saliaudit: error: {pdf_error}", markup=False, soft_wrap=True)
            return compared(pdf_error.exit_code)
        code = EXIT_GATE if result.summary.get("gate_failed") else EXIT_OK
        no_verdict = result.summary.get("no_verdict") and cfg.fail_on != "never"
        if no_verdict:
            code = EXIT_NO_VERDICT
        if quiet:  # exactly one line: the verdict, the gate and the results file
            err_console.print(quiet_line(doc, out.path, code), markup=False, soft_wrap=True)
        elif no_verdict:
            err_console.print(
                f"saliaudit: no verdict: {result.summary.get('reason')}", markup=False, soft_wrap=True
            )
        return compared(code)
    except (KeyboardInterrupt, Interrupted):
        reason = "interrupted by SIGTERM" if sys.exc_info()[0] is Interrupted else "interrupted (Ctrl-C)"
        if result is not None:
            result.inputs["loaded"] = len(result.images)
            result.summarize(cfg.fail_on, status="error", reason=reason)
            write_results(out, result, ["json"])
        err_console.print(
            f"saliaudit: {reason}; partial results in {out.path / 'results.json'}", markup=False
        )
        return EXIT_INTERRUPTED
    except SaliauditError as err:
        if result is not None and out.prepared:
            result.summarize(cfg.fail_on, status="error", reason=str(err))
            write_results(out, result, ["json"])
        _fail(err, err.exit_code)
    except typer.Exit:
        raise
    except Exception as err:  # an unexpected bug: one line, the traceback with --debug
        _bug(err)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_CANNOT_RUN


def write_results(
    out: OutputFolder, results: AuditResult | dict[str, Any], formats: list[str], **settings: Any
) -> tuple[list[Path], PdfUnavailableError | None]:
    """The CLI's one write path, used by ``report``, ``render`` and the partial results of an
    interrupted or failed audit: the requested ``formats`` of ``results`` (an
    :class:`~saliaudit.result.AuditResult` or its ``results.json`` dictionary) into the
    prepared output folder ``out``, with :func:`saliaudit.report.render.write_outputs` (each
    file atomically, the PDF last). ``settings`` override the report settings recorded in the
    results (examples, examples_html, page_size).

    Returns the paths written and, when WeasyPrint or Pango is missing, the
    :class:`~saliaudit.report.pdf.PdfUnavailableError` (every other format is written by then)
    for the caller to report; any other error is raised."""
    from .report.output import FILES
    from .report.pdf import PdfUnavailableError
    from .report.render import ORDER, write_outputs

    doc = results if isinstance(results, dict) else results.to_dict()
    try:
        return write_outputs(doc, out.path, formats, **settings), None
    except PdfUnavailableError as err:
        return [out.path / FILES[f] for f in ORDER if f in formats and f != "pdf"], err


def _ci_outputs(doc: dict[str, Any], annotations: bool) -> None:
    """Append the job summary when ``$GITHUB_STEP_SUMMARY`` is set; print annotations on request."""
    import os

    from .report.ci import append_step_summary, emit_annotations

    if os.environ.get("GITHUB_STEP_SUMMARY"):
        try:
            append_step_summary(doc)
        except OSError as err:
            err_console.print(
                f"saliaudit: warning: cannot append to $GITHUB_STEP_SUMMARY ({err.strerror})", markup=False
            )
    if annotations:
        emit_annotations(doc, typer.echo)


@app.command(cls=_Command, short_help="Rebuild the report from a results.json.")
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
    from .report.output import OutputFolder
    from .report.render import load_results

    try:
        formats = _parse_option("--format", format, SETTINGS["format"].parse)
        size = _parse_option("--page-size", page_size, SETTINGS["page_size"].parse)
        n_pdf = _parse_option("--examples", examples, SETTINGS["examples"].parse)
        n_html = _parse_option("--examples-html", examples_html, SETTINGS["examples_html"].parse)
        doc = load_results(results)
        out = OutputFolder(Path(output) if output else results.parent, force=force)
        out.prepare()
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
    raise typer.Exit(EXIT_OK)


def _parse_option(flag: str, value: Any, parse: Any) -> Any:
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as err:
        raise UsageError(f"invalid {flag}: {err}") from None


@app.command(cls=_Command, short_help="Compare two audits: regressions, improvements, what differs.")
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
    from .report.output import OutputFolder

    try:
        formats = _parse_option("--format", format, SETTINGS["format"].parse)
        size = _parse_option("--page-size", page_size, SETTINGS["page_size"].parse) or "a4"
        if fail_on not in FAIL_ON:
            raise UsageError(
                f"invalid --fail-on: expected regression or never, got {fail_on!r}{suggest(fail_on, FAIL_ON)}"
            )
        before, after = (old, load_audit(old)), (new, load_audit(new))
        out = OutputFolder(Path(output), force=force)
        out.prepare()
        code = _comparison(out.path, before, after, formats, fail_on, ("compare", size), quiet)
    except SaliauditError as err:
        _fail(err, err.exit_code)
    except typer.Exit:
        raise
    except Exception as err:  # an unexpected bug: one line, the traceback with --debug
        _bug(err)
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


_PLUGIN_HELP = _sentence(SETTINGS["plugins"].help)


def _print_block(console: Console, text: str | Text, indent: int = 0, style: str = "") -> None:
    """``text`` wrapped to the terminal width, every line (continuation lines included)
    indented by ``indent``."""
    body = text if isinstance(text, Text) else Text(text, style=style)
    for line in body.wrap(console, max(console.width - indent, 20)):
        line.rstrip()
        console.print(Text(" " * indent) + line, soft_wrap=True)


@app.command("methods", cls=_Command, short_help="List the saliency methods and their parameters.")
def methods_command(
    model: Path | None = typer.Option(
        None, "--model", metavar="MODEL", help="Also show the layers the CAM methods would use on this model."
    ),
    arch: str | None = _like("arch", "--arch", metavar="NAME"),
    input_size: str | None = _like("input_size", "--input-size", metavar="H,W"),
    plugin: list[str] | None = typer.Option(None, "--plugin", metavar="MODULE", help=_PLUGIN_HELP),
) -> None:
    """List the saliency methods with their parameters (and, for a model, the CAM layers)."""
    from .config import DEFAULT_METHODS
    from .methods import METHODS, method_names
    from .psi import PSI_PRESETS

    _load_plugins(plugin)
    lm = None
    if model is not None:  # a bad --model fails before the listing
        from .model import load_model

        try:
            _check_inputs(model=model)
            lm = load_model(model, arch=arch, input_size=input_size)
        except SaliauditError as err:
            _fail(err, err.exit_code)

    console = Console(highlight=False)
    for name in method_names():
        m = METHODS[name]
        params = ", ".join(f"{k}={v!r}" for k, v in m.params.items()) or "none"
        needs = " · needs layer internals" if m.needs_internals else ""
        if m.option == "psi":
            params += "; ψ presets (--psi): " + ", ".join(
                f"{p.name} ({p.description})" for p in PSI_PRESETS.values() if p.name in m.choices
            )
        mark = " *" if name in DEFAULT_METHODS else ""
        _print_block(
            console,
            Text.assemble((m.name, "bold"), mark, "  ", (f"({m.family}{needs}; {m.reference})", "dim")),
        )
        _print_block(console, m.summary, indent=4)
        _print_block(console, f"parameters: {params}", indent=4)
    console.print()
    _print_block(
        console,
        "* audited by default; choose the methods with --methods LIST (or methods = [...] in the config file).",
    )
    _print_block(
        console,
        "Change a parameter with --method-param METHOD.NAME=VALUE (repeatable), e.g. "
        "--method-param integrated_gradients.steps=64, or in the config file as a "
        "[method_params.METHOD] table; --cam-layer NAME sets the layer of every CAM method.",
    )
    if lm is None:
        return
    import torch

    from .errors import DecompositionError
    from .methods.layers import cam_layers, find_cam_layer

    cam = [m.name for m in METHODS.values() if m.family == "cam"]
    internals = [m.name for m in METHODS.values() if m.needs_internals and m.family != "cam"]
    # as the audit plans them: on TorchScript, methods that need layer internals are SKIPPED
    reason = (
        "a TorchScript model does not expose its layer activations; export the model "
        "with torch.export and pass the .pt2"
        if lm.format == "torchscript"
        else None
    )
    if reason is None:
        try:
            example = torch.zeros(1, 3, *lm.input_size)
            layer, layers = find_cam_layer(lm, example), cam_layers(lm, example)
        except DecompositionError as err:  # no capturable graph, or no spatial layer
            reason = str(err)
        except UsageError as err:
            _fail(err, err.exit_code)
    console.print()
    if reason is not None:
        if lm.format == "torchscript":
            tail = (
                "an audit reports the CAM methods, and the other methods that need layer "
                "internals, as skipped. Skipped: " + ", ".join(cam + internals) + "."
            )
        else:
            tail = "the CAM methods cannot run on this model: " + ", ".join(cam) + "."
        _print_block(console, f"CAM layer for {model}: not available: {reason}; {tail}")
        return
    _print_block(
        console,
        Text.assemble(
            f"CAM layer for {model}: ",
            (str(layer), "bold"),
            " (override with --cam-layer); spatial layers: " + ", ".join(layers),
        ),
    )


@app.command("checks", cls=_Command, short_help="List the sanity checks, thresholds and parameters.")
def checks_command(
    plugin: list[str] | None = typer.Option(None, "--plugin", metavar="MODULE", help=_PLUGIN_HELP),
) -> None:
    """List the sanity checks: what each measures, its thresholds and parameters."""
    from .checks import check_names, get_check

    _load_plugins(plugin)

    console = Console(highlight=False)
    for name in check_names():
        info = get_check(name).describe()
        scope = f" · needs a method that provides {', '.join(info['requires'])}" if info["requires"] else ""
        scope += " · needs --masks" if info["needs_masks"] else ""
        direction = "higher is better" if info["higher_is_better"] else "lower is better"
        thresholds = ", ".join(f"{k}={v!r}" for k, v in info["thresholds"].items()) or "none"
        thresholds += " (informational unless set)" if info["informational"] else ""
        params = ", ".join(f"{k}={v!r}" for k, v in info["params"].items()) or "none"
        _print_block(console, Text.assemble((name, "bold"), f" ({info['short']})  {info['title']}"))
        _print_block(console, f"{info['metric']}, {direction}{scope}", indent=4, style="dim")
        _print_block(console, info["summary"], indent=4)
        _print_block(console, f"thresholds: {thresholds}", indent=4)
        _print_block(console, f"parameters: {params}", indent=4)
        if info["controls_must_fail"]:
            _print_block(console, "controls it must not pass: " + ", ".join(info["controls_must_fail"]), 4)
        if info["curves"]:
            _print_block(console, "curves: " + ", ".join(info["curves"]), indent=4)
        _print_block(console, info["reference"], indent=4, style="dim")
        console.print()
    _print_block(
        console,
        "A control (random, edge) ignores the model: its FAIL on a check it must not "
        "pass shows the check working and never fails the gate; a control that passes "
        "counts as a WARN and the report says that check is unreliable on the model.",
    )
    console.print()
    _print_block(
        console,
        "Set thresholds with --threshold CHECK.NAME=VALUE and parameters with "
        "--check-param CHECK.NAME=VALUE, or in the config file as [thresholds.CHECK] "
        "and [check_params.CHECK] tables.",
    )


@app.command(cls=_Command, short_help="Write one saliency map of one image as a PNG.")
def explain(
    model: Path = typer.Argument(..., metavar="MODEL", help=_MODEL_HELP, show_default=False),
    image: Path = typer.Argument(..., metavar="IMAGE", help="One image file.", show_default=False),
    method: str = typer.Option(
        "fullgrad",
        "--method",
        metavar="NAME",
        help=_help("method (saliaudit methods)", "fullgrad"),
        show_default=False,
    ),
    psi: str | None = typer.Option(
        None,
        "--psi",
        metavar="PRESET",
        help=_help("ψ preset, only for methods with ψ presets (fullgrad)", "paper"),
        show_default=False,
    ),
    post: str | None = typer.Option(
        None,
        "--post",
        metavar="POST",
        help=_help("signed or abs, only for the other methods", "signed"),
        show_default=False,
    ),
    target: str | None = typer.Option(
        None,
        "--target",
        metavar="C",
        help=_help("class name or index", "the top-1 class"),
        show_default=False,
    ),
    output: Path = typer.Option(
        Path("map.png"),
        "-o",
        "--output",
        metavar="FILE",
        help=_help("PNG file to write", "map.png"),
        show_default=False,
    ),
    arch: str | None = _like("arch", "--arch", metavar="NAME"),
    num_classes: int | None = _like("num_classes", "--num-classes", metavar="K"),
    input_size: str | None = _like("input_size", "--input-size", metavar="H,W"),
    mean: str | None = _like("mean", "--mean", metavar="R,G,B"),
    std: str | None = _like("std", "--std", metavar="R,G,B"),
    cam_layer: str | None = _like("cam_layer", "--cam-layer", metavar="NAME"),
    trust_model: bool = typer.Option(
        False, "--trust-model", help=_help(SETTINGS["trust_model"].help), show_default=False
    ),
    plugin: list[str] | None = typer.Option(None, "--plugin", metavar="MODULE", help=_PLUGIN_HELP),
) -> None:
    """Write one saliency map of IMAGE as a PNG: the image and its map side by side."""
    from .explain_png import explain_image
    from .psi import PSI_PRESETS

    _load_plugins(plugin)
    try:
        for flag, value, choices in (("--psi", psi, list(PSI_PRESETS)), ("--post", post, ["signed", "abs"])):
            if value is not None and value not in choices:
                raise UsageError(
                    f"invalid {flag}: expected one of {', '.join(choices)}, got {value!r}{suggest(value, choices)}"
                )
        for flag, value in (("--input-size", input_size), ("--mean", mean), ("--std", std)):
            _parse_option(flag, value, SETTINGS[flag[2:].replace("-", "_")].parse)
        _check_inputs(model=model, image=image)
        text = explain_image(
            model,
            image,
            method=method,
            psi=psi,
            post=post,
            target=target,
            output=output,
            arch=arch,
            num_classes=num_classes,
            input_size=input_size,
            mean=mean,
            std=std,
            cam_layer=cam_layer,
            trust_model=trust_model,
        )
    except ImageError as err:  # IMAGE exists but cannot be decoded: no usable image
        _fail(err, EXIT_NO_IMAGES)
    except SaliauditError as err:
        _fail(err, err.exit_code)
    except Exception as err:  # an unexpected bug: one line, the traceback with --debug
        _bug(err)
    err_console.print(text, markup=False)


def _load_plugins(specs: list[str] | None) -> None:
    """``--plugin`` of the listing commands and explain (report loads them with its config)."""
    from .plugins import load_plugins

    try:
        load_plugins(specs or [])
    except SaliauditError as err:
        _fail(err, err.exit_code)


@app.command(cls=_Command, short_help="Check the environment (torch, devices, PDF backend).")
def doctor() -> None:
    """Check the environment: Python, torch, devices, PDF backend, fonts."""
    from .doctor import run_doctor

    raise typer.Exit(run_doctor(Console()))


def main() -> None:
    """Console-script entry point (``saliaudit`` and ``python -m saliaudit``)."""
    app(prog_name="saliaudit")
