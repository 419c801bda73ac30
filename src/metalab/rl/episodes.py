"""Rollouts of many tasks at once, their returns, rllab's linear feature baseline and
advantages (GAE).

An :class:`Episodes` holds ``T`` tasks x ``N`` trajectories x ``H`` steps as tensors laid out
``[T, H * N, ...]`` per step-major order (step ``t`` of trajectory ``n`` at ``t * N + n``), so a
policy evaluates every step of every trajectory of a task in one call. ``mask`` is 1 for the
steps taken before the episode ended.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metalab.rl.navigation import Navigation2D
from metalab.rl.policy import Generators, Params, sample_action

__all__ = ["Episodes", "advantages", "discounted_returns", "linear_baseline", "rollout"]


@dataclass
class Episodes:
    observations: Tensor  # [T, H, N, obs]
    actions: Tensor  # [T, H, N, act]
    rewards: Tensor  # [T, H, N] (0 after the episode ended)
    mask: Tensor  # [T, H, N] 1 while the episode runs

    @property
    def returns(self) -> Tensor:
        """Undiscounted return of every trajectory ``[T, N]``."""
        return self.rewards.sum(1)

    def flat(self, values: Tensor) -> Tensor:
        """``[T, H, N, ...]`` -> ``[T, H * N, ...]`` (what the policy functions take)."""
        return values.flatten(1, 2)


def rollout(env: Navigation2D, params: Params, goals: Tensor, trajectories: int,
            generator: Generators) -> Episodes:
    """``trajectories`` episodes per goal with ``params`` (shared, or one set per task)."""
    positions = env.reset(goals, trajectories)
    alive = torch.ones(positions.shape[:2], dtype=positions.dtype)
    observations, actions, rewards, masks = [], [], [], []
    for _ in range(env.horizon):
        action = sample_action(params, positions, generator)
        moved, reward, done = env.step(positions, action, goals)
        observations.append(positions)
        actions.append(action)
        rewards.append(reward * alive)
        masks.append(alive)
        positions = moved
        alive = alive * (~done).to(alive.dtype)
    stack = lambda xs: torch.stack(xs, 1)  # noqa: E731
    return Episodes(stack(observations), stack(actions), stack(rewards), stack(masks))


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """``sum_k gamma^k r_{t+k}`` for every step ``[T, H, N]``."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


def _features(episodes: Episodes) -> Tensor:
    """rllab's ``LinearFeatureBaseline`` features ``[T, H, N, 2 * obs + 4]``: the
    observation, its square, the time step / 100 and its square and cube, and 1."""
    obs = episodes.observations.clamp(-10, 10)
    steps = torch.arange(obs.shape[1], dtype=obs.dtype)[None, :, None, None] / 100
    steps = steps.expand(*obs.shape[:3], 1)
    return torch.cat([obs, obs.pow(2), steps, steps.pow(2), steps.pow(3),
                      torch.ones_like(steps)], -1)


def linear_baseline(episodes: Episodes, returns: Tensor, reg: float = 1e-5) -> Tensor:
    """Values ``[T, H, N]`` of a linear fit of ``returns`` on :func:`_features`, refit for
    each task on its own trajectories (ridge, ``reg`` multiplied by 10 until solvable)."""
    features = _features(episodes) * episodes.mask[..., None]
    x = features.flatten(1, 2)  # [T, H * N, F]
    y = (returns * episodes.mask).flatten(1, 2)[..., None]
    gram = x.transpose(1, 2) @ x
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    for _ in range(10):
        weights, info = torch.linalg.solve_ex(gram + reg * eye, x.transpose(1, 2) @ y)
        if not info.any() and torch.isfinite(weights).all():
            break
        reg *= 10
    return (features @ weights[:, None]).squeeze(-1) * episodes.mask


def advantages(episodes: Episodes, gamma: float = 0.99, gae_lambda: float = 1.0,
               normalise: bool = True) -> Tensor:
    """GAE(``gamma``, ``gae_lambda``) advantages ``[T, H, N]`` against the linear baseline
    (``gae_lambda = 1``: the discounted return minus the baseline), normalised per task over
    the steps taken."""
    mask = episodes.mask
    values = linear_baseline(episodes, discounted_returns(episodes.rewards, gamma))
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    deltas = episodes.rewards + gamma * next_values * torch.cat(
        [mask[:, 1:], torch.zeros_like(mask[:, :1])], 1) - values
    advantage = discounted_returns(deltas, gamma * gae_lambda) * mask
    if normalise:
        count = mask.sum((1, 2), keepdim=True)
        mean = advantage.sum((1, 2), keepdim=True) / count
        var = ((advantage - mean).pow(2) * mask).sum((1, 2), keepdim=True) / count
        advantage = (advantage - mean) / (var.sqrt() + 1e-8) * mask
    return advantage
