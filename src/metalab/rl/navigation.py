"""2D navigation (Finn et al. 2017, section 5.3), vectorised over tasks and trajectories.

A point robot starts at the origin; a task is a goal drawn uniformly from [-0.5, 0.5]^2. The
policy's action is clipped to [-1, 1] per axis and scaled to a velocity of at most 0.1; the
reward is the negative *Euclidean* distance to the goal after the move, and an episode ends
after 100 steps or once the robot is within 0.01 of the goal on both axes.

This is the environment of the code behind the paper's numbers: cbfinn/maml_rl's
``point_env_randgoal`` wrapped in rllab's ``normalize``, which maps the policy's [-1, 1] onto
the [-0.1, 0.1] action box. The scaling matters: a unit-variance Gaussian policy then explores
at 0.1 per step instead of being clipped at almost every step (pytorch-maml-rl clips the raw
action, a harder problem). The paper's text says "squared distance", but its published
returns (about -40 before adaptation) only match the plain distance.

All ``T`` tasks x ``N`` trajectories step together as tensors; nothing loops per robot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Navigation2D"]


@dataclass(frozen=True)
class Navigation2D:
    """The task distribution and the vectorised dynamics of 2D navigation."""

    horizon: int = 100
    max_action: float = 0.1
    goal_range: float = 0.5
    tolerance: float = 0.01
    observation_size: int = 2
    action_size: int = 2

    def sample_tasks(self, count: int, generator: torch.Generator,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """``count`` goals ``[count, 2]``, uniform in [-goal_range, goal_range]^2."""
        return (torch.rand(count, 2, generator=generator, dtype=dtype) * 2 - 1
                ) * self.goal_range

    def reset(self, goals: Tensor, trajectories: int) -> Tensor:
        """Start positions ``[T, N, 2]`` (the origin) for ``trajectories`` per goal."""
        return goals.new_zeros(goals.shape[0], trajectories, 2)

    def step(self, positions: Tensor, actions: Tensor, goals: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
        """Move every robot: (new positions, rewards ``[T, N]``, done ``[T, N]``)."""
        moved = positions + actions.clamp(-1, 1) * self.max_action
        offset = moved - goals[:, None, :]
        reward = -offset.norm(dim=-1)
        done = (offset.abs() < self.tolerance).all(-1)
        return moved, reward, done
