"""Peak memory of a second-order MAML step against inner steps and meta-batch size.

What is measured
    One outer step of metalab's MAML (second order, fp32) on 5-way 1-shot 15-query tasks of
    28x28x1 images with the Conv-4 backbone (BatchNorm with per-task batch statistics):
    ``metalab.train.meta_backward`` then an Adam step, for every combination of
    ``--inner-steps`` and ``--tasks``, in three modes:

    * ``whole``: the tasks one after the other in one graph, back-propagated once
      (``task_chunk=0``, ``task_workers=1``): the graph of every task is alive at once;
    * ``chunk1``: one task back-propagated at a time (``task_chunk=1``, ``task_workers=1``);
    * ``threads``: the tasks in 2 threads, each back-propagating its task at once
      (``task_workers=2``), metalab's default on a 2-core CPU.

    Each configuration runs in a fresh subprocess (so allocator caches of one do not hide
    another's peak): it builds the model and the batch, resets the kernel's peak-RSS mark
    (writing ``5`` to ``/proc/self/clear_refs``), runs ``--steps`` steps and reports the peak
    resident set size during them (``VmHWM``) minus the RSS before the first step: the memory
    the steps needed, model and data excluded. The gradients of all
    three modes are equal (``tests/test_optimization.py`` checks it), so the columns compare
    the same computation.

Running
    python benchmarks/maml_memory.py                      # the full grid, a few minutes
    python benchmarks/maml_memory.py --quick              # a smoke run
Writes ``benchmarks/results/maml_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

MODES = {"whole": (0, 1), "chunk1": (1, 1), "threads": (0, 2)}  # mode -> (task_chunk, workers)


def measure(inner_steps: int, tasks: int, mode: str, steps: int) -> dict[str, float]:
    """Run in a subprocess: the extra peak memory of ``steps`` MAML steps, in MiB."""
    import torch

    from maml_step import status_kib  # the sibling script (benchmarks/ is on sys.path)
    from metalab.algorithms import TaskSpec, build_algorithm
    from metalab.models import Conv4
    from metalab.tasks import TaskBatch
    from metalab.train import meta_backward

    torch.manual_seed(0)
    torch.set_num_threads(2)
    chunk, workers = MODES[mode]
    spec = TaskSpec(n_way=5, input_shape=(1, 28, 28))
    algo = build_algorithm("maml", Conv4(), spec, inner_steps=inner_steps, inner_lr=0.4,
                           task_workers=workers)
    optimizer = torch.optim.Adam(algo.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.rand(tasks, 5, 1, 28, 28, generator=generator),
                      torch.arange(5).repeat(tasks, 1),
                      torch.rand(tasks, 75, 1, 28, 28, generator=generator),
                      torch.arange(5).repeat(tasks, 15))
    Path("/proc/self/clear_refs").write_text("5")  # peak mark := current RSS
    before = status_kib("VmRSS") / 1024
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        meta_backward(algo, batch, task_chunk=chunk)
        optimizer.step()
    peak = status_kib("VmHWM") / 1024
    return {"inner_steps": inner_steps, "tasks": tasks, "mode": mode,
            "baseline_mib": before, "peak_mib": peak, "step_mib": peak - before}


def write(args: argparse.Namespace, rows: list[dict[str, float]]) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "what": "extra peak RSS of MAML second-order steps (5w1s15q, Conv-4, 28x28, fp32)",
        "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
        "steps": args.steps, "rows": rows}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 3, 5],
                        help="inner-loop steps to measure (default 1 3 5)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 16, 32],
                        help="meta-batch sizes to measure (default 4 16 32)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=2, help="steps per measurement (2)")
    parser.add_argument("--quick", action="store_true", help="1 inner step, 2 and 4 tasks")
    parser.add_argument("--out", default="benchmarks/results/maml_memory.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        inner, tasks, mode = args.child
        print(json.dumps(measure(int(inner), int(tasks), mode, args.steps)))
        return
    if args.quick:
        args.inner_steps, args.tasks, args.steps = [1], [2, 4], 1
    rows = []
    for inner in args.inner_steps:
        for tasks in args.tasks:
            for mode in args.modes:
                out = subprocess.run(
                    [sys.executable, __file__, "--steps", str(args.steps),
                     "--child", str(inner), str(tasks), mode],
                    check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                rows.append(row)
                write(args, rows)  # after every cell: an interrupted grid keeps what it measured
                print(f"inner steps {inner}  tasks {tasks:3d}  {mode:8s} "
                      f"step peak {row['step_mib']:8.1f} MiB", flush=True)
    print("\n| inner steps | tasks | " + " | ".join(f"{m} (MiB)" for m in args.modes) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in args.modes) + " |")
    for inner in args.inner_steps:
        for tasks in args.tasks:
            cells = [next(r["step_mib"] for r in rows if r["inner_steps"] == inner
                          and r["tasks"] == tasks and r["mode"] == m) for m in args.modes]
            print(f"| {inner} | {tasks} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    write(args, rows)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
