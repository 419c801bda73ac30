"""Sinusoid regression: MSE ± 95% CI after 1, 5 and 10 adaptation steps, per algorithm.

The MAML paper's Sec. 5.1 table: each trained checkpoint of ``runs/sinusoid/<algo>-k<K>/``
(trained with ``metalab train sinusoid/<algo>-k<K>``) adapts to the same 600 fixed test tasks
(K' support points for each K' of ``--test-shots``, 100 query points each, seed 1) with 1, 5
and 10 gradient steps; model-based algorithms (CNP) adapt in one forward pass and get one
number. The paper's table trains on K=10 and tests on K'=5.

    python benchmarks/sinusoid_steps.py                     # every checkpoint found
    python benchmarks/sinusoid_steps.py --algorithms maml cnp --shots 5

Prints a Markdown table and writes ``benchmarks/results/sinusoid_steps.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metalab.algorithms import ALGORITHMS
from metalab.runs import score_checkpoint

ALGORITHM_ORDER = ["maml", "fomaml", "anil", "metasgd", "reptile", "pretrained", "cnp"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/sinusoid", help="folder of the trained runs")
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHM_ORDER)
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10],
                        help="K of the trained runs (<algo>-k<K>)")
    parser.add_argument("--test-shots", type=int, nargs="+", default=[5, 10],
                        help="support points of the test tasks")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10],
                        help="adaptation steps for the gradient-based algorithms")
    parser.add_argument("--out", default="benchmarks/results/sinusoid_steps.json")
    args = parser.parse_args()

    rows = []
    for k in args.shots:
        for name in args.algorithms:
            path = Path(args.runs) / f"{name}-k{k}" / "best.pt"
            if not path.exists():
                print(f"(no checkpoint {path}: train it with "
                      f"'metalab train sinusoid/{name}-k{k}')")
                continue
            gradient_based = "test_inner_steps" in ALGORITHMS[name].runtime_options
            for test_k in args.test_shots:
                for steps in args.steps if gradient_based else [0]:
                    overrides: dict = {"test_k_shot": test_k}
                    if steps:
                        overrides["algorithm_options"] = {"test_inner_steps": steps}
                    _, config, result = score_checkpoint(path, overrides)
                    rows.append({"algorithm": name, "train_k": k, "test_k": test_k,
                                 "adapt_steps": steps, "mse": result.mean, "ci95": result.ci95,
                                 "episodes": result.episodes, "train_steps": config.steps})
                    print(f"{name:10s} trained K={k:2d} tested K={test_k:2d} steps {steps:2d}: "
                          f"MSE {result.mean:.3f} ± {result.ci95:.3f}", flush=True)

    print("\n| algorithm | trained K | tested K | "
          + " | ".join(f"{s} step{'s' * (s > 1)}" for s in args.steps) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in args.steps) + " |")
    for test_k in args.test_shots:
        for k in args.shots:
            for name in args.algorithms:
                mine = {r["adapt_steps"]: r for r in rows if r["algorithm"] == name
                        and r["train_k"] == k and r["test_k"] == test_k}
                if not mine:
                    continue
                if 0 in mine:  # one forward pass
                    cells = [f"{mine[0]['mse']:.3f} ± {mine[0]['ci95']:.3f} (no steps)"]
                    cells += [""] * (len(args.steps) - 1)
                else:
                    cells = [f"{mine[s]['mse']:.3f} ± {mine[s]['ci95']:.3f}" for s in args.steps]
                print(f"| {name} | {k} | {test_k} | " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"test_tasks": 600, "query_points": 100, "seed": 1,
                                          "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
