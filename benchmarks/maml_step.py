"""Seconds and peak memory of one second-order MAML outer step: metalab against its peers.

What is measured
    One *outer step* of second-order MAML (Finn et al. 2017) on 5-way 1-shot 15-query
    episodes of 28x28x1 glyphs (``metalab.data.task_source("glyphs", "train", 5, 1, 15)``,
    offline), meta-batch ``--meta-batch`` tasks (default 32), fp32: for every task one inner
    SGD step of lr 0.4 on the support loss (graph kept: second order), the query loss at the
    adapted weights, the meta-gradient of the mean query loss over the tasks, and an Adam step
    (lr 1e-3) on the initial weights. Network: metalab's ``Conv4`` (4 x [3x3 conv 64, BatchNorm,
    ReLU, 2x2 max-pool]) and a linear head to 5 classes, 112,261 parameters. BatchNorm always
    normalises with the statistics of the batch it sees and keeps no running statistics
    (metalab's ``use_batch_statistics``, the MAML convention), in every implementation, so
    every implementation computes the same maths. The implementations:

    * ``metalab`` -- ``build_algorithm("maml", Conv4(), TaskSpec(n_way=5), inner_lr=0.4)``;
      the step is ``optimizer.zero_grad(); metalab.train.meta_backward(algo, batch,
      task_chunk=--task-chunk); optimizer.step()`` (what metalab's trainer does). Default
      ``task_chunk`` 1: each task is back-propagated on its own, which bounds memory.
    * ``metalab-chunk0`` -- the same with ``task_chunk=0``: ``meta_loss`` sees the whole
      batch at once, and metalab picks its own way through it (with this checkout's
      defaults: the tasks in ``torch.get_num_threads()`` threads of one core each, gradients
      computed inside the threads; with ``task_chunk=1`` each call has one task, so none).
      The row's description in the JSON names the options; ``maml_layouts.py`` times the
      ways one by one.
    * ``learn2learn`` -- ``l2l.algorithms.MAML(model, lr=0.4, first_order=False)``; per task
      ``learner = maml.clone(); learner.adapt(support_loss)``, ``query_loss.backward()``; then
      the gradients are divided by the meta-batch size, as in its ``maml_omniglot.py`` example.
    * ``higher`` -- per task ``with higher.innerloop_ctx(model, SGD(lr=0.4),
      copy_initial_weights=False) as (fnet, diffopt)``: ``diffopt.step(support_loss)``,
      ``query_loss.backward()`` (its ``maml-omniglot.py`` example), gradients divided by the
      meta-batch size as for learn2learn.
    * ``torchopt`` -- ``torchopt.MetaSGD(model, lr=0.4)`` as in its ``maml_omniglot.py``
      example: ``extract_state_dict`` once, per task ``inner_opt.step(support_loss)``, query
      loss, ``recover_state_dict``; one backward of the mean of the stacked query losses.
    * ``torchopt-pertask`` -- the same, but each task's query loss / T is back-propagated
      before the state is recovered (the memory-bounding form the other peers use).
    * ``vmap`` -- metalab's network through ``torch.func.functional_call``, the inner step by
      ``torch.func.grad``, the task's query loss ``torch.func.vmap``-ed over the task
      dimension, then one backward of the mean (for the record: a layout metalab could use).
      It fails the gradient check: under ``vmap``, ``F.batch_norm``'s second-order gradient in
      training mode differs from the loop's by 3e-3 to 5e-3 relative, by 3e-3 in float64 too;
      on a small float64 conv + BatchNorm network finite differences agree with the loop, not
      with vmap (torch 2.13; cf. pytorch/functorch#534, the batch_norm backward batching
      rule). ``maml_layouts.py`` has a vmap layout that passes.

    Peers wrap an ``nn.Sequential(Conv4(), nn.Linear(64, 5))`` (the same module types, so the
    same kernels). All implementations start from the same initial weights (copied from the
    seeded metalab model, parameter by parameter) and get the same episodes.

Gradient check
    Before anything is timed, every implementation computes the meta-gradient of the same
    batch (the first, ``--meta-batch`` tasks) from the same weights; the table shows its
    relative difference to metalab's, ||g - g_metalab|| / ||g_metalab|| over all parameters,
    and the worst per-tensor relative difference. It must be below ``--tol`` (1e-4): then
    the comparison is of the same maths. That step is then applied (Adam), so it is also each
    implementation's first warm-up step.

Timing
    After ``--warmup`` more untimed steps each, ``--repeats`` rounds; in each round every
    implementation runs ``--steps`` steps on the round's episodes, one implementation after
    the other (A B C D, then B C D A, ...: the order rotates so that no implementation always
    follows the same one). Reported: the median over rounds of each round's mean seconds per
    step, the spread (max/min over rounds), and for each implementation the median over
    rounds of its time divided by metalab's in the same round (paired, so slow drift of a
    shared machine cancels). ``--threads`` (default 2) sets ``torch.set_num_threads``; set
    ``OMP_NUM_THREADS`` to the same number (the memory subprocesses get it set).

    On a machine where other processes compete for the cores, also set
    ``OMP_WAIT_POLICY=PASSIVE``: by default OpenMP's worker threads spin while they wait, and
    when the cores are oversubscribed a spinning thread holds the core its sibling needs; on
    this project's 2-core machine under a load of ~5, that made a per-task-backward step 2-7x
    slower, erratically (the implementations that back-propagate per task suffered most),
    while with ``PASSIVE`` every implementation ran at its normal speed. The policy is
    recorded in the JSON. On a quiet machine leave it unset (the default is what users get).

Peak memory
    For each implementation a fresh subprocess (this script with ``--memory-worker NAME``)
    imports everything, builds the implementation and draws its episodes, then reads its
    resident set size (``VmRSS`` in ``/proc/self/status``), resets the kernel's peak-RSS
    mark (writing ``5`` to ``/proc/self/clear_refs``) and runs ``--memory-steps`` outer steps
    (the first one includes creating Adam's state and the kernels' caches). Reported: the
    peak resident set size during those steps (``VmHWM``) minus the resident set size before
    them, in MiB: the extra memory the process needed to run the steps (tensors, autograd
    graph, allocator slack), excluding the interpreter, torch and the model. The worker
    subprocesses run one after the other, ``--memory-runs`` times (median), in rotating order.

Setup and running (see benchmarks/README.md)
    bash benchmarks/setup_peers.sh       # .venv-peers: torch 2.13.0 CPU, learn2learn, higher, ...
    OMP_NUM_THREADS=2 .venv-peers/bin/python benchmarks/maml_step.py --quick   # smoke run
    OMP_NUM_THREADS=2 .venv-peers/bin/python benchmarks/maml_step.py           # the table

Importing learn2learn
    ``learn2learn/__init__.py`` imports its data, vision, gym and text subpackages (torchvision,
    gym, scipy, requests, qpth, ...), none of which MAML needs; torchvision from PyPI does not
    even load beside the local CPU torch. :func:`import_learn2learn` registers bare package
    objects for ``learn2learn`` and ``learn2learn.algorithms`` whose ``__path__`` is the real
    folder, so ``import learn2learn.algorithms.maml`` loads only ``maml.py``, ``base_learner.py``
    and ``learn2learn/utils/__init__.py`` (torch and the standard library). A peer that is not
    installed or fails to import is not measured; the table and the JSON say why.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from metalab.algorithms import TaskSpec, build_algorithm
from metalab.data import task_source
from metalab.memory import status_kib
from metalab.models import Conv4, use_batch_statistics
from metalab.tasks import TaskBatch, step_generator
from metalab.train import meta_backward
from protonet_throughput import machine_info as shared_machine_info  # sibling script on sys.path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
N_WAY, K_SHOT, Q_QUERY = 5, 1, 15
INNER_LR = 0.4
OUTER_LR = 1e-3
WARMUP_OFFSET = 1_000_000  # episode indices of the check and warm-up steps
PEAK_MATMUL_SIZE = 2048  # square fp32 matrices timed for the machine's matmul peak


# --- implementations ---------------------------------------------------------------------------


class Impl:
    """One way of computing a MAML outer step; ``params`` in metalab's parameter order."""

    name = ""
    description = ""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.optimizer = torch.optim.Adam(params, lr=OUTER_LR)

    def meta_backward(self, batch: TaskBatch) -> float:
        """Add the meta-gradient of the mean query loss to ``.grad``; return that loss."""
        raise NotImplementedError

    def step(self, batch: TaskBatch) -> float:
        """One outer step: zero the gradients, meta-gradient, Adam step."""
        self.optimizer.zero_grad()
        loss = self.meta_backward(batch)
        self.optimizer.step()
        return loss


def maml_options() -> set[str]:
    """The keyword options this checkout's metalab MAML accepts."""
    from metalab.algorithms import ALGORITHMS

    return set(inspect.signature(ALGORITHMS["maml"].__init__).parameters) - {"self"}


def metalab_maml(init: list[Tensor], **options: Any) -> nn.Module:
    """metalab's MAML (Conv4 + linear head, BatchNorm on batch statistics), weights ``init``;
    ``options`` are further MAML options (an error names one this metalab does not have)."""
    unknown = sorted(set(options) - maml_options())
    if unknown:
        raise ValueError(f"this metalab's MAML has no option {', '.join(unknown)}")
    algo = build_algorithm("maml", Conv4(), TaskSpec(n_way=N_WAY), inner_lr=INNER_LR,
                           inner_steps=1, first_order=False, **options).train()
    load(algo, init)
    return algo


def peer_model(init: list[Tensor]) -> nn.Sequential:
    """The same network as a plain ``nn.Sequential`` for the peers, weights ``init``."""
    backbone = Conv4()
    use_batch_statistics(backbone)  # exactly what metalab's MAML does to its backbone
    model = nn.Sequential(backbone, nn.Linear(64, N_WAY)).train()
    load(model, init)
    return model


def load(module: nn.Module, init: list[Tensor]) -> None:
    """Copy ``init`` into ``module``'s parameters, in order, checking every shape."""
    params = list(module.parameters())
    if len(params) != len(init):
        raise ValueError(f"{len(params)} parameters, {len(init)} initial tensors")
    with torch.no_grad():
        for p, value in zip(params, init, strict=True):
            if p.shape != value.shape:
                raise ValueError(f"shape {tuple(p.shape)} != {tuple(value.shape)}")
            p.copy_(value)


def initial_weights(seed: int) -> list[Tensor]:
    """The initial weights every implementation starts from: a seeded metalab MAML's."""
    torch.manual_seed(seed)
    algo = build_algorithm("maml", Conv4(), TaskSpec(n_way=N_WAY), inner_lr=INNER_LR)
    return [p.detach().clone() for p in algo.parameters()]


class Metalab(Impl):
    description = "metalab MAML{options}, trainer step meta_backward(task_chunk={chunk})"

    def __init__(self, init: list[Tensor], task_chunk: int, **options: Any) -> None:
        self.algo = metalab_maml(init, **options)
        self.task_chunk = task_chunk
        shown = "".join(f", {k}={v}" for k, v in options.items())
        self.description = self.description.format(chunk=task_chunk, options=shown)
        super().__init__(list(self.algo.parameters()))

    def meta_backward(self, batch: TaskBatch) -> float:
        loss, _ = meta_backward(self.algo, batch, task_chunk=self.task_chunk)
        return loss


class Learn2Learn(Impl):
    description = "l2l.algorithms.MAML: clone(), adapt(), query loss backward per task"

    def __init__(self, init: list[Tensor], module: types.ModuleType) -> None:
        self.maml = module.MAML(peer_model(init), lr=INNER_LR, first_order=False)
        super().__init__(list(self.maml.parameters()))

    def meta_backward(self, batch: TaskBatch) -> float:
        total = 0.0
        for i in range(len(batch)):
            learner = self.maml.clone()
            learner.adapt(F.cross_entropy(learner(batch.support_x[i]), batch.support_y[i]))
            loss = F.cross_entropy(learner(batch.query_x[i]), batch.query_y[i])
            loss.backward()
            total += loss.item()
        for p in self.params:  # the example's mean over tasks
            p.grad.mul_(1.0 / len(batch))
        return total / len(batch)


class Higher(Impl):
    description = "higher.innerloop_ctx(copy_initial_weights=False) per task, backward per task"

    def __init__(self, init: list[Tensor], module: types.ModuleType) -> None:
        self.higher = module
        self.model = peer_model(init)
        self.inner_opt = torch.optim.SGD(self.model.parameters(), lr=INNER_LR)
        super().__init__(list(self.model.parameters()))

    def meta_backward(self, batch: TaskBatch) -> float:
        total = 0.0
        for i in range(len(batch)):
            with self.higher.innerloop_ctx(self.model, self.inner_opt,
                                           copy_initial_weights=False) as (fnet, diffopt):
                diffopt.step(F.cross_entropy(fnet(batch.support_x[i]), batch.support_y[i]))
                loss = F.cross_entropy(fnet(batch.query_x[i]), batch.query_y[i])
                loss.backward()
                total += loss.item()
        for p in self.params:
            p.grad.mul_(1.0 / len(batch))
        return total / len(batch)


class TorchOpt(Impl):
    description = "torchopt.MetaSGD + extract/recover_state_dict, one backward of the mean"

    def __init__(self, init: list[Tensor], module: types.ModuleType, per_task: bool) -> None:
        self.torchopt = module
        self.model = peer_model(init)
        self.inner_opt = module.MetaSGD(self.model, lr=INNER_LR)
        self.per_task = per_task
        if per_task:
            self.description = "torchopt.MetaSGD, query loss / T backward per task"
        super().__init__(list(self.model.parameters()))

    def meta_backward(self, batch: TaskBatch) -> float:
        to = self.torchopt
        net_state = to.extract_state_dict(self.model, by="reference", detach_buffers=True)
        opt_state = to.extract_state_dict(self.inner_opt, by="reference")
        losses = []
        for i in range(len(batch)):
            self.inner_opt.step(F.cross_entropy(self.model(batch.support_x[i]),
                                                batch.support_y[i]))
            loss = F.cross_entropy(self.model(batch.query_x[i]), batch.query_y[i])
            if self.per_task:
                (loss / len(batch)).backward()
                loss = loss.detach()
            losses.append(loss)
            to.recover_state_dict(self.model, net_state)
            to.recover_state_dict(self.inner_opt, opt_state)
        mean = torch.stack(losses).mean()
        if not self.per_task:
            mean.backward()
        return mean.item()


def vmap_meta_loss(module: nn.Module, params: dict[str, Tensor], batch: TaskBatch) -> Tensor:
    """Mean query loss after one inner step, ``torch.func.vmap``-ed over the tasks."""

    def support_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(module, p, (x,)), y)

    def query_loss(p: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
                   ) -> Tensor:
        grads = torch.func.grad(support_loss)(p, sx, sy)
        adapted = {k: p[k] - INNER_LR * grads[k] for k in p}
        return F.cross_entropy(functional_call(module, adapted, (qx,)), qy)

    losses = torch.func.vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(
        params, batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    return losses.mean()


class Vmap(Impl):
    description = "torch.func: grad of functional_call, vmap over tasks, one backward"

    def __init__(self, init: list[Tensor]) -> None:
        self.algo = metalab_maml(init)
        super().__init__(list(self.algo.parameters()))

    def meta_backward(self, batch: TaskBatch) -> float:
        loss = vmap_meta_loss(self.algo, dict(self.algo.named_parameters()), batch)
        loss.backward()
        return loss.item()


# --- peers -------------------------------------------------------------------------------------


@dataclass
class Peer:
    """An imported peer library, or why it could not be imported."""

    name: str
    module: types.ModuleType | None
    version: str | None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _not_installed(name: str) -> Peer:
    return Peer(name, None, None, f"{name} is not installed for {sys.executable}; run "
                "`bash benchmarks/setup_peers.sh` and use `.venv-peers/bin/python`.")


def import_learn2learn() -> Peer:
    """``learn2learn.algorithms.maml`` without running ``learn2learn/__init__.py``."""
    version = _version("learn2learn")
    if version is None:
        return _not_installed("learn2learn")
    try:
        spec = importlib.util.find_spec("learn2learn")
        if spec is None or spec.origin is None:
            raise ImportError("learn2learn is installed but has no importable package")
        root = Path(spec.origin).parent
        folders = {"learn2learn": root, "learn2learn.algorithms": root / "algorithms"}
        for name, folder in folders.items():
            if name not in sys.modules:
                package = types.ModuleType(name)
                package.__path__ = [str(folder)]
                package.__package__ = name
                sys.modules[name] = package
        module = importlib.import_module("learn2learn.algorithms.maml")
        return Peer("learn2learn", module, version, notes=[
            "imported learn2learn.algorithms.maml (+ base_learner, utils) only; "
            "learn2learn/__init__.py not run"])
    except Exception as error:  # any failure: say why, measure the others
        return Peer("learn2learn", None, version, f"learn2learn {version} failed to import: "
                    f"{error!r}")


def import_higher() -> Peer:
    version = _version("higher")
    if version is None:
        return _not_installed("higher")
    try:
        return Peer("higher", importlib.import_module("higher"), version)
    except Exception as error:
        return Peer("higher", None, version, f"higher {version} failed to import: {error!r}")


def import_torchopt() -> Peer:
    version = _version("torchopt")
    if version is None:
        return _not_installed("torchopt")
    try:
        module = importlib.import_module("torchopt")
    except Exception as error:
        return Peer("torchopt", None, version, f"torchopt {version} failed to import: {error!r}")
    notes = []
    with contextlib.suppress(Exception):
        from torchopt.accelerated_op import is_available

        if not is_available():
            notes.append("torchopt's C++/CUDA ops (torchopt._C, built for another torch) do not "
                         "load; it uses its pure-PyTorch code (MetaSGD never uses them anyway)")
    return Peer("torchopt", module, version, notes=notes)


PEER_IMPORTS: dict[str, Callable[[], Peer]] = {
    "learn2learn": import_learn2learn, "higher": import_higher, "torchopt": import_torchopt}


@dataclass
class Candidate:
    """A named implementation: how to build it, and the peer it needs (if any)."""

    name: str
    build: Callable[[list[Tensor], dict[str, Peer], argparse.Namespace], Impl]
    peer: str | None = None


CANDIDATES = [
    Candidate("metalab", lambda init, peers, args: Metalab(init, args.task_chunk)),
    Candidate("metalab-chunk0", lambda init, peers, args: Metalab(init, 0)),
    Candidate("learn2learn", lambda init, peers, args: Learn2Learn(
        init, peers["learn2learn"].module), "learn2learn"),
    Candidate("higher", lambda init, peers, args: Higher(init, peers["higher"].module),
              "higher"),
    Candidate("torchopt", lambda init, peers, args: TorchOpt(
        init, peers["torchopt"].module, per_task=False), "torchopt"),
    Candidate("torchopt-pertask", lambda init, peers, args: TorchOpt(
        init, peers["torchopt"].module, per_task=True), "torchopt"),
    Candidate("vmap", lambda init, peers, args: Vmap(init)),
]


# --- the harness (also used by maml_layouts.py) ------------------------------------------------


class Episodes:
    """The meta-batches: the same tensors for every implementation, by index."""

    def __init__(self, meta_batch: int, seed: int) -> None:
        self.source = task_source("glyphs", "train", N_WAY, K_SHOT, Q_QUERY)
        self.meta_batch, self.seed = meta_batch, seed

    def __call__(self, index: int) -> TaskBatch:
        return self.source.sample(self.meta_batch, step_generator(self.seed, index))


@dataclass
class Entry:
    """One implementation's results in this run."""

    name: str
    description: str = ""
    error: str | None = None  # why it was not (fully) measured
    impl: Impl | None = None
    check: dict[str, float] = field(default_factory=dict)
    step_s: list[list[float]] = field(default_factory=list)  # [round][step]
    memory: list[dict[str, Any]] = field(default_factory=list)

    def round_means(self) -> list[float]:
        return [sum(r) / len(r) for r in self.step_s]


def build_entries(
    candidates: list[Candidate], peers: dict[str, Peer], init: list[Tensor],
    args: argparse.Namespace,
) -> list[Entry]:
    entries = []
    for cand in candidates:
        entry = Entry(cand.name)
        peer = peers.get(cand.peer) if cand.peer else None
        if peer is not None and peer.module is None:
            entry.error = peer.error
        else:
            try:
                entry.impl = cand.build(init, peers, args)
                entry.description = entry.impl.description
            except Exception as error:
                entry.error = f"could not be built: {error!r}"
        entries.append(entry)
    return entries


def gradient_check(entries: list[Entry], batch: TaskBatch, tol: float) -> None:
    """Meta-gradient of ``batch`` by each implementation against the first one's; then the
    Adam step (so the check is also the first warm-up step)."""
    reference: list[Tensor] | None = None
    for entry in entries:
        if entry.impl is None:
            continue
        impl = entry.impl
        t0 = time.perf_counter()
        try:
            impl.optimizer.zero_grad()
            loss = impl.meta_backward(batch)
        except Exception as error:
            entry.error = f"failed in its first step: {error!r}"
            entry.impl = None
            continue
        seconds = time.perf_counter() - t0
        grads = [p.grad.detach().clone() for p in impl.params]
        impl.optimizer.step()
        if reference is None:
            reference = grads
        flat_ref = torch.cat([g.flatten() for g in reference])
        flat = torch.cat([g.flatten() for g in grads])
        total = float((flat - flat_ref).norm() / flat_ref.norm())
        # Worst tensor, among those whose reference gradient is not ~0 (the conv biases in
        # front of a BatchNorm have a zero gradient in exact arithmetic: only noise is left).
        worst = max(float((g - r).norm() / r.norm()) for g, r in zip(grads, reference,
                                                                          strict=True)
                    if r.norm() > 1e-4 * flat_ref.norm())
        entry.check = {"loss": loss, "rel_diff": total, "max_tensor_rel_diff": worst,
                       "grad_norm": float(flat.norm()), "first_step_s": seconds,
                       "passed": total <= tol}
        print(f"  {entry.name:<20} loss {loss:.6f}  |g| {float(flat.norm()):.6f}  "
              f"rel diff {total:.2e} (worst tensor {worst:.2e})  "
              f"{'OK' if total <= tol else 'MISMATCH'}  [{seconds:.2f} s]",
              file=sys.stderr, flush=True)


def time_interleaved(entries: list[Entry], episodes: Episodes, args: argparse.Namespace) -> None:
    """``args.warmup`` untimed steps each, then ``args.repeats`` rounds of ``args.steps`` steps
    per implementation, implementations one after the other in a rotating order."""
    live = [e for e in entries if e.impl is not None]
    for w in range(args.warmup):
        batch = episodes(WARMUP_OFFSET + 1 + w)
        for entry in live:
            entry.impl.step(batch)
    for r in range(args.repeats):
        batches = [episodes(r * args.steps + s) for s in range(args.steps)]
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for entry in order:
            if entry.impl is None:
                continue
            gc.collect()
            times = []
            try:
                for batch in batches:
                    t0 = time.perf_counter()
                    entry.impl.step(batch)
                    times.append(time.perf_counter() - t0)
            except Exception as error:
                entry.error = f"failed in round {r + 1}: {error!r}"
                entry.impl = None
                continue
            entry.step_s.append(times)
        line = ", ".join(f"{e.name} {e.round_means()[-1]:.2f}"
                         for e in live if len(e.step_s) == r + 1)
        print(f"  round {r + 1}/{args.repeats} (s/step): {line}", file=sys.stderr, flush=True)


# FLOP rate ---------------------------------------------------------------------------------------


def step_gflop(entry: Entry, batch: TaskBatch) -> float | None:
    """GFLOP of one meta-gradient of ``batch`` by ``entry``, counted by torch's
    ``FlopCounterMode`` (convolutions and matrix products, forward and every backward,
    double backward included; BatchNorm, pooling and elementwise ops are not counted). The
    counter sees only the calling thread, so this runs with one thread: metalab then keeps
    every task in the calling thread too."""
    if entry.impl is None:
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            entry.impl.meta_backward(batch)
    finally:
        torch.set_num_threads(threads)
    entry.impl.optimizer.zero_grad()
    return counter.get_total_flops() / 1e9


def matmul_peak_gflops(threads: int, size: int = PEAK_MATMUL_SIZE, repeats: int = 10) -> float:
    """The machine's fp32 matrix-product rate: the best of ``repeats`` ``size``-square
    ``torch.mm`` calls with ``threads`` threads, in GFLOP/s."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def flop_rates(entries: list[Entry], batch: TaskBatch, summary: dict[str, dict[str, Any]],
               threads: int) -> dict[str, Any]:
    """Each implementation's achieved GFLOP/s (its counted GFLOP per step / its median s per
    step) and its share of the fp32 matmul peak; printed and returned for the JSON."""
    peak = matmul_peak_gflops(threads)
    rows = {}
    for entry in entries:
        gflop = step_gflop(entry, batch)
        seconds = summary[entry.name]["s_per_step"]
        rate = gflop / seconds if gflop is not None and seconds else None
        rows[entry.name] = {"gflop_per_step": gflop, "gflops": rate,
                            "share_of_peak": rate / peak if rate is not None else None}
    print(f"\nFLOP rate (convolutions and matrix products counted by FlopCounterMode; fp32 "
          f"matmul peak with {threads} threads: {peak:.0f} GFLOP/s):\n")
    print("| implementation | GFLOP / step | GFLOP/s | share of peak |")
    print("| --- | ---: | ---: | ---: |")
    for name, row in rows.items():
        print(f"| {name} | {_fmt(row['gflop_per_step'], '{:.1f}')} | "
              f"{_fmt(row['gflops'], '{:.1f}')} | {_fmt(row['share_of_peak'], '{:.0%}')} |")
    return {"matmul_peak_gflops": peak, "matmul_peak_size": PEAK_MATMUL_SIZE,
            "implementations": rows}


# memory ------------------------------------------------------------------------------------------


def memory_worker(impl: Impl, episodes: Episodes, steps: int) -> dict[str, Any]:
    """Run ``steps`` outer steps of ``impl``; the RSS before them and the peak during them."""
    batches = [episodes(WARMUP_OFFSET + i) for i in range(steps)]
    gc.collect()
    rss_before = status_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:  # reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    t0 = time.perf_counter()
    for batch in batches:
        impl.step(batch)
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    return {"rss_before_mib": rss_before / 1024, "peak_rss_mib": peak / 1024,
            "peak_minus_before_mib": (peak - rss_before) / 1024, "hwm_reset": hwm_reset,
            "ru_maxrss_before_mib": maxrss_before / 1024,
            "ru_maxrss_after_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_mib": status_kib("VmRSS") / 1024, "steps": steps,
            "seconds": seconds, "metalab_source_sha256": metalab_source()}


def measure_memory(entries: list[Entry], script: Path, args: argparse.Namespace) -> None:
    """One fresh subprocess per implementation and run (``script --memory-worker NAME``)."""
    live = [e for e in entries if e.impl is not None]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for run in range(args.memory_runs):
        order = live[run % len(live):] + live[:run % len(live)] if live else []
        for entry in order:
            cmd = [sys.executable, str(script), "--memory-worker", entry.name,
                   "--meta-batch", str(args.meta_batch), "--memory-steps", str(args.memory_steps),
                   "--threads", str(args.threads), "--seed", str(args.seed),
                   "--task-chunk", str(args.task_chunk)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                entry.memory.append({"error": f"worker exited {proc.returncode}: "
                                     + " | ".join(tail)})
            else:
                entry.memory.append(json.loads(lines[-1]))
                if entry.memory[-1].get("metalab_source_sha256") != metalab_source():
                    entry.memory[-1]["warning"] = "metalab's source changed during the run"
                    print(f"WARNING: metalab's source changed during the run (memory of "
                          f"{entry.name})", file=sys.stderr)
            m = entry.memory[-1]
            print(f"  memory run {run + 1}/{args.memory_runs}: {entry.name:<20} "
                  + (f"+{m['peak_minus_before_mib']:.0f} MiB (RSS {m['rss_before_mib']:.0f} -> "
                     f"peak {m['peak_rss_mib']:.0f})" if "error" not in m else m["error"]),
                  file=sys.stderr, flush=True)


def memory_mib(entry: Entry) -> float | None:
    values = [m["peak_minus_before_mib"] for m in entry.memory if "error" not in m]
    return statistics.median(values) if values else None


# reporting ---------------------------------------------------------------------------------------


METALAB_SOURCES = ("algorithms/maml.py", "algorithms/parallel.py", "algorithms/base.py",
                   "train.py", "models/__init__.py")


def metalab_source() -> dict[str, str]:
    """sha256 (first 12 digits) of the metalab files a MAML step runs, as imported: the tree
    may change between runs (or between this process and its memory subprocesses)."""
    import metalab

    root = Path(metalab.__file__).parent
    out = {}
    for name in METALAB_SOURCES:
        path = root / name
        if path.is_file():
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return out


def machine_info(threads: int, peers: dict[str, Peer] | None = None) -> dict[str, Any]:
    """CPU, versions and threads (``protonet_throughput.machine_info``), the hashes of the
    metalab files a step runs, the load, and the peers: what the timings depend on."""
    info = shared_machine_info(threads) | {"metalab_source_sha256": metalab_source(),
                                            "loadavg": os.getloadavg()}
    if peers:
        info["peers"] = {name: {"version": p.version, "imported": p.module is not None,
                                "error": p.error, "notes": p.notes}
                         for name, p in peers.items()}
    return info


def summarise(entries: list[Entry], baseline: str) -> dict[str, dict[str, Any]]:
    base = next((e for e in entries if e.name == baseline), None)
    base_means = base.round_means() if base is not None else []
    out = {}
    for e in entries:
        means = e.round_means()
        row: dict[str, Any] = {
            "s_per_step": statistics.median(means) if means else None,
            "spread": max(means) / min(means) if means else None,
            "ratio_to_" + baseline: None,
            "peak_memory_mib": memory_mib(e),
        }
        paired = [m / b for m, b in zip(means, base_means, strict=False)]
        if paired and len(means) == len(base_means):
            row["ratio_to_" + baseline] = statistics.median(paired)
        out[e.name] = row
    return out


def print_table(entries: list[Entry], summary: dict[str, dict[str, Any]], baseline: str,
                title: str) -> None:
    print(f"\n### {title}\n")
    print(f"| implementation | s / outer step | spread | time / {baseline} | "
          f"peak memory (MiB) | gradient vs {baseline} |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for e in entries:
        s = summary[e.name]
        if e.error and not e.step_s:
            print(f"| {e.name} | not measured: {e.error} | | | | |")
            continue
        cells = [_fmt(s["s_per_step"], "{:.3f}"), _fmt(s["spread"], "{:.2f}"),
                 _fmt(s["ratio_to_" + baseline], "{:.2f}x"), _fmt(s["peak_memory_mib"], "{:.0f}")]
        check = "n/a"
        if e.check:
            check = f"{e.check['rel_diff']:.1e} {'OK' if e.check['passed'] else 'MISMATCH'}"
        print(f"| {e.name} | {' | '.join(cells)} | {check} |")
    for e in entries:
        if e.error and e.step_s:
            print(f"\n{e.name}: {e.error}")
        if e.check and not e.check["passed"]:
            print(f"\n{e.name}: MISMATCH: its meta-gradient differs from {baseline}'s by "
                  f"{e.check['rel_diff']:.1e} (relative) > --tol: not the same result, so its "
                  "time is not a like-for-like comparison.")


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else spec.format(value)


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nJSON: {path}")


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by maml_step.py and maml_layouts.py."""
    parser.add_argument("--meta-batch", type=int,
                        help="tasks per outer step (default 32; --quick: 2)")
    parser.add_argument("--repeats", type=int,
                        help="timed rounds, each running every implementation (default 5; "
                             "--quick: 1)")
    parser.add_argument("--steps", type=int,
                        help="timed outer steps per implementation and round (default 2; "
                             "--quick: 1)")
    parser.add_argument("--warmup", type=int,
                        help="untimed steps per implementation after the gradient check's "
                             "step (default 1; --quick: 0)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads (default 2); set OMP_NUM_THREADS too")
    parser.add_argument("--task-chunk", type=int, default=1,
                        help="task_chunk of the 'metalab' row's meta_backward (default 1: one "
                             "task per backward; 0: the whole batch)")
    parser.add_argument("--memory-steps", type=int,
                        help="outer steps per memory subprocess (default 3; --quick: 1)")
    parser.add_argument("--memory-runs", type=int, default=1,
                        help="memory subprocesses per implementation (median; default 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--tol", type=float, default=1e-4,
                        help="largest relative meta-gradient difference accepted (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and episodes")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: meta-batch 2, 1 round of 1 step, no extra warm-up, "
                             "1 memory step (values given explicitly win); about a minute")
    parser.add_argument("--out", type=Path, help="JSON path")
    parser.add_argument("--memory-worker", metavar="NAME", help=argparse.SUPPRESS)


def parse_names(parser: argparse.ArgumentParser, value: str, names: list[str],
                what: str) -> list[str]:
    """The comma-separated ``value``, each one of ``names`` (else a usage error)."""
    chosen = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    return chosen


def finish_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     stem: str) -> argparse.Namespace:
    quick = {"meta_batch": 2, "repeats": 1, "steps": 1, "warmup": 0, "memory_steps": 1}
    full = {"meta_batch": 32, "repeats": 5, "steps": 2, "warmup": 1, "memory_steps": 3}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.meta_batch, args.repeats, args.steps, args.threads, args.memory_steps,
           args.memory_runs) < 1 or args.warmup < 0 or args.task_chunk < 0:
        parser.error("--meta-batch, --repeats, --steps, --threads, --memory-steps and "
                     "--memory-runs must be >= 1; --warmup and --task-chunk >= 0")
    if args.out is None:
        args.out = RESULTS / (f"{stem}-quick.json" if args.quick else f"{stem}.json")
    return args


def config_record(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "meta_batch": args.meta_batch, "n_way": N_WAY, "k_shot": K_SHOT, "q_query": Q_QUERY,
        "inner_steps": 1, "inner_lr": INNER_LR, "second_order": True, "precision": "fp32",
        "outer_optimizer": f"Adam(lr={OUTER_LR})",
        "backbone": "Conv4 (64 channels) + Linear(64, 5)",
        "batch_norm": "batch statistics, no running statistics (use_batch_statistics)",
        "input_shape": [1, 28, 28], "episodes": "metalab glyphs, train split",
        "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup,
        "threads": args.threads, "task_chunk": args.task_chunk,
        "memory_steps": args.memory_steps, "memory_runs": args.memory_runs, "tol": args.tol,
        "seed": args.seed, "quick": args.quick,
    }


MEMORY_NOTE = (
    "peak memory: in a fresh subprocess per implementation, peak resident set size (VmHWM, "
    "reset just before) during {steps} outer steps minus the resident set size before them")


def run_benchmark(
    candidates: list[Candidate], peers: dict[str, Peer], args: argparse.Namespace,
    script: Path, baseline: str, title: str,
) -> tuple[list[Entry], dict[str, Any]]:
    """Build, check, time and measure memory; print the table; return entries and report."""
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        cand = next((c for c in candidates if c.name == args.memory_worker), None)
        if cand is None:
            raise SystemExit(f"unknown implementation {args.memory_worker!r}")
        impl = cand.build(initial_weights(args.seed), peers, args)
        print(json.dumps(memory_worker(impl, Episodes(args.meta_batch, args.seed),
                                       args.memory_steps)))
        raise SystemExit(0)

    for peer in peers.values():
        if peer.module is None:
            print(f"WARNING: {peer.error} It is not measured.", file=sys.stderr)
        for note in peer.notes:
            print(f"note: {peer.name}: {note}", file=sys.stderr)
    loadavg_start = os.getloadavg()
    source_start = metalab_source()
    episodes = Episodes(args.meta_batch, args.seed)
    entries = build_entries(candidates, peers, initial_weights(args.seed), args)
    print(f"{title}: meta-batch {args.meta_batch}, {args.repeats} rounds x {args.steps} steps, "
          f"{args.warmup} warm-up, {torch.get_num_threads()} threads "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), load average "
          f"{loadavg_start[0]:.2f}", file=sys.stderr)
    print("gradient check (same weights, same batch, against the first row):", file=sys.stderr)
    gradient_check(entries, episodes(WARMUP_OFFSET), args.tol)
    print("timing:", file=sys.stderr)
    time_interleaved(entries, episodes, args)
    if not args.no_memory:
        print("memory (fresh subprocesses):", file=sys.stderr)
        measure_memory(entries, script, args)
    summary = summarise(entries, baseline)
    print_table(entries, summary, baseline, title)
    flops = flop_rates(entries, episodes(WARMUP_OFFSET), summary, args.threads)
    if metalab_source() != source_start:
        print("\nWARNING: metalab's source files changed while this ran (someone edited the "
              "tree): the memory subprocesses may have run other code than the timings. "
              "See metalab_source_sha256 in the JSON.")
    print(f"\nMedians over {args.repeats} interleaved rounds of {args.steps} steps; spread = "
          f"max/min over rounds; time / {baseline} = median of per-round ratios.\n"
          + MEMORY_NOTE.format(steps=args.memory_steps) + ".")
    print(f"load average: {loadavg_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end "
          f"({os.cpu_count()} logical CPUs); {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}.")
    report = {
        "unit": "seconds per second-order MAML outer step (meta-gradient + Adam step)",
        "memory_unit": "MiB; " + MEMORY_NOTE.format(steps=args.memory_steps),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config_record(args),
        "machine": machine_info(args.threads, peers)
        | {"loadavg_start": loadavg_start, "loadavg_end": os.getloadavg(),
           "metalab_source_sha256_at_start": source_start},
        "implementations": {
            e.name: {"description": e.description, "error": e.error,
                     "gradient_check": e.check, "summary": summary[e.name],
                     "raw_step_s": e.step_s, "memory_runs": e.memory}
            for e in entries},
        "flop_rate": flops,
    }
    return entries, report


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Seconds and peak memory of one second-order MAML outer step (Conv4, "
        "5-way 1-shot 15-query, 1 inner step of lr 0.4, fp32, Adam): metalab against "
        "learn2learn, higher, TorchOpt and a torch.func.vmap step, interleaved in one "
        "process; memory in fresh subprocesses. Run with .venv-peers/bin/python "
        "(bash benchmarks/setup_peers.sh) and OMP_NUM_THREADS set to --threads; on a machine "
        "shared with other CPU-heavy processes add OMP_WAIT_POLICY=PASSIVE.",
        epilog="The module docstring (python -m pydoc benchmarks/maml_step.py) and "
               "benchmarks/README.md describe the methodology.")
    common_arguments(parser)
    names = [c.name for c in CANDIDATES]
    parser.add_argument("--impls", default=",".join(names),
                        help=f"comma-separated implementations to run, metalab first "
                             f"(default: all: {','.join(names)})")
    args = parser.parse_args(argv)
    args.impls = parse_names(parser, args.impls, names, "implementation")
    if "metalab" not in args.impls:
        parser.error("--impls must include metalab (the reference of the check and ratios)")
    args.impls = ["metalab"] + [n for n in args.impls if n != "metalab"]
    return finish_arguments(parser, args, "maml_step")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    candidates = [c for name in args.impls for c in CANDIDATES if c.name == name]
    wanted = {c.peer for c in candidates if c.peer}
    peers = {name: PEER_IMPORTS[name]() for name in PEER_IMPORTS if name in wanted}
    entries, report = run_benchmark(candidates, peers, args, Path(__file__).resolve(),
                                    "metalab", "MAML second-order outer step")
    report["benchmark"] = "maml_step"
    summary = report["implementations"]
    peer_rows = [e for e in entries if e.name in {"learn2learn", "higher", "torchopt",
                                                  "torchopt-pertask"}
                 and summary[e.name]["summary"]["s_per_step"] is not None]
    verdict: dict[str, Any] = {}
    ml = summary["metalab"]["summary"]
    if peer_rows and ml["s_per_step"] is not None:
        fastest = min(peer_rows, key=lambda e: summary[e.name]["summary"]["s_per_step"])
        fs = summary[fastest.name]["summary"]
        speedup = fs["ratio_to_metalab"]  # peer time / metalab time, paired by round
        verdict = {"fastest_peer": fastest.name, "speedup_over_fastest_peer": speedup,
                   "metalab_memory_mib": ml["peak_memory_mib"],
                   "fastest_peer_memory_mib": fs["peak_memory_mib"]}
        line = (f"\nFastest peer: {fastest.name}; metalab is "
                f"{'n/a' if speedup is None else f'{speedup:.2f}x'} as fast (goal >= 1.5x)")
        if ml["peak_memory_mib"] is not None and fs["peak_memory_mib"] is not None:
            line += (f", peak memory {ml['peak_memory_mib']:.0f} MiB vs "
                     f"{fs['peak_memory_mib']:.0f} MiB (goal: no more)")
        print(line + ".")
    else:
        print("\nNo peer library was measured: no speed-up to report.")
    report["verdict"] = verdict
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
