"""Split files: one class per line, each once, each in one split; folders and Omniglot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metalab.data import DataNotFoundError, folders, omniglot
from tests.test_omniglot import SIZE, use_small, write_small, write_splits

CLASSES = ("cat", "dog", "eel", "fox")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Four class folders of two 4x4 images each, and an empty splits/ folder."""
    root = tmp_path / "images"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((4, 4), 10 * c + i, np.uint8)).save(root / name / f"{i}.png")
    (root / "splits").mkdir()
    return root


def split(root: Path, name: str, text: str | bytes) -> Path:
    path = root / "splits" / f"{name}.txt"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def error_of(root: Path, name: str, kind: type[Exception] = ValueError) -> str:
    with pytest.raises(kind) as error:
        folders.load(name, root=root, image_size=4)
    return str(error.value)


# --- folders: reading the lines ----------------------------------------------------------------


def test_blank_lines_comments_whitespace_crlf_and_bom_are_ignored(root: Path) -> None:
    split(root, "train", "\ufeff# classes\r\n\r\n  fox \t\r\ncat\r\n   \r\n# end\r\n".encode())
    assert folders.load("train", root=root, image_size=4).names == ["fox", "cat"]


def test_old_mac_line_ends(root: Path) -> None:
    split(root, "train", b"fox\rcat\r")
    assert folders.load("train", root=root, image_size=4).names == ["fox", "cat"]


def test_a_repeated_class_names_the_file_lines_and_class(root: Path) -> None:
    path = split(root, "train", "cat\ndog\n\ncat\n")
    message = error_of(root, "train")
    assert str(path) in message and "cat on lines 1, 4" in message
    assert "Delete the repeated lines" in message


def test_a_repeat_differing_only_in_whitespace_or_line_end(root: Path) -> None:
    split(root, "train", b"cat\r\ndog\n  cat  \n")
    assert "cat on lines 1, 3" in error_of(root, "train")


def test_one_folder_under_two_names_is_a_repeat(root: Path) -> None:
    (root / "kitty").symlink_to(root / "cat", target_is_directory=True)
    split(root, "train", "cat\ndog\nkitty\n")
    assert "cat = kitty on lines 1, 3" in error_of(root, "train")


def test_all_refuses_one_folder_under_two_names(root: Path) -> None:
    (root / "kitty").symlink_to(root / "cat", target_is_directory=True)
    message = error_of(root, "all")
    assert "cat = kitty" in message and str(root) in message


def test_no_classes(root: Path) -> None:
    path = split(root, "train", "# nothing yet\n\n   \n")
    assert f"split file {path} lists no classes" in error_of(root, "train")


def test_not_utf8(root: Path) -> None:
    path = split(root, "train", "caf\xe9\n".encode("latin-1"))
    message = error_of(root, "train")
    assert str(path) in message and "not UTF-8" in message


@pytest.mark.parametrize("line", ["../images/cat", "cat/sub", "..", ".", "dog\\cat"])
def test_names_that_are_not_a_folder_in_the_root(root: Path, line: str) -> None:
    path = split(root, "train", f"dog\n{line}\n")
    message = error_of(root, "train")
    assert f"{path}, line 2: {line!r} is not a class folder name" in message


def test_a_class_without_a_folder_is_named(root: Path) -> None:
    split(root, "train", "cat\ngnu\n")
    message = error_of(root, "train", DataNotFoundError)
    assert "have no folder" in message and "gnu" in message


def test_a_class_without_images_is_named(root: Path) -> None:
    (root / "gnu").mkdir()
    (root / "gnu" / "notes.txt").write_text("no images")
    split(root, "train", "cat\ngnu\n")
    assert "gnu has no images" in error_of(root, "train", DataNotFoundError)


# --- folders: splits that must be disjoint -----------------------------------------------------


@pytest.mark.parametrize(("first", "second"), folders.DISJOINT_SPLITS)
def test_overlapping_splits_are_refused_from_either_side(root: Path, first: str,
                                                         second: str) -> None:
    one = split(root, first, "cat\ndog\n")
    other = split(root, second, "eel\ndog\n")
    for name in (first, second):
        message = error_of(root, name)
        assert str(one) in message and str(other) in message
        assert "share 1 class(es): dog" in message


def test_trainval_may_share_classes_with_train_and_val(root: Path) -> None:
    split(root, "train", "cat\ndog\n")
    split(root, "val", "eel\n")
    split(root, "trainval", "cat\ndog\neel\n")
    split(root, "test", "fox\n")
    for name, count in (("train", 2), ("val", 1), ("trainval", 3), ("test", 1)):
        assert folders.load(name, root=root, image_size=4).num_classes == count


def test_overlap_through_a_link_is_caught(root: Path) -> None:
    (root / "kitty").symlink_to(root / "cat", target_is_directory=True)
    split(root, "train", "cat\n")
    split(root, "test", "kitty\n")
    assert "share 1 class(es): kitty" in error_of(root, "test")


def test_an_explicit_split_file_is_checked_against_its_siblings(root: Path,
                                                                tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.txt").write_text("cat\n")
    (mine / "test.txt").write_text("cat\n")
    with pytest.raises(ValueError, match="share 1 class"):
        folders.load("test", root=root, split_file=mine / "test.txt", image_size=4)
    (mine / "other.txt").write_text("cat\n")  # not a standard split name: nothing to compare
    dataset = folders.load("other", root=root, split_file=mine / "other.txt", image_size=4)
    assert dataset.names == ["cat"]


# --- Omniglot ----------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder for tests/test_omniglot.py's synthetic Omniglot, its counts expected."""
    return use_small(tmp_path, monkeypatch)


@pytest.fixture
def vinyals(small: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The synthetic Omniglot with Vinyals split files; decoding fails the test."""
    write_small(small)
    write_splits(small)

    def no_decoding(*args: object) -> bytes:
        raise AssertionError("a bad split file must be refused before any decoding")

    monkeypatch.setattr(omniglot, "_decode", no_decoding)
    return small / "splits" / "vinyals"


def test_omniglot_repeated_line_is_refused(vinyals: Path, small: Path) -> None:
    # As many lines as the real file, one repeated: the line count cannot see it.
    path = vinyals / "train.txt"
    path.write_text("Alpha/character01/rot000\nAlpha/character01/rot090\n"
                    "Alpha/character01/rot180\nAlpha/character01/rot090\n")
    with pytest.raises(ValueError) as error:
        omniglot.load("train", small, image_size=SIZE)
    assert str(path) in str(error.value)
    assert "Alpha/character01/rot090 on lines 2, 4" in str(error.value)


def test_omniglot_missing_rotation_is_rotation_zero(vinyals: Path, small: Path,
                                                    tmp_path: Path) -> None:
    custom = tmp_path / "mine.txt"
    custom.write_text("Gamma/character01\nGamma/character01/rot000\n")
    with pytest.raises(ValueError, match=r"Gamma/character01 = Gamma/character01/rot000 on "
                                         r"lines 1, 2"):
        omniglot.load(str(custom), small, image_size=SIZE)


def test_omniglot_split_file_whitespace_crlf_bom_comments(small: Path, tmp_path: Path) -> None:
    write_small(small)
    custom = tmp_path / "mine.txt"
    custom.write_bytes("\ufeff# mine\r\n  Gamma/character01/rot090 \r\n\r\nBeta/character01\r\n"
                       .encode())
    dataset = omniglot.load(str(custom), small, image_size=SIZE)
    assert dataset.names == ["Gamma/character01/rot090", "Beta/character01/rot000"]


@pytest.mark.parametrize(("first", "second", "character"), [
    ("train", "test", "Alpha/character01"), ("val", "test", "Beta/character01"),
    ("train", "val", "Alpha/character01"), ("trainval", "test", "Gamma/character01"),
])
def test_omniglot_splits_sharing_a_character_are_refused(
    vinyals: Path, small: Path, first: str, second: str, character: str
) -> None:
    one, other = vinyals / f"{first}.txt", vinyals / f"{second}.txt"
    if character not in one.read_text():
        one.write_text(f"{one.read_text()}{character}/rot000\n")
    # Another rotation of a character of the first split: the same drawings, turned.
    lines = other.read_text().split()
    other.write_text("\n".join([f"{character}/rot270", *lines[1:]]) + "\n")
    with pytest.raises(ValueError) as error:
        omniglot.load(second, small, image_size=SIZE)
    message = str(error.value)
    assert str(one) in message and str(other) in message
    assert f"share 1 class(es): {character}/rot270" in message


@pytest.mark.parametrize("line", ["Alpha/character01/rot045", "Alpha/char01", "Alpha",
                                  "Alpha/character01/rot090/extra"])
def test_omniglot_malformed_line_names_its_number(vinyals: Path, small: Path,
                                                  line: str) -> None:
    path = vinyals / "test.txt"
    path.write_text(f"# test\n{line}\n")
    with pytest.raises(ValueError, match=f"{path}, line 2: {line!r} is not"):
        omniglot.load("test", small, image_size=SIZE)


def test_omniglot_empty_split_file(small: Path, tmp_path: Path) -> None:
    write_small(small)
    custom = tmp_path / "mine.txt"
    custom.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match=f"split file {custom} lists no classes"):
        omniglot.load(str(custom), small, image_size=SIZE)


def test_omniglot_unknown_character_names_its_line(small: Path, tmp_path: Path) -> None:
    write_small(small)
    custom = tmp_path / "mine.txt"
    custom.write_text("Gamma/character01\n\nGamma/character09/rot000\n")
    with pytest.raises(ValueError, match=f"{custom}, line 3: Gamma/character09 is not a "
                                         "character of Omniglot"):
        omniglot.load(str(custom), small, image_size=SIZE)
