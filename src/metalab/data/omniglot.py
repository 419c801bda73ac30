"""Omniglot: 1623 handwritten characters from 50 alphabets, each drawn by 20 people.

Lake, Salakhutdinov & Tenenbaum (2015), *Human-level concept learning through probabilistic
program induction*, Science 350(6266). Data: https://github.com/brendenlake/omniglot (MIT).

**Files.** The authors publish two zips, ``images_background.zip`` (30 alphabets, 964
characters) and ``images_evaluation.zip`` (20 alphabets, 659 characters), each holding
``images_<set>/<Alphabet>/characterNN/<id>_<drawer>.png``: 105x105 1-bit PNGs, black strokes
on white, drawers ``_01`` to ``_20``. :func:`load` looks in every folder of
:func:`~metalab.data.paths.data_dirs`, at ``<dir>/omniglot/`` and then ``<dir>/``, for either
the zips or their extracted folders, and checks them by structure (alphabet, character and
drawing counts), not by checksum, so re-packed zips with the original PNGs are accepted.
:func:`download` fetches the official zips (MD5-verified) and the Vinyals split files.

**Processing.** Every PNG is decoded with Pillow, converted to 8-bit grayscale, inverted so
that strokes are bright (255) on a dark (0) background, and resized to ``image_size`` squared
with Pillow's ``Image.Resampling.LANCZOS`` filter. All 1623 characters are stored as one
uint8 tensor ``[1623, 20, 1, S, S]`` (characters sorted by ``"Alphabet/characterNN"``,
drawers in order ``_01`` to ``_20``) and cached under ``<cache>/omniglot/omniglotS.pt``. The
cache records where its images came from (path, size and modification time of each zip, or
of each extracted folder's alphabet and character directories) and is rebuilt when that
changes; delete it to force a rebuild after editing PNGs inside an extracted folder in place.

**Splits.**

* ``splits="vinyals"`` (default): the class split of Vinyals et al. (2016, Matching Networks)
  as used by Prototypical Networks, read from ``splits/vinyals/{train,val,test,trainval}.txt``
  (from jakesnell/prototypical-networks). It mixes both sets' alphabets and *resamples* the
  classes by rotation: each line ``Alphabet/characterNN/rotDDD`` is a class of its own, the
  character's 20 drawings rotated counterclockwise (as displayed, row 0 at the top) by
  ``DDD`` degrees, ``torch.rot90(x, DDD // 90, dims=(-2, -1))``. Train, val and test hold
  1028, 172 and 423 characters, so 4112, 688 and 1692 classes; trainval is train + val (4800).
  ``split`` may also be the path of a text file in the same format. Split files are checked
  before any decoding: a malformed line, a class listed twice, or a character shared
  between train, val and test (trainval only with test) is refused with the file and line.
* ``splits="lake"``: the authors' split, ``"background"`` (964 classes, also ``"train"``) or
  ``"evaluation"`` (659 classes, also ``"test"``), without rotations.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from metalab.data.folders import read_split_file, refuse_overlap, refuse_repeats
from metalab.data.images import open_image
from metalab.data.paths import DataNotFoundError, data_dirs, fetch_file
from metalab.io import atomic_save, cache_dir
from metalab.tasks import ClassDataset

__all__ = ["OFFICIAL_BASE", "SPLITS_BASE", "download", "drawing_files", "load", "status"]

INVERTED = True  # strokes are stored bright on dark: invert users' images the same way
OFFICIAL_BASE = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
SPLITS_BASE = (
    "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/"
    "data/omniglot/splits/vinyals/"
)

_SETS = ("images_background", "images_evaluation")
_DRAWERS = 20
# MD5s of the official zips, as published by torchvision (datasets/omniglot.py).
_ZIP_MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
_EXPECTED = {"images_background": (30, 964), "images_evaluation": (20, 659)}  # alphabets, chars
_VINYALS_SIZES = {"train": 4112, "val": 688, "test": 1692, "trainval": 4800}
_LAKE_SPLITS = {
    "background": "images_background", "train": "images_background",
    "evaluation": "images_evaluation", "test": "images_evaluation",
}
_CACHE_FORMAT = 2  # bump when the processing changes, so old caches are rebuilt
_REDOWNLOAD = "Or delete the Omniglot data and download it again (download=True)."
_FILE_RE = re.compile(r"\d+_(\d+)\.png")
_LINE_RE = re.compile(r"([^/\s]+/character\d+)(?:/rot(\d+))?")


def load(
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    splits: str = "vinyals",
    image_size: int = 28,
    download: bool = False,
) -> ClassDataset:
    """Split ``split`` of Omniglot as a :class:`~metalab.tasks.ClassDataset` of characters.

    ``splits`` picks the split scheme (``"vinyals"`` or ``"lake"``, see the module
    docstring). ``data_dir`` is searched before ``$METALAB_DATA`` and the cache; with
    ``download=True``, missing files are fetched into ``<cache>/data/omniglot``. The first
    load decodes all 32,460 PNGs (seconds); later loads read the cached tensor.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}.")
    valid = {"vinyals": _VINYALS_SIZES, "lake": _LAKE_SPLITS}.get(splits)
    if valid is None:
        raise ValueError(f"unknown Omniglot splits {splits!r}; use 'vinyals' or 'lake'.")
    split_file = _as_split_file(split)
    if split_file is None and split not in valid:
        raise ValueError(
            f"unknown Omniglot {splits} split {split!r}; valid: {', '.join(valid)} "
            "(or the path of a split file with one Alphabet/characterNN/rotDDD per line)."
        )
    dirs = data_dirs(data_dir)
    root, sources = _locate(dirs, download)
    # Find and check the split file before decoding, so that a bad one fails fast.
    if split_file is None and splits == "vinyals":
        split_file = _find_split_file(split, root, dirs, download)
        lines = _split_lines(split_file)
        if len(lines) != _VINYALS_SIZES[split]:
            raise DataNotFoundError(
                f"{split_file} has {len(lines)} classes; the Vinyals {split} split has "
                f"{_VINYALS_SIZES[split]}, so the file is incomplete. To fix: {_splits_hint()}"
            )
    elif split_file is not None:
        lines = _split_lines(split_file)
    base = _load_base(sources, image_size, dirs)
    names, images = base["names"], base["images"]
    if split_file is None:  # a Lake split
        keep = base["background"] == (_LAKE_SPLITS[split] == "images_background")
        kept = [name for name, k in zip(names, keep.tolist(), strict=True) if k]
        return ClassDataset(data=images[keep], names=kept, group="character")
    data, class_names = _rotated(names, images, lines, split_file)
    return ClassDataset(data=data, names=class_names, group="character")


def status(data_dir: str | os.PathLike | None = None) -> str:
    """One line for ``metalab datasets``: where Omniglot was found and what is cached.

    Only looks at file names; nothing is decoded.
    """
    dirs = data_dirs(data_dir)
    root, sources, notes = _find_root(dirs)
    if root is None:
        found = "; ".join(notes)
        return f"not found (looked in: {_looked_in(dirs)}){'; ' + found if found else ''}"
    kind = "zips" if all(p.suffix == ".zip" for p in sources.values()) else "folders"
    has_splits = any((d / "train.txt").is_file() for d in _split_dirs(root, dirs))
    cached = sorted(p.name for p in (cache_dir() / "omniglot").glob("omniglot*.pt"))
    return (
        f"{root} ({kind}; Vinyals splits {'found' if has_splits else 'missing'}); cache: "
        f"{', '.join(cached) if cached else 'none (the first load decodes 32,460 PNGs)'}"
    )


def download(
    dest_dir: str | os.PathLike, base_url: str = OFFICIAL_BASE, splits_url: str = SPLITS_BASE
) -> Path:
    """Fetch the official zips and the Vinyals split files into ``dest_dir``; return it.

    Zips are checked against the official MD5s and split files against their line counts
    before being moved into place, so ``dest_dir`` never holds a partial or wrong file.
    Files already present are kept.
    """
    dest = Path(dest_dir)
    _download_images(dest, base_url)
    _download_splits(dest, splits_url)
    return dest


# --- finding the files -------------------------------------------------------------------------


def _candidates(dirs: list[Path]) -> list[Path]:
    return [c for d in dirs for c in (d / "omniglot", d)]


def _find_root(dirs: list[Path]) -> tuple[Path | None, dict[str, Path], list[str]]:
    """The first folder with both sets (zip or extracted), its sources, and partial finds."""
    notes = []
    for root in _candidates(dirs):
        sources = {}
        for name in _SETS:
            if (root / f"{name}.zip").is_file():
                sources[name] = root / f"{name}.zip"
            elif (root / name).is_dir():
                sources[name] = root / name
        if len(sources) == len(_SETS):
            return root, sources, notes
        if sources:
            missing = next(name for name in _SETS if name not in sources)
            notes.append(f"{root} has {', '.join(p.name for p in sources.values())} but no "
                         f"{missing}.zip or {missing}/")
    return None, {}, notes


def _looked_in(dirs: list[Path]) -> str:
    return ", ".join(str(c) for c in _candidates(dirs))


def _fix_hint(dirs: list[Path]) -> str:
    return (
        f"Looked in: {_looked_in(dirs)}. To fix: set METALAB_DATA (or pass --data-dir) to a "
        "folder holding images_background.zip and images_evaluation.zip (directly or under "
        "omniglot/), or pass download=True / run `metalab datasets --download omniglot` to "
        f"fetch them from {OFFICIAL_BASE}."
    )


def _split_dirs(root: Path, dirs: list[Path]) -> list[Path]:
    # Next to the images first; then anywhere else, e.g. split files downloaded into the cache
    # while the images sit in a read-only shared folder.
    found = [root / "splits" / "vinyals"]
    found += [c / "splits" / "vinyals" for c in _candidates(dirs) if c != root]
    return found


def _splits_hint() -> str:
    return (
        "copy {train,val,test,trainval}.txt from jakesnell/prototypical-networks "
        f"(data/omniglot/splits/vinyals, {SPLITS_BASE}) into <omniglot folder>/splits/vinyals/, "
        "or pass download=True / run `metalab datasets --download omniglot`, or use "
        "splits='lake'."
    )


def _find_split_file(split: str, root: Path, dirs: list[Path], download: bool) -> Path:
    places = _split_dirs(root, dirs)
    for place in places:
        if (place / f"{split}.txt").is_file():
            return place / f"{split}.txt"
    if download:
        dest = dirs[-1] / "omniglot"
        _download_splits(dest, SPLITS_BASE)
        return dest / "splits" / "vinyals" / f"{split}.txt"
    raise DataNotFoundError(
        f"the Vinyals split file {split}.txt was not found (looked in: "
        f"{', '.join(map(str, places))}). The Vinyals splits need it: {_splits_hint()}"
    )


def _as_split_file(split: str) -> Path | None:
    """``split`` as the path of a split file, or None if it is a split name."""
    if not (split.endswith(".txt") or os.sep in split or "/" in split):
        return None
    path = Path(split)
    if not path.is_file():
        raise DataNotFoundError(f"Omniglot split file {path} does not exist.")
    return path


# --- decoding and caching ----------------------------------------------------------------------


def _fingerprint(sources: dict[str, Path]) -> list[list[Any]]:
    """What the cache depends on: each source's path, size and modification time.

    An extracted folder is keyed by the modification times of its alphabet and character
    directories, which change when files are added, removed or renamed.
    """
    key = []
    for name in _SETS:
        path = sources[name].resolve()
        if path.is_file():
            stat = path.stat()
            key.append([str(path), stat.st_size, stat.st_mtime_ns])
            continue
        times = [path.stat().st_mtime_ns]
        for alphabet in sorted(os.scandir(path), key=lambda e: e.name):
            if alphabet.is_dir():
                times.append(alphabet.stat().st_mtime_ns)
                times += sorted(e.stat().st_mtime_ns for e in os.scandir(alphabet) if e.is_dir())
        key.append([str(path), *times])
    return key


def drawing_files(characters: Iterable[str], data_dir: str | os.PathLike | None = None,
                  ) -> dict[str, list[bytes]]:
    """The authors' PNG files of ``characters`` (``"Alphabet/characterNN"``), drawer 1 to 20,
    as bytes: the drawings :func:`load` decodes, in its order (e.g. to send them to a
    service the way a user would)."""
    wanted = set(characters)
    _, sources = _locate(data_dirs(data_dir), download=False)
    files: dict[str, list[bytes]] = {}
    for source in sources.values():
        with _open_set(source) as (paths, read):
            for name, drawers in _index(paths, source).items():
                if name in wanted:
                    files[name] = [read(drawers[d]) for d in sorted(drawers)]
    missing = sorted(wanted - set(files))
    if missing:
        raise ValueError(f"Omniglot has no character {', '.join(missing[:3])}; names look "
                         "like 'Gurmukhi/character42'.")
    return files


def _locate(dirs: list[Path], download: bool) -> tuple[Path, dict[str, Path]]:
    """The folder holding both sets and each set's zip or folder; downloads them if asked."""
    root, sources, notes = _find_root(dirs)
    if root is not None:
        return root, sources
    if not download:
        partial = f" ({'; '.join(notes)})" if notes else ""
        raise DataNotFoundError(f"Omniglot images not found{partial}. {_fix_hint(dirs)}")
    dest = dirs[-1] / "omniglot"
    _download_images(dest, OFFICIAL_BASE)
    return dest, {name: dest / f"{name}.zip" for name in _SETS}


def _load_base(sources: dict[str, Path], image_size: int, dirs: list[Path]) -> dict[str, Any]:
    """The cached dict with all 1623 characters, rebuilt if missing or stale."""
    key = _fingerprint(sources)
    path = cache_dir() / "omniglot" / f"omniglot{image_size}.pt"
    base = _read_cache(path, key, image_size)
    if base is None:
        base = _build(sources, image_size, dirs)
        base.update(format=_CACHE_FORMAT, source=key, image_size=image_size)
        atomic_save(base, path)
    return base


def _read_cache(path: Path, key: list[list[Any]], image_size: int) -> dict[str, Any] | None:
    """The cached dict if it exists and was built from the same files; None otherwise."""
    if not path.is_file():
        return None
    try:
        base = torch.load(path, weights_only=True)
    except Exception:  # an unreadable cache is rebuilt, never trusted
        return None
    fresh = (isinstance(base, dict) and base.get("format") == _CACHE_FORMAT
             and base.get("source") == key and base.get("image_size") == image_size)
    return base if fresh else None


@contextlib.contextmanager
def _open_set(source: Path) -> Iterator[tuple[list[str], Callable[[str], bytes]]]:
    """The PNG paths of one set (zip members or files) and a function reading one's bytes."""
    if source.is_dir():
        paths = [p.relative_to(source).as_posix() for p in source.rglob("*.png")]
        yield paths, lambda p: (source / p).read_bytes()
        return
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(
            f"{source} is not a readable zip file ({error}); delete it and download it again "
            "(download=True / `metalab datasets --download omniglot`) or copy a good one."
        ) from error
    with archive:
        yield archive.namelist(), archive.read


def _index(paths: Iterable[str], where: Path) -> dict[str, dict[int, str]]:
    """``"Alphabet/characterNN"`` -> drawer number -> path of that drawing."""
    chars: dict[str, dict[int, str]] = {}
    for path in paths:
        parts = path.split("/")
        # Skip directories and hidden files (e.g. macOS's ._ resource forks).
        if not path.endswith(".png") or len(parts) < 3 or parts[-1].startswith("."):
            continue
        match = _FILE_RE.fullmatch(parts[-1])
        if match is None:
            raise ValueError(f"{where}: unexpected file {path}; Omniglot drawings are named "
                             "<id>_<drawer>.png.")
        chars.setdefault(f"{parts[-3]}/{parts[-2]}", {})[int(match[1])] = path
    return chars


def _check_structure(
    chars: dict[str, dict[int, str]], where: Path, expected: tuple[int, int], dirs: list[Path]
) -> None:
    """Raise unless the set has the expected alphabets and characters, 20 drawings each."""
    alphabets = len({name.split("/")[0] for name in chars})
    if (alphabets, len(chars)) != expected:
        raise DataNotFoundError(
            f"{where} has {alphabets} alphabets and {len(chars)} characters; expected "
            f"{expected[0]} and {expected[1]}, so it is incomplete or not Omniglot. "
            f"{_fix_hint(dirs)}"
        )
    want = list(range(1, _DRAWERS + 1))
    for name, drawers in chars.items():
        if sorted(drawers) != want:
            raise DataNotFoundError(
                f"{where}: character {name} has {len(drawers)} drawings "
                f"(drawers {sorted(drawers)}); expected {_DRAWERS}, _01 to _{_DRAWERS}. "
                f"{_fix_hint(dirs)}"
            )


def _decode(data: bytes, size: int, name: str) -> bytes:
    """One PNG as ``size * size`` bytes: grayscale, inverted, Lanczos-resized.

    Decoded by :func:`~metalab.data.images.open_image`, so a re-saved copy in any mode or
    bit depth is converted faithfully or refused with a ValueError naming ``name``.
    """
    image = ImageOps.invert(open_image(io.BytesIO(data), channels=1, name=name))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image.tobytes()


def _build(sources: dict[str, Path], size: int, dirs: list[Path]) -> dict[str, Any]:
    """Decode both sets into the dict that is cached (see the module docstring)."""
    with contextlib.ExitStack() as stack:
        entries = []  # (name, is background, reader, source, drawer -> path)
        for set_name in _SETS:
            source = sources[set_name]
            paths, read = stack.enter_context(_open_set(source))
            chars = _index(paths, source)
            _check_structure(chars, source, _EXPECTED[set_name], dirs)
            background = set_name == "images_background"
            entries += [(name, background, read, source, drawers)
                        for name, drawers in chars.items()]
        entries.sort(key=lambda entry: entry[0])
        names = [entry[0] for entry in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"{', '.join(map(str, sources.values()))} share character folders; "
                             "each character must be in exactly one set.")
        buffer = bytearray()
        bar = tqdm(total=len(entries) * _DRAWERS, unit="img", desc="decoding Omniglot (once)")
        with bar:
            for _, _, read, source, drawers in entries:
                for drawer in range(1, _DRAWERS + 1):
                    member = drawers[drawer]
                    try:
                        data = read(member)
                    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
                        raise ValueError(
                            f"cannot decode {source}: {member} ({error}); the file is "
                            f"corrupt. Replace it with a good copy. {_REDOWNLOAD}"
                        ) from error
                    try:
                        buffer += _decode(data, size, f"{source}: {member}")
                    except ValueError as error:  # names the drawing and what was wrong
                        raise ValueError(f"{error} {_REDOWNLOAD}") from error
                bar.update(_DRAWERS)
    images = torch.frombuffer(buffer, dtype=torch.uint8).view(len(names), _DRAWERS, 1, size, size)
    background = torch.tensor([entry[1] for entry in entries], dtype=torch.bool)
    return {"names": names, "images": images, "background": background}


def _split_lines(path: Path) -> list[tuple[int, str, int]]:
    """The ``(line number, character, degrees)`` of each class in a Vinyals split file.

    Refused with a ValueError naming the file (and line): no classes, a line that is not
    ``Alphabet/characterNN[/rotDDD]``, a class listed twice (``Alpha/character01`` is
    ``Alpha/character01/rot000``), and a character shared with a split this one must be
    disjoint from (rotations of one character are its same drawings, so they count).
    """
    entries = read_split_file(path)
    if not entries:
        raise ValueError(f"split file {path} lists no classes; add one "
                         "Alphabet/characterNN/rotDDD per line.")
    lines = []
    for number, line in entries:
        match = _LINE_RE.fullmatch(line)
        degrees = int(match[2] or 0) if match else -1
        if match is None or degrees not in (0, 90, 180, 270):
            raise ValueError(
                f"{path}, line {number}: {line!r} is not Alphabet/characterNN/rotDDD with DDD "
                "one of 000, 090, 180, 270."
            )
        lines.append((number, match[1], degrees))
    refuse_repeats(path, entries, key=_class_of)
    refuse_overlap(path, entries, key=lambda line: _class_of(line)[0])
    return lines


def _class_of(line: str) -> tuple[str, int]:
    """(character, degrees) of a split-file line; a line that does not parse is its own."""
    match = _LINE_RE.fullmatch(line)
    return (match[1], int(match[2] or 0)) if match else (line, 0)


def _rotated(
    names: list[str], images: torch.Tensor, lines: list[tuple[int, str, int]], where: Path
) -> tuple[torch.Tensor, list[str]]:
    """The classes of a Vinyals split: each line's character rotated by its angle."""
    position = {name: i for i, name in enumerate(names)}
    index, turns, class_names = [], [], []
    for number, character, degrees in lines:
        if character not in position:
            raise ValueError(
                f"{where}, line {number}: {character} is not a character of Omniglot; fix "
                "the line or delete it."
            )
        index.append(position[character])
        turns.append(degrees // 90)
        class_names.append(f"{character}/rot{degrees:03d}")
    # NumPy: its strided gather and copy are several times faster than torch's for uint8 here.
    source, index_a, turns_a = images.numpy(), np.array(index, np.int64), np.array(turns)
    data = np.empty((len(lines), *source.shape[1:]), dtype=np.uint8)
    for k in range(4):
        chosen = np.flatnonzero(turns_a == k)
        # Counterclockwise as displayed: the same as torch.rot90(x, k, dims=(-2, -1)).
        data[chosen] = np.rot90(source[index_a[chosen]], k, axes=(-2, -1))
    return torch.from_numpy(data), class_names


# --- downloading -------------------------------------------------------------------------------


def _download_images(dest: Path, base_url: str) -> None:
    for name, md5 in _ZIP_MD5.items():
        if not (dest / name).exists():
            fetch_file(base_url + name, dest / name, md5=md5)


def _download_splits(dest: Path, base_url: str) -> None:
    for split, lines in _VINYALS_SIZES.items():
        target = dest / "splits" / "vinyals" / f"{split}.txt"
        if not target.exists():
            fetch_file(f"{base_url}{split}.txt", target, lines=lines)
