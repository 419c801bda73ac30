"""Data sets and task sources.

Every data set is a module (or any object) in :data:`DATASETS` with ``status(data_dir=None)``
(one line for ``metalab datasets``) and one of:

* ``load(split, data_dir=None, **options) -> ClassDataset``: a class data set (Omniglot, the
  embedded glyphs, image folders), turned into N-way K-shot episodes by an
  :class:`~metalab.tasks.EpisodeSampler`;
* ``tasks(split, n_way, k_shot, q_query, data_dir=None, **options) -> TaskSource``: a task
  source of its own (sinusoid regression; users as tasks; environments), optionally with
  ``KIND``, the :class:`~metalab.kinds.TaskKind` of its tasks (known without loading data).

:func:`register_dataset` adds one; :func:`task_source` builds either from a config's fields.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from metalab.data import (
    banking77,
    clinc150,
    ett,
    folders,
    glyphs,
    movielens100k,
    omniglot,
    sinusoid,
)
from metalab.data.paths import DataNotFoundError, data_dirs
from metalab.kinds import CLASSIFICATION, TaskKind
from metalab.tasks import ClassDataset, EpisodeSampler, TaskSource

__all__ = [
    "DATASETS",
    "DataNotFoundError",
    "data_dirs",
    "dataset_kind",
    "image_format",
    "keep_alphabets",
    "load_dataset",
    "register_dataset",
    "task_source",
]

# name -> module with `status(data_dir=None)` and `load(split, ...)` or `tasks(split, ...)`
DATASETS: dict[str, Any] = {"omniglot": omniglot, "glyphs": glyphs, "folder": folders,
                            "sinusoid": sinusoid, "movielens100k": movielens100k, "ett": ett,
                            "banking77": banking77, "clinc150": clinc150}


def register_dataset(name: str, module: Any) -> Any:
    """Make ``module`` (see the module docstring) available to configs as ``dataset: name``."""
    if not hasattr(module, "status") or not (hasattr(module, "load") or
                                             hasattr(module, "tasks")):
        raise TypeError(f"data set {name!r} needs status() and load() or tasks().")
    DATASETS[name] = module
    return module


def dataset_kind(name: str) -> TaskKind | None:
    """The kind of data set ``name``'s tasks if known without loading it: classification
    for a data set of classes, else the module's ``KIND`` (None if it declares none)."""
    module = _module(name)
    return CLASSIFICATION if hasattr(module, "load") else getattr(module, "KIND", None)


def _module(name: str) -> Any:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}.")
    return DATASETS[name]


def load_dataset(
    name: str, split: str, data_dir: str | os.PathLike | None = None, progress: bool = True,
    **options: object,
) -> ClassDataset:
    """Split ``split`` of the class data set ``name`` (see :data:`DATASETS`). ``progress``
    reaches the module's ``load`` if it takes one (the text data sets' encoding bar)."""
    module = _module(name)
    if not hasattr(module, "load"):
        raise ValueError(f"{name} is a task source, not a data set of classes; use "
                         f"task_source({name!r}, ...).")
    if "progress" in inspect.signature(module.load).parameters:
        options = {**options, "progress": progress}
    return module.load(split, data_dir=data_dir, **options)


def task_source(
    name: str, split: str, n_way: int, k_shot: int, q_query: int,
    data_dir: str | os.PathLike | None = None, class_fraction: float = 1.0, seed: int = 0,
    progress: bool = True, **options: object,
) -> TaskSource:
    """Tasks of ``name``/``split``: N-way K-shot Q-query episodes of a class data set, or
    the data set's own task source (e.g. K-shot sinusoid regression).

    ``class_fraction`` < 1 keeps that share of the split's alphabets (chosen by ``seed``);
    ``progress`` as in :func:`load_dataset`.
    """
    module = _module(name)
    if hasattr(module, "tasks"):
        if class_fraction < 1:
            raise ValueError(f"{name} tasks have no classes to keep a fraction of; "
                             "train_fraction applies to class data sets only.")
        return module.tasks(split, n_way=n_way, k_shot=k_shot, q_query=q_query,
                            data_dir=data_dir, **options)
    dataset = load_dataset(name, split, data_dir, progress, **options)
    if class_fraction < 1:
        dataset = keep_alphabets(dataset, class_fraction, seed)
    return EpisodeSampler(dataset, n_way, k_shot, q_query)


def keep_alphabets(dataset: ClassDataset, fraction: float, seed: int) -> ClassDataset:
    """The classes of a random ``fraction`` of ``dataset``'s alphabets (at least one).

    A class's alphabet is the first part of its name (``alphabet/character``; Omniglot's
    rotations of a character stay with it); names without a ``/`` are their own alphabet.
    Whole alphabets are kept so that a smaller fraction means less diverse tasks, not only
    fewer of them.
    """
    alphabets = sorted({name.split("/")[0] for name in dataset.names})
    count = max(1, round(fraction * len(alphabets)))
    order = torch.randperm(len(alphabets), generator=torch.Generator().manual_seed(seed))
    kept = {alphabets[i] for i in order[:count].tolist()}
    index = [c for c, name in enumerate(dataset.names) if name.split("/")[0] in kept]
    if len(index) < 2:
        raise ValueError(f"train_fraction={fraction} keeps {len(index)} class(es) of "
                         f"{dataset.num_classes}; raise it so episodes can be drawn.")
    return ClassDataset(dataset.data[index], [dataset.names[c] for c in index],
                        dataset.counts[index], dataset.group)


def image_format(name: str) -> dict[str, bool]:
    """How to decode a user's image so it looks like data set ``name``'s examples.

    Omniglot's black strokes on white are inverted when loaded (module flag ``INVERTED``).
    """
    return {"invert": bool(getattr(DATASETS.get(name), "INVERTED", False))}
