"""Which BatchNorm statistics a trained checkpoint is scored with, and what each gives.

Scores one checkpoint on fixed validation episodes four ways:

* ``running``: the running statistics of training (eval mode; each query on its own);
* ``recalibrated``: running statistics re-estimated with the final weights over training
  batches (cumulative average, as "precise BN"), to tell stale statistics from a shift;
* ``support``: each task's support set's statistics, used for its queries too (not
  transductive: a query never affects another);
* ``batch``: each batch's own statistics (``metalab evaluate --transductive-bn``).

Usage: ``python benchmarks/batch_norm_statistics.py runs/omniglot/snail-5w1s-bar/best.pt``
(``METALAB_DATA`` set); prints the four scores and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from metalab.evaluate import evaluate, mean_ci95, task_score
from metalab.models import SupportStatistics, use_batch_statistics
from metalab.runs import load_checkpoint, task_sources
from metalab.tasks import fixed_episodes, sample_tasks
from metalab.train import VAL_SEED


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibrate(algo, config, batches: int) -> None:
    """Re-estimate every BatchNorm's running statistics over ``batches`` training steps."""
    train = task_sources(config, config.train_split, train=True)
    for layer in batch_norms(algo):
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average
    algo.train()
    with torch.no_grad():
        for step in range(batches):
            algo.meta_loss(sample_tasks(train, config.seed + 1, step,
                                        range(config.tasks_per_batch)))
    algo.eval()


def support_statistics_score(algo, episodes) -> tuple[float, float]:
    """Each task's queries normalised with the statistics of its support set (MetaBN applied
    to a model trained without it): ``adapt`` records them, the predictor replays them."""
    scores = []
    with torch.no_grad():
        for batch in episodes:
            for i in range(len(batch)):
                task = batch.task(i)
                with SupportStatistics() as support:
                    predictor = algo.adapt(task.support_x, task.support_y)
                with SupportStatistics(recorded=support.recorded):
                    output = predictor(task.query_x)
                scores.append(task_score(output, task.query_y, "classification").item() * 100)
    return mean_ci95(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--episodes", type=int, default=100, help="validation episodes (100)")
    parser.add_argument("--recalibration-batches", type=int, default=50)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/batch_norm_statistics.json"))
    args = parser.parse_args()

    algo, config = load_checkpoint(args.checkpoint)
    if getattr(algo, "batch_norm", "running") == "support":
        parser.error(f"{args.checkpoint} was trained with batch_norm: support, which always "
                     f"normalises with support-set statistics; give a model trained with "
                     f"running statistics.")
    episodes = fixed_episodes(task_sources(config, config.val_split, train=False),
                              args.episodes, VAL_SEED)
    results = {"running": evaluate(algo, episodes).mean}
    recalibrate(algo, config, args.recalibration_batches)
    results["recalibrated"] = evaluate(algo, episodes).mean
    results["support"] = support_statistics_score(algo, episodes)[0]
    algo, _ = load_checkpoint(args.checkpoint)
    use_batch_statistics(algo)
    results["batch"] = evaluate(algo, episodes).mean
    for name, accuracy in results.items():
        print(f"{name:>13}: {accuracy:.2f}% over {args.episodes} validation episodes")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint),
                                    "algorithm": config.algorithm, "split": config.val_split,
                                    "episodes": args.episodes, "accuracy": results},
                                   indent=1) + "\n")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
