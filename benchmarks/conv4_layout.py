"""Conv-4 in NCHW against channels-last memory order (``Conv4(channels_last=...)``): seconds of
a forward + backward, interleaved, and the float32 gradient's error against float64 NCHW, for
ProtoNet episodes (5-way 1-shot 15-query, 60-way 5-shot 5-query) and one second-order MAML
task. See benchmarks/README.md.

    python benchmarks/conv4_layout.py [--quick]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import harness
from metalab.data import task_source
from metalab.models import Conv4, use_batch_statistics

LAYOUTS = {"nchw": False, "channels_last": True}
Step = Callable[[nn.Module, torch.dtype], Tensor]  # one step -> the flat gradient, float64
FULL = {"repeats": 15, "threads": 2}
QUICK = {"repeats": 3}


def protonet_step(x: Tensor, n_way: int, k_shot: int) -> Step:
    """A ProtoNet episode on ``x``: the first ``n_way * k_shot`` images are the support set,
    image ``i`` is of class ``i % n_way`` (the order of metalab's episodes)."""
    support, query_y = n_way * k_shot, torch.arange(len(x) - n_way * k_shot) % n_way

    def step(net: nn.Module, dtype: torch.dtype) -> Tensor:
        net.zero_grad(set_to_none=True)
        features = net(x.to(dtype))
        prototypes = features[:support].reshape(k_shot, n_way, -1).mean(0)
        F.cross_entropy(-torch.cdist(features[support:], prototypes).pow(2), query_y).backward()
        return torch.cat([p.grad.flatten().double() for p in net.parameters()])

    return step


def maml_task(support_x: Tensor, query_x: Tensor, n_way: int, inner_lr: float = 0.4) -> Step:
    """One task of second-order MAML (one inner step), gradient to the initial weights."""
    support_y, query_y = (torch.arange(len(x)) % n_way for x in (support_x, query_x))

    def step(net: nn.Module, dtype: torch.dtype) -> Tensor:
        params = dict(net.named_parameters())
        inner = F.cross_entropy(functional_call(net, params, (support_x.to(dtype),)), support_y)
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        fast = {k: p - inner_lr * g for (k, p), g in zip(params.items(), grads, strict=True)}
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
    exact = step(network(head, False, state).double(), torch.float64)
    errors = {layout: ((step(net, torch.float32) - exact).norm() / exact.norm()).item()
              for layout, net in nets.items()}  # also each layout's warm-up step
    times = harness.interleave({layout: lambda i, net=net: step(net, torch.float32)
                                for layout, net in nets.items()}, repeats)
    summary = harness.summarise(times, "nchw")
    print(f"| {name} | {summary['nchw']['s']:.4f} | {summary['channels_last']['s']:.4f} | "
          f"{summary['channels_last']['ratio']:.2f}x | {errors['nchw']:.1e} | "
          f"{errors['channels_last']:.1e} |", flush=True)
    return {"workload": name, "summary": summary, "grad_rel_error_fp32": errors, "step_s": times}


def main() -> None:
    args = harness.Options(__doc__, "conv4_layout", FULL, QUICK).parse()

    def images(n_way: int, per_class: int) -> Tensor:  # image i of class i % n_way
        batch = task_source("glyphs", "train", n_way, per_class, 1).sample(
            1, torch.Generator().manual_seed(0))
        return batch.support_x[0]

    print("| workload | NCHW s | channels-last s | channels-last / NCHW | "
          "fp32 grad error NCHW | fp32 grad error channels-last |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = [measure("protonet-5w1s15q", protonet_step(images(5, 16), 5, 1), None, args.repeats),
            measure("maml-task", maml_task(images(5, 1), images(5, 15), 5), 5, args.repeats)]
    if not args.quick:  # the large episode: seconds per repeat
        rows.append(measure("protonet-60w5s5q", protonet_step(images(60, 10), 60, 5), None,
                            args.repeats))
    harness.write_json(args.out, "conv4_layout", {
        "unit": "seconds per forward + backward", "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
