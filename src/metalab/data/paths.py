"""Where raw data is looked for, and the error raised when it is not there."""

from __future__ import annotations

import os
from pathlib import Path

from metalab.io import cache_dir

__all__ = ["DataNotFoundError", "data_dirs"]


class DataNotFoundError(FileNotFoundError):
    """A data set is missing or incomplete; the message says where we looked and what to do."""


def data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for raw data, in order: ``data_dir``, ``$METALAB_DATA``, the cache.

    Downloads go to the last one, ``<cache>/data``.
    """
    found = [Path(data_dir)] if data_dir else []
    if os.environ.get("METALAB_DATA"):
        found.append(Path(os.environ["METALAB_DATA"]))
    found.append(cache_dir() / "data")
    return found
