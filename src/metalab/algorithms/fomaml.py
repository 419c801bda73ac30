"""First-order MAML (Finn, Abbeel & Levine, ICML 2017, Sec. 5.2).

MAML without the second derivatives of the inner loop: the outer gradient is the query
loss's gradient at the adapted parameters φ, applied to θ,

    θ ← θ − β 1/T Σ_tasks ∇_φ L_query(φ),

which the paper found nearly as accurate on Omniglot and MiniImagenet at a fraction of the
cost. Everything else is :class:`metalab.algorithms.maml.MAML`.
"""

from __future__ import annotations

from torch import nn

from metalab.algorithms.base import TaskSpec, register
from metalab.algorithms.maml import MAML


@register
class FOMAML(MAML):
    """MAML with ``first_order=True``."""

    name = "fomaml"

    def __init__(
        self, backbone: nn.Module, spec: TaskSpec, inner_steps: int = 1,
        test_inner_steps: int | None = None, inner_lr: float = 0.4,
        learn_inner_lr: str = "none", batch_norm: str = "transductive",
        task_workers: int | None = None, vectorize: bool | None = None,
    ) -> None:
        super().__init__(backbone, spec, inner_steps, test_inner_steps, inner_lr,
                         first_order=True, learn_inner_lr=learn_inner_lr, batch_norm=batch_norm,
                         task_workers=task_workers, vectorize=vectorize)
