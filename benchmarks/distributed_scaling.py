"""Outer steps per second of metalab's Trainer on 1 and 2 torchrun processes (gloo, one thread
each; MAML and ProtoNet, glyphs 5-way 1-shot 15-query, Conv-4), jobs alternating, and clean
exits of 2-process ``metalab train`` jobs against a bare gloo script without teardown. What
is measured: benchmarks/README.md; the figures and what they mean: docs/distributed.md.

    python benchmarks/distributed_scaling.py --quick
    python benchmarks/distributed_scaling.py --launches 30 --control-launches 10   # ~15 min
"""

from __future__ import annotations

import argparse
import itertools
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
import torch.distributed as dist
import yaml

import harness
from metalab import distributed
from metalab.config import Config
from metalab.train import Trainer

FULL = {"meta_batch": 32, "steps": 4, "warmup": 1, "repeats": 3, "launches": 0,
        "control_launches": 0}
QUICK = {"meta_batch": 4, "steps": 1, "repeats": 1, "launches": 2}
BARE_GLOO = """import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(1000)
for _ in range(10):
    dist.all_reduce(t)
print("rank", dist.get_rank(), "ok", t[0].item())
"""


def torchrun(procs: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={procs}", *args]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, check=False)


def worker(args: argparse.Namespace) -> None:
    """One rank of a job: train, timing every all-reduce; rank 0 writes the result."""
    inside: list[float] = []
    all_reduce = dist.all_reduce

    def timed_all_reduce(*a: Any, **k: Any) -> Any:
        started = time.perf_counter()
        result = all_reduce(*a, **k)
        inside.append(time.perf_counter() - started)
        return result

    dist.all_reduce = timed_all_reduce  # the trainer's one collective per step
    with tempfile.TemporaryDirectory() as out, distributed.process_group(torch.device("cpu")):
        trainer = Trainer.from_config(Config(
            algorithm=args.algorithm, n_way=5, k_shot=1, q_query=15,
            tasks_per_batch=args.meta_batch, steps=args.warmup + args.steps, val_every=10**9,
            val_episodes=2, log_every=1, device="cpu", out=out), progress=False)
        trainer.fit()
        comm = distributed.gather_objects(inside[args.warmup:args.warmup + args.steps])
        flat, laps = torch.cat([p.detach().flatten() for p in trainer.algo.parameters()]), []
        for _ in range(20 if distributed.world_size() > 1 else 0):  # the buffer alone
            distributed.barrier()
            started = time.perf_counter()
            distributed.weighted_sum_([flat.clone()], 0.5)
            laps.append(time.perf_counter() - started)
        if distributed.rank() == 0:
            logged = [json.loads(line) for line in (Path(out) / "log.jsonl").open()]

            def per_step(key: str) -> list[float]:  # the log has running totals
                totals = [0.0, *(line[key] for line in logged if "loss" in line)]
                return [b - a for a, b in itertools.pairwise(totals)][args.warmup:]

            Path(args.result).write_text(json.dumps({
                "step_s": per_step("train_seconds"), "cpu_s": per_step("cpu_seconds"),
                "comm_s": comm, "allreduce_alone_s": laps and statistics.median(laps)}))


def job(algorithm: str, procs: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        done = run(torchrun(procs, str(Path(__file__).resolve()), "--worker", "--algorithm",
                            algorithm, "--meta-batch", str(args.meta_batch), "--steps",
                            str(args.steps), "--warmup", str(args.warmup), "--result",
                            str(result)), harness.REPO)
        if done.returncode or not result.exists():
            raise SystemExit(f"{algorithm} on {procs} processes failed:\n{done.stderr[-3000:]}")
        return json.loads(result.read_text())


def summarise(jobs: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    speeds = {p: [1 / statistics.median(j["step_s"]) for j in runs] for p, runs in jobs.items()}
    rows = {str(p): {"steps_per_s": statistics.median(speeds[p]), "per_job": speeds[p],
                     "rank0_cpu_s_per_step": statistics.median(c for j in runs
                                                               for c in j["cpu_s"])}
            for p, runs in jobs.items()}
    two = rows["2"]
    two["comm_share"] = statistics.median(c / s for j in jobs[2] for rank in j["comm_s"]
                                          for c, s in zip(rank, j["step_s"], strict=False))
    two["allreduce_alone_ms"] = 1e3 * statistics.median(j["allreduce_alone_s"] for j in jobs[2])
    two["speedup"] = statistics.median(b / a for a, b in zip(speeds[1], speeds[2], strict=True))
    return rows


def launches(command: list[str], times: int, cwd: Path) -> dict[str, Any]:
    """Run ``command`` ``times`` times: how many exited non-zero or aborted at exit (gloo's
    "terminate called" when the process group is not torn down in order)."""
    failures = aborts = 0
    for i in range(times):
        done = run(command, cwd)
        failures += done.returncode != 0
        aborts += "terminate called" in done.stdout + done.stderr
        print(f"  launch {i + 1}/{times}: exit {done.returncode}", file=sys.stderr, flush=True)
    return {"launches": times, "nonzero_exits": failures, "terminate_called": aborts}


def clean_exits(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        (folder / "tiny.yaml").write_text(yaml.safe_dump({
            "backbone_options": {"hidden": 8}, "n_way": 3, "q_query": 2, "tasks_per_batch": 2,
            "steps": 4, "val_every": 4, "val_episodes": 4, "test_episodes": 4,
            "device": "cpu", "out": str(folder / "run")}))  # ProtoNet on the glyphs
        (folder / "bare_gloo.py").write_text(BARE_GLOO)
        return {name: launches(command, times, folder) for name, command, times in (
            ("metalab_train", torchrun(2, "-m", "metalab", "train", "tiny.yaml", "--quiet"),
             args.launches),
            ("bare_gloo_without_teardown", torchrun(2, "bare_gloo.py"), args.control_launches))
            if times}


def main() -> None:
    options = harness.Options(__doc__, "distributed_scaling", FULL, QUICK)
    options.add_argument("--algorithms", default="maml,protonet", help="comma-separated")
    options.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    options.add_argument("--algorithm", help=argparse.SUPPRESS)
    options.add_argument("--result", help=argparse.SUPPRESS)
    args = options.parse()
    if args.worker:
        worker(args)
        return
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    jobs: dict[str, dict[int, list[dict[str, Any]]]] = {a: {1: [], 2: []} for a in algorithms}
    for algorithm in algorithms:
        print(f"{algorithm}: steps/s, jobs of 1 and 2 processes", file=sys.stderr)
        harness.interleave({str(p): lambda i, a=algorithm, p=p: jobs[a][p].append(job(a, p, args))
                            for p in (1, 2)}, args.repeats)
    results = {a: summarise(jobs[a]) for a in algorithms}
    exits = clean_exits(args)
    print("\n| algorithm | steps/s, 1 process | 2 processes | speed-up | CPU s/step of rank 0, "
          "1 / 2 processes | communication share | all-reduce alone |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rows in results.items():
        one, two = rows["1"], rows["2"]
        print(f"| {name} | {one['steps_per_s']:.3f} | {two['steps_per_s']:.3f} | "
              f"{two['speedup']:.2f}x | {one['rank0_cpu_s_per_step']:.2f} / "
              f"{two['rank0_cpu_s_per_step']:.2f} | {two['comm_share']:.1%} | "
              f"{two['allreduce_alone_ms']:.2f} ms |")
    for name, counts in exits.items():
        print(f"{name}: {counts['launches'] - counts['nonzero_exits']}/{counts['launches']} "
              f"clean exits ({counts['terminate_called']} printed 'terminate called')")
    harness.write_json(args.out, "distributed_scaling", {
        "unit": "outer steps per second (median step wall time, trainer train_seconds)",
        "config": {**{k: getattr(args, k) for k in FULL}, "quick": args.quick,
                   "tasks": "glyphs 5w1s15q", "backend": "gloo", "threads_per_process": 1},
        "results": results, "jobs": jobs, "clean_exits": exits})


if __name__ == "__main__":
    main()
