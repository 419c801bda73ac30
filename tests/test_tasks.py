"""The episode sampler: determinism, labels, distinct classes, no support/query overlap."""

from __future__ import annotations

import pytest
import torch

from metalab.tasks import ClassDataset, EpisodeSampler, TaskBatch, fixed_episodes, step_generator


def indexed_dataset(num_classes: int = 12, per_class: int = 8) -> ClassDataset:
    """Each example's single value encodes (class, index): value = class * 100 + index."""
    values = torch.arange(num_classes).view(-1, 1) * 100 + torch.arange(per_class).view(1, -1)
    return ClassDataset(values.view(num_classes, per_class, 1).float(),
                        [str(c) for c in range(num_classes)])


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    value = x.squeeze(-1).long()
    return value // 100, value % 100


def test_shapes_and_labels() -> None:
    sampler = EpisodeSampler(indexed_dataset(), n_way=4, k_shot=2, q_query=3)
    batch = sampler.sample(5, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (5, 8, 1) and batch.query_x.shape == (5, 12, 1)
    assert batch.classes.shape == (5, 4) and batch.n_way == 4
    # Labels are 0..N-1 and name the class the example came from.
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        cls, _ = decode(x)
        assert torch.equal(cls, batch.classes.gather(1, y))
        assert sorted(y[0].tolist()) == sorted(list(range(4)) * (y.shape[1] // 4))


def test_distinct_classes_and_no_overlap() -> None:
    sampler = EpisodeSampler(indexed_dataset(), n_way=6, k_shot=3, q_query=5)
    batch = sampler.sample(200, torch.Generator().manual_seed(1))
    for t in range(len(batch)):
        assert len(set(batch.classes[t].tolist())) == 6
        support = set(zip(*[v.tolist() for v in decode(batch.support_x[t])], strict=True))
        query = set(zip(*[v.tolist() for v in decode(batch.query_x[t])], strict=True))
        assert len(support) == 18 and len(query) == 30  # examples distinct within each set
        assert not support & query


def test_sampling_covers_classes_uniformly() -> None:
    sampler = EpisodeSampler(indexed_dataset(num_classes=10), n_way=2, k_shot=1, q_query=1)
    counts = torch.bincount(sampler.sample(5000, torch.Generator().manual_seed(2)).classes
                            .flatten(), minlength=10).float()
    assert counts.min() / counts.max() > 0.85


def test_same_seed_same_episodes_different_seed_different() -> None:
    sampler = EpisodeSampler(indexed_dataset(), n_way=3, k_shot=1, q_query=2)
    a = sampler.sample(4, torch.Generator().manual_seed(7))
    b = sampler.sample(4, torch.Generator().manual_seed(7))
    c = sampler.sample(4, torch.Generator().manual_seed(8))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.query_x, c.query_x)
    # A step's generator depends on (seed, step) only: resumed runs redraw the same tasks.
    assert torch.equal(sampler.sample(2, step_generator(3, 10)).query_x,
                       sampler.sample(2, step_generator(3, 10)).query_x)
    assert step_generator(3, 10).initial_seed() != step_generator(3, 11).initial_seed()


def test_fixed_episodes_are_fixed_and_sized() -> None:
    sampler = EpisodeSampler(indexed_dataset(), n_way=3, k_shot=1, q_query=2)
    first = fixed_episodes(sampler, 120, seed=1, chunk=50)
    again = fixed_episodes(sampler, 120, seed=1, chunk=50)
    assert [len(b) for b in first] == [50, 50, 20]
    assert all(torch.equal(a.query_x, b.query_x) for a, b in zip(first, again, strict=True))


def test_uneven_classes_never_sample_padding() -> None:
    data = torch.full((4, 6, 1), -1.0)  # -1 marks padding
    counts = torch.tensor([6, 3, 4, 2])
    for c, n in enumerate(counts.tolist()):
        data[c, :n, 0] = c
    dataset = ClassDataset(data, list("abcd"), counts=counts)
    sampler = EpisodeSampler(dataset, n_way=2, k_shot=1, q_query=2)  # needs 3 per class
    batch = sampler.sample(300, torch.Generator().manual_seed(0))
    assert set(batch.classes.flatten().tolist()) == {0, 1, 2}
    assert (batch.support_x >= 0).all() and (batch.query_x >= 0).all()


def test_too_many_ways_or_shots_is_a_clear_error() -> None:
    dataset = indexed_dataset(num_classes=5, per_class=8)
    with pytest.raises(ValueError, match="10-way episodes need 10 classes.*only 5"):
        EpisodeSampler(dataset, n_way=10, k_shot=1, q_query=1)
    with pytest.raises(ValueError, match="need 9 examples per class.*lower k_shot or q_query"):
        EpisodeSampler(dataset, n_way=2, k_shot=4, q_query=5)
    with pytest.raises(ValueError, match=">= 1"):
        EpisodeSampler(dataset, n_way=2, k_shot=0, q_query=5)


def test_batch_indexing_and_stacking() -> None:
    sampler = EpisodeSampler(indexed_dataset(), n_way=3, k_shot=1, q_query=2)
    batch = sampler.sample(4, torch.Generator().manual_seed(0))
    assert len(batch[1]) == 1 and torch.equal(batch[1].query_x[0], batch.task(1).query_x)
    assert len(batch[-1]) == 1 and torch.equal(batch[-1].query_x[0], batch.query_x[3])
    joined = TaskBatch.stack([batch[:2], batch[2:]])
    assert torch.equal(joined.support_x, batch.support_x)
    assert torch.equal(joined.classes, batch.classes)


def test_integer_inputs_keep_their_type_and_embedding_backbones_build() -> None:
    """Token or item ids as inputs: .to(dtype) casts only floating tensors, task_spec records
    the input dtype and feature_shape probes with it, so an nn.Embedding backbone works."""
    from torch import nn

    from metalab.algorithms import build_algorithm, task_spec
    from metalab.kinds import CLASSIFICATION
    from metalab.models import BACKBONES, build_backbone, register_backbone

    class TokenTasks:
        kind = CLASSIFICATION

        def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
            ids = torch.randint(0, 50, (num_tasks, 12, 6), generator=generator)
            labels = torch.arange(3).repeat(4).expand(num_tasks, 12)
            return TaskBatch(ids[:, :6], labels[:, :6], ids[:, 6:], labels[:, 6:])

    batch = TokenTasks().sample(2, torch.Generator().manual_seed(0)).to("cpu", torch.float64)
    assert batch.support_x.dtype == torch.long and batch.query_y.dtype == torch.long
    spec = task_spec(TokenTasks())
    assert spec.input_dtype == torch.long and spec.n_way == 3 and spec.input_shape == (6,)
    assert spec.from_dict(spec.to_dict()) == spec

    def bag_of_words(input_shape: tuple[int, ...], vocabulary: int = 50) -> nn.Module:
        return nn.EmbeddingBag(vocabulary, 8)

    register_backbone("bag-of-words", bag_of_words)
    try:
        backbone = build_backbone("bag-of-words", spec.input_shape)
        algo = build_algorithm("protonet", backbone, spec)
        loss, _ = algo.meta_loss(batch.to("cpu"))
        assert torch.isfinite(loss)
        with pytest.raises(ValueError, match="already registered"):
            register_backbone("bag-of-words", lambda input_shape: nn.Identity())
    finally:
        del BACKBONES["bag-of-words"]
    with pytest.raises(ValueError, match="unknown backbone 'bag-of-words'.*register_backbone"):
        build_backbone("bag-of-words", (6,))
