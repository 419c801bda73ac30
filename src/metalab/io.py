"""Files that must never be half-written: atomic saves, and where caches live."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "atomic_write_text", "cache_dir", "cached_json"]


def _atomic_replace(path: Path, write: Any) -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the user's umask decides
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that leaves either the old file or the complete new one, never a torn one."""
    _atomic_replace(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_save`)."""
    _atomic_replace(Path(path), lambda f: f.write(text.encode()))


def cache_dir() -> Path:
    """Where processed data sets are cached: ``$METALAB_CACHE``, else ``~/.cache/metalab``.

    Caches are not written next to the raw data because data folders are often shared and
    read-only (as ``../shared/data`` is here).
    """
    root = os.environ.get("METALAB_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metalab"
    return Path(root)


def cached_json(path: str | os.PathLike, compute: Callable[[], Any], fresh: bool = False,
                ) -> Any:
    """``compute()``'s JSON-able result, stored at ``path`` atomically; later calls read it
    back (``fresh`` recomputes), so work cut short resumes where it stopped."""
    path = Path(path)
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    value = compute()
    atomic_write_text(json.dumps(value, indent=2) + "\n", path)
    return value
