"""Omniglot loading: the real data under METALAB_DATA, and tiny synthetic copies for errors.

Real-data tests skip when METALAB_DATA holds no Omniglot, except in CI (``CI=true``), where
they fail instead: nothing may silently skip there. They share one decode per session.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from metalab.data import omniglot
from metalab.data.paths import DataNotFoundError


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8))


# --- real data ---------------------------------------------------------------------------------


def require_real_data() -> Path:
    """The METALAB_DATA folder if it holds Omniglot; skip (fail in CI) otherwise."""
    env = os.environ.get("METALAB_DATA")
    root = omniglot._find_root([Path(env)])[0] if env else None
    if root is None:
        reason = (f"Omniglot not found under METALAB_DATA={env or '(unset)'}; point it at a "
                  "folder holding omniglot/images_background.zip and images_evaluation.zip")
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true, so real-data tests may not skip)")
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache holding the decoded real data: the full decode runs once per session."""
    require_real_data()
    cache = tmp_path_factory.mktemp("omniglot-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("METALAB_CACHE", str(cache))
        omniglot.load("background", splits="lake")
    return cache


@pytest.fixture
def real(real_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Use the session's cache; yields the folder holding the real zips."""
    monkeypatch.setenv("METALAB_CACHE", str(real_cache))
    return require_real_data()


@pytest.mark.realdata
def test_lake_sets_have_the_published_counts_and_layout(real: Path) -> None:
    background = omniglot.load("background", splits="lake")
    evaluation = omniglot.load("evaluation", splits="lake")
    assert (background.num_classes, evaluation.num_classes) == (964, 659)
    assert len({n.split("/")[0] for n in background.names}) == 30
    assert len({n.split("/")[0] for n in evaluation.names}) == 20
    assert omniglot.load("train", splits="lake").names == background.names
    assert omniglot.load("test", splits="lake").names == evaluation.names
    for dataset in (background, evaluation):
        assert dataset.data.dtype == torch.uint8
        assert dataset.data.shape == (dataset.num_classes, 20, 1, 28, 28)
        assert dataset.names == sorted(dataset.names)
        assert dataset.group == "character"
        # Inverted: mostly dark background, bright strokes.
        assert (dataset.data == 0).float().mean() > 0.6
        assert int(dataset.data.max()) == 255


@pytest.mark.realdata
def test_images_match_an_independent_decode_of_the_png(real: Path) -> None:
    background = omniglot.load("background", splits="lake")
    index = 100
    name = background.names[index]
    with zipfile.ZipFile(real / "images_background.zip") as archive:
        member = next(m for m in archive.namelist()
                      if m.startswith(f"images_background/{name}/") and m.endswith("_07.png"))
        with Image.open(io.BytesIO(archive.read(member))) as image:
            expected = ImageOps.invert(image.convert("L")).resize(
                (28, 28), Image.Resampling.LANCZOS)
    assert torch.equal(background.data[index, 6, 0], pixels(expected))


@pytest.mark.realdata
def test_vinyals_splits_are_rotated_characters(real: Path) -> None:
    sizes = {"train": (4112, 1028), "val": (688, 172), "test": (1692, 423)}
    characters = {}
    for split, (classes, chars) in sizes.items():
        dataset = omniglot.load(split)
        assert dataset.data.shape == (classes, 20, 1, 28, 28)
        characters[split] = {n.rsplit("/", 1)[0] for n in dataset.names}
        assert len(characters[split]) == chars
    assert not characters["train"] & characters["val"]
    assert not characters["train"] & characters["test"]
    assert len(characters["train"] | characters["val"] | characters["test"]) == 1623
    trainval = omniglot.load("trainval")
    assert trainval.num_classes == 4800
    assert {n.rsplit("/", 1)[0] for n in trainval.names} == characters["train"] | \
        characters["val"]


@pytest.mark.realdata
def test_rotations_turn_counterclockwise(real: Path) -> None:
    train = omniglot.load("train")
    lake = omniglot.load("evaluation", splits="lake")
    position = {name: i for i, name in enumerate(train.names)}
    name = "Angelic/character01"
    upright = train.data[position[f"{name}/rot000"]]
    assert torch.equal(upright, lake.data[lake.names.index(name)])
    for degrees in (90, 180, 270):
        turned = train.data[position[f"{name}/rot{degrees:03d}"]]
        assert torch.equal(turned, torch.rot90(upright, degrees // 90, dims=(-2, -1)))
    # Counterclockwise as displayed, like PIL's Image.rotate (what Prototypical Networks used).
    image = Image.fromarray(upright[0, 0].numpy()).rotate(90)
    assert torch.equal(train.data[position[f"{name}/rot090"], 0, 0], pixels(image))


@pytest.mark.realdata
def test_second_load_comes_from_the_cache(real: Path, real_cache: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert (real_cache / "omniglot" / "omniglot28.pt").is_file()
    monkeypatch.setattr(omniglot, "_decode", _no_decoding)
    assert omniglot.load("background", splits="lake").num_classes == 964
    assert "omniglot28.pt" in omniglot.status()


def _no_decoding(data: bytes, size: int) -> bytes:
    raise AssertionError("decoded a PNG although the cache was fresh")


# --- tiny synthetic copies ---------------------------------------------------------------------

# Alphabet -> characters of the synthetic sets: 2 alphabets / 3 characters, 1 / 2.
SMALL = {
    "images_background": {"Alpha": 2, "Beta": 1},
    "images_evaluation": {"Gamma": 2},
}
SIZE = 20  # source images are SIZE x SIZE, so load(image_size=SIZE) does not resample


def drawing(character: int, drawer: int) -> bytes:
    """A white 1-bit PNG with one black pixel at (character, drawer - 1)."""
    image = Image.new("1", (SIZE, SIZE), 1)
    image.putpixel((drawer - 1, character), 0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def small_files(drawers: int = 20) -> dict[str, bytes]:
    """Relative path -> bytes of every PNG; characters numbered globally in sorted order."""
    files, number = {}, 0
    for set_name, alphabets in SMALL.items():
        for alphabet, count in alphabets.items():
            for c in range(1, count + 1):
                for d in range(1, drawers + 1):
                    path = f"{set_name}/{alphabet}/character{c:02d}/{number + 1:04d}_{d:02d}.png"
                    files[path] = drawing(number, d)
                number += 1
    return files


def write_small(root: Path, zipped: bool = True, files: dict[str, bytes] | None = None) -> Path:
    """Write the synthetic sets to ``root`` as zips (or extracted folders); return ``root``."""
    files = small_files() if files is None else files
    root.mkdir(parents=True, exist_ok=True)
    for set_name in SMALL:
        members = {p: b for p, b in files.items() if p.startswith(f"{set_name}/")}
        if zipped:
            with zipfile.ZipFile(root / f"{set_name}.zip", "w") as archive:
                for path, data in members.items():
                    archive.writestr(path, data)
            continue
        for path, data in members.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(data)
    return root


def write_splits(root: Path) -> dict[str, list[str]]:
    """Vinyals-style split files for the synthetic characters."""
    splits = {
        "train": [f"Alpha/character01/rot{d:03d}" for d in (0, 90, 180, 270)],
        "val": ["Beta/character01/rot000", "Beta/character01/rot090"],
        "test": ["Gamma/character02/rot270"],
    }
    splits["trainval"] = splits["train"] + splits["val"]
    folder = root / "splits" / "vinyals"
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in splits.items():
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return splits


@pytest.fixture
def small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return use_small(tmp_path, monkeypatch)


def use_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Expect the synthetic counts, use a private cache, hide any real data; returns a folder."""
    monkeypatch.setattr(omniglot, "_EXPECTED", {
        name: (len(alphabets), sum(alphabets.values())) for name, alphabets in SMALL.items()})
    monkeypatch.setattr(omniglot, "_VINYALS_SIZES",
                        {"train": 4, "val": 2, "test": 1, "trainval": 6})
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METALAB_DATA", raising=False)
    return tmp_path / "data"


@pytest.mark.parametrize("zipped", [True, False])
def test_small_zips_and_folders_load_in_order(small: Path, zipped: bool) -> None:
    write_small(small / "omniglot", zipped=zipped)
    background = omniglot.load("background", small, splits="lake", image_size=SIZE)
    evaluation = omniglot.load("evaluation", small, splits="lake", image_size=SIZE)
    assert background.names == ["Alpha/character01", "Alpha/character02", "Beta/character01"]
    assert evaluation.names == ["Gamma/character01", "Gamma/character02"]
    data = torch.cat([background.data, evaluation.data])
    assert data.shape == (5, 20, 1, SIZE, SIZE) and data.dtype == torch.uint8
    # Inverted, and drawing d of character c is bright exactly at (c, d - 1).
    bright = torch.nonzero(data[:, :, 0] == 255)
    assert bright[:, 0].tolist() == bright[:, 2].tolist()
    assert bright[:, 1].tolist() == bright[:, 3].tolist()
    assert len(bright) == 5 * 20 and int((data > 0).sum()) == 5 * 20


def test_resizing_uses_lanczos(small: Path) -> None:
    write_small(small)
    data = omniglot.load("background", small, splits="lake", image_size=7).data
    with Image.open(io.BytesIO(drawing(0, 1))) as image:
        expected = ImageOps.invert(image.convert("L")).resize((7, 7), Image.Resampling.LANCZOS)
    assert data.shape == (3, 20, 1, 7, 7)
    assert torch.equal(data[0, 0, 0], pixels(expected))


def test_vinyals_rotation_is_counterclockwise(small: Path) -> None:
    write_small(small / "omniglot")
    splits = write_splits(small / "omniglot")
    train = omniglot.load("train", small, image_size=SIZE)
    assert train.names == splits["train"]
    # Alpha/character01 is character 0: drawer 3 is bright at row 0, column 2. A quarter turn
    # counterclockwise moves (row, col) to (SIZE - 1 - col, row).
    upright, quarter = train.data[0, 2, 0], train.data[1, 2, 0]
    assert upright[0, 2] == 255
    assert quarter[SIZE - 1 - 2, 0] == 255 and int((quarter > 0).sum()) == 1
    for k in range(4):
        assert torch.equal(train.data[k], torch.rot90(train.data[0], k, dims=(-2, -1)))
    assert omniglot.load("trainval", small, image_size=SIZE).names == splits["trainval"]


def test_split_file_path(small: Path, tmp_path: Path) -> None:
    write_small(small)
    custom = tmp_path / "mine.txt"
    custom.write_text("Gamma/character01\nBeta/character01/rot180\n")
    dataset = omniglot.load(str(custom), small, image_size=SIZE)
    assert dataset.names == ["Gamma/character01/rot000", "Beta/character01/rot180"]
    custom.write_text("Gamma/character09/rot000\n")
    with pytest.raises(ValueError, match="character09"):
        omniglot.load(str(custom), small, image_size=SIZE)


def test_missing_data_names_every_folder_and_the_fix(small: Path) -> None:
    with pytest.raises(DataNotFoundError) as error:
        omniglot.load("train", small)
    message = str(error.value)
    for place in omniglot._candidates(omniglot.data_dirs(small)):
        assert str(place) in message
    assert "METALAB_DATA" in message and "download=True" in message
    assert "metalab datasets --download omniglot" in message
    assert omniglot.status(small).startswith("not found (looked in: ")


def test_half_present_data_says_what_is_missing(small: Path) -> None:
    write_small(small)
    (small / "images_evaluation.zip").unlink()
    with pytest.raises(DataNotFoundError, match=r"no images_evaluation\.zip"):
        omniglot.load("background", small, splits="lake")


def test_missing_split_files_explain_where_they_come_from(small: Path) -> None:
    write_small(small)
    with pytest.raises(DataNotFoundError, match="prototypical-networks"):
        omniglot.load("train", small)


def test_truncated_split_file_is_rejected(small: Path) -> None:
    write_small(small)
    write_splits(small)
    (small / "splits" / "vinyals" / "train.txt").write_text("Alpha/character01/rot000\n")
    with pytest.raises(DataNotFoundError, match="has 1 classes; the Vinyals train split has 4"):
        omniglot.load("train", small, image_size=SIZE)


def test_wrong_character_count_is_named(small: Path) -> None:
    files = {p: b for p, b in small_files().items() if "Gamma/character02" not in p}
    write_small(small, files=files)
    with pytest.raises(DataNotFoundError) as error:
        omniglot.load("background", small, splits="lake")
    message = str(error.value)
    assert "images_evaluation.zip has 1 alphabets and 1 characters; expected 1 and 2" in message
    assert "METALAB_DATA" in message


def test_missing_drawing_is_named(small: Path) -> None:
    files = {p: b for p, b in small_files().items() if not p.endswith("0002_13.png")}
    write_small(small, files=files)
    with pytest.raises(DataNotFoundError, match="Alpha/character02 has 19 drawings"):
        omniglot.load("background", small, splits="lake")


def test_corrupt_zip_is_reported(small: Path) -> None:
    write_small(small)
    (small / "images_evaluation.zip").write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(ValueError, match=r"images_evaluation\.zip is not a readable zip"):
        omniglot.load("background", small, splits="lake")


@pytest.mark.parametrize("zipped", [True, False])
def test_corrupt_png_is_named(small: Path, zipped: bool) -> None:
    files = small_files()
    bad = "images_background/Beta/character01/0003_05.png"
    files[bad] = files[bad][:30]
    write_small(small, zipped=zipped, files=files)
    with pytest.raises(ValueError, match=r"cannot decode .*Beta/character01/0003_05\.png"):
        omniglot.load("background", small, splits="lake")


def test_bad_arguments_list_the_valid_choices(small: Path) -> None:
    with pytest.raises(ValueError, match="train, val, test, trainval"):
        omniglot.load("training", small)
    with pytest.raises(ValueError, match="background, train, evaluation, test"):
        omniglot.load("val", small, splits="lake")
    with pytest.raises(ValueError, match="'vinyals' or 'lake'"):
        omniglot.load("train", small, splits="protonet")


def test_cache_is_used_then_invalidated_by_a_new_source(
    small: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_small(small)
    first = omniglot.load("evaluation", small, splits="lake", image_size=SIZE)
    assert "omniglot20.pt" in omniglot.status(small)
    with monkeypatch.context() as patch:
        patch.setattr(omniglot, "_decode", _no_decoding)
        assert torch.equal(omniglot.load("evaluation", small, splits="lake",
                                         image_size=SIZE).data, first.data)
    # Replace the evaluation zip with one whose drawings differ: the cache must be rebuilt.
    files = small_files()
    files.update({p: drawing(0, 1) for p in files if p.startswith("images_evaluation/")})
    write_small(small, files=files)
    stat = (small / "images_evaluation.zip").stat()
    os.utime(small / "images_evaluation.zip", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = omniglot.load("evaluation", small, splits="lake", image_size=SIZE)
    assert not torch.equal(second.data, first.data)


# --- downloads, from a local server ------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """An HTTP server on 127.0.0.1 serving ``<tmp>/www``: (that folder, its URL)."""
    www = tmp_path / "www"
    www.mkdir()
    for name in ("no_proxy", "NO_PROXY"):  # never route the local requests through a proxy
        monkeypatch.setenv(name, "*")
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_port}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def serve_small(www: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put the synthetic zips and split files on the server and expect their MD5s."""
    write_small(www)
    write_splits(www)
    monkeypatch.setattr(omniglot, "_ZIP_MD5", {
        f"{name}.zip": hashlib.md5((www / f"{name}.zip").read_bytes()).hexdigest()
        for name in SMALL})


def test_download_fetches_and_verifies(
    small: Path, server: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    www, url = server
    serve_small(www, monkeypatch)
    dest = omniglot.download(small / "omniglot", base_url=url, splits_url=f"{url}splits/vinyals/")
    for name in ("images_background.zip", "images_evaluation.zip", "splits/vinyals/train.txt"):
        assert (dest / name).read_bytes() == (www / name).read_bytes()
    assert not list(dest.rglob("*.part"))
    assert omniglot.load("train", small, image_size=SIZE).num_classes == 4


def test_load_with_download_fills_the_cache_data_folder(
    small: Path, server: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    www, url = server
    serve_small(www, monkeypatch)
    monkeypatch.setattr(omniglot, "OFFICIAL_BASE", url)
    monkeypatch.setattr(omniglot, "SPLITS_BASE", f"{url}splits/vinyals/")
    dataset = omniglot.load("val", image_size=SIZE, download=True)
    assert dataset.names == ["Beta/character01/rot000", "Beta/character01/rot090"]
    downloaded = omniglot.data_dirs()[-1] / "omniglot"
    assert (downloaded / "images_background.zip").is_file()
    assert str(downloaded) in omniglot.status()


def test_checksum_mismatch_keeps_no_file(
    small: Path, server: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    www, url = server
    serve_small(www, monkeypatch)
    monkeypatch.setitem(omniglot._ZIP_MD5, "images_background.zip", "0" * 32)
    dest = small / "omniglot"
    with pytest.raises(ValueError) as error:
        omniglot.download(dest, base_url=url, splits_url=f"{url}splits/vinyals/")
    message = str(error.value)
    assert "0" * 32 in message and f"{url}images_background.zip" in message
    assert "deleted" in message
    assert not [p for p in dest.rglob("*") if p.is_file()]


def test_short_split_file_download_keeps_no_file(
    small: Path, server: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    www, url = server
    serve_small(www, monkeypatch)
    (www / "splits" / "vinyals" / "train.txt").write_text("Alpha/character01/rot000\n")
    with pytest.raises(ValueError, match="1 lines, but the official file has 4"):
        omniglot.download(small, base_url=url, splits_url=f"{url}splits/vinyals/")
    assert not (small / "splits" / "vinyals" / "train.txt").exists()
    assert not list(small.rglob("*.part"))


def test_unreachable_file_is_a_clear_error(small: Path, server: tuple[Path, str]) -> None:
    _, url = server
    with pytest.raises(DataNotFoundError, match=r"could not download .*images_background\.zip"):
        omniglot.download(small, base_url=url)
