"""The output folder: locked, checked before the work, written atomically, kept consistent.

A folder is reused only when it is empty or a previous saliaudit output (it holds the
``.saliaudit-output`` marker); anything else needs ``--force``. Even then saliaudit never
overwrites or deletes a file it did not write: the marker is also the folder's *ledger*
(:mod:`saliaudit.report.ledger`), one JSON line ``{path, sha256, bytes}`` per file saliaudit
wrote, appended before the file is renamed into place, so it also knows the files of a run
that was killed. A run:

1. :meth:`OutputFolder.prepare`: checks the folder is writable (a probe file), takes the
   folder's lock (:mod:`saliaudit.report.folder_lock`), refuses when a planned output exists
   and is not in the ledger, removes the unfinished ``.NAME.XXXXXXXX.tmp`` files of an
   interrupted run, and checks that the disk has room for the estimated outputs;
2. writes every file with :func:`atomic_write` (under a temporary name, renamed into place);
3. :meth:`OutputFolder.finish` (``report`` only): removes the files of earlier runs that this
   run did not write when they are unchanged (same sha256), and keeps those changed since with
   a warning; :meth:`OutputFolder.manifest` lists what the run wrote for ``results.json``;
4. :meth:`OutputFolder.close`: releases the lock.

This module is a leaf of ``report/``: it imports no renderer and nothing else of the package
but the errors, the lock and the ledger (leaves too), so the renderers (``report.render``, ``report.overlay``) and the
CLI can all write through :func:`atomic_write` without an import cycle.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OutputError
from .folder_lock import LOCK, FolderLock, holder_text
from .ledger import FILE_MODE, MARKER, Ledger, ours_unfinished, replace_file, sha256_file

__all__ = [
    "FILES",
    "FILE_MODE",
    "LOCK",
    "MARKER",
    "STATE",
    "OutputFolder",
    "Planned",
    "atomic_write",
    "human_bytes",
]

#: The file of each output format in the folder.
FILES = {"json": "results.json", "html": "report.html", "pdf": "report.pdf", "junit": "junit.xml"}

#: The folder of an audit's saved work (``--resume``; :mod:`saliaudit.resume`): written
#: through the ledger like every output, never listed in the manifest, removed when the
#: audit finishes.
STATE = ".saliaudit-state"

_ACTIVE: list[OutputFolder] = []


def human_bytes(n: float) -> str:
    """``1.2 GB``, ``350 MB``, ``12 kB`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "kB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder. Inside a
    prepared :class:`OutputFolder` the file must be new or saliaudit's own (else
    :class:`OutputError`), and it is recorded in the folder's ledger before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    folder = next((f for f in _ACTIVE if f.covers(path)), None)
    if folder is None:
        replace_file(path, raw)
        return path
    rel = folder.claim(path)
    digest = hashlib.sha256(raw).hexdigest()
    replace_file(path, raw, before_rename=lambda: folder.record(rel, digest, len(raw)))
    return path


@dataclass
class Planned:
    """What a run will write: fixed file names, overlays under ``maps/``, and the estimated
    size of it all (``None``: not checked) with how it was estimated."""

    files: list[str] = field(default_factory=list)
    maps: bool = False
    bytes: int | None = None
    detail: str = ""


class OutputFolder:
    """The ``-o`` folder of a run: ``prepare()``, write, ``finish()`` (report), ``close()``."""

    def __init__(self, path: Path, *, force: bool = False):
        self.path = Path(path)
        self.force = force
        self.prepared = False
        self.owner = False  # a report run: finish() replaces the earlier runs' files
        self.ledger = Ledger(self.path)  # the files saliaudit wrote here
        self.written: dict[str, dict[str, Any]] = {}  # ... and those this run wrote
        self.warnings: list[str] = []  # about the user's files, the lock: always shown
        self.notes: list[str] = []  # what was tidied: shown unless --quiet
        self._abs = os.path.abspath(self.path)
        self._lock: FolderLock | None = None

    # ----------------------------------------------------------------------- checks
    def prepare(self, planned: Planned | None = None, *, owner: bool = False) -> None:
        """Check, lock and adopt the folder before any work; raises :class:`OutputError`
        (with nothing of the user's touched) when it cannot be used. ``owner``: a report
        run, which replaces the folder's earlier saliaudit files (see :meth:`finish`)."""
        planned = planned or Planned()
        p = self.path
        if p.exists() and not p.is_dir():
            raise OutputError("the output path exists and is not a folder", path=p, hint="choose another -o")
        if p.is_dir() and not (p / MARKER).exists() and not self.force and self._foreign_entries():
            raise OutputError(
                "the output folder is not empty and is not a saliaudit output",
                path=p,
                hint="choose another -o, or pass --force to write into it "
                "(saliaudit never overwrites or deletes a file it did not write)",
            )
        created = not p.exists()
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(
                f"cannot create the output folder ({err.strerror})",
                path=p,
                hint="check the permissions or choose another -o",
            ) from None
        try:
            self._probe(p)
            self._lock = FolderLock(p)
            self._lock.acquire()
            if self._lock.stale:
                self.warnings.append(
                    f"{p / LOCK}: took over the lock of a run that is no longer running "
                    f"({holder_text(self._lock.stale)})"
                )
            self._load_ledger()
            self._check_planned(planned)
            if (p / MARKER).exists() and (removed := self.ledger.remove_unfinished()):
                self.notes.append(f"removed {removed} unfinished temporary file(s) of an interrupted run")
            if owner and planned.maps:
                self._flag_unknown_maps()
            self._check_room(planned)
            self._write_ledger()
            self.ledger.open()
        except BaseException:
            self.close()
            if created:  # refused: leave no empty folder behind
                try:
                    p.rmdir()
                except OSError:
                    pass
            raise
        self.owner, self.prepared = owner, True
        _ACTIVE.append(self)

    def _foreign_entries(self) -> list[str]:
        try:
            names = [e.name for e in os.scandir(self.path)]
        except OSError as err:
            raise OutputError(
                f"cannot read the output folder ({err.strerror})", path=self.path, hint="choose another -o"
            ) from None
        return [n for n in names if n != LOCK and not ours_unfinished(n)]

    def _probe(self, folder: Path) -> None:
        """Create and remove a file: the folder is writable (a designed message, not an
        error after the audit)."""
        try:
            fd, tmp = tempfile.mkstemp(prefix=".saliaudit-probe.", suffix=".tmp", dir=folder)
            os.close(fd)
            os.unlink(tmp)
        except OSError as err:
            raise OutputError(
                f"cannot write into the output folder ({err.strerror or err})",
                path=folder,
                hint="check its permissions and free space, or choose another -o",
            ) from None

    def _load_ledger(self) -> None:
        try:
            self.ledger.load()
        except OSError as err:
            raise OutputError(
                f"cannot read {MARKER} ({err.strerror})", path=self.path, hint="check its permissions"
            ) from None

    def _check_planned(self, planned: Planned) -> None:
        for name in planned.files:
            f = self.path / name
            if f.is_dir():
                raise OutputError(
                    f"{name} is a folder, where saliaudit would write a file",
                    path=self.path,
                    hint="move it away or choose another -o",
                )
            if os.path.lexists(f) and name not in self.ledger.entries:
                raise OutputError(
                    f"{name} exists and was not written by saliaudit; it is not overwritten, "
                    "even with --force",
                    path=self.path,
                    hint="move it away or choose another -o",
                )
        maps = self.path / "maps"
        if planned.maps and os.path.lexists(maps) and not maps.is_dir():
            raise OutputError(
                "maps exists and is not a folder, where saliaudit writes the overlays",
                path=self.path,
                hint="move it away, choose another -o, or pass --overlays none",
            )
        if planned.maps and maps.is_dir():
            self._probe(maps)

    def _flag_unknown_maps(self) -> None:
        try:
            names = sorted(e.name for e in os.scandir(self.path / "maps") if not e.is_dir())
        except OSError:
            return
        unknown = [n for n in names if f"maps/{n}" not in self.ledger.entries]
        if unknown:
            shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
            self.warnings.append(
                f"{self.path / 'maps'}: {len(unknown)} file(s) saliaudit did not write are left "
                f"alone ({shown})"
            )

    def _check_room(self, planned: Planned) -> None:
        if not planned.bytes:
            return
        try:
            free = shutil.disk_usage(self.path).free
        except OSError:
            return
        if free < planned.bytes:
            detail = f"; {planned.detail}" if planned.detail else ""
            raise OutputError(
                f"not enough free space for the outputs: about {human_bytes(planned.bytes)} needed"
                f"{detail}; {human_bytes(free)} free",
                path=self.path,
                hint="free some space, choose another -o, or write fewer overlays with --overlays "
                "examples or none",
            )

    # ----------------------------------------------------------------------- writes
    def covers(self, path: Path) -> bool:
        """Whether ``path`` lies in this (prepared) folder."""
        return os.path.abspath(path).startswith(self._abs + os.sep)

    def claim(self, path: Path) -> str:
        """The ledger name of ``path``; :class:`OutputError` when it exists and saliaudit
        did not write it (never overwritten)."""
        rel = Path(os.path.relpath(os.path.abspath(path), self._abs)).as_posix()
        if rel not in self.ledger.entries and rel not in self.written and os.path.lexists(path):
            raise OutputError(
                "exists and was not written by saliaudit; it is not overwritten",
                path=path,
                hint="move it away or choose another -o",
            )
        return rel

    def record(self, rel: str, digest: str, size: int) -> None:
        """Append ``rel`` to the ledger (before its rename: a kill still leaves it known)."""
        self.written[rel] = {"sha256": digest, "bytes": size}
        self.ledger.append(rel, self.written[rel])

    def manifest(self) -> list[dict[str, Any]]:
        """``[{path, sha256, bytes}]`` of every file this run wrote, but results.json."""
        return [
            {"path": k, **v}
            for k, v in sorted(self.written.items())
            if k != "results.json" and not k.startswith(STATE + "/")
        ]

    def adopt(self, rel: str) -> None:
        """Count ``rel``, a file an earlier run wrote here (it is in the ledger and unchanged
        in size), as written by this run: :meth:`finish` keeps it (a resumed audit's reused
        work)."""
        entry = self.ledger.entries.get(rel)
        f = self.path / rel
        if entry is not None and f.is_file() and f.stat().st_size == entry.get("bytes"):
            self.written[rel] = dict(entry)

    def discard(self, prefix: str) -> int:
        """Remove the files under ``prefix`` (a folder, relative) that saliaudit wrote (in the
        ledger), and the folders left empty; how many files."""
        removed = 0
        for rel in sorted(set(self.ledger.entries) | set(self.written)):
            if not rel.startswith(prefix.rstrip("/") + "/") and rel != prefix:
                continue
            try:
                (self.path / rel).unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError:
                continue
            self.ledger.entries.pop(rel, None)
            self.written.pop(rel, None)
        root = self.path / prefix
        if root.is_dir():
            for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                root.rmdir()
            except OSError:
                pass
        return removed

    # ----------------------------------------------------------------------- the end
    def finish(self) -> None:
        """A report run's files are written: remove the earlier runs' files it did not write
        when they are unchanged; keep (and warn about) those changed since."""
        if not (self.prepared and self.owner):
            return
        removed, changed = 0, []
        entries = self.ledger.entries
        for rel, rec in sorted(entries.items()):
            if rel in self.written or rel.startswith(STATE + "/"):  # the state: see discard()
                continue
            f = self.path / rel
            try:
                if not os.path.lexists(f):
                    del entries[rel]
                elif f.is_file() and not f.is_symlink() and sha256_file(f) == rec.get("sha256"):
                    f.unlink()
                    del entries[rel]
                    removed += 1
                else:
                    changed.append(rel)
            except OSError:
                changed.append(rel)
        if removed:
            self.notes.append(f"removed {removed} file(s) of an earlier run that this run did not write")
        if changed:
            shown = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
            self.warnings.append(
                f"{self.path}: kept {len(changed)} file(s) of an earlier run that changed after "
                f"saliaudit wrote them ({shown}); delete them if they are no longer needed"
            )

    def _write_ledger(self) -> None:
        try:
            self.ledger.rewrite()
        except OSError as err:
            raise OutputError(
                f"cannot write {MARKER} ({err.strerror})",
                path=self.path,
                hint="check the permissions and free space, or choose another -o",
            ) from None

    def close(self) -> None:
        """Stop recording, rewrite the ledger without the files that are gone, and release
        the lock (every exit path; safe to call twice)."""
        self.ledger.close()
        if self in _ACTIVE:
            _ACTIVE.remove(self)
            try:  # the appended ledger stays valid when this fails (e.g. a full disk)
                self._write_ledger()
            except OutputError:
                pass
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
