"""2D navigation: train MAML-TRPO, the pretrained baseline and RL², then score them, the
random-initialisation baseline and the paper's figures on the same fixed test goals.

    python -m metalab.rl.study --out runs/rl/navigation --minutes 40 --baseline-minutes 12 \
        --rl2-minutes 20

Each policy trains in ``<out>/<name>/`` with ``last.pt`` written atomically every
``--save-every`` iterations (parameters, iteration, the random generator's state and the
history), so a stopped run resumes exactly where it stopped (``--resume`` is the default when
``last.pt`` exists): a resumed run equals an uninterrupted one. Evaluation: 40 fixed goals
(seed 12345), 20 trajectories per goal and step, returns after 0..3 VPG steps of step size
0.1 (RL²: the returns of episodes 1..4 of its trials), mean ± 95% CI over the goals; written
to ``<out>/results.json`` and printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metalab.evaluate import mean_ci95
from metalab.io import atomic_save, atomic_write_text
from metalab.rl.cheetah import INSTALL_HINT, HalfCheetahTasks
from metalab.rl.maml_trpo import MAMLTRPO
from metalab.rl.navigation import Navigation2D
from metalab.rl.policy import Params, init_policy
from metalab.rl.rl2 import RL2, RL2Policy

__all__ = ["PAPER", "evaluate_policies", "train"]

TEST_SEED, TEST_GOALS, EVAL_STEPS = 12345, 40, 3
# Finn et al. 2017, figure 4 / appendix table: MAML on 2D navigation after 0..3 steps
PAPER = {"maml (paper)": [-40.41, -11.68, -3.33, -3.23]}


def _loop(out: Path, state: dict[str, Any], step: Any, iterations: int, seconds: float,
          save_every: int, progress: bool) -> None:
    """Run ``step()`` (which returns the iteration's metrics) until ``iterations`` are done
    or ``seconds`` of training are spent, saving ``state`` (which ``step`` updates, with its
    ``history``) atomically every ``save_every`` iterations and at the end."""
    history = state["history"]
    spent = sum(h["seconds"] for h in history)
    while len(history) < iterations and spent < seconds:
        start = time.perf_counter()
        metrics = step()
        metrics["seconds"] = time.perf_counter() - start
        spent += metrics["seconds"]
        history.append(metrics)
        if progress:
            print(f"{out.name} {len(history)}: " + ", ".join(
                f"{k} {v:.3g}" for k, v in metrics.items()), flush=True)
        if len(history) % save_every == 0 or len(history) >= iterations or spent >= seconds:
            atomic_save(state, out / "last.pt")


def train(out: Path, algo: MAMLTRPO, iterations: int, seconds: float, seed: int = 0,
          meta_batch: int = 20, save_every: int = 10, hidden: tuple[int, ...] = (64, 64),
          progress: bool = True) -> tuple[Params, list[dict[str, float]]]:
    """Train (or resume) a MAML-TRPO policy in ``out`` for ``iterations`` meta-iterations or
    ``seconds`` of training, whichever ends first."""
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    if (out / "last.pt").exists():
        state = torch.load(out / "last.pt", weights_only=True)
        generator.set_state(state["generator"])
    else:
        state = {"params": init_policy(algo.env.observation_size, algo.env.action_size,
                                       hidden, generator), "history": []}
    state["generator"] = generator.get_state()

    def step() -> dict[str, float]:
        goals = algo.env.sample_tasks(meta_batch, generator)
        state["params"], metrics = algo.step(state["params"], goals, generator)
        state["generator"] = generator.get_state()
        return metrics

    _loop(out, state, step, iterations, seconds, save_every, progress)
    return state["params"], state["history"]


def train_rl2(out: Path, algo: RL2, iterations: int, seconds: float, seed: int = 0,
              meta_batch: int = 32, lr: float = 1e-3, save_every: int = 10,
              progress: bool = True) -> tuple[RL2Policy, list[dict[str, float]]]:
    """Train (or resume) an RL² policy in ``out`` (PPO, Adam), as :func:`train`."""
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    policy = RL2Policy(algo.env.observation_size, algo.env.action_size)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    state: dict[str, Any] = {"history": []}
    if (out / "last.pt").exists():
        state = torch.load(out / "last.pt", weights_only=True)
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])

    def step() -> dict[str, float]:
        metrics = algo.step(policy, optimizer, algo.env.sample_tasks(meta_batch, generator),
                            generator)
        state.update(policy=policy.state_dict(), optimizer=optimizer.state_dict(),
                     generator=generator.get_state())
        return metrics

    _loop(out, state, step, iterations, seconds, save_every, progress)
    return policy, state["history"]


def test_goals(env: Navigation2D | HalfCheetahTasks) -> Tensor:
    """The fixed test goals: 40 drawn with ``TEST_SEED``; for directions, 20 of each."""
    if isinstance(env, HalfCheetahTasks) and env.goal == "direction":
        return torch.tensor([1.0, -1.0]).repeat_interleave(TEST_GOALS // 2)
    return env.sample_tasks(TEST_GOALS, torch.Generator().manual_seed(TEST_SEED))


def evaluate_policies(policies: dict[str, Params], algo: MAMLTRPO, steps: int = EVAL_STEPS,
                      rl2: tuple[RL2, RL2Policy] | None = None) -> dict[str, Any]:
    """Returns after 0..``steps`` steps of every policy on the same fixed goals and rollout
    seeds (RL²: of episodes 1..steps+1 of ``algo.trajectories`` trials per goal), mean ± 95%
    CI over the goals; for direction tasks also over the forward and the backward goals."""
    goals = test_goals(algo.env)
    groups = {"": torch.ones(len(goals), dtype=torch.bool)}
    if isinstance(algo.env, HalfCheetahTasks) and algo.env.goal == "direction":
        groups |= {" forward": goals > 0, " backward": goals < 0}

    def summary(returns: Tensor) -> dict[str, list[dict[str, float]]]:
        return {suffix: [dict(zip(("mean", "ci95"), mean_ci95(r[chosen].tolist()),
                                  strict=True)) for r in returns]
                for suffix, chosen in groups.items()}

    returns = {name: algo.evaluate(params, goals, steps,
                                   torch.Generator().manual_seed(TEST_SEED + 1))
               for name, params in policies.items()}
    if rl2 is not None:
        learner, policy = rl2
        returns["rl2"] = learner.evaluate(policy, goals, steps + 1, algo.trajectories,
                                          torch.Generator().manual_seed(TEST_SEED + 1))
    return {name + suffix: row for name, r in returns.items()
            for suffix, row in summary(r).items()}


ENVIRONMENTS = {
    "navigation": {"env": Navigation2D, "meta_batch": 20, "steps": EVAL_STEPS,
                   "paper": PAPER},
    # MAML's mean return after one step: 293 in Finn et al. 2017; 170.4 ± 21.0 in the ANIL
    # paper's rerun (Raghu et al. 2020)
    "halfcheetah-dir": {"env": lambda: HalfCheetahTasks("direction"), "meta_batch": 40,
                        "steps": 1, "paper": {"maml (Finn et al.), after 1 step": [293.0],
                                              "maml (ANIL rerun), after 1 step": [170.4]}},
    "halfcheetah-vel": {"env": lambda: HalfCheetahTasks("velocity"), "meta_batch": 40,
                        "steps": 1, "paper": {}},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", choices=sorted(ENVIRONMENTS), default="navigation",
                        help="navigation (built in) or HalfCheetah direction / velocity "
                        "(needs " + INSTALL_HINT + ")")
    parser.add_argument("--out", type=Path, default=Path("runs/rl/navigation"))
    parser.add_argument("--minutes", type=float, default=40, help="MAML-TRPO training time")
    parser.add_argument("--baseline-minutes", type=float, default=12,
                        help="training time of the policy pretrained on all tasks")
    parser.add_argument("--rl2-minutes", type=float, default=20,
                        help="RL² training time (navigation only)")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64],
                        help="hidden ReLU layers (64 64, as pytorch-maml-rl; the paper: 100 100)")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    setting = ENVIRONMENTS[args.env]
    env = setting["env"]()
    hidden, batch = tuple(args.hidden), setting["meta_batch"]
    maml = MAMLTRPO(env, first_order=args.first_order)
    pretrained = MAMLTRPO(env, inner_steps=0)
    histories, policies = {}, {}
    for name, algo, minutes in (("maml", maml, args.minutes),
                                ("pretrained", pretrained, args.baseline_minutes)):
        policies[name], histories[name] = train(
            args.out / name, algo, args.iterations, minutes * 60, args.seed, batch,
            hidden=hidden, progress=not args.quiet)
    rl2 = None
    if isinstance(env, Navigation2D):
        rl2 = RL2(env)
        rl2_policy, histories["rl2"] = train_rl2(args.out / "rl2", rl2, 10**6,
                                                 args.rl2_minutes * 60, args.seed,
                                                 progress=not args.quiet)
        rl2 = (rl2, rl2_policy)
    policies["random init"] = init_policy(env.observation_size, env.action_size, hidden,
                                          torch.Generator().manual_seed(args.seed))
    rows = evaluate_policies(policies, maml, setting["steps"], rl2)
    report = {"env": args.env, "goals": TEST_GOALS, "seed": TEST_SEED,
              "trajectories": maml.trajectories, "inner_lr": maml.inner_lr, "hidden": hidden,
              "first_order": args.first_order, "meta_batch": batch,
              "training": {name: {"iterations": len(h),
                                  "minutes": sum(x["seconds"] for x in h) / 60, "history": h}
                           for name, h in histories.items()},
              "returns": rows, "paper": setting["paper"]}
    atomic_write_text(json.dumps(report, indent=1) + "\n", args.out / "results.json")
    steps = range(setting["steps"] + 1)
    print("| policy | " + " | ".join(f"{s} steps" for s in steps) + " |\n|---|"
          + "---:|" * len(steps))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{r['mean']:.2f} ± {r['ci95']:.2f}" for r in row)
              + " |")
    for name, row in setting["paper"].items():
        print(f"| {name} | " + " | ".join(f"{r:.2f}" for r in row) + " |")


if __name__ == "__main__":
    main()
