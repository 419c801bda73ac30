"""Meta-RL on 2D navigation: the dynamics and reward against a hand computation, the
policy gradient against finite differences, the TRPO step, the batched MAML-RL meta-gradient
against a per-task reference in float64, the baseline and advantages, resume, and two
torchrun processes against one.

Run as ``python -m tests.test_rl OUT`` (under torchrun), this file is that job's worker.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalab import distributed
from metalab.cli import main
from metalab.compare import run_compare
from metalab.config import ConfigError, load_config
from metalab.rl.checks import check_rl_algorithm
from metalab.rl.episodes import (
    Episodes,
    advantages,
    discounted_returns,
    linear_baseline,
    rollout,
)
from metalab.rl.maml_trpo import MAMLTRPO, adapt, vpg_loss
from metalab.rl.navigation import Navigation2D
from metalab.rl.policy import gaussian_kl, init_policy, log_prob
from metalab.rl.study import draw_paths, train
from metalab.rl.trpo import conjugate_gradient, trpo_step
from metalab.tasks import task_generator

F64 = torch.float64


def _episodes(tasks: int = 3, trajectories: int = 4, horizon: int = 12, seed: int = 0,
              hidden: tuple[int, ...] = (8,)) -> tuple[Navigation2D, dict, Episodes]:
    env = Navigation2D(horizon=horizon)
    generator = torch.Generator().manual_seed(seed)
    params = init_policy(2, 2, hidden, generator, dtype=F64, init_log_std=-1.0)
    goals = env.sample_tasks(tasks, generator, dtype=F64)
    return env, params, rollout(env, params, goals, trajectories, generator)


def test_navigation_dynamics_and_reward_by_hand() -> None:
    env = Navigation2D()
    goals = torch.tensor([[0.3, -0.2]])
    start = env.reset(goals, 2)
    assert start.shape == (1, 2, 2) and not start.any()
    # the policy acts in [-1, 1] (clipped), scaled to velocities of at most 0.1
    actions = torch.tensor([[[5.0, -0.5], [0.2, 0.3]]])
    moved, reward, done = env.step(start, actions, goals)
    assert torch.allclose(moved, torch.tensor([[[0.1, -0.05], [0.02, 0.03]]]))
    assert reward[0, 0].item() == pytest.approx(-math.hypot(0.3 - 0.1, -0.2 + 0.05), rel=1e-6)
    assert reward[0, 1].item() == pytest.approx(-math.hypot(0.3 - 0.02, -0.2 - 0.03), rel=1e-6)
    near = torch.tensor([[[0.295, -0.195]]])
    _, reward, done = env.step(near, torch.zeros(1, 1, 2), goals)
    assert done.item() and reward.item() == pytest.approx(-math.hypot(0.005, 0.005), rel=1e-5)
    goals = env.sample_tasks(1000, torch.Generator().manual_seed(0))
    assert goals.abs().max() <= 0.5 and goals.abs().max() > 0.49


def test_an_episode_ends_at_the_goal_and_earns_nothing_after() -> None:
    env = Navigation2D(horizon=5)
    goals = torch.tensor([[0.1, 0.0]])
    params = {"w0": torch.zeros(2, 2), "b0": torch.tensor([0.5, 0.0]),
              "log_std": torch.full((2,), -30.0)}  # moves (0.05, 0) every step
    episodes = rollout(env, params, goals, 1, torch.Generator().manual_seed(0))
    assert episodes.mask[0, :, 0].tolist() == [1, 1, 0, 0, 0]
    assert episodes.rewards[0, 0, 0].item() == pytest.approx(-0.05, abs=1e-6)
    assert episodes.rewards[0, 1, 0].item() == pytest.approx(0.0, abs=1e-6)  # at the goal
    assert episodes.rewards[0, 2:, 0].abs().sum() == 0


def test_vpg_gradient_equals_finite_differences() -> None:
    _, params, episodes = _episodes(tasks=2)
    advantage = advantages(episodes)
    noise = torch.Generator().manual_seed(1)  # off ReLU's kink (zero biases, zero first obs)
    params = {k: v + 0.1 * torch.randn(v.shape, generator=noise, dtype=F64)
              for k, v in params.items()}
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss = vpg_loss(leaves, episodes, advantage).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    eps = 1e-6
    for (name, value), grad in zip(params.items(), grads, strict=True):
        for index in [0, value.numel() // 2, value.numel() - 1]:
            shifted = {k: v.clone() for k, v in params.items()}
            shifted[name].view(-1)[index] += eps
            up = vpg_loss(shifted, episodes, advantage).sum()
            shifted[name].view(-1)[index] -= 2 * eps
            down = vpg_loss(shifted, episodes, advantage).sum()
            assert grad.view(-1)[index].item() == pytest.approx(
                ((up - down) / (2 * eps)).item(), rel=1e-5, abs=1e-8), (name, index)


def test_linear_baseline_fits_returns_that_are_linear_in_its_features() -> None:
    _, _, episodes = _episodes()
    obs = episodes.observations
    steps = torch.arange(obs.shape[1], dtype=F64)[None, :, None] / 100
    target = (2 * obs[..., 0] - obs[..., 1].pow(2) + 3 * steps.pow(3) + 0.5) * episodes.mask
    assert torch.allclose(linear_baseline(episodes, target, reg=1e-12), target, atol=1e-6)


def test_gae_with_lambda_one_is_the_return_minus_the_baseline() -> None:
    _, _, episodes = _episodes()
    returns = discounted_returns(episodes.rewards, 0.99)
    expected = (returns - linear_baseline(episodes, returns)) * episodes.mask
    got = advantages(episodes, gamma=0.99, gae_lambda=1.0, normalise=False)
    assert torch.allclose(got, expected, atol=1e-9)


def test_conjugate_gradient_solves_a_small_system() -> None:
    a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=F64)
    b = torch.tensor([1.0, 2.0], dtype=F64)
    assert torch.allclose(conjugate_gradient(lambda v: a @ v, b, 10), torch.linalg.solve(a, b))


def test_trpo_step_lowers_the_surrogate_within_the_kl_bound() -> None:
    env, params, train_episodes = _episodes(tasks=3, trajectories=8)
    algo = MAMLTRPO(env, trajectories=8, max_kl=0.01)
    generator = torch.Generator().manual_seed(5)
    with torch.enable_grad():
        old = {k: v.detach() for k, v in algo.adapted(
            {k: v.clone().requires_grad_() for k, v in params.items()}, train_episodes,
            algo.advantages(train_episodes), create_graph=False).items()}
    goals = env.sample_tasks(3, torch.Generator().manual_seed(0), dtype=F64)
    valid = rollout(env, old, goals, 8, generator)
    surrogate = algo.surrogate(train_episodes, algo.advantages(train_episodes), valid, old)
    result = trpo_step(surrogate, params, max_kl=0.01)
    assert result.step_fraction > 0
    loss_before, kl_before = surrogate({k: v.clone().requires_grad_() for k, v in
                                        params.items()})
    loss_after, kl_after = surrogate({k: v.clone().requires_grad_() for k, v in
                                      result.params.items()})
    assert abs(kl_before.item()) < 1e-12
    assert loss_after.item() < loss_before.item()
    assert 0 < kl_after.item() <= 0.01


def test_batched_meta_gradient_equals_a_per_task_loop_in_float64() -> None:
    """The second-order meta-gradient of the surrogate, all tasks at once, equals the sum
    over tasks computed one by one with plain (unbatched) parameters, to 1e-6 relative."""
    env, params, train_episodes = _episodes(tasks=3, trajectories=4)
    algo = MAMLTRPO(env, trajectories=4)
    with torch.enable_grad():
        old = {k: v.detach() for k, v in algo.adapted(
            {k: v.clone().requires_grad_() for k, v in params.items()}, train_episodes,
            algo.advantages(train_episodes), create_graph=False).items()}
    goals = env.sample_tasks(3, torch.Generator().manual_seed(0), dtype=F64)
    valid = rollout(env, old, goals, 4, torch.Generator().manual_seed(9))
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss, _ = algo.surrogate(train_episodes, algo.advantages(train_episodes), valid, old)(leaves)
    batched = torch.autograd.grad(loss, list(leaves.values()))

    train_adv, valid_adv = advantages(train_episodes), advantages(valid)
    reference = [torch.zeros_like(v) for v in params.values()]
    for i in range(3):
        one = lambda e, i=i: Episodes(*(x[i:i + 1] for x in (  # noqa: E731
            e.observations, e.actions, e.rewards, e.mask)))
        theta = {k: v.clone().requires_grad_() for k, v in params.items()}
        inner = vpg_loss(theta, one(train_episodes), train_adv[i:i + 1]).sum()
        grads = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
        adapted = {k: v - algo.inner_lr * g for (k, v), g in zip(theta.items(), grads,
                                                                  strict=True)}
        v = one(valid)
        obs, act, mask = v.flat(v.observations), v.flat(v.actions), v.flat(v.mask)
        old_i = {k: t[i:i + 1] for k, t in old.items()}
        ratio = torch.exp(log_prob(adapted, obs, act) - log_prob(old_i, obs, act))
        task_loss = -(ratio * v.flat(valid_adv[i:i + 1]) * mask).sum() / mask.sum() / 3
        for total, g in zip(reference, torch.autograd.grad(task_loss, list(theta.values())),
                            strict=True):
            total += g
    for got, want in zip(batched, reference, strict=True):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-12)


def test_inner_step_adapts_every_task_with_its_own_gradient() -> None:
    _, params, episodes = _episodes(tasks=2)
    adv = advantages(episodes)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    adapted = adapt(leaves, episodes, adv, 0.1, create_graph=False)
    for name, value in adapted.items():
        assert value.shape == (2, *params[name].shape)
    assert not torch.allclose(adapted["w0"][0], adapted["w0"][1])
    kl = gaussian_kl(params, params, episodes.flat(episodes.observations))
    assert kl.abs().max() < 1e-12


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    algo = MAMLTRPO(Navigation2D(horizon=10), trajectories=3)
    options = {"seed": 3, "meta_batch": 2, "save_every": 2, "hidden": (8,), "progress": False}
    whole, _ = train(tmp_path / "whole", algo, 4, 1e9, **options)
    train(tmp_path / "parts", algo, 2, 1e9, **options)
    resumed, history = train(tmp_path / "parts", algo, 4, 1e9, **options)
    assert len(history) == 4
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_a_tasks_rollouts_do_not_depend_on_the_other_tasks_of_its_batch() -> None:
    """With one generator per task, task 1 of a batch of three rolls out exactly as when
    alone: what lets processes split a meta-batch's tasks."""
    env = Navigation2D(horizon=15)
    params = init_policy(2, 2, (8,), torch.Generator().manual_seed(0))
    goals = env.sample_tasks(3, torch.Generator().manual_seed(1))
    batch = rollout(env, params, goals, 4, [task_generator(5, 2, i) for i in range(3)])
    alone = rollout(env, params, goals[1:2], 4, [task_generator(5, 2, 1)])
    assert torch.equal(batch.actions[1:2], alone.actions)
    assert torch.equal(batch.rewards[1:2], alone.rewards)
    assert not torch.equal(batch.actions[0], batch.actions[1])
    with pytest.raises(ValueError, match="one per task"):
        rollout(env, params, goals, 4, [task_generator(5, 2, 0)])


# A tiny MAML-TRPO run: 3 tasks per meta-batch, shares of 2 and 1 on two processes.
TINY = {"seed": 4, "meta_batch": 3, "save_every": 1, "hidden": (8,), "progress": False}


def _tiny_algo() -> MAMLTRPO:
    return MAMLTRPO(Navigation2D(horizon=12), trajectories=3, inner_lr=0.5)


def test_two_processes_train_like_one(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` of :func:`train` (this file as the worker) ends with
    the parameters and history of one process, to float tolerance."""
    root = Path(__file__).resolve().parents[1]
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "tests.test_rl", str(tmp_path / "two")], cwd=root, capture_output=True,
        text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert job.returncode == 0, job.stdout + job.stderr
    one, history = train(tmp_path / "one", _tiny_algo(), 3, 1e9, **TINY)
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert len(two["history"]) == 3
    for name, value in one.items():
        torch.testing.assert_close(two["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for mine, theirs in zip(history, two["history"], strict=True):
        for key in ("return_before", "return_after", "kl", "step_fraction"):
            assert theirs[key] == pytest.approx(mine[key], rel=1e-4, abs=1e-6), key


def test_draw_paths_pictures_the_test_goals(tmp_path: Path) -> None:
    algo = MAMLTRPO(Navigation2D(horizon=10), trajectories=3)
    params = init_policy(2, 2, (8,), torch.Generator().manual_seed(0))
    written = draw_paths(algo, params, tmp_path / "paths")
    assert [p.suffix for p in written] == [".png", ".svg"]
    assert all(p.stat().st_size > 10_000 for p in written)


TINY_CONFIG = """kind: rl
env: navigation
algorithm: maml-trpo
hidden: [8]
meta_batch: 2
trajectories: 2
iterations: 2
eval_steps: 1
"""


def test_metalab_train_resume_and_evaluate_an_rl_config(tmp_path: Path, capsys) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--quiet"]) == 0
    test = json.loads((out / "test.json").read_text())
    assert test["iterations"] == 2 and len(test["returns"]) == 2
    assert test["env_steps"] == 2 * 2 * 2 * 2 * 100  # iterations x rollouts x tasks x episodes
    assert "maml-trpo on navigation's fixed test goals" in capsys.readouterr().out
    # a folder holding a run is never clobbered; --resume continues it
    assert main(["train", str(config), "--out", str(out), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", str(config), "--out", str(out), "--quiet", "--resume",
                 "--set", "iterations=3"]) == 0
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert len(resumed["history"]) == 3 and resumed["config"]["iterations"] == 3
    assert main(["evaluate", str(out / "last.pt"), "--inner-steps", "2", "--json",
                 str(tmp_path / "e.json")]) == 0
    returns = json.loads((tmp_path / "e.json").read_text())["returns"]
    assert len(returns) == 3 and returns[0] == json.loads(
        (out / "test.json").read_text())["returns"][0]  # the same fixed goals and rollouts


@pytest.mark.parametrize(("text", "message"), [
    ("algorithm: rl2\nenv: halfcheetah-dir\n", "rl2 is built for 2D navigation"),
    ("goals: 3\n", "unknown key 'goals'; valid keys: kind, env, algorithm"),
    ("inner_lr: 0\n", "inner_lr: Input should be greater than 0"),
    ("env: ant\n", "env: Input should be 'navigation', 'halfcheetah-dir' or"),
])
def test_bad_rl_configs_are_clear_errors(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kind: rl\n" + text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


def test_compare_nav2d_scores_every_method_on_the_same_goals(tmp_path: Path) -> None:
    """One meta-iteration of each built-in config: a row per method with its score after
    two steps, its training and parameters, and the figures."""
    comparison = run_compare("nav2d", steps=1, out=tmp_path, progress=False)
    rows = {row.algorithm: row for row in comparison.rows}
    assert list(rows) == ["maml-trpo", "pretrained", "random init", "rl2"]
    assert {r.family for r in rows.values()} == {"optimization", "baseline", "model"}
    assert rows["maml-trpo"].train_steps == 1 and rows["random init"].train_steps == 0
    assert rows["maml-trpo"].parameters == 2 * 100 + 100 + 100 * 100 + 100 + 100 * 2 + 2 + 2
    for row in rows.values():
        assert -110 < row.mean < 0 and row.ci95 > 0 and row.adapt_ms > 0
    random = json.loads((tmp_path / "nav2d" / "random-init.test.json").read_text())
    assert random["returns"][2]["mean"] == rows["random init"].mean
    for name in ("returns.png", "paths.png", "training.png", "table.md", "score_vs_latency.png"):
        assert (tmp_path / "nav2d" / name).stat().st_size > 0, name
    assert (tmp_path / "nav2d" / "learning_curves.png").exists()  # validation return


@pytest.mark.parametrize("algorithm", ["maml-trpo", "pretrained", "rl2"])
def test_every_rl_algorithm_passes_the_common_checks(algorithm: str, tmp_path: Path) -> None:
    check_rl_algorithm(algorithm, tmp_path)


def test_the_common_checks_catch_a_run_that_ignores_its_seed(tmp_path: Path,
                                                             monkeypatch) -> None:
    from metalab.rl import study

    calls = iter(range(100))
    monkeypatch.setattr(study, "step_generator",
                        lambda seed, step: torch.Generator().manual_seed(next(calls)))
    with pytest.raises(AssertionError, match="the same seed gave"):
        check_rl_algorithm("maml-trpo", tmp_path)


def test_maml_trpo_learns_navigation_in_a_few_iterations() -> None:
    """Eight meta-iterations on short episodes raise the return after one step above the
    untrained policy's, on fixed test goals."""
    env = Navigation2D(horizon=20)
    algo = MAMLTRPO(env, trajectories=10)
    generator = torch.Generator().manual_seed(0)
    params = init_policy(2, 2, (32, 32), generator)
    goals = env.sample_tasks(20, torch.Generator().manual_seed(1))
    before = algo.evaluate(params, goals, 1, torch.Generator().manual_seed(2))[1].mean()
    for _ in range(8):
        params, _ = algo.step(params, env.sample_tasks(10, generator), generator)
    after = algo.evaluate(params, goals, 1, torch.Generator().manual_seed(2))[1].mean()
    assert after > before + 1.0, (before, after)


def test_rl2_trials_keep_the_hidden_state_across_episodes_and_freeze_it_after_the_goal(
        ) -> None:
    from metalab.rl.rl2 import RL2, RL2Policy, run_trials

    env = Navigation2D(horizon=6)
    torch.manual_seed(0)
    policy = RL2Policy(2, 2, hidden=8)
    with torch.no_grad():  # stand still: the goal at the origin is reached at the first step
        policy.mean.weight.zero_()
        policy.mean.bias.zero_()
        policy.log_std.fill_(-30.0)
    goals = torch.tensor([[0.0, 0.0], [0.4, 0.4]])
    trials = run_trials(policy, env, goals, 2, torch.Generator().manual_seed(0))
    assert trials.inputs.shape == (12, 2, 6) and trials.episode_returns.shape == (2, 2)
    assert torch.allclose(trials.episode_returns.sum(0), trials.rewards.sum(0))
    assert trials.mask[:, 1].all()
    # the reached goal: one live step per episode, then nothing until the next episode
    assert trials.mask[:, 0].tolist() == [1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    # the second episode starts from the origin and reads "previous episode ended"
    assert not trials.inputs[6, :, :2].any() and (trials.inputs[6, :, -1] == 1).all()
    learner = RL2(env, epochs=1, minibatches=1)
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    metrics = learner.step(policy, optimizer, goals, torch.Generator().manual_seed(1))
    assert set(metrics) == {"return_episode_1", "return_episode_2", "return_episode_3",
                            "env_steps"}
    assert metrics["env_steps"] == 3 * 1 + 3 * 6  # 3 episodes; the reached goal: 1 step each
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


def _mujoco() -> None:
    import importlib.util
    import os

    if importlib.util.find_spec("mujoco") is None or importlib.util.find_spec(
            "gymnasium") is None:
        reason = 'HalfCheetah needs MuJoCo: pip install "metalab[rl]"'
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.mark.parametrize("goal", ["velocity", "direction"])
def test_halfcheetah_rewards_follow_the_simulators_velocity(goal: str) -> None:
    """The task reward equals the formula on the simulator's own x velocity: forward
    progress (direction +1) is the negative of backward's, and control costs 0.05 |a|^2."""
    _mujoco()
    from metalab.rl.cheetah import HalfCheetahTasks

    env = HalfCheetahTasks(goal, horizon=5)
    generator = torch.Generator().manual_seed(0)
    params = init_policy(17, 6, (8,), generator)
    goals = torch.tensor([1.0, -1.0]) if goal == "direction" else torch.tensor([0.5, 1.5])
    seed = torch.Generator().set_state(generator.get_state())
    episodes = env.rollout(params, goals, 2, generator)
    assert episodes.observations.shape == (2, 5, 2, 17)
    assert episodes.mask.all()
    import gymnasium

    # replay each episode in its own simulator, from the seed the rollout drew for it
    seeds = torch.randint(0, 2**31 - 1, (2, 2), generator=seed).flatten().tolist()
    for i in range(4):
        task, trajectory = divmod(i, 2)
        single = gymnasium.make("HalfCheetah-v5")
        single.reset(seed=seeds[i])
        for t in range(5):
            applied = episodes.actions[task, t, trajectory].clamp(-1, 1)
            _, _, _, _, info = single.step(applied.numpy())
            want = env.reward(torch.tensor([[info["x_velocity"]]], dtype=torch.float32),
                              applied.view(1, 1, 6), goals[task:task + 1])
            assert episodes.rewards[task, t, trajectory].item() == pytest.approx(
                want.item(), rel=1e-4, abs=1e-5)
    velocity = torch.tensor(0.7)
    actions = torch.full((1, 1, 6), 2.0)  # as applied (the rollout clips to [-1, 1])
    reward = env.reward(velocity.view(1, 1), actions, goals[:1])
    control = 0.05 * 6 * 4.0
    expected = (0.7 - control if goal == "direction" else -abs(0.7 - 0.5) - control)
    assert reward.item() == pytest.approx(expected)


if __name__ == "__main__":  # the worker of test_two_processes_train_like_one
    with distributed.process_group(torch.device("cpu")):
        train(Path(sys.argv[1]), _tiny_algo(), 3, 1e9, **TINY)
