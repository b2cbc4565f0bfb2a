"""Terminal output: Rich progress on stderr with an ETA, and the verdict table at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ..result import AuditResult, dropped_text
from .context import (
    STATUS_TEXT,
    check_info,
    check_order,
    fmt,
    gate_status_of,
    status_of,
    variant_label,
    verdict_rows,
)
from .output import FILES

_STYLE = {"pass": "green", "warn": "yellow", "fail": "red", "error": "magenta", "skipped": "dim"}


class StageProgress:
    """The ``(description, done, total)`` callback of an audit, driving one Rich bar: the
    description names what runs (``batch 2/3 · check randomization``), ``done`` and ``total``
    count work units, and Rich's columns add the elapsed time and an ETA. It remembers the
    last position, so that the CLI can append the rendering stages (:meth:`rendering`)."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.task = bar.add_task("planning", total=None)
        self.description, self.done, self.total = "planning", 0, None

    def __call__(self, description: str, done: int, total: int | None) -> None:
        self.description, self.done, self.total = description, done, total
        self.bar.update(self.task, description=description, completed=done, total=total)

    def rendering(self, formats: list[str]) -> Callable[[str], None]:
        """A hook for :func:`saliaudit.report.render.write_outputs` (``on_format``): each
        format written is one more unit after the audit's, named ``rendering html``."""
        base = self.done
        total = (self.total or base) + len(formats)
        count = {"n": 0}

        def on_format(name: str) -> None:
            self(f"rendering {name}", base + count["n"], total)
            count["n"] += 1

        return on_format

    def finish(self) -> None:
        """Mark the bar complete (the last unit is done when the last file is written)."""
        if self.total is not None:
            self("done", self.total, self.total)


@contextmanager
def progress_bar(console: Console, quiet: bool) -> Iterator[StageProgress | None]:
    """Yield a :class:`StageProgress` (a ``(description, done, total)`` callback) that drives
    a progress bar on ``console``, or ``None`` when ``quiet``."""
    if quiet:
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        yield StageProgress(bar)


def quiet_line(doc: dict, out: Path, code: int) -> str:
    """The one line of ``report -q``: the overall verdict, the gate and the results file,
    e.g. ``saliaudit: FAIL · gate --fail-on fail failed (exit 1) · results: out/results.json``."""
    s = doc.get("summary") or {}
    status = str(s.get("status") or "error")
    gate = "failed" if s.get("gate_failed") else "passed"
    if s.get("no_verdict"):
        gate = "failed: no check judged any method"
    elif s.get("gate_failed") and (s.get("dropped") or {}).get("exceeded"):
        gate = f"failed: {dropped_text(s['dropped'])}"
    return (
        f"saliaudit: {STATUS_TEXT.get(status, status.upper())} · gate --fail-on {s.get('fail_on')} "
        f"{gate} (exit {code}) · results: {out / 'results.json'}"
    )


_CODE = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "error": "ERR", "skipped": "skip"}


_LETTER = {"pass": "P", "warn": "W", "fail": "F", "error": "E", "skipped": "s"}


def _cell(cell: dict | None, with_value: bool, letters: bool = False) -> Text:
    if cell is None:
        return Text("–", style="dim")
    st = status_of(cell)
    control = cell.get("control")
    text = (_LETTER if letters else _CODE)[st]
    text += "*" if control in ("expected", "reference") else "!" if control == "unexpected" else ""
    text += "?" if cell.get("inconclusive") and not control else ""
    deg = cell.get("degenerate")
    text += "~" if isinstance(deg, (int, float)) and deg > 0 and not control else ""
    if with_value and cell.get("value") is not None:
        text += f" {fmt(cell.get('value'), 2)}"
    style = (
        "dim"
        if control in ("expected", "reference")
        else "bold yellow"
        if control == "unexpected"
        else _STYLE[st]
    )
    return Text(text, style=style)


def verdict_table(doc: dict, width: int) -> tuple[Table, str] | None:
    """The methods × checks table that fits ``width`` columns, or the narrowest form:
    ``(table, form)`` with form ``full`` (check names and values), ``short`` (short names,
    values), ``status`` (short names, statuses) or ``letters`` (numbered columns, P/W/F/E/s)."""
    checks = check_order(doc)
    rows = verdict_rows(doc)
    if not rows or not checks:
        return None
    label_w = max(len(r["label"]) for r in rows)
    short = {c: check_info(doc, c)["short"] for c in checks}  # column heads of narrow tables
    cells = {(i, c): r["cells"].get(c) for i, r in enumerate(rows) for c in checks}
    forms = (
        ("full", True, False),
        ("short", True, False),
        ("status", False, False),
        ("letters", False, True),
    )
    for form, with_value, letters in forms:
        heads = (
            [c for c in checks]
            if form == "full"
            else [str(k + 1) for k in range(len(checks))]
            if letters
            else [short[c] for c in checks]
        )
        widths = [
            max(len(h), *(len(_cell(cells[(i, c)], with_value, letters).plain) for i in range(len(rows))))
            for h, c in zip(heads, checks)
        ]
        if label_w + 3 + sum(w + 3 for w in widths) + 1 <= width:
            break
    table = Table(title="saliaudit verdicts", show_lines=False, pad_edge=False)
    table.add_column("map", no_wrap=True)
    for h in heads:
        table.add_column(h, justify="center", no_wrap=True)
    for i, r in enumerate(rows):
        table.add_row(Text(r["label"]), *(_cell(cells[(i, c)], with_value, letters) for c in checks))
    return table, form


def print_summary(
    console: Console,
    result: AuditResult | dict,
    out: Path,
    formats: list[str] | None = None,
    max_findings: int = 12,
) -> None:
    """Verdict table (methods × checks), the worst findings, the overall line and the files.

    Every text from the results goes through :class:`rich.text.Text`, so a file name or a
    message with square brackets cannot be taken for Rich markup.
    """
    doc = result if isinstance(result, dict) else result.to_dict()
    made = verdict_table(doc, console.width)
    if made is None:
        console.print("no check was run", markup=False)
    else:
        table, form = made
        console.print(table)
        lines = []
        if form in ("short", "status"):
            lines.append(", ".join(f"{check_info(doc, c)['short']} = {c}" for c in check_order(doc)))
        elif form == "letters":
            lines.append(
                ", ".join(f"{k + 1} = {c}" for k, c in enumerate(check_order(doc)))
                + " · P pass, W warn, F fail, E error, s skipped"
            )
        if any(isinstance(c, dict) and c.get("control") for c in doc.get("checks") or []):
            lines.append(
                "* a control (random, edge): a check must not pass it, so its FAIL shows "
                "the check working · ! a control passed: that check is unreliable here"
            )
        if any(isinstance(c, dict) and c.get("inconclusive") for c in doc.get("checks") or []):
            need = (doc.get("summary") or {}).get("images_to_decide")
            lines.append(
                "? inconclusive: the 95 % interval of the value lies across a threshold"
                + (f"; about {need} images would decide every such verdict" if isinstance(need, int) else "")
            )
        if any(
            isinstance(c, dict) and (c.get("degenerate") or 0) > 0 and not c.get("control")
            for c in doc.get("checks") or []
        ):
            lines.append("~ rests partly on constant maps (a similarity defined, not measured)")
        if lines:
            console.print(Text("\n".join(lines), style="dim"), soft_wrap=True)
    bad = [
        c for c in doc.get("checks") or [] if isinstance(c, dict) and gate_status_of(c) in ("fail", "error")
    ]
    for c in bad[:max_findings]:
        st = status_of(c)
        line = Text()
        line.append(f"{STATUS_TEXT[st]} ", style=_STYLE[st])
        line.append(f"{c.get('check')} {variant_label(c)}: {c.get('message') or ''}")
        console.print(line, soft_wrap=True)
    if len(bad) > max_findings:
        console.print(f"… {len(bad) - max_findings} more FAIL/ERROR cells in the report", markup=False)
    inputs = doc.get("inputs") or {}
    console.print(
        f"images: {inputs.get('loaded', 0)} audited, {len(inputs.get('skipped', []))} "
        f"skipped of {inputs.get('found', 0)} found",
        markup=False,
    )
    s = doc.get("summary") or {}
    drop_line = dropped_text(s.get("dropped"))
    if drop_line:
        style = "red" if (s.get("dropped") or {}).get("exceeded") and s.get("gate_failed") else ""
        console.print(Text(drop_line, style=style), soft_wrap=True)
    status = str(s.get("status") or "error")
    gate = "FAILED" if s.get("gate_failed") else "passed"
    line = Text("overall: ")
    line.append(STATUS_TEXT.get(status, status.upper()), style=_STYLE.get(status, ""))
    line.append(f" · gate (--fail-on {s.get('fail_on')}) {gate} · results: {out / 'results.json'}")
    console.print(line, soft_wrap=True)
    files = [
        out / FILES[f] for f in (formats or []) if f in FILES and f != "json" and (out / FILES[f]).exists()
    ]
    if files:
        console.print("report: " + ", ".join(str(f) for f in files), markup=False, soft_wrap=True)
