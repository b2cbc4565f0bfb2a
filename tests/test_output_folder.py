"""An output folder that can be trusted (issue 16, point 4): the lock, the ledger and the
manifest, --force that never overwrites the user's files, the checks made before the audit,
and the machine-readable outputs of an interrupted audit.

Every run is the real command line (in-process, ``typer.testing.CliRunner``, or a subprocess
where a second process or a kill is the point) on a tiny exported CNN and generated images.
"Before the audit" is shown with a truncated model: when the folder's error is reported and not
the model's, the folder was checked first.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from saliaudit.cli import app
from saliaudit.report.folder_lock import FolderLock
from saliaudit.report.junit import render_junit
from saliaudit.report.output import LOCK, MARKER, STATE

from . import test_cli as cli
from .report_fixture import make_results
from .test_cli import assert_one_line_error, error_lines, load_results, make_images, report, run, sha256

# the fixtures of test_cli (assigned, so that test parameters of the same name do not shadow imports)
assets, runner, _clean_env = cli.assets, cli.runner, cli._clean_env

PAPER = ("--psi", "paper")
ROOT = str(Path(__file__).resolve().parents[1])


def files(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def consistent(out: Path, users: set[str] = frozenset()) -> dict:
    """The folder holds exactly what results.json's manifest lists (with those hashes and
    sizes), plus results.json, the ledger, the user's files ``users`` and, after an interrupt
    only, the saved work for --resume (in the ledger); no lock, no .tmp."""
    doc = load_results(out)
    listed = {m["path"]: (m["sha256"], m["bytes"]) for m in doc["manifest"]}
    present = files(out)
    state = {k for k in present if k.startswith(STATE + "/")}
    assert not state or doc["summary"]["partial"], sorted(state)
    present = {k: v for k, v in present.items() if k not in state}
    assert set(listed) == set(present) - {"results.json", MARKER} - set(users), sorted(present)
    for rel, (digest, size) in listed.items():
        assert present[rel] == digest and (out / rel).stat().st_size == size, rel
    assert not (out / LOCK).exists()
    assert not [p for p in out.rglob("*.tmp")]
    ledger = [json.loads(ln) for ln in (out / MARKER).read_text(encoding="utf-8").splitlines()[1:]]
    assert {e["path"] for e in ledger} >= set(listed) | {"results.json"} | state
    return doc


def truncated(assets, tmp_path: Path) -> Path:
    bad = tmp_path / "truncated.pt2"
    bad.write_bytes(assets["model"].read_bytes()[:500])
    return bad


# --------------------------------------------------------------------------- the lock

HOLD = """
import fcntl, json, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "2030-01-02 03:04:05 UTC"}).encode())
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_second_run_is_refused_while_another_process_holds_the_lock(runner, assets, tmp_path):
    out = tmp_path / "out"
    assert report(runner, assets["model"], assets["images"], out, *PAPER).exit_code == 0
    before = files(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out / LOCK)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = report(runner, assets["model"], assets["images"], out, *PAPER)
        line = assert_one_line_error(result, 3, str(out), "in use by another saliaudit run")
        assert f"pid {holder.pid} on {socket.gethostname()}, started 2030-01-02 03:04:05 UTC" in line
        before[LOCK] = sha256(out / LOCK)
        assert files(out) == before  # nothing written, the holder's lock untouched
        # render and compare write into folders too: the same lock
        result = run(runner, "render", out / "results.json", "--format", "json", "-o", out)
        assert_one_line_error(result, 3, "in use by another saliaudit run", f"pid {holder.pid}")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the holder is gone: its lock file stays behind, but nobody holds it: stale
    assert (out / LOCK).exists()
    result = report(runner, assets["model"], assets["images"], out, *PAPER)
    assert result.exit_code == 0, result.output
    warning = [ln for ln in error_lines(result.output) if "warning" in ln]
    assert len(warning) == 1 and f"pid {holder.pid}" in warning[0] and "no longer running" in warning[0]
    consistent(out)


def test_stale_lock_of_a_dead_process_is_taken_over(runner, assets, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    out = tmp_path / "out"
    out.mkdir()
    info = {"pid": dead.pid, "host": socket.gethostname(), "started": "2001-02-03 04:05:06 UTC"}
    (out / LOCK).write_text(json.dumps(info), encoding="utf-8")  # a run killed right after locking
    result = report(runner, assets["model"], assets["images"], out, *PAPER)
    assert result.exit_code == 0, result.output
    assert f"pid {dead.pid}" in result.output and "2001-02-03 04:05:06 UTC" in result.output
    consistent(out)


def test_lock_in_the_same_process_conflicts_and_is_released(tmp_path):
    first, second = FolderLock(tmp_path), FolderLock(tmp_path)
    first.acquire()
    with pytest.raises(Exception, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    assert not (tmp_path / LOCK).exists()
    second.acquire()  # free again
    assert second.stale is None  # released cleanly: nothing stale
    second.release()
    first.release()  # twice is harmless


# --------------------------------------------------------------------------- --force and the user's files


def test_force_never_overwrites_a_users_file_and_does_not_adopt_the_folder(runner, assets, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.json").write_text('{"my": "own results"}', encoding="utf-8")
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    before = files(out)
    model = truncated(assets, tmp_path)  # refused before the model is even loaded
    result = report(runner, model, assets["images"], out, "--force")
    line = assert_one_line_error(result, 3, "results.json", "not written by saliaudit", "move it away")
    assert "truncated" not in line
    assert files(out) == before and not (out / MARKER).exists() and not (out / LOCK).exists()

    (out / "results.json").unlink()
    del before["results.json"]
    result = report(runner, assets["model"], assets["images"], out, *PAPER, "--force")
    assert result.exit_code == 0, result.output
    consistent(out, users={"notes.txt"})
    # the marker does not make the user's files saliaudit's: a later run, even without
    # --force, refuses a file of the user's where it would write
    (out / "junit.xml").write_text("<my own/>", encoding="utf-8")
    result = report(runner, assets["model"], assets["images"], out, *PAPER, "--format", "json,junit")
    assert_one_line_error(result, 3, "junit.xml", "not written by saliaudit")
    assert (out / "junit.xml").read_text(encoding="utf-8") == "<my own/>"
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_a_users_file_in_maps_is_never_overwritten(runner, assets, tmp_path):
    """A name clash in maps/ cannot be foreseen before the audit: the write refuses it."""
    out = tmp_path / "mine"
    (out / "maps").mkdir(parents=True)
    clash = out / "maps" / "img0.fullgrad.paper.jpg"
    clash.write_bytes(b"my own picture")
    result = report(runner, assets["model"], assets["images"], out, *PAPER, "--force")
    assert result.exit_code == 3
    assert "img0.fullgrad.paper.jpg" in result.output and "not written by saliaudit" in result.output
    assert clash.read_bytes() == b"my own picture"
    assert load_results(out)["summary"]["partial"] is True  # the failed run says so


# --------------------------------------------------------------------------- reusing a folder


def test_rerun_removes_the_earlier_runs_files_and_keeps_edited_ones(runner, assets, tmp_path):
    out = tmp_path / "out"
    result = report(runner, assets["model"], assets["images"], out, *PAPER, "--format", "json,junit")
    assert result.exit_code == 0, result.output
    first = consistent(out)
    assert {m["path"] for m in first["manifest"]} == {
        "junit.xml",
        *(f"maps/img{i}.fullgrad.paper.jpg" for i in range(3)),
    }
    edited = out / "maps" / "img2.fullgrad.paper.jpg"
    edited.write_bytes(edited.read_bytes() + b"my annotation")
    kept = sha256(edited)
    (out / "maps" / "my sketch.png").write_bytes(b"the user's")
    (out / ".results.json.abcd1234.tmp").write_bytes(b"half")  # left by a killed atomic write
    (out / "maps" / ".img0.fullgrad.paper.jpg.k2j3h4g5.tmp").write_bytes(b"half")

    result = run(runner, "report", assets["model"], assets["images"], "-o", out, "--format", "json",
                 "--methods", "fullgrad", "--checks", "completeness", *PAPER, "--max-images", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = consistent(out, users={"maps/my sketch.png", "maps/img2.fullgrad.paper.jpg"})
    assert [m["path"] for m in doc["manifest"]] == ["maps/img0.fullgrad.paper.jpg"]
    assert not (out / "junit.xml").exists() and not (out / "maps" / "img1.fullgrad.paper.jpg").exists()
    assert sha256(edited) == kept and (out / "maps" / "my sketch.png").read_bytes() == b"the user's"
    text = result.output
    assert "my sketch.png" in text and "left alone" in text  # flagged, not touched
    assert "img2.fullgrad.paper.jpg" in text and "changed after saliaudit wrote them" in text
    assert "removed 2 unfinished temporary file(s)" in text
    assert "removed 2 file(s) of an earlier run" in text  # junit.xml and img1's map


def test_folder_of_an_earlier_version_is_adopted(runner, assets, tmp_path):
    """A marker without a ledger: the earlier version's outputs, and the files in maps/ named
    like overlays (also those its last results.json no longer listed), are saliaudit's."""
    out = tmp_path / "out"
    assert report(runner, assets["model"], assets["images"], out, *PAPER).exit_code == 0
    (out / MARKER).write_text("This folder was written by saliaudit.\n", encoding="utf-8")
    old = out / "maps" / "old_image.fullgrad.paper.png"
    old.write_bytes((out / "maps" / "img0.fullgrad.paper.jpg").read_bytes())  # an older .png name
    (out / "maps" / "my sketch.png").write_bytes(b"the user's")
    result = report(runner, assets["model"], assets["images"], out, *PAPER, "--format", "json,junit")
    assert result.exit_code == 0, result.output
    assert not old.exists()  # adopted and unchanged: removed
    consistent(out, users={"maps/my sketch.png"})
    assert "my sketch.png" in result.output and "left alone" in result.output


class _Died(BaseException):
    """Ends a run the way no handler catches (like a kill): no results.json is written."""


def test_files_of_a_run_that_died_are_known_and_removed(runner, assets, tmp_path, monkeypatch):
    """The fast stand-in of the SIGKILL test below: the overlays of a run that never wrote its
    results.json are in the ledger, so the next run removes those it does not rewrite."""
    import saliaudit.engine as engine

    write_overlays = engine.write_overlays

    def dies_after_the_first_batch(*args, **kwargs):
        write_overlays(*args, **kwargs)
        raise _Died

    monkeypatch.setattr(engine, "write_overlays", dies_after_the_first_batch)
    out = tmp_path / "out"
    images = make_images(tmp_path / "six", n=6)
    with pytest.raises(_Died):  # it passes through the command line's handlers, as a kill would
        CliRunner().invoke(app, ["report", str(assets["model"]), str(images), "-o", str(out),
                           "--batch-size", "6", "--methods", "fullgrad", "--checks", "completeness",
                           "--format", "json", *PAPER, "-q"], catch_exceptions=False)  # fmt: skip
    assert len(list((out / "maps").glob("*.jpg"))) == 6 and not (out / "results.json").exists()
    monkeypatch.setattr(engine, "write_overlays", write_overlays)
    result = report(runner, assets["model"], assets["images"], out, *PAPER)
    assert result.exit_code == 0, result.output
    doc = consistent(out)
    assert sorted(m["path"] for m in doc["manifest"]) == [f"maps/img{i}.fullgrad.paper.jpg" for i in range(3)]


@pytest.mark.slow  # a subprocess that imports torch: 5-10 s
def test_files_of_a_killed_run_are_known_and_removed(assets, runner, tmp_path):
    """SIGKILL in the middle of an audit: its overlays were recorded before they were renamed
    into place, so the next run removes those it does not rewrite, and the dead run's lock is
    stale."""
    images = make_images(tmp_path / "many", n=30)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALIAUDIT_")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "saliaudit", "report", str(assets["model"]), str(images), "-o", str(out),
           "--batch-size", "1", "--methods", "fullgrad", "--checks", "completeness", "--format", "json",
           "--overlays", "all", *PAPER, "-q"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / "maps").is_dir() or len(list((out / "maps").glob("*.jpg"))) < 5:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the audit never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    left = list((out / "maps").glob("*.jpg"))
    assert 5 <= len(left) < 30 and not (out / "results.json").exists() and (out / LOCK).exists()

    result = report(runner, assets["model"], assets["images"], out, *PAPER)
    assert result.exit_code == 0, result.output
    assert f"pid {proc.pid}" in result.output  # the dead run's lock, taken over
    doc = consistent(out)
    assert sorted(m["path"] for m in doc["manifest"]) == [f"maps/img{i}.fullgrad.paper.jpg" for i in range(3)]


def test_python_api_uses_the_folder_like_the_command_line(assets, tmp_path):
    import saliaudit
    from saliaudit.errors import OutputError

    out = tmp_path / "api"
    pick = dict(methods=["fullgrad"], checks=["completeness"], psi=["paper"])
    result = saliaudit.audit(assets["model"], assets["images"], output=out, **pick)
    saliaudit.render(result, out, formats=["json"])
    assert not (out / LOCK).exists()
    ledger = {json.loads(ln)["path"] for ln in (out / MARKER).read_text(encoding="utf-8").splitlines()[1:]}
    assert ledger == {"results.json", *(f"maps/img{i}.fullgrad.paper.jpg" for i in range(3))}
    mine = tmp_path / "mine"
    (mine / "maps").mkdir(parents=True)
    (mine / "maps" / "img0.fullgrad.paper.jpg").write_bytes(b"mine")
    with pytest.raises(OutputError, match="not empty"):
        saliaudit.audit(assets["model"], assets["images"], output=mine, **pick)
    with pytest.raises(OutputError, match="not written by saliaudit"):
        saliaudit.audit(assets["model"], assets["images"], output=mine, force=True, **pick)
    assert (mine / "maps" / "img0.fullgrad.paper.jpg").read_bytes() == b"mine"
    assert not (mine / LOCK).exists()


# --------------------------------------------------------------------------- checks before the audit


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_folder_is_refused_before_the_audit(runner, assets, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = report(runner, truncated(assets, tmp_path), assets["images"], out)
        line = assert_one_line_error(result, 3, "ro", "cannot write into the output folder", "ermission")
        assert "truncated" not in line
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_unwritable_places_are_refused_before_the_audit(runner, assets, tmp_path):
    """What root cannot be denied by permissions: a file where a folder must be."""
    model = truncated(assets, tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("keep", encoding="utf-8")
    result = report(runner, model, assets["images"], blocker / "out")
    line = assert_one_line_error(result, 3, "cannot create the output folder")
    assert "truncated" not in line
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text(
        "This folder was written by saliaudit.\n", encoding="utf-8"
    )  # an older version's
    (out / "maps").write_text("not a folder", encoding="utf-8")
    line = assert_one_line_error(report(runner, model, assets["images"], out), 3, "maps", "not a folder")
    assert "truncated" not in line
    assert blocker.read_text(encoding="utf-8") == "keep" and (out / "maps").read_text() == "not a folder"
    # without overlays, maps/ does not matter: the model is loaded and its error is reported
    assert_one_line_error(report(runner, model, assets["images"], out, "--no-overlays"), 3, "truncated")


def test_full_disk_is_refused_before_the_audit_with_the_numbers(runner, assets, tmp_path, monkeypatch):
    import shutil

    import saliaudit.report.output as output

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: usage._replace(free=2_000_000))
    out = tmp_path / "out"
    result = report(runner, truncated(assets, tmp_path), assets["images"], out, *PAPER, "--overlays", "all",
                    "--format", "json,html")  # fmt: skip
    line = assert_one_line_error(result, 3, "not enough free space", "3 images", "3 overlays", "2.0 MB free")
    assert "truncated" not in line and "--overlays examples or none" in line
    needed = 3 * 300_000 + 10_000_000 + 3 * 20_000 + 6_000_000
    assert f"about {needed / 1e6:.1f} MB needed" in line
    assert not out.exists()  # refused: the folder it had created is removed again


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 4 MB tmpfs, almost full (a 3.5 MB file of someone else's); skipped where
    mounting is not allowed (not root, no CAP_SYS_ADMIN, no tmpfs)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
        )
    except OSError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        (mnt / "filler.bin").write_bytes(b"\0" * 3_500_000)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_full_disk_is_refused_before_the_audit(runner, assets, tmp_path, small_tmpfs):
    out = small_tmpfs / "out"
    result = report(
        runner, truncated(assets, tmp_path), assets["images"], out, *PAPER, "--format", "json,html"
    )
    line = assert_one_line_error(result, 3, "not enough free space", "kB free", "needed")
    assert "truncated" not in line  # the folder was checked before the model was loaded
    assert not out.exists()
    assert (small_tmpfs / "filler.bin").stat().st_size == 3_500_000  # nothing else touched


@pytest.mark.parametrize("value", ["", "abc", "-5", "1.5"])
def test_bad_source_date_epoch_is_refused_before_anything(runner, assets, tmp_path, value):
    out = tmp_path / "out"
    env = {"SOURCE_DATE_EPOCH": value}
    result = report(runner, assets["model"], assets["images"], out, "--format", "json,pdf", env=env)
    assert_one_line_error(result, 2, "SOURCE_DATE_EPOCH", repr(value), "non-negative integer")
    assert not out.exists()
    doc = make_results(2, n_examples=1)
    (tmp_path / "results.json").write_text(json.dumps(doc), encoding="utf-8")
    result = run(runner, "render", tmp_path / "results.json", "-o", tmp_path / "r", env=env)  # html,pdf
    assert_one_line_error(result, 2, "SOURCE_DATE_EPOCH")
    assert not (tmp_path / "r").exists()


def test_source_date_epoch_only_matters_for_the_pdf(runner, assets, tmp_path):
    result = report(runner, truncated(assets, tmp_path), assets["images"], tmp_path / "out",
                    env={"SOURCE_DATE_EPOCH": "soon"})  # fmt: skip
    assert_one_line_error(result, 3, "truncated")  # json only: the variable is not read


# --------------------------------------------------------------------------- interrupts


def test_interrupt_writes_partial_results_json_and_junit(runner, assets, tmp_path, monkeypatch):
    import saliaudit.engine as engine

    calls = {"n": 0}
    write_overlays = engine.write_overlays

    def interrupted_on_the_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return write_overlays(*args, **kwargs)

    monkeypatch.setattr(engine, "write_overlays", interrupted_on_the_second_batch)
    out = tmp_path / "out"
    result = report(runner, assets["model"], assets["images"], out, *PAPER, "--batch-size", "1",
                    "--format", "json,junit,html")  # fmt: skip
    assert result.exit_code == 130, result.output
    assert f"partial results in {out / 'results.json'} and {out / 'junit.xml'}" in result.output
    doc = consistent(out)
    summary = doc["summary"]
    assert summary["partial"] is True and summary["status"] == "error" and "interrupted" in summary["reason"]
    assert {m["path"] for m in doc["manifest"]} == {"junit.xml", "maps/img0.fullgrad.paper.jpg"}
    assert not (out / "report.html").exists()  # not machine-readable: not written on an interrupt
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["partial"] == "true" and props["status"] == "error"
    cases = suite.findall("testcase")
    assert int(suite.get("tests")) == len(cases) == len(doc["checks"]) + 1
    audit = [c for c in cases if (c.get("classname"), c.get("name")) == ("saliaudit", "audit")]
    assert len(audit) == 1
    error = audit[0].find("error")
    assert error.get("type") == "interrupted" and "did not finish" in error.get("message")
    assert int(suite.get("errors")) == len(suite.findall("testcase/error"))


def test_junit_of_a_finished_audit_has_no_partial_case():
    doc = make_results(2, n_examples=1)
    suite = ET.fromstring(render_junit(doc).encode("utf-8")).find("testsuite")
    assert "partial" not in {p.get("name") for p in suite.find("properties")}
    assert not [c for c in suite.findall("testcase") if c.get("classname") == "saliaudit"]
    stopped = {**doc, "summary": {**doc["summary"], "partial": True, "status": "error", "reason": "boom"}}
    suite = ET.fromstring(render_junit(stopped).encode("utf-8")).find("testsuite")
    case = [c for c in suite.findall("testcase") if c.get("classname") == "saliaudit"][0]
    assert case.find("error").get("type") == "error" and "boom" in case.find("error").get("message")
