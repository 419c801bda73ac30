"""Which layout of metalab's MAML inner loop is fastest on this CPU: loop, channels-last, vmap,
grouped convolution.

What is measured
    The same second-order MAML outer step as ``maml_step.py`` (Conv4 + linear head, 5-way 1-shot
    15-query glyph episodes, meta-batch ``--meta-batch`` (32), one inner step of lr 0.4, fp32,
    Adam lr 1e-3, BatchNorm on batch statistics), with the meta-batch laid out in different
    ways. Every layout computes the meta-gradient of the mean query loss over the tasks; the
    script first checks that each one's meta-gradient equals the per-task loop's.

    * ``loop`` -- metalab's MAML and trainer step, ``meta_backward(algo, batch,
      task_chunk=--task-chunk)``, tasks adapted one after the other through
      ``torch.func.functional_call`` in the calling thread (``task_workers=1`` where this
      metalab has that option; task_chunk 1: one backward per task).
    * ``loop-chunk0`` -- the same, one backward for the whole batch (``task_chunk=0``).
    * ``task-threads`` -- metalab's tasks-in-threads path (``task_workers=--threads``,
      ``task_chunk=0``): one thread per core, each running whole tasks single-threaded and
      computing their gradients. Not measured (with the reason) by a metalab without it.
    * ``loop-channels-last`` -- the per-task loop with the model's conv weights and every
      task's images in ``torch.channels_last`` memory format (the conversion of the batch is
      part of the step). It fails the check in fp32 (~3e-3 from the loop, ~1e-2 from its own
      float64 result) while its float64 result equals the loop's to 1e-13: precision lost on
      the CPU's channels-last path (its ``F.batch_norm`` forward was 16x less accurate than
      the contiguous one in a micro-test), not different maths.
    * ``vmap`` -- ``torch.func.grad`` of ``functional_call`` (metalab's module, so
      ``F.batch_norm``) for the inner step, ``torch.func.vmap`` over the tasks, one backward.
    * ``vmap-bnprim`` -- the same over a functional Conv4 whose BatchNorm is written with
      ``mean``/``var`` primitives (see the gradient check: ``F.batch_norm``'s batching rule under
      vmap gives a different second-order gradient in torch 2.13).
    * ``grouped`` -- one call per layer for all tasks: the T tasks' images stacked along
      channels ``[B, T*C, H, W]``, the T copies of each conv weight as one
      ``[T*64, Cin, 3, 3]`` weight with ``groups=T``, BatchNorm per task and channel by
      ``F.batch_norm`` on the stacked channels (per-channel statistics over batch and space
      *are* per-task statistics here), the head as one ``einsum``; the inner gradient of the
      sum of the task losses gives every task its own gradient. One backward.
    * ``grouped-bnprim`` -- the same with BatchNorm from ``mean``/``var`` primitives.

    Timing (interleaved rounds, medians, paired ratios to ``loop``) and peak memory (a fresh
    subprocess per layout) are measured exactly as in ``maml_step.py``, whose harness this
    script uses; see its docstring.

Running
    OMP_NUM_THREADS=2 python benchmarks/maml_layouts.py --quick   # smoke run
    OMP_NUM_THREADS=2 python benchmarks/maml_layouts.py           # the table
    (metalab's own environment is enough: no peer library is used.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from maml_step import (
    INNER_LR,
    Candidate,
    Impl,
    Metalab,
    Vmap,
    common_arguments,
    finish_arguments,
    maml_options,
    metalab_maml,
    parse_names,
    run_benchmark,
    write_json,
)
from metalab.tasks import TaskBatch
from metalab.train import meta_backward

BN_EPS = 1e-5  # nn.BatchNorm2d's default
BLOCKS = 4


def channels_last_tasks(x: Tensor) -> Tensor:
    """``[T, B, C, H, W]`` laid out so that every task ``x[t]`` is channels-last."""
    return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def sequential() -> dict[str, int]:
    """The MAML option that keeps this metalab's tasks in the calling thread (if it has one)."""
    return {"task_workers": 1} if "task_workers" in maml_options() else {}


class LoopChannelsLast(Metalab):
    description = ("metalab per-task loop{options}, channels_last weights and images, "
                   "task_chunk={chunk}")

    def __init__(self, init: list[Tensor], task_chunk: int, **options: Any) -> None:
        super().__init__(init, task_chunk, **options)
        self.algo.to(memory_format=torch.channels_last)

    def meta_backward(self, batch: TaskBatch) -> float:
        batch = TaskBatch(channels_last_tasks(batch.support_x), batch.support_y,
                          channels_last_tasks(batch.query_x), batch.query_y, batch.classes)
        loss, _ = meta_backward(self.algo, batch, task_chunk=self.task_chunk)
        return loss


def batch_norm_primitives(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """BatchNorm on batch statistics from mean/var: per channel over batch and space."""
    mean = h.mean(dim=(0, 2, 3), keepdim=True)
    var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (h - mean) * torch.rsqrt(var + BN_EPS) * weight[:, None, None] + bias[:, None, None]


def conv4_forward(
    p: dict[str, Tensor], x: Tensor, tasks: int | None, primitives: bool
) -> Tensor:
    """Conv4's feature maps of ``x`` with parameters named as metalab's MAML names them.

    ``tasks=None``: one task, ``x`` ``[B, Cin, H, W]``. ``tasks=T``: ``x`` ``[B, T*Cin, H, W]``
    (task t's channels at ``t*Cin:(t+1)*Cin``) and every parameter has a leading task
    dimension ``T``: one grouped convolution (``groups=T``) per layer serves all tasks."""
    h = x
    for i in range(BLOCKS):
        w, b = p[f"backbone.{i}.0.weight"], p[f"backbone.{i}.0.bias"]
        gamma, beta = p[f"backbone.{i}.1.weight"], p[f"backbone.{i}.1.bias"]
        if tasks is not None:  # [T, Cout, Cin, 3, 3] -> [T*Cout, Cin, 3, 3], [T, C] -> [T*C]
            w, b = w.reshape(-1, *w.shape[2:]), b.reshape(-1)
            gamma, beta = gamma.reshape(-1), beta.reshape(-1)
        h = F.conv2d(h, w, b, padding=1, groups=tasks or 1)
        if primitives:
            h = batch_norm_primitives(h, gamma, beta)
        else:
            h = F.batch_norm(h, None, None, gamma, beta, training=True, eps=BN_EPS)
        h = F.max_pool2d(F.relu(h), 2)
    return h


class VmapPrimitives(Vmap):
    description = "torch.func grad + vmap over tasks, functional Conv4, BatchNorm by mean/var"

    def meta_backward(self, batch: TaskBatch) -> float:
        def forward(p: dict[str, Tensor], x: Tensor) -> Tensor:
            features = conv4_forward(p, x, tasks=None, primitives=True).flatten(1)
            return F.linear(features, p["head.weight"], p["head.bias"])

        def support_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(forward(p, x), y)

        def query_loss(p: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
                       ) -> Tensor:
            grads = torch.func.grad(support_loss)(p, sx, sy)
            return F.cross_entropy(forward({k: p[k] - INNER_LR * grads[k] for k in p}, qx), qy)

        params = dict(self.algo.named_parameters())
        loss = torch.func.vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(
            params, batch.support_x, batch.support_y, batch.query_x, batch.query_y).mean()
        loss.backward()
        return loss.item()


class Grouped(Impl):
    description = "all tasks in one grouped conv per layer (groups=T), BatchNorm {bn}"

    def __init__(self, init: list[Tensor], primitives: bool) -> None:
        self.algo = metalab_maml(init)  # holds the meta-parameters, named as metalab does
        self.primitives = primitives
        self.description = self.description.format(
            bn="by mean/var" if primitives else "by F.batch_norm on stacked channels")
        super().__init__(list(self.algo.parameters()))

    def task_losses(self, p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Per-task mean cross-entropy ``[T]`` of ``x`` ``[T, B, C, H, W]`` under per-task
        parameters ``p`` (leading dimension T)."""
        t, b = x.shape[:2]
        stacked = x.transpose(0, 1).reshape(b, t * x.shape[2], *x.shape[3:])
        features = conv4_forward(p, stacked, tasks=t, primitives=self.primitives)
        features = features.reshape(b, t, -1)  # task t's channels are contiguous
        logits = torch.einsum("btf,tof->tbo", features, p["head.weight"])
        logits = logits + p["head.bias"][:, None, :]
        losses = F.cross_entropy(logits.reshape(t * b, -1), y.reshape(-1), reduction="none")
        return losses.view(t, b).mean(dim=1)

    def meta_backward(self, batch: TaskBatch) -> float:
        t = len(batch)
        theta = dict(self.algo.named_parameters())
        per_task = {k: v.unsqueeze(0).expand(t, *v.shape) for k, v in theta.items()}
        support = self.task_losses(per_task, batch.support_x, batch.support_y).sum()
        grads = torch.autograd.grad(support, list(per_task.values()), create_graph=True)
        adapted = {k: v - INNER_LR * g for (k, v), g in zip(per_task.items(), grads,
                                                             strict=True)}
        loss = self.task_losses(adapted, batch.query_x, batch.query_y).mean()
        loss.backward()
        return loss.item()


LAYOUTS = [
    Candidate("loop", lambda init, peers, args: Metalab(init, args.task_chunk, **sequential())),
    Candidate("loop-chunk0", lambda init, peers, args: Metalab(init, 0, **sequential())),
    Candidate("task-threads",
              lambda init, peers, args: Metalab(init, 0, task_workers=args.threads)),
    Candidate("loop-channels-last",
              lambda init, peers, args: LoopChannelsLast(init, args.task_chunk, **sequential())),
    Candidate("vmap", lambda init, peers, args: Vmap(init)),
    Candidate("vmap-bnprim", lambda init, peers, args: VmapPrimitives(init)),
    Candidate("grouped", lambda init, peers, args: Grouped(init, primitives=False)),
    Candidate("grouped-bnprim", lambda init, peers, args: Grouped(init, primitives=True)),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Seconds and peak memory of one second-order MAML outer step in different "
        "layouts of the meta-batch (per-task loop, channels-last loop, vmap, grouped "
        "convolution), interleaved in one process; memory in fresh subprocesses. Set "
        "OMP_NUM_THREADS to --threads (and OMP_WAIT_POLICY=PASSIVE on a shared machine).",
        epilog="The docstrings of this script and of maml_step.py describe the methodology.")
    common_arguments(parser)
    names = [c.name for c in LAYOUTS]
    parser.add_argument("--layouts", default=",".join(names),
                        help=f"comma-separated layouts, loop first (default: all: "
                             f"{','.join(names)})")
    args = parser.parse_args(argv)
    args.layouts = parse_names(parser, args.layouts, names, "layout")
    args.layouts = ["loop"] + [n for n in args.layouts if n != "loop"]
    return finish_arguments(parser, args, "maml_layouts")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    candidates = [c for name in args.layouts for c in LAYOUTS if c.name == name]
    _, report = run_benchmark(candidates, {}, args, Path(__file__).resolve(), "loop",
                              "MAML second-order outer step by layout of the meta-batch")
    report["benchmark"] = "maml_layouts"
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
