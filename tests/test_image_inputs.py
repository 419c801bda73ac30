"""Image inputs: every mode, depth and orientation Pillow reads, bombs, damage, and a property.

Each case writes a tiny file and checks the exact pixels :func:`read_image` returns, or that
it refuses the file with a ValueError naming it. Files Pillow cannot write (12-bit, unsigned
32-bit, signed and WhiteIsZero TIFFs, 48-bit and giant PNGs) are assembled byte by byte.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from metalab.data import images
from metalab.data.images import open_image, read_image

# --- helpers -----------------------------------------------------------------------------------


def save(folder: Path, image: Image.Image, name: str = "image.png", **options) -> Path:
    path = folder / name
    image.save(path, **options)
    return path


def pixels(path: Path, channels: int = 1) -> np.ndarray:
    """What read_image returns at the file's own size (no resampling): [H, W] or [H, W, 3]."""
    with Image.open(path) as image:
        width, height = image.size
    assert width == height, "use square images so that read_image does not resample"
    tensor = read_image(path, channels, size=width)
    assert tensor.dtype == torch.uint8 and tensor.shape == (channels, width, width)
    return tensor[0].numpy() if channels == 1 else tensor.permute(1, 2, 0).numpy()


def tiff_bytes(width: int, height: int, bits: int, data: bytes, sample_format: int = 1,
               photometric: int = 1, orientation: int = 1) -> bytes:
    """A little-endian, uncompressed, one-strip grayscale TIFF, written tag by tag."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, bits), (259, 3, 1),
               (262, 3, photometric), (273, 4, 0), (274, 3, orientation), (277, 3, 1),
               (278, 4, height), (279, 4, len(data)), (339, 3, sample_format)]
    start = 8 + 2 + 12 * len(entries) + 4  # header, entry count, entries, next-IFD offset
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = start if tag == 273 else value
        ifd += struct.pack("<HHI", tag, kind, 1)
        ifd += struct.pack("<H2x" if kind == 3 else "<I", value)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4 + data


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int,
              rows: bytes | None = None) -> bytes:
    """A PNG with the given header; ``rows`` are the raw scanlines (filter bytes added)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    body = b""
    if rows is not None:
        stride = len(rows) // height
        body = b"".join(b"\x00" + rows[i * stride:(i + 1) * stride] for i in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b""))


def refused(path: Path, *words: str, **options) -> str:
    """The ValueError read_image raises for ``path``; checks that it names the file."""
    with pytest.raises(ValueError) as error:
        read_image(path, **options)
    message = str(error.value)
    assert str(path) in message
    for word in words:
        assert word in message
    return message


# --- modes -------------------------------------------------------------------------------------


def test_one_bit(tmp_path: Path) -> None:
    image = Image.new("1", (2, 2), 0)
    image.putpixel((1, 0), 1)
    path = save(tmp_path, image)
    assert pixels(path).tolist() == [[0, 255], [0, 0]]
    assert pixels(path, 3)[0, 1].tolist() == [255, 255, 255]


def test_grey_is_kept_and_repeated_for_rgb(tmp_path: Path) -> None:
    path = save(tmp_path, Image.fromarray(np.array([[0, 1], [128, 255]], np.uint8)))
    assert pixels(path).tolist() == [[0, 1], [128, 255]]
    assert pixels(path, 3)[1, 0].tolist() == [128, 128, 128]


def test_rgb_becomes_grey_by_luma(tmp_path: Path) -> None:
    colours = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], np.uint8)
    path = save(tmp_path, Image.fromarray(colours))
    assert pixels(path, 3).tolist() == colours.tolist()
    assert pixels(path).tolist() == [[76, 150], [29, 18]]  # ITU-R 601: .299 R + .587 G + .114 B


@pytest.mark.parametrize("name", ["palette.png", "palette.bmp", "palette.gif", "palette.tif"])
def test_palette_maps_through_its_palette(tmp_path: Path, name: str) -> None:
    image = Image.new("P", (2, 2))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 200, 100, 50])
    image.putdata([0, 1, 2, 3])
    path = save(tmp_path, image, name)
    assert pixels(path, 3).reshape(4, 3).tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255],
                                                      [200, 100, 50]]
    assert pixels(path).reshape(4).tolist() == [76, 150, 29, 124]


@pytest.mark.parametrize("name", ["transparent.png", "transparent.gif"])
def test_palette_transparency_becomes_white(tmp_path: Path, name: str) -> None:
    image = Image.new("P", (2, 2))
    image.putpalette([255, 0, 0, 0, 0, 0])
    image.putdata([0, 1, 1, 0])
    path = save(tmp_path, image, name, transparency=1)  # index 1, black, is transparent
    assert pixels(path, 3).reshape(4, 3).tolist() == [[255, 0, 0], [255, 255, 255],
                                                      [255, 255, 255], [255, 0, 0]]


def test_palette_alpha_per_entry_is_composited(tmp_path: Path) -> None:
    image = Image.new("P", (2, 2))
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.putdata([0, 1, 0, 1])
    path = save(tmp_path, image, transparency=bytes([128, 255]))  # PNG tRNS: alpha per entry
    assert pixels(path, 3)[0].tolist() == [[127, 127, 127], [255, 0, 0]]


def test_grey_and_rgb_colour_keys_become_white(tmp_path: Path) -> None:
    grey = save(tmp_path, Image.fromarray(np.array([[7, 8], [8, 7]], np.uint8)), "grey.png",
                transparency=7)
    assert pixels(grey).tolist() == [[255, 8], [8, 255]]
    colours = np.array([[[1, 2, 3], [4, 5, 6]], [[4, 5, 6], [4, 5, 6]]], np.uint8)
    rgb = save(tmp_path, Image.fromarray(colours), "rgb.png", transparency=(1, 2, 3))
    assert pixels(rgb, 3)[0].tolist() == [[255, 255, 255], [4, 5, 6]]


def test_grey_alpha_is_composited_onto_white(tmp_path: Path) -> None:
    values = np.array([[[0, 255], [0, 0]], [[0, 128], [100, 128]]], np.uint8)
    path = save(tmp_path, Image.fromarray(values, "LA"))
    # round(v * a / 255 + 255 * (1 - a / 255)): opaque black, transparent -> white, halves.
    assert pixels(path).tolist() == [[0, 255], [127, 177]]


@pytest.mark.parametrize("name", ["rgba.png", "rgba.tif", "rgba.webp"])
def test_rgba_is_composited_onto_white(tmp_path: Path, name: str) -> None:
    values = np.array([[[255, 0, 0, 255], [255, 0, 0, 0]],
                       [[0, 0, 0, 128], [10, 20, 30, 64]]], np.uint8)
    options = {"lossless": True} if name.endswith(".webp") else {}
    path = save(tmp_path, Image.fromarray(values, "RGBA"), name, **options)
    assert pixels(path, 3).tolist() == [[[255, 0, 0], [255, 255, 255]],
                                        [[127, 127, 127], [194, 196, 199]]]


def test_inverting_turns_a_transparent_background_dark(tmp_path: Path) -> None:
    values = np.array([[[0, 255], [0, 0]], [[0, 0], [0, 0]]], np.uint8)
    path = save(tmp_path, Image.fromarray(values, "LA"))
    assert read_image(path, 1, 2, invert=True)[0].tolist() == [[255, 0], [0, 0]]


def test_cmyk_tiff(tmp_path: Path) -> None:
    values = np.array([[[0, 0, 0, 0], [255, 0, 0, 0]],
                       [[0, 0, 0, 255], [0, 128, 0, 0]]], np.uint8)
    path = save(tmp_path, Image.fromarray(values, "CMYK"), "cmyk.tif")
    # (255 - ink) * (255 - black) / 255 per channel, ICC profiles not applied.
    assert pixels(path, 3).tolist() == [[[255, 255, 255], [0, 255, 255]],
                                        [[0, 0, 0], [255, 127, 255]]]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = save(tmp_path, Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "cmyk.jpg", quality=100)
    assert np.abs(pixels(path, 3).astype(int) - [255, 0, 0]).max() <= 3  # red, lossy


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768], [65535, 1000]], np.uint16)
    path = save(tmp_path, Image.fromarray(values))
    with Image.open(path) as image:
        assert image.mode == "I;16"
    assert pixels(path).tolist() == [[0, 128], [255, 4]]
    assert pixels(path, 3)[0, 1].tolist() == [128, 128, 128]


def test_sixteen_bit_big_endian_tiff(tmp_path: Path) -> None:
    image = Image.frombytes("I;16B", (2, 2), np.array([0, 32768, 65535, 257], ">u2").tobytes())
    path = save(tmp_path, image, "big.tif")
    with Image.open(path) as opened:
        assert opened.mode == "I;16B"
    assert pixels(path).tolist() == [[0, 128], [255, 1]]


def test_sixteen_bit_png_transparent_level_becomes_white(tmp_path: Path) -> None:
    values = np.array([[0, 300], [65535, 300]], np.uint16)
    path = save(tmp_path, Image.fromarray(values), transparency=300)
    assert pixels(path).tolist() == [[0, 255], [255, 255]]


def test_twelve_bit_tiff_is_scaled_by_twelve_bits(tmp_path: Path) -> None:
    samples = [0, 4095, 2048, 1000]  # two 12-bit samples in three bytes, first one high
    packed = bytearray()
    for a, b in zip(samples[::2], samples[1::2], strict=True):
        packed += bytes([a >> 4, (a & 15) << 4 | b >> 8, b & 255])
    path = tmp_path / "twelve.tif"
    path.write_bytes(tiff_bytes(2, 2, 12, bytes(packed)))
    assert pixels(path).tolist() == [[0, 255], [128, 62]]


def test_forty_eight_bit_rgb_png(tmp_path: Path) -> None:
    rows = np.array([[[65535, 32768, 0], [0, 0, 65535]]] * 2, ">u2").tobytes()
    path = tmp_path / "deep.png"
    path.write_bytes(png_bytes(2, 2, 16, 2, rows))
    assert pixels(path, 3)[1].tolist() == [[255, 128, 0], [0, 0, 255]]


def test_thirty_two_bit_signed_tiff(tmp_path: Path) -> None:
    values = np.array([[0, 2**31 - 1], [2**30, 2**24]], np.int32)
    path = save(tmp_path, Image.fromarray(values), "int32.tif")
    assert pixels(path).tolist() == [[0, 255], [128, 2]]


def test_thirty_two_bit_unsigned_tiff_above_two_to_the_31(tmp_path: Path) -> None:
    path = tmp_path / "uint32.tif"
    values = np.array([0, 2**32 - 1, 2**31, 2**30], "<u4")
    path.write_bytes(tiff_bytes(2, 2, 32, values.tobytes()))
    assert pixels(path).tolist() == [[0, 255], [128, 64]]


def test_white_is_zero_sixteen_bit_tiff_is_inverted(tmp_path: Path) -> None:
    path = tmp_path / "white-is-zero.tif"
    values = np.array([0, 65535, 32767, 65535], "<u2")
    path.write_bytes(tiff_bytes(2, 2, 16, values.tobytes(), photometric=0))
    assert pixels(path).tolist() == [[255, 0], [128, 0]]


def test_signed_sixteen_bit_tiff(tmp_path: Path) -> None:
    path = tmp_path / "signed.tif"
    path.write_bytes(tiff_bytes(2, 2, 16, np.array([0, 32767, 16384, 400], "<i2").tobytes(),
                                sample_format=2))
    assert pixels(path).tolist() == [[0, 255], [128, 3]]
    path.write_bytes(tiff_bytes(2, 2, 16, np.array([-5, 32767, 0, 0], "<i2").tobytes(),
                                sample_format=2))
    refused(path, "negative samples", "-5")


def test_signed_eight_bit_tiff_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "signed8.tif"
    path.write_bytes(tiff_bytes(2, 2, 8, np.array([-1, 5, 0, 0], "i1").tobytes(),
                                sample_format=2))
    refused(path, "signed 8-bit")


def test_eight_bit_values_in_a_sixteen_bit_file_are_refused(tmp_path: Path) -> None:
    path = save(tmp_path, Image.fromarray(np.array([[0, 255], [10, 200]], np.uint16)))
    refused(path, "16-bit samples but none above 255 of 65535", "8-bit data")
    zeros = save(tmp_path, Image.fromarray(np.zeros((2, 2), np.uint16)), "black.png")
    assert pixels(zeros).tolist() == [[0, 0], [0, 0]]  # a black image is still fine


def test_float_tiff_in_zero_one(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    path = save(tmp_path, Image.fromarray(values), "float.tif")
    assert pixels(path).tolist() == [[0, 128], [255, 64]]


def test_white_is_zero_float_tiff_is_inverted(tmp_path: Path) -> None:
    path = tmp_path / "float-wiz.tif"
    values = np.array([0, 1, 0.75, 0.5], "<f4")
    path.write_bytes(tiff_bytes(2, 2, 32, values.tobytes(), sample_format=3, photometric=0))
    assert pixels(path).tolist() == [[255, 0], [64, 128]]


@pytest.mark.parametrize(("values", "words"), [
    ([[0.0, 255.0], [3.0, 1.0]], ("from 0 to 255", "[0, 1]")),
    ([[-0.5, 0.5], [0.0, 1.0]], ("from -0.5 to 1",)),
    ([[np.nan, 0.5], [0.0, 1.0]], ("NaN or infinite",)),
    ([[np.inf, 0.5], [0.0, 1.0]], ("NaN or infinite",)),
])
def test_float_outside_zero_one_is_refused(tmp_path: Path, values, words) -> None:
    path = save(tmp_path, Image.fromarray(np.array(values, np.float32)), "float.tif")
    refused(path, *words)


def test_ycbcr_tiff(tmp_path: Path) -> None:
    path = save(tmp_path, Image.new("YCbCr", (2, 2), (200, 128, 128)), "ycc.tif")
    with Image.open(path) as image:
        assert image.mode == "YCbCr"
    assert pixels(path, 3)[0, 0].tolist() == [200, 200, 200]
    assert pixels(path)[0, 0] == 200


def test_lab_tiff_is_converted_or_refused_by_name(tmp_path: Path) -> None:
    path = save(tmp_path, Image.new("LAB", (2, 2), (255, 128, 128)), "lab.tif")
    try:
        assert np.abs(pixels(path, 3).astype(int) - 255).max() <= 1  # L* = 100 is white
    except ValueError as error:  # Pillow before 10 cannot convert LAB
        assert str(path) in str(error) and "'LAB'" in str(error)


@pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")
def test_unknown_integer_bit_depth_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deep.im"
    Image.fromarray(np.array([[0, 70000], [5, 5]], np.int32)).save(path, "IM")
    refused(path, "32-bit integer samples", "does not say how many bits")


def test_a_mode_pillow_adds_later_is_refused_by_name(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(tmp_path, Image.new("L", (2, 2)))
    monkeypatch.setattr(images.Image, "open", lambda file: Image.new("HSV", (2, 2)))
    refused(path, "pixel mode 'HSV'", "save it as an 8-bit grayscale or RGB PNG")


# Where the top-left pixel of an upright 3-wide, 2-high image is stored for each EXIF
# orientation, by the EXIF 2.3 definitions (independent of Pillow's table).
STORED = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],  # mirrored horizontally
    3: lambda u: u[::-1, ::-1],  # rotated 180
    4: lambda u: u[::-1],  # mirrored vertically
    5: lambda u: u.T,  # mirrored along the top-left diagonal
    6: lambda u: np.rot90(u, 1),  # viewers turn it 90 degrees clockwise to show it
    7: lambda u: u.T[::-1, ::-1],  # mirrored along the other diagonal
    8: lambda u: np.rot90(u, -1),  # viewers turn it 90 degrees counterclockwise
}
UPRIGHT = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(STORED[orientation](UPRIGHT))
    path = save(tmp_path, Image.fromarray(stored), exif=exif.tobytes())
    assert np.asarray(open_image(path)).tolist() == UPRIGHT.tolist()


def test_uncompressed_tiff_turned_by_its_orientation_is_not_scrambled(tmp_path: Path) -> None:
    # Pillow 13 memory-maps such files when it opens them by path, and mixes up the rows.
    path = save(tmp_path, Image.fromarray(np.rot90(UPRIGHT, 1).copy()), "turned.tif",
                tiffinfo={0x0112: 6})
    assert np.asarray(open_image(path)).tolist() == UPRIGHT.tolist()


def test_exif_orientation_in_a_jpeg(tmp_path: Path) -> None:
    upright = np.zeros((16, 8), np.uint8)
    upright[:8] = 255  # top half white: an upright portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path, Image.fromarray(np.rot90(upright, 1).copy()), "photo.jpg",
                exif=exif.tobytes(), quality=100)
    result = np.asarray(open_image(path)).astype(int)
    assert result.shape == (16, 8)
    assert (result[:7] > 240).all() and (result[9:] < 15).all()


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_tiff_orientation_tag_is_applied(tmp_path: Path, orientation: int) -> None:
    # Written by hand: the baseline TIFF Orientation tag, not an EXIF block.
    stored = np.ascontiguousarray(STORED[orientation](UPRIGHT))
    path = tmp_path / "turned.tif"
    path.write_bytes(tiff_bytes(stored.shape[1], stored.shape[0], 8, stored.tobytes(),
                                orientation=orientation))
    assert np.asarray(open_image(path)).tolist() == UPRIGHT.tolist()


def test_animated_gif_reads_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("L", (2, 2), value) for value in (10, 200, 90)]
    path = save(tmp_path, frames[0], "animated.gif", save_all=True,
                append_images=frames[1:], duration=50)
    with Image.open(path) as image:
        assert image.n_frames == 3
    assert pixels(path).tolist() == [[10, 10], [10, 10]]


def test_multipage_tiff_reads_its_first_page(tmp_path: Path) -> None:
    pages = [Image.new("RGB", (2, 2), colour) for colour in ((1, 2, 3), (200, 0, 0))]
    path = save(tmp_path, pages[0], "pages.tif", save_all=True, append_images=pages[1:])
    assert pixels(path, 3)[0, 0].tolist() == [1, 2, 3]


def test_resizing_and_shapes(tmp_path: Path) -> None:
    path = save(tmp_path, Image.new("RGB", (10, 6), (200, 100, 50)), "wide.jpg")
    assert read_image(path, 3, 5).shape == (3, 5, 5)
    assert read_image(path, 1, 1).shape == (1, 1, 1)


def test_bad_arguments(tmp_path: Path) -> None:
    path = save(tmp_path, Image.new("L", (2, 2)))
    with pytest.raises(ValueError, match="1 .grayscale. or 3 .RGB., got 2"):
        read_image(path, channels=2)
    with pytest.raises(ValueError, match="size must be a positive number of pixels, got 0"):
        read_image(path, size=0)


# --- bombs, truncation and other damage --------------------------------------------------------


def test_giant_header_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(8000, 8000, 8, 0))  # 64 megapixels declared in 70 bytes
    refused(path, "8000x8000 pixels (64.0 megapixels)", "limit of 50 megapixels",
            "MAX_PIXELS")


def test_header_past_pillows_limit_is_refused_with_the_name(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(png_bytes(20000, 20000, 8, 0))  # past twice Pillow's own limit
    refused(path, "too large to decode safely", "400000000 pixels")
    path.write_bytes(png_bytes(10000, 10000, 8, 0))  # past Pillow's warning threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning Pillow emits must not escape as one
        refused(path, "too large to decode safely")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refused(path, "10000x10000 pixels")


def test_limit_is_a_module_constant_independent_of_pillows(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a user switched Pillow's check off
    assert pixels(save(tmp_path, Image.new("L", (10, 10)), "ok.png")).shape == (10, 10)
    refused(save(tmp_path, Image.new("L", (11, 10)), "big.png"), "11x10 pixels")


@pytest.mark.parametrize(("name", "options"), [
    ("cut.png", {}), ("cut.jpg", {"quality": 95}), ("cut.gif", {}), ("cut.bmp", {}),
    ("cut.tif", {}), ("cut.webp", {"lossless": True}),
])
def test_truncated_files_are_refused_with_the_name(tmp_path: Path, name: str, options) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    path = save(tmp_path, image.convert("P") if name.endswith(".gif") else image, name,
                **options)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])
    refused(path, "cannot decode image", "damaged, truncated or not an image")


@pytest.mark.parametrize("content", [b"", b"just text, not an image", b"\x89PNG\r\n\x1a\n"])
def test_non_images_are_refused_with_the_name(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.png"
    path.write_bytes(content)
    refused(path, "cannot decode image")


def test_missing_file_and_folder_are_refused_with_the_name(tmp_path: Path) -> None:
    refused(tmp_path / "absent.png", "cannot read image", "No such file or directory")
    (tmp_path / "folder.png").mkdir()
    refused(tmp_path / "folder.png", "cannot read image", "Is a directory")


# --- property: every input works or is refused by name -----------------------------------------

# Mode -> the formats the property test writes it in ("+key": a transparent colour, "+alpha":
# alpha per palette entry). All but JPEG are lossless, so their pixels are also checked
# against the independent conversion in ``expected``.
FORMATS = {
    "1": ("PNG", "BMP", "GIF"), "L": ("PNG", "TIFF", "JPEG", "GIF"), "L+key": ("PNG",),
    "P": ("PNG", "BMP", "GIF", "TIFF"), "P+key": ("PNG", "GIF"), "P+alpha": ("PNG",),
    "LA": ("PNG", "TIFF"), "RGB": ("PNG", "BMP", "WEBP", "JPEG"), "RGB+key": ("PNG",),
    "RGBA": ("PNG", "TIFF", "WEBP"), "CMYK": ("TIFF", "JPEG"), "YCbCr": ("TIFF",),
    "I;16": ("PNG", "TIFF"), "I;16B": ("TIFF",), "I": ("TIFF",), "F": ("TIFF",),
}
EXIF_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF")
EXTENSIONS = {"PNG": "png", "BMP": "bmp", "GIF": "gif", "TIFF": "tif", "JPEG": "jpg",
              "WEBP": "webp"}


def content(mode: str, shape: tuple[int, int], kind: str, seed: int) -> Image.Image:
    """A ``mode`` image of ``shape`` (rows, columns): random, constant or extreme values."""
    rng = np.random.default_rng(seed)
    base = mode.split("+")[0]
    bands = {"1": 1, "L": 1, "P": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3,
             "I;16": 1, "I;16B": 1, "I": 1, "F": 1}[base]
    dtype, top = {"I;16": (np.uint16, 65535), "I;16B": (np.uint16, 65535),
                  "I": (np.int32, 2**31 - 1), "F": (np.float32, 1.0)}.get(base, (np.uint8, 255))
    full = (*shape, bands) if bands > 1 else shape
    if base == "F":
        values = {"random": rng.random(full), "constant": np.full(full, rng.random()),
                  "extreme": rng.integers(0, 2, full) * 1.0,
                  "wide": rng.normal(0, 100, full)}[kind].astype(np.float32)
    elif kind == "wide" and base == "I":
        values = rng.integers(-(2**31), 2**31, full, dtype=np.int64).astype(np.int32)
    else:
        limit = 1 if base == "1" else 15 if base == "P" else top
        values = {"random": rng.integers(0, limit + 1, full, dtype=np.int64),
                  "constant": np.full(full, rng.integers(0, limit + 1)),
                  "extreme": rng.integers(0, 2, full) * limit,
                  "wide": rng.integers(0, limit + 1, full, dtype=np.int64)}[kind].astype(dtype)
    if base == "1":
        return Image.fromarray(values.astype(bool))
    if base == "P":
        image = Image.fromarray(values)
        image = image.convert("P")  # indices 0..15 with a palette, then a random palette
        image.putpalette(rng.integers(0, 256, 48, dtype=np.int64).astype(np.uint8).tobytes())
        return image
    if base == "I;16B":  # Pillow's convert("I;16B") clips to 8 bits, so build it from bytes
        return Image.frombytes("I;16B", shape[::-1], values.astype(">u2").tobytes())
    if base in ("LA", "RGBA", "CMYK", "YCbCr"):
        return Image.fromarray(values, base)
    return Image.fromarray(values)


def write(image: Image.Image, mode: str, fmt: str, orientation: int, path: Path) -> dict:
    """Save ``image`` as ``fmt``; returns the transparency it was saved with (if any)."""
    options: dict = {"lossless": True} if fmt == "WEBP" else {"quality": 90} if fmt == "JPEG" \
        else {}
    key: dict = {}
    if mode in ("L+key", "P+key"):
        key = {"transparency": int(np.asarray(image).flat[0])}
    elif mode == "RGB+key":
        key = {"transparency": tuple(int(v) for v in np.asarray(image)[0, 0])}
    elif mode == "P+alpha":
        key = {"transparency": bytes(range(0, 256, 16))}
    if orientation != 1 and fmt == "TIFF":
        options["tiffinfo"] = {0x0112: orientation}
    elif orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    image.save(path, fmt, **options, **key)
    return key


def expected(image: Image.Image, mode: str, key: dict) -> np.ndarray | None:
    """[H, W, 3] float RGB that a faithful decoder returns, or None where refusing is right.

    Written from the formats' definitions, not from read_image's code.
    """
    base = mode.split("+")[0]
    values = np.asarray(image)
    if base in ("I;16", "I;16B", "I"):
        full = 65535 if base != "I" else 2**31 - 1
        peak = int(values.max())
        if values.min() < 0 or 0 < peak * 255 / full < 1.5:
            return None  # negative, or 8-bit-like values that would decode black
        grey = values.astype(np.float64) * 255 / full
    elif base == "F":
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            return None
        grey = values.astype(np.float64) * 255
    elif base == "1":
        grey = values.astype(np.float64) * 255
    elif base == "L":
        grey = values.astype(np.float64)
        if key:
            grey = np.where(values == key["transparency"], 255.0, grey)
    else:
        grey = None
    if grey is not None:
        return np.repeat(grey[..., None], 3, axis=-1)
    if base == "P":
        palette = np.array(image.getpalette()[:48], np.float64).reshape(16, 3)
        rgb = palette[values]
        alpha = np.full(values.shape, 255.0)
        if mode == "P+key":
            alpha[values == key["transparency"]] = 0
        if mode == "P+alpha":
            alpha = np.frombuffer(key["transparency"], np.uint8).astype(np.float64)[values]
        return rgb * alpha[..., None] / 255 + 255 * (1 - alpha[..., None] / 255)
    if base == "RGB":
        rgb = values.astype(np.float64)
        if key:
            rgb[(values == key["transparency"]).all(-1)] = 255
        return rgb
    if base in ("LA", "RGBA"):
        colour, alpha = values[..., :-1].astype(np.float64), values[..., -1:] / 255
        rgb = colour * alpha + 255 * (1 - alpha)
        return np.repeat(rgb, 3, axis=-1) if base == "LA" else rgb
    if base == "CMYK":  # the uncalibrated formula: (1 - ink) * (1 - black)
        ink, black = values[..., :3] / 255, values[..., 3:] / 255
        return 255 * (1 - ink) * (1 - black)
    # YCbCr, ITU-R BT.601 full range (JFIF), clipped to 0..255.
    y, cb, cr = (values[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    y + 1.772 * (cb - 128)], axis=-1)
    return np.clip(rgb, 0, 255)


@st.composite
def inputs(draw: st.DrawFn) -> dict:
    mode = draw(st.sampled_from(sorted(FORMATS)))
    fmt = draw(st.sampled_from(FORMATS[mode]))
    return {
        "mode": mode, "format": fmt, "lossless": fmt != "JPEG",
        "width": draw(st.integers(1, 64)), "height": draw(st.integers(1, 64)),
        "kind": draw(st.sampled_from(["random", "constant", "extreme", "wide"])),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "channels": draw(st.sampled_from([1, 3])), "size": draw(st.integers(1, 64)),
        "orientation": draw(st.integers(1, 8)) if fmt in EXIF_FORMATS else 1,
        "damage": draw(st.sampled_from(["none", "none", "none", "none", "truncate", "garble"])),
        "cut": draw(st.floats(0, 1)),
        "name": draw(st.sampled_from(["image", "a b", "ünïcödé", "x.y"])),
    }


PROPERTY_EXAMPLES = 1000


# Pillow warns about the damage this test does on purpose; what matters is the outcome.
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@settings(max_examples=PROPERTY_EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=inputs())
def test_every_input_is_read_faithfully_or_refused_by_name(
    case: dict, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("property", numbered=True)
    path = folder / f"{case['name']}.{EXTENSIONS[case['format']]}"
    image = content(case["mode"], (case["height"], case["width"]), case["kind"], case["seed"])
    key = write(image, case["mode"], case["format"], case["orientation"], path)
    if case["damage"] != "none":
        data = bytearray(path.read_bytes())
        at = int(case["cut"] * (len(data) - 1))
        if case["damage"] == "truncate":
            data = data[:at]
        else:
            data[at:at + 16] = np.random.default_rng(case["seed"]).bytes(16)[:len(data) - at]
        path.write_bytes(bytes(data))
    channels, size = case["channels"], case["size"]
    state = "clean" if case["damage"] == "none" else "damaged"
    try:
        tensor = read_image(path, channels, size)
        upright = np.asarray(open_image(path, 3)).astype(np.float64)
    except ValueError as error:
        assert str(path) in str(error), f"the error does not name the file: {error}"
        event(f"{state} file: refused, naming it")
        if case["damage"] == "none":
            # A clean file may be refused only where a faithful reading is impossible.
            assert expected(image, case["mode"], key) is None, f"refused a good file: {error}"
        return
    event(f"{state} file: read")
    assert tensor.dtype == torch.uint8 and tensor.shape == (channels, size, size)
    want = expected(image, case["mode"], key)
    if case["damage"] != "none" or not case["lossless"]:
        assert case["damage"] != "none" or want is not None, "read a file it should refuse"
        return
    assert want is not None, "read a file it should refuse"
    want = np.ascontiguousarray(_upright(want, case["orientation"]))
    tolerance = 2 if case["mode"] == "YCbCr" else 1  # rounding; BT.601 constants
    assert upright.shape == want.shape
    assert np.abs(upright - want).max() <= tolerance + 1e-9
    event("clean lossless file: read and checked pixel by pixel")


def _upright(stored: np.ndarray, orientation: int) -> np.ndarray:
    """Undo :data:`STORED` for ``orientation``: what a viewer shows for a stored image."""
    undo = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1],
            4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
            6: lambda a: np.rot90(a, -1), 7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
            8: lambda a: np.rot90(a, 1)}
    return undo[orientation](stored)
