"""CLINC150: 150 intents in 10 domains, plus out-of-scope requests (Larson et al. 2019, *An
Evaluation Dataset for Intent Classification and Out-of-Scope Prediction*, EMNLP-IJCNLP).

Files (``clinc150/`` under a data folder; from clinc/oos-eval, ``data/``, CC BY 3.0):
``data_full.json`` (lists of ``[text, intent]`` under ``train``, ``val``, ``test`` — 100 / 20 /
30 sentences per intent — and ``oos_train``, ``oos_val``, ``oos_test`` — 100 / 100 / 1,000
out-of-scope sentences) and ``domains.json`` (domain -> its 15 intents).

Splits, as class data sets of sentence embeddings (:func:`metalab.text.intent_dataset`):

* ``train`` / ``val`` / ``test``: the intents of whole domains (:data:`DOMAIN_SPLITS`), with
  all their sentences, for N-way K-shot episodes on unseen domains (a split by domain as in
  IntentBERT, Zhang et al. 2022); ``exclude`` drops domains, e.g. ``banking`` and
  ``credit_cards`` (:data:`BANKING_DOMAINS`) when BANKING77 is the test set, since they
  overlap with it;
* ``all-train`` / ``all-val`` / ``all-test``: the 150 intents with the published sentences.

:func:`out_of_scope` gives the ``oos_*`` sentences.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from metalab.data.paths import DataNotFoundError, fetch_checked, find_folder
from metalab.tasks import ClassDataset
from metalab.text import DEFAULT_ENCODER, SentenceEncoder, intent_dataset

__all__ = [
    "BANKING_DOMAINS",
    "DOMAIN_SPLITS",
    "SPLITS",
    "TEXT",
    "domains",
    "download",
    "load",
    "out_of_scope",
    "read",
    "status",
]

TEXT = True  # examples are sentences, embedded by a sentence encoder (metalab.text)
SPLITS = ("train", "val", "test", "all-train", "all-val", "all-test")
DOMAIN_SPLITS = {
    "train": ("kitchen_and_dining", "home", "utility", "work", "small_talk", "meta"),
    "val": ("auto_and_commute", "travel"),
    "test": ("banking", "credit_cards"),
}
BANKING_DOMAINS = ("banking", "credit_cards")
BASE_URL = ("https://raw.githubusercontent.com/clinc/oos-eval/"
            "828f8093932c8fe6ca7936c3d2e52903b1c523de/data/")
MD5 = {"data_full.json": "30c29dc6ab78edf3b5dfa640be204cde",
       "domains.json": "9beee9d0f36e07e914c1e3a626bdcb4a"}


def folder(data_dir: str | os.PathLike | None = None) -> Path:
    """The first ``clinc150/`` folder, among :func:`data_dirs`, that holds both files."""
    return find_folder("clinc150", MD5, data_dir, "CLINC150", BASE_URL)


@cache
def _published(path: Path) -> dict[str, list[list[str]]]:
    return json.loads(path.read_text())


def read(part: str, data_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The (text, intent) rows of ``part``: train, val, test, oos_train, oos_val or oos_test."""
    published = _published(folder(data_dir) / "data_full.json")
    if part not in published:
        raise ValueError(f"data_full.json has {', '.join(published)}; got {part!r}.")
    return [(text, intent) for text, intent in published[part]]


def domains(data_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Each domain's 15 intents."""
    return json.loads((folder(data_dir) / "domains.json").read_text())


def out_of_scope(split: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The out-of-scope sentences of ``split`` (train, val or test)."""
    return [text for text, _ in read(f"oos_{split}", data_dir)]


def load(
    split: str, data_dir: str | os.PathLike | None = None,
    domain_splits: dict[str, Sequence[str]] | None = None, exclude: Sequence[str] = (),
    encoder: str | os.PathLike | SentenceEncoder = DEFAULT_ENCODER, progress: bool = True,
    top_layers: int = 0,
) -> ClassDataset:
    """Split ``split`` (see the module docstring) as embeddings by ``encoder`` (with
    ``top_layers``, token states below its last layers, for an ``encoder-top`` backbone);
    ``domain_splits`` replaces :data:`DOMAIN_SPLITS`, ``exclude`` drops domains."""
    if split not in SPLITS:
        raise ValueError(f"unknown CLINC150 split {split!r}; available: {', '.join(SPLITS)}.")
    by_domain = domains(data_dir)
    unknown = sorted(set(exclude) - set(by_domain))
    if unknown:
        raise ValueError(f"unknown CLINC150 domain(s) {', '.join(unknown)}; the domains are "
                         f"{', '.join(by_domain)}.")
    if split.startswith("all-"):
        rows = read(split.removeprefix("all-"), data_dir)
        kept = [d for d in by_domain if d not in exclude]
    else:
        rows = read("train", data_dir) + read("val", data_dir) + read("test", data_dir)
        chosen = (domain_splits or DOMAIN_SPLITS).get(split, ())
        bad = sorted(set(chosen) - set(by_domain))
        if bad:
            raise ValueError(f"domain_splits names unknown domain(s) {', '.join(bad)}.")
        kept = [d for d in chosen if d not in exclude]
    names = [intent for d in kept for intent in by_domain[d]]
    if not names:
        raise ValueError(f"CLINC150 split {split!r} keeps no domain; check domain_splits and "
                         "exclude.")
    texts, labels = zip(*rows, strict=True)
    return intent_dataset(texts, labels, names, encoder, progress, top_layers)


def status(data_dir: str | os.PathLike | None = None) -> str:
    try:
        return f"found in {folder(data_dir)} (sentences are embedded on first use, then cached)"
    except DataNotFoundError:
        return "not found; `metalab datasets --download clinc150` fetches it (2.5 MB)"


def download(dest: str | os.PathLike) -> Path:
    """Fetch ``data_full.json`` and ``domains.json`` into ``dest``, MD5-checked."""
    dest = Path(dest)
    fetch_checked(BASE_URL, MD5, dest)
    return dest
