"""The output folder: created safely, written atomically, never emptied.

A folder is reused only when it is empty or a previous saliaudit output (it holds the
``.saliaudit-output`` marker); anything else needs ``--force``. Files are written under a
temporary name and renamed into place, so a reader never sees a half-written file, and
saliaudit never deletes a file it did not create.

This module is a leaf of ``report/``: it imports no renderer and nothing else of the package
but the errors, so the renderers (``report.render``, ``report.overlay``) and the CLI can all
write through :func:`atomic_write` without an import cycle.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import OutputError

__all__ = ["FILES", "FILE_MODE", "MARKER", "OutputFolder", "atomic_write"]

MARKER = ".saliaudit-output"

#: The file of each output format in the folder.
FILES = {"json": "results.json", "html": "report.html", "pdf": "report.pdf", "junit": "junit.xml"}


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


#: Mode of written files: what ``open()`` would give under the user's umask (mkstemp gives 0600).
FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


class OutputFolder:
    """The ``-o`` folder of a report run."""

    def __init__(self, path: Path, *, force: bool = False):
        self.path = path
        self.force = force
        self.prepared = False

    def prepare(self) -> None:
        """Create the folder, or check that reusing it is safe; raises :class:`OutputError`."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise OutputError("the output path exists and is not a folder", path=p, hint="choose another -o")
        if p.is_dir():
            try:
                entries = [e.name for e in os.scandir(p)]
            except OSError as err:
                raise OutputError(
                    f"cannot read the output folder ({err.strerror})", path=p, hint="choose another -o"
                ) from None
            if entries and MARKER not in entries and not self.force:
                raise OutputError(
                    "the output folder is not empty and is not a saliaudit output",
                    path=p,
                    hint="choose another -o, or pass --force to write into it (nothing is deleted)",
                )
        try:
            p.mkdir(parents=True, exist_ok=True)
            marker = p / MARKER
            if not marker.exists():
                atomic_write(marker, "This folder was written by saliaudit.\n")
        except OSError as err:
            raise OutputError(
                f"cannot create the output folder ({err.strerror})",
                path=p,
                hint="check the permissions or choose another -o",
            ) from None
        self.prepared = True
