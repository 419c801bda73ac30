"""The trainer: resume equivalence, checkpoints, the NaN guard and clear config errors."""

from __future__ import annotations

import json

import pytest
import torch

from metalab.checkpoint import read_checkpoint
from metalab.config import Config, load_config
from metalab.runs import load_checkpoint
from metalab.train import Trainer, TrainingDiverged

from .conftest import easy_config


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.algo.state_dict().items()}


def test_resume_continues_the_same_trajectory(easy_data, tmp_path) -> None:
    straight = Trainer.from_config(easy_config(tmp_path / "a", steps=20), progress=False)
    straight.fit()
    first = Trainer.from_config(easy_config(tmp_path / "b", steps=10), progress=False)
    first.fit()  # stops at step 10 with last.pt written
    resumed = Trainer.from_config(easy_config(tmp_path / "b", steps=20), progress=False)
    resumed.resume()
    assert resumed.state.step == 10
    resumed.fit()
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "N + resume N differs from 2N steps"
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").open()]
    assert steps == [json.loads(line)["step"] for line in (tmp_path / "a" / "log.jsonl").open()]


def test_resume_drops_log_lines_after_the_checkpoint(easy_data, tmp_path) -> None:
    Trainer.from_config(easy_config(tmp_path, steps=10), progress=False).fit()
    with open(tmp_path / "log.jsonl", "a") as f:  # a crash after step 10 left later lines
        f.write(json.dumps({"step": 15, "loss": 0.0}) + "\n")
    trainer = Trainer.from_config(easy_config(tmp_path, steps=20), progress=False)
    trainer.resume()
    trainer.fit(0)  # the log is truncated once the resumed run holds the folder
    assert max(json.loads(line)["step"] for line in (tmp_path / "log.jsonl").open()) == 10


def test_checkpoints_load_safely_and_reproduce_the_model(easy_data, tmp_path) -> None:
    trainer = Trainer.from_config(easy_config(tmp_path), progress=False)
    trainer.fit()
    assert {"last.pt", "best.pt", "log.jsonl", "config.json"} <= {
        p.name for p in tmp_path.iterdir()}
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)  # no pickled code inside
    assert ckpt["step"] == 20 and ckpt["algorithm"] == "protonet"
    algo, config = load_checkpoint(tmp_path / "last.pt")
    assert not algo.training and config.steps == 20
    a = trainer.algo.state_dict()
    assert all(torch.equal(a[k].cpu(), v) for k, v in algo.state_dict().items())


def test_learns_the_easy_task(easy_data, tmp_path) -> None:
    trainer = Trainer.from_config(easy_config(tmp_path, steps=40), progress=False)
    trainer.fit()
    assert trainer.state.best > 70.0  # 5-way: chance is 20%


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(easy_data, tmp_path,
                                                           monkeypatch) -> None:
    trainer = Trainer.from_config(easy_config(tmp_path, steps=30), progress=False)
    original = trainer.algo.meta_loss
    calls = {"n": 0}

    def poisoned(batch):
        calls["n"] += 1
        loss, metrics = original(batch)
        return (loss * float("nan") if calls["n"] == 15 else loss), metrics

    monkeypatch.setattr(trainer.algo, "meta_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"step 15.*last\.pt \(step 10\) is kept"):
        trainer.fit()
    kept = read_checkpoint(tmp_path / "last.pt")
    assert kept["step"] == 10
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_checkpoint_of_another_algorithm_is_refused(easy_data, tmp_path) -> None:
    Trainer.from_config(easy_config(tmp_path, steps=10), progress=False).fit()
    other = Trainer.from_config(easy_config(tmp_path, algorithm="matchingnet"), progress=False)
    with pytest.raises(ValueError, match="holds a protonet algorithm.*asks for matchingnet"):
        other.resume()
    wider = Trainer.from_config(easy_config(tmp_path, backbone_options={"hidden": 32}),
                                progress=False)
    with pytest.raises(ValueError, match="backbone_options"):
        wider.resume()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable metalab checkpoint"):
        read_checkpoint(path)


def test_resume_without_checkpoint_says_what_to_do(easy_data, tmp_path) -> None:
    trainer = Trainer.from_config(easy_config(tmp_path), progress=False)
    with pytest.raises(FileNotFoundError, match="train without --resume"):
        trainer.resume()


def test_unknown_config_key_lists_valid_keys(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("algorithm: protonet\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml:\n  unknown key 'learning_rate'; valid"):
        load_config(str(path))


def test_unknown_algorithm_and_option_are_clear_errors(easy_data, tmp_path) -> None:
    with pytest.raises(ValueError, match="algorithm: unknown algorithm 'mamll'; available:"):
        Trainer.from_config(easy_config(tmp_path, algorithm="mamll"), progress=False)
    with pytest.raises(ValueError, match="unknown option.*metrc.*valid options: metric"):
        Trainer.from_config(easy_config(tmp_path, algorithm_options={"metrc": "cosine"}),
                            progress=False)


def test_overrides_and_builtin_configs() -> None:
    config = load_config("omniglot/protonet-5w1s", ["lr=0.01", "algorithm_options.metric=cosine"])
    assert config.lr == 0.01 and config.algorithm_options == {"metric": "cosine"}
    assert config.n_way == 60 and config.test_n_way == 5
    with pytest.raises(ValueError, match="key=value"):
        load_config("omniglot/protonet-5w1s", ["lr"])
    with pytest.raises(FileNotFoundError, match="built-in configs:.*omniglot/protonet-5w1s"):
        load_config("omniglot/protonet-1w1s")
    assert Config().precision == "fp32"


def test_without_a_validation_split_the_final_weights_are_scored(easy_data, tmp_path) -> None:
    # The train+val protocol: no split is held out, so nothing is validated and best.pt is
    # the last step's weights, whatever validation would have preferred.
    trainer = Trainer.from_config(easy_config(tmp_path, steps=20, val_every=5, val_split=None),
                                  progress=False)
    state = trainer.fit()
    assert state.best is None
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").open()]
    assert records and not any(key.startswith("val_") for r in records for key in r)
    best, last = read_checkpoint(tmp_path / "best.pt"), read_checkpoint(tmp_path / "last.pt")
    assert best["step"] == last["step"] == 20
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


def test_time_budget_stops_training_and_keeps_a_validated_checkpoint(easy_data, tmp_path) -> None:
    trainer = Trainer.from_config(easy_config(tmp_path, steps=10_000, time_budget=1e-9),
                                  progress=False)
    state = trainer.fit()
    assert state.step == 1  # the first step already spends the budget
    assert read_checkpoint(tmp_path / "best.pt")["step"] == 1
    with pytest.raises(ValueError, match="time_budget"):
        Config.from_dict({"time_budget": -1})


def test_a_budgeted_run_validates_at_each_fifth_of_its_budget(easy_data, tmp_path,
                                                              monkeypatch) -> None:
    clock = iter(range(10**6))  # every reading one second later: each step takes 1 s
    monkeypatch.setattr("metalab.train.time.perf_counter", lambda: float(next(clock)))
    config = easy_config(tmp_path, steps=10_000, val_every=10_000, time_budget=10)
    state = Trainer.from_config(config, progress=False).fit()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").open()]
    assert state.step == 10
    assert [r["step"] for r in records if "val_accuracy" in r] == [2, 4, 6, 8, 10]


def test_a_checkpoint_of_a_trainer_built_from_objects_loads_by_weights(tmp_path) -> None:
    from metalab.algorithms import build_algorithm, task_spec
    from metalab.checkpoint import load_weights
    from metalab.data.sinusoid import SinusoidTasks
    from metalab.models import MLP

    tasks = SinusoidTasks(5, 5)
    algo = build_algorithm("maml", MLP(1, hidden=(8,)), task_spec(tasks), inner_lr=0.01)
    Trainer(algo, tasks, steps=3, out=tmp_path, progress=False).fit()
    with pytest.raises(ValueError, match="built from objects and records no config.*"
                                         "load_weights"):
        load_checkpoint(tmp_path / "best.pt")
    fresh = build_algorithm("maml", MLP(1, hidden=(8,)), task_spec(tasks), inner_lr=0.01)
    assert load_weights(fresh, tmp_path / "best.pt")["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                  algo.state_dict().values(), strict=True))
