"""Meta-gradients of independent tasks computed in parallel threads on the CPU.

Gradient-based meta-learners adapt to each task of a meta-batch separately, on batches of a
few dozen images. On a CPU such small operations use several cores poorly (and badly when
the machine is shared), while the tasks themselves are independent: one thread per core,
each running whole tasks single-threaded, keeps every core busy. PyTorch operators release
the GIL, so Python threads run them concurrently.

``torch.func.functional_call`` temporarily swaps a module's parameters, so threads must not
share a module: each gets a replica (a deep copy whose parameters and buffers are the
original tensors). Tasks are dealt to threads in a fixed order and the gradients are summed
in a fixed order, so the result does not depend on thread timing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from metalab.tasks import TaskBatch

# (module, support_x, support_y, query_x, query_y) -> (objective, metric), both 0-d tensors
TaskObjective = Callable[[nn.Module, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def parallel_meta_loss(
    module: nn.Module, batch: TaskBatch, objective: TaskObjective, workers: int,
) -> tuple[Tensor, dict[str, float]]:
    """Mean of ``objective(module, *task)`` over the tasks of ``batch``, computed in
    ``workers`` threads, as a loss whose value and gradient are those of the mean, and the
    mean metric under the name ``module.metric``.

    The gradients are computed in the threads; the returned loss carries them
    (``value + Σ (p·g) − stopgrad(Σ (p·g))``), so ``loss.backward()`` puts exactly the mean
    gradient in ``.grad``.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    shared = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    replicas = [copy.deepcopy(module, memo=dict(shared)) for _ in range(workers)]
    autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    def run(worker: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        total = [torch.zeros_like(p) for p in params]
        values, metrics = [], []
        with torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):  # thread-local
            for i in range(worker, len(batch), workers):
                task = (batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i])
                value, metric = objective(replicas[worker], *task)
                grads = torch.autograd.grad(value, params, allow_unused=True)
                for acc, grad in zip(total, grads, strict=True):
                    if grad is not None:
                        acc += grad
                values.append(value.detach())
                metrics.append(metric.detach())
        return total, values, metrics

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per task thread; no oversubscription
    try:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(run, range(workers)))
    finally:
        torch.set_num_threads(threads)
    grads = [sum(r[0][j] for r in results) / len(batch) for j in range(len(params))]
    values = [v for r in results for v in r[1]]
    metrics = [m for r in results for m in r[2]]
    carrier = sum((p * g).sum() for p, g in zip(params, grads, strict=True))
    loss = torch.stack(values).mean() + carrier - carrier.detach()
    return loss, {module.metric: torch.stack(metrics).mean().item()}
