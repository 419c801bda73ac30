"""Can a second-order MAML step get faster by doing the same maths through other kernels?

``maml_step.py`` shows metalab and its peers within 10% of each other, all at 36-39% of this
CPU's fp32 matrix-product peak, and a profile with half the step in convolution kernels that
every implementation shares. This script asks whether swapping those kernels for other ways
of computing exactly the same function would buy the 1.5x that the issue's speed bar needs.

What is measured
    One outer step of second-order MAML written out by hand (no library), task by task:
    Conv-4 (4 x [3x3 conv 64, BatchNorm on batch statistics, ReLU, 2x2 max-pool]) and a
    linear head, 5-way 1-shot 15-query tasks of 28x28x1 inputs, meta-batch ``--tasks`` (32),
    one inner SGD step of 0.4 with the graph kept, the meta-gradient of the mean query loss.
    Inputs are seeded noise: the kernels' cost does not depend on the values. Variants, each
    the same function (the gradient check below holds them to it):

    * ``reference`` -- ``F.conv2d``, ``F.batch_norm``, ``F.max_pool2d`` (what everyone runs);
    * ``conv-as-matmul`` -- convolution as ``F.unfold`` and a matrix product (im2col + GEMM,
      which runs near the matmul peak on large shapes);
    * ``pool-as-amax`` -- 2x2 max-pool as a reshape and ``amax``;
    * ``batchnorm-primitives`` -- BatchNorm from ``mean`` and ``var`` (``maml_layouts.py``'s,
      the spelling its vmap layout needs);
    * ``flush-denormals`` -- the reference with ``torch.set_flush_denormal(True)``;
    * ``grouped-query`` -- the query pass of all tasks at once as one grouped convolution over
      the tasks' adapted weights (the part with no double backward), the inner step per task.

Gradient check: every variant's meta-gradient of the first 4 tasks, relative to the
reference's, ``||g - g_ref|| / ||g_ref||`` over all parameters, must be below 1e-4.
Timing: ``--rounds`` interleaved rounds (each variant once per round, in turn), medians.

Usage: ``OMP_NUM_THREADS=2 python benchmarks/maml_kernels.py`` (prints a table, writes JSON).
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
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from maml_layouts import BN_EPS, batch_norm_primitives
from maml_step import INNER_LR

Params = dict[str, Tensor]
Task = tuple[Tensor, Tensor, Tensor, Tensor]
N_WAY, QUERY = 5, 15


def conv_reference(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return F.conv2d(x, w, b, padding=1)


def conv_as_matmul(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    batch, _, height, width = x.shape
    columns = F.unfold(x, 3, padding=1)  # [B, C*9, H*W]
    return (w.flatten(1) @ columns + b[:, None]).view(batch, -1, height, width)


def pool_reference(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 2)


def pool_as_amax(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    x = x[:, :, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))


def batch_norm_reference(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    return F.batch_norm(x, None, None, gamma, beta, training=True, eps=BN_EPS)


def initial_params(seed: int) -> Params:
    generator = torch.Generator().manual_seed(seed)
    params, channels = {}, 1
    for i in range(4):
        params[f"w{i}"] = torch.randn(64, channels, 3, 3, generator=generator) * (
            2 / (9 * channels)) ** 0.5
        params[f"b{i}"] = torch.zeros(64)
        params[f"g{i}"] = torch.ones(64)
        params[f"beta{i}"] = torch.zeros(64)
        channels = 64
    params["head_w"] = torch.randn(N_WAY, 64, generator=generator) * 0.1
    params["head_b"] = torch.zeros(N_WAY)
    return {name: p.requires_grad_() for name, p in params.items()}


def make_forward(conv: Callable, pool: Callable, norm: Callable) -> Callable:
    def forward(p: Params, x: Tensor) -> Tensor:
        for i in range(4):
            x = pool(F.relu(norm(conv(x, p[f"w{i}"], p[f"b{i}"]), p[f"g{i}"], p[f"beta{i}"])))
        return F.linear(x.flatten(1), p["head_w"], p["head_b"])
    return forward


def adapted(forward: Callable, p: Params, support_x: Tensor, support_y: Tensor) -> Params:
    """One inner SGD step, differentiable in ``p`` (second order)."""
    loss = F.cross_entropy(forward(p, support_x), support_y)
    grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
    return {name: w - INNER_LR * g for (name, w), g in zip(p.items(), grads, strict=True)}


def per_task_step(forward: Callable) -> Callable[[Params, list[Task]], list[Tensor]]:
    def step(p: Params, tasks: list[Task]) -> list[Tensor]:
        total = [torch.zeros_like(w) for w in p.values()]
        for support_x, support_y, query_x, query_y in tasks:
            fast = adapted(forward, p, support_x, support_y)
            loss = F.cross_entropy(forward(fast, query_x), query_y) / len(tasks)
            for acc, g in zip(total, torch.autograd.grad(loss, list(p.values())), strict=True):
                acc += g
        return total
    return step


def grouped_query_step(p: Params, tasks: list[Task]) -> list[Tensor]:
    """Inner steps per task; the query passes of all tasks as one grouped network."""
    forward = make_forward(conv_reference, pool_reference, batch_norm_reference)
    fast = [adapted(forward, p, sx, sy) for sx, sy, _, _ in tasks]
    stacked = {name: torch.stack([f[name] for f in fast]) for name in p}
    count, queries = len(tasks), tasks[0][2].shape[0]
    # Tasks become channel groups: [Q, T*C, H, W]; BatchNorm per channel is then per task.
    x = torch.stack([t[2] for t in tasks], dim=1).flatten(1, 2)
    for i in range(4):
        x = F.conv2d(x, stacked[f"w{i}"].flatten(0, 1), stacked[f"b{i}"].flatten(), padding=1,
                     groups=count)
        x = F.batch_norm(x, None, None, stacked[f"g{i}"].flatten(), stacked[f"beta{i}"].flatten(),
                         training=True, eps=BN_EPS)
        x = F.max_pool2d(F.relu(x), 2)
    features = x.view(queries, count, -1).transpose(0, 1)  # [T, Q, 64]
    logits = torch.baddbmm(stacked["head_b"][:, None], features,
                           stacked["head_w"].transpose(1, 2))
    labels = torch.stack([t[3] for t in tasks])
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    return list(torch.autograd.grad(loss / (queries * count), list(p.values())))


def flushing_denormals(step: Callable) -> Callable:
    def run(p: Params, tasks: list[Task]) -> list[Tensor]:
        torch.set_flush_denormal(True)
        try:
            return step(p, tasks)
        finally:
            torch.set_flush_denormal(False)
    return run


VARIANTS: dict[str, Callable[[Params, list[Task]], list[Tensor]]] = {
    "reference": per_task_step(make_forward(conv_reference, pool_reference,
                                            batch_norm_reference)),
    "conv-as-matmul": per_task_step(make_forward(conv_as_matmul, pool_reference,
                                                 batch_norm_reference)),
    "pool-as-amax": per_task_step(make_forward(conv_reference, pool_as_amax,
                                               batch_norm_reference)),
    "batchnorm-primitives": per_task_step(make_forward(conv_reference, pool_reference,
                                                       batch_norm_primitives)),
    "flush-denormals": flushing_denormals(per_task_step(make_forward(
        conv_reference, pool_reference, batch_norm_reference))),
    "grouped-query": grouped_query_step,
}


def make_tasks(count: int, seed: int) -> list[Task]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(N_WAY)
    return [(torch.rand(N_WAY, 1, 28, 28, generator=generator), labels,
             torch.rand(N_WAY * QUERY, 1, 28, 28, generator=generator), labels.repeat(QUERY))
            for _ in range(count)]


def relative_error(got: list[Tensor], expected: list[Tensor]) -> float:
    difference = torch.cat([(g - e).flatten() for g, e in zip(got, expected, strict=True)])
    return (difference.norm() / torch.cat([e.flatten() for e in expected]).norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=32, help="meta-batch size (32)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/maml_kernels.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    params, tasks = initial_params(seed=0), make_tasks(args.tasks, seed=1)
    expected = VARIANTS["reference"](params, tasks[:4])
    errors = {name: relative_error(step(params, tasks[:4]), expected)
              for name, step in VARIANTS.items()}
    bad = {name: error for name, error in errors.items() if error > 1e-4}
    if bad:
        raise SystemExit(f"meta-gradients differ from the reference: {bad}")

    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, step in VARIANTS.items():
            start = time.perf_counter()
            step(params, tasks)
            seconds[name].append(time.perf_counter() - start)
    reference = statistics.median(seconds["reference"])
    print(f"second-order MAML step, {args.tasks} tasks, {torch.get_num_threads()} threads, "
          f"medians of {args.rounds} interleaved rounds")
    print(f"{'variant':<22} {'s/step':>7} {'/ reference':>11} {'grad rel. err':>13}")
    rows = {}
    for name, times in seconds.items():
        median = statistics.median(times)
        rows[name] = {"seconds": median, "all_seconds": times,
                      "time_vs_reference": median / reference,
                      "meta_gradient_relative_error": errors[name]}
        print(f"{name:<22} {median:7.3f} {median / reference:10.2f}x {errors[name]:13.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tasks": args.tasks, "rounds": args.rounds,
                                    "threads": torch.get_num_threads(),
                                    "torch": torch.__version__, "variants": rows},
                                   indent=1) + "\n")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
