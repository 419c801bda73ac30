"""Sinusoid regression: the few-shot regression benchmark of MAML (Finn, Abbeel & Levine 2017).

Each task is a sine wave ``y = A sin(x - φ)`` with amplitude ``A ~ U[0.1, 5.0]`` and phase
``φ ~ U[0, π]``; its inputs are ``x ~ U[-5, 5]``. A learner sees ``K`` points of a new wave
(the support set) and is scored by its mean squared error on ``Q`` more (the query set).

Tasks are drawn on the fly, so there is no data set to split: every split draws from the
same distribution, and evaluation is kept apart from training by its seed
(:func:`metalab.tasks.fixed_episodes` with a seed the training run never uses).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from metalab.kinds import REGRESSION
from metalab.tasks import TaskBatch

__all__ = ["KIND", "SPLITS", "SinusoidTasks", "sinusoid", "status", "tasks"]

SPLITS = ("train", "val", "test", "trainval", "all")
KIND = REGRESSION


def sinusoid(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
    """``A sin(x - φ)``, the MAML task family; ``amplitude`` and ``phase`` broadcast with ``x``."""
    return amplitude * torch.sin(x - phase)


class SinusoidTasks:
    """Source of ``K``-shot sinusoid regression tasks, drawn in one vectorised call.

    ``sample`` returns a :class:`~metalab.tasks.TaskBatch` with ``support_x``/``support_y``
    of shape ``[T, K, 1]`` and ``query_x``/``query_y`` of shape ``[T, Q, 1]`` (float32) and
    no ``classes``. The ranges are ``(low, high)`` of the uniform distributions.
    """

    kind = KIND

    def __init__(
        self,
        k_shot: int,
        q_query: int,
        amplitude: Sequence[float] = (0.1, 5.0),
        phase: Sequence[float] = (0.0, math.pi),
        x_range: Sequence[float] = (-5.0, 5.0),
    ) -> None:
        if min(k_shot, q_query) < 1:
            raise ValueError(f"k_shot and q_query must be >= 1, got {k_shot} and {q_query}.")
        self.k_shot, self.q_query = k_shot, q_query
        self.amplitude = _range("amplitude", amplitude)
        self.phase = _range("phase", phase)
        self.x_range = _range("x_range", x_range)

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        return self.sample_with_params(num_tasks, generator)[0]

    def sample_with_params(
        self, num_tasks: int, generator: torch.Generator
    ) -> tuple[TaskBatch, Tensor, Tensor]:
        """Like :meth:`sample`, also returning each task's amplitude and phase (``[T]`` each).

        Draws the same tasks as :meth:`sample` for the same generator state.
        """
        amplitude = _uniform(self.amplitude, (num_tasks,), generator)
        phase = _uniform(self.phase, (num_tasks,), generator)
        x = _uniform(self.x_range, (num_tasks, self.k_shot + self.q_query, 1), generator)
        y = sinusoid(x, amplitude.view(-1, 1, 1), phase.view(-1, 1, 1))
        k = self.k_shot
        batch = TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
        return batch, amplitude, phase

    def __repr__(self) -> str:
        return (f"SinusoidTasks(k_shot={self.k_shot}, q_query={self.q_query}, "
                f"amplitude={self.amplitude}, phase={self.phase}, x_range={self.x_range})")


def tasks(
    split: str, k_shot: int, q_query: int, n_way: int = 0,
    data_dir: str | os.PathLike | None = None, **options: object,
) -> SinusoidTasks:
    """The sinusoid task source for ``split`` (any of :data:`SPLITS`; all draw alike).

    ``options`` are :class:`SinusoidTasks`'s ``amplitude``, ``phase`` and ``x_range``
    (``n_way`` and ``data_dir`` do not apply: tasks are generated). Training and evaluation
    see different tasks because they use different seeds.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown sinusoid split {split!r}; choose one of {', '.join(SPLITS)}.")
    return SinusoidTasks(k_shot, q_query, **options)


def status(data_dir: str | os.PathLike | None = None) -> str:
    """One line for ``metalab datasets``."""
    return "procedural, always available"


def _range(name: str, bounds: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` as floats, checked (configs give lists)."""
    if len(bounds) != 2 or not float(bounds[0]) <= float(bounds[1]):
        raise ValueError(f"{name} must be a pair (low, high) with low <= high, got {bounds!r}.")
    return float(bounds[0]), float(bounds[1])


def _uniform(bounds: tuple[float, float], shape: tuple[int, ...],
             generator: torch.Generator) -> Tensor:
    low, high = bounds
    return torch.rand(shape, generator=generator) * (high - low) + low
