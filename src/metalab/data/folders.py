"""Users' own image data as class folders: ``root/<class>/<image>`` (mini-ImageNet, CUB, ...).

Which classes make up a split is read from a text file with one class folder name per line
(blank lines and ``#`` comments are ignored): ``split_file`` if given, otherwise
``root/splits/<split>.txt``; ``split="all"`` without either uses every class folder. This is
how the standard few-shot splits are distributed (e.g. Ravi & Larochelle 2017's
mini-ImageNet ``train``/``val``/``test`` class lists).

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from metalab.data.images import IMAGE_EXTENSIONS, image_files, read_image
from metalab.data.paths import DataNotFoundError
from metalab.io import atomic_save, cache_dir
from metalab.tasks import ClassDataset

__all__ = ["SPLITS_FOLDER", "class_folders", "load", "status"]

SPLITS_FOLDER = "splits"  # root/splits/<split>.txt; never a class folder itself
_CACHE_VERSION = 1  # bump when the preprocessing changes


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
                return sorted(p.name for p in root.iterdir() if p.is_dir()
                              and not p.name.startswith(".") and p.name != SPLITS_FOLDER)
            raise DataNotFoundError(
                f"no class list for split {split!r} in {root}: write the class folder names, "
                f"one per line, to {listing}, pass split_file: PATH, or use split: all for "
                f"every class folder."
            )
    lines = [line.strip() for line in listing.read_text().splitlines()]
    names = [line for line in lines if line and not line.startswith("#")]
    if not names:
        raise ValueError(f"split file {listing} lists no classes; add one class folder per line.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"split file {listing} lists {', '.join(repeated)} more than once.")
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise DataNotFoundError(
            f"{len(missing)} class(es) listed in {listing} have no folder under {root}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; fix the names in "
            f"the split file or add the folders."
        )
    return names


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


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size
