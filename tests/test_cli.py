"""The ``metalab`` command end to end: train, evaluate, adapt, datasets, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from metalab.cli import main
from metalab.data import DATASETS

from .conftest import easy_config


@pytest.fixture
def trained(easy_data, tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("run")
    config = easy_config(out, steps=40).to_dict()
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--quiet"]) == 0
    return out, config


def test_train_writes_checkpoints_log_and_test_score(trained, capsys) -> None:
    out, _ = trained
    record = json.loads((out / "test.json").read_text())
    assert record["algorithm"] == "protonet" and record["episodes"] == 50
    assert record["mean"] > 60 and 0 <= record["ci95"] < 15  # 0 when every episode is right
    assert record["adapt_ms"] > 0 and record["query_ms"] > 0
    lines = [json.loads(line) for line in (out / "log.jsonl").open()]
    assert lines[-1]["step"] == 40 and any("val_accuracy" in line for line in lines)


def test_evaluate_is_fixed_and_overridable(trained, tmp_path, capsys) -> None:
    out, _ = trained
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    for target in (first, second):
        assert main(["evaluate", str(out / "best.pt"), "--episodes", "30", "--json",
                     str(target), "--quiet"]) == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a["mean"] == b["mean"] and a["episodes"] == 30  # same fixed episodes, same score
    assert main(["evaluate", str(out / "best.pt"), "--episodes", "10", "--n-way", "3",
                 "--json", str(first), "--quiet"]) == 0
    assert json.loads(first.read_text())["n_way"] == 3


def test_transductive_batch_norm_normalises_the_queries_together(trained, tmp_path) -> None:
    from metalab.models import use_batch_statistics
    from metalab.runs import load_checkpoint, task_sources
    from metalab.tasks import fixed_episodes

    out, _ = trained
    algo, config = load_checkpoint(out / "best.pt")
    task = fixed_episodes(task_sources(config, "test", train=False), 1, 0)[0].task(0)

    def first_two_alone_and_in_the_batch(algo) -> tuple:
        predictor = algo.adapt(task.support_x, task.support_y)
        return predictor(task.query_x[:2]), predictor(task.query_x)[:2]

    with torch.no_grad():
        alone, together = first_two_alone_and_in_the_batch(algo)
        assert torch.allclose(alone, together, atol=1e-5)  # running statistics: per query
        use_batch_statistics(algo)
        alone, together = first_two_alone_and_in_the_batch(algo)
        assert not torch.allclose(alone, together, atol=1e-3)  # the batch's own statistics
    target = tmp_path / "t.json"
    assert main(["evaluate", str(out / "best.pt"), "--episodes", "10", "--transductive-bn",
                 "--json", str(target), "--quiet"]) == 0
    assert json.loads(target.read_text())["batch_norm"] == "transductive"


def test_support_statistics_model_trains_evaluates_and_refuses_batch_statistics(
        easy_data, tmp_path, capsys) -> None:
    """A SNAIL trained with ``batch_norm: support`` is scored with its support statistics
    from the checkpoint alone; asking for batch statistics as well is a clear error."""
    options = {"attention": [[8, 8], [16, 8]], "filters": 8, "batch_norm": "support"}
    config = easy_config(tmp_path, algorithm="snail", algorithm_options=options, steps=10)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["train", str(path), "--quiet"]) == 0
    target = tmp_path / "t.json"  # the 50 test episodes of training, scored again
    assert main(["evaluate", str(tmp_path / "best.pt"), "--episodes", "50", "--json",
                 str(target), "--quiet"]) == 0
    scored_again = json.loads(target.read_text())["mean"]
    assert scored_again == json.loads((tmp_path / "test.json").read_text())["mean"]
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "best.pt"), "--transductive-bn", "--quiet"]) != 0
    assert "batch_norm: support" in capsys.readouterr().err


def _write_images(folder, images) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(image[0].numpy().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_adapt_labels_query_images_from_class_folders(trained, tmp_path, capsys) -> None:
    out, _ = trained
    test = DATASETS["easy"].load("test")
    names = ["alpha", "beta", "gamma"]
    truth = {}
    for c, name in enumerate(names):
        _write_images(tmp_path / "support" / name, test.data[c, :1])
        for path in _write_images(tmp_path / "query" / name, test.data[c, 1:6]):
            target = tmp_path / "queries" / f"{name}-{path.name}"
            target.parent.mkdir(exist_ok=True)
            path.rename(target)
            truth[target.name] = name
    capsys.readouterr()
    assert main(["adapt", str(out / "best.pt"), "--support", str(tmp_path / "support"),
                 "--query", str(tmp_path / "queries")]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 15 and {label for _, label in rows} <= set(names)
    correct = sum(truth[name] == label for name, label in rows)
    assert correct >= 10  # chance: 5 of 15


def test_adapt_bad_folders_are_clear_errors(trained, tmp_path, capsys) -> None:
    out, _ = trained
    (tmp_path / "support" / "only").mkdir(parents=True)
    code = main(["adapt", str(out / "best.pt"), "--support", str(tmp_path / "support"),
                 "--query", str(tmp_path)])
    assert code == 2 and "at least two class sub-folders" in capsys.readouterr().err
    code = main(["adapt", str(out / "best.pt"), "--support", str(tmp_path / "nope"),
                 "--query", str(tmp_path)])
    assert code == 2 and "one sub-folder of example images per class" in capsys.readouterr().err


def test_datasets_lists_every_source(capsys) -> None:
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in ("omniglot", "glyphs", "sinusoid", "folder"):
        assert name in out


def test_errors_exit_2_with_a_message(easy_data, tmp_path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**easy_config(tmp_path).to_dict(), "algorithm": "protonett"}))
    assert main(["train", str(path), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert f"invalid config {path}:" in error
    assert "algorithm: unknown algorithm 'protonett'; available: anil," in error
    path.write_text(yaml.safe_dump(easy_config(tmp_path, n_way=50).to_dict()))
    assert main(["train", str(path), "--quiet"]) == 2
    assert "50-way episodes need 50 classes" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.pt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
