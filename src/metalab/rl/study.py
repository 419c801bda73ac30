"""Training loops, the fixed test goals and the evaluation of meta-RL policies (what
:mod:`metalab.rl.run` runs for ``metalab train``, ``evaluate`` and ``compare``).

:func:`train` (MAML-TRPO and the pretrained baseline) and :func:`train_rl2` write ``last.pt``
atomically every 10 iterations (parameters and history; RL² also its optimiser and
generator) and ``log.jsonl``, and resume from ``last.pt``: a resumed run equals an
uninterrupted one. :func:`train` draws iteration ``s``'s goals from ``(seed, s)`` and task
``i``'s rollouts from ``(seed, s, i)``, so under torchrun each process rolls out its share of
the tasks and the processes train the policy of one process.

Evaluation: 40 fixed goals (seed 12345; HalfCheetah direction: 20 forward, 20 backward), the
learner's trajectories per goal and step, returns after 0..N VPG steps (step sizes: the
training one, then half of it, as the paper; RL²: the returns of episodes 1..N+1 of its
trials), mean ± 95% CI over the goals.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from metalab import distributed
from metalab.evaluate import mean_ci95
from metalab.io import atomic_save, atomic_write_text
from metalab.plots import paths_to_goals
from metalab.rl.cheetah import HalfCheetahTasks
from metalab.rl.maml_trpo import MAMLTRPO
from metalab.rl.navigation import Navigation2D
from metalab.rl.policy import Params, init_policy
from metalab.rl.rl2 import RL2, RL2Policy
from metalab.tasks import step_generator, task_generator

__all__ = ["ENVIRONMENTS", "VAL_SEED", "draw_paths", "evaluate_policies", "test_goals", "train",
           "train_rl2"]

TEST_SEED, TEST_GOALS, EVAL_STEPS = 12345, 40, 3
VAL_SEED = 1234  # the validation goals and rollouts that choose best.pt (never the test's)


def _headline(metrics: dict[str, float]) -> str:
    """The return a progress bar shows: after adaptation (MAML-TRPO), or of a trial's last
    episode (RL²)."""
    key = "return_after" if "return_after" in metrics else max(
        k for k in metrics if k.startswith("return_episode_"))
    return f"{metrics[key]:.2f}"


def _loop(out: Path, state: dict[str, Any], step: Any, iterations: int, seconds: float,
          save_every: int, progress: bool, every_rank: bool = True,
          validate: Callable[[], float] | None = None) -> None:
    """Run ``step()`` (which returns the iteration's metrics) until ``iterations`` are done
    or ``seconds`` of training are spent, with a progress bar (return, environment steps per
    second), saving ``state`` (which ``step`` updates, with its ``history``) atomically to
    ``last.pt`` and the history to ``log.jsonl`` every ``save_every`` iterations and at the
    end. ``validate()`` scores the current policy at each save (higher is better); the best
    so far is also saved as ``best.pt``. In a process group rank 0 alone shows progress,
    validates and saves; when ``every_rank`` runs the loop, rank 0's clock decides for all
    when to stop."""
    history = state["history"]
    main_rank = distributed.rank() == 0
    spent = sum(h["seconds"] for h in history)

    def out_of_time() -> bool:
        return distributed.broadcast_object(spent >= seconds) if every_rank else spent >= seconds

    bar = tqdm(total=iterations, initial=len(history), desc=out.name, unit="it",
               disable=not (progress and main_rank), dynamic_ncols=True)
    while len(history) < iterations and not out_of_time():
        start = time.perf_counter()
        metrics = step()
        metrics["seconds"] = time.perf_counter() - start
        spent += metrics["seconds"]
        history.append(metrics)
        bar.set_postfix({"return": _headline(metrics),
                         "env steps/s": f"{metrics['env_steps'] / metrics['seconds']:,.0f}"})
        bar.update()
        if main_rank and (len(history) % save_every == 0 or len(history) >= iterations
                          or spent >= seconds):
            if validate is not None:  # logged as the supervised trainer logs validation
                metrics["val_return"], metrics["train_seconds"] = validate(), spent
                if state.get("best") is None or metrics["val_return"] > state["best"]:
                    state["best"], state["best_iteration"] = metrics["val_return"], len(history)
                    atomic_save(state, out / "best.pt")
            atomic_save(state, out / "last.pt")
            atomic_write_text("".join(json.dumps(h) + "\n" for h in history),
                              out / "log.jsonl")
    bar.close()


def train(out: Path, algo: MAMLTRPO, iterations: int, seconds: float, seed: int = 0,
          meta_batch: int = 20, save_every: int = 10, hidden: tuple[int, ...] = (100, 100),
          progress: bool = True, extra: dict[str, Any] | None = None,
          validate: Callable[[Params], float] | None = None,
          ) -> tuple[Params, list[dict[str, float]]]:
    """Train (or resume) a MAML-TRPO policy in ``out`` for ``iterations`` meta-iterations or
    ``seconds`` of training, whichever ends first; in a process group, on this rank's share
    of each meta-batch. ``extra`` is saved in the checkpoint too (e.g. the run's config; a
    resumed run records the new one); ``validate(params)`` chooses ``best.pt``."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "last.pt").exists():
        state = {**torch.load(out / "last.pt", weights_only=True), **(extra or {})}
    else:
        state = {"params": init_policy(algo.env.observation_size, algo.env.action_size,
                                       hidden, torch.Generator().manual_seed(seed)),
                 "history": [], **(extra or {})}
    share = distributed.task_share(meta_batch, distributed.rank(), distributed.world_size())

    def step() -> dict[str, float]:
        iteration = len(state["history"])
        goals = algo.env.sample_tasks(meta_batch, step_generator(seed, iteration))
        generators = [task_generator(seed, iteration, i) for i in share]
        state["params"], metrics = algo.step(state["params"], goals[share.start:share.stop],
                                             generators, meta_batch)
        return metrics

    _loop(out, state, step, iterations, seconds, save_every, progress,
          validate=validate and (lambda: validate(state["params"])))
    return state["params"], state["history"]


def train_rl2(out: Path, algo: RL2, iterations: int, seconds: float, seed: int = 0,
              meta_batch: int = 32, lr: float = 1e-3, save_every: int = 10,
              progress: bool = True, extra: dict[str, Any] | None = None,
              validate: Callable[[RL2Policy], float] | None = None,
              ) -> tuple[RL2Policy, list[dict[str, float]]]:
    """Train (or resume) an RL² policy in ``out`` (PPO, Adam), as :func:`train`, in this
    process alone."""
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    policy = RL2Policy(algo.env.observation_size, algo.env.action_size)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    state: dict[str, Any] = {"history": [], **(extra or {})}
    if (out / "last.pt").exists():
        state = {**torch.load(out / "last.pt", weights_only=True), **(extra or {})}
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])

    def step() -> dict[str, float]:
        metrics = algo.step(policy, optimizer, algo.env.sample_tasks(meta_batch, generator),
                            generator)
        state.update(policy=policy.state_dict(), optimizer=optimizer.state_dict(),
                     generator=generator.get_state())
        return metrics

    _loop(out, state, step, iterations, seconds, save_every, progress, every_rank=False,
          validate=validate and (lambda: validate(policy)))
    return policy, state["history"]


def test_goals(env: Navigation2D | HalfCheetahTasks, seed: int = TEST_SEED) -> Tensor:
    """The fixed test goals: 40 drawn with ``seed``; for directions, 20 of each."""
    if isinstance(env, HalfCheetahTasks) and env.goal == "direction":
        return torch.tensor([1.0, -1.0]).repeat_interleave(TEST_GOALS // 2)
    return env.sample_tasks(TEST_GOALS, torch.Generator().manual_seed(seed))


def evaluate_policies(policies: dict[str, Params], algo: MAMLTRPO, steps: int = EVAL_STEPS,
                      rl2: tuple[RL2, RL2Policy] | None = None, seed: int = TEST_SEED,
                      ) -> dict[str, Any]:
    """Returns after 0..``steps`` steps of every policy on the same fixed goals and rollout
    seeds (RL²: of episodes 1..steps+1 of ``algo.trajectories`` trials per goal), mean ± 95%
    CI over the goals; for direction tasks also over the forward and the backward goals.
    ``seed`` draws goals and rollouts: the test's, or ``VAL_SEED`` for validation."""
    goals = test_goals(algo.env, seed)
    groups = {"": torch.ones(len(goals), dtype=torch.bool)}
    if isinstance(algo.env, HalfCheetahTasks) and algo.env.goal == "direction":
        groups |= {" forward": goals > 0, " backward": goals < 0}

    def summary(returns: Tensor) -> dict[str, list[dict[str, float]]]:
        return {suffix: [dict(zip(("mean", "ci95"), mean_ci95(r[chosen].tolist()),
                                  strict=True)) for r in returns]
                for suffix, chosen in groups.items()}

    def rollouts() -> list[torch.Generator]:  # the same for every policy
        return [task_generator(seed, 0, i) for i in range(len(goals))]

    returns = {name: algo.evaluate(params, goals, steps, rollouts())
               for name, params in policies.items()}
    if rl2 is not None:
        learner, policy = rl2
        returns["rl2"] = learner.evaluate(policy, goals, steps + 1, algo.trajectories,
                                          torch.Generator().manual_seed(seed + 1))
    return {name + suffix: row for name, r in returns.items()
            for suffix, row in summary(r).items()}


# name -> the task distribution (RLConfig.env)
ENVIRONMENTS: dict[str, Callable[[], Navigation2D | HalfCheetahTasks]] = {
    "navigation": Navigation2D,
    "halfcheetah-dir": partial(HalfCheetahTasks, "direction"),
    "halfcheetah-vel": partial(HalfCheetahTasks, "velocity"),
}
PICTURED_GOALS, PICTURED_TRAJECTORIES = 4, 3


def draw_paths(algo: MAMLTRPO, params: Params, stem: Path) -> list[Path]:
    """The first fixed test goals with a few trajectories before and after 1..3 adaptation
    steps (2D navigation), as PNG and SVG."""
    goals = test_goals(algo.env)[:PICTURED_GOALS]
    _, rounds = algo.adaptation(params, goals, EVAL_STEPS,
                                [task_generator(TEST_SEED, 0, i) for i in range(len(goals))])
    paths = {}
    for step, episodes in enumerate(rounds):
        stage = "before adaptation" if step == 0 else f"after {step} step{'s' * (step > 1)}"
        paths[stage] = [[[(0.0, 0.0)] + [tuple(episodes.observations[g, t, n].tolist())
                                         for t in range(1, int(episodes.mask[g, :, n].sum()))]
                         for n in range(PICTURED_TRAJECTORIES)] for g in range(len(goals))]
    return paths_to_goals([tuple(g.tolist()) for g in goals], paths, stem)
