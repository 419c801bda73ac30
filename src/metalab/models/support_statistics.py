"""BatchNorm with the support set's statistics: MetaBN (Bronskill, Gordon, Requeima, Nowozin &
Turner, "TaskNorm: Rethinking Batch Normalization for Meta-Learning", ICML 2020).

Every BatchNorm layer normalises all examples of a task, support and queries alike, with the
mean and variance of that task's support set (per channel, over the support examples and
their spatial positions), then applies its affine weights:

    y = γ (x − μ_support) / sqrt(σ²_support + ε) + β

It is the same in training and at test time, and it is not transductive: a query's output
depends on its task's support set, never on the other queries. (Running statistics, the other
non-transductive choice, normalise every task with statistics pooled over the training
tasks, which shift on new classes; see ``benchmarks/batch_norm_statistics.py``.)

It works on any network whose BatchNorm layers call ``torch.nn.functional.batch_norm`` (every
``nn.BatchNorm*d`` does) by intercepting that call, so the network is not changed and its
checkpoints keep their keys. Running statistics are neither used nor updated.

    with SupportStatistics(support=S):
        features = backbone(x)        # x: one task, its S support examples first
    with SupportStatistics() as support:
        backbone(support_x)           # one task's support set: records its statistics
    with SupportStatistics(recorded=support.recorded):
        backbone(query_x)             # queries of that task, normalised the same way

One task per call: a meta-batch is embedded task by task (``metalab.algorithms.pertask``),
which on this project's CPU also ran faster than one call over all tasks.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["SupportStatistics"]

_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


class SupportStatistics(TorchFunctionMode):
    """Inside this context every ``F.batch_norm`` call normalises with support statistics.

    The batch is one task, its ``support`` support examples first (``None``: every example is
    a support example). Without ``recorded``, the statistics of each call are computed and
    appended to ``self.recorded``; with it, the ``i``-th call uses the ``i``-th recorded ones.
    """

    def __init__(self, support: int | None = None,
                 recorded: list[tuple[Tensor, Tensor]] | None = None) -> None:
        super().__init__()
        self.support = support
        self.replay = recorded is not None
        self.recorded: list[tuple[Tensor, Tensor]] = list(recorded or [])
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if func is not F.batch_norm:
            return func(*args, **(kwargs or {}))
        call = _BATCH_NORM_SIGNATURE.bind(*args, **(kwargs or {}))
        call.apply_defaults()
        x, weight, bias = call.arguments["input"], call.arguments["weight"], call.arguments["bias"]
        if self.replay:
            if self.calls >= len(self.recorded):
                raise RuntimeError(f"the network made more BatchNorm calls than the "
                                   f"{len(self.recorded)} recorded from the support set.")
            mean, var = self.recorded[self.calls]
        else:
            support = x if self.support is None else x[:self.support]
            dims = [0, *range(2, x.dim())]  # examples and spatial positions
            mean = support.mean(dims, keepdim=True)
            var = support.var(dims, unbiased=False, keepdim=True)
            self.recorded.append((mean, var))
        self.calls += 1
        out = (x - mean) * (var + call.arguments["eps"]).rsqrt()
        channel = (-1, *[1] * (x.dim() - 2))  # broadcast [C] over [C, *spatial]
        if weight is not None:
            out = out * weight.view(channel)
        if bias is not None:
            out = out + bias.view(channel)
        return out
