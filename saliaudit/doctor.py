"""``saliaudit doctor``: what this machine can run (torch, devices, PDF backend, fonts)."""

from __future__ import annotations

import contextlib
import importlib
import io
import platform
import re
import shutil
import subprocess
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import EXIT_CANNOT_RUN, EXIT_OK

PDF_ROW = "PDF (WeasyPrint/Pango)"
WEASYPRINT_INSTALL = "pip install 'weasyprint>=60' (a dependency of saliaudit: pip install -e . installs it)"
PANGO_INSTALL = (
    "Debian/Ubuntu: apt-get install libpango-1.0-0 libpangoft2-1.0-0; "
    "macOS: brew install pango; Windows: see WeasyPrint's installation guide"
)


def pango_install_hint(platform_name: str | None = None) -> str:
    """How to install Pango here (the current platform's command first)."""
    name = platform_name or sys.platform
    if name == "darwin":
        return "brew install pango (Debian/Ubuntu: apt-get install libpango-1.0-0 libpangoft2-1.0-0)"
    if name.startswith("linux"):
        return (
            "Debian/Ubuntu: apt-get install libpango-1.0-0 libpangoft2-1.0-0 "
            "(Fedora: dnf install pango; macOS: brew install pango)"
        )
    return PANGO_INSTALL


def _import_weasyprint() -> Any:
    """Import WeasyPrint without its side effects: it sets Pillow's process-wide
    ``LOAD_TRUNCATED_IMAGES`` and, when a library is missing, prints a banner to stdout."""
    from PIL import ImageFile

    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return importlib.import_module("weasyprint")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated


def pdf_backend() -> tuple[str, str, str]:
    """``(component, status, details)`` of the PDF backend, saying what is missing and how to
    install it: WeasyPrint itself (a Python package) or Pango (a system library it loads)."""
    try:
        weasyprint = _import_weasyprint()
    except ImportError as err:
        if err.name == "weasyprint":
            return PDF_ROW, "missing", f"WeasyPrint is not installed; install it: {WEASYPRINT_INSTALL}"
        return (
            PDF_ROW,
            "missing",
            (
                f"WeasyPrint is installed but cannot be imported ({_first(err)}); "
                f"reinstall it: pip install --force-reinstall 'weasyprint>=60'"
            ),
        )
    except OSError as err:  # cffi could not load a system library: Pango or GLib/GObject
        lib = re.search(r"cannot load library '([^']+)'", str(err))
        what = f"the system library {lib.group(1)} is missing" if lib else _first(err)
        return (
            PDF_ROW,
            "missing",
            (
                f"Pango is not available ({what}); WeasyPrint needs it to write "
                f"report.pdf; install it: {pango_install_hint()}"
            ),
        )
    except Exception as err:  # any other failure while WeasyPrint loads its libraries
        return (
            PDF_ROW,
            "missing",
            (
                f"WeasyPrint cannot load: {type(err).__name__}: {_first(err)}; "
                f"check Pango: {pango_install_hint()}"
            ),
        )
    return PDF_ROW, "ok", str(getattr(weasyprint, "__version__", "unknown version"))


def _first(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _probe() -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = [
        ("saliaudit", "ok", __version__),
        ("python", "ok", platform.python_version()),
    ]
    try:
        import torch
        import torchvision

        rows.append(("torch", "ok", f"{torch.__version__} (torchvision {torchvision.__version__})"))
        cuda = torch.cuda.is_available()
        devices = ["cpu"] + (
            [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
            if cuda
            else []
        )
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            devices.append("mps")
        rows.append(("devices", "ok", ", ".join(devices)))
        rows.append(("threads", "ok", str(torch.get_num_threads())))
    except Exception as err:  # report, don't crash: this is the diagnostic command
        rows.append(("torch", "missing", f"{type(err).__name__}: {err}"))
    rows.append(pdf_backend())
    if shutil.which("fc-list"):
        try:
            n = len(
                subprocess.run(["fc-list"], capture_output=True, text=True, timeout=20).stdout.splitlines()
            )
            rows.append(("fonts", "ok" if n else "missing", f"{n} system fonts"))
        except (OSError, subprocess.SubprocessError) as err:
            rows.append(("fonts", "unknown", str(err)))
    else:
        rows.append(("fonts", "unknown", "fc-list not found"))
    return rows


def run_doctor(console: Console) -> int:
    """Print the environment table; exit 3 when torch is unusable, else 0."""
    rows = _probe()
    table = Table(title="saliaudit doctor")
    for col in ("component", "status", "details"):
        table.add_column(col, overflow="fold")
    for name, status, details in rows:
        style = {"ok": "green", "missing": "red"}.get(status, "yellow")
        table.add_row(name, f"[{style}]{status}[/]", escape(details))
    console.print(table)
    pdf = next((r for r in rows if r[0] == PDF_ROW and r[1] != "ok"), None)
    if pdf:
        console.print(
            f"[red]report.pdf cannot be written[/]: {escape(pdf[2])}. The other formats work "
            "(--format html,json).",
            markup=True,
            highlight=False,
        )
    return EXIT_CANNOT_RUN if any(r[0] == "torch" and r[1] != "ok" for r in rows) else EXIT_OK
