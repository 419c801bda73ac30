"""Seconds per training step of built-in configs (the real Trainer, no validation), and the
training time they imply (steps x median). See benchmarks/README.md.

    python benchmarks/training_time.py omniglot/protonet-20w1s omniglot/relationnet-5w1s
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
from pathlib import Path

import harness
from metalab.config import load_config
from metalab.train import Trainer

FULL = {"steps": 30, "warmup": 5, "threads": None}
QUICK = {"steps": 3, "warmup": 1}


def step_times(name: str, steps: int, warmup: int) -> list[float]:
    """Wall-clock seconds of each step after ``warmup`` steps of config ``name``."""
    with tempfile.TemporaryDirectory() as out:
        config = load_config(name, [f"steps={warmup + steps}", "val_split=null",
                                    "log_every=1", f"out={out}"])
        Trainer.from_config(config, progress=False).fit()
        seconds = [json.loads(line)["train_seconds"]
                   for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [b - a for a, b in itertools.pairwise([0.0, *seconds])][warmup:]


def main() -> None:
    options = harness.Options(__doc__, "training_time", FULL, QUICK)
    options.add_argument("configs", nargs="+", help="built-in config names or YAML paths")
    args = options.parse()
    results = []
    print(f"{'config':<34} {'s/step':>8} {'steps':>7} {'projected min':>14}")
    for name in args.configs:
        times = step_times(name, args.steps, args.warmup)
        median, total = statistics.median(times), load_config(name).steps
        results.append({"config": name, "median_s": median, "steps": total,
                        "projected_minutes": median * total / 60, "step_seconds": times})
        print(f"{name:<34} {median:8.3f} {total:7d} {median * total / 60:14.1f}", flush=True)
    harness.write_json(args.out, "training_time", {"configs": results})


if __name__ == "__main__":
    main()
