"""How to compute a meta-batch of tasks of different sizes: padded with masks, or grouped.

The case the representation is chosen for: users as tasks (MovieLens, MeLU's protocol), each
with 3 to 90 support ratings and 10 queries, 32 users per meta-batch, on a small MLP. Every
user has a size of their own, so grouping equal-size tasks into dense batches
(``RaggedTaskBatch.groups``) computes them one task at a time, while padding every support
set to the largest with a mask (``RaggedTaskBatch.padded``) is one call for the whole batch,
at the cost of computing the padding. :func:`metalab.train.meta_backward` on both ways, for

* the CNP (regression: the mean of encoded support pairs, a masked mean when padded), and
* ProtoNet (5-way classification with 1 to 18 shots per class, a masked class mean),

forward and backward of one meta-batch, against the same number of tasks all of one (mean)
size on the dense path. Both ways are checked to give the same loss. Interleaved (grouped,
padded, dense, grouped, ...), medians. The figures chose padding for the algorithms that
honour masks (``pads_tasks``).

    python benchmarks/ragged_tasks.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metalab.algorithms import MetaLearner, TaskSpec, build_algorithm
from metalab.kinds import CLASSIFICATION, REGRESSION
from metalab.models import MLP
from metalab.tasks import RaggedTaskBatch, TaskBatch, stack_tasks
from metalab.train import meta_backward

TASKS, QUERIES, FEATURES, N_WAY = 32, 10, 32, 5


def regression_tasks(sizes: list[int], generator: torch.Generator) -> list[TaskBatch]:
    """One task per support size: linear targets of random features (a stand-in for
    ratings of items described by features)."""
    tasks = []
    for size in sizes:
        weights = torch.randn(FEATURES, 1, generator=generator)
        x = torch.randn(1, size + QUERIES, FEATURES, generator=generator)
        y = x @ weights / FEATURES**0.5
        tasks.append(TaskBatch(x[:, :size], y[:, :size], x[:, size:], y[:, size:]))
    return tasks


def classification_tasks(shots: list[int], generator: torch.Generator) -> list[TaskBatch]:
    """One 5-way task per shot count, ``QUERIES // 2`` queries per class."""
    tasks = []
    for k in shots:
        centres = torch.randn(N_WAY, 1, FEATURES, generator=generator)
        x = centres + torch.randn(N_WAY, k + 2, FEATURES, generator=generator)
        labels = torch.arange(N_WAY).repeat_interleave(k + 2).view(N_WAY, k + 2)
        tasks.append(TaskBatch(x[:, :k].reshape(1, -1, FEATURES), labels[:, :k].reshape(1, -1),
                               x[:, k:].reshape(1, -1, FEATURES), labels[:, k:].reshape(1, -1)))
    return tasks


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(name: str, algo: MetaLearner, ragged: RaggedTaskBatch, dense: TaskBatch,
            repeats: int) -> dict:
    def backward(batch: RaggedTaskBatch | TaskBatch, pad: bool) -> float:
        algo.pads_tasks = pad  # this instance only: padded, or in groups of equal sizes
        algo.zero_grad()
        return meta_backward(algo, batch)[0]

    def grouped() -> None:
        backward(ragged, pad=False)

    def with_padding() -> None:
        backward(ragged, pad=True)

    def same_size() -> None:
        backward(dense, pad=True)

    # Both ways compute the same loss: checked before timing.
    padded, grouped_loss = backward(ragged, pad=True), backward(ragged, pad=False)
    assert abs(padded - grouped_loss) < 1e-5 * abs(grouped_loss), (padded, grouped_loss)
    times: dict[str, list[float]] = {"grouped": [], "padded": [], "dense": []}
    for _ in range(repeats):  # interleaved, so that load changes hit all three alike
        times["grouped"].append(timed(grouped))
        times["padded"].append(timed(with_padding))
        times["dense"].append(timed(same_size))
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{name:<10} grouped {medians['grouped']:8.2f} ms   padded {medians['padded']:8.2f} ms"
          f"   dense (one size) {medians['dense']:8.2f} ms   "
          f"grouped/padded {medians['grouped'] / medians['padded']:.2f}x")
    return {"algorithm": name, "median_ms": medians, "ms": {k: [t * 1e3 for t in v]
                                                            for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="benchmarks/results/ragged_tasks.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    results = []

    sizes = torch.randint(3, 91, (TASKS,), generator=generator).tolist()
    tasks = regression_tasks(sizes, generator)
    dense = TaskBatch.stack(regression_tasks([round(statistics.mean(sizes))] * TASKS, generator))
    torch.manual_seed(0)
    cnp = build_algorithm("cnp", MLP(FEATURES, hidden=(64,)), TaskSpec(
        kind=REGRESSION, n_way=0, input_shape=(FEATURES,), output_dim=1)).train()
    results.append(measure("cnp", cnp, stack_tasks(tasks), dense, args.repeats))

    shots = torch.randint(1, 19, (TASKS,), generator=generator).tolist()
    tasks = classification_tasks(shots, generator)
    dense = TaskBatch.stack(classification_tasks([round(statistics.mean(shots))] * TASKS,
                                                 generator))
    torch.manual_seed(0)
    protonet = build_algorithm("protonet", MLP(FEATURES, hidden=(64, 64)), TaskSpec(
        kind=CLASSIFICATION, n_way=N_WAY, input_shape=(FEATURES,))).train()
    results.append(measure("protonet", protonet, stack_tasks(tasks), dense, args.repeats))

    record = {"tasks": TASKS, "queries": QUERIES, "features": FEATURES, "threads": args.threads,
              "repeats": args.repeats, "loadavg": os.getloadavg(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
