"""Conditional Neural Processes (Garnelo, Rosenbaum, Maddison, Ramalho, Saxton, Shanahan, Teh,
Rezende & Eslami, ICML 2018).

A CNP summarises the support set (its "context") in one vector and predicts every query from
that vector and the query's input:

    r_i = h([f(x_i), y_i])        encoder MLP, on every support pair
    r   = 1/S sum_i r_i           aggregation: a mean, so invariant to the support set's order
    g([r, f(x_q)])                decoder MLP, on every query

* **Regression**: ``g`` outputs a mean ``μ`` and ``σ = 0.1 + 0.9 softplus(s)`` (the paper's
  lower bound, which keeps the likelihood from collapsing onto a single point), and the loss is
  the Gaussian negative log-likelihood ``-log N(y_q; μ, σ²)`` of the query targets. The
  predictor returns ``μ``; ``predict_distribution`` returns the ``Normal(μ, σ)``.
* **Classification**: ``y_i`` is the one-hot label and the aggregation is per class:
  ``r_c`` is the mean encoding of class ``c``'s support examples. One decoder scores each
  pair ``g([r_c, f(x_q)])`` as class ``c``'s logit, so relabelling the classes permutes the
  logits alike. (A single mean over all support pairs with one decoder for all logits stayed
  at chance here: the decoder must then learn which part of ``r`` belongs to which label.)
  The loss is the cross-entropy, and ``predict_distribution`` returns the ``Categorical``.
  The one-hot label input is sized by ``n_way``: a trained model classifies tasks of that
  many classes.

``f`` is the backbone: it embeds images for classification, and for regression it is the
config's MLP over ``x`` (``backbone: mlp`` with ``hidden: []`` is the identity, i.e. the
paper's raw ``x``). The paper's 1-D regression networks are the defaults: an encoder of three
layers of 128 units and a decoder of five (four of 128 units, then the output layer). Tasks
are batched throughout (``[T, S, ...]`` tensors; the mean is over each task's support set).
Adaptation is computing ``r``: the predictor keeps it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Normal

from metalab.algorithms.base import MetaLearner, TaskSpec, check_n_way, register
from metalab.algorithms.model_based import SLOW_TO_LEARN
from metalab.algorithms.pertask import map_tasks
from metalab.kinds import TaskKind
from metalab.models import feature_shape
from metalab.tasks import TaskBatch


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers ``sizes[0] -> sizes[1] -> ...`` with a ReLU after all but the last."""
    layers: list[nn.Module] = []
    for width, out in itertools.pairwise(sizes):
        layers += [nn.Linear(width, out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@register
class CNP(MetaLearner):
    """Conditional Neural Process: encoder widths ``encoder_sizes`` (the last is the size of
    ``r``), decoder hidden widths ``decoder_sizes``; ``min_std`` is the floor of ``σ``."""

    name = "cnp"
    family = "model"
    pads_tasks = True
    fixed_ways = True
    check_options: ClassVar[dict[str, dict[str, Any]]] = {
        "*": {"encoder_sizes": (32, 32), "decoder_sizes": (32,)}}
    check_exemptions: ClassVar[dict[str, str]] = {"check_learns:classification": SLOW_TO_LEARN}

    @classmethod
    def supports(cls, kind: TaskKind) -> bool:
        """Class targets (one representation per class) and value targets (a Normal)."""
        return True

    def __init__(
        self, backbone: nn.Module, spec: TaskSpec,
        encoder_sizes: Sequence[int] = (128, 128, 128),
        decoder_sizes: Sequence[int] = (128, 128, 128, 128), min_std: float = 0.1,
    ) -> None:
        super().__init__(spec)
        if not encoder_sizes or min(encoder_sizes) < 1 or min(decoder_sizes, default=1) < 1:
            raise ValueError(f"encoder_sizes must be a non-empty list of positive widths and "
                             f"decoder_sizes a list of positive widths, got {encoder_sizes!r} "
                             f"and {decoder_sizes!r}.")
        if not 0.0 <= min_std < 1.0:
            raise ValueError(f"min_std must be in [0, 1), got {min_std}.")
        self.backbone = backbone
        self.n_way = spec.n_way
        self.min_std = min_std
        features = math.prod(feature_shape(backbone, spec.input_shape, spec.input_dtype))
        outputs = 1 if spec.kind.classes else 2 * spec.output_dim  # a class's logit | μ, σ
        targets = spec.outputs
        self.encoder = mlp([features + targets, *encoder_sizes])
        self.decoder = mlp([encoder_sizes[-1] + features, *decoder_sizes, outputs])

    def embed(self, x: Tensor) -> Tensor:
        """Embed ``[T, B, *shape]`` -> ``[T, B, D]``, each task on its own (``map_tasks``)."""
        return map_tasks(self.backbone, x).reshape(*x.shape[:2], -1)

    def represent(self, features: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """``r`` of support sets: features ``[T, S, D]``, targets ``[T, S, ...]``; ``[T, 1, R]``
        for regression, ``[T, N, R]`` (one mean per class) for classification, whose class
        indices are encoded one-hot. With ``mask`` ``[T, S]`` only the marked pairs count."""
        if not self.kind.classes:
            encoded = self.encoder(torch.cat([features, y], -1))
            if mask is None:
                return encoded.mean(1, keepdim=True)
            weights = mask.unsqueeze(-1).to(encoded.dtype)
            return (encoded * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True)
        onehot = F.one_hot(y, self.n_way).to(features.dtype)  # [T, S, N]
        if mask is not None:
            onehot = onehot * mask.unsqueeze(-1)
        encoded = self.encoder(torch.cat([features, onehot], -1))  # [T, S, R]
        counts = onehot.sum(1).clamp_min(1).unsqueeze(-1)  # [T, N, 1]
        return onehot.transpose(1, 2) @ encoded / counts

    def decode(self, representation: Tensor, features: Tensor) -> Tensor:
        """Decoder outputs of query features ``[T, Q, D]``: ``[T, Q, 2 * output_dim]``
        (regression) or the logits ``[T, Q, N]`` (classification)."""
        if not self.kind.classes:
            r = representation.expand(-1, features.shape[1], -1)
            return self.decoder(torch.cat([r, features], -1))
        (tasks, queries, _), classes = features.shape, representation.shape[1]
        pairs = torch.cat([representation.unsqueeze(1).expand(-1, queries, -1, -1),
                           features.unsqueeze(2).expand(-1, -1, classes, -1)], -1)
        return self.decoder(pairs).reshape(tasks, queries, classes)

    def distribution(self, output: Tensor) -> Distribution:
        """The predictive distribution a decoder output stands for."""
        if self.kind.classes:
            return Categorical(logits=output)
        mean, raw_std = output.chunk(2, dim=-1)
        return Normal(mean, self.min_std + (1 - self.min_std) * F.softplus(raw_std))

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        if self.kind.classes:
            check_n_way(batch.n_way, self.n_way, self.name)
        num_support = batch.support_x.shape[1]
        features = self.embed(torch.cat([batch.support_x, batch.query_x], dim=1))
        representation = self.represent(features[:, :num_support], batch.support_y,
                                        batch.support_mask)
        output = self.decode(representation, features[:, num_support:])
        mask = batch.query_mask
        if self.kind.classes:
            return self.kind.objective(output, batch.query_y, mask)
        predicted = self.distribution(output)
        nll = -predicted.log_prob(batch.query_y)
        if mask is None:
            loss = nll.mean()
        else:  # each task's mean over its own queries, then the mean over tasks
            weights = mask.to(nll.dtype)
            loss = ((nll.flatten(2).mean(-1) * weights).sum(1) / weights.sum(1)).mean()
        return loss, self.kind.metrics(predicted.mean, batch.query_y, mask)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> CNPPredictor:
        if self.kind.classes:
            check_n_way(int(support_y.max()) + 1, self.n_way, self.name)
        features = self.embed(support_x.unsqueeze(0))
        return CNPPredictor(self, self.represent(features, support_y.unsqueeze(0)))


class CNPPredictor:
    """Predicts queries from one task's representation ``r``: the mean (regression) or the
    logits (classification); :meth:`predict_distribution` gives the whole distribution."""

    def __init__(self, model: CNP, representation: Tensor) -> None:
        self.model, self.representation = model, representation

    def output(self, query_x: Tensor) -> Tensor:
        return self.model.decode(self.representation, self.model.embed(query_x.unsqueeze(0)))[0]

    def predict_distribution(self, query_x: Tensor) -> Distribution:
        """``Normal`` (``.mean``, ``.stddev``, ``.variance``) per query target for regression,
        ``Categorical`` over the classes for classification."""
        return self.model.distribution(self.output(query_x))

    def __call__(self, query_x: Tensor) -> Tensor:
        output = self.output(query_x)
        if self.model.kind.classes:
            return output
        return self.model.distribution(output).mean
