"""The checks every registered algorithm passes, the same way (as scikit-learn checks
estimators): shapes, determinism, gradient to every parameter, no mutation by ``adapt``,
better than chance after a short training, and a save/load round trip."""

from __future__ import annotations

import pytest
import torch

from metalab.algorithms import ALGORITHMS, MetaLearner, TaskSpec, build_algorithm
from metalab.evaluate import evaluate
from metalab.io import atomic_save
from metalab.models import build_backbone
from metalab.tasks import EpisodeSampler, fixed_episodes

from .conftest import easy_dataset

SIZE = 16
CLASSIFIERS = sorted(n for n, c in ALGORITHMS.items() if "classification" in c.kinds)
# Backbone and algorithm options that keep each algorithm small and quick on the easy task.
BACKBONE_OPTIONS = {"relationnet": {"hidden": 16, "pool_blocks": 2, "flatten": False}}
ALGORITHM_OPTIONS = {
    "finetune": {"finetune_steps": 30},
    **{name: {"test_inner_steps": 3} for name in ("maml", "fomaml", "anil", "metasgd")},
    "snail": {"attention": ((8, 8), (16, 8)), "filters": 8},
    "mann": {"controller_size": 32, "memory_slots": 8, "memory_width": 8, "read_heads": 2},
    "recurrent": {"hidden_size": 32},
    "cnp": {"encoder_sizes": (32, 32), "decoder_sizes": (32,)},
}


def make(name: str, seed: int = 0, num_classes: int = 20) -> MetaLearner:
    torch.manual_seed(seed)
    spec = TaskSpec(kind="classification", n_way=5, input_shape=(1, SIZE, SIZE),
                    num_classes=num_classes)
    backbone = build_backbone("conv4", spec.input_shape,
                              **BACKBONE_OPTIONS.get(name, {"hidden": 16}))
    return build_algorithm(name, backbone, spec, **ALGORITHM_OPTIONS.get(name, {}))


@pytest.fixture(scope="module")
def splits() -> tuple[EpisodeSampler, EpisodeSampler]:
    data = easy_dataset(num_classes=30, size=SIZE)
    train = type(data)(data.data[:20], data.names[:20])
    test = type(data)(data.data[20:], data.names[20:])
    return (EpisodeSampler(train, n_way=5, k_shot=1, q_query=5),
            EpisodeSampler(test, n_way=5, k_shot=1, q_query=5))


def batch_of(sampler: EpisodeSampler, tasks: int = 3, seed: int = 0):
    return sampler.sample(tasks, torch.Generator().manual_seed(seed))


def test_registry_lists_the_families() -> None:
    families = {cls.family for cls in ALGORITHMS.values()}
    assert {"metric", "optimization", "model", "baseline"} <= families
    assert {"protonet", "matchingnet", "relationnet", "finetune"} <= set(ALGORITHMS)
    assert {"maml", "fomaml", "anil", "metasgd", "reptile"} <= set(ALGORITHMS)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_shapes(name: str, splits) -> None:
    algo = make(name)
    batch = batch_of(splits[0])
    loss, metrics = algo.meta_loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) for v in metrics.values())
    algo.eval()
    with torch.no_grad():
        predictor = algo.adapt(batch.support_x[0], batch.support_y[0])
        assert predictor(batch.query_x[0]).shape == (25, 5)
        assert predictor(batch.query_x[0, :7]).shape == (7, 5)  # any number of queries


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_deterministic(name: str, splits) -> None:
    batch = batch_of(splits[0])
    losses, outputs = [], []
    for _ in range(2):
        algo = make(name, seed=3)
        losses.append(algo.meta_loss(batch)[0].item())
        algo.eval()
        with torch.no_grad():
            outputs.append(algo.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0]))
    assert losses[0] == losses[1]
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_meta_gradient_reaches_every_parameter(name: str, splits) -> None:
    algo = make(name)
    loss, _ = algo.meta_loss(batch_of(splits[0]))
    loss.backward()
    for pname, param in algo.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_adapt_does_not_mutate(name: str, splits) -> None:
    algo = make(name).eval()
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    batch = batch_of(splits[1])
    with torch.no_grad():
        predictor = algo.adapt(batch.support_x[0], batch.support_y[0])
        predictor(batch.query_x[0])
    after = algo.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# The model-based family (black-box learners) needs far more, and more diverse, tasks than
# 40 steps on 20 classes to learn to compare rather than memorise classes; its learning check
# is tests/test_model_based.py::test_learns_diverse_few_shot_tasks.
QUICK_LEARNERS = [n for n in CLASSIFIERS if ALGORITHMS[n].family != "model"]


@pytest.mark.slow
@pytest.mark.parametrize("name", QUICK_LEARNERS)
def test_beats_chance_after_short_training(name: str, splits) -> None:
    train, test = splits
    algo = make(name)
    optimizer = torch.optim.Adam(algo.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss, _ = algo.meta_loss(train.sample(4, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result = evaluate(algo, fixed_episodes(test, 100, seed=1))
    # Chance is 20%; the classes are new to the model (meta-test split).
    assert result.mean > 60.0, f"{name}: {result}"


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_save_load_round_trip(name: str, splits, tmp_path) -> None:
    algo = make(name, seed=1)
    loss, _ = algo.meta_loss(batch_of(splits[0]))
    loss.backward()
    torch.optim.SGD(algo.parameters(), lr=0.1).step()  # move away from the initial weights
    path = tmp_path / "model.pt"
    atomic_save(algo.state_dict(), path)
    clone = make(name, seed=2)
    clone.load_state_dict(torch.load(path, weights_only=True))
    batch = batch_of(splits[1])
    algo.eval()
    clone.eval()
    with torch.no_grad():
        a = algo.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0])
        b = clone.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0])
    assert torch.allclose(a, b, atol=1e-6)
