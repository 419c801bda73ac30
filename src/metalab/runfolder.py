"""A run folder belongs to one run.

While a process trains into a folder it holds an exclusive lock on ``<folder>/.lock``
(``fcntl.flock``: the kernel releases it when the process dies, even by ``kill -9``; not on
Windows, where folders are not locked), so a
second run started into the same folder is refused with the first one's process id. A lock
file left by a process that died is detected (its record was not cleared) and reported. A
folder that holds a run is never silently reused: a new run needs ``resume`` (continue it) or
``overwrite`` (move it aside to ``<folder>.replaced-<time>``; nothing is deleted). Temporary
files of an interrupted atomic write are removed when the folder is next claimed. Everything
that happens to the run is appended to ``<folder>/history.jsonl``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Literal

try:
    import fcntl
except ImportError:  # not POSIX (Windows): folders are not locked, the rest still holds
    fcntl = None

__all__ = ["HISTORY", "RUN_FILES", "RunFolder", "RunFolderError"]

LOCK = ".lock"
HISTORY = "history.jsonl"
RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "test.json")  # a folder with any holds a run
Mode = Literal["new", "resume", "overwrite", "restart", "continue"]


class RunFolderError(ValueError):
    """The folder is in use by another process, or holds a run the command would clobber."""


def _read(fd: int) -> str:
    """The lock file's record (who holds or held it)."""
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunFolder:
    """The output folder of one run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    def holds_run(self) -> bool:
        return any((self.path / name).exists() for name in RUN_FILES)

    def record(self, event: str, **details: Any) -> None:
        """Append ``event`` to the folder's history (one JSON line, flushed to disk)."""
        line = json.dumps({"time": _now(), "event": event, "pid": os.getpid(), **details})
        with open(self.path / HISTORY, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def history(self) -> list[dict[str, Any]]:
        path = self.path / HISTORY
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def claim(self, mode: Mode) -> list[str]:
        """Lock the folder for this process and make it ready for ``mode``; returns what was
        found and done (messages for the user, also in the history).

        ``new`` refuses a folder that holds a run; ``overwrite`` moves such a run aside first;
        ``resume`` and ``restart`` (torchrun restarted the job) continue the run in it;
        ``continue`` is a later ``fit`` of the same trainer.
        """
        if self._lock_fd is not None:
            return []
        self.path.mkdir(parents=True, exist_ok=True)
        messages = self._lock()
        if mode == "new" and self.holds_run():
            self.release()
            raise RunFolderError(
                f"{self.path} holds another run ({self._describe()}); add --resume to "
                f"continue it, --overwrite to move it aside and start afresh, or choose "
                f"another output folder (--out).")
        if mode == "overwrite" and self.holds_run():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = self.path.with_name(f"{self.path.name}.replaced-{stamp}")
            self.release()
            self.path.rename(aside)
            self.path.mkdir()
            messages = self._lock()
            self.record("overwrite", moved_to=str(aside))
            moved = [f"moved the run that was in {self.path} to {aside}"]
        else:
            moved = []
        messages += self._clean()
        for message in messages:
            self.record("notice", message=message)
        return moved + messages

    def release(self) -> None:
        """Clear the lock record (a clean exit) and unlock."""
        if self._lock_fd is None:
            return
        os.ftruncate(self._lock_fd, 0)
        if fcntl is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
        self._lock_fd = None

    def _lock(self) -> list[str]:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or "unknown"
            os.close(fd)
            raise RunFolderError(f"{self.path} is in use by another run ({holder}); wait for "
                                 f"it to finish, or choose another output folder (--out).") \
                from None
        left = _read(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}".encode())
        self._lock_fd = fd
        if left:  # the previous holder never cleared its record: it was killed or crashed
            return [f"the previous run in this folder ({left}) ended without releasing its "
                    f"lock (killed or crashed); its lock was taken over"]
        return []

    def _clean(self) -> list[str]:
        """Remove temporary files of interrupted atomic writes (``.<name>.<random>.tmp``)."""
        leftovers = sorted(p for p in self.path.glob(".*.tmp") if p.is_file())
        for path in leftovers:
            path.unlink()
        if not leftovers:
            return []
        return [f"removed {len(leftovers)} temporary file(s) of an interrupted write: "
                f"{', '.join(p.name for p in leftovers)}"]

    def _describe(self) -> str:
        found = [name for name in RUN_FILES if (self.path / name).exists()]
        return ", ".join(found)
