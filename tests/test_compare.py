"""`metalab compare` on a tiny suite: every row and column, the studies, the plots, the cache,
and clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from metalab import compare
from metalab.config import Config
from metalab.data import keep_alphabets
from metalab.tasks import ClassDataset
from metalab.train import Trainer

from .conftest import easy_config

ALGORITHMS = ["protonet", "maml"]


@pytest.fixture
def suite(easy_data, tmp_path) -> str:
    config = easy_config(tmp_path / "unused", steps=6, val_every=3, test_episodes=40)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return str(path)


@pytest.fixture
def two_part_suite(suite, tmp_path, monkeypatch) -> str:
    """A built-in-style suite of two task distributions: the easy images and sinusoids."""
    sinusoid = Config(dataset="sinusoid", backbone="mlp", backbone_options={"hidden": [8]},
                      algorithm_options={"inner_lr": 0.01}, k_shot=5, q_query=5,
                      tasks_per_batch=4, test_k_shot=5, test_q_query=10, steps=6, val_every=3,
                      val_episodes=10, test_episodes=30, out=str(tmp_path / "unused"))
    path = tmp_path / "tiny-sinusoid.yaml"
    path.write_text(yaml.safe_dump(sinusoid.to_dict()))
    monkeypatch.setitem(compare.SUITES, "tiny", (suite, str(path)))
    return "tiny"


def test_table_rows_and_columns(suite, tmp_path) -> None:
    result = compare.run_compare(suite, ALGORITHMS, out=tmp_path / "cmp", progress=False)
    rows = result.rows
    assert [r.algorithm for r in rows] == ALGORITHMS
    assert {r.family for r in rows} == {"metric", "optimization"}
    for r in rows:
        assert r.task == "easy 5-way 1-shot"
        assert r.metric == "accuracy" and 0 <= r.mean <= 100
        assert 0 < r.ci95 < 20 and math.isfinite(r.ci95)  # 40 episodes: a CI of a few points
        assert r.adapt_ms > 0 and r.query_ms > 0 and r.train_seconds > 0
        assert r.train_steps == 6 and r.parameters > 0
        assert r.train_peak_mib is not None and r.train_peak_mib >= 0
        assert r.adapt_peak_mib is not None and r.adapt_peak_mib >= 0
    assert rows[0].adapt_grad_steps == 0 and rows[1].adapt_grad_steps == 1
    out = tmp_path / "cmp" / "tiny"
    written = json.loads((out / "table.json").read_text())
    assert [w["algorithm"] for w in written] == ALGORITHMS
    assert (out / "table.csv").read_text().count("\n") == 3
    assert "| easy 5-way 1-shot | protonet | metric |" in (out / "table.md").read_text()
    for name in ("score_vs_latency", "learning_curves"):
        for suffix in (".png", ".svg"):
            assert (out / name).with_suffix(suffix).stat().st_size > 1000
            assert (out / name).with_suffix(suffix) in result.files


def test_each_algorithm_runs_on_the_parts_it_can_learn(two_part_suite, tmp_path) -> None:
    rows = compare.run_compare(two_part_suite, ["protonet", "maml"], out=tmp_path,
                               progress=False, shots=None).rows
    assert [(r.task, r.algorithm) for r in rows] == [
        ("easy 5-way 1-shot", "protonet"), ("easy 5-way 1-shot", "maml"),
        ("sinusoid 5-shot regression", "maml")]
    regression = rows[2]
    assert regression.metric == "mse" and regression.mean > 0 and regression.ci95 > 0
    with pytest.raises(ValueError, match="finetune cannot learn this suite's tasks"):
        compare.run_compare(str(tmp_path / "tiny-sinusoid.yaml"), ["finetune"], out=tmp_path,
                            progress=False)


def test_shots_study_scores_each_support_size(suite, tmp_path) -> None:
    result = compare.run_compare(suite, ["protonet"], out=tmp_path, progress=False,
                                 shots=[1, 5], shot_episodes=30)
    curve = result.shots["easy 5-way 1-shot"]["protonet"]
    assert [point[0] for point in curve] == [1, 5]
    assert all(0 <= mean <= 100 and 0 <= ci < 25 for _, mean, ci in curve)
    assert curve[1][1] >= curve[0][1] - 5  # five examples per class do not hurt a prototype
    assert (tmp_path / "tiny" / "shots.csv").read_text().count("\n") == 3
    assert (tmp_path / "tiny" / "shots.png").stat().st_size > 1000


def test_diversity_study_retrains_on_fewer_classes(suite, tmp_path) -> None:
    result = compare.run_compare(suite, ["protonet"], out=tmp_path, progress=False,
                                 shots=None, diversity=[0.5, 1.0])
    row = result.rows[0]
    curve = result.diversity["easy 5-way 1-shot"]["protonet"]
    assert curve[1] == (1.0, row.mean, row.ci95)  # the full run is the table's row
    assert curve[0][0] == 0.5 and 0 <= curve[0][1] <= 100
    (subset_run,) = (tmp_path / "tiny" / "diversity").iterdir()
    assert json.loads((subset_run / "config.json").read_text())["train_fraction"] == 0.5
    assert (tmp_path / "tiny" / "diversity.png").is_file()


def test_keep_alphabets_keeps_whole_alphabets_by_seed() -> None:
    names = [f"alphabet{a}/character{c}" for a in range(10) for c in range(3)]
    dataset = ClassDataset(torch.arange(30).view(30, 1, 1), names)
    kept = keep_alphabets(dataset, 0.3, seed=0)
    alphabets = {n.split("/")[0] for n in kept.names}
    assert len(alphabets) == 3 and kept.num_classes == 9
    assert all(kept.data[i, 0, 0] == names.index(n) for i, n in enumerate(kept.names))
    assert keep_alphabets(dataset, 0.3, seed=0).names == kept.names
    assert keep_alphabets(dataset, 0.3, seed=1).names != kept.names
    with pytest.raises(ValueError, match="keeps 1 class"):
        keep_alphabets(ClassDataset(torch.zeros(3, 1, 1), ["a", "b", "c"]), 0.1, seed=0)


def test_rerun_reads_the_cache(suite, tmp_path, monkeypatch) -> None:
    first = compare.run_compare(suite, ALGORITHMS, out=tmp_path / "cmp", progress=False,
                                shots=[1], shot_episodes=20)

    def no_training(self):
        raise AssertionError("a cached row was retrained")

    monkeypatch.setattr(Trainer, "fit", no_training)
    again = compare.run_compare(suite, ALGORITHMS, out=tmp_path / "cmp", progress=False,
                                shots=[1], shot_episodes=20)
    assert again.rows == first.rows and again.shots == first.shots
    with pytest.raises(AssertionError, match="retrained"):  # --fresh does retrain
        compare.run_compare(suite, ["protonet"], out=tmp_path / "cmp", fresh=True,
                            progress=False)


def test_budget_trains_for_the_time_given(suite, tmp_path) -> None:
    row = compare.run_compare(suite, ["protonet"], budget=1e-9, out=tmp_path, progress=False,
                              shots=None).rows[0]
    assert row.train_steps == 1  # the first step spends the whole budget
    assert [compare.parse_budget(t) for t in ("90", "90s", "10m", "1.5h")] == [
        90, 90, 600, 5400]
    with pytest.raises(ValueError, match="such as 90s, 10m or 1h; got '10 minutes'"):
        compare.parse_budget("10 minutes")


def test_bad_names_list_the_valid_ones(suite, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown algorithm\(s\) protonett; registered: .*maml"):
        compare.run_compare(suite, ["protonett"], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown suite 'quik'; available suites: quick, "
                       "omniglot-5w1s"):
        compare.run_compare("quik", out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="no config file"):
        compare.run_compare(str(tmp_path / "missing.yaml"), out=tmp_path, progress=False)


@pytest.mark.parametrize("suite_name", sorted(compare.SUITES))
def test_every_builtin_suite_has_a_config_for_every_algorithm(suite_name) -> None:
    for part in compare.suite_parts(suite_name):
        kind = compare.task_kind(compare.part_config(part, "protonet"))
        for name, cls in compare.ALGORITHMS.items():
            if cls.supports(kind):
                assert compare.part_config(part, name).algorithm == name


@pytest.fixture
def one_thread():
    """One torch thread here, so that worker processes get one too and rows compare bit for
    bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_jobs_train_side_by_side_and_give_the_same_rows(one_thread, tmp_path,
                                                       monkeypatch) -> None:
    configs = [compare.limited(compare.part_config("quick/sinusoid-{}", name), 8, None)
               .replace(test_episodes=20, val_episodes=10) for name in ("maml", "reptile")]
    apart = compare.run_many(configs, tmp_path / "apart", progress=False)

    def not_here(self):
        raise AssertionError("trained in the calling process")

    monkeypatch.setattr(Trainer, "fit", not_here)  # the spawned workers train unpatched
    side_by_side = compare.run_many(configs, tmp_path / "side", progress=False, jobs=2)
    assert [r.algorithm for r in side_by_side] == ["maml", "reptile"]
    for a, b in zip(apart, side_by_side, strict=True):
        assert (a.mean, a.ci95, a.train_steps) == (b.mean, b.ci95, b.train_steps)
        assert b.train_steps == 8 and Path(b.run_dir).parent == tmp_path / "side"
    with pytest.raises(ValueError, match="jobs must be at least 1; got 0"):
        compare.run_many(configs, tmp_path / "side", progress=False, jobs=0)


def test_a_failed_run_in_a_worker_names_the_run(one_thread, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("METALAB_DATA", str(tmp_path / "no-data"))  # the workers inherit it
    broken = compare.part_config("ett/{}", "maml").replace(data_dir=str(tmp_path / "no-data"))
    with pytest.raises(RuntimeError, match="training maml on ett in a worker process "
                       "failed: .*ETTh1"):
        compare.run_many([broken, broken.replace(seed=1)], tmp_path, progress=False, jobs=2)
