"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

Each class is represented by the mean embedding of its support examples (its prototype);
a query is classified by a softmax over negative distances to the prototypes:

    c_n = 1/K sum_k f(x_{n,k}),    p(y = n | x) = softmax_n(-d(f(x), c_n))

with d the squared Euclidean distance (the paper's choice) or, optionally, a scaled
negative cosine similarity. Adaptation is computing the prototypes: no gradient steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.algorithms.base import MetaLearner, TaskSpec, register
from metalab.algorithms.pertask import map_tasks
from metalab.tasks import TaskBatch


def class_means(features: Tensor, labels: Tensor, n_way: int, mask: Tensor | None = None,
                ) -> Tensor:
    """Per-task mean feature of each class: ``[T, S, D]``, ``[T, S]`` -> ``[T, N, D]``; with
    ``mask`` ``[T, S]`` only the marked examples count (padded support sets)."""
    one_hot = F.one_hot(labels, n_way).to(features.dtype)  # [T, S, N]
    if mask is not None:
        one_hot = one_hot * mask.unsqueeze(-1)
    return one_hot.transpose(1, 2) @ features / one_hot.sum(1).unsqueeze(-1)


def prototype_logits(
    queries: Tensor, prototypes: Tensor, metric: str, scale: Tensor | None = None
) -> Tensor:
    """Logits ``[T, Q, N]`` of queries ``[T, Q, D]`` against prototypes ``[T, N, D]``."""
    if metric == "euclidean":
        return -torch.cdist(queries, prototypes).pow(2)
    return scale * F.normalize(queries, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)


@register
class ProtoNet(MetaLearner):
    """Prototypical Networks; ``metric`` is ``"euclidean"`` (squared) or ``"cosine"``, whose
    similarities are multiplied by a learned temperature starting at ``scale``."""

    name = "protonet"
    family = "metric"
    pads_tasks = True

    def __init__(self, backbone: nn.Module, spec: TaskSpec, metric: str = "euclidean",
                 scale: float = 10.0) -> None:
        super().__init__(spec)
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}.")
        self.backbone = backbone
        self.metric = metric
        # Cosine similarities live in [-1, 1]: a learned temperature makes the softmax sharp.
        self.scale = nn.Parameter(torch.tensor(float(scale))) if metric == "cosine" else None

    def embed(self, x: Tensor) -> Tensor:
        """Embed ``[T, B, *shape]`` -> ``[T, B, D]``, each task on its own (``map_tasks``)."""
        return map_tasks(self.backbone, x).reshape(*x.shape[:2], -1)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        # Support and query are embedded by separate calls, as adapt() and the predictor do:
        # in training mode BatchNorm then normalises the support set with its own statistics,
        # so the prototypes do not depend on the queries. (Also measured faster on this CPU
        # than one call over both: two batches of 300 glyphs against one of 600.)
        prototypes = class_means(self.embed(batch.support_x), batch.support_y, batch.n_way,
                                 batch.support_mask)
        queries = self.embed(batch.query_x)
        logits = prototype_logits(queries, prototypes, self.metric, self.scale)
        return self.kind.objective(logits, batch.query_y, batch.query_mask)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> PrototypePredictor:
        n_way = int(support_y.max()) + 1
        features = self.embed(support_x.unsqueeze(0))
        return PrototypePredictor(self, class_means(features, support_y.unsqueeze(0), n_way))


class PrototypePredictor:
    """Classifies queries against the prototypes of one task."""

    def __init__(self, model: ProtoNet, prototypes: Tensor) -> None:
        self.model, self.prototypes = model, prototypes

    def __call__(self, query_x: Tensor) -> Tensor:
        queries = self.model.embed(query_x.unsqueeze(0))
        return prototype_logits(queries, self.prototypes, self.model.metric, self.model.scale)[0]
