"""Trust region policy optimisation's step (Schulman et al. 2015): conjugate gradient on
Fisher-vector products, a step scaled to the KL bound, and a backtracking line search.

Works on any ``surrogate(params) -> (loss, kl)``, so MAML-RL's outer step differentiates the
loss and the KL through the inner adaptation (Finn et al. 2017 use TRPO as the meta-optimiser
for reinforcement learning).

Several processes, each holding a share of the tasks, take one step together: each returns
its share's part of the loss and KL (their sum over processes is the whole batch's), and
``reduce`` (:func:`metalab.distributed.all_sum`) adds up the gradient, every Fisher-vector
product and the line search's values, so every process computes the same step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from metalab.rl.policy import Params

__all__ = ["TRPOResult", "conjugate_gradient", "trpo_step"]

Surrogate = Callable[[Params], tuple[Tensor, Tensor]]


def conjugate_gradient(product: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 10,
                       tolerance: float = 1e-10) -> Tensor:
    """Approximately solve ``A x = b`` for symmetric positive definite ``A`` given only
    ``product(v) = A v``."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iterations):
        ap = product(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        if rr_new < tolerance:
            break
        p = r + rr_new / rr * p
        rr = rr_new
    return x


def _flat(tensors: tuple[Tensor, ...]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(vector: Tensor, like: Params) -> Params:
    out, start = {}, 0
    for name, value in like.items():
        out[name] = vector[start:start + value.numel()].view_as(value)
        start += value.numel()
    return out


@dataclass
class TRPOResult:
    params: Params  # the new parameters (the old ones if no step was accepted)
    loss_before: float
    loss_after: float
    kl: float
    step_fraction: float  # of the full step; 0 when the line search rejected every step


def trpo_step(surrogate: Surrogate, params: Params, max_kl: float = 0.01,
              cg_iterations: int = 10, damping: float = 1e-5, line_search_steps: int = 15,
              backtrack: float = 0.8, reduce: Callable[[Tensor], Tensor] = lambda t: t,
              ) -> TRPOResult:
    """One TRPO update of ``params`` (leaves) minimising ``surrogate``'s loss with its KL
    below ``max_kl``; ``surrogate`` must return a KL whose value and gradient are 0 at
    ``params`` (the policy that collected the data). ``reduce`` sums a tensor over the
    processes that share the batch (the identity in one process)."""
    names = list(params)
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    loss, kl = surrogate(leaves)
    inputs = [leaves[k] for k in names]
    gradient = reduce(_flat(torch.autograd.grad(loss, inputs, retain_graph=True)))
    kl_gradient = _flat(torch.autograd.grad(kl, inputs, create_graph=True))

    def fisher_product(vector: Tensor) -> Tensor:
        hvp = torch.autograd.grad(kl_gradient @ vector, inputs, retain_graph=True)
        return reduce(_flat(hvp)) + damping * vector

    direction = conjugate_gradient(fisher_product, gradient, cg_iterations)
    curvature = 0.5 * direction @ fisher_product(direction)
    full_step = direction / torch.sqrt(curvature / max_kl)
    start = {k: v.detach() for k, v in params.items()}
    before = float(reduce(loss.detach()))
    fraction = 1.0
    with torch.no_grad():
        flat_start = _flat(tuple(start[k] for k in names))
    for _ in range(line_search_steps):
        candidate = {k: v.detach().requires_grad_() for k, v in
                     _unflat(flat_start - fraction * full_step.detach(), start).items()}
        new_loss, new_kl = reduce(torch.stack(surrogate(candidate)).detach()).tolist()
        if new_loss < before and new_kl <= max_kl:
            return TRPOResult({k: v.detach() for k, v in candidate.items()}, before, new_loss,
                              new_kl, fraction)
        fraction *= backtrack
    return TRPOResult(start, before, before, 0.0, 0.0)
