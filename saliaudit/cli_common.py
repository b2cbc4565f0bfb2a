"""The shared parts of the ``saliaudit`` command line: the Typer app and its group and command
classes, the error-to-exit-code mapping (:func:`_fail`, :func:`_bug`), and the option helpers
that the command modules (``cli_report``, ``cli_render``, ``cli_compare``, ``cli_info``,
``cli_explain``) build their options with. ``cli.py`` registers the commands on :data:`app`.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

try:  # Typer >= 0.20 vendors Click; its exceptions are the ones raised
    from typer._click import exceptions as click
except ImportError:  # pragma: no cover - older Typer on the Click package
    from click import exceptions as click

from .config import SETTINGS
from .errors import (
    EXIT_CANNOT_RUN,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    SaliauditError,
    UsageError,
    suggest,
)

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


_CONFIG_HELP = _help("TOML configuration file", "the nearest saliaudit.toml or pyproject.toml upwards")
_MODEL_HELP = (
    "Model file: .pt2, state_dict (.pt/.pth/.safetensors with --arch NAME or --arch timm:NAME), "
    "TorchScript, a pickled module with --trust-model, or a Hugging Face folder (save_pretrained)."
)


_PLUGIN_HELP = _sentence(SETTINGS["plugins"].help)


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


def _parse_option(flag: str, value: Any, parse: Any) -> Any:
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as err:
        raise UsageError(f"invalid {flag}: {err}") from None


def _load_plugins(specs: list[str] | None) -> None:
    """``--plugin`` of the listing commands and explain (report loads them with its config)."""
    from .plugins import load_plugins

    try:
        load_plugins(specs or [])
    except SaliauditError as err:
        _fail(err, err.exit_code)


def _folder_lines(out: Any, quiet: bool) -> None:
    """What the output folder had to say: warnings (the user's files, a stale lock) always,
    what was tidied unless ``--quiet``; each once."""
    for line in out.warnings:
        err_console.print(f"saliaudit: warning: {line}", markup=False, soft_wrap=True)
    for line in out.notes if not quiet else []:
        err_console.print(f"saliaudit: {line}", markup=False, soft_wrap=True)
    out.warnings.clear()
    out.notes.clear()
