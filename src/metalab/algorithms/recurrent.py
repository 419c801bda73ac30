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
from typing import Any, ClassVar

from torch import Tensor, nn

from metalab.algorithms.base import TaskSpec, register
from metalab.algorithms.model_based import SequenceLearner
from metalab.algorithms.pertask import check_batch_norm
from metalab.models import feature_shape

State = Tensor | tuple[Tensor, Tensor]  # GRU: h; LSTM: (h, c); each [layers, batch, hidden]
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


def repeat_state(state: State, times: int) -> State:
    """Repeat each sequence's state ``times`` times along the batch dimension."""
    if isinstance(state, tuple):
        return tuple(s.repeat_interleave(times, dim=1) for s in state)
    return state.repeat_interleave(times, dim=1)


@register
class Recurrent(SequenceLearner):
    """An RNN (``cell``: ``"lstm"`` or ``"gru"``) reading (embedding, one-hot label) pairs.
    ``batch_norm="support"`` normalises every task with its support set's BatchNorm statistics
    (MetaBN, :mod:`metalab.models.support_statistics`) instead of running statistics."""

    name = "recurrent"
    family = "model"
    check_options: ClassVar[dict[str, dict[str, Any]]] = {"*": {"hidden_size": 32}}

    def __init__(
        self, backbone: nn.Module, spec: TaskSpec, cell: str = "lstm", hidden_size: int = 256,
        layers: int = 1, batch_norm: str = "running",
    ) -> None:
        super().__init__(spec)
        self.batch_norm = check_batch_norm(batch_norm)
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}.")
        if hidden_size < 1 or layers < 1:
            raise ValueError(f"hidden_size and layers must be >= 1, got {hidden_size} and "
                             f"{layers}.")
        self.backbone = backbone
        self.n_way = spec.n_way
        inputs = math.prod(feature_shape(backbone, spec.input_shape, spec.input_dtype)) + spec.n_way
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
