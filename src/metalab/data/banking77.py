"""BANKING77: 13,083 online-banking queries labelled with 77 intents (Casanueva et al. 2020,
*Efficient Intent Detection with Dual Sentence Encoders*, NLP4ConvAI).

Files (``banking77/`` under a data folder; from PolyAI-LDN/task-specific-datasets,
``banking_data/``, CC BY 4.0): ``train.csv`` (10,003 rows) and ``test.csv`` (3,080 rows) with
the header ``text,category``, and ``categories.json`` (the 77 names). :func:`download`
fetches and MD5-checks them.

Splits, as class data sets of sentence embeddings (:func:`metalab.text.intent_dataset`):

* ``train`` / ``val`` / ``test``: the intents of ProtAugment's class fold ``fold`` (1-5;
  25 / 25 / 27 intents; Dopierre et al., ACL 2021), each with all its sentences of both
  files, for N-way K-shot episodes on intents never seen in meta-training. The fold lists are
  read from ``banking77/splits/protaugment/NN/labels.{train,valid,test}.txt`` (from
  tdopierre/ProtAugment, ``data/BANKING77/few_shot/NN``). ``trainval``: the fold's 50
  training and validation intents together, to meta-train a final model once its settings
  are chosen (as MetaOptNet's final runs train on train + val);
* ``all-train`` / ``all-test``: all 77 intents with the published train / test sentences,
  for the full-way protocol (:mod:`metalab.studies.intents`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from metalab.data.paths import DataNotFoundError, fetch_checked, fetch_file, find_folder
from metalab.tasks import ClassDataset
from metalab.text import DEFAULT_ENCODER, SentenceEncoder, intent_dataset

__all__ = ["FOLDS", "SPLITS", "TEXT", "download", "fold_intents", "intents", "load", "read",
           "status"]

TEXT = True  # examples are sentences, embedded by a sentence encoder (metalab.text)
SPLITS = ("train", "val", "test", "trainval", "all-train", "all-test")
FOLDS = (1, 2, 3, 4, 5)
BASE_URL = ("https://raw.githubusercontent.com/PolyAI-LDN/task-specific-datasets/"
            "57ec275d8078af65b7731c2a98be812d844a6d6b/banking_data/")
SPLITS_URL = ("https://raw.githubusercontent.com/tdopierre/ProtAugment/"
              "6352ababa740133708daed815666b5bf39850d98/data/BANKING77/few_shot/")
MD5 = {"train.csv": "cec64185f4197906aabce0781ef9a19b",
       "test.csv": "8dcd9dc31b686c75ec1f24bf23c140cb",
       "categories.json": "8312ff01430af97fba5a113b7a490269"}
_FOLD_FILES = {"train": "labels.train.txt", "val": "labels.valid.txt", "test": "labels.test.txt"}


def folder(data_dir: str | os.PathLike | None = None) -> Path:
    """The first ``banking77/`` folder, among :func:`data_dirs`, that holds the three files."""
    return find_folder("banking77", MD5, data_dir, "BANKING77", BASE_URL)


def read(file: str, data_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The (text, intent) rows of ``train.csv`` or ``test.csv`` (``file``: train or test)."""
    if file not in ("train", "test"):
        raise ValueError(f"BANKING77's files are train.csv and test.csv: read 'train' or "
                         f"'test', not {file!r}.")
    with (folder(data_dir) / f"{file}.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or set(rows[0]) != {"text", "category"}:
        raise ValueError(f"{folder(data_dir) / file}.csv must have the header text,category.")
    return [(row["text"], row["category"]) for row in rows]


def intents(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The 77 intent names, in ``categories.json``'s order."""
    return json.loads((folder(data_dir) / "categories.json").read_text())


def fold_intents(fold: int, split: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The intents of ProtAugment fold ``fold``'s ``split`` (train, val or test)."""
    if fold not in FOLDS:
        raise ValueError(f"BANKING77 has ProtAugment folds {FOLDS}; got fold={fold}.")
    if split not in _FOLD_FILES:
        raise ValueError(f"a fold has train, val and test intents; got {split!r}.")
    path = folder(data_dir) / "splits" / "protaugment" / f"{fold:02d}" / _FOLD_FILES[split]
    if not path.is_file():
        raise DataNotFoundError(
            f"{path} is missing: the ProtAugment class folds go in banking77/splits/protaugment/"
            f"NN/ (from {SPLITS_URL}NN/); `metalab datasets --download banking77` fetches them.")
    names = path.read_text().split("\n")
    names = [n.strip() for n in names if n.strip()]
    unknown = sorted(set(names) - set(intents(data_dir)))
    if unknown:
        raise ValueError(f"{path} names intents BANKING77 does not have: {', '.join(unknown)}.")
    return names


def load(
    split: str, data_dir: str | os.PathLike | None = None, fold: int = 1,
    encoder: str | os.PathLike | SentenceEncoder = DEFAULT_ENCODER, progress: bool = True,
    top_layers: int = 0,
) -> ClassDataset:
    """Split ``split`` (see the module docstring) as embeddings by ``encoder`` (with
    ``top_layers``, token states below its last layers, for an ``encoder-top`` backbone)."""
    if split not in SPLITS:
        raise ValueError(f"unknown BANKING77 split {split!r}; available: {', '.join(SPLITS)}.")
    if split.startswith("all-"):
        rows, names = read(split.removeprefix("all-"), data_dir), intents(data_dir)
    else:
        rows = read("train", data_dir) + read("test", data_dir)
        parts = ("train", "val") if split == "trainval" else (split,)
        names = [name for part in parts for name in fold_intents(fold, part, data_dir)]
    texts, labels = zip(*rows, strict=True)
    return intent_dataset(texts, labels, names, encoder, progress, top_layers)


def status(data_dir: str | os.PathLike | None = None) -> str:
    try:
        return f"found in {folder(data_dir)} (sentences are embedded on first use, then cached)"
    except DataNotFoundError:
        return "not found; `metalab datasets --download banking77` fetches it (1 MB)"


def download(dest: str | os.PathLike) -> Path:
    """Fetch the three files and the five ProtAugment folds into ``dest``, MD5-checked."""
    dest = Path(dest)
    fetch_checked(BASE_URL, MD5, dest)
    for fold in FOLDS:
        for count, file in zip((25, 25, 27), _FOLD_FILES.values(), strict=True):
            target = dest / "splits" / "protaugment" / f"{fold:02d}" / file
            if not target.is_file():
                fetch_file(f"{SPLITS_URL}{fold:02d}/{file}", target, lines=count)
    return dest
