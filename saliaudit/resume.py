"""The saved work of an audit, so that ``saliaudit report ... --resume`` continues it.

The unit of work is one batch × one method: its maps' contributions to every check (the
checks' measurements of that batch, their skips and errors), the example figures, overlays,
FullGrad completeness records, edge similarities and summation-to-delta records it produced,
and the state the checks carry across batches for their verdicts (figure maps, counts).
Inside the unit that is running, each check's measurement of the batch is saved as it
finishes, and a check with steps of its own (the randomization cascade: one randomized model
and its maps per step) saves its progress after every step, in ``.saliaudit-state/steps.json``
(:class:`Progress`); a resumed audit recomputes that unit's maps, replays its finished checks
and continues the interrupted check after its last saved step.

Each unit is written as it completes, atomically, to ``.saliaudit-state/units/NNNNNN.json``
(numbered in the order the audit runs them) in the output folder, with the audit's identity
in ``.saliaudit-state/identity.json``: the saliaudit, PyTorch, torchvision and NumPy
versions, the device, the model file's sha256, every image's path, size and sha256, the
settings that affect the numbers, the seed, and each method's and check's effective
parameters. Units are JSON (:mod:`saliaudit.state_codec`), never pickle.

Because the audit runs units in a fixed order and saves each as it finishes, the saved units
are a prefix of the run; ``--resume`` replays that prefix (after checking the identity) and
computes the rest. Replaying adds the saved numbers in the order they were first added, so
the resumed results equal an uninterrupted run's. A finished audit removes the state.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ResumeRefusedError
from .report.ledger import sha256_file
from .report.output import STATE, atomic_write
from .state_codec import decode, encode

if TYPE_CHECKING:
    from .engine import Audit
    from .maps import MapSource
    from .report.output import OutputFolder
    from .result import CompletenessRecord

__all__ = ["STATE", "AuditState", "Progress", "audit_identity"]

#: Settings that change only what is written or how it is judged, not a unit's numbers.
_NOT_IDENTITY = frozenset(
    {
        "output",
        "format",
        "force",
        "page_size",
        "annotations",
        "examples",
        "fail_on",
        "max_skipped",
        "budget",
        "plugins",
    }
)
_WHAT = {
    "versions": "the saliaudit/PyTorch/NumPy versions",
    "device": "the device",
    "model_sha256": "the model file",
    "images": "the images",
    "checks": "the checks' effective parameters",
    "methods": "the methods' parameters",
}


def _plain(o: Any) -> Any:
    return json.loads(json.dumps(o, default=str, sort_keys=True))


def audit_identity(audit: Audit) -> dict[str, Any]:
    """What a resumed audit must share with the interrupted one (JSON-ready)."""
    from .engine import environment_versions

    versions = environment_versions()
    images = [[e.rel, e.path.stat().st_size, sha256_file(e.path)] for e in audit.listing.entries]
    settings = {k: v for k, v in audit.cfg.values.items() if k not in _NOT_IDENTITY}
    return _plain(
        {
            "versions": {k: versions[k] for k in ("saliaudit", "torch", "torchvision", "numpy")},
            "device": str(audit.device),
            "model_sha256": audit.lm.sha256,
            "images": images,
            "settings": settings,
            "checks": {c.name: c.p for c in audit.runner.checks},
            "methods": [[m["method"], m["params"], m["status"]] for m in audit.result.methods],
        }
    )


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "settings":
            a, b = old.get(key) or {}, new.get(key) or {}
            names = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append("the setting(s) " + ", ".join(names))
        elif key == "images":
            a, b = old.get(key) or [], new.get(key) or []
            first = next((x[0] for x, y in zip(b, a) if x != y), None)
            where = f"first difference: {first}" if first else f"{len(b)} now, {len(a)} before"
            out.append(f"the images ({where})")
        else:
            out.append(_WHAT.get(key, key))
    return out


class AuditState:
    """The ``.saliaudit-state`` folder of a report run in the prepared output folder ``out``."""

    def __init__(self, out: OutputFolder, resume: bool = False):
        self.out, self.resume = out, resume
        self.dir = Path(out.path) / STATE
        self.units: list[dict[str, Any]] = []  # the saved prefix (resume)
        self.next_seq = 0
        self.reused = 0
        self.reused_s: dict[str, float] = {}
        self.broken: str | None = None
        self.identity_sha = ""
        self.previous: dict[str, Any] = {}
        self._identity_doc: str | None = None  # identity.json, not yet written
        self.pending: dict[str, Any] | None = None  # steps.json of the interrupted unit
        self.steps_reused = 0

    def require(self) -> None:
        """With ``--resume``: the folder must hold an interrupted audit's state (else a
        :class:`UsageError`, before the model is loaded)."""
        if self.resume and not (self.dir / "identity.json").is_file():
            raise ResumeRefusedError(
                "nothing to resume: the output folder holds no saved work of an interrupted audit "
                "(a finished audit removes it)",
                path=self.out.path,
                hint="run without --resume to start the audit",
            )

    def begin(self, identity: dict[str, Any], started: str | None = None) -> None:
        """Check the identity (``--resume``) and load the saved units, or start afresh
        (``started``: when this audit began, recorded for a later resume)."""
        raw = json.dumps(identity, sort_keys=True)
        self.identity_sha = hashlib.sha256(raw.encode()).hexdigest()
        if not self.resume:
            self.out.discard(STATE)
            # written with the first finished unit: a run that stops before any unit (no
            # usable image, a refused model) leaves no state behind
            self._identity_doc = json.dumps({**identity, "run": {"started_at": started}}, sort_keys=True)
            return
        saved = json.loads((self.dir / "identity.json").read_text(encoding="utf-8"))
        self.previous = saved.get("run") or {}
        saved.pop("run", None)
        diff = _differences(saved, identity)
        if diff:
            raise ResumeRefusedError(
                f"cannot resume: {'; '.join(diff)} differ from the interrupted audit's",
                path=self.out.path,
                hint="rerun with the same model, images and settings, or without --resume to start afresh",
            )
        self.out.adopt(f"{STATE}/identity.json")
        seq = 0
        while (f := self.dir / "units" / f"{seq:06d}.json").is_file():
            try:
                unit = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                break
            if unit.get("identity") != self.identity_sha:
                break
            self.units.append(unit)
            self.out.adopt(f"{STATE}/units/{f.name}")
            for rec in unit.get("overlays") or []:
                self.out.adopt(decode(rec).path)
            seq += 1
        self.next_seq = seq
        self.total_saved = seq
        self._drop_from(seq)
        self._load_steps()

    def _load_steps(self) -> None:
        """The in-progress unit's saved steps, if they belong to this audit (else dropped)."""
        f = self.dir / STEPS
        if not f.is_file():
            return
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = None
        if doc and doc.get("identity") == self.identity_sha and doc.get("seq") == self.next_seq:
            self.pending = doc
            self.out.adopt(f"{STATE}/{STEPS}")
        else:
            self.out.discard(f"{STATE}/{STEPS}")

    def progress(self, batch_no: int, method: str, images: list[str]) -> Progress:
        """Where the checks of the unit (batch, method), about to run, save their steps;
        with the interrupted run's saved steps of this unit when it is the one it stopped in."""
        doc, self.pending = self.pending, None
        if doc is not None and (doc["batch"], doc["method"], doc["images"]) != (
            batch_no,
            method,
            list(images),
        ):
            doc = None
        saved = decode(doc["checks"]) if doc is not None else {}
        head = {"batch": batch_no, "method": method, "images": list(images)}
        return Progress(self, head, saved)

    def save_steps(self, head: dict[str, Any], checks: dict[str, Any]) -> None:
        """Write the running unit's steps so far (atomically, replacing the previous ones)."""
        if self.broken:
            return
        try:
            text = json.dumps(
                {**head, "seq": self.next_seq, "identity": self.identity_sha, "checks": encode(checks)},
                allow_nan=False,
            )
        except (TypeError, ValueError) as err:
            self.broken = f"{head.get('method')} steps: {err}"
            return
        self._write_identity()
        atomic_write(self.dir / STEPS, text)

    def _drop_from(self, seq: int) -> None:
        """Remove saved units from ``seq`` on (they are recomputed)."""
        names = sorted(p.name for p in (self.dir / "units").glob("*.json")) if self.dir.is_dir() else []
        for name in names:
            if name.split(".")[0].isdigit() and int(name.split(".")[0]) >= seq:
                self.out.discard(f"{STATE}/units/{name}")

    def take(self, batch_no: int, method: str, images: list[str]) -> dict[str, Any] | None:
        """The saved unit of (batch, method) if it is the next of the saved prefix."""
        k = self.reused
        if k >= len(self.units):
            return None
        unit = self.units[k]
        if unit["batch"] != batch_no or unit["method"] != method or unit["images"] != list(images):
            self.units = self.units[:k]  # the order differs: recompute the rest
            self.next_seq = k
            self._drop_from(k)
            return None
        self.reused += 1
        for stage, s in (unit.get("seconds") or {}).items():
            self.reused_s[stage] = self.reused_s.get(stage, 0.0) + float(s)
        return unit

    def save(self, unit: dict[str, Any]) -> None:
        """Write a finished unit (atomically); one that cannot be encoded stops the saving
        (the rest of the audit is then recomputed by a resume)."""
        if self.broken:
            return
        try:
            text = json.dumps({**unit, "seq": self.next_seq, "identity": self.identity_sha}, allow_nan=False)
        except (TypeError, ValueError) as err:
            self.broken = f"{unit.get('method')}: {err}"
            return
        self._write_identity()
        atomic_write(self.dir / "units" / f"{self.next_seq:06d}.json", text)
        self.next_seq += 1
        self.out.discard(f"{STATE}/{STEPS}")  # the unit is whole: its steps are in it

    def _write_identity(self) -> None:
        if self._identity_doc is not None:
            atomic_write(self.dir / "identity.json", self._identity_doc)
            self._identity_doc = None

    def remove(self) -> None:
        """The audit finished: its saved work is no longer needed."""
        self.out.discard(STATE)


# ----------------------------------------------------------------------------- steps
STEPS = "steps.json"


class Progress:
    """The steps a check finished inside the running unit of work, for ``--resume``.

    A check with long steps of its own (:class:`saliaudit.checks.randomization.
    Randomization`: one randomized model per step) calls :meth:`load` when it starts
    measuring a batch and :meth:`save` after each step, with JSON-ready state (numbers, NumPy
    arrays, see :mod:`saliaudit.state_codec`) and a ``key`` naming what it measures (its
    images, variants): a resumed audit hands back the state saved under the same key and the
    check continues after its last step. Without a saved audit state (the Python API, a
    run whose state cannot be saved) both are no-ops.
    """

    def __init__(self, state: AuditState | None = None, head: dict[str, Any] | None = None, saved=None):
        self.state, self.head = state, head or {}
        self.saved: dict[str, Any] = dict(saved or {})
        self.current: dict[str, Any] = {}
        self.resumed = 0

    def load(self, check: str, key: Any) -> dict[str, Any] | None:
        """The state ``check`` saved under ``key`` in the interrupted run, once (else None)."""
        entry = self.saved.pop(check, None)
        if entry is None or entry.get("key") != _plain_key(key):
            return None
        self.resumed += 1
        if self.state is not None:
            self.state.steps_reused += 1
        return entry["state"]

    def save(self, check: str, key: Any, state: dict[str, Any]) -> None:
        """Record ``check``'s state after a finished step (written at once)."""
        if self.state is None:
            return
        self.current[check] = {"key": _plain_key(key), "state": state}
        self.state.save_steps(self.head, self.current)


def _plain_key(key: Any) -> Any:
    return json.loads(json.dumps(key, default=str))


# ----------------------------------------------------------------------------- units
class Mark:
    """Where the audit's accumulators stood when a unit began."""

    def __init__(self, audit: Audit, complete: list[CompletenessRecord]):
        self.log = len(audit.runner.log)
        self.oom = audit.runner.oom_retries
        self.edge = {k: len(v) for k, v in audit.edge_sim.items()}
        self.figures = len(audit.figures.maps)
        self.overlays = len(audit.result.maps)
        self.complete = len(complete)
        self.discards = len(audit.discards.log) if audit.discards is not None else 0
        self.attribution = len(audit.result.attribution_completeness)
        self.stages = {**audit.timer.per_stage, **audit.runner.timings}
        self.t0 = time.perf_counter()


def unit_record(
    audit: Audit, mark: Mark, source: MapSource, images: list[str], complete: list[CompletenessRecord]
) -> dict[str, Any]:
    """Everything one (batch, method) added since ``mark``, JSON-ready (may raise TypeError)."""
    entry = audit._entry(source)
    stages = {**audit.timer.per_stage, **audit.runner.timings}
    seconds = {k: round(v - mark.stages.get(k, 0.0), 6) for k, v in stages.items() if v != mark.stages.get(k)}
    return {
        "batch": audit.batch_no,
        "method": source.method,
        "images": list(images),
        "runner": encode(audit.runner.log[mark.log :]),
        "oom_retries": audit.runner.oom_retries - mark.oom,
        "edge_sim": encode({k: v[mark.edge.get(k, 0) :] for k, v in audit.edge_sim.items()}),
        "figures": encode(audit.figures.maps[mark.figures :]),
        "overlays": encode(audit.result.maps[mark.overlays :]),
        "completeness": encode(complete[mark.complete :]),
        "discards": encode(audit.discards.log[mark.discards :] if audit.discards is not None else []),
        "attribution": encode(audit.result.attribution_completeness[mark.attribution :]),
        "failed": entry["reason"] if entry["status"] == "error" else None,
        "decomposition": entry.get("decomposition"),
        "check_state": encode(
            {c.name: {a: getattr(c, a) for a in c.resume_state} for c in audit.runner.checks}
        ),
        "seconds": seconds,
    }


def restore_unit(
    audit: Audit, unit: dict[str, Any], source: MapSource, complete: list[CompletenessRecord]
) -> None:
    """Replay a saved unit into the audit, in the order its numbers were first added. A
    method that failed in an earlier unit adds nothing more (one process computes no more
    maps of it; under torchrun another rank may have computed later batches)."""
    if audit._entry(source)["status"] != "ok":
        audit.runner.add_source(source)
        return
    if unit.get("failed") is not None:
        audit._entry(source).update(status="error", reason=unit["failed"])
        audit.runner.fail_source(source, f"the method failed: {unit['failed']}")
    if unit.get("decomposition"):
        audit._entry(source)["decomposition"] = unit["decomposition"]
    audit.runner.add_source(source)
    for item in decode(unit["runner"]):
        audit.runner.apply(item)
    audit.runner.oom_retries += int(unit.get("oom_retries") or 0)
    for k, v in decode(unit["edge_sim"]).items():
        audit.edge_sim.setdefault(k, []).extend(v)
    audit.figures.maps.extend(decode(unit["figures"]))
    audit.result.maps.extend(decode(unit["overlays"]))
    complete.extend(decode(unit["completeness"]))
    if audit.discards is not None:
        for parts in decode(unit["discards"]):
            audit.discards.add_parts(parts)
    audit.result.attribution_completeness.extend(decode(unit["attribution"]))
    state = decode(unit["check_state"])
    for c in audit.runner.checks:
        for attr, value in (state.get(c.name) or {}).items():
            if attr in c.resume_state:
                setattr(c, attr, merge_state(getattr(c, attr, None), value))


def merge_state(old: Any, new: Any) -> Any:
    """A check's cross-batch state after a saved unit: dictionaries merged key by key
    (units of several torchrun ranks each hold their own figures), counts by their maximum,
    an empty value keeping the earlier one; anything else replaced. A sequential run's
    snapshots only grow, so merging them equals taking the newest."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = dict(old)
        for k, v in new.items():
            out[k] = merge_state(out.get(k), v) if k in out else v
        return out
    if new is None or (isinstance(new, (list, tuple, dict, str)) and not new):
        return old if old is not None else new
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(new, bool):
        return max(old, new)
    return new
