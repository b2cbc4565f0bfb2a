"""``saliaudit report``: options → config → audit → the output files, and the partial results
of an interrupted or failed audit."""

from __future__ import annotations

import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .cli_common import (
    _CONFIG_HELP,
    _MODEL_HELP,
    Interrupted,
    _bug,
    _check_inputs,
    _error_line,
    _fail,
    _folder_lines,
    _help,
    _setting,
    err_console,
)
from .cli_compare import _comparison
from .config import SETTINGS
from .errors import (
    EXIT_CANNOT_RUN,
    EXIT_GATE,
    EXIT_INTERRUPTED,
    EXIT_NO_VERDICT,
    EXIT_OK,
    ResumeRefusedError,
    SaliauditError,
    UsageError,
)

if TYPE_CHECKING:
    from .report.output import OutputFolder
    from .report.pdf import PdfUnavailableError
    from .result import AuditResult


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
    max_skipped: str | None = _setting("max_skipped", metavar="FRACTION"),
    arch: str | None = _setting("arch", metavar="NAME"),
    num_classes: str | None = _setting("num_classes", metavar="K"),
    input_size: str | None = _setting("input_size", metavar="H,W"),
    mean: str | None = _setting("mean", metavar="R,G,B"),
    std: str | None = _setting("std", metavar="R,G,B"),
    labels: str | None = _setting("labels", metavar="FILE"),
    output_key: str | None = _setting("output_key", metavar="KEY"),
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
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the interrupted audit in the output folder (same model, images, settings "
        "and seed, checked): reuse its saved work and compute only what is missing.",
    ),
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
    from .preflight import check_environment

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
        max_skipped=max_skipped,
        arch=arch,
        num_classes=num_classes,
        input_size=input_size,
        mean=mean,
        std=std,
        labels=labels,
        output_key=output_key,
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
        check_environment(cfg.format)  # SOURCE_DATE_EPOCH, before anything is written
        old = None
        if baseline is not None:  # a bad baseline is a usage error, before the audit runs
            from .compare import load_audit

            old = (baseline, load_audit(baseline))
    except SaliauditError as err:
        _fail(err, err.exit_code)
    code = _run_report(model, images, cfg, quiet, baseline=old, resume=resume)
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


def _run_report(
    model: Path,
    images: Path,
    cfg,
    quiet: bool,
    baseline: tuple[Path, dict] | None = None,
    resume: bool = False,
) -> int:
    from .distributed import current_world
    from .engine import Audit, new_result
    from .model import resolve_device
    from .preflight import planned_report
    from .report.output import OutputFolder
    from .report.terminal import print_summary, progress_bar, quiet_line
    from .resume import AuditState

    world = current_world()  # launched by torchrun with several processes
    if world is not None:
        from . import cli_dist, distributed

        try:
            cfg = cli_dist.join(world, cfg, resume)
        except SaliauditError as err:
            _fail(err, err.exit_code)
        if world.rank != 0:
            return cli_dist.worker(model, images, cfg, world)
    out = OutputFolder(Path(cfg.output), force=cfg.force)
    result = None
    audit = None
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # noqa: ARG001
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    state = AuditState(out, resume=resume) if world is None else None
    try:
        if state is not None:
            state.require()  # --resume without saved work: a usage error, before anything is touched
        # before the model is loaded: the folder is free, writable, ours to write, with room
        try:
            out.prepare(planned_report(cfg, images, baseline=baseline is not None), owner=True)
        except SaliauditError as err:
            if world is not None:
                distributed.share(err.exit_code)  # the other ranks stop: nothing to audit into
            raise
        if world is not None:
            distributed.share(None)  # the other ranks start once the folder is prepared
        _folder_lines(out, quiet)
        result = new_result(cfg, datetime.now(timezone.utc), resolve_device(cfg.device))
        from .report.plan_text import plan_lines

        def show_plan(plan) -> None:
            if not quiet:
                for line in plan_lines(result.plan):
                    err_console.print(line, markup=False, soft_wrap=True)

        with progress_bar(err_console, quiet) as progress:
            if world is not None:  # this rank's share, then every rank's units replayed and judged
                audit = distributed.run_sharded(
                    model, images, cfg, out.path, world, progress=progress, result=result, on_plan=show_plan
                )
            else:
                audit = Audit(cfg, out.path, progress=progress, result=result, on_plan=show_plan, state=state)
                audit.plan(model, images)
                audit.run()
            doc = result.to_dict()
            hook = progress.rendering(cfg.format) if progress else None
            # on pdf_error, the rest is written
            _, pdf_error = write_results(out, doc, cfg.format, on_format=hook, manifest=True)
            if state is not None:
                state.remove()  # the audit is written: its saved work is no longer needed
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
            code = compared(pdf_error.exit_code)
        else:
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
            code = compared(code)
        out.finish()
        return code
    except (KeyboardInterrupt, Interrupted):
        reason = "interrupted by SIGTERM" if sys.exc_info()[0] is Interrupted else "interrupted (Ctrl-C)"
        if world is not None:  # torchrun stops every rank when one fails or is killed
            where = "; ".join(distributed.unfinished(world)) or "no other rank was computing"
            cli_dist.stopped(out, f"{reason}: torchrun stopped the job ({where})")
        elif result is not None and out.prepared:
            result.inputs["loaded"] = len(result.images)
            if audit is not None:
                audit.judge_partial()
            written = sorted(_write_partial(out, result, cfg, reason), key=lambda p: p.name != "results.json")
            where = " and ".join(str(p) for p in written) or "no file"
            again = " (continue it with the same command and --resume)" if audit is not None else ""
            err_console.print(
                f"saliaudit: {reason}; partial results in {where}{again}", markup=False, soft_wrap=True
            )
        else:
            err_console.print(f"saliaudit: {reason}; nothing was written", markup=False)
        return EXIT_INTERRUPTED
    except SaliauditError as err:
        if world is not None:
            cli_dist.stopped(out)
        elif result is not None and out.prepared and not isinstance(err, ResumeRefusedError):
            _write_partial(out, result, cfg, str(err))
        _fail(err, err.exit_code)
    except typer.Exit:
        raise
    except Exception as err:  # an unexpected bug: one line, the traceback with --debug
        if world is not None:
            cli_dist.stopped(out)
        _bug(err)
    finally:
        signal.signal(signal.SIGTERM, previous)
        out.close()  # the lock is released on every path
        if world is not None:
            distributed.stop()
        _folder_lines(out, quiet)
    return EXIT_CANNOT_RUN


def _write_partial(out: OutputFolder, result: AuditResult, cfg, reason: str) -> list[Path]:
    """An audit that did not finish: results.json (always) and junit.xml (when asked for)
    with what was measured, marked partial; then the earlier runs' files are tidied as after
    a finished run. The paths written."""
    result.summarize(cfg.fail_on, status="error", reason=reason, partial=True, max_skipped=cfg.max_skipped)
    formats = ["json"] + (["junit"] if "junit" in cfg.format else [])
    try:
        written, _ = write_results(out, result, formats, manifest=True)
    except (OSError, SaliauditError) as err:  # e.g. the disk is full: say so, keep the first error
        _error_line(f"cannot write the partial results: {err}")
        return []
    out.finish()
    return written


def write_results(
    out: OutputFolder,
    results: AuditResult | dict[str, Any],
    formats: list[str],
    *,
    manifest: bool = False,
    **settings: Any,
) -> tuple[list[Path], PdfUnavailableError | None]:
    """The CLI's one write path, used by ``report``, ``render`` and the partial results of an
    interrupted or failed audit: the requested ``formats`` of ``results`` (an
    :class:`~saliaudit.result.AuditResult` or its ``results.json`` dictionary) into the
    prepared output folder ``out``, with :func:`saliaudit.report.render.write_outputs` (each
    file atomically, the PDF last). ``settings`` override the report settings recorded in the
    results (examples, examples_html, page_size). ``manifest`` (a report run): results.json
    is written last and lists the files the run wrote (:meth:`OutputFolder.manifest`).

    Returns the paths written and, when WeasyPrint or Pango is missing, the
    :class:`~saliaudit.report.pdf.PdfUnavailableError` (every other format is written by then)
    for the caller to report; any other error is raised."""
    from .report.output import FILES
    from .report.pdf import PdfUnavailableError
    from .report.render import ORDER, write_outputs

    doc = results if isinstance(results, dict) else results.to_dict()
    listing = out.manifest if manifest else None
    try:
        return write_outputs(doc, out.path, formats, manifest=listing, **settings), None
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
