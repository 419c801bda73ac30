"""One MAML-TRPO meta-iteration, split into its parts: rollouts (train and validation),
baseline fits (the linear feature baseline and GAE), the inner VPG step, and the TRPO step
(conjugate gradient on Fisher-vector products through the inner step, line search); and the
environment steps per second of the rollouts and of the bare simulator.

The built-in configs' iterations: ``rl/maml-nav2d`` (20 tasks x 20 trajectories x 100
steps, a 2 x 100 policy) and, when MuJoCo is installed (``pip install "metalab[rl]"``),
``rl/maml-cheetah-dir`` (40 tasks x 20 x 200, ``--cheetah-tasks`` to scale), each task rolled
out from its own generator as in training. Medians over ``--repeats`` iterations after one
untimed.

    python benchmarks/rl_iteration.py [--repeats 5] [--cheetah-tasks 40] [--quick]
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import numpy as np
import torch

import harness
from metalab.config import load_config
from metalab.rl.maml_trpo import MAMLTRPO, adapt
from metalab.rl.navigation import Navigation2D
from metalab.rl.policy import Generators, init_policy
from metalab.rl.trpo import trpo_step
from metalab.tasks import step_generator, task_generator

FULL = {"repeats": 5, "cheetah_tasks": 40, "threads": 1}
QUICK = {"repeats": 1, "cheetah_tasks": 4}


def timed_iteration(algo: MAMLTRPO, params: dict, goals: torch.Tensor,
                    generator: Generators) -> dict[str, float]:
    """The parts of ``algo.step`` timed one by one (the same computation)."""
    laps: dict[str, float] = {}

    def lap(name: str, start: float) -> float:
        now = time.perf_counter()
        laps[name] = laps.get(name, 0.0) + now - start
        return now

    start = time.perf_counter()
    train = algo.rollout(params, goals, generator)
    start = lap("rollouts", start)
    train_adv = algo.advantages(train)
    start = lap("baseline fits", start)
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        old = {k: v.detach() for k, v in adapt(leaves, train, train_adv, algo.inner_lr,
                                               create_graph=False).items()}
    start = lap("inner step", start)
    valid = algo.rollout(old, goals, generator)
    start = lap("rollouts", start)
    algo.advantages(valid)
    start = lap("baseline fits", start)
    trpo_step(algo.surrogate(train, train_adv, valid, old), params, algo.max_kl, algo.cg_iterations,
              algo.cg_damping)
    lap("TRPO step", start)
    steps = 2 * train.mask.numel()
    laps["total"] = sum(laps.values())
    laps["rollout env steps/s"] = steps / laps["rollouts"]
    return laps


def bare_steps_per_second(env, tasks: int, trajectories: int, steps: int = 100) -> float:
    """Simulator steps per second without a policy (random actions)."""
    if isinstance(env, Navigation2D):
        goals = env.sample_tasks(tasks, torch.Generator().manual_seed(0))
        positions = env.reset(goals, trajectories)
        actions = torch.zeros_like(positions)
        start = time.perf_counter()
        for _ in range(steps):
            positions, _, _ = env.step(positions, actions, goals)
        return tasks * trajectories * steps / (time.perf_counter() - start)
    envs = env._vector(tasks * trajectories)
    envs.reset(seed=0)
    actions = np.zeros((tasks * trajectories, env.action_size), dtype=np.float32)
    start = time.perf_counter()
    for _ in range(steps):
        envs.step(actions)
    return tasks * trajectories * steps / (time.perf_counter() - start)


def measure(name: str, config_name: str, tasks: int | None, repeats: int) -> dict:
    config = load_config(config_name, [f"meta_batch={tasks}"] if tasks else [])
    algo, env, tasks = config.learner(), config.learner().env, config.meta_batch
    params = init_policy(env.observation_size, env.action_size, tuple(config.hidden),
                         torch.Generator().manual_seed(0))
    runs = [timed_iteration(algo, params, env.sample_tasks(tasks, step_generator(0, i)),
                            [task_generator(0, i, t) for t in range(tasks)])
            for i in range(repeats + 1)][1:]
    summary = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    summary["bare env steps/s"] = bare_steps_per_second(env, tasks, algo.trajectories)
    print(f"\n{name} ({config_name}): {tasks} tasks x {algo.trajectories} trajectories x "
          f"{env.horizon} steps")
    for key, value in summary.items():
        unit = "" if "/s" in key else " s"
        print(f"  {key:<22} {value:,.3f}{unit}" if unit else f"  {key:<22} {value:,.0f}")
    return {"config": config_name, "tasks": tasks, "trajectories": algo.trajectories,
            "horizon": env.horizon, "hidden": config.hidden, "median": summary, "runs": runs}


def main() -> None:
    args = harness.Options(__doc__, "rl_iteration", FULL, QUICK).parse()
    report = {"navigation": measure("2D navigation", "rl/maml-nav2d", None, args.repeats)}
    if importlib.util.find_spec("mujoco"):
        report["halfcheetah-dir"] = measure("HalfCheetah direction", "rl/maml-cheetah-dir",
                                            args.cheetah_tasks, args.repeats)
    else:
        report["halfcheetah-dir"] = "not measured: MuJoCo is not installed"
    harness.write_json(args.out, "rl_iteration", {"repeats": args.repeats, **report})


if __name__ == "__main__":
    main()
