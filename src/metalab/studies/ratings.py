"""The non-meta baselines of cold-start rating prediction, and its metrics.

A baseline is fitted once on the meta-train users' ratings (``fit``), then predicts a new
user's query ratings from that user's support ratings (``predict``); it never sees the
query ratings. Ratings are on their own 1..5 scale throughout (no normalisation).

* :class:`GlobalMean`: the mean rating of the training users.
* :class:`ItemMean`: each item's mean training rating (the global mean for unseen items).
* :class:`ItemBiasUserOffset`: ``μ + b_i + b_u``, the baseline predictor of Koren (KDD 2008,
  Sec. 2.1): regularised item biases ``b_i = Σ (r − μ) / (λ_i + n_i)`` from the training
  users, then the new user's offset ``b_u = Σ_support (r − μ − b_i) / (λ_u + n_u)``.
* :class:`MatrixFactorization`: biased matrix factorisation ``μ + b_u + b_i + p_u·q_i``
  fitted by alternating least squares (Zhou et al. 2008; Koren, Bell & Volinsky 2009), then
  the new user "folded in": ``(b_u, p_u)`` the ridge solution on the support ratings with the
  items' ``(b_i, q_i)`` fixed.

Metrics (MeLU, Lee et al. KDD 2019): MAE and RMSE over the query ratings, and nDCG@3 of the
query items ranked by prediction, gain ``2^r − 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BASELINES", "GlobalMean", "ItemBiasUserOffset", "ItemMean", "MatrixFactorization",
           "Ratings", "mae", "ndcg_at", "rmse"]


@dataclass(frozen=True)
class Ratings:
    """Ratings as three aligned 1-D tensors: 0-based ``users`` and ``items``, ``values``."""

    users: Tensor
    items: Tensor
    values: Tensor

    def __len__(self) -> int:
        return len(self.values)


class GlobalMean:
    """Predicts the training users' mean rating for everything."""

    name = "global-mean"

    def fit(self, train: Ratings, num_items: int) -> GlobalMean:
        self.mu = train.values.double().mean()
        return self

    def predict(self, support_items: Tensor, support_values: Tensor, query_items: Tensor,
                ) -> Tensor:
        return self.mu.expand(len(query_items)).float()


class ItemMean(GlobalMean):
    """Predicts each item's mean training rating (the global mean for an unseen item)."""

    name = "item-mean"

    def fit(self, train: Ratings, num_items: int) -> ItemMean:
        super().fit(train, num_items)
        sums = torch.zeros(num_items, dtype=torch.float64).index_add_(
            0, train.items, train.values.double())
        counts = torch.bincount(train.items, minlength=num_items).double()
        self.means = torch.where(counts > 0, sums / counts.clamp_min(1), self.mu)
        return self

    def predict(self, support_items: Tensor, support_values: Tensor, query_items: Tensor,
                ) -> Tensor:
        return self.means[query_items].float()


class ItemBiasUserOffset(GlobalMean):
    """``μ + b_i + b_u`` with item biases shrunk by ``item_reg`` (λ_i) and the new user's
    offset from the support ratings shrunk by ``user_reg`` (λ_u)."""

    name = "item-bias-user-offset"

    def __init__(self, item_reg: float = 5.0, user_reg: float = 5.0) -> None:
        self.item_reg, self.user_reg = item_reg, user_reg

    def fit(self, train: Ratings, num_items: int) -> ItemBiasUserOffset:
        super().fit(train, num_items)
        sums = torch.zeros(num_items, dtype=torch.float64).index_add_(
            0, train.items, train.values.double() - self.mu)
        counts = torch.bincount(train.items, minlength=num_items).double()
        self.item_bias = sums / (self.item_reg + counts)
        return self

    def predict(self, support_items: Tensor, support_values: Tensor, query_items: Tensor,
                ) -> Tensor:
        residual = support_values.double() - self.mu - self.item_bias[support_items]
        offset = residual.sum() / (self.user_reg + len(support_values))
        return (self.mu + self.item_bias[query_items] + offset).float()


class MatrixFactorization(GlobalMean):
    """Biased matrix factorisation of rank ``rank`` by ``iterations`` rounds of alternating
    least squares with one ridge penalty ``reg`` on every user and item vector (biases
    included), initialised from ``seed``; a new user is folded in by the same ridge solve."""

    name = "matrix-factorization"

    def __init__(self, rank: int = 10, reg: float = 5.0, iterations: int = 15,
                 seed: int = 0) -> None:
        self.rank, self.reg, self.iterations, self.seed = rank, reg, iterations, seed

    def fit(self, train: Ratings, num_items: int) -> MatrixFactorization:
        super().fit(train, num_items)
        users, user_index = torch.unique(train.users, return_inverse=True)
        mask = torch.zeros(len(users), num_items, dtype=torch.float64)
        target = torch.zeros_like(mask)
        mask[user_index, train.items] = 1.0
        target[user_index, train.items] = train.values.double() - self.mu
        generator = torch.Generator().manual_seed(self.seed)
        # Augmented factors: user [b_u, 1, p_u] · item [1, b_i, q_i] = b_u + b_i + p_u·q_i.
        user = 0.1 * torch.randn(len(users), self.rank, generator=generator, dtype=torch.float64)
        item = 0.1 * torch.randn(num_items, self.rank, generator=generator, dtype=torch.float64)
        user_bias = torch.zeros(len(users), dtype=torch.float64)
        item_bias = torch.zeros(num_items, dtype=torch.float64)
        for _ in range(self.iterations):
            solved = _ridge_rows(mask, target - item_bias, item, self.reg)
            user_bias, user = solved[:, 0], solved[:, 1:]
            solved = _ridge_rows(mask.T, (target - user_bias[:, None]).T, user, self.reg)
            item_bias, item = solved[:, 0], solved[:, 1:]
        self.item_bias, self.item_factors = item_bias, item
        return self

    def fold_in(self, support_items: Tensor, support_values: Tensor) -> Tensor:
        """``[b_u, p_u]`` of a new user: the ridge solution on the support ratings."""
        features = torch.cat([torch.ones(len(support_items), 1, dtype=torch.float64),
                              self.item_factors[support_items]], 1)
        residual = support_values.double() - self.mu - self.item_bias[support_items]
        gram = features.T @ features + self.reg * torch.eye(self.rank + 1, dtype=torch.float64)
        return torch.linalg.solve(gram, features.T @ residual)

    def predict(self, support_items: Tensor, support_values: Tensor, query_items: Tensor,
                ) -> Tensor:
        user = self.fold_in(support_items, support_values)
        return (self.mu + self.item_bias[query_items] + user[0] +
                self.item_factors[query_items] @ user[1:]).float()


def _ridge_rows(mask: Tensor, target: Tensor, other: Tensor, reg: float) -> Tensor:
    """For each row ``r``: ``argmin_w Σ_j mask[r, j] (target[r, j] − [1, other_j]·w)² +
    reg ‖w‖²``, all rows in one batched solve. Returns ``[rows, 1 + rank]``."""
    features = torch.cat([torch.ones(len(other), 1, dtype=other.dtype), other], 1)  # [J, k+1]
    gram = torch.einsum("rj,jk,jl->rkl", mask, features, features)
    gram += reg * torch.eye(features.shape[1], dtype=other.dtype)
    rhs = (mask * target) @ features
    return torch.linalg.solve(gram, rhs)


BASELINES = {cls.name: cls for cls in (GlobalMean, ItemMean, ItemBiasUserOffset,
                                       MatrixFactorization)}


# -- metrics -----------------------------------------------------------------------------------

def mae(predicted: Tensor, actual: Tensor) -> float:
    """Mean absolute error."""
    return (predicted.double() - actual.double()).abs().mean().item()


def rmse(predicted: Tensor, actual: Tensor) -> float:
    """Root mean squared error."""
    return math.sqrt((predicted.double() - actual.double()).pow(2).mean().item())


def ndcg_at(predicted: Tensor, actual: Tensor, k: int = 3) -> float:
    """nDCG@k of the items ranked by ``predicted`` (ties: the order given), with gain
    ``2^r − 1`` of the actual rating ``r`` and discount ``1 / log2(position + 1)``."""
    k = min(k, len(actual))
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    gains = 2.0 ** actual.double() - 1
    ranked = gains[torch.argsort(predicted, descending=True, stable=True)[:k]]
    ideal = gains.sort(descending=True).values[:k]
    best = (ideal * discount).sum().item()
    return (ranked * discount).sum().item() / best if best > 0 else 0.0
