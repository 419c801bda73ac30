"""Outer steps per second of metalab's trainer on 1 and 2 processes, and clean exits of 2.

What is measured
    Second-order MAML (and ProtoNet) on the embedded glyphs, 5-way 1-shot 15-query, Conv-4
    (64 channels), 32 tasks per outer step, Adam: the real ``metalab.train.Trainer`` in a
    torchrun job of 1 or 2 processes (gloo, one thread each: ``OMP_NUM_THREADS=1``). With 2
    processes each rank trains on 16 tasks and one all-reduce per step adds the gradients.

    * **steps/s**: 1 / the median over the timed steps of a step's wall time (the trainer's
      ``train_seconds`` per step, read from ``log.jsonl``, ``log_every: 1``), after
      ``--warmup`` untimed steps. The step includes drawing the tasks, the meta-gradient,
      the all-reduce and the Adam step.
    * **CPU seconds per step** of rank 0 (``cpu_seconds``: all its threads): the work one
      process does per step, which a busy machine does not inflate the way it does wall time.
    * **communication share**: time inside ``torch.distributed.all_reduce`` / step time, per
      step and rank (median). It includes waiting for the slower rank, so it is an upper bound
      on the cost of communication itself; **all-reduce alone** times the same buffer (the
      flattened gradients) after a barrier, i.e. the transfer on its own.

Methodology
    Each configuration runs in a fresh torchrun job; jobs alternate 1, 2, 1, 2, ... processes
    (``--repeats`` pairs), so slow drift of a shared machine hits both alike. Reported: the
    median over repeats of each job's steps/s, and the median of the paired ratios (speed-up
    of 2 processes over 1). The JSON keeps every per-step time.

Clean exits (``--launches N``)
    Launches ``torchrun --standalone --nproc_per_node=2 -m metalab train`` of a tiny glyph
    config N times and counts the jobs that exit non-zero or print "terminate called" (gloo's
    abort at exit when the process group is not torn down in order). ``--control-launches M``
    also launches, M times, a bare 2-process gloo script that all-reduces and exits without
    ``destroy_process_group``: the failure the ordered teardown removes.

Running
    python benchmarks/distributed_scaling.py --quick       # smoke run, about a minute
    python benchmarks/distributed_scaling.py               # 3 pairs of jobs per algorithm
    python benchmarks/distributed_scaling.py --algorithms maml --launches 30 --control-launches 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "distributed_scaling.json"
ALGORITHMS = ("maml", "protonet")

BARE_GLOO = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(1000)
for _ in range(10):
    dist.all_reduce(t)
print("rank", dist.get_rank(), "ok", t[0].item())
"""


def torchrun(procs: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={procs}", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


# -- the worker: one torchrun job -------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """Train ``--warmup + --steps`` steps, timing every all-reduce; rank 0 writes the JSON."""
    import torch.distributed as dist

    from metalab import distributed
    from metalab.config import Config
    from metalab.train import Trainer

    inside: list[float] = []
    all_reduce = dist.all_reduce

    def timed_all_reduce(*a: Any, **k: Any) -> Any:
        started = time.perf_counter()
        result = all_reduce(*a, **k)
        inside.append(time.perf_counter() - started)
        return result

    dist.all_reduce = timed_all_reduce  # the trainer's one collective per step
    with tempfile.TemporaryDirectory() as out, distributed.process_group(torch.device("cpu")):
        config = Config(algorithm=args.algorithm, dataset="glyphs", backbone="conv4", n_way=5,
                        k_shot=1, q_query=15, tasks_per_batch=args.meta_batch,
                        steps=args.warmup + args.steps, val_every=10**9, val_episodes=2,
                        log_every=1, device="cpu", out=out)
        trainer = Trainer.from_config(config, progress=False)
        trainer.fit()
        comm = distributed.gather_objects(inside[args.warmup:args.warmup + args.steps])
        alone = transfer_time(trainer) if distributed.world_size() > 1 else None
        if distributed.rank() == 0:  # rank 0 alone writes the log
            lines = [json.loads(line) for line in (Path(out) / "log.jsonl").open()]
            step_s, cpu_s = (per_step([line[key] for line in lines if "loss" in line])
                             for key in ("train_seconds", "cpu_seconds"))
            result = {"processes": distributed.world_size(), "step_s": step_s[args.warmup:],
                      "cpu_s": cpu_s[args.warmup:],
                      "comm_s": comm, "allreduce_alone_s": alone,
                      "gradient_floats": sum(p.numel() for p in trainer.algo.parameters())}
            Path(args.result).write_text(json.dumps(result))


def per_step(cumulative: list[float]) -> list[float]:
    """Per-step values of a running total logged every step."""
    return [b - a for a, b in zip([0.0, *cumulative], cumulative, strict=False)]


def transfer_time(trainer: Any, repeats: int = 20) -> float:
    """Median time of one all-reduce of the step's buffer (gradients), both ranks ready."""
    from metalab import distributed

    flat = torch.cat([p.detach().flatten() for p in trainer.algo.parameters()])
    times = []
    for _ in range(repeats):
        distributed.barrier()
        started = time.perf_counter()
        distributed.weighted_sum_([flat.clone()], 0.5)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# -- the driver -------------------------------------------------------------------------------


def run_job(algorithm: str, procs: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = torchrun(procs, str(Path(__file__).resolve()), "--worker", "--algorithm",
                           algorithm, "--meta-batch", str(args.meta_batch), "--steps",
                           str(args.steps), "--warmup", str(args.warmup), "--result", str(result))
        job = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True,
                             text=True, check=False)
        if job.returncode != 0 or not result.exists():
            raise RuntimeError(f"{algorithm} on {procs} processes failed:\n{job.stderr[-3000:]}")
        return json.loads(result.read_text())


def summarise(jobs: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median steps/s per process count, paired speed-up, communication share."""
    rows: dict[str, Any] = {}
    speeds = {p: [1 / statistics.median(job["step_s"]) for job in runs]
              for p, runs in jobs.items()}
    for procs, runs in jobs.items():
        row = {"steps_per_s": statistics.median(speeds[procs]), "per_job_steps_per_s":
               speeds[procs],
               "rank0_cpu_s_per_step": statistics.median(c for job in runs for c in job["cpu_s"])}
        if procs > 1:
            shares = [c / s for job in runs for rank in job["comm_s"]
                      for c, s in zip(rank, job["step_s"], strict=False)]
            row["comm_share"] = statistics.median(shares)
            row["allreduce_alone_ms"] = 1e3 * statistics.median(
                job["allreduce_alone_s"] for job in runs)
            row["speedup"] = statistics.median(
                two / one for one, two in zip(speeds[1], speeds[procs], strict=False))
        rows[str(procs)] = row
    return rows


def launch_repeatedly(command: list[str], times: int, cwd: Path) -> dict[str, Any]:
    """Run ``command`` ``times`` times: how many exited non-zero or aborted at exit."""
    failures, aborts, seconds = 0, 0, []
    for i in range(times):
        started = time.perf_counter()
        job = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True,
                             text=True, check=False)
        seconds.append(time.perf_counter() - started)
        failures += job.returncode != 0
        aborts += "terminate called" in job.stdout + job.stderr
        print(f"  launch {i + 1}/{times}: exit {job.returncode}", file=sys.stderr, flush=True)
    return {"launches": times, "nonzero_exits": failures, "terminate_called": aborts,
            "median_launch_s": statistics.median(seconds) if seconds else None}


def clean_exits(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        config = folder / "tiny.yaml"
        config.write_text(yaml.safe_dump({
            "algorithm": "protonet", "backbone": "conv4", "backbone_options": {"hidden": 8},
            "dataset": "glyphs", "n_way": 3, "k_shot": 1, "q_query": 2, "tasks_per_batch": 2,
            "steps": 4, "val_every": 4, "val_episodes": 4, "test_episodes": 4,
            "device": "cpu", "out": str(folder / "run")}))
        if args.launches:
            print(f"metalab train, 2 processes, {args.launches} launches", file=sys.stderr)
            result["metalab_train"] = launch_repeatedly(
                torchrun(2, "-m", "metalab", "train", str(config), "--quiet"), args.launches,
                folder)
        if args.control_launches:
            script = folder / "bare_gloo.py"
            script.write_text(BARE_GLOO)
            print(f"bare gloo script without teardown, {args.control_launches} launches",
                  file=sys.stderr)
            result["bare_gloo_without_teardown"] = launch_repeatedly(
                torchrun(2, str(script)), args.control_launches, folder)
    return result


def print_table(report: dict[str, Any]) -> None:
    print(f"\n### Outer steps per second, meta-batch {report['config']['meta_batch']}, "
          "1 thread per process\n")
    print("| algorithm | steps/s, 1 process | 2 processes | speed-up | CPU s/step of rank 0, "
          "1 / 2 processes | communication share | all-reduce alone |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rows in report["results"].items():
        one, two = rows["1"], rows["2"]
        print(f"| {name} | {one['steps_per_s']:.3f} | {two['steps_per_s']:.3f} | "
              f"{two['speedup']:.2f}x | {one['rank0_cpu_s_per_step']:.2f} / "
              f"{two['rank0_cpu_s_per_step']:.2f} | {100 * two['comm_share']:.1f}% | "
              f"{two['allreduce_alone_ms']:.2f} ms |")
    for name, exits in report.get("clean_exits", {}).items():
        print(f"\n{name}: {exits['launches'] - exits['nonzero_exits']}/{exits['launches']} "
              f"clean exits ({exits['terminate_called']} printed 'terminate called')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS),
                        help="comma-separated (default maml,protonet)")
    parser.add_argument("--meta-batch", type=int, help="tasks per step (32; --quick: 4)")
    parser.add_argument("--steps", type=int, help="timed steps per job (4; --quick: 1)")
    parser.add_argument("--warmup", type=int, help="untimed steps per job (1; --quick: 1)")
    parser.add_argument("--repeats", type=int, help="pairs of jobs (1 then 2 processes) "
                        "per algorithm (3; --quick: 1)")
    parser.add_argument("--launches", type=int, help="clean-exit launches (0; --quick: 2)")
    parser.add_argument("--control-launches", type=int, default=0,
                        help="launches of a bare gloo script without teardown (0)")
    parser.add_argument("--quick", action="store_true", help="smoke run (values given win)")
    parser.add_argument("--out", type=Path, help=f"JSON path (default {RESULTS}; "
                        "--quick: not written unless given)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = ({"meta_batch": 4, "steps": 1, "warmup": 1, "repeats": 1, "launches": 2}
                if args.quick else
                {"meta_batch": 32, "steps": 4, "warmup": 1, "repeats": 3, "launches": 0})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from protonet_throughput import machine_info

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    loadavg = os.getloadavg()
    jobs: dict[str, dict[int, list[dict[str, Any]]]] = {a: {1: [], 2: []} for a in algorithms}
    for algorithm in algorithms:
        for repeat in range(args.repeats):
            for procs in (1, 2):
                job = run_job(algorithm, procs, args)
                jobs[algorithm][procs].append(job)
                print(f"{algorithm} repeat {repeat + 1}/{args.repeats}, {procs} process(es): "
                      f"{1 / statistics.median(job['step_s']):.3f} steps/s", file=sys.stderr,
                      flush=True)
    report = {
        "unit": "outer steps per second (median step wall time, trainer train_seconds)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {"meta_batch": args.meta_batch, "n_way": 5, "k_shot": 1, "q_query": 15,
                   "backbone": "Conv4 (64 channels)", "dataset": "glyphs (train split)",
                   "maml": "second order, 1 inner step, transductive BatchNorm",
                   "optimizer": "Adam(lr=0.001)", "backend": "gloo", "threads_per_process": 1,
                   "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                   "quick": args.quick},
        "machine": machine_info(1) | {"loadavg_before": loadavg, "loadavg": os.getloadavg()},
        "results": {a: summarise(jobs[a]) for a in algorithms},
        "jobs": jobs,
        "clean_exits": clean_exits(args),
    }
    print_table(report)
    out = args.out or (None if args.quick else RESULTS)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
