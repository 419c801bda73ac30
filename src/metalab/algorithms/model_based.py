"""The model-based family's shared base: learners that read a task's support set into a memory.

Every such learner embeds each task's examples with its backbone (:class:`EmbeddingLearner`;
BatchNorm on running statistics or on each task's support statistics), and most of them read
a task as a sequence (:class:`SequenceLearner`): the support steps ``[f(x_i), onehot(y_i)]``
give a memory (``read_support``: an RNN state, SNAIL's attention caches, MANN's external
memory), and each query step ``[f(x_q), 0]`` is scored from that memory on its own
(``query_logits``). ``meta_loss``, ``adapt`` and the predictor are written once, here; a new
sequence learner implements those two methods.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.algorithms.base import MetaLearner, check_n_way
from metalab.algorithms.pertask import Statistics, embed_tasks
from metalab.tasks import TaskBatch

__all__ = ["EmbeddingLearner", "SequenceLearner", "SequencePredictor", "check_n_way",
           "with_labels"]


def with_labels(features: Tensor, labels: Tensor | None, n_way: int) -> Tensor:
    """Sequence inputs ``[T, B, D + n_way]``: features ``[T, B, D]`` and one-hot ``labels``
    ``[T, B]``, or zeros (no label) when ``labels`` is None."""
    if labels is None:
        one_hot = features.new_zeros(*features.shape[:2], n_way)
    else:
        one_hot = F.one_hot(labels, n_way).to(features.dtype)
    return torch.cat([features, one_hot], -1)


SLOW_TO_LEARN = ("black-box learners need far more, and more diverse, tasks than the check's "
                 "40 steps on 20 classes to learn to compare rather than memorise classes; "
                 "tests/test_model_based.py::test_learns_diverse_few_shot_tasks checks them")


class EmbeddingLearner(MetaLearner):
    """A learner that embeds each task's examples with ``backbone``, each task on its own,
    its BatchNorm on running statistics or on each task's support statistics
    (``batch_norm``, see :func:`metalab.algorithms.pertask.embed_tasks`)."""

    check_exemptions: ClassVar[dict[str, str]] = {"check_learns": SLOW_TO_LEARN}
    fixed_ways = True  # one output (and label input) per class of the training tasks

    backbone: nn.Module
    batch_norm: str = "running"

    def embed(
        self, x: Tensor, num_support: int | None = None,
        recorded: list[Statistics] | None = None,
    ) -> tuple[Tensor, list[Statistics] | None]:
        """Embed ``[T, B, *shape]`` -> ``[T, B, D]``; with ``batch_norm="support"`` also the
        support statistics used."""
        return embed_tasks(self.backbone, x, self.batch_norm, num_support, recorded)


class SequenceLearner(EmbeddingLearner):
    """A model-based learner that reads a task as a sequence: the support steps
    ``[f(x_i), onehot(y_i)]`` give a memory (``read_support``), and each query step
    ``[f(x_q), 0]`` is scored from that memory on its own (``query_logits``). ``meta_loss``
    and ``adapt`` are the same for every such learner; the loss and score are the task
    kind's."""

    n_way: int

    def read_support(self, support: Tensor) -> Any:
        """What the learner keeps of the support steps ``[T, S, C]`` of every task."""
        raise NotImplementedError

    def query_logits(self, queries: Tensor, memory: Any) -> Tensor:
        """Logits ``[T, Q, n_way]`` of query steps ``[T, Q, C]``, each on its own."""
        raise NotImplementedError

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        check_n_way(batch.n_way, self.n_way, self.name)
        num_support = batch.support_x.shape[1]
        features, _ = self.embed(torch.cat([batch.support_x, batch.query_x], dim=1),
                                 num_support)
        support = with_labels(features[:, :num_support], batch.support_y, self.n_way)
        queries = with_labels(features[:, num_support:], None, self.n_way)
        logits = self.query_logits(queries, self.read_support(support))
        return self.kind.objective(logits, batch.query_y)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> SequencePredictor:
        check_n_way(int(support_y.max()) + 1, self.n_way, self.name)
        features, statistics = self.embed(support_x.unsqueeze(0))
        support = with_labels(features, support_y.unsqueeze(0), self.n_way)
        return SequencePredictor(self, self.read_support(support), statistics)


class SequencePredictor:
    """Classifies queries from the memory a sequence learner kept of one task's support set
    (and, with ``batch_norm="support"``, the support set's BatchNorm statistics)."""

    def __init__(self, model: SequenceLearner, memory: Any,
                 statistics: list[Statistics] | None = None) -> None:
        self.model, self.memory, self.statistics = model, memory, statistics

    def __call__(self, query_x: Tensor) -> Tensor:
        features, _ = self.model.embed(query_x.unsqueeze(0), recorded=self.statistics)
        queries = with_labels(features, None, self.model.n_way)
        return self.model.query_logits(queries, self.memory)[0]
