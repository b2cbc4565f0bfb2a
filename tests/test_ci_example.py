"""The example GitHub Actions workflow (``examples/github-actions.yml``) is valid YAML with the
documented triggers and steps, its saliaudit command lines are exactly those of the README's
"Gate a pull request in GitHub Actions", and every option they use exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from saliaudit.cli import app

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "github-actions.yml"
README = (ROOT / "README.md").read_text(encoding="utf-8")
SECTION_TITLE = "## Gate a pull request in GitHub Actions"


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def _steps() -> list[dict]:
    return _workflow()["jobs"]["audit"]["steps"]


def _saliaudit_lines(text: str) -> list[str]:
    """Every line of ``text`` that runs saliaudit, whitespace-normalized."""
    return [" ".join(ln.split()) for ln in text.splitlines() if ln.strip().startswith("saliaudit ")]


def workflow_commands() -> list[str]:
    return [line for step in _steps() for line in _saliaudit_lines(step.get("run", ""))]


def readme_section() -> str:
    assert SECTION_TITLE in README, f"README.md has no section {SECTION_TITLE!r}"
    return README.split(SECTION_TITLE, 1)[1].split("\n## ", 1)[0]


def test_workflow_triggers_and_variables():
    doc = _workflow()
    triggers = doc.get("on", doc.get(True))  # YAML 1.1 reads the key `on` as True
    assert set(triggers) == {"pull_request", "push"}
    assert triggers["push"]["branches"] == ["main"]
    assert {"MODEL", "IMAGES", "BUDGET", "FAIL_ON"} <= set(doc["env"])
    assert doc["permissions"]["actions"] == "read"  # gh run download needs it
    assert doc["defaults"]["run"]["shell"] == "bash"  # -o pipefail: `compare | tee` keeps the exit code


def test_workflow_steps():
    steps = _steps()
    uses = [s.get("uses", "") for s in steps]
    assert uses[0].startswith("actions/checkout@") and uses[1].startswith("actions/setup-python@")
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs and "pip install -e ." in runs
    assert "gh run download" in runs and "GH_TOKEN" in str(steps)
    assert not [u for u in uses if u and not u.startswith("actions/")], "third-party actions"
    (report,) = [c for c in workflow_commands() if c.startswith("saliaudit report ")]
    assert "--budget" in report and "pdf" in report and "json" in report
    (compare,) = [c for c in workflow_commands() if c.startswith("saliaudit compare ")]
    assert "baseline/results.json audit/results.json" in compare and "--fail-on regression" in compare
    uploads = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@v4")]
    report_upload = next(s for s in uploads if s["with"]["name"] == "saliaudit-report")
    assert report_upload["if"] == "always()" and "audit/report.pdf" in report_upload["with"]["path"]
    baseline_upload = next(s for s in uploads if s["with"]["name"] == "saliaudit-baseline")
    assert baseline_upload["with"]["path"] == "audit/results.json" and "push" in baseline_upload["if"]
    assert "saliaudit-baseline" in runs  # the pull request downloads the artifact main uploads


def test_workflow_commands_are_those_of_the_readme_both_ways():
    in_workflow = set(workflow_commands())
    in_readme = set(_saliaudit_lines(readme_section()))
    assert in_workflow, "the workflow runs no saliaudit command"
    assert not in_workflow - in_readme, f"not in the README section: {sorted(in_workflow - in_readme)}"
    assert not in_readme - in_workflow, f"not in the workflow: {sorted(in_readme - in_workflow)}"


@pytest.mark.parametrize("line", workflow_commands())
def test_workflow_command_options_exist(line):
    tokens = shlex.split(line.split(" | ", 1)[0])  # the saliaudit command, not what it is piped to
    command = tokens[1]
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, (command, result.output)
    help_text = result.output
    options = {t.split("=", 1)[0] for t in tokens[2:] if re.match(r"^--?[a-zA-Z]", t)}
    for option in options:
        assert re.search(rf"(^|[\s,/]){re.escape(option)}([\s,=]|$)", help_text, re.MULTILINE), (
            command,
            option,
        )
