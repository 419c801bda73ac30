"""Data sets and task sources.

Class data sets (Omniglot, the embedded glyphs, image folders) load as a
:class:`~metalab.tasks.ClassDataset` per split; an :class:`~metalab.tasks.EpisodeSampler`
turns one into N-way K-shot episodes. Regression families (sinusoid) are task sources
themselves. :func:`task_source` builds either from a config's fields.
"""

from __future__ import annotations

import os

from metalab.data import folders, glyphs, omniglot, sinusoid
from metalab.data.paths import DataNotFoundError, data_dirs
from metalab.tasks import ClassDataset, EpisodeSampler, TaskSource

__all__ = [
    "CLASS_DATASETS",
    "DataNotFoundError",
    "data_dirs",
    "image_format",
    "load_dataset",
    "task_source",
]

# name -> module with `load(split, data_dir=None, **options) -> ClassDataset`
# and `status(data_dir=None) -> str` (one line for `metalab datasets`).
CLASS_DATASETS = {"omniglot": omniglot, "glyphs": glyphs, "folder": folders}
REGRESSION_SOURCES = {"sinusoid": sinusoid}


def load_dataset(
    name: str, split: str, data_dir: str | os.PathLike | None = None, **options: object
) -> ClassDataset:
    """Split ``split`` of the class data set ``name`` (see :data:`CLASS_DATASETS`)."""
    if name not in CLASS_DATASETS:
        valid = sorted([*CLASS_DATASETS, *REGRESSION_SOURCES])
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(valid)}.")
    return CLASS_DATASETS[name].load(split, data_dir=data_dir, **options)


def task_source(
    name: str, split: str, n_way: int, k_shot: int, q_query: int,
    data_dir: str | os.PathLike | None = None, **options: object,
) -> TaskSource:
    """Episodes of ``name``/``split``: N-way K-shot Q-query, or K-shot regression tasks."""
    if name in REGRESSION_SOURCES:
        return REGRESSION_SOURCES[name].tasks(split, k_shot=k_shot, q_query=q_query, **options)
    return EpisodeSampler(load_dataset(name, split, data_dir, **options), n_way, k_shot, q_query)


def image_format(name: str) -> dict[str, bool]:
    """How to decode a user's image so it looks like data set ``name``'s examples.

    Omniglot's black strokes on white are inverted when loaded (module flag ``INVERTED``).
    """
    return {"invert": bool(getattr(CLASS_DATASETS.get(name), "INVERTED", False))}
