"""Decoding one image file into the uint8 layout the data sets use (Pillow, no torchvision)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "image_files", "read_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_image(
    path: str | os.PathLike, channels: int = 1, size: int = 28, invert: bool = False
) -> torch.Tensor:
    """``[channels, size, size]`` uint8 of the image at ``path``.

    Converted to grayscale (1 channel) or RGB (3), resized with Lanczos resampling, and
    optionally inverted (Omniglot's black strokes on white become bright on dark).
    """
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            image = image.resize((size, size), Image.Resampling.LANCZOS)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot decode image {path}: {error}; replace or remove the file.") \
            from error
    if invert:
        array = 255 - array
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, in name order, hidden files skipped."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
