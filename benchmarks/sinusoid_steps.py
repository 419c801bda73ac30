"""Sinusoid regression: MSE ± 95% CI after 1, 5 and 10 adaptation steps, per algorithm.

The MAML paper's Sec. 5.1 table: each trained checkpoint of ``runs/sinusoid/<algo>-k<K>/``
(trained with ``metalab train sinusoid/<algo>-k<K>``) adapts to the same 600 fixed test tasks
(K support points, 100 query points each, seed 1) with 1, 5 and 10 gradient steps; model-based
algorithms (CNP) adapt in one forward pass and get one number.

    python benchmarks/sinusoid_steps.py                     # every checkpoint found
    python benchmarks/sinusoid_steps.py --algorithms maml cnp --shots 5

Prints a Markdown table and writes ``benchmarks/results/sinusoid_steps.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metalab.algorithms import ALGORITHMS
from metalab.train import score_checkpoint

ALGORITHM_ORDER = ["maml", "fomaml", "anil", "metasgd", "reptile", "pretrained", "cnp"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/sinusoid", help="folder of the trained runs")
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHM_ORDER)
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10])
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
            for steps in args.steps if gradient_based else [0]:
                overrides = {"algorithm_options": {"test_inner_steps": steps}} if steps else {}
                _, config, result = score_checkpoint(path, overrides)
                rows.append({"algorithm": name, "k_shot": k, "adapt_steps": steps,
                             "mse": result.mean, "ci95": result.ci95,
                             "episodes": result.episodes, "train_steps": config.steps})
                print(f"K={k:2d} {name:10s} steps {steps:2d}: MSE {result.mean:.3f} "
                      f"± {result.ci95:.3f}", flush=True)

    print("\n| algorithm | K | " + " | ".join(f"{s} step{'s' * (s > 1)}" for s in args.steps)
          + " |")
    print("| --- | --- | " + " | ".join("---" for _ in args.steps) + " |")
    for k in args.shots:
        for name in args.algorithms:
            mine = {r["adapt_steps"]: r for r in rows
                    if r["algorithm"] == name and r["k_shot"] == k}
            if not mine:
                continue
            cells = [f"{mine[s]['mse']:.3f} ± {mine[s]['ci95']:.3f}" if s in mine
                     else (f"{mine[0]['mse']:.3f} ± {mine[0]['ci95']:.3f} (forward pass)"
                           if i == 0 and 0 in mine else "") for i, s in enumerate(args.steps)]
            print(f"| {name} | {k} | " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"test_tasks": 600, "query_points": 100, "seed": 1,
                                          "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
