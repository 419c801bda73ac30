"""MANN: a Memory-Augmented Neural Network (Santoro, Bartunov, Botvinick, Wierstra & Lillicrap,
ICML 2016).

An LSTM controller reads the task one example at a time and keeps what it needs in an
external memory ``M`` (``memory_slots`` rows of ``memory_width``), which it reads by content
and writes with least-recently-used access (LRUA). At step ``t``, with ``h_t`` the
controller's output and ``k_t = tanh(W_k h_t)`` one key per read head:

    input         [f(x_t), onehot(y_{t-1}), r_{t-1}]             (the label comes one step late)
    write weights w^w_t = σ(α) w^r_{t-1} + (1 - σ(α)) w^lu_{t-1}  (previously read, or unused)
    memory        M_t   = M_{t-1} with its least-used rows zeroed, + sum_heads w^w_t k_t^T
    read weights  w^r_t = softmax_i(cos(k_t, M_t(i)))
    read          r_t   = sum_i w^r_t(i) M_t(i)
    usage         w^u_t = γ w^u_{t-1} + w^r_t + w^w_t              (summed over heads)
    output        logits_t = W_o [h_t, r_t]

``w^lu_{t-1}`` points at the least-used rows of ``w^u_{t-1}``: with ``read_heads`` heads, head
``i`` gets the ``i``-th least used row (one fresh row per head), and those rows are zeroed
before the write, as in the paper. ``α`` is a learned scalar per head. The paper's Omniglot
model: an LSTM of 200 units, 128 x 40 memory, 4 read heads; the defaults here.

Labels arrive one step late, as in the paper: support example ``t`` comes with the label of
example ``t - 1``, and one more step (a zero image with the last support label) delivers the
last label, so that every support pair is in memory when the queries come. Each query is then
one more step with a zero label, continuing the state after the support set on its own: its
write lands in its own copy of the memory, so queries never see each other. All tasks of a
batch run together (tasks are the batch dimension of every step), and then all their queries
in one step (``T * Q`` branches). Adaptation is running the support steps: the predictor
keeps the controller state and the memory.

The output layer has ``n_way`` units: a trained model classifies tasks of that many classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.algorithms.base import TaskSpec, register
from metalab.algorithms.model_based import SequenceLearner
from metalab.algorithms.pertask import check_batch_norm
from metalab.models import feature_shape

INITIAL_MEMORY = 1e-6  # the memory starts (almost) empty; nonzero so that cosines are defined


@dataclass
class MemoryState:
    """Everything a MANN carries from one step to the next, for a batch of ``B`` sequences."""

    hidden: Tensor  # controller output h  [B, H]
    cell: Tensor  # controller cell c    [B, H]
    memory: Tensor  # M                  [B, slots, width]
    read_weights: Tensor  # w^r          [B, heads, slots]
    usage: Tensor  # w^u                 [B, slots]
    reads: Tensor  # r                   [B, heads * width]

    def repeat(self, times: int) -> MemoryState:
        """Each sequence's state ``times`` times in a row (one branch per query)."""
        return MemoryState(*(t.repeat_interleave(times, dim=0) for t in vars(self).values()))


@register
class MANN(SequenceLearner):
    """Memory-augmented LSTM with LRUA writes and cosine-similarity reads.
    ``batch_norm="support"`` normalises every task with its support set's BatchNorm statistics
    (MetaBN, :mod:`metalab.models.support_statistics`) instead of running statistics."""

    name = "mann"
    family = "model"
    check_options: ClassVar[dict[str, dict[str, Any]]] = {"*": {
        "controller_size": 32, "memory_slots": 8, "memory_width": 8, "read_heads": 2}}

    def __init__(
        self, backbone: nn.Module, spec: TaskSpec, controller_size: int = 200,
        memory_slots: int = 128, memory_width: int = 40, read_heads: int = 4,
        usage_decay: float = 0.95, batch_norm: str = "running",
    ) -> None:
        super().__init__(spec)
        self.batch_norm = check_batch_norm(batch_norm)
        if min(controller_size, memory_slots, memory_width, read_heads) < 1:
            raise ValueError("controller_size, memory_slots, memory_width and read_heads must "
                             "be >= 1.")
        if read_heads > memory_slots:
            raise ValueError(f"read_heads ({read_heads}) cannot exceed memory_slots "
                             f"({memory_slots}): each head writes to its own least-used row.")
        if not 0.0 <= usage_decay <= 1.0:
            raise ValueError(f"usage_decay must be in [0, 1], got {usage_decay}.")
        self.backbone = backbone
        self.n_way = spec.n_way
        self.slots, self.width, self.heads = memory_slots, memory_width, read_heads
        self.usage_decay = usage_decay
        features = math.prod(feature_shape(backbone, spec.input_shape, spec.input_dtype))
        self.controller = nn.LSTMCell(features + spec.n_way + read_heads * memory_width,
                                      controller_size)
        self.key = nn.Linear(controller_size, read_heads * memory_width)
        self.write_gate = nn.Parameter(torch.zeros(read_heads))  # α, one per head
        self.output = nn.Linear(controller_size + read_heads * memory_width, spec.n_way)

    def initial_state(self, batch: int, reference: Tensor) -> MemoryState:
        """Empty controller and memory for ``batch`` sequences (dtype/device of ``reference``)."""
        zeros = reference.new_zeros
        return MemoryState(
            hidden=zeros(batch, self.controller.hidden_size),
            cell=zeros(batch, self.controller.hidden_size),
            memory=reference.new_full((batch, self.slots, self.width), INITIAL_MEMORY),
            read_weights=zeros(batch, self.heads, self.slots),
            usage=zeros(batch, self.slots),
            reads=zeros(batch, self.heads * self.width),
        )

    def step(self, inputs: Tensor, state: MemoryState) -> MemoryState:
        """One step for a batch: ``inputs`` ``[B, D + n_way]`` (features, one-hot label)."""
        hidden, cell = self.controller(torch.cat([inputs, state.reads], -1),
                                       (state.hidden, state.cell))
        keys = torch.tanh(self.key(hidden)).view(-1, self.heads, self.width)
        # LRUA: head i writes to the row it read last step and/or the i-th least-used row.
        least_used = F.one_hot(state.usage.topk(self.heads, largest=False).indices,
                               self.slots).to(keys.dtype)  # [B, heads, slots]
        gate = torch.sigmoid(self.write_gate).view(1, -1, 1)
        write_weights = gate * state.read_weights + (1 - gate) * least_used
        memory = state.memory * (1 - least_used.sum(1).unsqueeze(-1))  # zero those rows
        memory = memory + write_weights.transpose(1, 2) @ keys
        similarity = F.normalize(keys, dim=-1) @ F.normalize(memory, dim=-1).transpose(1, 2)
        read_weights = similarity.softmax(-1)  # [B, heads, slots]
        reads = (read_weights @ memory).flatten(1)
        usage = self.usage_decay * state.usage + read_weights.sum(1) + write_weights.sum(1)
        return MemoryState(hidden, cell, memory, read_weights, usage, reads)

    def read_support(self, support: Tensor) -> MemoryState:
        """Run the support steps ``[T, S, D + n_way]`` (features, one-hot labels) of every
        task, labels one step late, plus the step that delivers the last label."""
        features, one_hot = support[..., :-self.n_way], support[..., -self.n_way:]
        num_tasks, num_support = support.shape[:2]
        previous_labels = F.pad(one_hot, (0, 0, 1, 0))  # [T, S + 1, N]: zeros, y_0, ..., y_S-1
        images = F.pad(features, (0, 0, 0, 1))  # [T, S + 1, D]: the last step has no image
        inputs = torch.cat([images, previous_labels], -1)
        state = self.initial_state(num_tasks, features)
        for t in range(num_support + 1):
            state = self.step(inputs[:, t], state)
        return state

    def query_logits(self, queries: Tensor, state: MemoryState) -> Tensor:
        """Logits ``[T, Q, n_way]``: each query step ``[T, Q, D + n_way]`` (zero label) is
        one step after its task's support ``state``, on its own copy of the state."""
        num_tasks, num_queries = queries.shape[:2]
        after = self.step(queries.flatten(0, 1), state.repeat(num_queries))
        logits = self.output(torch.cat([after.hidden, after.reads], -1))
        return logits.view(num_tasks, num_queries, -1)
