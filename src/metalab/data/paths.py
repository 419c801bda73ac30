"""Where raw data is looked for, and the error raised when it is not there."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from metalab.io import cache_dir

__all__ = ["DataNotFoundError", "data_dirs", "fetch_checked", "fetch_file", "find_folder",
           "md5sum"]


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


def find_folder(name: str, files: Iterable[str], data_dir: str | os.PathLike | None,
                label: str, base_url: str) -> Path:
    """The first ``<dir>/<name>/`` among :func:`data_dirs` that holds every one of ``files``;
    else a :class:`DataNotFoundError` saying where it looked and how to get ``label``'s files
    (``metalab datasets --download <name>``, or from ``base_url``)."""
    files, dirs = list(files), data_dirs(data_dir)
    for root in dirs:
        if all((root / name / file).is_file() for file in files):
            return root / name
    raise DataNotFoundError(
        f"{label} not found: looked for {name}/{{{','.join(files)}}} in "
        f"{', '.join(str(d) for d in dirs)}. Run `metalab datasets --download {name}`, or "
        f"set METALAB_DATA to a folder holding {name}/ (files from {base_url}).")


def fetch_checked(base_url: str, md5s: dict[str, str], dest: Path) -> None:
    """Download each file of ``md5s`` from ``base_url`` into ``dest`` unless a copy with that
    MD5 is already there."""
    for name, md5 in md5s.items():
        if not (dest / name).is_file() or md5sum(dest / name) != md5:
            fetch_file(base_url + name, dest / name, md5=md5)


def fetch_file(url: str, target: Path, md5: str | None = None, lines: int | None = None) -> None:
    """Download ``url`` to a temporary file (with a progress bar), check its MD5 or line
    count, move it to ``target``.

    The temporary file is deleted on any failure, so ``target`` is either absent or complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(name)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as file:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                        while chunk := response.read(1 << 16):
                            file.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            except OSError as error:  # URLError, HTTPError, timeouts
                raise DataNotFoundError(
                    f"could not download {url}: {getattr(error, 'reason', error)}. Check the "
                    f"connection and retry, or put the file in {target.parent} by hand."
                ) from error
            file.flush()
            os.fsync(file.fileno())
        problem = None
        if md5 is not None and digest.hexdigest() != md5:
            problem = f"MD5 {digest.hexdigest()}, but the official file has MD5 {md5}"
        elif lines is not None and (count := len(tmp.read_text().split())) != lines:
            problem = f"{count} lines, but the official file has {lines}"
        if problem:
            raise ValueError(
                f"{url} downloaded with {problem}; the download was deleted. Retry later (the "
                "server may have sent an error page or a truncated file), or put a good copy "
                f"in {target.parent} by hand, or set METALAB_DATA to a folder that already "
                "holds the data set."
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def md5sum(path: Path) -> str:
    """The MD5 of the file at ``path`` (to check a user's copy against the published one)."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
