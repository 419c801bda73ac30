"""Closed-form linear forecasters: the baselines of forecasting on a new transformer.

A window's forecast is linear in its lookback: ``ŷ = [x, 1] W`` with ``W`` of shape
``[lookback + 1, horizon]``, one map shared by every channel (channel independence, as the
linear models of Zeng et al. AAAI 2023 and PatchTST). Ridge regression gives ``W`` in closed
form; "shrunk toward" a source solution ``W₀`` penalises the distance to it instead of the
norm (the MAP estimate under a Gaussian prior centred on the source model, the classic way of
transferring a linear model, e.g. Evgeniou & Pontil KDD 2004):

    W = argmin ‖[X, 1] W − Y‖² + λ ‖W − W₀‖²  =  (AᵀA + λI)⁻¹ (AᵀY + λW₀),   A = [X, 1].

With ``W₀ = 0`` this is ridge from scratch; λ is chosen on validation windows
(:func:`choose_ridge`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["REGULARISERS", "choose_ridge", "errors", "predict", "ridge"]

REGULARISERS = tuple(10.0 ** p for p in range(-1, 7))  # the λ grid chosen from


def _design(x: Tensor) -> Tensor:
    return torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)


def ridge(x: Tensor, y: Tensor, reg: float, prior: Tensor | None = None) -> Tensor:
    """``W`` ``[lookback + 1, horizon]`` minimising ``‖[x, 1] W − y‖² + reg ‖W − prior‖²``
    (``prior`` default 0: ridge from scratch), in float64."""
    design = _design(x)
    gram = design.T @ design + reg * torch.eye(design.shape[1], dtype=torch.float64)
    rhs = design.T @ y.double()
    if prior is not None:
        rhs = rhs + reg * prior.double()
    return torch.linalg.solve(gram, rhs)


def predict(weights: Tensor, x: Tensor) -> Tensor:
    """Forecasts ``[n, horizon]`` of windows ``x`` ``[n, lookback]``."""
    return (_design(x) @ weights).float()


def errors(predicted: Tensor, target: Tensor) -> dict[str, float]:
    """MSE and MAE over every forecast value."""
    diff = predicted.double() - target.double()
    return {"mse": diff.pow(2).mean().item(), "mae": diff.abs().mean().item()}


def choose_ridge(x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor,
                 prior: Tensor | None = None, grid: Sequence[float] = REGULARISERS,
                 ) -> tuple[Tensor, float]:
    """The ridge solution (shrunk toward ``prior`` if given) whose λ in ``grid`` has the
    lowest validation MSE, and that λ. The Gram matrix is formed once."""
    design = _design(x)
    gram, rhs = design.T @ design, design.T @ y.double()
    eye = torch.eye(design.shape[1], dtype=torch.float64)
    best: tuple[float, Tensor, float] | None = None
    for reg in grid:
        shifted = rhs + reg * prior.double() if prior is not None else rhs
        weights = torch.linalg.solve(gram + reg * eye, shifted)
        mse = errors(predict(weights, val_x), val_y)["mse"]
        if best is None or mse < best[0]:
            best = (mse, weights, reg)
    return best[1], best[2]
