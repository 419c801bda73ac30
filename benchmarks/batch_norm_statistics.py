"""Which BatchNorm statistics a trained checkpoint is scored with, and what each gives on its
config's fixed validation episodes: running, re-estimated with the final weights, each task's
support set's, each batch's own. See benchmarks/README.md.

    python benchmarks/batch_norm_statistics.py runs/omniglot/snail-5w1s-running/best.pt
"""

from __future__ import annotations

import torch
from torch import nn

import harness
from metalab.algorithms import MetaLearner
from metalab.config import Config
from metalab.evaluate import evaluate, mean_ci95
from metalab.models import SupportStatistics, use_batch_statistics
from metalab.runs import load_checkpoint, task_sources
from metalab.tasks import TaskBatch, fixed_episodes, sample_tasks
from metalab.train import VAL_SEED

FULL = {"episodes": 100, "recalibration_batches": 50}
QUICK = {"episodes": 10, "recalibration_batches": 5}


def recalibrate(algo: MetaLearner, config: Config, batches: int) -> None:
    """Re-estimate every BatchNorm's running statistics over ``batches`` training steps."""
    train = task_sources(config, config.train_split, train=True)
    for layer in algo.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None  # a cumulative average
    algo.train()
    with torch.no_grad():
        for step in range(batches):
            algo.meta_loss(sample_tasks(train, config.seed + 1, step,
                                        range(config.tasks_per_batch)))
    algo.eval()


def support_statistics_score(algo: MetaLearner, episodes: list[TaskBatch]) -> float:
    """Each task's queries normalised with its support set's statistics (MetaBN applied to a
    model trained without it): ``adapt`` records them, the predictor replays them."""
    scores = []
    with torch.no_grad():
        for batch in episodes:
            for i in range(len(batch)):
                task = batch.task(i)
                with SupportStatistics() as support:
                    predictor = algo.adapt(task.support_x, task.support_y)
                with SupportStatistics(recorded=support.recorded):
                    output = predictor(task.query_x)
                scores.append(algo.kind.score(output, task.query_y).item()
                              * algo.kind.report_scale)
    return mean_ci95(scores)[0]


def main() -> None:
    options = harness.Options(__doc__, "batch_norm_statistics", FULL, QUICK)
    options.add_argument("checkpoint", help="a checkpoint trained with running statistics")
    args = options.parse()
    algo, config = load_checkpoint(args.checkpoint)
    if getattr(algo, "batch_norm", "running") == "support":
        options.error(f"{args.checkpoint} was trained with batch_norm: support, which always "
                      "normalises with support-set statistics; give one trained with running "
                      "statistics.")
    episodes = fixed_episodes(task_sources(config, config.val_split, train=False),
                              args.episodes, VAL_SEED)
    accuracy = {"running": evaluate(algo, episodes).mean}
    recalibrate(algo, config, args.recalibration_batches)
    accuracy["recalibrated"] = evaluate(algo, episodes).mean
    accuracy["support"] = support_statistics_score(algo, episodes)
    algo, _ = load_checkpoint(args.checkpoint)
    use_batch_statistics(algo)
    accuracy["batch"] = evaluate(algo, episodes).mean
    for name, value in accuracy.items():
        print(f"{name:>13}: {value:.2f}% over {args.episodes} validation episodes")
    harness.write_json(args.out, "batch_norm_statistics", {
        "checkpoint": str(args.checkpoint), "algorithm": config.algorithm,
        "split": config.val_split, "episodes": args.episodes, "accuracy": accuracy})


if __name__ == "__main__":
    main()
