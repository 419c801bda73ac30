"""Milliseconds to adapt to one task and to answer its queries: ProtoNet against SNAIL, MANN and
the recurrent learner, on the same fixed 5-way 1-shot glyph test episodes, one task at a time
through ``metalab.evaluate``, interleaved per episode. See benchmarks/README.md.

    python benchmarks/adaptation_latency.py [--quick] [--checkpoint snail=runs/.../best.pt]
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import harness
from metalab.algorithms import TaskSpec
from metalab.config import load_config
from metalab.data import task_source
from metalab.evaluate import evaluate
from metalab.runs import build, load_checkpoint
from metalab.tasks import TaskBatch, fixed_episodes

NAMES = ("protonet", "snail", "mann", "recurrent")
N_WAY, K_SHOT, Q_QUERY = 5, 1, 15
FULL = {"episodes": 300, "warmup": 10, "threads": 1, "seed": 1}
QUICK = {"episodes": 20, "warmup": 2}


def spread(values: list[float]) -> dict[str, float]:
    """Median and interquartile range."""
    q25, median, q75 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q25": q25, "q75": q75, "iqr": q75 - q25}


def main() -> None:
    options = harness.Options(__doc__, "adaptation_latency", FULL, QUICK)
    options.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                         help=f"a trained model for NAME (one of {', '.join(NAMES)})")
    args = options.parse()
    checkpoints = dict(item.partition("=")[::2] for item in args.checkpoint)
    if bad := sorted(set(checkpoints) - set(NAMES)):
        options.error(f"--checkpoint NAME=PATH with NAME one of {', '.join(NAMES)}; got {bad}")
    source = task_source("glyphs", "test", N_WAY, K_SHOT, Q_QUERY)

    def one_by_one(episodes: int, seed: int) -> list[TaskBatch]:
        return [batch[i:i + 1] for batch in fixed_episodes(source, episodes, seed)
                for i in range(len(batch))] if episodes else []

    tasks, warm = one_by_one(args.episodes, args.seed), one_by_one(args.warmup, args.seed + 1000)
    spec = TaskSpec(n_way=N_WAY, input_shape=source.dataset.example_shape)
    sources = {name: checkpoints.get(name, f"untrained (omniglot/{name}-5w1s)")
               for name in NAMES}
    algos = {name: load_checkpoint(Path(checkpoints[name]))[0] if name in checkpoints
             else build(load_config(f"omniglot/{name}-5w1s"), spec) for name in NAMES}
    measured: dict[str, dict[str, list[float]]] = {
        name: {"adapt_ms": [], "query_ms": [], "score": []} for name in NAMES}

    def row(name: str) -> Callable[[int], None]:
        def run(index: int) -> None:  # warm-up indices start at harness.WARMUP
            timed = index < harness.WARMUP
            result = evaluate(algos[name], [tasks[index] if timed else
                                            warm[index - harness.WARMUP]])
            if timed:
                for key, value in (("adapt_ms", result.adapt_ms), ("query_ms", result.query_ms),
                                   ("score", result.mean)):
                    measured[name][key].append(value)
        return run

    harness.interleave({name: row(name) for name in NAMES}, len(tasks), warmup=args.warmup)
    print("| algorithm | family | parameters | adapt ms [IQR] | query ms [IQR] | accuracy % "
          "| source |\n| --- | --- | ---: | ---: | ---: | ---: | --- |")
    results = {}
    for name, values in measured.items():
        adapt, query = spread(values["adapt_ms"]), spread(values["query_ms"])
        results[name] = {"family": algos[name].family, "source": sources[name],
                         "parameters": sum(p.numel() for p in algos[name].parameters()),
                         "adapt": adapt, "query": query,
                         "accuracy": statistics.fmean(values["score"]), **values}
        print(f"| {name} | {algos[name].family} | {results[name]['parameters']:,} | "
              f"{adapt['median']:.2f} [{adapt['iqr']:.2f}] | {query['median']:.2f} "
              f"[{query['iqr']:.2f}] | {results[name]['accuracy']:.1f} | {sources[name]} |")
    print(f"Per task: adapt on {N_WAY * K_SHOT} support images, query on {N_WAY * Q_QUERY}; "
          "medians over episodes.")
    harness.write_json(args.out, "adaptation_latency", {
        "unit": "milliseconds per task (metalab.evaluate's adapt and query timers)",
        "config": {**{k: getattr(args, k) for k in FULL}, "quick": args.quick,
                   "dataset": "glyphs test", "n_way": N_WAY, "k_shot": K_SHOT,
                   "q_query": Q_QUERY},
        "algorithms": results})


if __name__ == "__main__":
    main()
