"""Users' image folders: layout, uneven classes, split files, errors, cache, episodes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from metalab.data import DataNotFoundError, folders, load_dataset
from metalab.tasks import EpisodeSampler

# Class name -> number of images. Image i of class c is a solid colour of value 10c + i + 1,
# so every stored pixel says which image it came from (and 0 can only be padding).
SIZES = {"cat": 3, "dog": 5, "eel": 2, "fox": 4}


def value(class_index: int, image_index: int) -> int:
    return 10 * class_index + image_index + 1


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "images"
    for c, (name, count) in enumerate(sorted(SIZES.items())):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.full((8, 8, 3), value(c, i), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i:02d}.png")
        (root / name / ".hidden.png").write_bytes(b"not an image")  # skipped: hidden
        (root / name / "notes.txt").write_text("skipped: not an image")
    (root / ".git").mkdir()  # skipped: hidden folder
    return root


def test_all_classes_uneven_counts(root):
    data = folders.load("all", root=str(root), image_size=8)
    assert data.names == sorted(SIZES)
    assert data.data.shape == (4, 5, 3, 8, 8) and data.data.dtype == torch.uint8
    assert data.counts.tolist() == [SIZES[n] for n in sorted(SIZES)]
    for c, name in enumerate(data.names):
        for i in range(SIZES[name]):
            assert (data.data[c, i] == value(c, i)).all()
        assert (data.data[c, SIZES[name]:] == 0).all()  # padding


def test_grayscale_resize_and_max_per_class(root, tmp_path):
    Image.new("RGB", (10, 6), (200, 100, 50)).save(root / "cat" / "wide.jpg")
    data = folders.load("all", data_dir=root, image_size=5, channels=1, max_per_class=3)
    assert data.data.shape == (4, 3, 1, 5, 5)
    assert data.counts.tolist() == [3, 3, 2, 3]
    assert load_dataset("folder", "all", data_dir=root, image_size=5).data.shape[2] == 3


def test_split_files(root, tmp_path):
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("# training classes\nfox\n\n  dog \n")
    train = folders.load("train", root=root, image_size=8)
    assert train.names == ["fox", "dog"]  # the order of the file
    assert train.counts.tolist() == [4, 5]
    assert (train.data[0, 0] == value(3, 0)).all()
    # "all" still means every class folder, and splits/ is not a class.
    assert folders.load("all", root=root, image_size=8).names == sorted(SIZES)
    # An explicit split file, absolute or relative to the root.
    listing = tmp_path / "mine.txt"
    listing.write_text("eel\ncat\n")
    assert folders.load("test", root=root, split_file=listing, image_size=8).names == ["eel", "cat"]
    (root / "val.txt").write_text("dog\n")
    assert folders.load("val", root=root, split_file="val.txt", image_size=8).names == ["dog"]


def test_errors(root, tmp_path):
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "nowhere")):
        folders.load("all", root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="root: PATH"):
        folders.load("all")
    with pytest.raises(DataNotFoundError, match=r"splits/train\.txt.*split_file"):
        folders.load("train", root=root)
    listing = tmp_path / "bad.txt"
    listing.write_text("cat\ngnu\n")
    with pytest.raises(DataNotFoundError, match="gnu"):
        folders.load("train", root=root, split_file=listing)
    with pytest.raises(DataNotFoundError, match="split file missing.txt not found"):
        folders.load("train", root=root, split_file="missing.txt")
    with pytest.raises(ValueError, match="1 .grayscale. or 3"):
        folders.load("all", root=root, channels=2)
    (root / "gnu").mkdir()
    (root / "gnu" / "readme.txt").write_text("no images here")
    with pytest.raises(DataNotFoundError, match="gnu has no images"):
        folders.load("all", root=root)
    (root / "gnu" / "broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match="broken.png"):
        folders.load("all", root=root)


def test_cache_reused_and_invalidated(root, cache, monkeypatch):
    first = folders.load("all", root=root, image_size=8)
    assert len(list((cache / "folders").glob("*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as m:
        m.setattr(folders, "read_image", no_decoding)
        again = folders.load("all", root=root, image_size=8)
    assert torch.equal(first.data, again.data) and torch.equal(first.counts, again.counts)
    # A changed image (new modification time) or other options rebuild the tensor.
    path = root / "cat" / "img00.png"
    Image.new("RGB", (8, 8), (99, 99, 99)).save(path)
    os.utime(path, ns=(1, 1))
    rebuilt = folders.load("all", root=root, image_size=8)
    assert (rebuilt.data[0, 0] == 99).all()
    folders.load("all", root=root, image_size=4)
    assert len(list((cache / "folders").glob("*.pt"))) == 3


def test_episodes_never_sample_padding(root):
    data = folders.load("all", root=root, image_size=8)
    for c, count in enumerate(data.counts.tolist()):
        data.data[c, count:] = 255  # impossible for a real image here
    sampler = EpisodeSampler(data, n_way=3, k_shot=1, q_query=1)  # eel has only 2 images
    for seed in range(20):
        batch = sampler.sample(8, torch.Generator().manual_seed(seed))
        for x in (batch.support_x, batch.query_x):
            assert (x < 1.0).all()
        # Each example is a real image of the class its label points to.
        pixel = (batch.query_x[..., 0, 0, 0] * 255).round().long()  # [T, N*Q]
        cls = batch.classes.gather(1, batch.query_y)
        assert ((pixel - 1) // 10 == cls).all()
    with pytest.raises(ValueError, match="need 3 examples per class"):
        EpisodeSampler(data, n_way=4, k_shot=2, q_query=1)


def test_status():
    assert folders.status().startswith("user image folders: pass dataset: folder with root: PATH")
