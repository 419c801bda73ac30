"""Decoding one image file into the uint8 layout the data sets use (Pillow, no torchvision).

Every file either becomes the picture it shows or is refused with a ``ValueError`` that names
the file and says what was wrong; nothing is clipped, guessed or dropped silently:

* **Orientation.** The EXIF Orientation tag is applied (``ImageOps.exif_transpose``), so a
  photo taken with the camera on its side comes out upright, as every viewer shows it.
* **Transparency** (RGBA, LA, palette or grey/RGB images with a transparent colour) is
  composited onto white: a transparent background is the page that drawings and product
  shots are shown on, and Omniglot-style inversion then turns it into the data set's dark
  background (0).
* **Bit depth.** 16- and 32-bit integer samples are scaled from the depth the file declares
  (TIFF's BitsPerSample, e.g. 12; 16 for PNG and PGM) to 0-255 with rounding, never clipped:
  of 16 bits, 65535 becomes 255 and 32768 becomes 128. Negative samples are refused, and so
  is an image whose samples all lie so low that it would decode black: that is 8-bit data
  saved in a 16-bit file. 32-bit float samples must lie in [0, 1] and are scaled by 255;
  other float images are refused, because a float file does not record its range.
* **Colour.** CMYK, YCbCr and LAB become RGB by Pillow's conversions (CMYK by the plain
  formula: ICC profiles are not applied); RGB becomes grey by ITU-R 601 luma.
* **Frames.** Of an animated GIF, PNG or WebP or a multi-page TIFF, the first frame is
  read: it is the image viewers show first, and what torchvision's loader reads.
* **Size and damage.** An image over :data:`MAX_PIXELS` is refused from its header, before
  any decoding (a decompression bomb can declare gigapixels in a few bytes); truncated and
  corrupt files are refused, not padded, unless the process itself sets Pillow's
  ``ImageFile.LOAD_TRUNCATED_IMAGES``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "image_files", "open_image", "read_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Largest image accepted, in pixels (width * height). 50 megapixels is more than any camera
# photo a few-shot set holds, and still decodes in well under a second; raise it for trusted
# files that are larger (they are shrunk to the model's input size anyway).
MAX_PIXELS = 50_000_000

_TIFF_BITS, _TIFF_PHOTOMETRIC, _TIFF_SAMPLE_FORMAT = 258, 262, 339  # TIFF tag numbers
_COLOUR_MODES = ("RGB", "RGBX", "CMYK", "YCbCr", "LAB")
_ALPHA_MODES = ("RGBA", "RGBa", "PA", "LA", "La")
_KEYED_MODES = ("1", "L", "P", "RGB")  # modes whose info["transparency"] Pillow converts


class _Samples(NamedTuple):
    """How a file stores its samples, read from its header before transposing drops it."""

    bits: int | None  # depth of 16/32-bit integer samples; None where the file does not say
    signed: bool  # TIFF SampleFormat 2
    white_is_zero: bool  # TIFF PhotometricInterpretation 0


def read_image(
    path: str | os.PathLike | IO[bytes], channels: int = 1, size: int = 28, invert: bool = False,
    name: str | None = None,
) -> torch.Tensor:
    """``[channels, size, size]`` uint8 of the image at ``path`` (or in a binary file object;
    ``name`` is how errors refer to it).

    Decoded by :func:`open_image` (grayscale for 1 channel, RGB for 3; see the module
    docstring for modes, transparency, bit depths and orientation), optionally inverted
    (Omniglot's black strokes on white become bright on dark), then resized with Lanczos
    resampling. Raises ``ValueError`` naming the file for any file it cannot read faithfully.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}.")
    image = open_image(path, channels, name)
    if invert:  # before resizing, as Omniglot's own images are, so both match pixel for pixel
        image = ImageOps.invert(image)
    array = np.array(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def open_image(
    file: str | os.PathLike | IO[bytes], channels: int = 1, name: str | None = None
) -> Image.Image:
    """The image in ``file`` as an upright 8-bit ``"L"`` (``channels=1``) or ``"RGB"`` image.

    ``name`` is how errors refer to the file (default: ``file`` itself). Raises
    ``ValueError`` naming it when the file is too large, damaged, or stored in a way that
    cannot be converted faithfully.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    name = str(file) if name is None else name
    with contextlib.ExitStack() as stack:
        if isinstance(file, (str, os.PathLike)):
            # Opened here rather than by Pillow, which memory-maps uncompressed files it opens
            # by path, and then (Pillow 13) scrambles TIFFs whose orientation tag swaps width
            # and height.
            try:
                file = stack.enter_context(open(file, "rb"))
            except OSError as error:
                raise ValueError(f"cannot read image {name}: {error.strerror or error}; check "
                                 "the path.") from error
        try:
            image = stack.enter_context(Image.open(file))
        except Exception as error:  # Pillow signals unreadable files with many exception types
            raise _undecodable(name, error) from error
        _check_size(image, name)
        try:
            image.load()  # the first frame only: multi-frame files are never read further
            samples = _samples(image)
            image = ImageOps.exif_transpose(image)
        except Exception as error:  # damaged data or EXIF surfaces here, with as many types
            raise _undecodable(name, error) from error
    return _eight_bit(image, name, samples).convert("L" if channels == 1 else "RGB")


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, in name order, hidden files skipped."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _undecodable(name: str, error: Exception) -> ValueError:
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ValueError(
            f"image {name} is too large to decode safely ({error}); downscale it below "
            f"{MAX_PIXELS:,} pixels or remove it."
        )
    return ValueError(
        f"cannot decode image {name} ({type(error).__name__}: {error}): it is damaged, "
        "truncated or not an image; replace it with a good copy or remove it."
    )


def _check_size(image: Image.Image, name: str) -> None:
    """Refuse, from the header alone, images with no pixels or more than MAX_PIXELS."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"image {name} is {width}x{height} pixels, so it holds no image; "
                         "replace it or remove it.")
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"image {name} is {width}x{height} pixels ({width * height / 1e6:.1f} "
            f"megapixels), over the limit of {MAX_PIXELS / 1e6:g} megapixels that guards "
            "against decompression bombs; downscale it, or raise "
            "metalab.data.images.MAX_PIXELS if the file is trusted."
        )


def _samples(image: Image.Image) -> _Samples:
    """The sample layout ``image``'s file declares (see :class:`_Samples`)."""
    if image.format == "TIFF":
        tags = image.tag_v2
        return _Samples(_first(tags.get(_TIFF_BITS, 1)),
                        _first(tags.get(_TIFF_SAMPLE_FORMAT, 1)) == 2,
                        _first(tags.get(_TIFF_PHOTOMETRIC, 1)) == 0)
    # PNG and PGM hold at most 16 bits a sample; older Pillow opens 16-bit PNGs as mode "I".
    sixteen = image.mode.startswith("I;16") or (image.mode == "I"
                                                 and image.format in ("PNG", "PPM"))
    return _Samples(16 if sixteen else None, False, False)


def _first(value: int | tuple[int, ...]) -> int:
    """A TIFF tag's value; per-sample tags are tuples, equal for grayscale."""
    return value[0] if isinstance(value, tuple) else value


def _eight_bit(image: Image.Image, name: str, samples: _Samples) -> Image.Image:
    """``image`` as an 8-bit ``"L"`` or ``"RGB"`` image, or a ValueError naming its mode."""
    mode = image.mode
    if mode in _ALPHA_MODES or ("transparency" in image.info and mode in _KEYED_MODES):
        return _on_white(image.convert("LA" if mode in ("LA", "La") else "RGBA"))
    if mode in ("1", "L", "P"):
        if samples.signed:  # Pillow reads TIFF's signed 8-bit samples as unsigned
            raise _unsupported(name, "signed 8-bit")
        return image.convert("L" if mode != "P" else "RGB")
    if mode in _COLOUR_MODES:
        try:
            return image.convert("RGB")
        except ValueError:  # older Pillow cannot convert LAB
            raise _unsupported(name, mode) from None
    if mode == "I" or mode.startswith("I;16"):
        return Image.fromarray(_scale_integers(np.asarray(image), name, samples,
                                               image.info.get("transparency")))
    if mode == "F":
        return Image.fromarray(_scale_floats(np.asarray(image), name, samples))
    raise _unsupported(name, mode)


def _unsupported(name: str, mode: str) -> ValueError:
    return ValueError(
        f"image {name} has pixel mode {mode!r}, which cannot be converted to grayscale or RGB "
        "faithfully; save it as an 8-bit grayscale or RGB PNG."
    )


def _on_white(image: Image.Image) -> Image.Image:
    """An ``"LA"`` or ``"RGBA"`` image composited onto white, as ``"L"`` or ``"RGB"``."""
    array = np.asarray(image).astype(np.uint32)
    colour, alpha = array[..., :-1], array[..., -1:]
    # colour * a + white * (1 - a) with a = alpha / 255, rounded to nearest, in integers.
    out = ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return Image.fromarray(out[..., 0] if image.mode == "LA" else out)


def _scale_integers(values: np.ndarray, name: str, samples: _Samples,
                    transparent: object) -> np.ndarray:
    """16/32-bit integer samples scaled from their declared depth to uint8 (see module doc)."""
    if samples.bits is None:
        raise ValueError(
            f"image {name} has 32-bit integer samples and its format does not say how many "
            "bits they use, so their brightness is unknown; save it as an 8- or 16-bit PNG."
        )
    if samples.bits == 32 and not samples.signed:
        values = values.view(np.uint32)  # Pillow stores unsigned 32-bit samples as int32
    full = (1 << (samples.bits - samples.signed)) - 1
    low, peak = int(values.min()), int(values.max())
    if low < 0:
        raise ValueError(
            f"image {name} has negative samples (down to {low}), which no image shows; "
            "rescale it to non-negative values and save it as an 8- or 16-bit PNG."
        )
    if peak > 0 and (peak * 255 + full // 2) // full <= 1:
        raise ValueError(
            f"image {name} has {samples.bits}-bit samples but none above {peak} of {full}, so "
            f"it would decode as one flat shade: usually 8-bit data saved in a "
            f"{samples.bits}-bit file. Save it as an 8-bit image, or scale it to the full "
            f"{samples.bits}-bit range."
        )
    # A PNG's transparent grey level becomes white, as alpha does.
    keyed = values == transparent if isinstance(transparent, int) else None
    if samples.white_is_zero:  # Pillow inverts WhiteIsZero TIFFs only up to 8 bits
        values = full - values
    wide = np.uint32 if full < 1 << 24 else np.uint64  # room for values * 255
    out = ((values.astype(wide) * 255 + full // 2) // full).astype(np.uint8)
    if keyed is not None:
        out[keyed] = 255
    return out


def _scale_floats(values: np.ndarray, name: str, samples: _Samples) -> np.ndarray:
    """32-bit float samples in [0, 1] as uint8 (times 255, rounded); others refused."""
    if not np.isfinite(values).all():
        raise ValueError(f"image {name} has NaN or infinite float samples; replace it with "
                         "an 8- or 16-bit image.")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
        raise ValueError(
            f"image {name} has 32-bit float samples from {low:g} to {high:g}; float images "
            "must lie in [0, 1], because a float file does not record its range. Scale it "
            "to [0, 1] or save it as an 8- or 16-bit image."
        )
    if samples.white_is_zero:
        values = 1 - values
    return np.floor(values * 255 + 0.5).astype(np.uint8)
