"""The transfer-learning baseline: pretrain on all training classes, fine-tune a new head.

This is what meta-learning is compared to: Baseline and Baseline++ of Chen, Liu, Kira, Wang &
Huang, "A Closer Look at Few-shot Classification" (ICLR 2019), and the "pretrained on all
tasks, then fine-tuned" baseline of Finn, Abbeel & Levine (MAML, ICML 2017).

Meta-training is plain supervised learning. A classifier over all ``spec.num_classes``
meta-training classes sits on the backbone ``f`` and is trained with cross-entropy on every
image of the batch, support and query alike, using the global class ids
``batch.classes.gather(1, labels)``; the episode structure is ignored.

Adaptation to an N-way task fits a NEW head on the support set ``{(x_i, y_i)}``:

    min_{W, b} 1/|S| sum_i CE(h(f(x_i)), y_i)

by ``finetune_steps`` full-batch Adam steps of learning rate ``finetune_lr``, with ``f``
frozen (its support features are computed once). The head ``h`` is

- ``head="linear"`` (Baseline): ``h(z) = W z + b``, initialised at zero (the problem is convex,
  so a fixed start loses nothing and makes the predictor a function of the support set);
- ``head="cosine"`` (Baseline++): ``h(z)_n = s * cos(z, w_n)`` with a fixed scale
  ``s = cosine_scale``, initialised with the normalised class means of the support features
  (weight imprinting, Qi et al. 2018), so 0 steps is already a nearest-class-mean classifier.
  The pretraining classifier is a cosine classifier too, as in Baseline++. Chen et al. fix
  ``s = 2`` for up to 200 classes and ``s = 10`` for Omniglot's thousands (the default here),
  and their code also learns a norm per class (weight normalisation); this head is the pure
  scaled cosine.

Chen et al. fit the head with SGD (momentum 0.9, learning rate 0.01, weight decay 0.001,
mini-batches of 4 for 100 epochs); full-batch Adam is deterministic and fast on a support set
of a few dozen examples. A support set of hundreds (77 or 150 intents, 10 sentences each) with
a transformer backbone is fitted in mini-batches instead: with ``finetune_batch = b`` each of
the ``finetune_steps`` is an epoch, the support set in shuffled mini-batches of ``b`` (the
order drawn from a generator seeded ``shuffle_seed``, so the predictor stays a function of the
support set; fits with other seeds differ only in that order, e.g. for an ensemble). With
``finetune_all=True`` a deep copy of the backbone is fine-tuned along with the head
(learning rate ``backbone_lr``), as in MAML's pretraining baseline; the copy keeps the
module's train/eval mode (call ``eval()`` first so BatchNorm uses the pretraining
statistics). The module itself is never modified: the predictor holds the head and, with
``finetune_all``, the fine-tuned copy.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.algorithms.base import MetaLearner, TaskSpec, register
from metalab.algorithms.pertask import map_tasks
from metalab.models import feature_shape
from metalab.tasks import TaskBatch


def head_logits(
    features: Tensor, weight: Tensor, bias: Tensor | None, cosine_scale: float | None
) -> Tensor:
    """Logits ``[B, C]`` of features ``[B, D]``: linear, or scaled cosine if a scale is given."""
    if cosine_scale is None:
        return F.linear(features, weight, bias)
    return cosine_scale * F.normalize(features, dim=-1) @ F.normalize(weight, dim=-1).T


@register
class FineTune(MetaLearner):
    """Pretrain-then-fine-tune baseline; ``head`` is ``"linear"`` (Baseline) or ``"cosine"``
    (Baseline++). Needs ``spec.num_classes`` and batches that carry ``classes``."""

    name = "finetune"
    family = "baseline"
    check_options: ClassVar[dict[str, dict[str, Any]]] = {"*": {"finetune_steps": 30}}

    def __init__(
        self,
        backbone: nn.Module,
        spec: TaskSpec,
        head: str = "linear",
        cosine_scale: float = 10.0,
        finetune_steps: int = 100,
        finetune_lr: float = 0.01,
        finetune_all: bool = False,
        backbone_lr: float = 0.001,
        finetune_batch: int | None = None,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__(spec)
        if spec.num_classes < 1:
            raise ValueError(
                f"finetune pretrains a classifier over all meta-training classes, so it needs "
                f"spec.num_classes >= 1 (got {spec.num_classes}); set TaskSpec.num_classes to "
                f"the number of classes in the training split."
            )
        if head not in ("linear", "cosine"):
            raise ValueError(f"head must be 'linear' or 'cosine', got {head!r}.")
        if finetune_steps < 0 or finetune_lr <= 0 or backbone_lr <= 0 or cosine_scale <= 0:
            raise ValueError(
                "finetune_steps must be >= 0 and finetune_lr, backbone_lr and cosine_scale > 0; "
                f"got {finetune_steps}, {finetune_lr}, {backbone_lr} and {cosine_scale}."
            )
        if finetune_batch is not None and finetune_batch < 1:
            raise ValueError(f"finetune_batch must be at least 1 (or null for full-batch steps); "
                             f"got {finetune_batch}.")
        self.backbone = backbone
        self.num_classes = spec.num_classes
        self.cosine_scale = cosine_scale if head == "cosine" else None
        self.finetune_steps, self.finetune_lr = finetune_steps, finetune_lr
        self.finetune_all, self.backbone_lr = finetune_all, backbone_lr
        self.finetune_batch, self.shuffle_seed = finetune_batch, shuffle_seed
        dim = math.prod(feature_shape(backbone, spec.input_shape, spec.input_dtype))
        self.classifier = nn.Linear(dim, spec.num_classes, bias=head == "linear")

    def adaptation_steps(self) -> int:
        return self.finetune_steps

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        if batch.classes is None:
            raise ValueError(
                "finetune pretrains on global class ids, but this batch has no `classes`; "
                "use a classification task source that records them (EpisodeSampler does)."
            )
        labels = batch.classes.gather(1, torch.cat([batch.support_y, batch.query_y], dim=1))
        lowest, highest = int(labels.min()), int(labels.max())
        if lowest < 0 or highest >= self.num_classes:
            raise ValueError(
                f"batch has class ids in [{lowest}, {highest}] but the "
                f"classifier has {self.num_classes} classes; spec.num_classes must be the "
                f"number of classes of the training split."
            )
        x = torch.cat([batch.support_x, batch.query_x], dim=1)
        # Each task's images on their own: BatchNorm must not pool statistics over tasks.
        features = map_tasks(self.backbone, x).flatten(2).flatten(0, 1)
        logits = head_logits(
            features, self.classifier.weight, self.classifier.bias, self.cosine_scale
        )
        loss = F.cross_entropy(logits, labels.flatten())
        # An N-way accuracy comparable with the other learners' (chance 1/N): the queries'
        # logits restricted to the classes of their task.
        num_support, num_query = batch.support_y.shape[1], batch.query_y.shape[1]
        query_logits = logits.view(batch.num_tasks, num_support + num_query, -1)[:, num_support:]
        task_logits = query_logits.gather(2, batch.classes.unsqueeze(1).expand(-1, num_query, -1))
        global_accuracy = (logits.argmax(-1) == labels.flatten()).float().mean()
        return loss, {**self.kind.metrics(task_logits, batch.query_y),
                      "global_accuracy": global_accuracy.item()}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> FineTunePredictor:
        n_way = int(support_y.max()) + 1
        backbone = copy.deepcopy(self.backbone) if self.finetune_all else self.backbone
        with torch.no_grad():
            features = backbone(support_x).flatten(1)
            if self.cosine_scale is None:
                weight = features.new_zeros(n_way, features.shape[1])
                bias: Tensor | None = features.new_zeros(n_way)
            else:
                one_hot = F.one_hot(support_y, n_way).to(features.dtype)
                weight = F.normalize(one_hot.T @ F.normalize(features, dim=-1), dim=-1)
                bias = None
        head = [p.requires_grad_() for p in (weight, bias) if p is not None]
        groups = [{"params": head, "lr": self.finetune_lr}]
        if self.finetune_all:
            groups.append(
                {"params": [p.requires_grad_() for p in backbone.parameters()],
                 "lr": self.backbone_lr}
            )
        optimiser = torch.optim.Adam(groups)
        generator = torch.Generator().manual_seed(self.shuffle_seed)
        # The evaluator adapts under torch.no_grad(); fitting the head needs gradients.
        with torch.enable_grad():
            for _ in range(self.finetune_steps):
                batches = (torch.randperm(len(support_y), generator=generator)
                           .split(self.finetune_batch) if self.finetune_batch else [slice(None)])
                for chosen in batches:
                    inputs = (backbone(support_x[chosen]).flatten(1) if self.finetune_all
                              else features[chosen])
                    logits = head_logits(inputs, weight, bias, self.cosine_scale)
                    loss = self.kind.loss(logits, support_y[chosen])
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
        if self.finetune_all:
            backbone.requires_grad_(False)
        return FineTunePredictor(
            backbone, weight.detach(), None if bias is None else bias.detach(), self.cosine_scale
        )


class FineTunePredictor:
    """A backbone (the module's own, or a fine-tuned copy) and a head fitted to one task."""

    def __init__(
        self, backbone: nn.Module, weight: Tensor, bias: Tensor | None, cosine_scale: float | None
    ) -> None:
        self.backbone, self.weight, self.bias = backbone, weight, bias
        self.cosine_scale = cosine_scale

    def __call__(self, query_x: Tensor) -> Tensor:
        features = self.backbone(query_x).flatten(1)
        return head_logits(features, self.weight, self.bias, self.cosine_scale)
