"""Seconds per ProtoNet training episode, metalab against easyfsl on the same Omniglot episodes
from the same weights (5-way 1-shot 15-query, 60-way 5-shot 5-query), both rows stepped alike.
See benchmarks/README.md.

    .venv-peers/bin/python benchmarks/protonet_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

import harness
from harness import EasyFSL, import_peer, train_step
from metalab.algorithms import TaskSpec, build_algorithm
from metalab.data import omniglot
from metalab.models import Conv4
from metalab.tasks import ClassDataset, EpisodeSampler, TaskBatch, step_generator

SHAPES = ((5, 1, 15), (60, 5, 5))  # (N-way, K-shot, Q-query): Snell et al.'s Omniglot training
FULL = {"repeats": 7, "steps": 20, "warmup": 5, "threads": 2, "seed": 0}
QUICK = {"repeats": 2, "steps": 3, "warmup": 1}


def run_shape(dataset: ClassDataset, shape: tuple[int, int, int], peer: harness.Peer,
              args: argparse.Namespace) -> dict:
    """Both rows on one episode shape: checks, per-step times, medians."""
    sampler = EpisodeSampler(dataset, *shape)

    def episode(index: int) -> TaskBatch:
        return sampler.sample(1, step_generator(args.seed, index))

    torch.manual_seed(args.seed)
    algos = {"metalab": build_algorithm("protonet", Conv4(), TaskSpec(n_way=shape[0])).train()}
    checks = {"same_episodes": torch.equal(episode(0).query_x, episode(0).query_x)}
    if peer.module is not None:
        backbone = copy.deepcopy(algos["metalab"].backbone)  # identical initial weights
        model = peer.module.prototypical_networks.PrototypicalNetworks(backbone)
        algos["easyfsl"] = EasyFSL(model, "PrototypicalNetworks", "ce", algos["metalab"].spec)
        checks["same_parameter_count"] = len({sum(p.numel() for p in a.parameters())
                                              for a in algos.values()}) == 1
        probe = episode(harness.WARMUP - 1).support_x[0]
        with torch.no_grad():  # eval mode: BatchNorm's running statistics stay untouched
            same = torch.equal(algos["metalab"].backbone.eval()(probe), backbone.eval()(probe))
        checks["same_backbone_output"] = same
    optimizers = {n: torch.optim.Adam(a.train().parameters(), lr=1e-3) for n, a in algos.items()}
    sampling: dict[int, float] = {}
    drawn: dict[int, TaskBatch] = {}

    def metalab_step(index: int) -> None:
        start = time.perf_counter()
        batch = episode(index)
        sampling[index] = time.perf_counter() - start
        train_step(algos["metalab"], optimizers["metalab"], batch)

    def draw(indices: range) -> None:
        drawn.clear()
        drawn.update({i: episode(i) for i in indices} if "easyfsl" in algos else {})

    rows = {"metalab": metalab_step}
    if "easyfsl" in algos:
        rows["easyfsl"] = lambda i: train_step(algos["easyfsl"], optimizers["easyfsl"], drawn[i])
    times = harness.interleave(rows, args.repeats, args.steps, args.warmup, prepare=draw)
    summary = harness.summarise(times, "metalab")
    rounds = [range(r * args.steps, (r + 1) * args.steps) for r in range(args.repeats)]
    sample = [statistics.fmean(sampling[i] for i in indices) for indices in rounds]
    whole = [statistics.fmean(laps) for laps in times["metalab"]]
    summary["metalab"] |= {
        "sampling_s": statistics.median(sample),
        "sampling_share": statistics.median(s / w for s, w in zip(sample, whole, strict=True)),
        "s_without_sampling": statistics.median(w - s for s, w in zip(sample, whole,
                                                                          strict=True))}
    return {"n_way": shape[0], "k_shot": shape[1], "q_query": shape[2], "checks": checks,
            "summary": summary, "step_s": times}


def main() -> None:
    options = harness.Options(__doc__, "protonet_throughput", FULL, QUICK)
    default_data = harness.REPO.parent / "shared" / "data"
    options.add_argument("--data-dir", type=Path,
                         default=default_data if default_data.is_dir() else None,
                         help="folder holding omniglot/ (default ../shared/data if it exists, "
                              "then $METALAB_DATA and the download cache)")
    args = options.parse()
    peer = import_peer("easyfsl")
    if peer.module is None:
        print(f"WARNING: {peer.error}; measuring metalab alone.", file=sys.stderr)
    dataset = omniglot.load("train", data_dir=args.data_dir)  # the Vinyals train split
    shapes = []
    for shape in SHAPES:
        print("{}-way {}-shot {}-query:".format(*shape), file=sys.stderr)
        shapes.append(run_shape(dataset, shape, peer, args))
    print("\n| episode | metalab ms | (without sampling) | sampling share | easyfsl ms "
          "| easyfsl / metalab | checks |\n| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for result in shapes:
        ml, ef = result["summary"]["metalab"], result["summary"].get("easyfsl")
        print(f"| {result['n_way']}-way {result['k_shot']}-shot {result['q_query']}-query | "
              f"{1e3 * ml['s']:.2f} | {1e3 * ml['s_without_sampling']:.2f} | "
              f"{ml['sampling_share']:.2%} | "
              + (f"{1e3 * ef['s']:.2f} | {ef['ratio']:.2f}x" if ef else "n/a | n/a")
              + f" | {'OK' if all(result['checks'].values()) else result['checks']} |")
    print("Medians over repeats; easyfsl / metalab: median of the per-round ratios "
          "(>= 1: metalab no slower). Goal: sampling share < 5%.")
    harness.write_json(args.out, "protonet_throughput", {
        "unit": "seconds per training episode (meta_backward + Adam step, 1 task)",
        "config": {**{k: getattr(args, k) for k in FULL}, "quick": args.quick,
                   "dataset": "omniglot vinyals train", "classes": dataset.num_classes},
        "peers": {"easyfsl": peer.record()}, "shapes": shapes})


if __name__ == "__main__":
    main()
