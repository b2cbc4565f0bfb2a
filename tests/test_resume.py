"""``saliaudit report --resume``: an interrupted audit continues from its saved units and
gives the uninterrupted run's results (docs/usage.md, "Interrupting and resuming")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saliaudit.cli import app
from saliaudit.resume import AuditState
from saliaudit.state_codec import decode, encode

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sample_models" / "digits_cnn.pt2"
IMAGES = ROOT / "sample_models" / "images" / "digits"
STATE = ".saliaudit-state"
#: Run-specific parts of results.json: when and how long, where the output went.
VOLATILE = ("run", "timings", "plan", "manifest", "config")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("SALIAUDIT_") or key in ("GITHUB_STEP_SUMMARY", "SOURCE_DATE_EPOCH"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    if not MODEL.is_file():
        pytest.skip("sample model not present")


def report(out: Path, *extra: str, images: Path = IMAGES, model: Path = MODEL):
    args = [
        "report", str(model), str(images), "-o", str(out), "--profile", "quick",
        "--max-images", "4", "--batch-size", "2", "--methods", "fullgrad,random",
        "--checks", "completeness,randomization,bn_folding,class_sensitivity",
        "--psi", "paper,signed", "--overlays", "examples", "--examples-html", "2",
        "--format", "json,html", "-q", *extra,
    ]  # fmt: skip
    return CliRunner().invoke(app, args, catch_exceptions=True)


def numbers(path: Path) -> dict:
    doc = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in doc.items() if k not in VOLATILE}


def count_maps(monkeypatch) -> dict[str, int]:
    """Rows of every map computation (the trained model's and the checks'), per method: the
    audit's work, counted rather than timed (the seconds are in bench/resume.py)."""
    from saliaudit.methods import MethodSource
    from saliaudit.methods.fullgrad import FullGradSource

    rows: dict[str, int] = {}
    for cls in (MethodSource, FullGradSource):

        def counting(self, model, x, *args, _original=cls.maps, **kwargs):
            rows[self.method] = rows.get(self.method, 0) + int(x.shape[0])
            return _original(self, model, x, *args, **kwargs)

        monkeypatch.setattr(cls, "maps", counting)
    return rows


def interrupt_after(monkeypatch, n: int) -> None:
    """Raise Ctrl-C right after the ``n``-th unit is saved (a unit boundary)."""
    original, count = AuditState.save, {"n": 0}

    def save(self, unit):
        original(self, unit)
        count["n"] += 1
        if count["n"] == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(AuditState, "save", save)


def test_codec_round_trip_is_exact():
    from saliaudit.checks.base import Measurement
    from saliaudit.maps import Variant

    v = Variant("fullgrad", "paper", None, False)
    m = Measurement(
        values=[0.1 + 0.2, float("nan"), -float("inf")],
        images=["a", "b", "c"],
        curves={"x": np.random.default_rng(0).normal(size=(3, 4))},
        axes={"x": [0, 0.5, 1, 2]},
        extra={"t": (1, 2), "k": {v: [np.float32(1.5)]}},
        notes=["n"],
    )
    back = decode(json.loads(json.dumps(encode({v: m, "t": torch.arange(3.0)}), allow_nan=False)))
    got = back[v]
    assert got.values[0] == 0.1 + 0.2 and np.isnan(got.values[1]) and got.values[2] == -float("inf")
    assert np.array_equal(got.curves["x"], m.curves["x"]) and got.curves["x"].dtype == np.float64
    assert got.extra["t"] == (1, 2) and got.extra["k"] == {v: [1.5]}
    assert torch.equal(back["t"], torch.arange(3.0))
    with pytest.raises(TypeError):
        encode(object())


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    full = tmp_path / "full"
    with monkeypatch.context() as mp:
        full_rows = count_maps(mp)
        done = report(full)
    assert done.exit_code in (0, 1), done.output
    assert not (full / STATE).exists()  # a finished audit removes its saved work

    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        interrupt_after(mp, 3)  # batch 1: fullgrad, random; batch 2: fullgrad; then Ctrl-C
        r = report(out)
    assert r.exit_code == 130, r.output
    assert "--resume" in r.output
    partial = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert partial["summary"]["partial"] is True
    # everything finished so far is in it: cells judged from the 3 units' measurements
    measured = {p["image"] for c in partial["checks"] if c["method"] == "random" for p in c["per_image"]}
    assert len(measured) == 2 and partial["checks"]
    units = sorted((out / STATE / "units").iterdir())
    assert len(units) == 3
    ledger = (out / ".saliaudit-output").read_text(encoding="utf-8")
    assert f"{STATE}/units/000002.json" in ledger  # the ledger knows them: not foreign

    assert not (out / "report.html").exists()  # an interrupt writes results.json (and junit)
    shown = tmp_path / "shown"
    r = CliRunner().invoke(app, ["render", str(out / "results.json"), "-o", str(shown), "--format", "html"])
    assert r.exit_code == 0, r.output
    assert "PARTIAL RESULTS" in (shown / "report.html").read_text(encoding="utf-8")

    saves = {"n": 0}
    original = AuditState.save

    def counting(self, unit):
        saves["n"] += 1
        original(self, unit)

    monkeypatch.setattr(AuditState, "save", counting)
    resumed_rows = count_maps(monkeypatch)
    r = report(out, "--resume")
    assert r.exit_code == done.exit_code, r.output
    # resuming costs clearly less than starting again: FullGrad's two units were saved (its
    # maps are computed only to time them for the plan), the random control's of batch 2 not
    assert resumed_rows["fullgrad"] <= 0.1 * full_rows["fullgrad"], (resumed_rows, full_rows)
    assert sum(resumed_rows.values()) <= 0.6 * sum(full_rows.values()), (resumed_rows, full_rows)
    assert saves["n"] == 1  # only batch 2's random unit was computed
    assert numbers(out / "results.json") == numbers(full / "results.json")
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert doc["timings"]["reused_units"] == 3 and doc["run"]["resumed"]["units_reused"] == 3
    assert not (out / STATE).exists()
    assert STATE not in (out / ".saliaudit-output").read_text(encoding="utf-8")
    assert not any(p["path"].startswith(STATE) for p in doc["manifest"])
    # the overlays of the reused units were kept (written by the interrupted run)
    for rec in doc["maps"]:
        assert (out / rec["path"]).is_file(), rec["path"]


@pytest.mark.slow
def test_resume_refuses_other_settings_and_missing_state(tmp_path, monkeypatch):
    out = tmp_path / "out"
    r = report(out, "--resume")
    assert r.exit_code == 2 and "nothing to resume" in r.output, r.output
    with monkeypatch.context() as mp:
        interrupt_after(mp, 1)
        assert report(out).exit_code == 130
    r = report(out, "--resume", "--seed", "7")
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("saliaudit: error:")]
    assert len(errors) == 1 and "cannot resume" in errors[0] and "seed" in errors[0], r.output
    assert (out / STATE / "units" / "000000.json").is_file()  # a refusal keeps the saved work
    r = report(out, "--resume", model=ROOT / "sample_models" / "shapes_vgg.pt2")  # another model
    errors = [ln for ln in r.output.splitlines() if ln.startswith("saliaudit: error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "the model file" in errors[0], r.output
    assert (out / STATE / "units" / "000000.json").is_file()


def test_report_of_partial_results_says_it_is_partial():
    from saliaudit.report.html import render_html

    from .report_fixture import make_results

    doc = make_results(6, n_examples=2)
    for target in ("html", "pdf"):  # report.html and the PDF's input
        whole = render_html(doc, target=target, examples=1, examples_html=1)
        assert "PARTIAL RESULTS" not in whole and "(partial)" not in whole
        doc["summary"] = {
            **doc["summary"],
            "partial": True,
            "status": "error",
            "reason": "interrupted (Ctrl-C)",
        }
        part = render_html(doc, target=target, examples=1, examples_html=1)
        assert "PARTIAL RESULTS" in part and "saliaudit report (partial)" in part
        assert "--resume" in part and "The audit did not finish: interrupted (Ctrl-C)" in part
        doc["summary"]["partial"] = False


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run's results (the comparison for every interrupt point)."""
    out = tmp_path_factory.mktemp("full") / "full"
    mp = pytest.MonkeyPatch()
    for key in list(os.environ):
        if key.startswith("SALIAUDIT_") or key in ("GITHUB_STEP_SUMMARY", "SOURCE_DATE_EPOCH"):
            mp.delenv(key)
    try:
        done = report(out)
    finally:
        mp.undo()
    assert done.exit_code in (0, 1), done.output
    return done.exit_code, numbers(out / "results.json")


def _raise_on_call(mp: pytest.MonkeyPatch, owner: object, name: str, call: int) -> None:
    original, count = getattr(owner, name), {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    mp.setattr(owner, name, wrapped)


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, recomputed",
    [
        ("before the first check", 4),  # in batch 1's first check: nothing saved yet
        ("mid-check", 2),  # in batch 2's randomization of fullgrad: 2 units saved
        ("rendering", 0),  # every unit saved, the outputs not yet written
    ],
)
def test_interrupt_points_resume_to_the_same_numbers(tmp_path, monkeypatch, uninterrupted, point, recomputed):
    """Ctrl-C at different points of the audit; ``--resume`` recomputes only the missing units
    and gives the uninterrupted run's numbers."""
    from saliaudit.checks.completeness import Completeness
    from saliaudit.checks.randomization import Randomization
    from saliaudit.report import render

    code, expected = uninterrupted
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        if point == "before the first check":
            _raise_on_call(mp, Completeness, "measure", 1)
        elif point == "mid-check":
            _raise_on_call(mp, Randomization, "measure", 3)  # batch 1: fullgrad, random; batch 2
        else:
            _raise_on_call(mp, render, "write_outputs", 1)
        r = report(out)
    assert r.exit_code == 130, r.output
    saves = {"n": 0}
    original = AuditState.save

    def counting(self, unit):
        saves["n"] += 1
        original(self, unit)

    if recomputed == 4:  # nothing was saved: there is nothing to resume, the rerun starts afresh
        r = report(out, "--resume")
        assert r.exit_code == 2 and "nothing to resume" in r.output, r.output
        monkeypatch.setattr(AuditState, "save", counting)
        r = report(out)
    else:
        monkeypatch.setattr(AuditState, "save", counting)
        r = report(out, "--resume")
    assert r.exit_code == code, r.output
    assert saves["n"] == recomputed
    assert numbers(out / "results.json") == expected
    assert not (out / STATE).exists()


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path, uninterrupted):
    """SIGKILL in the middle of a real process: every saved file is whole (atomic writes), no
    temporary file is left unflagged, and ``--resume`` ends with the uninterrupted numbers."""
    import signal
    import subprocess
    import sys
    import time

    code, expected = uninterrupted
    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "saliaudit", "report", str(MODEL), str(IMAGES), "-o", str(out),
        "--profile", "quick", "--max-images", "4", "--batch-size", "2", "--methods", "fullgrad,random",
        "--checks", "completeness,randomization,bn_folding,class_sensitivity", "--psi", "paper,signed",
        "--overlays", "examples", "--examples-html", "2", "--format", "json,html", "-q",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALIAUDIT_")}
    env.pop("SOURCE_DATE_EPOCH", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    units = out / STATE / "units"
    deadline = time.monotonic() + 300
    while not (units / "000001.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no unit saved within 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    for f in (out / STATE).rglob("*.json"):
        json.loads(f.read_text(encoding="utf-8"))  # no torn file
    r = report(out, "--resume")
    assert r.exit_code == code, r.output
    assert numbers(out / "results.json") == expected
    assert not list(out.rglob("*.tmp")) and not (out / STATE).exists()


@pytest.mark.slow
def test_interrupt_inside_the_randomization_cascade_resumes_after_the_last_step(
    tmp_path, monkeypatch, uninterrupted
):
    """A randomization step is a unit of its own: Ctrl-C after the 2nd cascade step of batch
    2's FullGrad unit; ``--resume`` reuses the 2 saved units and the 2 saved steps, computes
    only the remaining steps of that unit, and gives the uninterrupted run's numbers."""
    from saliaudit.resume import Progress

    code, expected = uninterrupted
    original = Progress.save
    calls: list[tuple] = []

    def record(self, check, key, state):
        original(self, check, key, state)
        if check == "randomization":  # (the runner saves the finished checks here too)
            calls.append((self.head.get("batch"), self.head.get("method"), dict(state["done"])))

    out = tmp_path / "out"
    with monkeypatch.context() as mp:

        def interrupting(self, check, key, state):
            record(self, check, key, state)
            if len([c for c in calls if c[:2] == (calls[0][0] + 1, "fullgrad")]) == 2:
                raise KeyboardInterrupt

        mp.setattr(Progress, "save", interrupting)
        r = report(out)
    assert r.exit_code == 130, r.output
    steps_first = [c for c in calls if c[:2] == (calls[0][0], "fullgrad")]
    total = steps_first[-1][2]["cascading"]  # the cascade's length
    assert total > 2
    assert (out / STATE / "steps.json").is_file()
    assert len(list((out / STATE / "units").iterdir())) == 2

    calls.clear()
    monkeypatch.setattr(Progress, "save", record)
    r = report(out, "--resume")
    assert r.exit_code == code, r.output
    resumed_unit = [c for c in calls if c[1] == "fullgrad"][: total - 2]
    # the interrupted unit continued at step 3: steps 1-2 were not recomputed
    assert [c[2]["cascading"] for c in resumed_unit] == list(range(3, total + 1))
    assert numbers(out / "results.json") == expected
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    # the cascade's saved steps, and the checks finished before it in that unit
    assert doc["run"]["resumed"]["steps_reused"] >= 1 and doc["run"]["resumed"]["units_reused"] == 2
    assert not (out / STATE).exists()


def _count_measures(mp: pytest.MonkeyPatch, calls: list, stop_at: int | None = None) -> None:
    """Record (check, method, images) of every check measurement; with ``stop_at``, Ctrl-C
    as the ``stop_at``-th measurement of FullGrad's second batch begins."""
    from saliaudit.checks import CHECKS, check_names

    check_names()
    for name in ("completeness", "randomization", "bn_folding", "class_sensitivity"):
        cls = CHECKS[name]

        def measure(self, batch, source, maps, _original=cls.measure, _name=name):
            calls.append((_name, source.method, tuple(batch.images)))
            fullgrad = [c for c in calls if c[1] == "fullgrad"]
            second = [c for c in fullgrad if c[2] != fullgrad[0][2]]
            if stop_at is not None and source.method == "fullgrad" and len(second) == stop_at:
                raise KeyboardInterrupt
            return _original(self, batch, source, maps)

        mp.setattr(cls, "measure", measure)


@pytest.mark.slow
def test_checks_finished_inside_a_unit_are_not_measured_again(tmp_path, uninterrupted):
    """A check's measurement of a batch is saved as it finishes: Ctrl-C as the 3rd check of
    batch 2's FullGrad unit starts; ``--resume`` measures only the checks not yet finished in
    that unit, and gives the uninterrupted run's numbers."""
    code, expected = uninterrupted
    out = tmp_path / "out"
    mp = pytest.MonkeyPatch()
    first: list = []
    try:
        _count_measures(mp, first, stop_at=3)
        r = report(out)
    finally:
        mp.undo()
    assert r.exit_code == 130, r.output
    batch2 = [c for c in first if c[1] == "fullgrad" and c[2] != first[0][2]]
    assert len(batch2) == 3  # two finished, the third interrupted
    again: list = []
    mp = pytest.MonkeyPatch()
    try:
        _count_measures(mp, again)
        r = report(out, "--resume")
    finally:
        mp.undo()
    assert r.exit_code == code, r.output
    resumed = [c for c in again if c[1] == "fullgrad" and c[2] == batch2[0][2]]
    finished = {c[0] for c in batch2[:2]}
    assert resumed and not finished & {c[0] for c in resumed}, (finished, resumed)
    assert resumed[0][0] == batch2[2][0]  # it continues with the interrupted check
    assert numbers(out / "results.json") == expected
    assert not (out / STATE).exists()
