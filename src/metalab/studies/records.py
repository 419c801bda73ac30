"""Result records (:mod:`metalab.results`) from the studies' results: one record per method
and metric, so that ``docs/results.md`` shows each study as a table generated from them."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from metalab.results import _git_version, validate
from metalab.studies.ett import LEARNED_PRIOR, META_LEARNERS, PRIOR_TRAINING

__all__ = ["ett_records", "movielens_records", "write_records"]

# each ``movielens`` setting: the study's result key and the record's metric
MOVIELENS_METRICS = {"mae": ("mae", "mae"), "mae-stars": ("mae_star", "mae"),
                     "rmse": ("rmse", "rmse"), "ndcg3": ("ndcg3", "ndcg")}
BASELINE_CONFIG = "studies.{study}"  # the "config" of a baseline: the study that fits it


def _config(study: str, method: str, first: dict[str, Any], overrides: list[str],
            ) -> dict[str, Any]:
    if "config" in first:  # a meta-learner: its built-in config and the study's overrides
        return {"name": f"{study}/{method}", "overrides": overrides, "values": first["config"]}
    values = {"algorithm": method, **{k: v for k, v in first.items() if k == "settings"}}
    return {"name": BASELINE_CONFIG.format(study=study), "overrides": overrides,
            "values": values}


def _model(method: str) -> str:
    return {"cnp": "CNP (MLP encoder and decoder)",
            "learned-prior": "linear forecaster, precision learned per lag"
            }.get(method, "linear forecaster")


def _seeds(seeds: list[int]) -> str:
    """``seeds 0-4`` for consecutive seeds, else ``seeds 0, 2, 5`` (``seed 0`` for one)."""
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def _minutes(seconds: float) -> float:
    return round(seconds / 60, 1) if seconds >= 6 else round(seconds / 60, 3)


def movielens_records(results: dict[str, dict[int, dict[str, Any]]], machine: str,
                      bar_note: str | None = None, noted: str = "anil",
                      ) -> list[tuple[str, dict[str, Any]]]:
    """``(file name, record)`` pairs: per method, one record per metric of the ``movielens``
    table (mean ± CI over seeds) and one of the ``movielens-seeds`` table (MAE per seed).
    ``bar_note`` (whether the issue's bar is met, and why) goes under both tables, on the
    rows of method ``noted`` (the best meta-learner)."""
    from metalab.studies.common import summary

    version = _git_version()
    out = []
    for method, by_seed in results.items():
        seeds = sorted(by_seed)
        first = by_seed[seeds[0]]
        users = 116  # test users per seed (20% of 582)
        seconds = statistics.fmean(by_seed[s].get("train_seconds", by_seed[s].get(
            "seconds", 0.0)) for s in seeds)
        overrides = [f"seeds={','.join(map(str, seeds))}"]
        common = {
            "kind": "run", "algorithm": method,
            "protocol": {"train_split": "train", "batch_norm": "none",
                         "variant": f"MeLU users-as-tasks, 70/10/20 user split, "
                                    f"{_seeds(seeds)}"},
            "config": _config("movielens", method, first, overrides),
            "training": {"minutes": _minutes(seconds), "machine": machine,
                         **({"steps": first["steps"]} if "steps" in first else {})},
            "code_version": version,
            "reproduce": [f"python -m metalab.studies.movielens --seeds "
                          f"{' '.join(map(str, seeds))} --records docs/records"],
        }
        for setting, (key, metric) in MOVIELENS_METRICS.items():
            s = summary([by_seed[k][key] for k in seeds])
            record = {**common, "benchmark": "movielens", "metric": metric, "decimals": 4,
                      "results": [{"setting": setting, "mean": s["mean"], "ci95": s["ci95"],
                                   "episodes": users * len(seeds)}]}
            if bar_note and setting == "mae" and method == noted:
                record["note"] = bar_note
            out.append((f"movielens/{method}-{setting}.json", record))
        record = {**common, "benchmark": "movielens-seeds", "metric": "mae", "decimals": 4,
                  "results": [{"setting": f"seed{k}", "mean": by_seed[k]["mae"], "ci95": None,
                               "episodes": users} for k in seeds if k < 5]}
        if bar_note and method == noted:
            record["note"] = bar_note
        out.append((f"movielens-seeds/{method}.json", record))
    return [(name, validate(record, name)) for name, record in out]


def ett_records(avg: dict[str, dict[str, dict[str, Any]]], source: str, target: str,
                machine: str, bar_note: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Per method, one MSE and one MAE record of the ``ett-<source>-<target>`` table;
    ``bar_note`` (whether the issue's bar is met, and why) is the shrunk ridge's note."""
    benchmark = f"ett-{source[-2:].lower()}-{target[-2:].lower()}"
    version = _git_version()
    out = []
    for method, by_fraction in avg.items():
        any_fraction = next(iter(by_fraction.values()))
        seeds = any_fraction["seeds"]
        meta = method in META_LEARNERS
        config = ({"name": f"ett/{method}", "overrides": [f"seeds={','.join(map(str, seeds))}",
                                                          f"dataset_options.series={source}"],
                   "values": {"algorithm": method}} if meta and method != LEARNED_PRIOR else
                  {"name": "studies.ett", "overrides": [], "values": {
                      "algorithm": method,
                      **(PRIOR_TRAINING if method == LEARNED_PRIOR else {})}})
        stds = "; ".join(f"{float(f):.0%} MSE std {a['mse']['std']:.4f}"
                         for f, a in sorted(by_fraction.items()))
        common = {
            "kind": "run", "algorithm": method,
            "protocol": {"train_split": "train", "batch_norm": "none",
                         "variant": f"{source} → {target}, {_model(method)}, " + (
                             _seeds(seeds) if meta else "deterministic")},
            "config": config,
            "training": {"minutes": _minutes(any_fraction["train_seconds"]), "machine": machine},
            "code_version": version,
            "reproduce": [f"python -m metalab.studies.ett --source {source} --target {target} "
                          f"--seeds {' '.join(map(str, seeds))} --records docs/records"],
        }
        for metric in ("mse", "mae"):
            results = [{"setting": f"{round(float(f) * 100)}pct-{metric}",
                        "mean": a[metric]["mean"],
                        "ci95": a[metric]["ci95"] if len(seeds) > 1 else None,
                        "episodes": len(seeds)} for f, a in sorted(by_fraction.items())]
            record = {**common, "benchmark": benchmark, "metric": metric, "results": results}
            if meta and len(seeds) > 1 and metric == "mse":
                record["note"] = (f"{method}: seeds {seeds}, spread over seeds {stds}.")
            if bar_note and method == "ridge-shrunk" and metric == "mse":
                record["note"] = bar_note
            out.append((f"{benchmark}/{method}-{metric}.json", record))
    return [(name, validate(record, name)) for name, record in out]


def write_records(records: list[tuple[str, dict[str, Any]]], directory: Path) -> list[Path]:
    """Write each record to ``directory/<name>`` (replacing the study's earlier record)."""
    paths = []
    for name, record in records:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths
