"""``metalab compare``: every algorithm trained on the same tasks, scored on the same episodes.

Each algorithm of a suite trains from the suite's config for that algorithm
(``configs/<suite>/<algorithm>.yaml``, else the suite's ``default.yaml`` with the algorithm
swapped in), then is evaluated on one fixed set of test episodes. One row per algorithm:
family, accuracy (or MSE) ± 95% CI, meta-training time and steps, median adaptation and
query latency, parameter count, gradient steps at adaptation. Results are cached per
(algorithm, config): a rerun only prints, ``--fresh`` retrains.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

from metalab.algorithms import ALGORITHMS
from metalab.config import Config, builtin_configs, load_config

__all__ = ["Row", "run_compare", "suite_config"]


@dataclass
class Row:
    algorithm: str
    family: str
    metric: str
    mean: float
    ci95: float
    train_seconds: float
    train_steps: int
    adapt_ms: float
    query_ms: float
    parameters: int
    adapt_grad_steps: int


def suites() -> list[str]:
    return sorted({name.split("/")[0] for name in builtin_configs()
                   if name.endswith("/default")})


def suite_config(suite: str, algorithm: str) -> Config:
    """The config ``algorithm`` trains with in ``suite``: a built-in suite, or a YAML config
    file whose ``algorithm`` is replaced."""
    if suite.endswith((".yaml", ".yml")):
        if not Path(suite).is_file():
            raise ValueError(f"no config file {suite}; give a built-in suite "
                             f"({', '.join(suites())}) or an existing YAML config.")
        return load_config(suite, [f"algorithm={algorithm}"])
    names = builtin_configs()
    if f"{suite}/default" not in names:
        raise ValueError(f"unknown suite {suite!r}; available suites: {', '.join(suites())}, "
                         "or a YAML config file.")
    if f"{suite}/{algorithm}" in names:
        return load_config(f"{suite}/{algorithm}")
    return load_config(f"{suite}/default", [f"algorithm={algorithm}"])


def _run_one(config: Config, out: Path, fresh: bool, progress: bool) -> Row:
    from metalab.train import Trainer, score_checkpoint

    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    run_dir = out / f"{config.algorithm}-{key}"
    cached = run_dir / "row.json"
    if cached.exists() and not fresh:
        return Row(**json.loads(cached.read_text()))
    config.out = str(run_dir)
    trainer = Trainer(config, progress=progress)
    state = trainer.fit()
    algo, _, result = score_checkpoint(run_dir / "best.pt", progress=progress)
    row = Row(algorithm=config.algorithm, family=type(algo).family, metric=result.metric,
              mean=result.mean, ci95=result.ci95, train_seconds=state.train_seconds,
              train_steps=state.step, adapt_ms=result.adapt_ms, query_ms=result.query_ms,
              parameters=sum(p.numel() for p in algo.parameters()),
              adapt_grad_steps=algo.adaptation_steps())
    from metalab.io import atomic_write_text

    atomic_write_text(json.dumps(row.__dict__, indent=2) + "\n", cached)
    return row


def markdown_table(rows: list[Row]) -> str:
    lines = ["| algorithm | family | score ± 95% CI | train (s / steps) | adapt ms | query ms "
             "| params | adapt grad steps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        unit = "%" if r.metric == "accuracy" else " MSE"
        lines.append(f"| {r.algorithm} | {r.family} | {r.mean:.2f}{unit} ± {r.ci95:.2f} | "
                     f"{r.train_seconds:.0f} / {r.train_steps} | {r.adapt_ms:.2f} | "
                     f"{r.query_ms:.2f} | {r.parameters:,} | {r.adapt_grad_steps} |")
    return "\n".join(lines)


def run_compare(
    suite: str = "quick", algorithms: list[str] | None = None, steps: int | None = None,
    out: Path = Path("runs/compare"), fresh: bool = False, progress: bool = True,
) -> list[Row]:
    """Train and score each algorithm of ``suite``; print and write the table.

    ``algorithms`` defaults to every registered algorithm that handles the suite's tasks.
    """
    if not algorithms:
        from metalab.data import REGRESSION_SOURCES

        dataset = suite_config(suite, "protonet").dataset  # any name: only the data is read
        kind = "regression" if dataset in REGRESSION_SOURCES else "classification"
        algorithms = sorted(n for n, c in ALGORITHMS.items() if kind in c.kinds)
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithm(s) {', '.join(unknown)}; registered: "
                         f"{', '.join(sorted(ALGORITHMS))}.")
    configs = [suite_config(suite, name) for name in algorithms]
    out = out / Path(suite).stem
    rows = []
    for config in configs:
        if steps is not None:
            config.steps = steps
            config.val_every = min(config.val_every, steps)
        print(f"== {config.algorithm}: {config.steps} steps on {config.dataset} "
              f"({config.n_way}-way {config.k_shot}-shot training)")
        rows.append(_run_one(config, out, fresh, progress))
    table = markdown_table(rows)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        writer.writerows(r.__dict__ for r in rows)
    print(f"wrote {out / 'table.md'}, table.csv and table.json")
    return rows
