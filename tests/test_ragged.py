"""Tasks of different sizes in one meta-batch (a user with 13 ratings beside one with 90):
a RaggedTaskBatch trains with ProtoNet, MAML and the CNP, and its meta-gradient equals the
same tasks computed one at a time (float64, 1e-9), BatchNorm running statistics included,
whether it is computed padded in one call (ProtoNet and the CNP on a network without
BatchNorm) or in groups of equal-size tasks (everything else)."""

from __future__ import annotations

import pytest
import torch

from metalab.algorithms import build_algorithm, task_spec
from metalab.data.sinusoid import SinusoidTasks
from metalab.evaluate import evaluate
from metalab.kinds import CLASSIFICATION, REGRESSION
from metalab.models import MLP
from metalab.tasks import (
    ClassDataset,
    EpisodeSampler,
    RaggedTaskBatch,
    TaskBatch,
    fixed_episodes,
    sample_tasks,
    stack_tasks,
)
from metalab.train import Trainer, meta_backward

DIM = 16


class UnevenEpisodes:
    """3-way episodes whose shots (1 to 3) and queries (2 or 4) per class differ by task."""

    kind = CLASSIFICATION
    n_way = 3

    def __init__(self) -> None:
        # 12 classes: random 16-d centres, examples far apart from them (hard to tell apart)
        gen = torch.Generator().manual_seed(0)
        centres = torch.randn(12, 1, 16, generator=gen)
        data = ClassDataset(centres + 1.5 * torch.randn(12, 20, 16, generator=gen),
                            [f"class{i}" for i in range(12)])
        self.samplers = {(k, q): EpisodeSampler(data, 3, k, q) for k in (1, 2, 3) for q in (2, 4)}
        self.num_classes = data.num_classes

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch | RaggedTaskBatch:
        sizes = list(self.samplers)
        picks = torch.randint(len(sizes), (num_tasks,), generator=generator).tolist()
        return stack_tasks([self.samplers[sizes[i]].sample(1, generator) for i in picks])


class UnevenSinusoids:
    """Sinusoid regression tasks with 3 to 10 support points and 5 to 12 queries each."""

    kind = REGRESSION

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch | RaggedTaskBatch:
        sizes = torch.randint(3, 11, (num_tasks, 2), generator=generator).tolist()
        return stack_tasks([SinusoidTasks(k, q + 2).sample(1, generator) for k, q in sizes])


SOURCES = {"classification": UnevenEpisodes, "regression": UnevenSinusoids}
CASES = [("protonet", "classification"), ("maml", "classification"), ("cnp", "classification"),
         ("maml", "regression"), ("cnp", "regression")]
OPTIONS = {"cnp": {"encoder_sizes": (16, 16), "decoder_sizes": (16,)}, "maml": {"inner_lr": 0.1}}


def make(name: str, kind: str, batch_norm: bool = True):
    source = SOURCES[kind]()
    spec = task_spec(source)
    torch.manual_seed(0)
    # BatchNorm with running statistics: the tasks must not share them either.
    inputs = 16 if kind == "classification" else 1
    backbone = MLP(inputs, hidden=(DIM,), batch_norm=batch_norm)
    return source, build_algorithm(name, backbone, spec, **OPTIONS.get(name, {}))


def test_tasks_of_different_sizes_stack_into_a_ragged_batch() -> None:
    source = UnevenEpisodes()
    batch = sample_tasks(source, seed=0, step=0, indices=range(8))
    assert isinstance(batch, RaggedTaskBatch) and len(batch) == 8
    groups = batch.groups()
    assert sorted(i for indices, _ in groups for i in indices) == list(range(8))
    for indices, group in groups:
        assert isinstance(group, TaskBatch) and len(group) == len(indices)
        for j, i in enumerate(indices):
            assert torch.equal(group.support_x[j], batch.task(i).support_x)
    assert len(batch.task(0).support_y) in (3, 6, 9)
    same = stack_tasks([batch[0], batch[0]])
    assert isinstance(same, TaskBatch) and len(same) == 2  # equal sizes stay dense
    moved = batch.to("cpu", torch.float64)
    assert moved.task(1).support_x.dtype == torch.float64
    assert moved.task(1).support_y.dtype == torch.long  # labels keep their type


@pytest.mark.parametrize("batch_norm", [True, False], ids=["batch-norm", "no-batch-norm"])
@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_ragged_meta_gradient_equals_tasks_one_at_a_time(name, kind, batch_norm) -> None:
    source, algo = make(name, kind, batch_norm)
    algo = algo.double().train()
    batch = sample_tasks(source, seed=3, step=0, indices=range(6)).to("cpu", torch.float64)
    assert isinstance(batch, RaggedTaskBatch) and len(batch.groups()) > 1
    start = {k: v.clone() for k, v in algo.state_dict().items()}

    calls = []
    meta_loss = algo.meta_loss
    algo.meta_loss = lambda part: calls.append(part) or meta_loss(part)
    loss, _ = meta_backward(algo, batch)
    del algo.meta_loss
    padded = algo.pads_tasks and not batch_norm
    assert len(calls) == (1 if padded else len(batch.groups()))
    assert calls[0].padded == padded
    grads = {n: p.grad.clone() for n, p in algo.named_parameters()}
    buffers = {k: v.clone() for k, v in algo.state_dict().items() if v.is_floating_point()}

    # The reference: every task alone, from the same weights and buffers, averaged.
    expected_loss, expected_grads = 0.0, {n: torch.zeros_like(g) for n, g in grads.items()}
    expected_buffers = {k: torch.zeros_like(v) for k, v in buffers.items()}
    for i in range(len(batch)):
        algo.load_state_dict(start)
        algo.zero_grad(set_to_none=True)
        task_loss, _ = algo.meta_loss(batch[i])
        task_loss.backward()
        expected_loss += task_loss.item() / len(batch)
        for n, p in algo.named_parameters():
            expected_grads[n] += p.grad / len(batch)
        for k in expected_buffers:
            expected_buffers[k] += (algo.state_dict()[k] - start[k]) / len(batch)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    for n, g in grads.items():
        torch.testing.assert_close(g, expected_grads[n], rtol=1e-9, atol=1e-12, msg=n)
    for k, b in buffers.items():
        torch.testing.assert_close(b, start[k] + expected_buffers[k], rtol=1e-9, atol=1e-12,
                                   msg=k)


@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_ragged_tasks_train_and_evaluate(name: str, kind: str, tmp_path) -> None:
    source, algo = make(name, kind)
    episodes = fixed_episodes(source, 40, seed=1, chunk=20)
    assert all(isinstance(b, RaggedTaskBatch) for b in episodes)
    before = evaluate(algo, episodes)
    trainer = Trainer(algo, source, steps=60, tasks_per_batch=8, out=tmp_path, progress=False,
                      optimizer=torch.optim.Adam(algo.parameters(), lr=3e-3))
    trainer.fit()
    after = evaluate(trainer.algo, episodes)
    assert after.episodes == 40
    assert source.kind.better(after.mean, before.mean), (before, after)
