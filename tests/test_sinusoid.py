"""Sinusoid regression tasks (Finn et al. 2017): shapes, ranges, targets, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from metalab.data import sinusoid, task_source
from metalab.kinds import REGRESSION
from metalab.tasks import fixed_episodes


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_and_types():
    source = sinusoid.SinusoidTasks(k_shot=5, q_query=10)
    batch = source.sample(7, gen())
    assert source.kind is REGRESSION
    assert batch.support_x.shape == batch.support_y.shape == (7, 5, 1)
    assert batch.query_x.shape == batch.query_y.shape == (7, 10, 1)
    assert batch.support_x.dtype == batch.support_y.dtype == torch.float32
    assert batch.classes is None and batch.num_tasks == 7


def test_parameters_and_inputs_within_maml_ranges():
    batch, amplitude, phase = sinusoid.SinusoidTasks(10, 10).sample_with_params(2000, gen())
    assert amplitude.shape == phase.shape == (2000,)
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0
    assert 0.0 <= phase.min() and phase.max() <= math.pi
    for x in (batch.support_x, batch.query_x):
        assert -5.0 <= x.min() and x.max() <= 5.0
    # The ranges are actually covered, not a corner of them.
    assert amplitude.min() < 0.5 and amplitude.max() > 4.5 and phase.max() > 2.9
    assert batch.support_x.min() < -4.9 and batch.support_x.max() > 4.9


def test_targets_are_a_sin_x_minus_phi():
    batch, amplitude, phase = sinusoid.SinusoidTasks(5, 15).sample_with_params(50, gen(1))
    a, p = amplitude.view(-1, 1, 1), phase.view(-1, 1, 1)
    assert torch.equal(batch.support_y, a * torch.sin(batch.support_x - p))
    assert torch.equal(batch.query_y, a * torch.sin(batch.query_x - p))
    assert torch.equal(batch.query_y, sinusoid.sinusoid(batch.query_x, a, p))


def test_same_seed_same_tasks():
    source = sinusoid.SinusoidTasks(5, 5)
    a, b, c = source.sample(3, gen(4)), source.sample(3, gen(4)), source.sample(3, gen(5))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    assert not torch.equal(a.support_x, c.support_x)
    # sample draws exactly what sample_with_params draws.
    d = source.sample_with_params(3, gen(4))[0]
    assert torch.equal(a.query_x, d.query_x)


def test_custom_ranges_and_validation():
    source = sinusoid.SinusoidTasks(3, 4, amplitude=[1.0, 1.0], phase=(0.0, 0.0),
                                    x_range=(0.0, 1.0))
    batch = source.sample(10, gen())
    assert torch.equal(batch.support_y, torch.sin(batch.support_x))
    assert 0.0 <= batch.query_x.min() and batch.query_x.max() <= 1.0
    with pytest.raises(ValueError, match="low <= high"):
        sinusoid.SinusoidTasks(3, 4, amplitude=(5.0, 0.1))
    with pytest.raises(ValueError, match="k_shot and q_query"):
        sinusoid.SinusoidTasks(0, 4)


def test_registry_entry():
    source = task_source("sinusoid", "train", n_way=1, k_shot=10, q_query=5, x_range=(-1, 1))
    assert isinstance(source, sinusoid.SinusoidTasks)
    assert (source.k_shot, source.q_query, source.x_range) == (10, 5, (-1.0, 1.0))
    assert sinusoid.tasks("test", 5, 5).amplitude == (0.1, 5.0)
    with pytest.raises(ValueError, match="unknown sinusoid split"):
        sinusoid.tasks("training", 5, 5)
    assert sinusoid.status() == "procedural, always available"
    batches = fixed_episodes(source, 120, seed=0, chunk=50)
    assert [b.num_tasks for b in batches] == [50, 50, 20]
