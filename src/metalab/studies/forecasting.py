"""Closed-form linear forecasters: the baselines of forecasting on a new transformer.

A window's forecast is linear in its lookback: ``ŷ = [x, 1] W`` with ``W`` of shape
``[lookback + 1, horizon]``, one map shared by every channel (channel independence, as the
linear models of Zeng et al. AAAI 2023 and PatchTST). Ridge regression gives ``W`` in closed
form; "shrunk toward" a source solution ``W₀`` penalises the distance to it instead of the
norm (the MAP estimate under a Gaussian prior centred on the source model, the classic way of
transferring a linear model, e.g. Evgeniou & Pontil KDD 2004):

    W = argmin ‖[X, 1] W − Y‖² + λ ‖W − W₀‖²  =  (AᵀA + λI)⁻¹ (AᵀY + λW₀),   A = [X, 1].

With ``W₀ = 0`` this is ridge from scratch; λ is chosen on validation windows
(:func:`choose_ridge`). A diagonal ``precision`` ``p`` weighs the penalty per row of ``W``
(each lookback lag and the bias), ``λ Σᵢ pᵢ ‖Wᵢ − W₀ᵢ‖²``: :func:`learn_precision`
meta-learns it on the source's tasks, so that adapting to few windows moves the lags that
differ from task to task and keeps the others at the source's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from metalab.tasks import TaskSource

__all__ = ["REGULARISERS", "choose_ridge", "errors", "learn_precision", "predict", "ridge"]

REGULARISERS = tuple(10.0 ** p for p in range(-1, 7))  # the λ grid chosen from


def _design(x: Tensor) -> Tensor:
    """``[..., n, lookback]`` windows -> ``[..., n, lookback + 1]`` with a column of ones."""
    ones = torch.ones(*x.shape[:-1], 1, dtype=torch.float64, device=x.device)
    return torch.cat([x.double(), ones], dim=-1)


def _normal_equations(design: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``AᵀA`` and ``AᵀY`` of the least-squares problem (batched over leading dims)."""
    return design.transpose(-1, -2) @ design, design.transpose(-1, -2) @ y.double()


def _solve(gram: Tensor, rhs: Tensor, penalty: Tensor, prior: Tensor | None) -> Tensor:
    """``W`` of ``argmin ‖A W − Y‖² + Σᵢ penaltyᵢ ‖Wᵢ − priorᵢ‖²`` from ``AᵀA``, ``AᵀY``."""
    if prior is not None:
        rhs = rhs + penalty[:, None] * prior.double()
    return torch.linalg.solve(gram + torch.diag(penalty), rhs)


def _penalty(reg: float, precision: Tensor | None, rows: int) -> Tensor:
    ones = torch.ones(rows, dtype=torch.float64)
    return reg * (ones if precision is None else precision.double())


def ridge(x: Tensor, y: Tensor, reg: float, prior: Tensor | None = None,
          precision: Tensor | None = None) -> Tensor:
    """``W`` ``[lookback + 1, horizon]`` minimising ``‖[x, 1] W − y‖² + reg Σᵢ precisionᵢ
    ‖Wᵢ − priorᵢ‖²`` (``prior`` default 0: ridge from scratch; ``precision`` default 1), in
    float64."""
    design = _design(x)
    return _solve(*_normal_equations(design, y), _penalty(reg, precision, design.shape[1]),
                  prior)


def predict(weights: Tensor, x: Tensor) -> Tensor:
    """Forecasts ``[n, horizon]`` of windows ``x`` ``[n, lookback]``."""
    return (_design(x) @ weights).float()


def errors(predicted: Tensor, target: Tensor) -> dict[str, float]:
    """MSE and MAE over every forecast value."""
    diff = predicted.double() - target.double()
    return {"mse": diff.pow(2).mean().item(), "mae": diff.abs().mean().item()}


def choose_ridge(x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor,
                 prior: Tensor | None = None, grid: Sequence[float] = REGULARISERS,
                 precision: Tensor | None = None) -> tuple[Tensor, float]:
    """The ridge solution (shrunk toward ``prior`` if given, penalty weighted by
    ``precision``) whose λ in ``grid`` has the lowest validation MSE, and that λ. The Gram
    matrix is formed once."""
    design = _design(x)
    gram, rhs = _normal_equations(design, y)
    best: tuple[float, Tensor, float] | None = None
    for reg in grid:
        weights = _solve(gram, rhs, _penalty(reg, precision, design.shape[1]), prior)
        mse = errors(predict(weights, val_x), val_y)["mse"]
        if best is None or mse < best[0]:
            best = (mse, weights, reg)
    return best[1], best[2]


def learn_precision(tasks: TaskSource, prior: Tensor, steps: int = 300, tasks_per_step: int = 16,
                    lr: float = 0.05, start: float = 100.0, seed: int = 0) -> Tensor:
    """The prior precision ``p`` ``[lookback + 1]`` of shrinking toward ``prior``,
    meta-learned on ``tasks`` (of equal sizes, e.g. :class:`metalab.data.ett.WindowTasks`):
    each task's MAP estimate ``W = argmin ‖[x, 1] W − y‖² +
    Σᵢ pᵢ ‖Wᵢ − priorᵢ‖²`` is solved in closed form on its support windows, and ``log p``
    (from ``log start``) takes ``steps`` Adam steps on the mean query MSE of ``tasks_per_step``
    tasks, differentiated through the solve. The closed-form inner loop is R2-D2's (Bertinetto
    et al., ICLR 2019); learning the Gaussian prior of a linear model from tasks is ALPaCA's
    (Harrison et al., WAFR 2018), here with its mean held at the source solution ``prior``.
    At adaptation ``choose_ridge(..., prior=prior, precision=p)`` scales it by λ."""
    generator = torch.Generator().manual_seed(seed)
    log_precision = torch.full((prior.shape[0],), math.log(start), dtype=torch.float64,
                               requires_grad=True)
    optimizer = torch.optim.Adam([log_precision], lr=lr)
    for _ in range(steps):
        batch = tasks.sample(tasks_per_step, generator)
        with torch.enable_grad():
            weights = _solve(*_normal_equations(_design(batch.support_x), batch.support_y),
                             log_precision.exp(), prior)
            predicted = _design(batch.query_x) @ weights
            loss = (predicted - batch.query_y.double()).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
    return log_precision.detach().exp()
