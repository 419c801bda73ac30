"""docs/results.md is generated from docs/records/: the committed page equals what the records
give (so CI fails on a difference), bad records fail with the file and the field named, and a
training run's folder becomes records that load back and render."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from metalab import results
from metalab.config import load_config
from metalab.results import RecordError, check, load_records, main, records_from_run, render

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "docs" / "records"
PAGE = ROOT / "docs" / "results.md"


def test_committed_page_is_what_the_records_generate() -> None:
    problem = check(RECORDS, PAGE)
    assert problem is None, problem


def test_measurements_point_to_committed_files_and_every_benchmark_has_records() -> None:
    records = load_records(RECORDS)
    for record in records:
        if record["kind"] == "measurement":
            assert (ROOT / record["results_file"]).is_file(), record["_path"]
    assert {r["benchmark"] for r in records} == {*results.BENCHMARKS, "speed"}


def test_check_reports_a_stale_page(tmp_path: Path) -> None:
    page = tmp_path / "results.md"
    page.write_text(PAGE.read_text().replace("98.54 ± 0.24", "98.55 ± 0.24"))
    assert main(["--records", str(RECORDS), "--page", str(page), "--check"]) == 1
    assert "differs from what the records" in check(RECORDS, page)
    assert main(["--records", str(RECORDS), "--page", str(page)]) == 0
    assert main(["--records", str(RECORDS), "--page", str(page), "--check"]) == 0


RUN: dict[str, Any] = {
    "kind": "run", "benchmark": "omniglot", "algorithm": "protonet",
    "protocol": {"train_split": "train", "batch_norm": "running"}, "metric": "accuracy",
    "results": [{"setting": "5w1s", "mean": 98.5, "ci95": 0.25, "episodes": 600}],
    "config": {"name": "omniglot/protonet-5w1s", "overrides": [],
               "values": {"algorithm": "protonet"}},
    "training": {"minutes": 38.4, "machine": "2-core CPU"},
    "code_version": "d8503e3", "reproduce": ["metalab train omniglot/protonet-5w1s"],
}


def _changed(path: str, value: Any) -> dict[str, Any]:
    """RUN with the field at dotted ``path`` set to ``value`` (``...`` deletes it)."""
    record = copy.deepcopy(RUN)
    *parents, last = path.split(".")
    target: Any = record
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return record


@pytest.mark.parametrize(("path", "value", "field", "words"), [
    ("metric", ..., "metric", "missing"),
    ("score", 1.0, "score", "unknown field"),
    ("kind", "guess", "kind", "is not one of"),
    ("benchmark", "mnist", "benchmark", "is not one of"),
    ("algorithm", "protonets", "algorithm", "is not one of"),
    ("protocol.batch_norm", "batch", "protocol.batch_norm", "is not one of"),
    ("protocol.train_split", ..., "protocol.train_split", "missing"),
    ("results.0.setting", "5w2s", "results[0].setting", "is not one of"),
    ("metric", "mse", "results[0].setting", "holds accuracy, the record mse"),
    ("results.0.mean", "98.5", "results[0].mean", "must be a number"),
    ("results.0.mean", None, "results[0].ci95", "must be null where the mean is"),
    ("results.0.ci95", ..., "results[0].ci95", "missing"),
    ("results.0.episodes", ..., "results[0].episodes", "missing"),
    ("results", [], "results", "at least one result"),
    ("config.values.algorithm", "maml", "config.values.algorithm", "the record's algorithm"),
    ("config.overrides", ["steps"], "config.overrides", "key=value"),
    ("training.minutes", ..., "training.minutes", "missing"),
    ("code_version", "HEAD", "code_version", "git commit"),
    ("reproduce", [], "reproduce", "non-empty list"),
])
def test_a_bad_record_names_its_file_and_field(tmp_path: Path, path: str, value: Any,
                                               field: str, words: str) -> None:
    (tmp_path / "omniglot").mkdir()
    bad = tmp_path / "omniglot" / "bad.json"
    bad.write_text(json.dumps(_changed(path, value)))
    with pytest.raises(RecordError) as error:
        load_records(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{bad}: field {field!r}: ") and words in message, message


def test_a_good_record_loads_and_broken_json_is_named(tmp_path: Path) -> None:
    (tmp_path / "good.json").write_text(json.dumps(RUN))
    assert load_records(tmp_path)[0]["results"] == RUN["results"]
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(RecordError, match=r"broken\.json: not valid JSON"):
        load_records(tmp_path)


def test_two_records_for_one_cell_are_an_error(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps(RUN))
    with pytest.raises(RecordError, match=r"b\.json: results: '5w1s' of this row .* another "
                                          r"record too"):
        render(load_records(tmp_path))


def _run_folder(tmp_path: Path) -> Path:
    """What ``metalab train omniglot/protonet-20w1s --set steps=30`` leaves, without the
    checkpoints, plus a ``metalab evaluate --json --transductive-bn`` file."""
    run = tmp_path / "runs" / "omniglot" / "protonet-20w1s"
    run.mkdir(parents=True)
    config = load_config("omniglot/protonet-20w1s", ["steps=30"]).to_dict()
    (run / "config.json").write_text(json.dumps(config))
    scored = {"algorithm": "protonet", "dataset": "omniglot", "split": "test", "n_way": 20,
              "k_shot": 1, "q_query": 15, "metric": "accuracy", "mean": 61.234, "ci95": 0.61,
              "episodes": 600, "adapt_ms": 1.0, "query_ms": 1.0, "unit": "%"}
    (run / "test.json").write_text(json.dumps(scored))
    (run / "log.jsonl").write_text(
        json.dumps({"step": 10, "train_seconds": 40.0}) + "\n"
        + json.dumps({"step": 30, "train_seconds": 126.0}) + "\n")
    (tmp_path / "eval.json").write_text(json.dumps(
        {**scored, "n_way": 5, "mean": 80.5, "ci95": 0.9, "batch_norm": "transductive"}))
    return run


def test_a_run_folder_becomes_records_that_round_trip(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    running, transductive = records_from_run(
        run, "omniglot", "2-core CPU", evaluations=[tmp_path / "eval.json"],
        code_version="e3859fb")
    assert running["config"]["name"] == "omniglot/protonet-20w1s"
    assert running["config"]["overrides"] == ["steps=30"]
    assert running["protocol"] == {"train_split": "trainval", "batch_norm": "running"}
    assert running["results"] == [
        {"setting": "20w1s", "mean": 61.234, "ci95": 0.61, "episodes": 600}]
    assert running["training"] == {"minutes": 2.1, "machine": "2-core CPU", "steps": 30}
    assert running["reproduce"] == ["metalab train omniglot/protonet-20w1s --set steps=30"]
    assert transductive["protocol"]["batch_norm"] == "transductive"
    assert transductive["results"][0]["setting"] == "5w1s"
    assert transductive["reproduce"][1] == (
        "metalab evaluate runs/omniglot/protonet-20w1s/best.pt --n-way 5 --k-shot 1 "
        "--q-query 15 --split test --transductive-bn")

    records = tmp_path / "records"
    assert main(["--records", str(records), "--record", str(run), "--benchmark", "omniglot",
                 "--machine", "2-core CPU", "--evaluation", str(tmp_path / "eval.json"),
                 "--code-version", "e3859fb"]) == 0
    written = sorted(p.name for p in (records / "omniglot").iterdir())
    assert written == ["protonet-20w1s-transductive.json", "protonet-20w1s.json"]
    loaded = load_records(records)
    assert [{k: v for k, v in r.items() if k != "_path"} for r in loaded] == [
        transductive, running]
    page = render(loaded)
    assert ("| ProtoNet | train+val splits | running statistics |  | 61.23 ± 0.61 | "
            "2.1 min, 2-core CPU |") in page
    assert ("| ProtoNet | train+val splits | batch statistics (transductive) | 80.50 ± 0.90 |  | "
            "2.1 min, 2-core CPU |") in page
    # a second record of the same run is refused, not overwritten
    assert main(["--records", str(records), "--record", str(run), "--benchmark", "omniglot",
                 "--machine", "2-core CPU", "--code-version", "e3859fb"]) == 2


def test_a_run_of_an_unknown_config_asks_for_its_name(tmp_path: Path) -> None:
    run = _run_folder(tmp_path).rename(tmp_path / "mine")
    with pytest.raises(ValueError, match="with --config"):
        records_from_run(run, "omniglot", "2-core CPU", code_version="e3859fb")
    record, = records_from_run(run, "omniglot", "2-core CPU", code_version="e3859fb",
                               config_name="omniglot/protonet-20w1s")
    assert record["config"]["overrides"] == ["steps=30"]
