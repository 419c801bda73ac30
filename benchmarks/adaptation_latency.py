"""Milliseconds to adapt to one task and to answer its queries: ProtoNet against the model-based
family (SNAIL, MANN, the recurrent learner), on the same 5-way 1-shot episodes.

What is measured
    For each episode of ``--episodes`` fixed 5-way 1-shot 15-query tasks of the embedded
    ``glyphs`` meta-test split (``metalab.data.task_source("glyphs", "test", 5, 1, 15)`` and
    ``metalab.tasks.fixed_episodes`` with ``--seed``), and for each algorithm, in eval mode and
    under ``torch.inference_mode()``:

    * **adapt**: ``predictor = algo.adapt(support_x, support_y)`` -- embedding the 5 support
      images and whatever the method keeps of them (ProtoNet: prototypes; SNAIL: the support
      sequence's attention keys/values and convolution inputs; MANN: controller state and
      memory after the support steps; recurrent: the LSTM state);
    * **query**: ``predictor(query_x)`` on the task's 75 query images.

    This is the per-task cost the explainer's comparison table calls "adaptation speed"; it
    is one task at a time, the way ``metalab evaluate`` scores a model.

    Each algorithm is the one a built-in config trains (``omniglot/<name>-5w1s``: its
    backbone and algorithm options, e.g. SNAIL's full attention/TC stack), built for 5-way
    tasks on 28x28 images and left untrained -- latency does not depend on the weights --
    unless ``--checkpoint NAME=PATH`` loads a trained one (any checkpoint of a 5-way model on
    28x28 single-channel images; its own config then decides the architecture). Accuracy is
    reported alongside so that a trained model can be checked; untrained ones sit at chance
    (20%), except ProtoNet, whose random embedding already beats it.

Methodology
    The algorithms are interleaved per episode (A B C D, A B C D, ...), so a slow spell of the
    shared machine hits all of them alike, after ``--warmup`` untimed episodes each (drawn
    with another seed). Times are ``time.perf_counter`` around each call (CUDA is not used).
    Reported per algorithm: median and interquartile range (IQR, q75 - q25) of the per-task
    milliseconds, for adapt, query and their sum; the JSON keeps every per-task time.
    ``--threads`` sets ``torch.set_num_threads`` (default 1: one task is too small to gain
    from more on this CPU, and a single thread is least disturbed by other processes).

Running
    python benchmarks/adaptation_latency.py --quick          # smoke run: 20 episodes
    python benchmarks/adaptation_latency.py                  # 300 episodes
    python benchmarks/adaptation_latency.py --checkpoint snail=runs/omniglot/snail-5w1s/best.pt

JSON goes to ``benchmarks/results/adaptation_latency.json`` (``--quick``:
``adaptation_latency-quick.json``; ``--out`` to choose): configuration, machine (CPU, threads,
load average at start and end, versions, commit), and per algorithm its source, parameter
count, summaries and raw per-task times.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metalab import data
from metalab.algorithms import ALGORITHMS, MetaLearner, TaskSpec
from metalab.config import load_config
from metalab.runs import build, load_checkpoint
from metalab.tasks import Task, TaskSource, fixed_episodes
from protonet_throughput import machine_info  # the sibling script (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ALGORITHM_NAMES = ("protonet", "snail", "mann", "recurrent")
N_WAY, K_SHOT, Q_QUERY = 5, 1, 15
WARMUP_SEED_OFFSET = 1_000  # warm-up episodes come from another seed than the timed ones


@dataclass
class Timings:
    """One algorithm's per-task times (milliseconds) and query accuracy (%)."""

    name: str
    source: str  # "untrained (omniglot/<name>-5w1s)" or the checkpoint path
    parameters: int
    adapt_ms: list[float] = field(default_factory=list)
    query_ms: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        total = [a + q for a, q in zip(self.adapt_ms, self.query_ms, strict=True)]
        return {"adapt": spread(self.adapt_ms), "query": spread(self.query_ms),
                "adapt_plus_query": spread(total),
                "accuracy_percent": statistics.fmean(self.accuracy)}


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles and interquartile range."""
    q25, median, q75 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q25": q25, "q75": q75, "iqr": q75 - q25}


def build_untrained(name: str, input_shape: tuple[int, ...]) -> tuple[MetaLearner, str]:
    """The architecture of built-in config ``omniglot/<name>-5w1s``, for 5-way tasks."""
    config_name = f"omniglot/{name}-5w1s"
    algo = build(load_config(config_name), TaskSpec(n_way=N_WAY, input_shape=input_shape))
    return algo.eval(), f"untrained ({config_name})"


def time_task(algo: MetaLearner, task: Task, timings: Timings | None) -> None:
    """Adapt to ``task`` and classify its queries; record the times unless ``timings`` is
    None (warm-up)."""
    with torch.inference_mode():
        start = time.perf_counter()
        predictor = algo.adapt(task.support_x, task.support_y)
        adapted = time.perf_counter()
        logits = predictor(task.query_x)
        done = time.perf_counter()
    if timings is not None:
        timings.adapt_ms.append(1e3 * (adapted - start))
        timings.query_ms.append(1e3 * (done - adapted))
        timings.accuracy.append(100 * (logits.argmax(-1) == task.query_y).float().mean().item())


def tasks_of(source: TaskSource, episodes: int, seed: int) -> list[Task]:
    return [batch.task(i) for batch in fixed_episodes(source, episodes, seed)
            for i in range(len(batch))]


def print_table(results: list[Timings]) -> None:
    """One row per algorithm: median [IQR] in milliseconds."""
    head = (f"{'algorithm':<10} {'family':<7} {'params':>9} {'adapt ms [IQR]':>17} "
            f"{'query ms [IQR]':>17} {'total ms [IQR]':>17} {'acc %':>6}  source")
    print(head)
    print("-" * len(head))
    for res in results:
        s = res.summary()
        cells = [f"{s[k]['median']:8.2f} [{s[k]['iqr']:5.2f}]"
                 for k in ("adapt", "query", "adapt_plus_query")]
        print(f"{res.name:<10} {ALGORITHMS[res.name].family:<7} {res.parameters:>9,} "
              f"{cells[0]:>17} {cells[1]:>17} {cells[2]:>17} {s['accuracy_percent']:6.1f}  "
              f"{res.source}")
    print(f"Per task: adapt on {N_WAY * K_SHOT} support images, query on "
          f"{N_WAY * Q_QUERY} images; medians over episodes, interleaved per episode.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, help="timed episodes (default 300)")
    parser.add_argument("--warmup", type=int, help="untimed episodes per algorithm first "
                        "(default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 20 episodes, 2 warm-up (unless given)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads "
                        "(default 1)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fixed episodes")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="use a trained model for algorithm NAME (one of "
                             f"{', '.join(ALGORITHM_NAMES)}); repeatable")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/"
                        "adaptation_latency.json; --quick: adaptation_latency-quick.json)")
    args = parser.parse_args(argv)
    defaults = (20, 2) if args.quick else (300, 10)
    for name, value in zip(("episodes", "warmup"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.episodes, args.threads) < 1 or args.warmup < 0:
        parser.error("--episodes and --threads must be >= 1, --warmup >= 0")
    args.checkpoints = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or name not in ALGORITHM_NAMES:
            parser.error(f"--checkpoint expects NAME=PATH with NAME one of "
                         f"{', '.join(ALGORITHM_NAMES)}, got {item!r}")
        args.checkpoints[name] = Path(path)
    if args.out is None:
        args.out = RESULTS / ("adaptation_latency-quick.json" if args.quick
                              else "adaptation_latency.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    source = data.task_source("glyphs", "test", N_WAY, K_SHOT, Q_QUERY)
    input_shape = source.dataset.example_shape
    tasks = tasks_of(source, args.episodes, args.seed)
    warmup = tasks_of(source, args.warmup, args.seed + WARMUP_SEED_OFFSET) if args.warmup else []

    algos, results = [], []
    for name in ALGORITHM_NAMES:
        if name in args.checkpoints:
            algo, _ = load_checkpoint(args.checkpoints[name])
            label = str(args.checkpoints[name])
        else:
            algo, label = build_untrained(name, input_shape)
        algos.append(algo)
        results.append(Timings(name, label, sum(p.numel() for p in algo.parameters())))
    print(f"glyphs test: {len(tasks)} episodes of {N_WAY}-way {K_SHOT}-shot {Q_QUERY}-query, "
          f"{args.warmup} warm-up, {torch.get_num_threads()} threads", file=sys.stderr)

    for task in warmup:
        for algo in algos:
            time_task(algo, task, None)
    gc.collect()
    for task in tasks:  # interleaved: every algorithm on this episode, then the next episode
        for algo, timings in zip(algos, results, strict=True):
            time_task(algo, task, timings)
    print_table(results)

    report = {
        "benchmark": "adaptation_latency",
        "unit": "milliseconds per task (adapt: algo.adapt on the support set; query: one "
                "predictor call on the query set), torch.inference_mode, CPU",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {"episodes": args.episodes, "warmup": args.warmup, "quick": args.quick,
                   "seed": args.seed, "dataset": "glyphs test", "n_way": N_WAY,
                   "k_shot": K_SHOT, "q_query": Q_QUERY, "input_shape": list(input_shape)},
        "machine": machine_info(args.threads)
        | {"loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "algorithms": [{"name": r.name, "family": ALGORITHMS[r.name].family,
                        "source": r.source, "parameters": r.parameters,
                        "summary": r.summary(),
                        "raw": {"adapt_ms": r.adapt_ms, "query_ms": r.query_ms}}
                       for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
