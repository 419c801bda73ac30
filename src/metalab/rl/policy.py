"""A Gaussian MLP policy as a function of its parameters, for many tasks at once.

Parameters are a dict of tensors; every tensor may carry a leading task dimension ``T`` (the
adapted parameters of each task) or not (one set shared by all tasks). Observations are
``[T, M, observation_size]``; a leading-``T`` weight is applied with a batched matrix product,
so the rollouts and losses of all tasks, each with its own parameters, are one computation.
The architecture is the MAML paper's: two hidden layers of 100 ReLU units, a linear mean and
a state-independent log standard deviation (a parameter, adapted with the rest).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Generators", "Params", "gaussian_kl", "init_policy", "log_prob", "per_task_draw",
           "policy_mean", "sample_action"]

Params = dict[str, Tensor]
# One generator for a whole batch of tasks, or one per task (task t draws from the t-th), so
# that a task's draws do not depend on which other tasks share its batch or process.
Generators = torch.Generator | Sequence[torch.Generator]


def per_task_draw(draw: Callable[..., Tensor], shape: Sequence[int], generator: Generators,
                  **options: object) -> Tensor:
    """``draw(shape, generator=...)`` (e.g. ``torch.randn``) of ``shape = [T, ...]``: in one
    call from one generator, or row ``t`` from ``generator[t]``."""
    if isinstance(generator, torch.Generator):
        return draw(tuple(shape), generator=generator, **options)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} tasks; pass one per task.")
    return torch.stack([draw(tuple(shape[1:]), generator=g, **options) for g in generator])


def init_policy(observation_size: int, action_size: int, hidden: Sequence[int] = (100, 100),
                generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                init_log_std: float = 0.0) -> Params:
    """Xavier-uniform weights, zero biases, ``log_std = init_log_std``."""
    sizes = [observation_size, *hidden, action_size]
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        bound = math.sqrt(6 / (fan_in + fan_out))
        params[f"w{i}"] = (torch.rand(fan_in, fan_out, generator=generator, dtype=dtype) * 2
                           - 1) * bound
        params[f"b{i}"] = torch.zeros(fan_out, dtype=dtype)
    params["log_std"] = torch.full((action_size,), init_log_std, dtype=dtype)
    return params


def _layers(params: Params) -> int:
    return sum(1 for k in params if k.startswith("w"))


def policy_mean(params: Params, observations: Tensor) -> Tensor:
    """Mean action ``[T, M, action_size]`` of observations ``[T, M, observation_size]``."""
    x = observations
    last = _layers(params) - 1
    for i in range(last + 1):
        w, b = params[f"w{i}"], params[f"b{i}"]
        x = x @ w if w.dim() == 2 else torch.bmm(x, w)
        x = x + (b if b.dim() == 1 else b[:, None, :])
        if i < last:
            x = torch.relu(x)
    return x


def _log_std(params: Params, like: Tensor) -> Tensor:
    log_std = params["log_std"]
    return (log_std if log_std.dim() == 1 else log_std[:, None, :]).expand_as(like)


def log_prob(params: Params, observations: Tensor, actions: Tensor) -> Tensor:
    """``log pi(a | s)`` ``[T, M]`` of the Gaussian policy."""
    mean = policy_mean(params, observations)
    log_std = _log_std(params, mean)
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def sample_action(params: Params, observations: Tensor, generator: Generators) -> Tensor:
    """An action ``[T, M, action_size]`` drawn from the policy (no gradient)."""
    with torch.no_grad():
        mean = policy_mean(params, observations)
        noise = per_task_draw(torch.randn, mean.shape, generator, dtype=mean.dtype)
        return mean + torch.exp(_log_std(params, mean)) * noise


def gaussian_kl(old: Params, new: Params, observations: Tensor) -> Tensor:
    """``KL(pi_old(.|s) || pi_new(.|s))`` per observation ``[T, M]``, in closed form."""
    mean_old, mean_new = policy_mean(old, observations), policy_mean(new, observations)
    log_std_old, log_std_new = _log_std(old, mean_old), _log_std(new, mean_new)
    var_old, var_new = torch.exp(2 * log_std_old), torch.exp(2 * log_std_new)
    return (log_std_new - log_std_old + (var_old + (mean_old - mean_new).pow(2))
            / (2 * var_new) - 0.5).sum(-1)
