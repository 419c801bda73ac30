"""A black-box recurrent meta-learner: an LSTM reads the support set, then labels the queries.

The simplest model-based learner and the baseline of the family: learning to learn with a
recurrent network (Hochreiter, Younger & Conwell, ICANN 2001), the idea RL² (Duan et al.,
2016) and "learning to reinforcement learn" (Wang et al., 2016) apply to reinforcement
learning, here in the supervised few-shot setting. Whatever the network learns from the
support set has to live in its hidden state:

    s_0 = 0,   s_i = RNN(s_{i-1}, [f(x_i), onehot(y_i)])      for the S support examples
    logits(x_q) = W h(RNN(s_S, [f(x_q), 0])) + b               for every query

``f`` is the backbone, ``RNN`` an LSTM (or a GRU, ``cell="gru"``) of ``layers`` layers and
``hidden_size`` units, ``h`` its top-layer output. Each query is one more step from the state
after the support set, with a zero label: queries never see each other. All tasks of a batch
are read in one call (tasks are the RNN's batch dimension) and all their queries in a second
(one step for ``T * Q`` sequences). Adaptation is reading the support set: the predictor keeps
the final state ``s_S``.

The output layer has ``n_way`` units: a trained model classifies tasks of that many classes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.algorithms.base import MetaLearner, TaskSpec, register
from metalab.algorithms.pertask import Statistics, check_batch_norm, embed_tasks
from metalab.models import feature_shape
from metalab.tasks import TaskBatch

State = Tensor | tuple[Tensor, Tensor]  # GRU: h; LSTM: (h, c); each [layers, batch, hidden]
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


def check_n_way(n_way: int, trained_n_way: int, name: str) -> None:
    """Model-based learners have one output (and label input) per class of their training
    tasks: a task with another number of classes is an error that says so."""
    if n_way != trained_n_way:
        raise ValueError(f"this {name} model was trained for {trained_n_way}-way tasks and "
                         f"cannot classify {n_way}-way tasks; evaluate it on "
                         f"{trained_n_way}-way tasks or train one for {n_way}-way tasks.")


def with_labels(features: Tensor, labels: Tensor | None, n_way: int) -> Tensor:
    """Sequence inputs ``[T, B, D + n_way]``: features ``[T, B, D]`` and one-hot ``labels``
    ``[T, B]``, or zeros (no label) when ``labels`` is None."""
    if labels is None:
        one_hot = features.new_zeros(*features.shape[:2], n_way)
    else:
        one_hot = F.one_hot(labels, n_way).to(features.dtype)
    return torch.cat([features, one_hot], -1)


def repeat_state(state: State, times: int) -> State:
    """Repeat each sequence's state ``times`` times along the batch dimension."""
    if isinstance(state, tuple):
        return tuple(s.repeat_interleave(times, dim=1) for s in state)
    return state.repeat_interleave(times, dim=1)


class EmbeddingLearner(MetaLearner):
    """A learner that embeds each task's examples with ``backbone``, each task on its own,
    its BatchNorm on running statistics or on each task's support statistics
    (``batch_norm``, see :func:`metalab.algorithms.pertask.embed_tasks`)."""

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
    ``[f(x_q), 0]`` is classified from that memory on its own (``query_logits``).
    ``meta_loss`` and ``adapt`` are the same for every such learner."""

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
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        accuracy = (logits.argmax(-1) == batch.query_y).float().mean()
        return loss, {"accuracy": accuracy.item()}

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


@register
class Recurrent(SequenceLearner):
    """An RNN (``cell``: ``"lstm"`` or ``"gru"``) reading (embedding, one-hot label) pairs.
    ``batch_norm="support"`` normalises every task with its support set's BatchNorm statistics
    (MetaBN, :mod:`metalab.models.support_statistics`) instead of running statistics."""

    name = "recurrent"
    family = "model"

    def __init__(
        self, backbone: nn.Module, spec: TaskSpec, cell: str = "lstm", hidden_size: int = 256,
        layers: int = 1, batch_norm: str = "running",
    ) -> None:
        super().__init__()
        self.batch_norm = check_batch_norm(batch_norm)
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}.")
        if hidden_size < 1 or layers < 1:
            raise ValueError(f"hidden_size and layers must be >= 1, got {hidden_size} and "
                             f"{layers}.")
        self.backbone = backbone
        self.n_way = spec.n_way
        inputs = math.prod(feature_shape(backbone, spec.input_shape)) + spec.n_way
        self.rnn = CELLS[cell](inputs, hidden_size, num_layers=layers, batch_first=True)
        self.output = nn.Linear(hidden_size, spec.n_way)

    def read_support(self, support: Tensor) -> State:
        """The RNN state after the support steps ``[T, S, C]`` of every task."""
        return self.rnn(support)[1]

    def query_logits(self, queries: Tensor, state: State) -> Tensor:
        """Logits ``[T, Q, n_way]``: each query step ``[T, Q, C]`` continues its task's
        ``state`` on its own."""
        num_tasks, num_queries = queries.shape[:2]
        out, _ = self.rnn(queries.reshape(num_tasks * num_queries, 1, -1),
                          repeat_state(state, num_queries))
        return self.output(out.view(num_tasks, num_queries, -1))
