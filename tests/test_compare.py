"""`metalab compare` on a tiny suite: every row and column, the cache, and clear errors."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from metalab import compare
from metalab.train import Trainer

from .conftest import easy_config

ALGORITHMS = ["protonet", "maml"]


@pytest.fixture
def suite(easy_data, tmp_path) -> str:
    config = easy_config(tmp_path / "unused", steps=6, val_every=6, test_episodes=40)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return str(path)


def test_table_rows_and_columns(suite, tmp_path) -> None:
    rows = compare.run_compare(suite, ALGORITHMS, out=tmp_path / "cmp", progress=False)
    assert [r.algorithm for r in rows] == ALGORITHMS
    assert {r.family for r in rows} == {"metric", "optimization"}
    for r in rows:
        assert r.metric == "accuracy" and 0 <= r.mean <= 100
        assert 0 < r.ci95 < 20 and math.isfinite(r.ci95)  # 40 episodes: a CI of a few points
        assert r.adapt_ms > 0 and r.query_ms > 0 and r.train_seconds > 0
        assert r.train_steps == 6 and r.parameters > 0
    assert rows[0].adapt_grad_steps == 0 and rows[1].adapt_grad_steps == 1
    written = json.loads((tmp_path / "cmp" / "tiny" / "table.json").read_text())
    assert [w["algorithm"] for w in written] == ALGORITHMS
    assert (tmp_path / "cmp" / "tiny" / "table.csv").read_text().count("\n") == 3
    assert "| protonet | metric |" in (tmp_path / "cmp" / "tiny" / "table.md").read_text()


def test_rerun_reads_the_cache(suite, tmp_path, monkeypatch) -> None:
    first = compare.run_compare(suite, ALGORITHMS, out=tmp_path / "cmp", progress=False)

    def no_training(self):
        raise AssertionError("a cached row was retrained")

    monkeypatch.setattr(Trainer, "fit", no_training)
    again = compare.run_compare(suite, ALGORITHMS, out=tmp_path / "cmp", progress=False)
    assert again == first
    with pytest.raises(AssertionError, match="retrained"):  # --fresh does retrain
        compare.run_compare(suite, ["protonet"], out=tmp_path / "cmp", fresh=True,
                            progress=False)


def test_bad_names_list_the_valid_ones(suite, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown algorithm\(s\) protonett; registered: .*maml"):
        compare.run_compare(suite, ["protonett"], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown suite 'quik'; available suites: quick"):
        compare.run_compare("quik", out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="no config file"):
        compare.run_compare(str(tmp_path / "missing.yaml"), out=tmp_path, progress=False)
