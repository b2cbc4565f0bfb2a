"""The exclusive lock of an output folder: one saliaudit run writes into a folder at a time.

The lock is the file ``.saliaudit.lock`` in the folder, holding the holder's pid, host and
start time as JSON. On Linux and macOS it is taken with ``fcntl.flock`` (exclusive,
non-blocking) on that file: the kernel releases a ``flock`` when its holder exits however it
exits (SIGKILL, a crash), so a lock file whose ``flock`` can be taken is stale by definition,
and taking it over is safe. After taking the ``flock`` the file is checked to still be the one
at the path (a releasing holder unlinks it), else the lock is retried. Without ``fcntl``
(Windows) the file is created with ``O_CREAT | O_EXCL``; an existing lock of a process on this
host that no longer runs is stale and replaced. A lock on another host is never taken over.

A leaf module like :mod:`saliaudit.report.output`: it imports only the errors.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK", "FolderLock", "holder_text"]

LOCK = ".saliaudit.lock"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def holder_text(info: dict[str, Any]) -> str:
    """``pid 1234 on host, started 2025-01-02 10:00:00 UTC`` (what is known of it)."""
    pid = info.get("pid", "unknown")
    host = f" on {info['host']}" if info.get("host") else ""
    started = f", started {info['started']}" if info.get("started") else ""
    return f"pid {pid}{host}{started}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return True
    return True


class FolderLock:
    """The lock of ``folder``: :meth:`acquire` raises :class:`OutputError` when another live
    run holds it; :meth:`release` removes it (safe to call twice)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None  # the dead holder whose lock was taken over
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}

    def _read(self, fd: int | None = None) -> dict[str, Any]:
        try:
            if fd is not None:
                os.lseek(fd, 0, os.SEEK_SET)
                raw = os.read(fd, 4096)
            else:
                raw = self.path.read_bytes()[:4096]
            info = json.loads(raw.decode("utf-8", "replace") or "{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _refuse(self, info: dict[str, Any]) -> OutputError:
        return OutputError(
            f"the output folder is in use by another saliaudit run ({holder_text(info)})",
            path=self.path.parent,
            hint=f"wait for it to finish, or choose another -o; if no such run exists, delete {LOCK}",
        )

    def _write_info(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(self.info) + "\n").encode("utf-8"))

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputError` naming the holder's pid and start time."""
        try:
            if fcntl is not None:
                self._acquire_flock()
            else:  # pragma: no cover - exercised on Windows only
                self._acquire_excl()
        except OSError as err:
            raise OutputError(
                f"cannot create the lock file {LOCK} ({err.strerror or err})",
                path=self.path.parent,
                hint="check the permissions or choose another -o",
            ) from None

    def _acquire_flock(self) -> None:
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = {}
                for _ in range(10):  # the holder may not have written its details yet
                    info = self._read(fd)
                    if info:
                        break
                    time.sleep(0.05)
                os.close(fd)
                raise self._refuse(info) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (unlinked) it between open and flock: retry
                os.close(fd)
                continue
            previous = self._read(fd)
            if previous:  # a lock file nobody holds: its writer died without removing it
                self.stale = previous
            self._write_info(fd)
            self.fd = fd
            return
        raise OSError(0, "the lock file keeps changing")

    def _acquire_excl(self) -> None:  # pragma: no cover - Windows
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = self._read()
                pid = info.get("pid")
                here = info.get("host") == socket.gethostname()
                if here and isinstance(pid, int) and not _pid_alive(pid):
                    self.stale = info
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._refuse(info) from None
            self._write_info(fd)
            self.fd = fd
            return
        raise self._refuse(self._read())

    def release(self) -> None:
        """Remove the lock file and release the lock (the file first, while still held)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
