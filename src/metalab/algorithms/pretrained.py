"""The "pretrained on all tasks" baseline of MAML's regression experiment (Finn et al. 2017,
Sec. 5.1).

One network is trained by plain regression on the pooled examples of every training task
(support and query points alike, no episodes), then adapted to a new task as MAML is: a few
SGD steps of size ``inner_lr`` on its support set,

    θ* = argmin_θ Σ_tasks L_task(θ),      φ = θ* − α ∇ L_support(θ*)  (``test_inner_steps`` times).

On sinusoids with random phase the pooled problem averages the waves away, so θ* predicts
close to the mean of the task family and a few steps cannot recover much: the paper's point.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metalab.algorithms.base import TaskSpec, register
from metalab.algorithms.maml import MAML
from metalab.kinds import TaskKind


@register
class Pretrained(MAML):
    """Joint training on all tasks, then SGD fine-tuning (regression)."""

    name = "pretrained"
    family = "baseline"

    @classmethod
    def supports(cls, kind: TaskKind) -> bool:
        """Tasks whose targets are values: the pooled tasks need one shared output space."""
        return not kind.classes

    def __init__(
        self, backbone: nn.Module, spec: TaskSpec, test_inner_steps: int = 10,
        inner_lr: float = 0.01, task_workers: int | None = None, vectorize: bool | None = None,
    ) -> None:
        super().__init__(backbone, spec, inner_steps=1, test_inner_steps=test_inner_steps,
                         inner_lr=inner_lr, first_order=True, task_workers=task_workers,
                         vectorize=vectorize)

    def task_objective(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The plain regression loss on all of the task's points (also its metric)."""
        x, y = torch.cat([support_x, query_x]), torch.cat([support_y, query_y])
        loss = self.kind.loss(self(x), y)
        return loss, loss.detach()
