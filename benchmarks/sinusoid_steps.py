"""Sinusoid regression: MSE ± 95% CI of each ``<runs>/<algo>-k<K>/best.pt`` after 1, 5 and 10
adaptation steps on the same 600 fixed test tasks (the MAML paper's Sec. 5.1 table; the CNP
adapts in one forward pass). See benchmarks/README.md.

    python benchmarks/sinusoid_steps.py [--algorithms maml cnp] [--shots 5] [--runs DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import harness
from metalab.algorithms import ALGORITHMS
from metalab.runs import score_checkpoint

ALGORITHM_ORDER = ["maml", "fomaml", "anil", "metasgd", "reptile", "pretrained", "cnp"]


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    options.add_argument("--runs", default="runs/sinusoid", help="folder of the trained runs")
    options.add_argument("--algorithms", nargs="+", default=ALGORITHM_ORDER)
    options.add_argument("--shots", type=int, nargs="+", default=[5, 10],
                         help="K of the trained runs (<algo>-k<K>)")
    options.add_argument("--test-shots", type=int, nargs="+", default=[5, 10],
                         help="support points of the test tasks")
    options.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10],
                         help="adaptation steps of the gradient-based algorithms")
    options.add_argument("--out", type=Path, default=harness.RESULTS / "sinusoid_steps.json")
    args = options.parse_args()
    rows = []
    for k in args.shots:
        for name in args.algorithms:
            path = Path(args.runs) / f"{name}-k{k}" / "best.pt"
            if not path.exists():
                print(f"(no checkpoint {path}: train it with 'metalab train "
                      f"sinusoid/{name}-k{k}')")
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
          + " | ".join(f"{s} step{'s' * (s > 1)}" for s in args.steps) + " |\n"
          "| --- | --- | --- | " + " | ".join("---" for _ in args.steps) + " |")
    for test_k in args.test_shots:
        for k in args.shots:
            for name in args.algorithms:
                mine = {r["adapt_steps"]: r for r in rows if r["algorithm"] == name
                        and r["train_k"] == k and r["test_k"] == test_k}
                if 0 in mine:  # one forward pass
                    cells = [f"{mine[0]['mse']:.3f} ± {mine[0]['ci95']:.3f} (no steps)"]
                    cells += [""] * (len(args.steps) - 1)
                elif mine:
                    cells = [f"{mine[s]['mse']:.3f} ± {mine[s]['ci95']:.3f}" for s in args.steps]
                else:
                    continue
                print(f"| {name} | {k} | {test_k} | " + " | ".join(cells) + " |")
    harness.write_json(args.out, "sinusoid_steps", {
        "test_tasks": 600, "query_points": 100, "seed": 1, "rows": rows})


if __name__ == "__main__":
    main()
