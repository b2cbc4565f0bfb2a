"""``saliaudit explain``: one saliency map of one image as a PNG."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import (
    _MODEL_HELP,
    _PLUGIN_HELP,
    _bug,
    _check_inputs,
    _fail,
    _help,
    _like,
    _load_plugins,
    _parse_option,
    err_console,
)
from .config import SETTINGS
from .errors import EXIT_NO_IMAGES, ImageError, SaliauditError, UsageError, suggest


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
    output_key: str | None = _like("output_key", "--output-key", metavar="KEY"),
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
            output_key=output_key,
        )
    except ImageError as err:  # IMAGE exists but cannot be decoded: no usable image
        _fail(err, EXIT_NO_IMAGES)
    except SaliauditError as err:
        _fail(err, err.exit_code)
    except Exception as err:  # an unexpected bug: one line, the traceback with --debug
        _bug(err)
    err_console.print(text, markup=False)
