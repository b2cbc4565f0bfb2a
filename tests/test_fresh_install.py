"""The README's first command on a fresh machine: ``pip install -e .`` (no extras) then
``saliaudit report ...`` writes ``report.pdf`` and exits as the README documents.

A new virtual environment without system site packages gets only what ``pip install -e .``
installs, with the pip that ``.ci/run`` uses (``python -m pip``, the same version). Then the
README's quick-start audit runs with the environment's own ``saliaudit`` script. Slow: pip
copies PyTorch (several GB) into the environment, and the audit takes about 100 s on 2 cores.

Skipped, with the reason, only when no environment can be built here at all: ``venv`` or
``ensurepip`` missing, too little disk, or no package index reachable (no network and no
mirror). Any other failure of the install fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: Free disk needed for the environment: PyTorch with its CUDA libraries is about 5.5 GB.
NEEDED_BYTES = 8 * 1024**3
#: pip output that means no index could be reached at all, not a broken project: connection
#: errors, or not even the build backend (the first thing ``pip install -e .`` fetches) found.
#: A missing torch or WeasyPrint release is a real failure, never a skip.
UNREACHABLE = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution|"
    r"Network is unreachable|ProxyError|"
    r"No matching distribution found for (setuptools|pip)\b",
    re.I,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def readme_commands() -> tuple[str, int]:
    """The README's first quick-start command and the exit code the README documents for it."""
    text = README.read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1]
    first = re.search(r"```bash\n(.*?)\n```", quick, re.S).group(1).strip()
    code = re.search(r"\*\*exits with code (\d+)\*\*", quick)
    assert code, "README's quick start no longer states the first command's exit code"
    return first, int(code.group(1))


def _clean_env(venv: Path) -> dict[str, str]:
    """The environment of a fresh shell with ``venv`` activated: no PYTHONPATH pointing at a
    checkout, pip's own configuration (mirror, constraints) kept."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")
        and not k.startswith("SALIAUDIT_")
    }
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    return (proc.stdout + proc.stderr)[-n:]


def test_readme_first_command_in_a_fresh_venv(tmp_path, record_property):
    command, documented_exit = readme_commands()
    m = re.fullmatch(r"pip install -e \. && saliaudit (report .*)", command)
    assert m, f"README's first command changed, update this test: {command!r}"
    args = m.group(1).split()
    out_index = args.index("-o") + 1
    report_dir = tmp_path / args[out_index]  # the README's folder name, under tmp_path
    args[out_index] = str(report_dir)

    if shutil.disk_usage(tmp_path).free < NEEDED_BYTES:
        pytest.skip(
            f"fresh-install test needs {NEEDED_BYTES / 1024**3:.0f} GB free in {tmp_path} "
            f"(PyTorch is copied into the environment)"
        )
    venv = tmp_path / "venv"
    started = time.monotonic()
    try:
        made = subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300
        )
        if made.returncode != 0:
            pytest.skip(
                f"cannot build a virtual environment here (python -m venv failed: {_tail(made, 400).strip()})"
            )
        env = _clean_env(venv)
        python = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))

        # the pip .ci/run uses: `python3 -m pip` of this interpreter, same version
        import pip

        got = _run([python, "-m", "pip", "--version"], env, tmp_path, 120)
        if got.returncode != 0:
            pytest.skip(f"the new environment has no pip (ensurepip missing?): {_tail(got, 400)}")
        if f"pip {pip.__version__} " not in got.stdout:
            same = _run(
                [
                    python,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    f"pip=={pip.__version__}",
                ],
                env,
                tmp_path,
                600,
            )
            if same.returncode != 0 and UNREACHABLE.search(_tail(same)):
                pytest.skip(f"no package index reachable (no network, no mirror): {_tail(same, 600)}")
            assert same.returncode == 0, _tail(same)

        # the README's `pip install -e .`: the project only, no extras
        install = _run(
            [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", str(ROOT)],
            env,
            ROOT,
            2400,
        )
        installed = time.monotonic()
        if install.returncode != 0 and UNREACHABLE.search(_tail(install)):
            pytest.skip(f"no package index reachable (no network, no mirror): {_tail(install, 600)}")
        assert install.returncode == 0, _tail(install)
        frozen = _run([python, "-m", "pip", "freeze"], env, tmp_path, 120).stdout.lower()
        assert "weasyprint==" in frozen, "WeasyPrint must come with pip install -e . (a core dependency)"
        for extra in ("captum", "grad-cam", "pytest"):
            assert f"{extra}==" not in frozen, f"{extra} (an extra) was installed by pip install -e ."

        # the README's `saliaudit report ...`, with the environment's own script
        exe = venv / ("Scripts/saliaudit.exe" if os.name == "nt" else "bin/saliaudit")
        assert exe.is_file(), "pip install -e . did not install the saliaudit script"
        audit = _run([str(exe), *args], env, ROOT, 1800)
        done = time.monotonic()

        pdf = report_dir / "report.pdf"
        assert audit.returncode == documented_exit, (
            f"README says exit {documented_exit}, got {audit.returncode}: {_tail(audit)}"
        )
        assert pdf.is_file(), f"no report.pdf: {_tail(audit)}"
        assert pdf.read_bytes()[:4] == b"%PDF"
        for name in ("report.html", "results.json"):
            assert (report_dir / name).is_file(), name
        timing = (
            f"venv + pip install -e .: {installed - started:.0f} s, "
            f"saliaudit report: {done - installed:.0f} s, total {done - started:.0f} s"
        )
        record_property("fresh_install_timing", timing)
        print(f"\nfresh install: {timing}")
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # several GB
