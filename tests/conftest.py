"""Shared fixtures: a hermetic cache, the real-data gate, and a small synthetic data set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from metalab.tasks import ClassDataset
from metalab.testing import easy_dataset


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Processed-data caches go to a per-session folder, never the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("metalab-cache")
    previous = os.environ.get("METALAB_CACHE")
    os.environ["METALAB_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("METALAB_CACHE", None)
    else:
        os.environ["METALAB_CACHE"] = previous


def real_data_dir(name: str) -> Path:
    """``$METALAB_DATA`` if it holds data set ``name``; skip (or fail when CI=true) if not."""
    root = os.environ.get("METALAB_DATA")
    if root and (Path(root) / name).exists():
        return Path(root)
    reason = (f"the real {name} data is not available: set METALAB_DATA to a folder holding "
              f"{name}/ (e.g. METALAB_DATA=../shared/data)")
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny test tensors run several times faster on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def easy_data(monkeypatch: pytest.MonkeyPatch) -> str:
    """Registers the easy synthetic data set as ``easy`` (train: 20 classes, val/test: 10)."""
    import types

    from metalab import data

    full = easy_dataset(num_classes=30, size=16)

    def load(split: str, data_dir: object = None) -> ClassDataset:
        part = slice(0, 20) if split == "train" else slice(20, 30)
        return ClassDataset(full.data[part], full.names[part])

    module = types.SimpleNamespace(load=load, status=lambda data_dir=None: "synthetic (tests)")
    monkeypatch.setitem(data.DATASETS, "easy", module)
    return "easy"


def easy_config(out: Path, **changes: object):
    """A small, fast training config on the ``easy`` data set."""
    from metalab.config import Config

    values = dict(dataset="easy", backbone="conv4", backbone_options={"hidden": 16},
                  n_way=5, k_shot=1, q_query=5, tasks_per_batch=2, test_n_way=5,
                  test_k_shot=1, test_q_query=5, steps=20, val_every=10, val_episodes=20,
                  test_episodes=50, log_every=5, lr=3e-3, out=str(out))
    values.update(changes)
    return Config.from_dict(values)
