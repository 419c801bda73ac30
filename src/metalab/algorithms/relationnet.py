"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, CVPR 2018).

An embedding module ``f`` (the backbone) maps every image to a feature map; each class is
represented by the element-wise sum (the paper) or mean of its support feature maps, and a
learned relation module ``g`` scores every (class, query) pair from their concatenation along
the channel axis:

    c_n  = sum_k f(x_{n,k})             (``aggregate="sum"``; ``"mean"`` divides by K)
    r_qn = g(C(c_n, f(x_q))) in [0, 1]  (C: channel concatenation; g ends in a sigmoid)

trained by regressing the relation scores to one-hot labels,
``L = mean_{q,n} (r_qn - 1[y_q = n])^2`` (``loss="mse"``, the paper's, which sums rather than
averages), or with ``loss="ce"``: softmax cross-entropy over the relation module's
pre-sigmoid outputs. The predictor returns the relation scores ``r`` as logits (same argmax
either way).

``g`` follows the paper: two blocks of 3x3 conv (64 channels, padding 1), BatchNorm, ReLU and
2x2 max-pool, then FC 8, ReLU, FC 1 and a sigmoid. It is sized from the backbone's feature
shape when the algorithm is built, and a block pools only while the map is at least 2x2, so a
7x7 map (Conv4 with ``pool_blocks=2`` on 28x28 Omniglot) becomes 3x3 then 1x1. For the paper's
Omniglot embedding pass ``backbone: conv4`` with ``pool_blocks: 2, flatten: false``.

A backbone that gives flat vectors (any feature shape that is not ``[C, H, W]``, flattened)
gets an MLP relation module instead, with the same shape: two blocks of Linear (64), BatchNorm,
ReLU, then FC 8, ReLU, FC 1 and the sigmoid. That is not in the paper.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.algorithms.base import MetaLearner, TaskSpec, register
from metalab.algorithms.pertask import map_tasks
from metalab.models import conv_block, feature_shape
from metalab.tasks import TaskBatch

HIDDEN = 64  # channels (or units) of the relation module's two blocks, as in the paper
FC_HIDDEN = 8  # width of its hidden fully connected layer, as in the paper


def class_features(features: Tensor, labels: Tensor, n_way: int, aggregate: str) -> Tensor:
    """Per-task class representations: ``[T, S, *F]``, ``[T, S]`` -> ``[T, N, *F]``."""
    one_hot = F.one_hot(labels, n_way).to(features.dtype)  # [T, S, N]
    if aggregate == "mean":
        one_hot = one_hot / one_hot.sum(1, keepdim=True)
    summed = one_hot.transpose(1, 2) @ features.flatten(2)
    return summed.view(*summed.shape[:2], *features.shape[2:])


def relation_module(shape: tuple[int, ...]) -> nn.Sequential:
    """The relation module ``g`` (pre-sigmoid) for pairs of features of shape ``shape``."""
    layers: list[nn.Module] = []
    if len(shape) == 3:
        channels, height, width = shape
        in_channels = 2 * channels
        for _ in range(2):
            pool = min(height, width) >= 2
            layers.append(conv_block(in_channels, HIDDEN, pool))
            in_channels = HIDDEN
            if pool:
                height, width = height // 2, width // 2
        layers.append(nn.Flatten())
        flat = HIDDEN * height * width
    else:
        flat = 2 * math.prod(shape)
        for _ in range(2):
            layers += [nn.Linear(flat, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU()]
            flat = HIDDEN
    return nn.Sequential(*layers, nn.Linear(flat, FC_HIDDEN), nn.ReLU(), nn.Linear(FC_HIDDEN, 1))


@register
class RelationNet(MetaLearner):
    """Relation Networks; ``aggregate`` is ``"sum"`` (paper) or ``"mean"``, ``loss`` is
    ``"mse"`` (paper) or ``"ce"``."""

    name = "relationnet"
    family = "metric"
    check_backbone_options: ClassVar[dict[str, Any]] = {"pool_blocks": 2, "flatten": False}

    def __init__(
        self, backbone: nn.Module, spec: TaskSpec, aggregate: str = "sum", loss: str = "mse"
    ) -> None:
        super().__init__(spec)
        if aggregate not in ("sum", "mean"):
            raise ValueError(f"aggregate must be 'sum' or 'mean', got {aggregate!r}.")
        if loss not in ("mse", "ce"):
            raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}.")
        self.backbone = backbone
        self.aggregate, self.loss = aggregate, loss
        shape = feature_shape(backbone, spec.input_shape, spec.input_dtype)
        # Feature maps keep their [C, H, W] shape; anything else is treated as a flat vector.
        self.feature_shape = shape if len(shape) == 3 else (math.prod(shape),)
        self.relation = relation_module(self.feature_shape)

    def embed(self, x: Tensor) -> Tensor:
        """Embed ``[T, B, *shape]`` -> ``[T, B, *feature_shape]``, each task on its own."""
        return map_tasks(self.backbone, x).reshape(*x.shape[:2], *self.feature_shape)

    def relations(self, classes: Tensor, queries: Tensor) -> Tensor:
        """Pre-sigmoid relations ``[T, Q, N]`` of queries ``[T, Q, *F]`` to classes ``[T, N, *F]``.

        The ``Q * N`` pairs of a task go through the relation module in one call (its
        BatchNorm normalises each task on its own, see ``map_tasks``).
        """
        num_tasks, num_queries, n_way = queries.shape[0], queries.shape[1], classes.shape[1]
        expanded = (num_tasks, num_queries, n_way, *self.feature_shape)
        pairs = torch.cat(
            [classes.unsqueeze(1).expand(expanded), queries.unsqueeze(2).expand(expanded)], dim=3
        )
        scores = map_tasks(self.relation, pairs.flatten(1, 2))
        return scores.view(num_tasks, num_queries, n_way)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        num_support = batch.support_x.shape[1]
        features = self.embed(torch.cat([batch.support_x, batch.query_x], dim=1))
        classes = class_features(
            features[:, :num_support], batch.support_y, batch.n_way, self.aggregate
        )
        relations = self.relations(classes, features[:, num_support:])
        if self.loss == "mse":
            target = F.one_hot(batch.query_y, batch.n_way).to(relations.dtype)
            loss = F.mse_loss(relations.sigmoid(), target)
        else:
            loss = self.kind.loss(relations, batch.query_y)
        return loss, self.kind.metrics(relations, batch.query_y)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> RelationPredictor:
        n_way = int(support_y.max()) + 1
        features = self.embed(support_x.unsqueeze(0))
        classes = class_features(features, support_y.unsqueeze(0), n_way, self.aggregate)
        return RelationPredictor(self, classes)


class RelationPredictor:
    """Scores queries against the class representations of one task; logits are in [0, 1]."""

    def __init__(self, model: RelationNet, classes: Tensor) -> None:
        self.model, self.classes = model, classes

    def __call__(self, query_x: Tensor) -> Tensor:
        queries = self.model.embed(query_x.unsqueeze(0))
        return self.model.relations(self.classes, queries)[0].sigmoid()
