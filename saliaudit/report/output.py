"""The output folder: created safely, written atomically, never emptied.

A folder is reused only when it is empty or a previous saliaudit output (it holds the
``.saliaudit-output`` marker); anything else needs ``--force``. Files are written under a
temporary name and renamed into place, so a reader never sees a half-written file, and
saliaudit never deletes a file it did not create.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import OutputError
from ..result import AuditResult

MARKER = ".saliaudit-output"


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
            raise OutputError("the output path exists and is not a folder", path=p,
                              hint="choose another -o")
        if p.is_dir():
            try:
                entries = [e.name for e in os.scandir(p)]
            except OSError as err:
                raise OutputError(f"cannot read the output folder ({err.strerror})", path=p,
                                  hint="choose another -o") from None
            if entries and MARKER not in entries and not self.force:
                raise OutputError(
                    "the output folder is not empty and is not a saliaudit output", path=p,
                    hint="choose another -o, or pass --force to write into it (nothing is deleted)")
        try:
            p.mkdir(parents=True, exist_ok=True)
            marker = p / MARKER
            if not marker.exists():
                atomic_write(marker, "This folder was written by saliaudit.\n")
        except OSError as err:
            raise OutputError(f"cannot create the output folder ({err.strerror})", path=p,
                              hint="check the permissions or choose another -o") from None
        self.prepared = True

    def write_results(self, result: AuditResult | dict, formats: list[str], **settings: object) -> list[Path]:
        """Write the requested formats of ``result`` (or of its ``to_dict()``) with
        ``report.render.write_outputs``: each file atomically, the PDF last. Returns the paths
        written; ``settings`` override the report settings recorded in the results
        (examples, examples_html, page_size)."""
        from .render import write_outputs

        doc = result if isinstance(result, dict) else result.to_dict()
        return write_outputs(doc, self.path, formats, **settings)  # type: ignore[arg-type]
