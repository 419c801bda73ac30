"""Reptile (Nichol, Achiam & Schulman, 2018, arXiv:1803.02999).

Reptile adapts to each task with plain SGD (no second derivatives, no support/query split)
and moves the initialisation towards the adapted weights:

    φ_t = SGD^k(θ, task t),      θ ← θ + ε · 1/T Σ_t (φ_t − θ)        (batched Reptile).

Through metalab's trainer the update is the gradient of the surrogate
``1/T Σ_t ½‖θ − stopgrad(φ_t)‖²``, which is exactly ``1/T Σ_t (θ − φ_t)``: with
``optimizer: sgd`` and learning rate ε the trainer's step is the paper's update; Adam on the
same direction is a common variant. The inner loop trains on the task's support and query
examples together (the paper samples one training set per task); at test time ``adapt``
takes ``test_inner_steps`` steps on the support set. Inner loop and BatchNorm as
:class:`metalab.algorithms.maml.MAML`.

``inner_batch_size`` makes each inner step see the next minibatch of the task's examples
instead of all of them. This is what makes Reptile meta-learn rather than jointly train:
its update's second-order term rewards steps on one minibatch that lower the loss on
another (Nichol et al., Sec. 5 and Fig. 4), a term that vanishes when every step sees the
same batch. The paper's Omniglot runs use minibatches of 10.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metalab.algorithms.base import TaskSpec, register
from metalab.algorithms.maml import MAML


@register
class Reptile(MAML):
    """First-order meta-learning by moving θ towards each task's SGD solution."""

    name = "reptile"

    def __init__(
        self, backbone: nn.Module, spec: TaskSpec, inner_steps: int = 5,
        test_inner_steps: int | None = None, inner_lr: float = 0.1,
        inner_batch_size: int | None = None, batch_norm: str = "transductive",
        task_workers: int | None = None, vectorize: bool | None = None,
    ) -> None:
        super().__init__(backbone, spec, inner_steps, test_inner_steps, inner_lr,
                         first_order=True, batch_norm=batch_norm, task_workers=task_workers,
                         vectorize=vectorize)
        if inner_batch_size is not None and inner_batch_size < 1:
            raise ValueError(f"inner_batch_size must be at least 1 (or null for the whole "
                             f"task); got {inner_batch_size}.")
        self.inner_batch_size = inner_batch_size

    metric = "adapted_loss"

    def task_objective(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """½‖θ − stopgrad(φ)‖² for this task's SGD solution φ, and φ's loss on its data."""
        theta = self.fast_params()
        x, y = torch.cat([support_x, query_x]), torch.cat([support_y, query_y])
        phi = {name: p.detach() for name, p in theta.items()}
        for batch in self.inner_batches(len(y)):
            phi = self.inner_loop(phi, x[batch], y[batch], 1, create_graph=False)
        phi = {name: p.detach() for name, p in phi.items()}
        with torch.no_grad():
            adapted_loss = self.kind.loss(self.predict(phi, x), y)
        distance = sum(0.5 * (theta[name] - phi[name]).pow(2).sum() for name in theta)
        return distance, adapted_loss

    def inner_batches(self, num_examples: int) -> list[Tensor | slice]:
        """Which examples each inner step trains on: all of them, or consecutive windows of
        ``inner_batch_size`` that wrap around. Episodes list the examples class by class
        within each shot, so a window that is a multiple of ``n_way`` holds every class
        equally often."""
        size = self.inner_batch_size
        if size is None or size >= num_examples:
            return [slice(None)] * self.inner_steps
        return [torch.arange(step * size, (step + 1) * size) % num_examples
                for step in range(self.inner_steps)]
