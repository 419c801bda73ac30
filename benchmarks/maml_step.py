"""Seconds and peak memory of one second-order MAML outer step, row by row: metalab's options,
its peers, other layouts of the meta-batch and other kernels for the same maths, from the same
weights on the same episodes, each meta-gradient checked against the first row's (float32 and
float64) before timing. Rows and methodology: benchmarks/README.md.

    OMP_NUM_THREADS=2 .venv-peers/bin/python benchmarks/maml_step.py           # vs the peers
    OMP_NUM_THREADS=2 python benchmarks/maml_step.py --impls layouts           # or kernels
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import harness
from harness import Learn2LearnMAML, Peer, import_peer, train_step
from metalab.algorithms import MetaLearner, TaskSpec, build_algorithm
from metalab.data import task_source
from metalab.models import Conv4
from metalab.tasks import TaskBatch, step_generator

N_WAY, INNER_LR, OUTER_LR = 5, 0.4, 1e-3
FLOAT64_TOL = 1e-6  # the same maths agrees to rounding in float64
PEAK_MATMUL_SIZE = 2048  # square fp32 matrices timed for the machine's matmul peak
Params = dict[str, Tensor]


def metalab_maml(init: list[Tensor], channels_last: bool = False, **options: Any) -> MetaLearner:
    """metalab's MAML (Conv-4 + linear head, BatchNorm on batch statistics) with weights
    ``init``; ``options`` are MAML options (``task_workers``, ``vectorize``)."""
    algo = build_algorithm("maml", Conv4(channels_last=channels_last), TaskSpec(n_way=N_WAY),
                           inner_lr=INNER_LR, **options).train()
    with torch.no_grad():
        for p, value in zip(algo.parameters(), init, strict=True):
            p.copy_(value)
    return algo


def refused_vmap(init: list[Tensor]) -> MetaLearner:
    """metalab's MAML with its tasks under ``vmap`` although MAML refuses ``vectorize=True``
    here (second order through BatchNorm is inexact under ``vmap``): timed to show what the
    refused layout would cost, and checked to show that it is wrong."""
    algo = metalab_maml(init)
    algo.vectorize = True  # deliberately past the constructor's refusal
    return algo


def peer_network(init: list[Tensor]) -> nn.Sequential:
    """The same network, module types and weights, as a plain ``nn.Sequential``."""
    maml = metalab_maml(init)
    return nn.Sequential(maml.backbone, nn.Flatten(), maml.head)


class HigherMAML(nn.Module):
    """higher's Omniglot example: per task ``innerloop_ctx(copy_initial_weights=False)``, one
    differentiable SGD step on the support loss, the query loss."""

    def __init__(self, higher: types.ModuleType, init: list[Tensor]) -> None:
        super().__init__()
        self.higher, self.net = higher, peer_network(init)
        self.inner_opt = torch.optim.SGD(self.net.parameters(), lr=INNER_LR)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        losses = []
        for i in range(len(batch)):
            with self.higher.innerloop_ctx(self.net, self.inner_opt,
                                           copy_initial_weights=False) as (fnet, diffopt):
                diffopt.step(F.cross_entropy(fnet(batch.support_x[i]), batch.support_y[i]))
                losses.append(F.cross_entropy(fnet(batch.query_x[i]), batch.query_y[i]))
        return torch.stack(losses).mean(), {}


class TorchOptMAML(nn.Module):
    """TorchOpt's Omniglot example: ``MetaSGD``, ``extract_state_dict`` once, per task a
    differentiable step and the query loss, then ``recover_state_dict``."""

    def __init__(self, torchopt: types.ModuleType, init: list[Tensor]) -> None:
        super().__init__()
        self.torchopt, self.net = torchopt, peer_network(init)
        self.inner_opt = torchopt.MetaSGD(self.net, lr=INNER_LR)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        extract, recover = self.torchopt.extract_state_dict, self.torchopt.recover_state_dict
        net_state = extract(self.net, by="reference", detach_buffers=True)
        opt_state = extract(self.inner_opt, by="reference")
        losses = []
        for i in range(len(batch)):
            self.inner_opt.step(F.cross_entropy(self.net(batch.support_x[i]), batch.support_y[i]))
            losses.append(F.cross_entropy(self.net(batch.query_x[i]), batch.query_y[i]))
            recover(self.net, net_state)
            recover(self.inner_opt, opt_state)
        return torch.stack(losses).mean(), {}


# --- the same maths through other kernels and layouts ------------------------------------------

def conv_reference(x: Tensor, w: Tensor, b: Tensor, groups: int) -> Tensor:
    return F.conv2d(x, w, b, padding=1, groups=groups)


def conv_as_matmul(x: Tensor, w: Tensor, b: Tensor, groups: int) -> Tensor:
    """im2col + GEMM (one task: ``groups`` 1), which runs near the matmul peak on big shapes."""
    n, _, height, width = x.shape
    return (w.flatten(1) @ F.unfold(x, 3, padding=1) + b[:, None]).view(n, -1, height, width)


def pool_as_amax(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return x[..., :h // 2 * 2, :w // 2 * 2].reshape(b, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))


def pool_reference(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 2)


def batch_norm_reference(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    return F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5)


def batch_norm_primitives(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + 1e-5) * gamma[:, None, None] + beta[:, None, None]


class Functional(nn.Module):
    """The step written out with ``conv``, ``pool`` and ``norm`` kernels on metalab's MAML's
    parameters: the inner steps task by task (or, ``grouped``, all as one grouped network),
    the query passes of a call's tasks as one grouped network (one task: the plain step)."""

    def __init__(self, init: list[Tensor], conv: Callable = conv_reference,
                 pool: Callable = pool_reference, norm: Callable = batch_norm_reference,
                 grouped: bool = False) -> None:
        super().__init__()
        self.maml, self.grouped = metalab_maml(init), grouped
        self.conv, self.pool, self.norm = conv, pool, norm

    def losses(self, p: Params, x: Tensor, y: Tensor) -> Tensor:
        """Query losses ``[T]`` of tasks ``x`` ``[T, B, C, H, W]`` under parameters with a
        leading task dimension: task t's channels are group t of one grouped convolution per
        layer, so per-channel BatchNorm statistics are per task."""
        t, b = x.shape[:2]
        h = x.transpose(0, 1).flatten(1, 2)
        for i in range(4):
            w, bias = p[f"backbone.{i}.0.weight"], p[f"backbone.{i}.0.bias"]
            h = self.conv(h, w.flatten(0, 1), bias.flatten(), t)
            h = self.norm(h, p[f"backbone.{i}.1.weight"].flatten(),
                          p[f"backbone.{i}.1.bias"].flatten())
            h = self.pool(F.relu(h))
        logits = torch.einsum("btf,tof->tbo", h.reshape(b, t, -1), p["head.weight"])
        logits = logits + p["head.bias"][:, None]
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        return losses.view(t, b).mean(1)

    def adapted(self, p: Params, x: Tensor, y: Tensor) -> Params:
        grads = torch.autograd.grad(self.losses(p, x, y).sum(), list(p.values()),
                                    create_graph=True)
        return {k: v - INNER_LR * g for (k, v), g in zip(p.items(), grads, strict=True)}

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        theta = {k: v.unsqueeze(0) for k, v in self.maml.named_parameters()}
        if self.grouped:  # the sum's gradient gives each task its own
            fast = self.adapted({k: v.expand(len(batch), *v.shape[1:]) for k, v in theta.items()},
                                batch.support_x, batch.support_y)
        else:
            tasks = [self.adapted(theta, batch.support_x[i:i + 1], batch.support_y[i:i + 1])
                     for i in range(len(batch))]
            fast = {k: torch.cat([task[k] for task in tasks]) for k in theta}
        return self.losses(fast, batch.query_x, batch.query_y).mean(), {}


# --- the rows ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    """One way of computing the step: ``algo.meta_loss`` back-propagated by metalab's
    ``meta_backward`` ``task_chunk`` tasks at a time, then an Adam step."""

    algo: nn.Module
    task_chunk: int
    flush_denormals: bool = False

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.Adam(self.algo.parameters(), lr=OUTER_LR)

    def step(self, batch: TaskBatch) -> float:
        torch.set_flush_denormal(self.flush_denormals)
        try:
            return train_step(self.algo, self.optimizer, batch, self.task_chunk)
        finally:
            torch.set_flush_denormal(False)

    def gradient(self, batch: TaskBatch) -> tuple[float, list[Tensor]]:
        loss = self.step(batch)  # the gradient stays in .grad after the optimiser step
        return loss, [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                      for p in self.algo.parameters()]


# name: (the algorithm from the initial weights and the peers, task_chunk (None: --task-chunk)).
# What each row is: benchmarks/README.md. Peers wrap the same modules, so the same kernels run.
ROWS: dict[str, tuple[Callable[[list[Tensor], dict[str, Peer]], nn.Module], int | None]] = {
    "metalab": (lambda w, p: metalab_maml(w), None),
    "metalab-chunk0": (lambda w, p: metalab_maml(w), 0),
    "learn2learn": (lambda w, p: Learn2LearnMAML(p["learn2learn"].module, metalab_maml(w)), 1),
    "higher": (lambda w, p: HigherMAML(p["higher"].module, w), 1),
    "torchopt": (lambda w, p: TorchOptMAML(p["torchopt"].module, w), 0),
    "torchopt-pertask": (lambda w, p: TorchOptMAML(p["torchopt"].module, w), 1),
    "vmap": (lambda w, p: refused_vmap(w), 0),
    "loop-chunk0": (lambda w, p: metalab_maml(w, task_workers=1), 0),
    "channels-last": (lambda w, p: metalab_maml(w, channels_last=True, task_workers=1), None),
    "grouped": (lambda w, p: Functional(w, grouped=True), 0),
    "reference": (lambda w, p: Functional(w), 1),
    "conv-as-matmul": (lambda w, p: Functional(w, conv=conv_as_matmul), 1),
    "pool-as-amax": (lambda w, p: Functional(w, pool=pool_as_amax), 1),
    "batchnorm-primitives": (lambda w, p: Functional(w, norm=batch_norm_primitives), 1),
    "flush-denormals": (lambda w, p: Functional(w), 1),
    "grouped-query": (lambda w, p: Functional(w), 0),
}
PEER_OF = {"learn2learn": "learn2learn", "higher": "higher", "torchopt": "torchopt",
           "torchopt-pertask": "torchopt"}
GROUPS = {"peers": ["metalab", "metalab-chunk0", "learn2learn", "higher", "torchopt",
                    "torchopt-pertask", "vmap"],
          "layouts": ["metalab", "metalab-chunk0", "loop-chunk0", "channels-last", "vmap",
                      "grouped"],
          "kernels": ["reference", "conv-as-matmul", "pool-as-amax", "batchnorm-primitives",
                      "flush-denormals", "grouped-query"]}


def build(name: str, init: list[Tensor], peers: dict[str, Peer], task_chunk: int) -> Row:
    make, chunk = ROWS[name]
    return Row(make(init, peers), task_chunk if chunk is None else chunk,
               flush_denormals=name == "flush-denormals")


def initial_weights(seed: int) -> list[Tensor]:
    """Every row's initial weights: a seeded metalab MAML's."""
    torch.manual_seed(seed)
    algo = build_algorithm("maml", Conv4(), TaskSpec(n_way=N_WAY))
    return [p.detach().clone() for p in algo.parameters()]


def check(rows: dict[str, Row], copies: Callable[[str], Row], batch: TaskBatch, tol: float
          ) -> dict[str, dict[str, Any]]:
    """Each row's meta-gradient of ``batch`` against the first row's: in float32 (the check's
    step is also each row's first warm-up step) and, on a float64 copy, exactly enough to
    tell different maths from float32 rounding."""
    batch64 = dataclasses.replace(batch, support_x=batch.support_x.double(),
                                  query_x=batch.query_x.double())
    out, reference = {}, None
    for name, row in rows.items():
        loss, grads = row.gradient(batch)
        double = copies(name)
        double.algo.double()
        grads64 = double.gradient(batch64)[1]
        del double
        reference = reference or (grads, grads64)
        rel, rel64 = (harness.relative_difference(g, r) for g, r in
                      zip((grads, grads64), reference, strict=True))
        out[name] = {"loss": loss, "rel_diff": rel, "rel_diff_float64": rel64,
                     "passed": rel <= tol and rel64 <= FLOAT64_TOL}
        print(f"  {name:<20} loss {loss:.6f}  rel diff {rel:.1e} (float64 {rel64:.1e})  "
              f"{'OK' if out[name]['passed'] else 'MISMATCH'}", file=sys.stderr, flush=True)
    return out


def flop_rates(rows: dict[str, Row], batch: TaskBatch, seconds: dict[str, float],
               threads: int) -> dict[str, Any]:
    """GFLOP per step (convolutions and matrix products, every backward included, counted by
    ``FlopCounterMode``, which sees the calling thread only: so one thread, where metalab keeps
    every task in the calling thread too) / median seconds, against the fp32 matmul peak."""
    a, b = torch.randn(2, PEAK_MATMUL_SIZE, PEAK_MATMUL_SIZE)
    laps = []
    for _ in range(11):  # the first is a warm-up
        start = time.perf_counter()
        torch.mm(a, b)
        laps.append(time.perf_counter() - start)
    peak = 2 * PEAK_MATMUL_SIZE**3 / min(laps[1:]) / 1e9
    out: dict[str, Any] = {"matmul_peak_gflops": peak}
    torch.set_num_threads(1)
    try:
        for name, row in rows.items():
            with FlopCounterMode(display=False) as counter:
                row.step(batch)
            gflop = counter.get_total_flops() / 1e9
            out[name] = {"gflop": gflop, "gflops": gflop / seconds[name],
                         "share_of_peak": gflop / seconds[name] / peak}
    finally:
        torch.set_num_threads(threads)
    return out


FULL = {"meta_batch": 32, "repeats": 5, "steps": 2, "warmup": 1, "memory_steps": 3,
        "task_chunk": 1, "threads": 2, "seed": 0}
QUICK = {"meta_batch": 2, "repeats": 1, "steps": 1, "warmup": 0, "memory_steps": 1}


def main() -> None:
    # The layouts and kernels keep the result files of the scripts they were (docs cite them).
    options = harness.Options(__doc__, lambda args: {"layouts": "maml_layouts", "kernels":
                              "maml_kernels"}.get(args.impls, "maml_step"), FULL, QUICK)
    options.add_argument("--impls", default="peers", help="comma-separated rows and groups ("
                         + "; ".join(f"{g}: {','.join(n)}" for g, n in GROUPS.items())
                         + f"; rows: {','.join(ROWS)}); the first row is the baseline, metalab "
                         "unless a group comes first")
    options.add_argument("--tol", type=float, default=1e-4,
                         help="largest float32 relative meta-gradient difference (1e-4)")
    options.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    options.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = options.parse()
    items = [item.strip() for item in args.impls.split(",") if item.strip()]
    names = list(dict.fromkeys(n for item in items for n in GROUPS.get(item, [item])))
    if items[0] not in GROUPS and "metalab" not in names:
        names.insert(0, "metalab")
    if unknown := sorted(set(names) - set(ROWS)):
        options.error(f"unknown rows {', '.join(unknown)}")
    names = [args.memory_worker] if args.memory_worker else names
    peers = {PEER_OF[n]: import_peer(PEER_OF[n]) for n in names if n in PEER_OF}
    init, source = initial_weights(args.seed), task_source("glyphs", "train", 5, 1, 15)

    def episodes(index: int) -> TaskBatch:
        return source.sample(args.meta_batch, step_generator(args.seed, index))

    rows, errors = {}, {}
    for name in names:
        try:
            if (peer := peers.get(PEER_OF.get(name, ""))) and peer.module is None:
                raise RuntimeError(peer.error)
            rows[name] = build(name, init, peers, args.task_chunk)
        except Exception as error:  # a row that cannot be built is reported, not measured
            errors[name] = f"not measured: {error}"
            print(f"WARNING: {name} {errors[name]}", file=sys.stderr)
    if args.memory_worker:  # in a fresh process, for its peak memory alone
        batches = [episodes(harness.WARMUP + i) for i in range(args.memory_steps)]
        row = rows[args.memory_worker]
        print(json.dumps(harness.peak_memory(lambda: [row.step(b) for b in batches])))
        return
    if (baseline := names[0]) not in rows:
        sys.exit(f"the baseline row {baseline} is {errors[baseline]}")
    print(f"gradient check against {baseline}:", file=sys.stderr)
    checks = check(rows, lambda name: build(name, init, peers, args.task_chunk),
                   episodes(harness.WARMUP - 1), args.tol)
    drawn: dict[int, TaskBatch] = {}

    def draw(indices: range) -> None:  # the round's episodes, drawn untimed, shared by all rows
        drawn.clear()
        drawn.update({i: episodes(i) for i in indices})

    times = harness.interleave({name: lambda i, row=row: row.step(drawn[i])
                                for name, row in rows.items()},
                               args.repeats, args.steps, args.warmup, prepare=draw)
    summary = harness.summarise(times, baseline)
    for name in rows:
        summary[name]["memory"] = None if args.no_memory else harness.in_subprocess(
            [*sys.argv[1:], "--memory-worker", name], args.threads)
        print(f"  memory {name}: {summary[name]['memory']}", file=sys.stderr, flush=True)
    flops = flop_rates(rows, episodes(harness.WARMUP - 1),
                       {name: summary[name]["s"] for name in rows}, args.threads)

    def mib(name: str) -> float | None:
        return (summary[name]["memory"] or {}).get("peak_mib")

    print(f"\n| row | s / step | spread | time / {baseline} | peak MiB | gradient vs "
          f"{baseline} (float64) | GFLOP/s | share of fp32 peak |\n|" + " --- |" * 8)
    for name in names:
        if name not in rows:
            print(f"| {name} | {errors[name]} |" + " |" * 6)
            continue
        s, c, f = summary[name], checks[name], flops[name]
        print(f"| {name} | {s['s']:.3f} | {s['spread']:.2f} | {s['ratio']:.2f}x | "
              f"{'n/a' if mib(name) is None else f'{mib(name):.0f}'} | {c['rel_diff']:.1e} "
              f"({c['rel_diff_float64']:.1e}) {'OK' if c['passed'] else 'MISMATCH'} | "
              f"{f['gflops']:.1f} | {f['share_of_peak']:.0%} |")
    print(f"Medians of {args.repeats} interleaved rounds of {args.steps} steps; spread: max/min; "
          f"time / {baseline}: median of per-round ratios; peak memory: {args.memory_steps} "
          f"steps in a fresh process; fp32 matmul peak {flops['matmul_peak_gflops']:.0f} GFLOP/s")
    measured = [name for name in rows if name in PEER_OF]
    verdict = {}
    if baseline == "metalab" and measured:  # the bar: >= 1.5x as fast, no more memory
        fastest = min(measured, key=lambda name: summary[name]["s"])
        verdict = {"fastest_peer": fastest, "speedup": summary[fastest]["ratio"],
                   "peak_mib": {"metalab": mib("metalab"), fastest: mib(fastest)}}
        print(f"Fastest peer {fastest}: metalab {verdict['speedup']:.2f}x as fast (bar 1.5x), "
              f"peak MiB {verdict['peak_mib']} (bar: no more)")
    harness.write_json(args.out, "maml_step", {
        "unit": "seconds per second-order MAML outer step (meta-gradient + Adam step)",
        "config": {**{k: getattr(args, k) for k in FULL}, "quick": args.quick, "rows": names,
                   "baseline": baseline, "tol": args.tol, "episodes": "glyphs train 5w1s15q",
                   "inner": f"1 SGD step of {INNER_LR}", "outer": f"Adam(lr={OUTER_LR})"},
        "peers": {name: peer.record() for name, peer in peers.items()},
        "rows": {name: {"task_chunk": rows[name].task_chunk, "check": checks[name],
                        "summary": summary[name], "flops": flops[name], "step_s": times[name]}
                 if name in rows else {"error": errors[name]} for name in names},
        "matmul_peak_gflops": flops["matmul_peak_gflops"], "verdict": verdict})


if __name__ == "__main__":
    main()
