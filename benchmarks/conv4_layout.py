"""Conv-4 in NCHW against channels-last memory order on this CPU: speed and float32 precision.

What is measured
    For each layout (``Conv4(channels_last=False)``, the default, and ``channels_last=True``)
    and each workload, the seconds of one forward + backward, and the float32 gradient's
    relative error ``||g32 - g64|| / ||g64||`` against the same step in float64 (NCHW):

    * ``protonet-5w1s15q`` / ``protonet-60w5s5q`` -- a ProtoNet training episode on glyph
      images (one backbone call over support and query, squared-distance logits,
      cross-entropy): 80 and 600 images.
    * ``maml-task`` -- one task of second-order MAML (5 support + 75 query glyphs, one inner
      step of 0.4 with the graph kept, query loss, gradient to the initial weights), Conv-4 +
      linear head, BatchNorm on batch statistics.

    Both layouts start from the same weights and see the same images. Timing: ``--repeats``
    rounds, the layouts interleaved (A B, then B A, ...); reported is each layout's median
    and the median of the paired ratios channels-last / NCHW.

Running
    python benchmarks/conv4_layout.py            # prints a table, writes the JSON
    python benchmarks/conv4_layout.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))

from metalab.data import task_source
from metalab.models import Conv4, use_batch_statistics
from protonet_throughput import machine_info

LAYOUTS = {"nchw": False, "channels_last": True}
Step = Callable[[nn.Module, torch.dtype], Tensor]  # one step -> flat float64 gradient


def protonet_step(x: Tensor, n_way: int, k_shot: int) -> Step:
    """ProtoNet episode on ``x``: the first ``n_way * k_shot`` images are the support set, and
    image ``i`` is of class ``i % n_way`` (the order metalab's episodes have)."""
    support = n_way * k_shot
    query_y = torch.arange(len(x) - support) % n_way

    def step(net: nn.Module, dtype: torch.dtype) -> Tensor:
        net.zero_grad(set_to_none=True)
        features = net(x.to(dtype))
        prototypes = features[:support].reshape(k_shot, n_way, -1).mean(0)
        logits = -torch.cdist(features[support:], prototypes).pow(2)
        F.cross_entropy(logits, query_y).backward()
        return torch.cat([p.grad.flatten().double() for p in net.parameters()])

    return step


def maml_step(support_x: Tensor, query_x: Tensor, n_way: int, inner_lr: float = 0.4) -> Step:
    """One task of second-order MAML (one inner step), gradient to the initial weights."""
    support_y = torch.arange(len(support_x)) % n_way
    query_y = torch.arange(len(query_x)) % n_way

    def step(net: nn.Module, dtype: torch.dtype) -> Tensor:
        params = dict(net.named_parameters())
        inner = F.cross_entropy(functional_call(net, params, (support_x.to(dtype),)), support_y)
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        fast = {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads, strict=True)}
        outer = F.cross_entropy(functional_call(net, fast, (query_x.to(dtype),)), query_y)
        return torch.cat([g.flatten().double()
                          for g in torch.autograd.grad(outer, list(params.values()))])

    return step


def network(head: int | None, channels_last: bool, state: dict | None) -> nn.Module:
    backbone = Conv4(channels_last=channels_last)
    net = backbone if head is None else nn.Sequential(backbone, nn.Linear(64, head))
    if head is not None:
        use_batch_statistics(backbone)  # the MAML convention
    if state is not None:
        net.load_state_dict(state)
    return net


def measure(name: str, step: Step, head: int | None, repeats: int) -> dict:
    torch.manual_seed(0)
    state = network(head, False, None).state_dict()
    nets = {layout: network(head, cl, state) for layout, cl in LAYOUTS.items()}
    reference = step(network(head, False, state).double(), torch.float64)
    errors = {layout: ((step(net, torch.float32) - reference).norm() / reference.norm()).item()
              for layout, net in nets.items()}  # also the warm-up step
    times: dict[str, list[float]] = {layout: [] for layout in nets}
    for r in range(repeats):
        for layout in (list(nets) if r % 2 == 0 else list(nets)[::-1]):
            start = time.perf_counter()
            step(nets[layout], torch.float32)
            times[layout].append(time.perf_counter() - start)
    ratios = [cl / base for cl, base in zip(times["channels_last"], times["nchw"], strict=True)]
    row = {"workload": name, "seconds": {k: statistics.median(v) for k, v in times.items()},
           "ratio_channels_last_over_nchw": statistics.median(ratios),
           "grad_rel_error_fp32": errors, "raw_seconds": times}
    print(f"| {name} | {row['seconds']['nchw']:.4f} | {row['seconds']['channels_last']:.4f} | "
          f"{row['ratio_channels_last_over_nchw']:.2f}x | {errors['nchw']:.1e} | "
          f"{errors['channels_last']:.1e} |", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 repeats, small shapes only")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/conv4_layout.json; "
                        "--quick: conv4_layout-quick.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats

    def images(n_way: int, per_class: int) -> Tensor:
        batch = task_source("glyphs", "train", n_way, per_class, 1).sample(
            1, torch.Generator().manual_seed(0))
        return batch.support_x[0]  # n_way * per_class images, image i of class i % n_way

    print("| workload | NCHW s | channels-last s | channels-last / NCHW | "
          "fp32 grad error NCHW | fp32 grad error channels-last |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = [measure("protonet-5w1s15q", protonet_step(images(5, 16), 5, 1), None, repeats),
            measure("maml-task", maml_step(images(5, 1), images(5, 15), 5), 5, repeats)]
    if not args.quick:
        rows.append(measure("protonet-60w5s5q", protonet_step(images(60, 10), 60, 5), None,
                            repeats))
    report = {"benchmark": "conv4_layout", "unit": "seconds per forward + backward",
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "repeats": repeats,
              "machine": machine_info(args.threads), "rows": rows}
    out = Path(args.out or f"benchmarks/results/conv4_layout{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
