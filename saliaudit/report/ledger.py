"""The ledger of an output folder: which files in it saliaudit wrote, with their sha256.

It is the folder's marker ``.saliaudit-output``: a header line, then one JSON line
``{"path", "sha256", "bytes"}`` per file (paths relative to the folder, ``/``-separated).
:class:`~saliaudit.report.output.OutputFolder` appends a line before each file is renamed into
place, so that the files of a run that was killed are known too, and rewrites the ledger
without the files that are gone when the run ends. A marker without the header was written by
an earlier saliaudit, which overwrote its outputs without asking: its output files, and the
files in ``maps/`` named like overlays, are adopted.

Also here, the primitives every write goes through: :func:`replace_file` (a temporary file in
the same folder, renamed into place) and :func:`sha256_file`. A leaf module: no import from
the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["FILE_MODE", "MARKER", "Ledger", "ours_unfinished", "replace_file", "sha256_file"]

MARKER = ".saliaudit-output"
HEADER = "saliaudit output folder: each line below is a file saliaudit wrote here (path, sha256, bytes)\n"
#: What an earlier saliaudit (a marker without a ledger) wrote at the top of its folders.
_LEGACY = (
    "results.json",
    "report.html",
    "report.pdf",
    "junit.xml",
    "diff.json",
    "compare.html",
    "compare.pdf",
    "compare-junit.xml",
)
#: An overlay's name (``report.overlay.map_filename``): ``STEM.METHOD.VARIANT.jpg`` (``.png``
#: before saliaudit wrote JPEG overlays).
_OVERLAY = re.compile(r"^[A-Za-z0-9._-]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_-]+\.(?:png|jpg)$")
#: ``.NAME.XXXXXXXX.tmp``: a temporary file of :func:`replace_file` (or the probe) left by a kill.
_TMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
_TMP_OF = (".json", ".xml", ".html", ".pdf", ".png", ".jpg", MARKER, "saliaudit-probe")


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


#: Mode of written files: what ``open()`` would give under the user's umask (mkstemp gives 0600).
FILE_MODE = 0o666 & ~_umask()


def ours_unfinished(name: str) -> bool:
    """Whether ``name`` is an unfinished temporary file of saliaudit's (or its probe)."""
    m = _TMP.match(name)
    return bool(m) and m["name"].endswith(_TMP_OF)


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def replace_file(path: Path, data: bytes, before_rename: Callable[[], None] | None = None) -> None:
    """Write ``data`` to a temporary file next to ``path`` and rename it into place (a reader
    never sees half a file); ``before_rename()`` runs just before the rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, FILE_MODE)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _inside(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


class Ledger:
    """The files saliaudit wrote in ``folder``: ``entries[path] = {sha256, bytes}``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.entries: dict[str, dict[str, Any]] = {}
        self._fh: Any = None

    @property
    def marker(self) -> Path:
        return self.folder / MARKER

    def load(self) -> None:
        """Read the marker (OSError when it cannot be read); entries of files that are gone
        are dropped; a marker of an earlier saliaudit adopts its outputs."""
        if not self.marker.exists():
            return
        lines = self.marker.read_text(encoding="utf-8", errors="replace").splitlines()
        if not lines or lines[0] + "\n" != HEADER:
            self._adopt_legacy()
            return
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if isinstance(rec, dict) and isinstance(rec.get("path"), str) and _inside(rec["path"]):
                self.entries[rec["path"]] = {"sha256": rec.get("sha256"), "bytes": rec.get("bytes")}
        self.entries = {k: v for k, v in self.entries.items() if os.path.lexists(self.folder / k)}

    def _adopt_legacy(self) -> None:
        names = [n for n in _LEGACY if (self.folder / n).is_file()]
        try:
            names += [f"maps/{e.name}" for e in os.scandir(self.folder / "maps") if _OVERLAY.match(e.name)]
        except OSError:
            pass
        for rel in names:
            f = self.folder / rel
            if f.is_file() and not f.is_symlink():
                self.entries[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}

    def rewrite(self) -> None:
        """Write the marker anew with the current entries (atomically; OSError on failure)."""
        lines = [json.dumps({"path": k, **v}) for k, v in sorted(self.entries.items())]
        replace_file(self.marker, (HEADER + "".join(f"{ln}\n" for ln in lines)).encode("utf-8"))

    def open(self) -> None:
        """Start appending to the marker."""
        self._fh = open(self.marker, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def append(self, rel: str, entry: dict[str, Any]) -> None:
        """Record ``rel`` (in memory, and on disk once :meth:`open`)."""
        self.entries[rel] = entry
        if self._fh is not None:
            self._fh.write(json.dumps({"path": rel, **entry}) + "\n")
            self._fh.flush()

    def close(self) -> None:
        """Stop appending."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None

    def remove_unfinished(self) -> int:
        """Remove the ``.NAME.XXXXXXXX.tmp`` files that a killed run left in the folder and in
        ``maps/``; how many."""
        removed = 0
        state = self.folder / ".saliaudit-state"
        for folder in (self.folder, self.folder / "maps", state, state / "units"):
            try:
                names = [e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
            except OSError:
                continue
            for n in names:
                if ours_unfinished(n):
                    try:
                        (folder / n).unlink()
                        removed += 1
                    except OSError:
                        pass
        return removed
