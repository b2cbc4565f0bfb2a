"""One audit over several processes with torchrun (saliaudit/distributed.py; README,
"Scaling out"): the batches are dealt to the ranks without overlap or loss, rank 0's report
equals a single process's, and a failing or killed rank stops the job with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saliaudit.distributed import FAULT_HOOK, World, current_world, owner, partition
from saliaudit.resume import merge_state

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sample_models" / "digits_cnn.pt2"
IMAGES = ROOT / "sample_models" / "images" / "digits"
#: Run-specific parts of results.json (as in tests/test_resume.py).
VOLATILE = ("run", "timings", "plan", "manifest", "config")
ARGS = [
    "--profile", "quick", "--max-images", "9", "--batch-size", "2", "--max-skipped", "0.5",
    "--methods", "fullgrad,random", "--checks", "completeness,randomization,bn_folding,class_sensitivity",
    "--psi", "paper,signed", "--overlays", "examples", "--examples-html", "2", "--format", "json,html", "-q",
]  # fmt: skip


def test_partition_has_no_overlap_or_loss_and_is_balanced() -> None:
    for n in range(0, 23):
        for bs in range(1, 5):
            for size in range(1, 6):
                shares = partition(n, bs, size)
                flat = sorted(i for s in shares for i in s)
                assert flat == list(range(n)), (n, bs, size)
                batches = [len({i // bs for i in s}) for s in shares]
                assert max(batches) - min(batches) <= 1, (n, bs, size, batches)


def test_owner_deals_batches_in_turn() -> None:
    assert [owner(k, 3) for k in range(1, 8)] == [0, 1, 2, 0, 1, 2, 0]


def test_current_world_only_under_torchrun(monkeypatch) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert current_world() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert current_world() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert current_world() == World(3, 4, 1)


def test_merge_state_merges_ranks_and_equals_replacing_a_superset() -> None:
    a = {"v": {"x.png": 1}}
    b = {"v": {"y.png": 2}, "w": {"z.png": 3}}
    assert merge_state(a, b) == {"v": {"x.png": 1, "y.png": 2}, "w": {"z.png": 3}}
    grown = {"v": {"x.png": 1, "y.png": 2}}
    assert merge_state(a, grown) == grown  # a sequential run: the newer snapshot holds the older
    assert merge_state(2, 5) == 5 and merge_state(5, 2) == 5  # counts: their maximum
    assert merge_state(["conv1+bn1"], []) == ["conv1+bn1"]  # an empty value keeps the earlier one


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALIAUDIT_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def _torchrun(out: Path, env: dict[str, str], images: Path = IMAGES) -> subprocess.CompletedProcess:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*torchrun, "-m", "saliaudit", "report", str(MODEL), str(images), *ARGS, "-o", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=out.parent)


def _numbers(path: Path) -> dict:
    doc = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in doc.items() if k not in VOLATILE}


needs_model = pytest.mark.skipif(not MODEL.is_file(), reason="sample model not present")


@pytest.mark.slow
@needs_model
def test_two_gloo_ranks_equal_one_process(tmp_path) -> None:
    images = tmp_path / "images"  # 8 digits and a file that does not decode (skipped)
    for digit in ("0", "1"):
        (images / digit).mkdir(parents=True)
        for src in sorted((IMAGES / digit).glob("*.png"))[:4]:
            shutil.copy(src, images / digit / src.name)
    (images / "0" / "0015.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # truncated
    env = _env()
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "saliaudit",
            "report",
            str(MODEL),
            str(images),
            *ARGS,
            "-o",
            str(tmp_path / "one"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    two = _torchrun(tmp_path / "two", env, images)
    assert two.returncode == 0, two.stderr
    assert _numbers(tmp_path / "two" / "results.json") == _numbers(tmp_path / "one" / "results.json")
    skipped = _numbers(tmp_path / "two" / "results.json")["inputs"]["skipped"]
    assert [s["path"] for s in skipped] == ["0/0015.png"]  # the decoding skip reaches the report
    assert two.stdout.count("results:") + two.stderr.count("results:") == 1  # rank 0 alone reports
    doc = json.loads((tmp_path / "two" / "results.json").read_text(encoding="utf-8"))
    assert doc["run"]["world_size"] == 2
    assert [r["rank"] for r in doc["run"]["ranks"]] == [0, 1]
    assert [r["images"] for r in doc["run"]["ranks"]] == [4, 4]  # batches 1, 3 and 2, 4
    single = json.loads((tmp_path / "one" / "results.json").read_text(encoding="utf-8"))
    assert single["run"]["world_size"] == 1 and single["run"]["ranks"][0]["images"] == 8
    # the overlays the second rank computed are written by rank 0, byte for byte the same
    for entry in single["manifest"]:
        assert entry in doc["manifest"] or not entry["path"].startswith("maps/")
    assert "2 (torchrun; rank 0" in (tmp_path / "two" / "report.html").read_text(encoding="utf-8")


@pytest.mark.slow
@needs_model
@pytest.mark.parametrize("fault", ["1:raise", "1:kill"])
def test_a_failing_rank_stops_the_job_with_nothing_written(tmp_path, fault: str) -> None:
    env = {**_env(), FAULT_HOOK: fault}
    out = tmp_path / "out"
    run = _torchrun(out, env)
    assert run.returncode != 0
    text = run.stdout + run.stderr
    if fault.endswith("raise"):  # rank 0 names the rank and the image it was on
        assert "saliaudit: error: rank 1 failed on 1/002.png: RuntimeError: test fault" in text
    else:  # torchrun names the killed rank; rank 0 says it wrote nothing
        assert "SIGKILL" in text and "rank 1 on 1/002.png); nothing was written" in text
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left in ([], [".saliaudit-output"]), left
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
@needs_model
def test_an_unusable_output_folder_stops_every_rank(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's", encoding="utf-8")
    run = _torchrun(out, _env())
    assert run.returncode != 0
    text = run.stdout + run.stderr
    assert text.count("saliaudit: error: ") == 1 and "not a saliaudit output" in text  # rank 0 alone
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_resume_and_budget_are_refused_under_torchrun() -> None:
    from saliaudit.cli_dist import join
    from saliaudit.config import AuditConfig
    from saliaudit.errors import ResumeRefusedError, UsageError

    world = World(0, 2, 0)
    with pytest.raises(ResumeRefusedError, match="not supported under torchrun"):
        join(world, AuditConfig(values={"device": "cpu"}, sources={}), resume=True)
    with pytest.raises(UsageError, match="--budget is not supported under torchrun"):
        join(world, AuditConfig(values={"device": "cpu", "budget": 60.0}, sources={}), resume=False)


PLUGIN = '''
import os
import torch
from PIL import Image
import saliaudit
from saliaudit.methods.common import forward_fn


@saliaudit.register_method("fails_on_one", family="gradient", reference="test plugin")
def fails_on_one(model, x, targets):
    """Input gradient; raises on a batch holding the image named in FAIL_IMAGE."""
    bad = model.preprocess([Image.open(os.environ["FAIL_IMAGE"]).convert("RGB")]).to(x.device)
    if any(torch.allclose(row, bad[0]) for row in x):
        raise RuntimeError("cannot explain this image")
    x = x.detach().requires_grad_(True)
    picked = forward_fn(model)(x).gather(1, targets.view(-1, 1)).sum()
    return torch.autograd.grad(picked, x)[0]
'''


@pytest.mark.slow
@needs_model
def test_a_method_failing_on_another_rank_gives_the_single_process_results(tmp_path) -> None:
    (tmp_path / "failing_plugin.py").write_text(PLUGIN, encoding="utf-8")
    # batch 2 (rank 1) fails; a single process computes no more maps of the method, and
    # rank 0's later batch 3 must not add to the results either
    env = {**_env(), "FAIL_IMAGE": str(IMAGES / "0" / "002.png")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path)])
    args = ["--max-images", "8", "--batch-size", "2", "--methods", "fails_on_one,random", "--plugin",
            "failing_plugin", "--checks", "completeness,randomization", "--profile", "quick",
            "--format", "json", "-q", "--fail-on", "never"]  # fmt: skip
    base = [sys.executable, "-m", "saliaudit", "report", str(MODEL), str(IMAGES), *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    one = subprocess.run([*base, "-o", "one"], env=env, capture_output=True, text=True, cwd=tmp_path)
    two = subprocess.run(
        [*torchrun, *base[1:], "-o", "two"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr[-2000:])
    a, b = _numbers(tmp_path / "one" / "results.json"), _numbers(tmp_path / "two" / "results.json")
    entry = next(m for m in b["methods"] if m["method"] == "fails_on_one")
    assert entry["status"] == "error" and "cannot explain this image" in entry["reason"]
    assert a == b
