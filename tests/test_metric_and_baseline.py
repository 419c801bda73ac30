"""Method-specific checks of Matching Networks, Relation Networks and the fine-tune baseline.

Everything runs on synthetic tensors (no data set files): classes are fixed random prototypes
whose signal lives in a few dimensions, plus noise that an embedding has to learn to ignore.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from metalab.algorithms import TaskSpec, build_algorithm
from metalab.algorithms.finetune import FineTune
from metalab.algorithms.matchingnet import MatchingNet
from metalab.algorithms.relationnet import RelationNet, class_features
from metalab.models import MLP, Conv4
from metalab.tasks import ClassDataset, EpisodeSampler, TaskBatch

DIM = 32


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These tensors are tiny: on a shared 2-core machine, extra threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prototype_dataset(num_classes: int, seed: int, per_class: int = 20) -> ClassDataset:
    """Vectors of ``DIM`` features: a class prototype in the first 8, large noise elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.zeros(num_classes, 1, DIM)
    prototypes[..., :8] = torch.randn(num_classes, 1, 8, generator=gen)
    noise_scale = torch.cat([torch.full((8,), 0.45), torch.full((DIM - 8,), 1.5)])
    data = prototypes + noise_scale * torch.randn(num_classes, per_class, DIM, generator=gen)
    return ClassDataset(data, [f"class{i}" for i in range(num_classes)])


def image_batch(num_tasks: int = 2, n_way: int = 3, k_shot: int = 2, q_query: int = 2,
                size: int = 16) -> TaskBatch:
    """Random 1 x size x size episodes (shape checks only)."""
    dataset = ClassDataset(torch.rand(6, 5, 1, size, size), [str(i) for i in range(6)])
    sampler = EpisodeSampler(dataset, n_way, k_shot, q_query)
    return sampler.sample(num_tasks, torch.Generator().manual_seed(0))


def episode_accuracy(algo: nn.Module, sampler: EpisodeSampler, episodes: int = 40) -> float:
    """Mean query accuracy of ``adapt`` on fresh episodes, the way the evaluator runs it."""
    algo.eval()
    batch = sampler.sample(episodes, torch.Generator().manual_seed(1234))
    correct = 0.0
    with torch.no_grad():
        for t in range(episodes):
            predictor = algo.adapt(batch.support_x[t], batch.support_y[t])
            correct += (predictor(batch.query_x[t]).argmax(-1) == batch.query_y[t]).float().mean()
    return float(correct) / episodes


def train_and_score(name: str, steps: int = 40, **options: object) -> float:
    """Meta-train on 40 classes, score 5-way 1-shot on 20 unseen ones (chance 0.2)."""
    torch.manual_seed(0)
    train = EpisodeSampler(prototype_dataset(40, seed=0), 5, 1, 5)
    test = EpisodeSampler(prototype_dataset(20, seed=1), 5, 1, 5)
    spec = TaskSpec(input_shape=(DIM,), num_classes=40)
    algo = build_algorithm(name, MLP(DIM, (64, 64)), spec, **options)
    optimiser = torch.optim.Adam(algo.parameters(), lr=3e-3)
    for step in range(steps):
        loss, metrics = algo.meta_loss(train.sample(8, torch.Generator().manual_seed(step)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        assert torch.isfinite(loss) and 0.0 <= metrics["accuracy"] <= 1.0
    return episode_accuracy(algo, test)


# ---------------------------------------------------------------- Matching Networks


def test_matchingnet_query_equal_to_support_example_gets_its_class() -> None:
    spec = TaskSpec(n_way=5, input_shape=(DIM,))
    algo = MatchingNet(nn.Identity(), spec).eval()
    support_x = torch.randn(5, DIM, generator=torch.Generator().manual_seed(0))
    support_y = torch.tensor([3, 0, 4, 1, 2])
    probs = algo.adapt(support_x, support_y)(support_x).exp()
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-5)
    assert torch.equal(probs.argmax(-1), support_y)


def test_matchingnet_log_probs_are_log_of_attention_over_labels() -> None:
    spec = TaskSpec(n_way=3, input_shape=(DIM,))
    algo = MatchingNet(nn.Identity(), spec, scale=1.0, learn_scale=False)
    gen = torch.Generator().manual_seed(0)
    support_x, query_x = torch.randn(6, DIM, generator=gen), torch.randn(4, DIM, generator=gen)
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])
    cosine = nn.functional.normalize(query_x, dim=-1) @ nn.functional.normalize(support_x, dim=-1).T
    expected = (cosine.softmax(-1) @ nn.functional.one_hot(support_y, 3).float()).log()
    assert torch.allclose(algo.adapt(support_x, support_y)(query_x), expected, atol=1e-5)
    assert "scale" not in dict(algo.named_parameters())  # fixed temperature: a buffer


def test_matchingnet_fce_support_is_order_sensitive_and_query_reads_a_set() -> None:
    spec = TaskSpec(n_way=5, input_shape=(DIM,))
    torch.manual_seed(0)
    plain = MatchingNet(nn.Identity(), spec)
    fce = MatchingNet(nn.Identity(), spec, fce=True, fce_steps=3)
    gen = torch.Generator().manual_seed(1)
    support = torch.randn(1, 10, DIM, generator=gen)
    queries = torch.randn(1, 4, DIM, generator=gen)
    perm = torch.randperm(10, generator=gen)
    encoded = fce.encode_support(support)
    assert not torch.allclose(encoded, support)  # FCE changes the embeddings
    # The BiLSTM reads the support set as a sequence: reordering changes each encoding...
    assert not torch.allclose(fce.encode_support(support[:, perm]), encoded[:, perm], atol=1e-4)
    # ...while the attention LSTM reads g(S) as a set.
    assert torch.allclose(fce.encode_queries(queries, encoded[:, perm]),
                          fce.encode_queries(queries, encoded), atol=1e-5)
    assert not torch.allclose(fce.encode_queries(queries, encoded), queries)
    # Without FCE the predictor is invariant to the order of the support set.
    support_y = torch.arange(5).repeat(2)
    logits = plain.adapt(support[0], support_y)(queries[0])
    assert torch.allclose(plain.adapt(support[0, perm], support_y[perm])(queries[0]), logits,
                          atol=1e-5)


def test_matchingnet_fce_gradient_reaches_both_lstms() -> None:
    spec = TaskSpec(n_way=3, input_shape=(1, 16, 16))
    algo = MatchingNet(Conv4(hidden=8), spec, fce=True, fce_steps=2)
    loss, _ = algo.meta_loss(image_batch())
    loss.backward()
    for name, param in algo.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_matchingnet_beats_chance() -> None:
    assert train_and_score("matchingnet") > 0.55


def test_matchingnet_fce_beats_chance() -> None:
    assert train_and_score("matchingnet", fce=True, fce_steps=3) > 0.55


# ---------------------------------------------------------------- Relation Networks


@pytest.mark.parametrize("size", [28, 12, 4])
def test_relationnet_scores_in_unit_interval_for_feature_maps(size: int) -> None:
    # Conv4 pooling twice gives 7x7, 3x3 and 1x1 maps: the relation module pools only >= 2x2.
    spec = TaskSpec(n_way=3, input_shape=(1, size, size))
    algo = RelationNet(Conv4(hidden=8, pool_blocks=2, flatten=False), spec)
    assert isinstance(algo.relation[0][0], nn.Conv2d)
    batch = image_batch(size=size)
    loss, metrics = algo.meta_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and 0.0 <= metrics["accuracy"] <= 1.0
    algo.eval()
    scores = algo.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0])
    assert scores.shape == (6, 3)
    assert scores.min() >= 0.0 and scores.max() <= 1.0


def test_relationnet_flat_features_use_an_mlp_relation_module() -> None:
    spec = TaskSpec(n_way=3, input_shape=(1, 16, 16))
    algo = RelationNet(Conv4(hidden=8), spec, loss="ce")  # flatten=True: vectors
    assert not any(isinstance(m, nn.Conv2d) for m in algo.relation.modules())
    loss, _ = algo.meta_loss(image_batch())
    assert torch.isfinite(loss)


def test_relationnet_sum_and_mean_aggregation() -> None:
    features = torch.randn(2, 6, 4, 3, 3)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])
    summed = class_features(features, labels, 3, "sum")
    mean = class_features(features, labels, 3, "mean")
    assert summed.shape == (2, 3, 4, 3, 3)
    assert torch.allclose(summed, 2 * mean)
    assert torch.allclose(summed[1, 2], features[1, 0] + features[1, 1])
    # With one shot both aggregations are the same model.
    spec = TaskSpec(n_way=3, input_shape=(DIM,))
    torch.manual_seed(0)
    by_sum = RelationNet(MLP(DIM, (16,)), spec, aggregate="sum").eval()
    by_mean = RelationNet(MLP(DIM, (16,)), spec, aggregate="mean").eval()
    by_mean.load_state_dict(by_sum.state_dict())
    support_x, query_x = torch.randn(3, DIM), torch.randn(5, DIM)
    assert torch.allclose(by_sum.adapt(support_x, torch.arange(3))(query_x),
                          by_mean.adapt(support_x, torch.arange(3))(query_x))


def test_relationnet_rejects_unknown_options() -> None:
    spec = TaskSpec(input_shape=(DIM,))
    with pytest.raises(ValueError, match="aggregate"):
        RelationNet(MLP(DIM), spec, aggregate="max")
    with pytest.raises(ValueError, match="loss"):
        RelationNet(MLP(DIM), spec, loss="hinge")


def test_relationnet_beats_chance() -> None:
    assert train_and_score("relationnet", steps=100) > 0.4


# ---------------------------------------------------------------- fine-tune baseline


def separable_support() -> tuple[torch.Tensor, torch.Tensor]:
    """5 classes x 3 shots of well separated vectors."""
    gen = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(5, DIM, generator=gen)
    labels = torch.arange(5).repeat(3)
    return centres[labels] + 0.1 * torch.randn(15, DIM, generator=gen), labels


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_finetune_fits_separable_support(head: str) -> None:
    spec = TaskSpec(input_shape=(DIM,), num_classes=10)
    algo = FineTune(nn.Identity(), spec, head=head, finetune_steps=50).eval()
    support_x, support_y = separable_support()
    with torch.no_grad():  # as the evaluator calls it
        logits = algo.adapt(support_x, support_y)(support_x)
    assert logits.shape == (15, 5)
    assert torch.equal(logits.argmax(-1), support_y)
    assert algo.adaptation_steps() == 50


@pytest.mark.parametrize("finetune_all", [False, True])
def test_finetune_adapt_is_deterministic_and_leaves_module_alone(finetune_all: bool) -> None:
    spec = TaskSpec(input_shape=(1, 16, 16), num_classes=6)
    algo = FineTune(Conv4(hidden=8), spec, finetune_steps=5, finetune_all=finetune_all).eval()
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    batch = image_batch()
    support_x, support_y, query_x = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    with torch.no_grad():
        first = algo.adapt(support_x, support_y)(query_x)
        second = algo.adapt(support_x, support_y)(query_x)
    assert torch.equal(first, second)
    for key, value in algo.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.requires_grad and p.grad is None for p in algo.parameters())


def test_finetune_all_changes_the_predictor_backbone() -> None:
    spec = TaskSpec(input_shape=(1, 16, 16), num_classes=6)
    algo = FineTune(Conv4(hidden=8), spec, finetune_steps=3, finetune_all=True).eval()
    batch = image_batch()
    predictor = algo.adapt(batch.support_x[0], batch.support_y[0])
    assert predictor.backbone is not algo.backbone
    copied = dict(predictor.backbone.named_parameters())
    assert any(not torch.equal(p, copied[k]) for k, p in algo.backbone.named_parameters())


@pytest.mark.parametrize("finetune_all", [False, True])
def test_finetune_batch_as_large_as_the_support_is_the_full_batch_fit(finetune_all: bool) -> None:
    spec = TaskSpec(input_shape=(DIM,), num_classes=10)
    support_x, support_y = separable_support()
    torch.manual_seed(0)
    backbone = nn.Linear(DIM, DIM)
    fits = []
    for batch in (None, len(support_y), 4 * len(support_y)):
        algo = FineTune(backbone, spec, head="cosine", finetune_steps=7,
                        finetune_all=finetune_all, finetune_batch=batch).eval()
        with torch.no_grad():
            fits.append(algo.adapt(support_x, support_y)(support_x))
    # one shuffled batch per epoch: the same mean loss, summed in another order
    torch.testing.assert_close(fits[1], fits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fits[2], fits[0], rtol=1e-5, atol=1e-5)


def test_finetune_in_minibatches_fits_and_is_deterministic() -> None:
    spec = TaskSpec(input_shape=(DIM,), num_classes=10)
    support_x, support_y = separable_support()
    algo = FineTune(nn.Identity(), spec, finetune_steps=10, finetune_batch=4).eval()
    full = FineTune(nn.Identity(), spec, finetune_steps=10).eval()
    with torch.no_grad():
        first = algo.adapt(support_x, support_y)(support_x)
        second = algo.adapt(support_x, support_y)(support_x)
        full_batch = full.adapt(support_x, support_y)(support_x)
    assert torch.equal(first, second)
    assert torch.equal(first.argmax(-1), support_y)
    # 10 epochs of 4 mini-batches take 40 steps, so the margins grow beyond 10 full-batch steps'
    assert not torch.allclose(first, full_batch)
    with pytest.raises(ValueError, match="finetune_batch"):
        FineTune(nn.Identity(), spec, finetune_batch=0)


def test_finetune_needs_global_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        FineTune(nn.Identity(), TaskSpec(input_shape=(DIM,)))
    algo = FineTune(Conv4(hidden=8), TaskSpec(input_shape=(1, 16, 16), num_classes=6))
    batch = image_batch()
    no_classes = TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    with pytest.raises(ValueError, match="classes"):
        algo.meta_loss(no_classes)
    too_few = FineTune(Conv4(hidden=8), TaskSpec(input_shape=(1, 16, 16), num_classes=2))
    with pytest.raises(ValueError, match="num_classes"):
        too_few.meta_loss(batch)


def test_finetune_pretrains_on_global_labels() -> None:
    spec = TaskSpec(input_shape=(DIM,), num_classes=8)
    algo = FineTune(nn.Identity(), spec)
    batch = EpisodeSampler(prototype_dataset(8, seed=0), 3, 2, 2).sample(
        4, torch.Generator().manual_seed(0)
    )
    loss, metrics = algo.meta_loss(batch)
    assert set(metrics) == {"accuracy", "global_accuracy"}
    # Cross-entropy over all 8 classes on every support and query image, by global class id.
    x = torch.cat([batch.support_x, batch.query_x], dim=1).flatten(0, 1)
    labels = torch.cat([batch.support_y, batch.query_y], dim=1)
    global_ids = torch.stack([batch.classes[t][labels[t]] for t in range(4)]).flatten()
    expected = nn.functional.cross_entropy(algo.classifier(x), global_ids)
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_finetune_beats_chance(head: str) -> None:
    assert train_and_score("finetune", steps=100, head=head, finetune_steps=50) > 0.6
