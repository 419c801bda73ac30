"""Tasks as tensors: the episode, the batch of episodes, and the samplers that draw them.

A task (episode) is a support set ``(x, y)`` and a query set ``(x, y)``. A :class:`TaskBatch`
stacks ``T`` tasks along a leading task dimension so that every algorithm can process a
whole meta-batch in one call::

    support_x [T, N*K, *input_shape]   support_y [T, N*K]   (labels 0..N-1 per task)
    query_x   [T, N*Q, *input_shape]   query_y   [T, N*Q]
    classes   [T, N]                   global class id of each task label (classification)
    support_mask [T, N*K], query_mask [T, N*Q]   (padded batches only: True = a real example)

Sampling from a :class:`ClassDataset` is a handful of tensor operations driven by a seeded
``torch.Generator``: no per-image Python, and the same seed gives the same episodes on every
machine.

Tasks of different sizes (a user with 13 ratings beside one with 90) form a
:class:`RaggedTaskBatch`: the tasks as they are. :func:`metalab.train.meta_backward` computes
one in one of two ways, each equal to the tasks computed one at a time:

* padded (:meth:`RaggedTaskBatch.padded`): one :class:`TaskBatch` whose support and query
  sets are padded to the largest, with ``support_mask`` / ``query_mask`` marking the real
  examples, for algorithms that honour the masks (``MetaLearner.pads_tasks``: ProtoNet, the
  CNP) on networks that treat every example on its own (no BatchNorm over the batch);
* grouped (:meth:`RaggedTaskBatch.groups`): dense batches of the tasks that have equal sizes,
  one after the other, for every other case.

Padding was measured 2.0x (CNP) and 2.3x (ProtoNet) faster than one group per task on 32
tasks of 3 to 90 examples (``benchmarks/ragged_tasks.py``, 2-core CPU); dense N-way K-shot
episodes never pad and keep the fast path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Protocol

import torch
from torch import Tensor

from metalab.kinds import CLASSIFICATION, TaskKind

__all__ = [
    "ClassDataset",
    "EpisodeSampler",
    "RaggedTaskBatch",
    "Task",
    "TaskBatch",
    "TaskSource",
    "fixed_episodes",
    "sample_tasks",
    "stack_tasks",
    "step_generator",
    "task_generator",
]


@dataclass(frozen=True)
class Task:
    """One episode: a support set to adapt on and a query set to score the adaptation."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


@dataclass(frozen=True)
class TaskBatch:
    """``T`` episodes stacked along a leading task dimension (see the module docstring)."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor | None = None
    support_mask: Tensor | None = None
    query_mask: Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def padded(self) -> bool:
        """True if some tasks' sets are padded (see the masks)."""
        return self.support_mask is not None or self.query_mask is not None

    @property
    def n_way(self) -> int:
        """Classes per task (classification batches)."""
        if self.classes is not None:
            return self.classes.shape[1]
        return int(self.support_y.max()) + 1

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, index: int | slice) -> TaskBatch:
        """Task ``index`` as a batch of one (int) or the tasks in a slice."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TaskBatch(**{f.name: _maybe(getattr(self, f.name), index) for f in fields(self)})

    def task(self, index: int) -> Task:
        """Task ``index`` without its task dimension (and without padding)."""
        support = slice(None) if self.support_mask is None else self.support_mask[index]
        query = slice(None) if self.query_mask is None else self.query_mask[index]
        return Task(self.support_x[index][support], self.support_y[index][support],
                    self.query_x[index][query], self.query_y[index][query])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        """Move to ``device``; ``dtype`` (if given) applies to floating-point tensors only
        (integer inputs such as token or item ids, labels and class ids keep their type)."""

        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return TaskBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def sizes(self) -> tuple[tuple[int, ...], ...]:
        """The shapes of one task's tensors: tasks with equal sizes stack densely."""
        return tuple(() if t is None else tuple(t.shape[1:])
                     for t in (getattr(self, f.name) for f in fields(self)))

    @staticmethod
    def stack(batches: list[TaskBatch]) -> TaskBatch:
        """Concatenate batches along the task dimension."""
        out = {}
        for f in fields(TaskBatch):
            parts = [getattr(b, f.name) for b in batches]
            out[f.name] = None if parts[0] is None else torch.cat(parts)
        return TaskBatch(**out)


def _maybe(t: Tensor | None, index: slice) -> Tensor | None:
    return None if t is None else t[index]


@dataclass(frozen=True)
class RaggedTaskBatch:
    """``T`` tasks whose support or query sets differ in size, each a :class:`TaskBatch` of
    one task. Indexing, :meth:`task` and :meth:`to` work as on a :class:`TaskBatch`;
    :meth:`groups` stacks the tasks of equal sizes into dense batches."""

    tasks: tuple[TaskBatch, ...]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int | slice) -> TaskBatch | RaggedTaskBatch:
        """Task ``index`` as a batch of one (int), or the tasks in a slice."""
        if isinstance(index, int):
            return self.tasks[index]
        return stack_tasks(list(self.tasks[index]))

    def task(self, index: int) -> Task:
        return self.tasks[index].task(0)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None,
           ) -> RaggedTaskBatch:
        return RaggedTaskBatch(tuple(t.to(device, dtype) for t in self.tasks))

    def padded(self) -> TaskBatch | None:
        """The tasks as one :class:`TaskBatch`, support and query sets padded with zeros to
        the largest and marked by ``support_mask`` / ``query_mask``; None if the tasks differ
        in more than their numbers of examples (example shapes, number of classes)."""
        def example_shapes(t: TaskBatch) -> tuple:  # what padding cannot reconcile
            return (*(getattr(t, name).shape[2:] for name in ("support_x", "support_y",
                                                              "query_x", "query_y")),
                    None if t.classes is None else t.classes.shape)

        first = self.tasks[0]
        if any(t.padded for t in self.tasks) or len(set(map(example_shapes, self.tasks))) > 1:
            return None
        support = max(t.support_x.shape[1] for t in self.tasks)
        query = max(t.query_x.shape[1] for t in self.tasks)

        def pad(name: str, length: int) -> Tensor:
            parts = [getattr(t, name) for t in self.tasks]
            return torch.cat([torch.cat([p, p.new_zeros(1, length - p.shape[1], *p.shape[2:])],
                                        dim=1) for p in parts])

        def mask(name: str, length: int) -> Tensor:
            return torch.stack([torch.arange(length) < getattr(t, name).shape[1]
                                for t in self.tasks]).to(first.support_x.device)

        classes = None if first.classes is None else torch.cat([t.classes for t in self.tasks])
        return TaskBatch(pad("support_x", support), pad("support_y", support),
                         pad("query_x", query), pad("query_y", query), classes,
                         mask("support_x", support), mask("query_x", query))

    def groups(self) -> list[tuple[list[int], TaskBatch]]:
        """``(indices, batch)`` per distinct task size, in order of first appearance:
        ``batch`` stacks the tasks ``indices`` densely."""
        by_size: dict[tuple, list[int]] = {}
        for i, task in enumerate(self.tasks):
            by_size.setdefault(task.sizes(), []).append(i)
        return [(indices, TaskBatch.stack([self.tasks[i] for i in indices]))
                for indices in by_size.values()]


def stack_tasks(batches: list[TaskBatch | RaggedTaskBatch]) -> TaskBatch | RaggedTaskBatch:
    """Concatenate batches along the task dimension: a dense :class:`TaskBatch` when every
    task has the same sizes, else a :class:`RaggedTaskBatch`."""
    tasks = [b[i] for b in batches for i in range(len(b))]
    if len({t.sizes() for t in tasks}) == 1:
        return TaskBatch.stack(tasks)
    return RaggedTaskBatch(tuple(tasks))


class TaskSource(Protocol):
    """Anything that draws batches of tasks: image episodes, sinusoids, users, ...

    ``kind`` says what the tasks ask (:mod:`metalab.kinds`); ``sample`` returns a
    :class:`TaskBatch`, or a :class:`RaggedTaskBatch` when its tasks differ in size. Nothing
    else is required: a source for a new domain needs no base class.
    """

    kind: TaskKind

    def sample(self, num_tasks: int, generator: torch.Generator,
               ) -> TaskBatch | RaggedTaskBatch: ...


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for training step ``step`` of a run seeded ``seed``.

    Deriving every step's randomness from ``(seed, step)`` rather than from a running stream
    makes a resumed run draw exactly the tasks an uninterrupted run would.
    """
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def task_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of task ``index`` of training step ``step`` of a run seeded ``seed``.

    Every task of a meta-batch has its own stream, so a process that trains on some of a
    step's tasks draws exactly those tasks, whatever the other processes draw: a run split
    over several processes sees the tasks of a run in one. Distinct for ``index`` < 1,000,033.
    """
    return torch.Generator().manual_seed(
        ((seed * 1_000_003 + step) * 1_000_033 + index) % (2**63 - 1))


def sample_tasks(source: TaskSource, seed: int, step: int, indices: Iterable[int],
                 ) -> TaskBatch | RaggedTaskBatch:
    """Tasks ``indices`` of training step ``step``'s meta-batch, each drawn from its own
    :func:`task_generator`, stacked in the order given (:func:`stack_tasks`)."""
    return stack_tasks([source.sample(1, task_generator(seed, step, i)) for i in indices])


@dataclass
class ClassDataset:
    """Examples grouped by class, held in memory as one tensor.

    ``data[c, i]`` is example ``i`` of class ``c``; classes with fewer examples than
    ``data.shape[1]`` say so in ``counts`` (the padding is never sampled). ``names[c]`` names
    the class. Images are stored compactly (Omniglot: uint8) and turned into floats in
    [0, 1] when sampled.
    """

    data: Tensor
    names: list[str]
    counts: Tensor | None = None
    group: str = "class"  # what a class is called in messages ("character", "intent", ...)

    def __post_init__(self) -> None:
        if self.data.shape[0] != len(self.names):
            raise ValueError(
                f"ClassDataset has {self.data.shape[0]} classes of data but "
                f"{len(self.names)} names; pass one name per class."
            )
        if self.counts is None:
            self.counts = torch.full((self.data.shape[0],), self.data.shape[1], dtype=torch.long)

    @property
    def num_classes(self) -> int:
        return self.data.shape[0]

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[2:])

    def to_float(self, x: Tensor) -> Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


class EpisodeSampler:
    """Draws N-way K-shot Q-query classification episodes from a :class:`ClassDataset`.

    Each task picks ``n_way`` distinct classes uniformly among those with at least
    ``k_shot + q_query`` examples, then ``k_shot + q_query`` distinct examples of each class;
    the first ``k_shot`` go to the support set, the rest to the query set, so support and
    query never share an example. Labels are the position of the class in the task (0..N-1).
    """

    kind = CLASSIFICATION

    def __init__(self, dataset: ClassDataset, n_way: int, k_shot: int, q_query: int) -> None:
        if min(n_way, k_shot, q_query) < 1:
            raise ValueError(
                f"n_way, k_shot and q_query must be >= 1, got {n_way}, {k_shot}, {q_query}."
            )
        per_class = k_shot + q_query
        eligible = torch.nonzero(dataset.counts >= per_class).flatten()
        if len(eligible) < n_way:
            if dataset.num_classes < n_way:
                raise ValueError(
                    f"{n_way}-way episodes need {n_way} classes but this split has only "
                    f"{dataset.num_classes}; lower n_way or use a larger split."
                )
            raise ValueError(
                f"{k_shot}-shot {q_query}-query episodes need {per_class} examples per class, "
                f"but only {len(eligible)} classes have that many (at most "
                f"{int(dataset.counts.max())} per {dataset.group}); lower k_shot or q_query."
            )
        self.dataset = dataset
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.eligible = eligible

    @property
    def num_classes(self) -> int:
        """Classes of the data set (what a baseline pretrained on all of them predicts)."""
        return self.dataset.num_classes

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        n, k, q = self.n_way, self.k_shot, self.q_query
        # N distinct classes per task: the first N of a random permutation of the eligible ones.
        order = torch.rand(num_tasks, len(self.eligible), generator=generator).argsort(dim=1)
        classes = self.eligible[order[:, :n]]  # [T, N]
        # K+Q distinct examples per class; positions past a class's count sort last.
        max_count = self.dataset.data.shape[1]
        keys = torch.rand(num_tasks, n, max_count, generator=generator)
        keys[torch.arange(max_count) >= self.dataset.counts[classes].unsqueeze(-1)] = 2.0
        picks = keys.argsort(dim=-1)[..., : k + q]  # [T, N, K+Q]
        x = self.dataset.to_float(self.dataset.data[classes.unsqueeze(-1), picks])
        labels = torch.arange(n).view(1, n, 1)
        shape = self.dataset.example_shape

        def split(part: Tensor, count: int) -> tuple[Tensor, Tensor]:
            # Interleave as class 0..N-1 per shot: [T, N, count, ...] -> [T, count*N, ...].
            xs = part.transpose(1, 2).reshape(num_tasks, count * n, *shape)
            ys = labels.expand(num_tasks, n, count).transpose(1, 2).reshape(num_tasks, count * n)
            return xs, ys

        support_x, support_y = split(x[:, :, :k], k)
        query_x, query_y = split(x[:, :, k:], q)
        return TaskBatch(support_x, support_y, query_x, query_y, classes)


def fixed_episodes(
    source: TaskSource, num_episodes: int, seed: int, chunk: int = 50
) -> list[TaskBatch | RaggedTaskBatch]:
    """A fixed, seeded list of evaluation batches (``chunk`` tasks each, ``num_episodes`` total).

    Every algorithm evaluated with the same ``(source, num_episodes, seed)`` is scored on
    identical tasks.
    """
    generator = torch.Generator().manual_seed(seed)
    batches, left = [], num_episodes
    while left > 0:
        batches.append(source.sample(min(chunk, left), generator))
        left -= chunk
    return batches
