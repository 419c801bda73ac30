"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016).

A query ``x`` is labelled by attention over the support set ``S = {(x_i, y_i)}``: the predicted
class distribution is the attention-weighted sum of the one-hot support labels,

    P(y | x, S) = sum_i a(x, x_i) y_i,    a(x, x_i) = softmax_i(s * cos(f(x), g(x_i)))

and the loss is the negative log-likelihood ``-log P(y_true | x, S)`` of the query labels.
``log P`` is computed as a log-sum-exp over each class's support examples minus one over all of
them: it equals ``log`` of the sum above but never underflows to ``log 0``, so no clamp is
needed and the gradient of a confidently wrong query does not vanish.

Temperature ``s``: the paper uses the plain cosine (``s = 1``), whose softmax over values in
[-1, 1] can never be confident (5-way 1-shot: at most 0.65 on the right class). Here ``s`` is a
learned scalar initialised to ``scale`` (default 10, as ProtoNet's cosine metric) unless
``learn_scale=False`` fixes it; ``scale=1.0, learn_scale=False`` is the paper exactly (Chen et
al. 2019's re-implementation uses ``100 * relu(cos)``).

Without full-context embeddings (``fce=False``) ``f = g`` = the backbone. With ``fce=True``
(the paper's appendix), the backbone gives ``f' = g'`` and

    g(x_i, S) = g'(x_i) + h_fwd_i + h_bwd_i         bidirectional LSTM over the support sequence
    f(x, S)   = h_K, where for k = 1..K (K = ``fce_steps``):
        h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})
        h_k       = h^_k + f'(x)
        r_k       = sum_i softmax_i(h_k . g(x_i, S)) g(x_i, S)

with ``h_0 = c_0 = 0`` and ``r_0`` the uniform read (the mean of ``g(S)``). LSTM gates are linear
in (input, hidden), so conditioning on ``[h_{k-1}, r_{k-1}]`` is implemented as an LSTM cell of
hidden size D whose input is ``[f'(x), r_{k-1}]``. The support encoding depends on the order of
the support set (an LSTM reads it as a sequence); the query encoding does not (attention reads
``g(S)`` as a set). Adaptation is encoding the support set: no gradient steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.algorithms.base import MetaLearner, TaskSpec, register
from metalab.algorithms.pertask import map_tasks
from metalab.models import feature_shape
from metalab.tasks import TaskBatch


def matching_log_probs(
    queries: Tensor, support: Tensor, labels: Tensor, n_way: int, scale: Tensor
) -> Tensor:
    """``log P(y | x, S)`` ``[T, Q, N]`` for queries ``[T, Q, D]``, support ``[T, S, D]``.

    ``labels`` ``[T, S]`` are the support labels; a class with no support example gets ``-inf``
    (probability 0). Memory is O(T Q S), not O(T Q S N) as a masked log-sum-exp would be.
    """
    similarity = F.normalize(queries, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)
    logits = scale * similarity  # [T, Q, S]
    index = labels.unsqueeze(1).expand_as(logits)
    # log sum_{i: y_i = n} exp(logit_i), shifted by class n's best logit so that no class sum
    # underflows; the shift cancels mathematically, so it is a constant for the gradient.
    shift = logits.new_full((*logits.shape[:2], n_way), -math.inf)
    shift = shift.scatter_reduce(2, index, logits.detach(), "amax")
    sums = torch.zeros_like(shift).scatter_add(2, index, (logits - shift.gather(2, index)).exp())
    return sums.log() + shift - torch.logsumexp(logits, dim=2, keepdim=True)


@register
class MatchingNet(MetaLearner):
    """Matching Networks; ``fce`` adds full-context embeddings with ``fce_steps`` read steps.

    ``scale`` is the (initial) cosine temperature, learned unless ``learn_scale=False``.
    """

    name = "matchingnet"
    family = "metric"

    def __init__(
        self,
        backbone: nn.Module,
        spec: TaskSpec,
        fce: bool = False,
        fce_steps: int = 10,
        scale: float = 10.0,
        learn_scale: bool = True,
    ) -> None:
        super().__init__(spec)
        if fce_steps < 1:
            raise ValueError(f"fce_steps must be >= 1, got {fce_steps}.")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        self.backbone = backbone
        self.fce, self.fce_steps = fce, fce_steps
        initial = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(initial)
        else:
            self.register_buffer("scale", initial)
        if fce:
            dim = math.prod(feature_shape(backbone, spec.input_shape, spec.input_dtype))
            self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
            self.query_lstm = nn.LSTMCell(2 * dim, dim)

    def embed(self, x: Tensor) -> Tensor:
        """Embed ``[T, B, *shape]`` -> ``[T, B, D]``, each task on its own (``map_tasks``)."""
        return map_tasks(self.backbone, x).reshape(*x.shape[:2], -1)

    def encode_support(self, support: Tensor) -> Tensor:
        """``g(S)``: support embeddings ``[T, S, D]``, contextualised by a BiLSTM under FCE."""
        if not self.fce:
            return support
        forward, backward = self.support_lstm(support)[0].chunk(2, dim=-1)
        return support + forward + backward

    def encode_queries(self, queries: Tensor, support: Tensor) -> Tensor:
        """``f(x, S)``: query embeddings ``[T, Q, D]`` after ``fce_steps`` reads of ``g(S)``."""
        if not self.fce:
            return queries
        num_tasks, num_queries, dim = queries.shape
        x = queries.reshape(-1, dim)
        h, c = torch.zeros_like(x), torch.zeros_like(x)
        read = support.mean(1, keepdim=True).expand(-1, num_queries, -1).reshape(-1, dim)
        for _ in range(self.fce_steps):
            h_hat, c = self.query_lstm(torch.cat([x, read], dim=-1), (h, c))
            h = h_hat + x
            attention = (h.view(num_tasks, num_queries, dim) @ support.transpose(1, 2)).softmax(-1)
            read = (attention @ support).reshape(-1, dim)
        return h.view(num_tasks, num_queries, dim)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        num_support = batch.support_x.shape[1]
        features = self.embed(torch.cat([batch.support_x, batch.query_x], dim=1))
        support = self.encode_support(features[:, :num_support])
        queries = self.encode_queries(features[:, num_support:], support)
        log_probs = matching_log_probs(queries, support, batch.support_y, batch.n_way, self.scale)
        # The paper's loss on the attention's log-probabilities; the score is the kind's.
        loss = F.nll_loss(log_probs.flatten(0, 1), batch.query_y.flatten())
        return loss, self.kind.metrics(log_probs, batch.query_y)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> MatchingPredictor:
        n_way = int(support_y.max()) + 1
        support = self.encode_support(self.embed(support_x.unsqueeze(0)))
        return MatchingPredictor(self, support, support_y.unsqueeze(0), n_way)


class MatchingPredictor:
    """Classifies queries by attention over one task's (encoded) support set.

    The logits are ``log P(y | x, S)``, so their softmax is the paper's class distribution.
    """

    def __init__(self, model: MatchingNet, support: Tensor, labels: Tensor, n_way: int) -> None:
        self.model, self.support, self.labels, self.n_way = model, support, labels, n_way

    def __call__(self, query_x: Tensor) -> Tensor:
        queries = self.model.encode_queries(self.model.embed(query_x.unsqueeze(0)), self.support)
        log_probs = matching_log_probs(
            queries, self.support, self.labels, self.n_way, self.model.scale
        )
        return log_probs[0]
