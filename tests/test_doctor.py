"""``saliaudit doctor`` says what is missing for the PDF (WeasyPrint or Pango) and how to install it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from saliaudit import doctor

ROOT = Path(__file__).resolve().parents[1]


def _doctor_output(monkeypatch, fake_import) -> tuple[int, str]:
    monkeypatch.setattr(doctor, "_import_weasyprint", fake_import)
    console = Console(record=True, width=400, force_terminal=False)
    code = doctor.run_doctor(console)
    return code, console.export_text()


def test_weasyprint_missing(monkeypatch):
    def missing():
        raise ModuleNotFoundError("No module named 'weasyprint'", name="weasyprint")

    code, text = _doctor_output(monkeypatch, missing)
    assert code == 0  # torch works: the other formats can be written
    assert "WeasyPrint is not installed" in text
    assert "pip install 'weasyprint>=60'" in text
    assert "report.pdf cannot be written" in text


def test_weasyprint_dependency_missing(monkeypatch):
    def broken():
        raise ModuleNotFoundError("No module named 'pydyf'", name="pydyf")

    _, text = _doctor_output(monkeypatch, broken)
    assert "cannot be imported" in text and "pydyf" in text and "--force-reinstall" in text


@pytest.mark.parametrize(
    "platform_name, first",
    [
        ("linux", "install it: Debian/Ubuntu: apt-get install libpango-1.0-0 libpangoft2-1.0-0"),
        ("darwin", "install it: brew install pango"),
    ],
)
def test_pango_missing(monkeypatch, platform_name, first):
    def no_pango():
        raise OSError("cannot load library 'pango-1.0-0': pango-1.0-0: cannot open shared object file")

    monkeypatch.setattr(doctor.sys, "platform", platform_name)
    _, text = _doctor_output(monkeypatch, no_pango)
    row = next(line for line in text.splitlines() if "PDF (WeasyPrint/Pango)" in line)
    assert "missing" in row and "Pango is not available" in row and "pango-1.0-0" in row
    assert first in row  # this platform's command first
    assert "apt-get install libpango-1.0-0 libpangoft2-1.0-0" in text and "brew install pango" in text


def test_pdf_backend_ok_here():
    # the test environment has WeasyPrint and Pango (.ci/run installs Pango)
    name, status, details = doctor.pdf_backend()
    assert (name, status) == (doctor.PDF_ROW, "ok"), details


def test_real_weasyprint_import_without_pango():
    """The real import path: WeasyPrint's cffi ``dlopen`` of Pango fails, as on a machine
    without the library. The doctor names it, gives the install commands, and WeasyPrint's
    own stdout banner does not garble the table."""
    script = textwrap.dedent("""
        import cffi
        real = cffi.FFI.dlopen
        def dlopen(self, name, *args, **kw):
            if "pango" in str(name):
                raise OSError(f"cannot load library {name!r}: {name}: cannot open shared object file")
            return real(self, name, *args, **kw)
        cffi.FFI.dlopen = dlopen
        import sys
        sys.argv = ["saliaudit", "doctor"]
        from saliaudit.cli import main
        main()
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Pango is not available" in out and "pango-1.0-0" in out, out
    assert "libpango-1.0-0 libpangoft2-1.0-0" in out and "brew install pango" in out, out
    assert "WeasyPrint could not import some external libraries" not in out, out
