"""Meta-RL runs from configs: ``metalab train rl/maml-nav2d``, ``metalab evaluate
<run>/last.pt`` and ``metalab compare --suite nav2d``.

A config with ``kind: rl`` (:class:`RLConfig`) names an environment and an algorithm:

* ``maml-trpo``: MAML with VPG inner steps and a TRPO meta-step (:mod:`metalab.rl.maml_trpo`);
* ``pretrained``: the same TRPO on every task without adaptation, adapted at test time with
  the same VPG steps (the paper's "pretrained" baseline);
* ``rl2``: a GRU policy trained with PPO across the episodes of a trial
  (:mod:`metalab.rl.rl2`, 2D navigation).

Training writes ``<out>/last.pt`` (with the config, so ``metalab evaluate`` rebuilds the
run from it) and resumes from it; evaluation scores the returns after 0..``eval_steps``
adaptation steps on the fixed test goals of :mod:`metalab.rl.study` and writes
``<out>/test.json``.
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator

from metalab import distributed
from metalab.config import Schema, load_config
from metalab.io import atomic_write_text
from metalab.kinds import REINFORCEMENT
from metalab.rl.maml_trpo import MAMLTRPO
from metalab.rl.policy import Params, init_policy
from metalab.rl.rl2 import RL2, RL2Policy, run_trials
from metalab.rl.study import (
    ENVIRONMENTS,
    TEST_SEED,
    VAL_SEED,
    draw_paths,
    evaluate_policies,
    test_goals,
    train,
    train_rl2,
)
from metalab.runfolder import RunFolderError
from metalab.tasks import task_generator

__all__ = ["NAV2D_SUITE", "RLConfig", "evaluate_run", "is_rl_checkpoint", "nav2d", "train_run"]

Positive = Annotated[int, Field(ge=1)]
ROW_STEPS = 2  # adaptation steps of the comparison's score and of the adaptation time


class RLConfig(Schema):
    """A meta-RL run (``kind: rl``). Defaults: MAML-TRPO on 2D navigation as the code behind
    the MAML paper's numbers (20 tasks x 20 trajectories, 2 x 100 ReLU, VPG step 0.5)."""

    kind: Literal["rl"] = "rl"
    env: Literal["navigation", "halfcheetah-dir", "halfcheetah-vel"] = "navigation"
    algorithm: Literal["maml-trpo", "pretrained", "rl2"] = "maml-trpo"
    hidden: list[Positive] = Field(default_factory=lambda: [100, 100])
    meta_batch: Positive = 20  # tasks per meta-iteration
    trajectories: Positive = 20  # episodes per task and adaptation step
    inner_lr: float = Field(0.5, gt=0)  # VPG step; later test steps take half
    first_order: bool = False
    iterations: Positive = 500
    minutes: float = Field(0.0, ge=0)  # >0: also stop after this much training time
    lr: float = Field(1e-3, gt=0)  # RL²'s Adam
    eval_steps: Annotated[int, Field(ge=0)] = 3
    # episodes per goal and test step: the test batch of the code behind the paper's numbers
    # (cbfinn/maml_rl's test_maml_point.py: 4,000 steps, "2x" the training batch)
    eval_trajectories: Positive = 40
    seed: Annotated[int, Field(ge=0)] = 0
    out: str = "runs/rl"

    @model_validator(mode="after")
    def _rl2_navigates(self) -> RLConfig:
        if self.algorithm == "rl2" and self.env != "navigation":
            raise ValueError("rl2 is built for 2D navigation (env: navigation) here; "
                             "train maml-trpo or pretrained on HalfCheetah.")
        return self

    def learner(self, testing: bool = False) -> MAMLTRPO:
        """The MAML-TRPO learner of this config (``pretrained``: no inner steps); with
        ``testing``, the one that adapts every policy at test time (``eval_trajectories``
        episodes per step)."""
        return MAMLTRPO(ENVIRONMENTS[self.env](), inner_lr=self.inner_lr,
                        inner_steps=0 if self.algorithm == "pretrained" else 1,
                        first_order=self.first_order,
                        trajectories=self.eval_trajectories if testing else self.trajectories)


def is_rl_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint written by :func:`train_run` (False for anything
    else, including a missing or unreadable file: its own loader says what is wrong)."""
    try:  # memory-mapped: deciding reads the small config, not the weights
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError):
        return False
    return _is_rl_state(state)


def _is_rl_state(state: object) -> bool:
    return (isinstance(state, dict) and isinstance(state.get("config"), dict)
            and state["config"].get("kind") == "rl")


def _prepare(config: RLConfig, resume: bool, overwrite: bool) -> Path:
    out = Path(config.out)
    last = out / "last.pt"
    if last.exists() and not resume:
        if not overwrite:
            raise RunFolderError(
                f"{out} holds a run already: continue it with --resume, or start afresh with "
                f"--overwrite (the old run is moved aside).")
        if distributed.rank() == 0:
            shutil.move(out, out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
    if resume and not last.exists():
        raise FileNotFoundError(f"--resume: no {last} to continue; drop --resume to start.")
    distributed.barrier()
    return out


def train_run(config: RLConfig, resume: bool = False, overwrite: bool = False,
              progress: bool = True) -> dict[str, Any] | None:
    """Train ``config``'s policy into ``config.out`` (under torchrun: MAML-TRPO and the
    pretrained baseline on every rank's share of the tasks, RL² on rank 0), then score it
    on rank 0 (:func:`evaluate_run`); returns the test record there, None elsewhere."""
    out = _prepare(config, resume, overwrite)
    seconds = config.minutes * 60 or float("inf")
    extra = {"config": config.to_dict()}
    if config.algorithm == "rl2":
        if distributed.rank() == 0:
            train_rl2(out, RL2(ENVIRONMENTS[config.env]()), config.iterations, seconds,
                      config.seed, config.meta_batch, config.lr, progress=progress,
                      extra=extra, validate=partial(validation_return, config))
    else:
        train(out, config.learner(), config.iterations, seconds, config.seed,
              config.meta_batch, hidden=tuple(config.hidden), progress=progress, extra=extra,
              validate=partial(validation_return, config))
    if distributed.rank() != 0:
        return None
    return evaluate_run(chosen_checkpoint(out))


def chosen_checkpoint(out: Path) -> Path:
    """The checkpoint a run is scored with: ``best.pt`` (the best validation return) when
    the run validated, else ``last.pt``."""
    return out / "best.pt" if (out / "best.pt").exists() else out / "last.pt"


def validation_return(config: RLConfig, policy: Params | RL2Policy) -> float:
    """The mean return after 1..``eval_steps`` adaptation steps (RL²: of episodes
    2..eval_steps+1 of its trials) on 40 validation goals (``VAL_SEED``; the test's goals and
    rollouts are never used to choose a checkpoint)."""
    rows = _scores(config, policy, seed=VAL_SEED)
    returns = next(iter(rows.values()))[1:] or next(iter(rows.values()))
    return sum(r["mean"] for r in returns) / len(returns)


def _scores(config: RLConfig, policy: Params | RL2Policy, name: str | None = None,
            seed: int = TEST_SEED) -> dict[str, Any]:
    """:func:`~metalab.rl.study.evaluate_policies` of one policy (MLP parameters or RL²) with
    this config's test-time learner and steps, on the goals and rollouts of ``seed``."""
    learner = config.learner(testing=True)
    if isinstance(policy, RL2Policy):
        return evaluate_policies({}, learner, config.eval_steps, (RL2(learner.env), policy),
                                 seed=seed)
    return evaluate_policies({name or config.algorithm: policy}, learner, config.eval_steps,
                             seed=seed)


def _parameters(policy: Params | RL2Policy) -> int:
    values = policy.parameters() if isinstance(policy, RL2Policy) else policy.values()
    return sum(v.numel() for v in values)


def _load(checkpoint: Path) -> tuple[RLConfig, dict[str, Any]]:
    state = torch.load(checkpoint, weights_only=True)
    if not _is_rl_state(state):
        raise ValueError(f"{checkpoint} was not written by a meta-RL run (kind: rl).")
    return RLConfig.from_dict(state["config"], source=str(checkpoint)), state


def _policy(config: RLConfig, state: dict[str, Any]) -> Params | RL2Policy:
    if config.algorithm != "rl2":
        return state["params"]
    env = ENVIRONMENTS[config.env]()
    policy = RL2Policy(env.observation_size, env.action_size)
    policy.load_state_dict(state["policy"])
    return policy


def evaluate_run(checkpoint: Path, write: bool = True, eval_steps: int | None = None,
                 ) -> dict[str, Any]:
    """The returns after 0..``eval_steps`` (default: the config's) adaptation steps (RL²:
    episodes 1..eval_steps+1 of a trial) on the fixed test goals, mean ± 95% CI; also the
    whole run's iterations, minutes and environment steps (from ``last.pt`` beside it), the
    iteration whose weights were scored, the parameters and the adaptation time. Written to
    ``test.json`` beside ``checkpoint``."""
    config, state = _load(checkpoint)
    if eval_steps is not None:
        config = config.replace(eval_steps=eval_steps)
    policy = _policy(config, state)
    rows = _scores(config, policy)
    last = checkpoint.parent / "last.pt"  # the whole run's cost, whichever weights are scored
    history = (torch.load(last, weights_only=True)["history"]
               if checkpoint.name != last.name and last.exists() else state["history"])
    record = {"config": config.to_dict(), "returns": next(iter(rows.values())),
              "checkpoint": checkpoint.name, "weights_of_iteration": len(state["history"]),
              "adapt_ms": adaptation_ms(config.learner(testing=True), policy),
              "by_group": rows, "iterations": len(history),
              "train_minutes": sum(h["seconds"] for h in history) / 60,
              "env_steps": sum(h.get("env_steps", 0) for h in history),
              "parameters": _parameters(policy)}
    if write:
        atomic_write_text(json.dumps(record, indent=1) + "\n", checkpoint.parent / "test.json")
    return record


def adaptation_ms(learner: MAMLTRPO, policy: Params | RL2Policy, repeats: int = 5) -> float:
    """Median time (ms) to adapt to one new test goal with ``ROW_STEPS`` steps: rolling out
    the episodes of each step and taking the VPG steps (RL²: running ``ROW_STEPS`` episodes
    of a trial, its hidden state being the adaptation). Computation only: on a robot, the
    episodes' own duration comes on top."""
    goal = test_goals(learner.env)[:1]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if isinstance(policy, RL2Policy):
            run_trials(policy, learner.env, goal, ROW_STEPS, task_generator(0, 0, 0))
        else:
            learner.adaptation(policy, goal, ROW_STEPS, [task_generator(0, 0, 0)],
                               final_rollout=False)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def format_returns(returns: list[dict[str, float]]) -> str:
    """``step: mean ± ci`` of each adaptation step, on one line."""
    return ", ".join(f"{s} steps {REINFORCEMENT.format(r['mean'], r['ci95'])}"
                     for s, r in enumerate(returns))


# -- metalab compare --suite nav2d -----------------------------------------------------------------

NAV2D_SUITE = ("rl/maml-nav2d", "rl/pretrained-nav2d", "rl/rl2-nav2d")
FAMILIES = {"maml-trpo": "optimization", "pretrained": "baseline", "rl2": "model",
            "random init": "baseline"}
# Finn et al. 2017, figure 4: MAML on 2D navigation after 0..3 steps
PAPER_NAV2D = [-40.41, -11.68, -3.33, -3.23]


def nav2d(algorithms: list[str] | None = None, steps: int | None = None,
          budget: float | None = None, out: Path = Path("runs/compare/nav2d"),
          fresh: bool = False, progress: bool = True, jobs: int = 1) -> list:
    """Rows of the ``nav2d`` suite: MAML-TRPO, the pretrained baseline, RL² and the random
    initialisation on the same fixed test goals, scored by the return after ``ROW_STEPS``
    adaptation steps. Runs already trained in ``out/<config>`` are scored, not retrained
    (unless ``fresh``); the random initialisation's record is ``random-init.test.json``.
    Its runs train one after the other (``jobs`` must be 1).
    Drawn to ``out``: the return against adaptation steps beside the paper's
    (``returns.png``), MAML's paths to a few test goals (``paths.png``) and the training
    returns against meta-iterations (``training.png``)."""
    from metalab.plots import curves

    if jobs != 1:
        raise ValueError("the nav2d suite trains its runs one after the other; run it without "
                         "--jobs.")
    rows, lines = [], {}
    for name in NAV2D_SUITE:
        config = load_config(name, [f"out={out / Path(name).name}"])
        if algorithms and config.algorithm not in algorithms:
            continue
        if steps is not None:
            config = config.replace(iterations=steps)
        if budget is not None:
            config = config.replace(iterations=10**6, minutes=budget / 60)
        trained = (Path(config.out) / "last.pt").exists() and not fresh
        record = (evaluate_run(chosen_checkpoint(Path(config.out)), write=False) if trained
                  else train_run(config, overwrite=fresh, progress=progress))
        lines[config.algorithm] = record["returns"]
        rows.append(_row(config, record))
        if config.algorithm == "maml-trpo":
            draw_paths(config.learner(testing=True),
                       _load(chosen_checkpoint(Path(config.out)))[1]["params"],
                       out / "paths")
        if config.algorithm == "pretrained":  # the same steps from a random initialisation
            random = _random_init(config)
            atomic_write_text(json.dumps(random, indent=1) + "\n",
                              out / "random-init.test.json")
            lines["random init"] = random["returns"]
            rows.append(_row(config, random, "random init"))
    curves({"2D navigation": {name: curve for config_name in NAV2D_SUITE
                              for name, curve in training_curves(out / Path(config_name).name
                                                                 / "log.jsonl").items()}},
           "meta-iteration", out / "training", y_labels={"2D navigation": "training return"})
    drawn = {n: [(s, r["mean"], r["ci95"]) for s, r in enumerate(line)]
             for n, line in lines.items()}
    drawn["maml (Finn et al. 2017)"] = [(s, r, 0.0) for s, r in enumerate(PAPER_NAV2D)]
    curves({"2D navigation": drawn},
           "adaptation steps (VPG; RL²: episodes of the trial - 1)", out / "returns",
           y_labels={"2D navigation": "test return (40 fixed goals)"})
    return rows


def training_curves(log: Path, window: int = 10) -> dict[str, list[tuple[float, float, float]]]:
    """The mean training returns of a run's ``log.jsonl`` over windows of ``window``
    iterations: before and after adaptation (MAML-TRPO, pretrained), or of each episode of a
    trial (RL²), as ``(iteration, mean, 0)`` points; nothing if the run has no log."""
    if not log.exists():
        return {}
    history = [json.loads(line) for line in log.read_text().splitlines()]
    keys = [k for k in history[0] if k.startswith("return")]
    name = log.parent.name
    return {f"{name}: {key.removeprefix('return_').replace('_', ' ')}": [
        (start + len(chunk), sum(h[key] for h in chunk) / len(chunk), 0.0)
        for start in range(0, len(history), window)
        for chunk in [history[start:start + window]]] for key in keys}


def _random_init(config: RLConfig) -> dict[str, Any]:
    learner = config.learner(testing=True)
    params = init_policy(learner.env.observation_size, learner.env.action_size,
                         tuple(config.hidden), torch.Generator().manual_seed(config.seed))
    return {"returns": _scores(config, params, "random init")["random init"],
            "iterations": 0, "train_minutes": 0.0, "adapt_ms": adaptation_ms(learner, params),
            "parameters": _parameters(params)}


def _row(config: RLConfig, record: dict[str, Any], name: str | None = None):
    from metalab.compare import Row

    name = name or config.algorithm
    score = record["returns"][min(ROW_STEPS, len(record["returns"]) - 1)]
    return Row(task="2D navigation", algorithm=name, family=FAMILIES[name],
               metric=f"return after {ROW_STEPS} steps", mean=score["mean"],
               ci95=score["ci95"], train_seconds=record["train_minutes"] * 60,
               train_steps=record["iterations"], adapt_ms=record["adapt_ms"],
               query_ms=float("nan"), parameters=record["parameters"], train_peak_mib=None,
               adapt_peak_mib=None, adapt_grad_steps=0 if name == "rl2" else ROW_STEPS,
               run_dir=str(config.out), kind=REINFORCEMENT.name)
