"""Terminal output: Rich progress on stderr with an ETA, and the verdict table at the end."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from ..result import AuditResult

_STYLE = {"pass": "green", "warn": "yellow", "fail": "red", "error": "magenta", "skipped": "dim"}


@contextmanager
def progress_bar(console: Console, quiet: bool) -> Iterator:
    """Yield a ``(stage, done, total)`` callback that drives a progress bar (or nothing)."""
    if quiet:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def print_summary(console: Console, result: AuditResult, out: Path) -> None:
    """Verdict table, completeness range and where the files went."""
    table = Table(title="saliaudit verdicts", show_lines=False)
    for col in ("check", "method", "ψ", "status", "value", "message"):
        table.add_column(col, overflow="fold")
    for c in result.checks:
        value = "" if c.value is None else f"{c.value:.3g}"
        table.add_row(c.check, c.method, c.psi or "–", f"[{_STYLE[c.status]}]{c.status.upper()}[/]",
                      value, c.message)
    console.print(table)
    inputs = result.inputs
    console.print(f"images: {inputs.get('loaded', 0)} audited, {len(inputs.get('skipped', []))} "
                  f"skipped of {inputs.get('found', 0)} found", markup=False)
    s = result.summary
    style = _STYLE.get(s.get("status", "error"), "")
    gate = "FAILED" if s.get("gate_failed") else "passed"
    console.print(f"overall: [{style}]{s.get('status', '?').upper()}[/] · gate (--fail-on "
                  f"{s.get('fail_on')}) {gate} · results: {out / 'results.json'}")
