"""Users' own image data as class folders: ``root/<class>/<image>`` (mini-ImageNet, CUB, ...).

Which classes make up a split is read from a text file with one class folder name per line
(blank lines and ``#`` comments are ignored): ``split_file`` if given, otherwise
``root/splits/<split>.txt``; ``split="all"`` without either uses every class folder. This is
how the standard few-shot splits are distributed (e.g. Ravi & Larochelle 2017's
mini-ImageNet ``train``/``val``/``test`` class lists). A split file is refused, with its
line numbers, when it names one class folder twice (which would make one class two), names
something that is not a folder directly under the root, or shares a class with a split it
must be disjoint from (:data:`DISJOINT_SPLITS`, checked against the files next to it).

Images are decoded with Pillow, converted to grayscale or RGB, resized to ``image_size``
squared with Lanczos resampling (aspect ratio not kept, as in the usual mini-ImageNet
preprocessing) and stored as uint8. Classes may hold different numbers of images: the
tensor is padded to the largest and ``counts`` says how many are real, so episodes never
draw the padding. The processed tensor is cached, keyed by the file list and modification
times, so a second load skips decoding and any change to the folders rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from metalab.data.images import IMAGE_EXTENSIONS, image_files, read_image
from metalab.data.paths import DataNotFoundError
from metalab.io import atomic_save, cache_dir
from metalab.tasks import ClassDataset

__all__ = ["DISJOINT_SPLITS", "SPLITS_FOLDER", "class_folders", "load", "read_split_file",
           "refuse_overlap", "refuse_repeats", "status"]

SPLITS_FOLDER = "splits"  # root/splits/<split>.txt; never a class folder itself
# Split files that must share no class: a class seen in training must never be scored as a
# novel one. trainval is train + val, so it may share classes with either, but not with test.
DISJOINT_SPLITS = (("train", "val"), ("train", "test"), ("val", "test"), ("trainval", "test"))
_CACHE_VERSION = 2  # bump when the preprocessing changes (2: modes, depths, EXIF, alpha)


def load(
    split: str,
    data_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    image_size: int = 84,
    channels: int = 3,
    split_file: str | os.PathLike | None = None,
    max_per_class: int | None = None,
) -> ClassDataset:
    """Split ``split`` of the image folders under ``root`` (else ``data_dir``).

    ``data`` is ``[C, max_count, channels, image_size, image_size]`` uint8 with per-class
    ``counts``; ``max_per_class`` keeps the first images of each class in name order.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    if image_size < 1 or (max_per_class is not None and max_per_class < 1):
        raise ValueError("image_size and max_per_class must be >= 1.")
    folder = _root(root, data_dir)
    names = class_folders(folder, split, split_file)
    files = [_images(folder, name, max_per_class) for name in names]
    path = _cache_path(folder, split, names, files, image_size, channels)
    if path.exists():
        cached = torch.load(path, weights_only=True)
        return ClassDataset(cached["data"], names, cached["counts"])
    counts = torch.tensor([len(f) for f in files])
    data = torch.zeros(len(names), int(counts.max()), channels, image_size, image_size,
                       dtype=torch.uint8)
    flat = [(c, i, f) for c, class_files in enumerate(files) for i, f in enumerate(class_files)]
    # Pillow releases the GIL while decoding and resizing, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        images = pool.map(lambda item: read_image(item[2], channels, image_size), flat)
        for (c, i, _), image in zip(flat, images, strict=True):
            data[c, i] = image
    atomic_save({"data": data, "counts": counts}, path)
    return ClassDataset(data, names, counts)


def status(data_dir: str | os.PathLike | None = None) -> str:
    """One line for ``metalab datasets``."""
    return "user image folders: pass dataset: folder with root: PATH (root/<class>/<image>)"


def class_folders(
    root: Path, split: str, split_file: str | os.PathLike | None = None
) -> list[str]:
    """Names of the class folders in ``split``, in the order the split file lists them."""
    if split_file is not None:
        listing = Path(split_file)
        if not listing.is_absolute() and not listing.exists():
            listing = root / listing  # relative to the current folder, else to the root
        if not listing.is_file():
            raise DataNotFoundError(
                f"split file {split_file} not found (looked in the current folder and in "
                f"{root}); pass split_file: PATH to a text file with one class folder per line."
            )
    else:
        listing = root / SPLITS_FOLDER / f"{split}.txt"
        if not listing.is_file():
            if split == "all":
                return _all_classes(root)
            raise DataNotFoundError(
                f"no class list for split {split!r} in {root}: write the class folder names, "
                f"one per line, to {listing}, pass split_file: PATH, or use split: all for "
                f"every class folder."
            )
    entries = read_split_file(listing)
    if not entries:
        raise ValueError(f"split file {listing} lists no classes; add one class folder per line.")
    for number, name in entries:
        if name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(
                f"split file {listing}, line {number}: {name!r} is not a class folder name; "
                f"list the names of folders directly in {root}, one per line."
            )
    names = [name for _, name in entries]
    missing = [n for n in dict.fromkeys(names) if not (root / n).is_dir()]
    if missing:
        raise DataNotFoundError(
            f"{len(missing)} class(es) listed in {listing} have no folder under {root}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; fix the names in "
            f"the split file or add the folders."
        )
    # Keyed by the folder itself, so that two spellings of one folder (a symbolic link, or
    # "Cat" and "cat" on a case-insensitive file system) are caught as the repeat they are.
    refuse_repeats(listing, entries, key=lambda name: _folder_id(root / name))
    refuse_overlap(listing, entries, key=lambda name: _folder_id(root / name))
    return names


def _all_classes(root: Path) -> list[str]:
    """Every class folder under ``root`` in name order; refused if two are one folder."""
    names = sorted(p.name for p in root.iterdir() if p.is_dir()
                   and not p.name.startswith(".") and p.name != SPLITS_FOLDER)
    folders: dict[Hashable, list[str]] = {}
    for name in names:
        folders.setdefault(_folder_id(root / name), []).append(name)
    aliases = [" = ".join(same) for same in folders.values() if len(same) > 1]
    if aliases:
        raise ValueError(
            f"class folders under {root} are the same folder under two names ("
            f"{'; '.join(aliases[:5])}), which would make one class two; remove the links "
            "or list the classes in a split file."
        )
    return names


def read_split_file(path: Path) -> list[tuple[int, str]]:
    """The classes a split file lists, as ``(line number, name)`` in file order.

    One class per line; blank lines and lines starting with ``#`` are skipped, and
    surrounding whitespace, Windows line ends and a UTF-8 byte-order mark are ignored.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"split file {path} is not UTF-8 text ({error}); save it as UTF-8 "
                         "with one class per line.") from error
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)]
    return [(number, line) for number, line in lines if line and not line.startswith("#")]


def refuse_repeats(path: Path, entries: list[tuple[int, str]],
                   key: Callable[[str], Hashable] = str) -> None:
    """Raise ValueError if two lines of split file ``path`` name the same class.

    ``entries`` are :func:`read_split_file`'s; lines are the same class when ``key`` maps
    them to equal values. A repeated line would otherwise become a second class holding the
    same images, so episodes would ask the model to tell a class from itself.
    """
    lines: dict[Hashable, list[tuple[int, str]]] = {}
    for number, name in entries:
        lines.setdefault(key(name), []).append((number, name))
    repeated = [found for found in lines.values() if len(found) > 1]
    if repeated:
        detail = "; ".join(
            f"{' = '.join(dict.fromkeys(name for _, name in found))} on lines "
            f"{', '.join(str(number) for number, _ in found)}" for found in repeated[:5])
        raise ValueError(
            f"split file {path} lists {len(repeated)} class(es) more than once ({detail}"
            f"{' ...' if len(repeated) > 5 else ''}); each class must be on one line only. "
            "Delete the repeated lines."
        )


def refuse_overlap(path: Path, entries: list[tuple[int, str]],
                   key: Callable[[str], Hashable] = str) -> None:
    """Raise ValueError if split file ``path`` shares a class with a sibling it must not.

    The siblings are the files next to ``path`` that :data:`DISJOINT_SPLITS` pairs with its
    name (``train.txt`` with ``val.txt`` and ``test.txt``, ...); ``key`` says when two lines
    are the same class, as in :func:`refuse_repeats`.
    """
    mine = {key(name): name for _, name in entries}
    for pair in DISJOINT_SPLITS:
        if path.stem not in pair:
            continue
        other = path.with_name(f"{pair[1] if path.stem == pair[0] else pair[0]}.txt")
        if not other.is_file():
            continue
        theirs = {key(name) for _, name in read_split_file(other)}
        shared = [name for k, name in mine.items() if k in theirs]
        if shared:
            raise ValueError(
                f"split files {path} and {other} share {len(shared)} class(es): "
                f"{', '.join(shared[:5])}{' ...' if len(shared) > 5 else ''}; a class in "
                f"{pair[0]} must not be in {pair[1]}, or the {pair[1]} score measures memory "
                "of seen classes. Remove each from one of the two files."
            )


def _root(root: str | os.PathLike | None, data_dir: str | os.PathLike | None) -> Path:
    """The folder of class folders, checked."""
    if root is None and data_dir is None:
        raise ValueError(
            "the folder dataset needs its location: pass root: PATH (or --data-dir PATH) "
            "pointing at a folder of class folders, root/<class>/<image>."
        )
    folder = Path(root if root is not None else data_dir).expanduser()
    if not folder.is_dir():
        raise DataNotFoundError(
            f"image folder root {folder} does not exist or is not a folder; pass root: PATH "
            f"pointing at a folder of class folders, root/<class>/<image>."
        )
    return folder


def _images(root: Path, name: str, max_per_class: int | None) -> list[Path]:
    """The image files of class ``name`` in name order, hidden files skipped."""
    files = image_files(root / name)
    if not files:
        raise DataNotFoundError(
            f"class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); add "
            f"images or leave the class out of the split."
        )
    return files[:max_per_class]


def _cache_path(root: Path, split: str, names: list[str], files: list[list[Path]],
                image_size: int, channels: int) -> Path:
    """Cache file keyed by everything the tensor depends on, file sizes and mtimes included."""
    listing = [[[p.name, *_stamp(p)] for p in class_files] for class_files in files]
    key = json.dumps([_CACHE_VERSION, str(root.resolve()), split, names, listing, image_size,
                      channels])
    return cache_dir() / "folders" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def _folder_id(folder: Path) -> tuple[int, int] | str:
    """What makes two paths the same folder: device and inode, or the name if it is absent."""
    try:
        stat = folder.stat()
    except OSError:
        return folder.name
    return stat.st_dev, stat.st_ino


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size
