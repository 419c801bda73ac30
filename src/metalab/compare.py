"""``metalab compare``: every algorithm trained on the same tasks, scored on the same episodes.

A suite is one or more task distributions ("parts"), each a built-in config pattern such as
``quick/{}``: the algorithm's own config ``quick/<algorithm>`` if there is one, else
``quick/default`` with the algorithm swapped in. Every registered algorithm that supports a
part's task kind (:mod:`metalab.kinds`) trains on it, then is scored on one fixed set of test
episodes, with the kind's score. One row per (part, algorithm):

    family · score ± 95% CI · training time and steps · adaptation and query latency (median)
    · parameters · peak memory while training and while adapting · gradient steps to adapt

Two studies reuse the trained models or retrain them:

* ``shots``: each classifier (a kind whose targets are classes) scored with 1, 2, 5, 10
  support examples per class (the claim that meta-learning needs fewer examples, measured);
* ``diversity``: each model meta-trained on a fraction of the meta-train classes, chosen by
  alphabet (the warning that too similar training tasks do not generalise, measured).

Results are cached per run folder (named by a hash of the full config, seed included): a rerun
only reads them, ``fresh=True`` retrains. Tables go to Markdown, CSV and JSON, and plots to PNG
and SVG (:mod:`metalab.plots`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from metalab.algorithms import ALGORITHMS
from metalab.config import Config, builtin_configs, load_config
from metalab.io import atomic_write_text, cached_json
from metalab.kinds import TaskKind, get_kind

__all__ = ["ADAPT_MEMORY_EPISODES", "Comparison", "Row", "parse_budget", "part_config",
           "run_compare", "run_many", "run_one", "suite_parts", "task_kind", "task_label"]

# suite -> config patterns, one per task distribution; "{}" is the algorithm (or "default").
SUITES: dict[str, tuple[str, ...]] = {
    "quick": ("quick/{}", "quick/sinusoid-{}"),
    "omniglot-5w1s": ("omniglot/{}-5w1s",),
    "omniglot-20w1s": ("omniglot/{}-20w1s",),
    "sinusoid": ("sinusoid/{}-k5", "sinusoid/{}-k10"),
    # one user split / one horizon each; the full protocols with their non-meta baselines
    # and several seeds are python -m metalab.studies.movielens and metalab.studies.ett
    "movielens": ("movielens/{}",),
    "ett": ("ett/{}",),
}
ADAPT_MEMORY_EPISODES = 20  # test tasks adapted to while the adaptation peak is measured


@dataclass
class Row:
    task: str
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
    train_peak_mib: float | None
    adapt_peak_mib: float | None
    adapt_grad_steps: int
    run_dir: str
    kind: str = "classification"  # the task kind's name (metalab.kinds)


@dataclass
class Comparison:
    """The table's rows and the studies' curves: ``shots[task][algorithm]`` and
    ``diversity[task][algorithm]`` are lists of ``(x, mean, ci95)``."""

    rows: list[Row]
    shots: dict[str, dict[str, list[tuple[float, float, float]]]] = field(default_factory=dict)
    diversity: dict[str, dict[str, list[tuple[float, float, float]]]] = field(
        default_factory=dict)
    files: list[Path] = field(default_factory=list)


# -- suites ------------------------------------------------------------------------------------

def suite_parts(suite: str) -> list[str]:
    """The config patterns of ``suite``: a built-in suite's, or a YAML file (one part)."""
    if suite.endswith((".yaml", ".yml")):
        if not Path(suite).is_file():
            raise ValueError(f"no config file {suite}; give a built-in suite "
                             f"({', '.join(SUITES)}) or an existing YAML config.")
        return [suite]
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; available suites: "
                         f"{', '.join([*SUITES, *_protocols()])}, "
                         "or a YAML config file.")
    return list(SUITES[suite])


def _protocols() -> dict[str, Callable[..., list[Row]]]:
    """Suites that run a protocol of their own rather than fixed episodes of config parts:
    name -> function(algorithms, steps, budget, out, fresh, progress) returning rows."""
    from metalab.rl.run import nav2d
    from metalab.studies.intents import PROTOCOLS

    return {**PROTOCOLS, "nav2d": nav2d}


def part_config(pattern: str, algorithm: str) -> Config:
    """The config ``algorithm`` trains with on the part ``pattern``."""
    if "{}" not in pattern:  # a user's YAML file
        return load_config(pattern, [f"algorithm={algorithm}"])
    own = pattern.format(algorithm)
    if own in builtin_configs():
        return load_config(own)
    return load_config(pattern.format("default"), [f"algorithm={algorithm}"])


def task_kind(config: Config) -> TaskKind:
    """The kind of the tasks ``config`` draws: the data set's, or its test task source's."""
    from metalab.data import dataset_kind
    from metalab.runs import task_sources

    return (dataset_kind(config.dataset) or
            task_sources(config, config.test_split, train=False).kind)


def _has_class_groups(config: Config) -> bool:
    """Whether ``config``'s data set is a data set of classes (which the diversity study
    subsamples by alphabet), rather than a task source of its own."""
    from metalab.data import DATASETS

    return hasattr(DATASETS.get(config.dataset), "load")


def task_label(config: Config, kind: TaskKind) -> str:
    """How the table names a part's tasks, e.g. ``glyphs 5-way 1-shot``."""
    return f"{config.dataset} {kind.describe(config.test_n_way, config.test_k_shot)}"


def parse_budget(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``10m``, ``1.5h``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match or float(match[1]) <= 0:
        raise ValueError(f"--budget expects a positive duration such as 90s, 10m or 1h; "
                         f"got {text!r}.")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


# -- one row -----------------------------------------------------------------------------------

def _run_dir(config: Config, out: Path) -> Path:
    """The run's folder, named by a hash of the config's non-default values (so a config
    field added later, at its default, keeps the caches of earlier runs valid)."""
    default = Config().to_dict()
    changed = {k: v for k, v in config.to_dict().items() if v != default[k] and k != "out"}
    key = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:10]
    return out / f"{config.algorithm}-{config.dataset}-{key}"


def _train_and_score(config: Config, run_dir: Path, progress: bool) -> Row:
    from metalab.memory import PeakMemory
    from metalab.runs import TEST_SEED, score_checkpoint, task_sources
    from metalab.tasks import fixed_episodes
    from metalab.train import Trainer

    config = config.replace(out=str(run_dir))
    # the folder is compare's cache of this row: a retrain moves an older run aside
    trainer = Trainer.from_config(config, progress=progress, overwrite=True)
    with PeakMemory(trainer.device) as train_peak:
        state = trainer.fit()
    algo, _, result = score_checkpoint(run_dir / "best.pt", progress=progress)
    episodes = fixed_episodes(
        task_sources(config, config.test_split, train=False, progress=progress),
        ADAPT_MEMORY_EPISODES, TEST_SEED)
    algo.eval()
    with PeakMemory(trainer.device) as adapt_peak:
        for batch in episodes:
            batch = batch.to(trainer.device)
            for i in range(len(batch)):
                task = batch.task(i)
                algo.adapt(task.support_x, task.support_y)
    return Row(task=task_label(config, algo.kind), algorithm=config.algorithm,
               family=type(algo).family, kind=algo.kind.name,
               metric=result.metric, mean=result.mean, ci95=result.ci95,
               train_seconds=state.train_seconds, train_steps=state.step,
               adapt_ms=result.adapt_ms, query_ms=result.query_ms,
               parameters=sum(p.numel() for p in algo.parameters()),
               train_peak_mib=train_peak.mib, adapt_peak_mib=adapt_peak.mib,
               adapt_grad_steps=algo.adaptation_steps(), run_dir=str(run_dir))


def limited(config: Config, steps: int | None, budget: float | None) -> Config:
    """``config`` with ``steps`` training steps (validation at least once) or ``budget``
    seconds of training instead of its own steps, if given."""
    if steps is not None:
        config = config.replace(steps=steps, val_every=min(config.val_every, steps))
    if budget is not None:
        config = config.replace(steps=10**9, time_budget=budget)
    return config


def run_one(config: Config, out: Path, fresh: bool = False, progress: bool = True) -> Row:
    """Train and score ``config`` in its run folder under ``out``, or read the cached row."""
    run_dir = _run_dir(config, out)
    cached = run_dir / "row.json"
    if cached.exists() and not fresh:  # run_dir: where the folder is now, if it was moved
        return Row(**{**json.loads(cached.read_text()), "run_dir": str(run_dir)})
    row = _train_and_score(config, run_dir, progress)
    atomic_write_text(json.dumps(asdict(row), indent=2) + "\n", cached)
    return row


def run_many(configs: Sequence[Config], out: Path, fresh: bool = False, progress: bool = True,
             jobs: int = 1) -> list[Row]:
    """:func:`run_one` for each of ``configs``, rows in the same order.

    With ``jobs`` > 1 the runs not cached yet (all of them with ``fresh``) first train side by
    side in ``jobs`` worker processes, each with an equal share of torch's threads: the small
    models of a suite keep one core busy each better than they share all of them. A run's
    row does not depend on where it trained, except through the number of threads its
    reductions use. Workers are spawned, so they import metalab afresh: algorithms, backbones
    and data sets registered at run time must be registered when the calling script's module
    is imported (as multiprocessing's spawn expects)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1; got {jobs}.")
    if jobs > 1:
        pending = {_run_dir(config, out): config for config in configs}
        _train_in_processes([config for run_dir, config in pending.items()
                             if fresh or not (run_dir / "row.json").exists()],
                            out, fresh, progress, jobs)
        fresh = False  # every row is in the cache now
    rows = []
    for config in configs:
        limit = (f"{config.time_budget:.0f} s" if config.time_budget > 0
                 else f"{config.steps} steps")
        options = "".join(f" {key}={value}" for key, value in config.dataset_options.items())
        print(f"== {config.algorithm} on {config.dataset}{options}: {limit} of meta-training")
        rows.append(run_one(config, out, fresh, progress))
    return rows


def _train_in_processes(configs: list[Config], out: Path, fresh: bool, progress: bool,
                        jobs: int) -> None:
    if not configs:
        return
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    import torch
    from tqdm.auto import tqdm

    workers = min(jobs, len(configs))
    threads = max(1, torch.get_num_threads() // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(run_one, config, out, fresh, False): config
                   for config in configs}
        with tqdm(total=len(futures), desc=f"training in {workers} processes", unit="run",
                  disable=not progress) as bar:
            remaining = set(futures)
            while remaining:
                done, remaining = wait(remaining, return_when=FIRST_EXCEPTION)
                bar.update(len(done))
                for future in done:
                    if future.exception() is not None:
                        for other in remaining:
                            other.cancel()
                        config = futures[future]
                        raise RuntimeError(
                            f"training {config.algorithm} on {config.dataset} in a worker "
                            f"process failed: {future.exception()}") from future.exception()


# -- studies -----------------------------------------------------------------------------------

def shots_curve(row: Row, shots: list[int], episodes: int, fresh: bool = False,
                progress: bool = False) -> list[tuple[float, float, float]]:
    """``row``'s trained model scored with each number of support examples per class."""
    from metalab.runs import score_checkpoint

    def score(k: int) -> list[float]:
        _, _, result = score_checkpoint(Path(row.run_dir) / "best.pt", {"test_k_shot": k},
                                        episodes=episodes, progress=progress)
        return [k, result.mean, result.ci95]

    return [tuple(cached_json(Path(row.run_dir) / f"shots-{k}-{episodes}.json",
                              lambda k=k: score(k), fresh)) for k in shots]


def diversity_curve(config: Config, row: Row, fractions: list[float], out: Path,
                    fresh: bool = False, progress: bool = False,
                    ) -> list[tuple[float, float, float]]:
    """Test score after meta-training on each fraction of the meta-train classes."""
    curve = []
    for fraction in fractions:
        if fraction >= 1.0:
            curve.append((1.0, row.mean, row.ci95))
            continue
        subset = config.replace(train_fraction=fraction)
        print(f"   diversity: {config.algorithm} on {fraction:.0%} of the meta-train classes")
        scored = run_one(subset, out / "diversity", fresh, progress)
        curve.append((fraction, scored.mean, scored.ci95))
    return curve


# -- the command ---------------------------------------------------------------------------------

def _selected(kinds_by_part: dict[str, TaskKind], algorithms: list[str] | None,
              ) -> list[tuple[str, str]]:
    """(part, algorithm) pairs to run: each algorithm on every part of a kind it supports."""
    if algorithms:
        unknown = [a for a in algorithms if a not in ALGORITHMS]
        if unknown:
            raise ValueError(f"unknown algorithm(s) {', '.join(unknown)}; registered: "
                             f"{', '.join(sorted(ALGORITHMS))}.")
    names = algorithms or sorted(ALGORITHMS)
    pairs = [(part, name) for part, kind in kinds_by_part.items() for name in names
             if ALGORITHMS[name].supports(kind)]
    unmatched = sorted(set(names) - {name for _, name in pairs})
    if algorithms and unmatched:
        kinds = sorted({kind.name for kind in kinds_by_part.values()})
        raise ValueError(f"{', '.join(unmatched)} cannot learn this suite's tasks "
                         f"({', '.join(kinds)}); choose algorithms for those tasks.")
    return pairs


def run_compare(
    suite: str = "quick", algorithms: list[str] | None = None, steps: int | None = None,
    budget: float | None = None, out: Path = Path("runs/compare"), fresh: bool = False,
    progress: bool = True, shots: list[int] | None = None, shot_episodes: int = 100,
    diversity: list[float] | None = None, plots: bool = True, jobs: int = 1,
) -> Comparison:
    """Train and score each algorithm on each part of ``suite``; print and write the table,
    run the requested studies and draw the plots.

    ``algorithms`` defaults to every registered algorithm, each on the parts whose kind of
    task it handles. ``steps`` fixes the training steps of every algorithm; ``budget``
    (seconds) instead trains each one for that long, whatever its config's steps. ``jobs``
    trains that many runs at once, in worker processes (:func:`run_many`).
    """
    protocol = _protocols().get(suite)
    if protocol is not None:  # a suite with a protocol of its own (metalab.studies.intents)
        rows = protocol(algorithms=algorithms, steps=steps, budget=budget, out=out / suite,
                        fresh=fresh, progress=progress, jobs=jobs)
        comparison = Comparison(rows=rows)
        print(markdown_table(rows))
        comparison.files = write_outputs(comparison, out / suite, plots)
        print("wrote " + ", ".join(str(p) for p in comparison.files))
        return comparison
    parts = suite_parts(suite)
    kinds = {part: task_kind(part_config(part, "protonet")) for part in parts}
    pairs = _selected(kinds, algorithms)
    out = out / Path(suite).stem
    configs = [limited(part_config(part, name), steps, budget) for part, name in pairs]
    comparison = Comparison(rows=run_many(configs, out, fresh, progress, jobs))
    for (part, name), config, row in zip(pairs, configs, comparison.rows, strict=True):
        if shots and kinds[part].classes:
            comparison.shots.setdefault(row.task, {})[name] = shots_curve(
                row, shots, shot_episodes, fresh)
        if diversity and _has_class_groups(config):
            comparison.diversity.setdefault(row.task, {})[name] = diversity_curve(
                config, row, diversity, out, fresh, progress)

    print(markdown_table(comparison.rows))
    comparison.files = write_outputs(comparison, out, plots)
    print("wrote " + ", ".join(str(p) for p in comparison.files))
    return comparison


# -- outputs -------------------------------------------------------------------------------------

def _mib(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.0f}"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| task | algorithm | family | score ± 95% CI | train s / steps | adapt ms | "
             "query ms | params | train peak MiB | adapt peak MiB | adapt grad steps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        score = get_kind(r.kind).format(r.mean, r.ci95)
        lines.append(f"| {r.task} | {r.algorithm} | {r.family} | {score} | "
                     f"{r.train_seconds:.0f} / {r.train_steps} | {r.adapt_ms:.2f} | "
                     f"{r.query_ms:.2f} | {r.parameters:,} | {_mib(r.train_peak_mib)} | "
                     f"{_mib(r.adapt_peak_mib)} | {r.adapt_grad_steps} |")
    return "\n".join(lines)


def _curves_csv(curves: dict[str, dict[str, list]], x_name: str) -> str:
    lines = [f"task,algorithm,{x_name},mean,ci95"]
    for task, by_algorithm in curves.items():
        for name, curve in by_algorithm.items():
            lines += [f"{task},{name},{x},{mean},{ci}" for x, mean, ci in curve]
    return "\n".join(lines) + "\n"


def write_outputs(comparison: Comparison, out: Path, plots: bool = True) -> list[Path]:
    """The table as Markdown, CSV and JSON, the studies as CSV, and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison.rows
    atomic_write_text(markdown_table(rows) + "\n", out / "table.md")
    atomic_write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n",
                      out / "table.json")
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    files = [out / "table.md", out / "table.csv", out / "table.json"]
    if comparison.shots:
        atomic_write_text(_curves_csv(comparison.shots, "shots"), out / "shots.csv")
        files.append(out / "shots.csv")
    if comparison.diversity:
        atomic_write_text(_curves_csv(comparison.diversity, "train_fraction"),
                          out / "diversity.csv")
        files.append(out / "diversity.csv")
    if plots:
        from metalab import plots as draw

        files += draw.score_vs_latency(rows, out / "score_vs_latency")
        files += draw.learning_curves(rows, out / "learning_curves")
        labels = {r.task: "test " + get_kind(r.kind).label() for r in rows}
        if comparison.shots:
            files += draw.curves(comparison.shots, "support examples per class",
                                 out / "shots", log_x=True, y_labels=labels)
        if comparison.diversity:
            files += draw.curves(comparison.diversity, "fraction of meta-train alphabets",
                                 out / "diversity", log_x=True, y_labels=labels)
    return files
