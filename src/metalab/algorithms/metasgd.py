"""Meta-SGD (Li, Zhou, Chen & Li, 2017, arXiv:1707.09835).

MAML whose inner step size is a learned vector α of the same shape as the parameters,
meta-learned with θ, so that direction and size of the update are both learned:

    φ = θ − α ∘ ∇_θ L_support(θ),      (θ, α) ← (θ, α) − β ∇_{θ,α} L_query(φ).

The paper takes one inner step and initialises α uniformly in a small range; metalab
initialises every α to ``inner_lr``. Everything else is :class:`metalab.algorithms.maml.MAML`
with ``learn_inner_lr="element"``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from metalab.algorithms.base import TaskSpec, register
from metalab.algorithms.maml import MAML


@register
class MetaSGD(MAML):
    """MAML with a learned step size per weight."""

    name = "metasgd"
    # Its learned step sizes are fitted to the training steps: more steps at test diverge.
    check_options: ClassVar[dict[str, dict[str, Any]]] = {
        "classification": {"test_inner_steps": 3}, "regression": {"inner_lr": 0.01}}

    def __init__(
        self, backbone: nn.Module, spec: TaskSpec, inner_steps: int = 1,
        test_inner_steps: int | None = None, inner_lr: float = 0.4, first_order: bool = False,
        batch_norm: str = "transductive", task_workers: int | None = None,
        vectorize: bool | None = None,
    ) -> None:
        super().__init__(backbone, spec, inner_steps, test_inner_steps, inner_lr,
                         first_order=first_order, learn_inner_lr="element",
                         batch_norm=batch_norm, task_workers=task_workers, vectorize=vectorize)
