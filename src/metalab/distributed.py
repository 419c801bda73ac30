"""Several processes training one model: torch.distributed, launched by ``torchrun``.

    torchrun --standalone --nproc_per_node=2 -m metalab train CONFIG

Every process (rank) holds the whole model and takes a contiguous share of each step's
tasks (:func:`task_share`). It back-propagates its share; :func:`weighted_sum_` then adds
the ranks' gradients, weighted by share size / tasks per batch, in one collective, so every
rank holds the gradient of the whole meta-batch and takes the same optimiser step. The
process group uses NCCL when the training device is a GPU (one process per GPU, device
``cuda:LOCAL_RANK``) and gloo on the CPU. See ``docs/distributed.md``.

Outside torchrun (no ``WORLD_SIZE`` in the environment) nothing here starts a group and the
helpers describe a world of one process, so the same code trains in one process.
"""

from __future__ import annotations

import gc
import os
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from metalab.evaluate import EvalResult, evaluate, mean_ci95
from metalab.kinds import TaskKind
from metalab.tasks import RaggedTaskBatch, TaskBatch

if TYPE_CHECKING:
    from metalab.algorithms.base import MetaLearner

__all__ = [
    "active",
    "barrier",
    "broadcast_object",
    "broadcast_tensors_",
    "evaluate_sharded",
    "floating_buffers",
    "gather_objects",
    "launched",
    "local_device",
    "process_group",
    "rank",
    "reduce_step",
    "resolve_device",
    "restart_count",
    "restarted",
    "run_id",
    "task_share",
    "weighted_sum_",
    "world_size",
]


def launched() -> bool:
    """True in a process started by torchrun (or another launcher that sets its variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def active() -> bool:
    """True once a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def restart_count() -> int:
    """How many times torchrun has restarted the workers of this job (0: the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def restarted() -> bool:
    """True if torchrun restarted the workers of this job, on any machine (each machine's
    agent keeps its own count, pytorch/pytorch#108158, so the ranks compare theirs)."""
    return max(gather_objects(restart_count())) > 0


def run_id() -> str | None:
    """torchrun's id of this job (``--rdzv-id``; a fresh one per ``--standalone`` launch)."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def local_device(device: torch.device) -> torch.device:
    """The device this process trains on: under torchrun, a GPU device becomes this process's
    own GPU, ``cuda:LOCAL_RANK``; a CPU stays the CPU."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Inside torchrun, a process group for the whole block (NCCL for a GPU ``device``, gloo
    otherwise), torn down in order at the end; yields the device this process trains on.
    Outside torchrun, yields ``device`` and starts nothing.

    Teardown order matters: a 2-process gloo job that exits without it aborted in about one run
    in five ("terminate called without an active exception", exit code 1 from torchrun), after
    correct results. On a clean exit the ranks meet at a barrier, then destroy the group; after
    an error they skip the barrier, which another rank might never reach.
    """
    device = local_device(device)
    if not launched() or active():  # not under torchrun, or the caller owns the group
        yield device
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _init("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    except BaseException:
        dist.destroy_process_group()
        raise
    gc.collect()  # drop what still refers to the group's tensors before it goes
    dist.barrier()
    dist.destroy_process_group()


def _init(backend: str) -> None:
    """``init_process_group`` from torchrun's variables, in a namespace of its own per restart.

    torchrun (torch 2.13, by default) keeps one key-value store for every restart of a job:
    a restarted group would read the addresses the previous attempt's processes published,
    and fail to connect to those dead processes (pytorch/pytorch#135712). Prefixing the keys
    with the restart count gives each attempt fresh ones. (With
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` every attempt gets a new store anyway.)
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend)
        return
    store, rank, world_size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"metalab/attempt{restart_count()}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


def barrier() -> None:
    """Wait until every rank gets here (nothing without a process group)."""
    if active():
        dist.barrier()


def task_share(num_tasks: int, rank: int, world_size: int) -> range:
    """The contiguous block of task indices ``0..num_tasks-1`` that ``rank`` trains on; the
    first ``num_tasks % world_size`` ranks take one task more."""
    if num_tasks < world_size:
        raise ValueError(
            f"tasks_per_batch ({num_tasks}) is smaller than the number of processes "
            f"({world_size}): every process trains on whole tasks of each meta-batch. Raise "
            f"tasks_per_batch to at least {world_size} (--set tasks_per_batch={world_size}) "
            f"or launch fewer processes (--nproc_per_node).")
    return _block(num_tasks, rank, world_size)


def _block(count: int, rank: int, world_size: int) -> range:
    """``rank``'s contiguous block of ``range(count)`` split as evenly as possible."""
    size, extra = divmod(count, world_size)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


def weighted_sum_(tensors: Sequence[Tensor], weight: float) -> None:
    """Replace every tensor, in place, by the sum over ranks of ``weight * tensor``, with one
    collective for all of them (one flat buffer)."""
    flat = torch.cat([t.reshape(-1) for t in tensors]) * weight
    if active():
        dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the ranks (every rank gets the same values); ``tensor``
    itself without a process group."""
    if not active():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def broadcast_tensors_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``tensors`` to every rank, in one collective."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.broadcast(flat, src)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable object), on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def evaluate_sharded(
    algo: MetaLearner, episodes: list[TaskBatch | RaggedTaskBatch], kind: TaskKind,
    device: torch.device,
) -> EvalResult:
    """:func:`metalab.evaluate.evaluate` with the episodes shared out between the ranks.

    Each rank scores a contiguous block of the episodes; the per-episode scores are gathered
    in episode order, so mean and CI are exactly those of one process scoring them all (the
    latencies are medians over every rank's calls). Every rank gets the result.
    """
    if world_size() == 1:
        return evaluate(algo, episodes, kind, device)
    tasks = [batch[i] for batch in episodes for i in range(len(batch))]
    mine = [evaluate(algo, [tasks[i]], kind, device)
            for i in _block(len(tasks), rank(), world_size())]
    results = [r for part in gather_objects(mine) for r in part]
    mean, ci = mean_ci95([r.mean for r in results])
    return EvalResult(metric=results[0].metric, mean=mean, ci95=ci, episodes=len(results),
                      adapt_ms=statistics.median(r.adapt_ms for r in results),
                      query_ms=statistics.median(r.query_ms for r in results),
                      unit=results[0].unit, nonfinite=sum(r.nonfinite for r in results))


def floating_buffers(algo: MetaLearner) -> list[torch.Tensor]:
    """The buffers a training step may change (BatchNorm running statistics, ...)."""
    return [b for b in algo.buffers() if b.is_floating_point()]


def reduce_step(
    algo: MetaLearner, loss: float, metrics: dict[str, float], weight: float,
    start: list[torch.Tensor],
) -> tuple[float, dict[str, float]]:
    """Combine the ranks' shares of a step in one all-reduce, each weighted by ``weight``
    (its share of the tasks): gradients (a parameter keeps no ``.grad`` only if no rank gave
    it one), the changes of :func:`floating_buffers` since ``start`` (their values when the
    step began), loss and metrics (the same names on every rank). Returns the whole step's
    loss and metrics; every rank then holds the same gradients and buffers."""
    params = [p for p in algo.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    buffers = floating_buffers(algo)
    changes = [b - b0 for b, b0 in zip(buffers, start, strict=True)]
    names = sorted(metrics)
    scalars = torch.tensor([loss, *(metrics[k] for k in names),
                            *(float(p.grad is not None) for p in params)],
                           dtype=grads[0].dtype, device=grads[0].device)
    weighted_sum_([*grads, *changes, scalars], weight)
    has_grad = scalars[1 + len(names):].tolist()
    for p, grad, given in zip(params, grads, has_grad, strict=True):
        p.grad = grad if given else None
    for b, b0, change in zip(buffers, start, changes, strict=True):
        b.copy_(b0 + change)
    values = scalars[:1 + len(names)].tolist()
    return values[0], dict(zip(names, values[1:], strict=True))
