"""The ``saliaudit`` command line: options → config → audit → render.

This is the only place that catches errors and maps them to exit codes (docs/report.md, "Exit codes"):
0 no check reached ``--fail-on`` · 1 the gate failed · 2 usage error · 3 the audit could not
run · 4 no usable images · 130 interrupted (Ctrl-C or SIGTERM; a partial results.json is kept).
"""

from __future__ import annotations

import signal
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from . import __version__
from .errors import (
    EXIT_CANNOT_RUN,
    EXIT_GATE,
    EXIT_INTERRUPTED,
    EXIT_NO_VERDICT,
    EXIT_OK,
    SaliauditError,
    UsageError,
)

if TYPE_CHECKING:
    from .report.output import OutputFolder
    from .report.pdf import PdfUnavailableError
    from .result import AuditResult

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Audit whether the saliency maps of a PyTorch image classifier can be trusted.",
)
err_console = Console(stderr=True, highlight=False)
_DEBUG = {"on": False}


class Interrupted(BaseException):
    """Raised from the SIGTERM handler (Ctrl-C raises KeyboardInterrupt)."""


def _fail(err: BaseException, code: int) -> None:
    if _DEBUG["on"]:
        err_console.print(traceback.format_exc(), markup=False)
    err_console.print(f"saliaudit: error: {err}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def _bug(err: Exception) -> None:
    """An unexpected exception (a bug in saliaudit): one line and exit 3, the traceback with --debug."""
    _fail(
        RuntimeError(f"unexpected {type(err).__name__}: {err} (rerun with --debug and report it)"),
        EXIT_CANNOT_RUN,
    )


def _version(value: bool) -> None:
    if value:
        typer.echo(f"saliaudit {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    _DEBUG["on"] = debug


@app.command()
def report(
    model: Path = typer.Argument(
        ...,
        help="Model file: .pt2, state_dict (.pt/.pth/.safetensors with --arch), TorchScript, or a pickled module with --trust-model.",
    ),
    images: Path = typer.Argument(
        ..., help="Image folder (recursive; ImageFolder layout gives labels) or a list file."
    ),
    output: str | None = typer.Option(
        None, "-o", "--output", help="Output folder [default: saliaudit-report]."
    ),
    format: str | None = typer.Option(
        None,
        "--format",
        help="Comma-separated output formats: html, pdf, json, junit [default: html,pdf,json].",
    ),
    config: Path | None = typer.Option(None, "--config", help="TOML configuration file."),
    methods: str | None = typer.Option(
        None,
        "--methods",
        help="Comma-separated methods: fullgrad and those of `saliaudit methods` [default: fullgrad, 8 comparison methods, random, edge].",
    ),
    psi: str | None = typer.Option(None, "--psi", help="Comma-separated ψ presets [default: all]."),
    post: str | None = typer.Option(
        None, "--post", help="Post-processing of comparison methods: signed,abs [default: both]."
    ),
    cam_layer: str | None = typer.Option(
        None, "--cam-layer", help="Layer of the CAM methods [default: automatic]."
    ),
    checks: str | None = typer.Option(
        None, "--checks", help="Comma-separated checks of `saliaudit checks` [default: all]."
    ),
    threshold: list[str] | None = typer.Option(
        None,
        "--threshold",
        help="Check threshold CHECK.NAME=VALUE, e.g. class_sensitivity.fail=0.8 (repeatable).",
    ),
    check_param: list[str] | None = typer.Option(
        None,
        "--check-param",
        help="Check parameter CHECK.NAME=VALUE, e.g. randomization.granularity=layers (repeatable).",
    ),
    flip: str | None = typer.Option(
        None, "--flip", help="sign_flip class pairs C:C', e.g. 8:3 [default: runner-up]."
    ),
    masks: str | None = typer.Option(
        None,
        "--masks",
        help="Folder of object masks MASKS/<image path without extension>/<class>.png (pointing games).",
    ),
    max_images: int | None = typer.Option(None, "--max-images", help="Audit at most N images."),
    sample: int | None = typer.Option(
        None, "--sample", help="Audit a reproducible random subset of N images."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per batch [default: 8]."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed [default: 0]."),
    device: str | None = typer.Option(
        None, "--device", help="auto, cpu, cuda, cuda:N or mps [default: auto]."
    ),
    fail_on: str | None = typer.Option(None, "--fail-on", help="fail, warn or never [default: fail]."),
    arch: str | None = typer.Option(None, "--arch", help="torchvision architecture of a state_dict."),
    num_classes: int | None = typer.Option(None, "--num-classes", help="Classes of a state_dict head."),
    input_size: str | None = typer.Option(None, "--input-size", help="Input size: 224 or H,W."),
    mean: str | None = typer.Option(None, "--mean", help="Normalization mean, e.g. 0.485,0.456,0.406."),
    std: str | None = typer.Option(None, "--std", help="Normalization std, e.g. 0.229,0.224,0.225."),
    labels: str | None = typer.Option(None, "--labels", help="Class names file, one per line."),
    trust_model: bool | None = typer.Option(
        None, "--trust-model", help="Allow unpickling a pickled model (runs code from the file)."
    ),
    max_pixels: int | None = typer.Option(
        None, "--max-pixels", help="Refuse larger images [default: 64000000]."
    ),
    overlays: bool | None = typer.Option(
        None, "--overlays/--no-overlays", help="Write PNG overlays [default: on]."
    ),
    force: bool | None = typer.Option(
        None, "--force", help="Write into a non-empty folder that is not a saliaudit output."
    ),
    examples: int | None = typer.Option(
        None, "--examples", help="Example images per check in the PDF, most telling first [default: 6]."
    ),
    examples_html: int | None = typer.Option(
        None, "--examples-html", help="Example images per check in the HTML [default: 24]."
    ),
    page_size: str | None = typer.Option(
        None, "--page-size", help="PDF page size: a4 or letter [default: a4]."
    ),
    annotations: bool | None = typer.Option(
        None,
        "--annotations/--no-annotations",
        help="Print ::error::/::warning:: annotations for GitHub Actions on stdout [default: off].",
    ),
    plugin: list[str] | None = typer.Option(
        None,
        "--plugin",
        help="Module or .py file that registers methods or checks (repeatable; runs its code).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or table on the terminal."),
) -> None:
    """Audit MODEL on IMAGES and write the results (and maps) to the output folder."""
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
        flip=flip,
        masks=masks,
        max_images=max_images,
        sample=sample,
        batch_size=batch_size,
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
        cfg = resolve_config(flags, config_file=config)
    except SaliauditError as err:
        _fail(err, err.exit_code)
    code = _run_report(model, images, cfg, quiet)
    raise typer.Exit(code)


def _run_report(model: Path, images: Path, cfg, quiet: bool) -> int:
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
        with progress_bar(err_console, quiet) as progress:
            run_audit(model, images, cfg, out.path, progress=progress, result=result)
            doc = result.to_dict()
            hook = progress.rendering(cfg.format) if progress else None
            # on pdf_error, the rest is written
            _, pdf_error = write_results(out, doc, cfg.format, on_format=hook)
            if progress:
                progress.finish()
        _ci_outputs(doc, cfg.annotations)
        if not quiet:
            print_summary(err_console, doc, out.path, cfg.format)
        if pdf_error is not None:
            err_console.print(f"saliaudit: error: {pdf_error}", markup=False, soft_wrap=True)
            return pdf_error.exit_code
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
        return code
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


@app.command()
def render(
    results: Path = typer.Argument(..., help="results.json written by saliaudit report."),
    output: str | None = typer.Option(
        None, "-o", "--output", help="Output folder [default: the folder of RESULTS]."
    ),
    format: str = typer.Option(
        "html,pdf", "--format", help="Comma-separated: html, pdf, json, junit [default: html,pdf]."
    ),
    page_size: str | None = typer.Option(
        None, "--page-size", help="PDF page size a4 or letter [default: as in the results, else a4]."
    ),
    examples: int | None = typer.Option(
        None, "--examples", help="Example images in the PDF [default: as in the results, else 6]."
    ),
    examples_html: int | None = typer.Option(
        None, "--examples-html", help="Example images in the HTML [default: as in the results, else 24]."
    ),
    force: bool = typer.Option(
        False, "--force", help="Write into a non-empty folder that is not a saliaudit output."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not list the files written."),
) -> None:
    """Rebuild the HTML/PDF (and JSON/JUnit) report from a results.json, without the model."""
    from .config import SETTINGS
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


@app.command("methods")
def methods_command(
    model: Path | None = typer.Option(
        None, "--model", help="Also show the layers the CAM methods would use on this model."
    ),
    arch: str | None = typer.Option(None, "--arch", help="torchvision architecture of a state_dict model."),
    input_size: str | None = typer.Option(None, "--input-size", help="Model input size."),
    plugin: list[str] | None = typer.Option(
        None,
        "--plugin",
        help="Module or .py file that registers methods or checks (repeatable; runs its code).",
    ),
) -> None:
    """List the saliency methods with their parameters (and, for a model, the CAM layers)."""
    from .methods import METHODS, method_names
    from .psi import PSI_PRESETS

    _load_plugins(plugin)

    console = Console()
    for name in method_names():
        m = METHODS[name]
        params = ", ".join(f"{k}={v!r}" for k, v in m.params.items()) or "no parameters"
        needs = " · needs layer internals" if m.needs_internals else ""
        if m.option == "psi":
            params += "; ψ presets (--psi): " + ", ".join(
                f"{p.name} ({p.description})" for p in PSI_PRESETS.values() if p.name in m.choices
            )
        console.print(
            f"[bold]{m.name}[/]  [dim]({m.family}{needs}; {m.reference})[/]\n    {m.summary}\n    {params}",
            soft_wrap=True,
        )
    if model is None:
        return
    try:
        import torch

        from .errors import DecompositionError
        from .methods.layers import cam_layers, find_cam_layer
        from .model import load_model

        lm = load_model(model, arch=arch, input_size=input_size)
    except SaliauditError as err:
        _fail(err, err.exit_code)
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
    if reason is not None:
        if lm.format == "torchscript":
            tail = (
                "an audit reports the CAM methods, and the other methods that need layer "
                "internals, as skipped. Skipped: " + ", ".join(cam + internals) + "."
            )
        else:
            tail = "the CAM methods cannot run on this model: " + ", ".join(cam) + "."
        console.print(
            f"\nCAM layer for {model}: not available: {reason}; {tail}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
        return
    console.print(
        f"\nCAM layer for {model}: [bold]{layer}[/] (override with --cam-layer); "
        "spatial layers: " + ", ".join(layers),
        soft_wrap=True,
        highlight=False,
    )


@app.command("checks")
def checks_command(
    plugin: list[str] | None = typer.Option(
        None,
        "--plugin",
        help="Module or .py file that registers methods or checks (repeatable; runs its code).",
    ),
) -> None:
    """List the sanity checks: what each measures, its thresholds and parameters."""
    from rich.text import Text

    from .checks import check_names, get_check

    _load_plugins(plugin)

    console = Console()
    for name in check_names():
        info = get_check(name).describe()
        scope = f" · needs a method that provides {', '.join(info['requires'])}" if info["requires"] else ""
        scope += " · needs --masks" if info["needs_masks"] else ""
        direction = "higher is better" if info["higher_is_better"] else "lower is better"
        thresholds = ", ".join(f"{k}={v!r}" for k, v in info["thresholds"].items()) or "none"
        thresholds += " (informational unless set)" if info["informational"] else ""
        params = ", ".join(f"{k}={v!r}" for k, v in info["params"].items()) or "none"
        controls = ", ".join(info["controls_must_fail"])
        controls = f"    controls it must not pass: {controls}\n" if controls else ""
        curves = ", ".join(info["curves"])
        curves = f"    curves: {curves}\n" if curves else ""
        console.print(
            Text.assemble(
                (name, "bold"),
                f" ({info['short']})  ",
                (f"{info['title']}", ""),
                "\n",
                (f"    {info['metric']}, {direction}{scope}", "dim"),
                f"\n    {info['summary']}\n    thresholds: {thresholds}\n"
                f"    parameters: {params}\n{controls}{curves}",
                (f"    {info['reference']}", "dim"),
            ),
            soft_wrap=True,
        )
    console.print(
        "\nA control (random, edge) ignores the model: its FAIL on a check it must not "
        "pass shows the check working and never fails the gate; a control that passes "
        "counts as a WARN and the report says that check is unreliable on the model.",
        soft_wrap=True,
        markup=False,
    )
    console.print(
        "\nSet thresholds with --threshold CHECK.NAME=VALUE and parameters with "
        "--check-param CHECK.NAME=VALUE, or in the config file as [thresholds.CHECK] "
        "and [check_params.CHECK] tables.",
        soft_wrap=True,
        markup=False,
    )


@app.command()
def explain(
    model: Path = typer.Argument(..., help="Model file (as for report)."),
    image: Path = typer.Argument(..., help="One image file."),
    method: str = typer.Option("fullgrad", "--method", help="Method name (saliaudit methods)."),
    psi: str | None = typer.Option(
        None, "--psi", help="ψ preset, only for methods with ψ presets (fullgrad) [default: paper]."
    ),
    post: str | None = typer.Option(
        None, "--post", help="signed or abs, only for the other methods [default: signed]."
    ),
    target: str | None = typer.Option(
        None, "--target", help="Class name or index [default: the top-1 class]."
    ),
    output: Path = typer.Option(Path("map.png"), "-o", "--output", help="PNG file to write."),
    arch: str | None = typer.Option(None, "--arch", help="torchvision architecture of a state_dict."),
    num_classes: int | None = typer.Option(None, "--num-classes", help="Classes of a state_dict head."),
    input_size: str | None = typer.Option(None, "--input-size", help="Input size: 224 or H,W."),
    mean: str | None = typer.Option(None, "--mean", help="Normalization mean."),
    std: str | None = typer.Option(None, "--std", help="Normalization std."),
    cam_layer: str | None = typer.Option(None, "--cam-layer", help="Layer of the CAM methods."),
    trust_model: bool = typer.Option(False, "--trust-model", help="Allow unpickling a pickled model."),
    plugin: list[str] | None = typer.Option(
        None,
        "--plugin",
        help="Module or .py file that registers methods or checks (repeatable; runs its code).",
    ),
) -> None:
    """Write one saliency map of IMAGE as a PNG: the image and its map side by side."""
    from .explain import explain_image

    _load_plugins(plugin)
    try:
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


@app.command()
def doctor() -> None:
    """Check the environment: Python, torch, devices, PDF backend, fonts."""
    from .doctor import run_doctor

    raise typer.Exit(run_doctor(Console()))


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except UsageError as err:  # raised before a command body runs
        err_console.print(f"saliaudit: error: {err}", markup=False)
        sys.exit(err.exit_code)
