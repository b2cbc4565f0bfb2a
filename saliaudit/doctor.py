"""``saliaudit doctor``: what this machine can run (torch, devices, PDF backend, fonts)."""

from __future__ import annotations

import platform
import shutil
import subprocess

from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import EXIT_CANNOT_RUN, EXIT_OK


def _probe() -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = [("saliaudit", "ok", __version__),
                                        ("python", "ok", platform.python_version())]
    try:
        import torch
        import torchvision

        rows.append(("torch", "ok", f"{torch.__version__} (torchvision {torchvision.__version__})"))
        cuda = torch.cuda.is_available()
        devices = ["cpu"] + ([f"cuda:{i} {torch.cuda.get_device_name(i)}"
                              for i in range(torch.cuda.device_count())] if cuda else [])
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            devices.append("mps")
        rows.append(("devices", "ok", ", ".join(devices)))
        rows.append(("threads", "ok", str(torch.get_num_threads())))
    except Exception as err:  # report, don't crash: this is the diagnostic command
        rows.append(("torch", "missing", f"{type(err).__name__}: {err}"))
    try:
        from PIL import ImageFile

        truncated = ImageFile.LOAD_TRUNCATED_IMAGES
        try:
            import weasyprint  # it sets LOAD_TRUNCATED_IMAGES = True process-wide
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = truncated

        rows.append(("PDF (WeasyPrint/Pango)", "ok", weasyprint.__version__))
    except Exception as err:
        rows.append(("PDF (WeasyPrint/Pango)", "missing",
                     f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                     "— pip install weasyprint; apt-get install libpango-1.0-0 libpangoft2-1.0-0"))
    if shutil.which("fc-list"):
        try:
            n = len(subprocess.run(["fc-list"], capture_output=True, text=True, timeout=20)
                    .stdout.splitlines())
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
        table.add_row(name, f"[{style}]{status}[/]", details)
    console.print(table)
    return EXIT_CANNOT_RUN if any(r[0] == "torch" and r[1] != "ok" for r in rows) else EXIT_OK
