"""SNAIL: a Simple Neural AttentIve meta-Learner (Mishra, Rohaninejad, Chen & Abbeel, ICLR 2018).

SNAIL reads a task as a sequence. Every support example becomes one step carrying its
embedding and its one-hot label; the query comes last with a zero label, and the network's
output at that last step is the query's class logits:

    (f(x_1), y_1), (f(x_2), y_2), ..., (f(x_S), y_S), (f(x_q), 0)  ->  logits(y_q)

``f`` is the backbone (Conv-4: 64 features on Omniglot). The sequence model interleaves two
causal blocks, each of which appends its output to its input along the channels:

* a **TC block** is a stack of dense blocks, each a causal 1-D convolution of kernel 2 with
  dilation ``d`` and a gated activation, ``x <- [x, tanh(W_f * x) ⊙ sigmoid(W_g * x)]``;
  ``ceil(log2 L)`` of them with dilations 1, 2, 4, ... cover a sequence of length
  ``L = N*K + 1``. (The paper's pseudo-code starts at dilation 2, which leaves odd distances
  to the attention blocks alone; starting at 1 lets the convolutions see every earlier step.)
* an **attention block** ``(key_size, value_size)`` is causal single-head soft attention,
  ``x <- [x, softmax(q k^T / sqrt(key_size)) v]``, each step reading itself and earlier steps.

For N-way Omniglot the paper stacks attention(64, 32), TC(L, 128), attention(256, 128),
TC(L, 128), attention(512, 256) and a 1x1 convolution to N logits: the defaults here
(``attention`` and ``filters``). The loss is cross-entropy at the query steps.

Queries are independent and the support set is read once. Since every block is causal, the
support steps never depend on a query; and a query at position ``S`` depends only on the
support steps and itself. So the support sequence is encoded once per task (with a cache per
block: the attention keys and values of the support steps, and for each convolution the one
support step it reaches back to), and then every query is processed as "one more step after
the support set", all queries of all tasks in parallel. That is exactly the paper's
one-query-per-sequence model (``[T*Q, S+1, D]`` sequences) without re-encoding the support set
``Q`` times, and no query sees another (which a single ``[T, S+Q, D]`` sequence would allow
through the convolutions). The predictor returned by ``adapt`` keeps those caches.

The output layer has ``n_way`` units, so a trained model handles tasks of that many classes;
``k_shot`` sizes the depth of the TC blocks (other shots work: attention still reads every
support step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.algorithms.base import TaskSpec, register
from metalab.algorithms.model_based import SequenceLearner
from metalab.algorithms.pertask import check_batch_norm
from metalab.models import feature_shape

Cache = Any  # what a block keeps of the support sequence for the query steps


class CausalAttention(nn.Module):
    """Causal soft attention ``(key_size, value_size)``; appends ``value_size`` channels."""

    def __init__(self, in_channels: int, key_size: int, value_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(in_channels, key_size)
        self.key = nn.Linear(in_channels, key_size)
        self.value = nn.Linear(in_channels, value_size)
        self.scale = 1.0 / math.sqrt(key_size)
        self.out_channels = in_channels + value_size

    def encode(self, support: Tensor) -> tuple[Tensor, Cache]:
        """Support steps ``[T, S, C]``: each attends to itself and the steps before it."""
        keys, values = self.key(support), self.value(support)
        logits = self.query(support) @ keys.transpose(1, 2) * self.scale
        steps = support.shape[1]
        future = torch.ones(steps, steps, dtype=torch.bool, device=support.device).triu(1)
        read = logits.masked_fill(future, -math.inf).softmax(-1) @ values
        return torch.cat([support, read], -1), (keys, values)

    def extend(self, queries: Tensor, cache: Cache) -> Tensor:
        """Query steps ``[T, Q, C]``, each one step after the support set: it attends to every
        support step and to itself, never to another query."""
        keys, values = cache
        query = self.query(queries)
        to_support = query @ keys.transpose(1, 2)  # [T, Q, S]
        to_self = (query * self.key(queries)).sum(-1, keepdim=True)  # [T, Q, 1]
        weights = (torch.cat([to_support, to_self], -1) * self.scale).softmax(-1)
        read = weights[..., :-1] @ values + weights[..., -1:] * self.value(queries)
        return torch.cat([queries, read], -1)


class DenseBlock(nn.Module):
    """Gated causal convolution (kernel 2, ``dilation``); appends ``filters`` channels."""

    def __init__(self, in_channels: int, filters: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, 2 * filters, kernel_size=2, dilation=dilation)
        self.dilation = dilation
        self.out_channels = in_channels + filters

    @staticmethod
    def gate(pre_activation: Tensor) -> Tensor:
        filters, gates = pre_activation.chunk(2, dim=-1)
        return torch.tanh(filters) * torch.sigmoid(gates)

    def encode(self, support: Tensor) -> tuple[Tensor, Cache]:
        """Support steps ``[T, S, C]``; the cache is the step a query reaches back to
        (``S - dilation``), or zeros (the causal padding) if the sequence is shorter."""
        padded = F.pad(support.transpose(1, 2), (self.dilation, 0))
        out = self.gate(self.conv(padded).transpose(1, 2))
        steps = support.shape[1]
        if steps >= self.dilation:
            reached = support[:, steps - self.dilation]
        else:
            reached = support.new_zeros(support.shape[0], support.shape[2])
        return torch.cat([support, out], -1), reached

    def extend(self, queries: Tensor, cache: Cache) -> Tensor:
        """Query steps ``[T, Q, C]`` at position ``S``: ``W_0 x_{S-d} + W_1 x_q + b``."""
        weight = self.conv.weight  # [2F, C, 2]: tap 0 is the earlier step, tap 1 the current
        earlier = F.linear(cache, weight[..., 0]).unsqueeze(1)  # [T, 1, 2F]
        out = self.gate(F.linear(queries, weight[..., 1], self.conv.bias) + earlier)
        return torch.cat([queries, out], -1)


class TCBlock(nn.Module):
    """``ceil(log2 length)`` dense blocks with dilations 1, 2, 4, ..."""

    def __init__(self, in_channels: int, length: int, filters: int) -> None:
        super().__init__()
        layers = max(1, math.ceil(math.log2(length)))
        self.blocks = nn.ModuleList()
        for i in range(layers):
            self.blocks.append(DenseBlock(in_channels, filters, 2**i))
            in_channels = self.blocks[-1].out_channels
        self.out_channels = in_channels

    def encode(self, support: Tensor) -> tuple[Tensor, Cache]:
        caches = []
        for block in self.blocks:
            support, cache = block.encode(support)
            caches.append(cache)
        return support, caches

    def extend(self, queries: Tensor, cache: Cache) -> Tensor:
        for block, block_cache in zip(self.blocks, cache, strict=True):
            queries = block.extend(queries, block_cache)
        return queries


@register
class SNAIL(SequenceLearner):
    """SNAIL: attention blocks ``attention`` (``(key_size, value_size)`` each) with a TC block
    of ``filters`` channels per layer between consecutive ones, then a linear layer to
    ``n_way`` logits. ``k_shot`` sizes the TC blocks for sequences of ``n_way * k_shot + 1``.
    ``batch_norm="support"`` normalises every task with its support set's BatchNorm statistics
    (MetaBN, :mod:`metalab.models.support_statistics`) instead of running statistics."""

    name = "snail"
    family = "model"
    check_options: ClassVar[dict[str, dict[str, Any]]] = {
        "*": {"attention": ((8, 8), (16, 8)), "filters": 8}}

    def __init__(
        self,
        backbone: nn.Module,
        spec: TaskSpec,
        attention: Sequence[Sequence[int]] = ((64, 32), (256, 128), (512, 256)),
        filters: int = 128,
        k_shot: int = 1,
        batch_norm: str = "running",
    ) -> None:
        super().__init__(spec)
        self.batch_norm = check_batch_norm(batch_norm)
        if not attention or any(len(sizes) != 2 or min(sizes) < 1 for sizes in attention):
            raise ValueError(f"attention must be a non-empty list of (key_size, value_size) "
                             f"pairs of positive sizes, got {attention!r}.")
        if filters < 1 or k_shot < 1:
            raise ValueError(f"filters and k_shot must be >= 1, got {filters} and {k_shot}.")
        self.backbone = backbone
        self.n_way = spec.n_way
        length = spec.n_way * k_shot + 1
        features = math.prod(feature_shape(backbone, spec.input_shape, spec.input_dtype))
        channels = features + spec.n_way
        self.blocks = nn.ModuleList()
        for i, (key_size, value_size) in enumerate(attention):
            if i > 0:
                self.blocks.append(TCBlock(channels, length, filters))
                channels = self.blocks[-1].out_channels
            self.blocks.append(CausalAttention(channels, key_size, value_size))
            channels = self.blocks[-1].out_channels
        self.output = nn.Linear(channels, spec.n_way)

    def read_support(self, support: Tensor) -> list[Cache]:
        """Run the support steps ``[T, S, C]`` through every block; the per-block caches."""
        caches = []
        for block in self.blocks:
            support, cache = block.encode(support)
            caches.append(cache)
        return caches

    def query_logits(self, queries: Tensor, caches: list[Cache]) -> Tensor:
        """Logits ``[T, Q, n_way]`` of query steps ``[T, Q, C]``, each after the support set."""
        for block, cache in zip(self.blocks, caches, strict=True):
            queries = block.extend(queries, cache)
        return self.output(queries)
