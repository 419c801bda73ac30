"""Seconds per training step of built-in configs, and the training time they imply.

For each config, runs the real ``Trainer`` for ``--warmup + --steps`` steps (no validation)
with a per-step log, takes the median step time (wall clock, sampling included) and projects
the config's full training time as ``steps x median``. Run it on a quiet machine: it is how
``docs/results.md`` states what a run costs on this CPU independently of whatever else was
running while the published model trained.

    python benchmarks/training_time.py omniglot/protonet-20w1s omniglot/relationnet-5w1s
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from metalab.config import load_config
from metalab.train import Trainer


def step_times(name: str, steps: int, warmup: int) -> list[float]:
    """Wall-clock seconds of each step after ``warmup`` steps of config ``name``."""
    with tempfile.TemporaryDirectory() as out:
        config = load_config(name, [f"steps={warmup + steps}", f"val_every={10**9}",
                                    "log_every=1", f"out={out}"])
        trainer = Trainer.from_config(config, progress=False)
        trainer._validate_and_save = lambda: None  # type: ignore[method-assign]
        trainer.fit()
        seconds = [json.loads(line)["train_seconds"] for line in open(Path(out) / "log.jsonl")]
    per_step = [b - a for a, b in itertools.pairwise(seconds)]
    return per_step[warmup - 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="built-in config names or YAML paths")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per config (30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps (5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="benchmarks/results/training_time.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    print(f"{'config':<34} {'s/step':>8} {'steps':>7} {'projected min':>14}")
    for name in args.configs:
        times = step_times(name, args.steps, args.warmup)
        median = statistics.median(times)
        total_steps = load_config(name).steps
        results.append({"config": name, "threads": args.threads, "median_s": median,
                        "steps": total_steps, "projected_minutes": median * total_steps / 60,
                        "step_seconds": times, "loadavg": os.getloadavg()})
        print(f"{name:<34} {median:8.3f} {total_steps:7d} {median * total_steps / 60:14.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
