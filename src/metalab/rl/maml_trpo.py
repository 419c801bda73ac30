"""MAML for reinforcement learning (Finn et al. 2017, section 5.3): vanilla policy gradient
in the inner loop, TRPO as the meta-optimiser, all tasks of a meta-batch as one batched
computation (each task's adapted parameters stacked along a leading dimension).

One meta-iteration on tasks ``i = 1..T``:

    D_i     = rollouts of the policy theta on task i           (train episodes)
    theta_i = theta - alpha * grad L_VPG(theta; D_i)           (second order: differentiable)
    D'_i    = rollouts of theta_i on task i                    (validation episodes)
    theta  <- TRPO step on  mean_i L_surrogate(theta_i(theta); D'_i)
              subject to  mean_i KL(pi_theta_i_old || pi_theta_i(theta)) <= max_kl

``inner_steps = 0`` trains the policy on all tasks without adaptation (the paper's
"pretrained" baseline); ``first_order`` drops the second-order terms.

Under torchrun each process holds a share of the meta-batch's tasks (each task with its own
random generator) and the TRPO step adds the shares up (:mod:`metalab.rl.trpo`): the processes
take the step of one process holding every task, to float tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metalab import distributed
from metalab.rl.cheetah import HalfCheetahTasks
from metalab.rl.episodes import Episodes, advantages, rollout
from metalab.rl.navigation import Navigation2D
from metalab.rl.policy import Generators, Params, gaussian_kl, log_prob
from metalab.rl.trpo import TRPOResult, trpo_step

__all__ = ["MAMLTRPO", "adapt", "per_task", "vpg_loss"]


def per_task(params: Params, tasks: int) -> Params:
    """``params`` with a leading task dimension (copies that stay differentiable)."""
    return {k: v if v.dim() == _base_dim(k) + 1 else
            v.unsqueeze(0).expand(tasks, *v.shape).clone() for k, v in params.items()}


def _base_dim(name: str) -> int:
    return 2 if name.startswith("w") else 1


def vpg_loss(params: Params, episodes: Episodes, advantage: Tensor) -> Tensor:
    """The policy-gradient loss of each task ``[T]``: ``-mean_steps log pi(a|s) * A``."""
    logp = log_prob(params, episodes.flat(episodes.observations),
                    episodes.flat(episodes.actions))
    mask = episodes.flat(episodes.mask)
    return -(logp * episodes.flat(advantage) * mask).sum(1) / mask.sum(1)


def adapt(params: Params, episodes: Episodes, advantage: Tensor, lr: float,
          create_graph: bool) -> Params:
    """One VPG step on every task's episodes: per-task parameters ``theta - lr * grad``."""
    tasks = episodes.observations.shape[0]
    stacked = per_task(params, tasks)
    names = list(stacked)
    loss = vpg_loss(stacked, episodes, advantage).sum()  # tasks do not share a term
    grads = torch.autograd.grad(loss, [stacked[k] for k in names], create_graph=create_graph)
    return {k: stacked[k] - lr * g for k, g in zip(names, grads, strict=True)}


@dataclass
class MAMLTRPO:
    """The meta-learner's settings (defaults: the MAML paper's 2D navigation)."""

    env: Navigation2D | HalfCheetahTasks
    inner_lr: float = 0.1
    inner_steps: int = 1
    first_order: bool = False
    trajectories: int = 20
    gamma: float = 0.99
    gae_lambda: float = 1.0
    max_kl: float = 0.01
    cg_iterations: int = 10
    cg_damping: float = 1e-5
    # evaluation steps after the first use inner_lr * later_lr_scale: the paper halves it
    # ("halving the learning rate after the first gradient step produced superior performance")
    later_lr_scale: float = 0.5

    def rollout(self, params: Params, goals: Tensor, generator: Generators) -> Episodes:
        """Episodes of every goal: the environment's own rollout if it has one (simulators
        that keep their state), else the tensor dynamics' (:func:`~metalab.rl.episodes.rollout`)."""
        own = getattr(self.env, "rollout", None)
        if own is not None:
            return own(params, goals, self.trajectories, generator)
        return rollout(self.env, params, goals, self.trajectories, generator)

    def advantages(self, episodes: Episodes) -> Tensor:
        """GAE advantages of ``episodes`` with this learner's discounts (a baseline fit)."""
        return advantages(episodes, self.gamma, self.gae_lambda)

    def adapted(self, params: Params, episodes: Episodes, advantage: Tensor,
                create_graph: bool) -> Params:
        """``params`` after the inner steps on ``episodes`` with their ``advantage``
        (the identity when 0 steps)."""
        if self.inner_steps == 0:
            return per_task(params, episodes.observations.shape[0])
        return adapt(params, episodes, advantage, self.inner_lr, create_graph)

    def surrogate(self, train: Episodes, train_adv: Tensor, valid: Episodes, old: Params,
                  tasks: int | None = None):
        """``params -> (loss, kl)`` of the outer step, through the inner adaptation on
        ``train`` (whose advantages are fitted once, not at every call): sums over these
        episodes' tasks divided by ``tasks``, the whole meta-batch's count (default: these
        tasks alone, i.e. means)."""
        tasks = tasks or train.observations.shape[0]
        valid_adv = self.advantages(valid)
        observations = valid.flat(valid.observations)
        actions, mask = valid.flat(valid.actions), valid.flat(valid.mask)
        old_logp = log_prob(old, observations, actions).detach()
        count = mask.sum(1)

        def loss_and_kl(params: Params) -> tuple[Tensor, Tensor]:
            adapted = self.adapted(params, train, train_adv, not self.first_order)
            ratio = torch.exp(log_prob(adapted, observations, actions) - old_logp)
            loss = -((ratio * valid.flat(valid_adv) * mask).sum(1) / count).sum() / tasks
            kl = ((gaussian_kl(old, adapted, observations) * mask).sum(1) / count).sum() / tasks
            return loss, kl

        return loss_and_kl

    def step(self, params: Params, goals: Tensor, generator: Generators,
             tasks: int | None = None) -> tuple[Params, dict[str, float]]:
        """One meta-iteration on ``goals``; the new parameters and what happened (means over
        the meta-batch). Under torchrun ``goals`` are this process's share of the
        meta-batch's ``tasks`` tasks."""
        tasks = tasks or len(goals)
        train = self.rollout(params, goals, generator)
        train_adv = self.advantages(train)
        with torch.enable_grad():
            old = {k: v.detach() for k, v in self.adapted(
                {k: v.detach().requires_grad_() for k, v in params.items()}, train, train_adv,
                create_graph=False).items()}
        valid = self.rollout(old, goals, generator)
        result: TRPOResult = trpo_step(
            self.surrogate(train, train_adv, valid, old, tasks), params, self.max_kl,
            self.cg_iterations, self.cg_damping, reduce=distributed.all_sum)
        before, after, env_steps = distributed.all_sum(torch.stack(
            [train.returns.mean(1).sum() / tasks, valid.returns.mean(1).sum() / tasks,
             train.mask.sum() + valid.mask.sum()])).tolist()
        return result.params, {
            "return_before": before, "return_after": after, "env_steps": env_steps,
            "surrogate_before": result.loss_before, "surrogate_after": result.loss_after,
            "kl": result.kl, "step_fraction": result.step_fraction}

    def adaptation(self, params: Params, goals: Tensor, steps: int, generator: Generators,
                   final_rollout: bool = True) -> tuple[Params, list[Episodes]]:
        """Every goal's parameters after ``steps`` VPG steps, each on fresh rollouts of the
        current policy (how the paper reports adaptation), of step size ``inner_lr`` then
        ``inner_lr * later_lr_scale``; and the episodes of each step (then of the adapted
        policy, unless not ``final_rollout``)."""
        current = per_task({k: v.detach() for k, v in params.items()}, len(goals))
        rounds = []
        for s in range(steps):
            rounds.append(self.rollout(current, goals, generator))
            with torch.enable_grad():
                adv = self.advantages(rounds[-1])
                leaves = {k: v.requires_grad_() for k, v in current.items()}
                lr = self.inner_lr * (1 if s == 0 else self.later_lr_scale)
                current = {k: v.detach() for k, v in adapt(
                    leaves, rounds[-1], adv, lr, create_graph=False).items()}
        if final_rollout:
            rounds.append(self.rollout(current, goals, generator))
        return current, rounds

    def evaluate(self, params: Params, goals: Tensor, steps: int, generator: Generators
                 ) -> Tensor:
        """Mean return per task ``[steps + 1, T]`` after 0..``steps`` steps of
        :meth:`adaptation`."""
        _, rounds = self.adaptation(params, goals, steps, generator)
        return torch.stack([episodes.returns.mean(1) for episodes in rounds])
