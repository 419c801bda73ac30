"""Task kinds as objects: the two built-in kinds, and a third kind defined only here
(ordinal classification, scored by an error: lower is better) that trains and evaluates
through ``Trainer``, ``evaluate`` and ``metalab compare`` with an algorithm of every family,
without any change to those modules."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from metalab import compare, data
from metalab.algorithms import ALGORITHMS, build_algorithm, task_spec
from metalab.evaluate import evaluate
from metalab.kinds import CLASSIFICATION, KINDS, REGRESSION, TaskKind, get_kind
from metalab.models import build_backbone
from metalab.runs import load_checkpoint
from metalab.tasks import TaskBatch, fixed_episodes
from metalab.train import Trainer

# One algorithm of each family that learns class targets.
FAMILY_REPRESENTATIVES = {"metric": "protonet", "optimization": "maml", "model": "cnp",
                          "baseline": "finetune"}
OPTIONS = {"cnp": {"encoder_sizes": (32, 32), "decoder_sizes": (32,)},
           "finetune": {"finetune_steps": 20}, "maml": {"inner_lr": 0.1}}
DIM, LEVELS = 8, 3


class Ordinal(TaskKind):
    """Ordinal classification: the classes are ordered levels. The loss adds to the
    cross-entropy the absolute error of the expected level; the score is the mean absolute
    error of the predicted level (0 is perfect; lower is better)."""

    name = "ordinal"
    classes = True
    metric = "level_mae"
    higher_is_better = False

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        levels = torch.arange(output.shape[-1], dtype=output.dtype, device=output.device)
        expected = (output.softmax(-1) * levels).sum(-1)
        cross_entropy = F.cross_entropy(output.flatten(0, -2), target.flatten())
        return cross_entropy + (expected - target.to(output.dtype)).abs().mean()

    def score(self, output: Tensor, target: Tensor) -> Tensor:
        return (output.argmax(-1) - target).abs().float().mean()


ORDINAL = Ordinal()


class OrdinalTasks:
    """Each task rates points along its own random direction ``w`` in R^8: level ``l`` of
    ``LEVELS`` sits around ``2 (l - 1) w``. ``k_shot`` support and ``q_query`` query points
    per level; ``classes`` are the levels (shared by every task)."""

    kind = ORDINAL
    num_classes = LEVELS

    def __init__(self, k_shot: int, q_query: int) -> None:
        self.n_way, self.k_shot, self.q_query = LEVELS, k_shot, q_query

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        direction = F.normalize(torch.randn(num_tasks, 1, 1, DIM, generator=generator), dim=-1)
        per_level = self.k_shot + self.q_query
        levels = torch.arange(LEVELS).view(1, LEVELS, 1)
        noise = 0.4 * torch.randn(num_tasks, LEVELS, per_level, DIM, generator=generator)
        x = 2.0 * (levels.unsqueeze(-1) - 1) * direction + noise  # [T, N, K+Q, DIM]
        y = levels.expand(num_tasks, LEVELS, per_level)
        k = self.k_shot

        def flat(t: Tensor) -> Tensor:
            return t.flatten(1, 2)

        return TaskBatch(flat(x[:, :, :k]), flat(y[:, :, :k]), flat(x[:, :, k:]),
                         flat(y[:, :, k:]), torch.arange(LEVELS).expand(num_tasks, LEVELS))


@pytest.fixture
def ordinal(monkeypatch: pytest.MonkeyPatch) -> str:
    """The ordinal kind and its task source, registered as a user would (``ordinal-toy``)."""
    monkeypatch.setitem(KINDS, ORDINAL.name, ORDINAL)

    def tasks(split: str, n_way: int, k_shot: int, q_query: int, data_dir: object = None,
              ) -> OrdinalTasks:
        return OrdinalTasks(k_shot, q_query)

    module = types.SimpleNamespace(tasks=tasks, status=lambda data_dir=None: "test tasks")
    monkeypatch.setitem(data.DATASETS, "ordinal-toy", module)
    return "ordinal-toy"


def test_builtin_kinds_carry_loss_score_and_direction() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    assert CLASSIFICATION.score(logits, labels).item() == pytest.approx(2 / 3)
    assert CLASSIFICATION.loss(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels).item())
    assert CLASSIFICATION.better(90.0, 80.0) and not CLASSIFICATION.better(70.0, 80.0)
    assert REGRESSION.better(0.1, 0.2) and not REGRESSION.better(0.3, 0.2)
    assert REGRESSION.better(0.3, None) and not REGRESSION.better(math.nan, 0.2)
    assert CLASSIFICATION.format(95.123, 0.456) == "95.12% ± 0.46"
    assert REGRESSION.format(0.5, 0.05) == "0.500 ± 0.050 MSE"
    assert CLASSIFICATION.output_size(5, 1) == 5 and REGRESSION.output_size(5, 3) == 3
    assert get_kind("regression") is REGRESSION
    with pytest.raises(ValueError, match="unknown task kind 'ordinal'.*register_kind"):
        get_kind("ordinal")


def test_no_module_outside_the_kinds_compares_kind_names() -> None:
    import metalab

    root = Path(metalab.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "kinds.py":
            continue
        text = path.read_text()
        for name in ('"classification"', '"regression"'):
            assert f"== {name}" not in text and f"!= {name}" not in text, (path, name)
            assert f"in {name}" not in text, (path, name)


def test_which_algorithms_support_the_third_kind() -> None:
    able = {name for name, cls in ALGORITHMS.items() if cls.supports(ORDINAL)}
    assert set(FAMILY_REPRESENTATIVES.values()) <= able
    assert "pretrained" not in able  # it needs value targets


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_REPRESENTATIVES))
def test_a_third_kind_trains_and_evaluates_with_every_family(family, ordinal, tmp_path):
    name = FAMILY_REPRESENTATIVES[family]
    train, test = OrdinalTasks(k_shot=2, q_query=4), OrdinalTasks(k_shot=2, q_query=6)
    spec = task_spec(train)
    assert spec.kind is ORDINAL and spec.n_way == LEVELS and spec.input_shape == (DIM,)
    torch.manual_seed(0)
    backbone = build_backbone("mlp", spec.input_shape, hidden=(32,))
    algo = build_algorithm(name, backbone, spec, **OPTIONS.get(name, {}))
    episodes = fixed_episodes(test, 100, seed=1)
    untrained = evaluate(algo, episodes)
    trainer = Trainer(algo, train, val_tasks=test, steps=150, tasks_per_batch=4,
                      val_every=50, val_episodes=50, out=tmp_path, progress=False,
                      optimizer=torch.optim.Adam(algo.parameters(), lr=3e-3))
    state = trainer.fit()
    trained = evaluate(trainer.algo, episodes)
    assert trained.metric == "level_mae" and trained.unit == ""
    # the kind's direction picks best.pt: the lowest validation error
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert state.best == min(r["val_level_mae"] for r in log if "val_level_mae" in r)
    # learned: the error fell, the two 95% intervals apart
    assert trained.mean + trained.ci95 < untrained.mean - untrained.ci95, (untrained, trained)


@pytest.mark.slow
def test_a_third_kind_goes_through_compare_and_checkpoints(ordinal, tmp_path) -> None:
    config = tmp_path / "ordinal.yaml"
    config.write_text(
        "dataset: ordinal-toy\nbackbone: mlp\nbackbone_options: {hidden: [32]}\n"
        "n_way: 3\nk_shot: 2\nq_query: 4\ntasks_per_batch: 4\ntest_n_way: 3\ntest_k_shot: 2\n"
        "test_q_query: 6\nsteps: 60\nlr: 0.003\nval_every: 30\nval_episodes: 30\n"
        "test_episodes: 60\ndevice: cpu\n")
    algorithms = sorted(FAMILY_REPRESENTATIVES.values())
    result = compare.run_compare(str(config), algorithms, out=tmp_path / "out", progress=False,
                                 shots=[1, 2], shot_episodes=20)
    rows = {row.algorithm: row for row in result.rows}
    assert sorted(rows) == algorithms
    for row in rows.values():
        assert row.kind == "ordinal" and row.metric == "level_mae"
        assert row.task == "ordinal-toy 3-way 2-shot"
        assert 0 <= row.mean < 2
    table = (tmp_path / "out" / "ordinal" / "table.md").read_text()
    assert f"{rows['protonet'].mean:.3f} ± {rows['protonet'].ci95:.3f} LEVEL_MAE" in table
    assert set(result.shots["ordinal-toy 3-way 2-shot"]) == set(algorithms)
    # a checkpoint names its kind and loads back with it
    algo, _ = load_checkpoint(Path(rows["maml"].run_dir) / "best.pt")
    assert algo.kind is ORDINAL
