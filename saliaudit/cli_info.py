"""The listing commands ``saliaudit methods`` and ``saliaudit checks``, and ``saliaudit doctor``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from .cli_common import _PLUGIN_HELP, _check_inputs, _fail, _like, _load_plugins
from .errors import SaliauditError


def _print_block(console: Console, text: str | Text, indent: int = 0, style: str = "") -> None:
    """``text`` wrapped to the terminal width, every line (continuation lines included)
    indented by ``indent``."""
    body = text if isinstance(text, Text) else Text(text, style=style)
    for line in body.wrap(console, max(console.width - indent, 20)):
        line.rstrip()
        console.print(Text(" " * indent) + line, soft_wrap=True)


def methods_command(
    model: Path | None = typer.Option(
        None,
        "--model",
        metavar="MODEL",
        help="Also show what each method will do on this model (CAM layer, FullGrad terms, skips).",
    ),
    arch: str | None = _like("arch", "--arch", metavar="NAME"),
    input_size: str | None = _like("input_size", "--input-size", metavar="H,W"),
    output_key: str | None = _like("output_key", "--output-key", metavar="KEY"),
    plugin: list[str] | None = typer.Option(None, "--plugin", metavar="MODULE", help=_PLUGIN_HELP),
) -> None:
    """List the saliency methods with their parameters (and, for a model, what each will do)."""
    from .config import DEFAULT_METHODS
    from .methods import METHODS, method_names
    from .psi import PSI_PRESETS

    _load_plugins(plugin)
    lm = None
    if model is not None:  # a bad --model fails before the listing
        from .model import load_model

        try:
            _check_inputs(model=model)
            lm = load_model(model, arch=arch, input_size=input_size, output_key=output_key)
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
    _print_model_plans(console, model, lm, method_names())


def _print_hanging(console: Console, text: str | Text, indent: int = 2, hang: int = 4) -> None:
    """``text`` wrapped, its first line indented by ``indent`` and the others by ``hang``."""
    body = text if isinstance(text, Text) else Text(text)
    for i, line in enumerate(body.wrap(console, max(console.width - hang, 20))):
        line.rstrip()
        console.print(Text(" " * (indent if i == 0 else hang)) + line, soft_wrap=True)


def _print_model_plans(console: Console, model: Path, lm, names: list[str]) -> None:
    """What each method will do on ``lm`` (:mod:`saliaudit.method_plans`), then the CAM layer."""
    import torch

    from .method_plans import method_plans
    from .methods import METHODS
    from .methods.layers import cam_layers, find_cam_layer

    plans = method_plans(lm, names)
    h, w = lm.input_size
    console.print()
    _print_block(console, f"On {model} ({h}×{w} input), each method:")
    groups: dict[str, list[str]] = {}  # methods that will do the same, on one line
    for plan in plans:
        groups.setdefault(plan.text, []).append(plan.method)
    for text, methods in groups.items():
        _print_hanging(console, Text.assemble((", ".join(methods), "bold"), f": {text}"))
    cam = [m.name for m in METHODS.values() if m.family == "cam"]
    internals = [m.name for m in METHODS.values() if m.needs_internals and m.family != "cam"]
    reason = next((p.text for p in plans if p.method in cam and p.status != "runs"), None)
    if reason is None:
        try:
            example = torch.zeros(1, 3, *lm.input_size)
            layer, layers = find_cam_layer(lm, example), cam_layers(lm, example)
        except SaliauditError as err:  # no capturable graph, or no layer
            reason = str(err)
    console.print()
    if lm.format != "torchscript":
        _print_unsupported(console, lm, model, list(METHODS.values()))
    if reason is not None:
        reason = reason.removeprefix("cannot run: ").removeprefix("skipped: ")
        if lm.format == "torchscript":
            reason = (
                "a TorchScript model does not expose its layer activations; export the model "
                "with torch.export and pass the .pt2"
            )
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
            " (override with --cam-layer); layers: " + ", ".join(layers),
        ),
    )


def _print_unsupported(console: Console, lm: object, model: Path, methods: list) -> None:
    """The methods that have no rule for an op of the model (an audit reports them SKIPPED
    with that reason), as the audit asks them (``Method.unsupported``)."""
    import torch

    example = torch.zeros(1, 3, *lm.input_size)  # type: ignore[attr-defined]
    lines = []
    for m in methods:
        try:
            why = m.unsupported(lm, example) if m.unsupported is not None else None
        except Exception:  # the method's own run reports what goes wrong
            why = None
        if why:
            lines.append(f"{m.name}: {why}")
    if lines:
        _print_block(console, f"Without a rule for an op of {model} (an audit reports them as skipped):")
        for line in lines:
            _print_block(console, line, indent=4)
        console.print()


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


def doctor() -> None:
    """Check the environment: Python, torch, devices, PDF backend, fonts."""
    from .doctor import run_doctor

    raise typer.Exit(run_doctor(Console()))
