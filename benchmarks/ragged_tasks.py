"""How to compute a meta-batch of tasks of different sizes: padded with masks, or grouped.

Users as tasks (MeLU's protocol: 3 to 90 support ratings, 10 queries, 32 per meta-batch) on a
small MLP. Grouping equal-size tasks (``RaggedTaskBatch.groups``) computes them one at a time;
padding every support set to the largest with a mask (``RaggedTaskBatch.padded``) is one call,
at the cost of the padding. ``meta_backward`` both ways (checked to give the same loss) and on
a dense batch of one (mean) size, for the CNP and ProtoNet (1 to 18 shots per class),
interleaved, medians. The figures chose padding for the algorithms that honour masks.

    python benchmarks/ragged_tasks.py [--repeats 15] [--threads 2] [--quick]
"""

from __future__ import annotations

import statistics

import torch

import harness
from metalab.algorithms import MetaLearner, TaskSpec, build_algorithm
from metalab.kinds import CLASSIFICATION, REGRESSION
from metalab.models import MLP
from metalab.tasks import RaggedTaskBatch, TaskBatch, stack_tasks
from metalab.train import meta_backward

TASKS, QUERIES, FEATURES, N_WAY = 32, 10, 32, 5
FULL = {"repeats": 15, "threads": None}
QUICK = {"repeats": 2}


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


def measure(name: str, algo: MetaLearner, ragged: RaggedTaskBatch, dense: TaskBatch,
            repeats: int) -> dict:
    """Forward and backward of the ragged batch grouped and padded, and of the dense one."""
    def backward(batch: RaggedTaskBatch | TaskBatch, pad: bool) -> float:
        algo.pads_tasks = pad  # this instance only: padded, or in groups of equal sizes
        algo.zero_grad()
        return meta_backward(algo, batch)[0]

    # Both ways compute the same loss: checked before timing.
    padded, grouped = backward(ragged, pad=True), backward(ragged, pad=False)
    if abs(padded - grouped) > 1e-5 * abs(grouped):
        raise SystemExit(f"{name}: padded loss {padded} != grouped loss {grouped}")
    times = harness.interleave({"grouped": lambda i: backward(ragged, pad=False),
                                "padded": lambda i: backward(ragged, pad=True),
                                "dense": lambda i: backward(dense, pad=True)}, repeats)
    summary = harness.summarise(times, "padded")
    ms = {k: 1e3 * v["s"] for k, v in summary.items()}
    print(f"{name:<10} grouped {ms['grouped']:8.2f} ms   padded {ms['padded']:8.2f} ms   "
          f"dense (one size) {ms['dense']:8.2f} ms   grouped/padded "
          f"{summary['grouped']['ratio']:.2f}x")
    return {"algorithm": name, "summary": summary, "step_s": times}


def main() -> None:
    args = harness.Options(__doc__, "ragged_tasks", FULL, QUICK).parse()
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

    harness.write_json(args.out, "ragged_tasks", {
        "tasks": TASKS, "queries": QUERIES, "features": FEATURES, "repeats": args.repeats,
        "results": results})


if __name__ == "__main__":
    main()
