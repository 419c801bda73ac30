"""Peak memory of a second-order MAML step (Conv-4, 5-way 1-shot 15-query, 28x28, fp32) against
inner steps and meta-batch size, in three modes that compute the same gradient: ``whole`` (one
backward of the whole batch), ``chunk1`` (a task at a time) and ``threads`` (2 task threads,
the default on 2 cores); each cell in a fresh process. See benchmarks/README.md.

    python benchmarks/maml_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json

import torch

import harness
from metalab.algorithms import TaskSpec, build_algorithm
from metalab.models import Conv4
from metalab.tasks import TaskBatch

MODES = {"whole": (0, 1), "chunk1": (1, 1), "threads": (0, 2)}  # (task_chunk, task_workers)
FULL = {"steps": 2, "threads": 2}
QUICK = {"steps": 1}


def cell(inner_steps: int, tasks: int, mode: str, steps: int) -> dict[str, float | None]:
    """The extra peak memory of ``steps`` MAML steps, in this (fresh) process."""
    torch.manual_seed(0)
    chunk, workers = MODES[mode]
    algo = build_algorithm("maml", Conv4(), TaskSpec(n_way=5, input_shape=(1, 28, 28)),
                           inner_steps=inner_steps, inner_lr=0.4, task_workers=workers)
    optimizer = torch.optim.Adam(algo.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.rand(tasks, 5, 1, 28, 28, generator=generator),
                      torch.arange(5).repeat(tasks, 1),
                      torch.rand(tasks, 75, 1, 28, 28, generator=generator),
                      torch.arange(5).repeat(tasks, 15))
    return harness.peak_memory(
        lambda: [harness.train_step(algo, optimizer, batch, chunk) for _ in range(steps)])


def main() -> None:
    options = harness.Options(__doc__, "maml_memory", FULL, QUICK)
    options.add_argument("--inner-steps", type=int, nargs="+", help="default 1 3 5; --quick: 1")
    options.add_argument("--tasks", type=int, nargs="+", help="default 4 16 32; --quick: 2 4")
    options.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    options.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)
    args = options.parse()
    if args.cell:
        inner, tasks, mode = args.cell
        print(json.dumps(cell(int(inner), int(tasks), mode, args.steps)))
        return
    args.inner_steps = args.inner_steps or ([1] if args.quick else [1, 3, 5])
    args.tasks = args.tasks or ([2, 4] if args.quick else [4, 16, 32])
    rows = []
    for inner in args.inner_steps:
        for tasks in args.tasks:
            peaks = {mode: harness.in_subprocess(
                ["--steps", str(args.steps), "--cell", str(inner), str(tasks), mode],
                args.threads) for mode in args.modes}
            rows.append({"inner_steps": inner, "tasks": tasks, "peaks": peaks})
            print(f"inner steps {inner}, {tasks} tasks: " + ", ".join(
                f"{mode} {peak.get('peak_mib') or peak}" for mode, peak in peaks.items()),
                flush=True)
    print("\n| inner steps | tasks | " + " | ".join(f"{m} (MiB)" for m in args.modes) + " |\n"
          "| --- | --- | " + " | ".join("---" for _ in args.modes) + " |")
    for row in rows:
        cells = [row["peaks"][m].get("peak_mib") for m in args.modes]
        print(f"| {row['inner_steps']} | {row['tasks']} | "
              + " | ".join("n/a" if c is None else f"{c:.0f}" for c in cells) + " |")
    harness.write_json(args.out, "maml_memory", {
        "unit": "MiB: peak RSS of MAML second-order steps above the RSS before them "
                "(5w1s15q, Conv-4, 28x28, fp32), a fresh process per cell",
        "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
