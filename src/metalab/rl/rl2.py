"""RL² (Duan et al. 2016): a recurrent policy that adapts through its hidden state.

A trial is ``episodes`` consecutive episodes of one task. At every step a GRU reads the
observation, the previous action, the previous reward and whether the previous step ended an
episode; its hidden state is kept across the episodes of a trial (reset only between trials),
so what it learnt about the task in one episode shapes the next. A Gaussian head (state-
independent log standard deviation) acts and a linear head estimates the value. Training is
PPO on whole trials (the return of a trial spans its episodes; GAE, clipped ratio).

Its "adaptation steps" are episodes: the return of episode ``k + 1`` of a trial is the
counterpart of MAML's return after ``k`` gradient steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalab.rl.navigation import Navigation2D

__all__ = ["RL2", "RL2Policy", "Trials"]


class RL2Policy(nn.Module):
    """GRU over (observation, previous action, previous reward, previous done)."""

    def __init__(self, observation_size: int, action_size: int, hidden: int = 64) -> None:
        super().__init__()
        self.action_size = action_size
        self.cell = nn.GRUCell(observation_size + action_size + 2, hidden)
        self.mean = nn.Linear(hidden, action_size)
        self.value = nn.Linear(hidden, 1)
        self.log_std = nn.Parameter(torch.zeros(action_size))

    def initial_state(self, batch: int) -> Tensor:
        return torch.zeros(batch, self.cell.hidden_size)

    def forward(self, inputs: Tensor, hidden: Tensor, alive: Tensor) -> Tensor:
        """The next hidden state; unchanged where ``alive`` is 0 (an ended episode's
        remaining steps)."""
        new = self.cell(inputs, hidden)
        return alive[:, None] * new + (1 - alive[:, None]) * hidden

    def log_prob(self, hidden: Tensor, actions: Tensor) -> Tensor:
        z = (actions - self.mean(hidden)) * torch.exp(-self.log_std)
        return (-0.5 * z.pow(2) - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


@dataclass
class Trials:
    inputs: Tensor  # [S, B, in]: what the GRU read at each step
    actions: Tensor  # [S, B, act]
    rewards: Tensor  # [S, B]
    mask: Tensor  # [S, B] 1 for steps taken (an episode that reached its goal stops early)
    episode_returns: Tensor  # [episodes, B]


def run_trials(policy: RL2Policy, env: Navigation2D, goals: Tensor, episodes: int,
               generator: torch.Generator) -> Trials:
    """One trial of ``episodes`` episodes per goal (no gradient)."""
    batch = len(goals)
    hidden = policy.initial_state(batch)
    previous = torch.zeros(batch, env.action_size + 2)
    inputs, actions, rewards, masks, returns = [], [], [], [], []
    with torch.no_grad():
        for _ in range(episodes):
            positions = env.reset(goals, 1)[:, 0]
            alive = torch.ones(batch)
            total = torch.zeros(batch)
            for t in range(env.horizon):
                step_input = torch.cat([positions, previous], -1)
                hidden = policy(step_input, hidden, alive)
                mean = policy.mean(hidden)
                action = mean + torch.exp(policy.log_std) * torch.randn(
                    mean.shape, generator=generator)
                moved, reward, done = env.step(positions[:, None], action[:, None], goals)
                reward, done = reward[:, 0] * alive, done[:, 0]
                last = torch.full((batch, 1), float(t == env.horizon - 1))
                ended = torch.maximum(done.float()[:, None], last)
                inputs.append(step_input)
                actions.append(action)
                rewards.append(reward)
                masks.append(alive)
                previous = torch.cat([action, reward[:, None], ended], -1) * alive[:, None] + \
                    previous * (1 - alive[:, None])
                total = total + reward
                positions = moved[:, 0]
                alive = alive * (~done).float()
            previous[:, -1] = 1.0  # the episode ended, whatever the last step said
            returns.append(total)
    stack = lambda xs: torch.stack(xs)  # noqa: E731
    return Trials(stack(inputs), stack(actions), stack(rewards), stack(masks), stack(returns))


@dataclass
class RL2:
    """PPO on trials of ``episodes`` episodes (defaults sized for 2D navigation)."""

    env: Navigation2D
    episodes: int = 3
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    epochs: int = 5
    minibatches: int = 4
    value_coef: float = 0.5

    def _replay(self, policy: RL2Policy, trials: Trials) -> Tensor:
        """Hidden states ``[S, B, H]`` of the policy on the recorded inputs (with gradient)."""
        hidden = policy.initial_state(trials.inputs.shape[1])
        states = []
        for step_input, alive in zip(trials.inputs, trials.mask, strict=True):
            hidden = policy(step_input, hidden, alive)
            states.append(hidden)
        return torch.stack(states)

    def step(self, policy: RL2Policy, optimizer: torch.optim.Optimizer, goals: Tensor,
             generator: torch.Generator) -> dict[str, float]:
        trials = run_trials(policy, self.env, goals, self.episodes, generator)
        mask = trials.mask
        with torch.no_grad():
            states = self._replay(policy, trials)
            values = policy.value(states).squeeze(-1) * mask
            old_logp = policy.log_prob(states, trials.actions)
            # GAE over the whole trial; masked steps pass the next live value through
            advantage = torch.zeros_like(values)
            running = torch.zeros(values.shape[1])
            next_value = torch.zeros(values.shape[1])
            for t in reversed(range(values.shape[0])):
                delta = trials.rewards[t] + self.gamma * next_value - values[t]
                new = delta + self.gamma * self.gae_lambda * running
                running = mask[t] * new + (1 - mask[t]) * running
                next_value = mask[t] * values[t] + (1 - mask[t]) * next_value
                advantage[t] = running * mask[t]
            targets = advantage + values
            count = mask.sum()
            mean = advantage.sum() / count
            std = (((advantage - mean) ** 2 * mask).sum() / count).sqrt()
            normalised = (advantage - mean) / (std + 1e-8) * mask
        order = torch.randperm(len(goals), generator=generator)
        for _ in range(self.epochs):
            for part in order.chunk(self.minibatches):
                sub = Trials(trials.inputs[:, part], trials.actions[:, part],
                             trials.rewards[:, part], mask[:, part], trials.episode_returns)
                states = self._replay(policy, sub)
                ratio = torch.exp(policy.log_prob(states, sub.actions) - old_logp[:, part])
                adv = normalised[:, part]
                surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - self.clip,
                                                                   1 + self.clip) * adv)
                value_error = (policy.value(states).squeeze(-1) - targets[:, part]).pow(2)
                steps = sub.mask.sum()
                loss = (-(surrogate * sub.mask).sum()
                        + self.value_coef * (value_error * sub.mask).sum()) / steps
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                optimizer.step()
        return {**{f"return_episode_{k + 1}": float(r.mean())
                   for k, r in enumerate(trials.episode_returns)},
                "env_steps": float(trials.mask.sum())}

    def evaluate(self, policy: RL2Policy, goals: Tensor, episodes: int, trials: int,
                 generator: torch.Generator) -> Tensor:
        """Mean return per goal ``[episodes, T]`` of each episode of ``trials`` trials."""
        returns = run_trials(policy, self.env, goals.repeat_interleave(trials, 0), episodes,
                             generator).episode_returns
        return returns.view(episodes, len(goals), trials).mean(-1)

