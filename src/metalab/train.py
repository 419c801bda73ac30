"""Meta-training any algorithm on any task source: meta-batches, optimiser, validation,
checkpoints, resume.

The loop reads top to bottom::

    for step in range(start, steps):
        batch = sample_tasks(train_tasks, seed, step, share)  # task i: (seed, step, i)
        loss, metrics = meta_backward(algo, batch)   # algo.meta_loss(batch), then backward
        (several processes: one all-reduce adds the ranks' gradients, weighted by share)
        optimizer.step()
        every val_every steps: score fixed validation episodes, write last.pt (and best.pt)

A :class:`Trainer` is built from objects (an algorithm, a task source, optionally an
optimiser and a scheduler); :meth:`Trainer.from_config` builds them from a
:class:`~metalab.config.Config` for the CLI. ``fit`` may be called several times: each call
continues where the last stopped.

Task ``i`` of step ``s`` comes from a generator seeded by ``(seed, s, i)``, so ``--resume``
from ``last.pt`` continues exactly the trajectory of an uninterrupted run, and a run split over
``P`` processes (torchrun, :mod:`metalab.distributed`), where each process draws only its
``share`` of the tasks, trains on exactly the tasks of a one-process run with the same
``tasks_per_batch``. Checkpoints (:mod:`metalab.checkpoint`) are written atomically, by rank 0
alone, and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metalab import distributed
from metalab.algorithms import MetaLearner
from metalab.algorithms.pertask import each_task, normalises_over_batch
from metalab.checkpoint import check_compatible, read_checkpoint, save_checkpoint
from metalab.config import Config
from metalab.evaluate import EvalResult, nonfinite_tensors
from metalab.io import atomic_write_text
from metalab.memory import available_bytes
from metalab.runfolder import RunFolder, RunFolderError
from metalab.runs import build, optimization, task_sources
from metalab.tasks import RaggedTaskBatch, TaskBatch, TaskSource, fixed_episodes, sample_tasks

__all__ = ["VAL_SEED", "TrainState", "Trainer", "TrainingDiverged", "meta_backward"]

VAL_SEED = 1234  # the fixed validation episodes
BUDGET_VALIDATIONS = 5  # a run with a time_budget validates after each fifth of it


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainState:
    step: int = 0
    best: float | None = None  # best validation score (in the task kind's direction)
    train_seconds: float = 0.0  # wall-clock time of the training steps (not validation)
    cpu_seconds: float = 0.0  # CPU time of those steps, all threads (robust to a busy machine)


class Trainer:
    """Meta-trains ``algorithm`` on tasks drawn from ``train_tasks``.

    ``optimizer`` defaults to Adam (lr 1e-3) over the algorithm's parameters; ``scheduler``
    (optional) steps once per training step. ``val_tasks`` are scored on ``val_episodes``
    fixed episodes every ``val_every`` steps; ``best.pt`` keeps the best (in the task kind's
    direction), or the latest weights without ``val_tasks``. With ``out`` the trainer writes
    ``log.jsonl``, ``last.pt`` and ``best.pt`` there; without it, nothing is written.
    ``config`` (set by :meth:`from_config`) is recorded in checkpoints, so that
    :func:`metalab.runs.load_checkpoint` can rebuild the algorithm from them.

    In a process group (torchrun, see :mod:`metalab.distributed`) every rank trains on its
    share of each step's tasks and the ranks take identical optimiser steps; rank 0 alone
    logs, shows progress and writes checkpoints, and validation is shared out between ranks.
    """

    def __init__(
        self, algorithm: MetaLearner, train_tasks: TaskSource, *,
        val_tasks: TaskSource | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        steps: int = 1000, tasks_per_batch: int = 1, seed: int = 0, out: str | Path | None = None,
        val_every: int = 250, val_episodes: int = 200, log_every: int = 10,
        checkpoint_every: int = 0, time_budget: float = 0.0, task_chunk: int = 0,
        grad_clip: float | None = None, precision: str = "fp32", device: str = "auto",
        progress: bool = True, config: Config | None = None, overwrite: bool = False,
    ) -> None:
        self.steps, self.tasks_per_batch, self.seed = steps, tasks_per_batch, seed
        self.val_every, self.val_episodes, self.log_every = val_every, val_episodes, log_every
        self.checkpoint_every, self.time_budget = checkpoint_every, time_budget
        self.task_chunk, self.grad_clip, self.precision = task_chunk, grad_clip, precision
        self.config = config
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.share = distributed.task_share(tasks_per_batch, self.rank, self.world_size)
        self.progress = progress and self.rank == 0
        self.device = distributed.local_device(distributed.resolve_device(device))
        if self.device.type == "cuda":  # same seed, same weights: no autotuned, racy kernels
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        self.out = Path(out) if out is not None else None
        self.folder = RunFolder(self.out) if self.out is not None else None
        self.overwrite = overwrite
        self._resumed, self._claimed = False, False
        self._pending: list[tuple[str, dict[str, Any]]] = []  # history events before the lock
        self.train_tasks, self.val_tasks = train_tasks, val_tasks
        self.kind = train_tasks.kind
        self._check_memory(train_tasks)
        self.algo = algorithm.to(self.device)
        # Every rank builds the same weights from the same seed; copying rank 0's makes sure.
        distributed.broadcast_tensors_(
            [t for t in self.algo.state_dict().values() if t.is_floating_point()])
        self.optimizer = optimizer or torch.optim.Adam(self.algo.parameters(), lr=1e-3)
        self.scheduler = scheduler
        self.state = TrainState()
        self._val_episodes: list | None = None

    def _check_memory(self, tasks: TaskSource) -> None:
        """Refuse a meta-batch whose examples alone would not fit in the memory available,
        before anything is allocated (one task is drawn to size it)."""
        available = available_bytes(self.device)
        if available is None:
            return
        task = tasks.sample(1, torch.Generator().manual_seed(0)).task(0)
        per_task = sum(t.numel() * (4 if t.is_floating_point() else t.element_size())
                       for t in (task.support_x, task.support_y, task.query_x, task.query_y))
        needed = per_task * len(self.share)
        if needed > available:
            raise ValueError(
                f"a meta-batch of {len(self.share)} tasks holds {needed / 2**30:.1f} GiB of "
                f"examples, more than the {available / 2**30:.1f} GiB of memory available on "
                f"{self.device}; lower tasks_per_batch (task_chunk bounds the memory of the "
                f"backward pass, not of the tasks drawn).")

    @classmethod
    def from_config(cls, config: Config, progress: bool = True, overwrite: bool = False,
                    ) -> Trainer:
        """The trainer of ``config``: its task sources, algorithm, optimiser (Adam or SGD)
        and step-decay schedule, writing to ``config.out`` (``overwrite``: a run already
        there is moved aside). The test split is opened too, so that a mistake in it stops
        the run before training rather than after."""
        train_tasks = task_sources(config, config.train_split, train=True, progress=progress)
        algorithm = build(config, train_tasks)
        device = distributed.local_device(distributed.resolve_device(config.device))
        optimizer, scheduler = optimization(config, algorithm.to(device).parameters())
        val_tasks = (None if config.val_split is None else
                     task_sources(config, config.val_split, train=False, progress=progress))
        task_sources(config, config.test_split, train=False, progress=progress)
        return cls(algorithm, train_tasks, val_tasks=val_tasks, optimizer=optimizer,
                   scheduler=scheduler, steps=config.steps,
                   tasks_per_batch=config.tasks_per_batch, seed=config.seed, out=config.out,
                   val_every=config.val_every, val_episodes=config.val_episodes,
                   log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                   time_budget=config.time_budget, task_chunk=config.task_chunk,
                   grad_clip=config.grad_clip, precision=config.precision,
                   device=config.device, progress=progress, config=config,
                   overwrite=overwrite)

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """Everything needed to continue this run, or to rebuild and score its algorithm."""
        config = self.config
        return {
            "config": None if config is None else config.to_dict(),
            "algorithm": self.algo.name,
            "backbone": None if config is None else config.backbone,
            "spec": self.algo.spec.to_dict(),
            "model": self.algo.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "step": self.state.step,
            "best": self.state.best,
            "train_seconds": self.state.train_seconds,
            "cpu_seconds": self.state.cpu_seconds,
            "run_id": distributed.run_id(),  # torchrun's job id: an elastic restart resumes it
        }

    def resume(self, path: str | Path | None = None) -> None:
        """Continue from ``path`` (default ``<out>/last.pt``): weights, optimiser, step.

        Rank 0 reads the checkpoint and sends it to the other ranks: all resume from the same
        one, and other machines need no copy of it.
        """
        if path is None and self.out is None:
            raise ValueError("resume needs a checkpoint path: this trainer has no 'out' folder.")
        path = Path(path) if path else self.out / "last.pt"
        ckpt = self._read_on_rank0(path)
        if isinstance(ckpt, Exception):
            raise ckpt
        self._load(ckpt)

    def resume_restarted(self) -> bool:
        """After torchrun restarted the workers (``--max-restarts``): continue from
        ``<out>/last.pt`` if this torchrun job wrote it. Returns False, and the run starts
        afresh, if the job had written no checkpoint yet (an older run's is left alone)."""
        if self.out is None:
            return False
        ckpt = self._read_on_rank0(self.out / "last.pt")
        if isinstance(ckpt, FileNotFoundError) or (
                isinstance(ckpt, dict) and ckpt.get("run_id") != distributed.run_id()):
            return False
        if isinstance(ckpt, Exception):
            raise ckpt
        self._load(ckpt)
        return True

    def _read_on_rank0(self, path: Path) -> dict[str, Any] | Exception:
        """The compatible checkpoint at ``path`` as rank 0 read it, or the error it met, on
        every rank (so that every rank raises it, rather than waiting for rank 0)."""
        ckpt: dict[str, Any] | Exception | None = None
        if self.rank == 0:
            try:
                if not path.is_file():
                    raise FileNotFoundError(f"cannot resume: no checkpoint at {path}; "
                                            "train without --resume to start a new run.")
                ckpt = read_checkpoint(path)
                if self.config is not None:
                    check_compatible(ckpt, self.config, path)
            except (FileNotFoundError, ValueError) as error:
                ckpt = error
        return distributed.broadcast_object(ckpt)

    def _load(self, ckpt: dict[str, Any]) -> None:
        try:
            self.algo.load_state_dict(ckpt["model"])
        except RuntimeError as error:
            raise ValueError(f"the checkpoint does not fit this {self.algo.name}: {error}"
                             ) from error
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = TrainState(ckpt["step"], ckpt["best"], ckpt["train_seconds"],
                                ckpt.get("cpu_seconds", 0.0))
        self._resumed = True
        self._pending.append(("resume", {"step": self.state.step}))
        if self.config is not None and ckpt.get("config") is not None:
            self._apply_changed_settings(ckpt["config"])

    def _apply_changed_settings(self, trained: dict[str, Any]) -> None:
        """Resuming with other settings than the checkpoint's: the optimiser's (learning
        rate, weight decay, schedule) are applied to the restored optimiser state, and every
        change is recorded in the run's history; another optimiser is refused."""
        config = self.config
        changed = {key: [trained.get(key), value] for key, value in config.to_dict().items()
                   if key != "out" and trained.get(key) != value}
        if not changed:
            return
        if "optimizer" in changed:
            raise ValueError(f"cannot resume a run trained with {trained['optimizer']} with "
                             f"{config.optimizer}: its state does not carry over; start a new "
                             f"run (--out) or keep optimizer={trained['optimizer']}.")
        for group in self.optimizer.param_groups:
            group["weight_decay"] = config.weight_decay
            group["initial_lr"] = config.lr
        if isinstance(self.scheduler, torch.optim.lr_scheduler.StepLR):
            self.scheduler.step_size = config.lr_decay_every or 10**12
            self.scheduler.gamma = config.lr_decay
            self.scheduler.base_lrs = [config.lr] * len(self.optimizer.param_groups)
            decays = self.scheduler.last_epoch // self.scheduler.step_size
            for group in self.optimizer.param_groups:
                group["lr"] = config.lr * config.lr_decay ** decays
        self._pending.append(("settings-changed", {"changes": changed}))
        if self.progress:
            print("resuming with changed settings (now applied): " + ", ".join(
                f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items()),
                file=sys.stderr)

    def _claim_folder(self) -> None:
        """Rank 0 locks the output folder for this run (:mod:`metalab.runfolder`), cleans
        what a crash left, and truncates the log to the resumed step; a refusal is raised on
        every rank."""
        error: Exception | None = None
        restarted = distributed.restarted()  # a collective: every rank asks
        if self.rank == 0 and self.folder is not None:
            mode = ("continue" if self._claimed else "resume" if self._resumed else
                    "restart" if restarted else "overwrite" if self.overwrite else "new")
            try:
                for message in self.folder.claim(mode):
                    if self.progress:
                        print(f"metalab: {message}", file=sys.stderr)
                if not self._claimed:
                    if not self._resumed:
                        self._pending.insert(0, ("start", {"steps": self.steps}))
                    for event, details in self._pending:
                        self.folder.record(event, **details)
                    self._pending.clear()
                    self._truncate_log(self.state.step)
            except (RunFolderError, ValueError) as failure:
                self.folder.release()  # a no-op when the lock was never taken
                error = failure
        error = distributed.broadcast_object(error)
        if error is not None:
            raise error
        self._claimed = True

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the step we continue from (they will be redone), and
        a damaged last line (an interrupted write), saying so."""
        log = self.out / "log.jsonl"
        if not log.exists():
            return
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):
                    raise ValueError(f"{log}, line {number}, is not JSON ({line[:60]!r}); "
                                     "repair or remove that line, then resume.") from None
                message = f"dropped the damaged last line of {log} (an interrupted write)"
                self.folder.record("notice", message=message)
                if self.progress:
                    print(f"metalab: {message}", file=sys.stderr)
                continue
            if record["step"] <= step:
                kept.append(line)
        atomic_write_text("".join(line + "\n" for line in kept), log)

    def _save(self, *names: str) -> None:
        """Rank 0 writes the checkpoint under ``names``; the other ranks wait for it."""
        if self.rank == 0 and self.out is not None:
            ckpt = self.checkpoint()
            for name in names:
                save_checkpoint(ckpt, self.out / name)
        distributed.barrier()

    # -- the loop ----------------------------------------------------------------------------

    def validation_episodes(self) -> list:
        if self._val_episodes is None:
            self._val_episodes = fixed_episodes(self.val_tasks, self.val_episodes, VAL_SEED)
        return self._val_episodes

    def validate(self) -> EvalResult:
        """Scores on the fixed validation episodes, shared out between the ranks (every rank
        gets the result, the same as one process scoring them all)."""
        return distributed.evaluate_sharded(self.algo, self.validation_episodes(), self.kind,
                                            self.device)

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0 and self.out is not None:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def fit(self, steps: int | None = None) -> TrainState:
        """Train ``steps`` more steps (default: until the trainer's ``steps``), or until the
        training steps have taken ``time_budget`` seconds; returns the state. Every call ends
        with a validation and a checkpoint, and the next call continues from there exactly as
        one longer call would. Raises TrainingDiverged."""
        target = self.steps if steps is None else self.state.step + steps
        self._claim_folder()
        try:
            return self._fit(target)
        except TrainingDiverged as error:
            self._record("stopped", step=self.state.step, reason=str(error))
            raise
        finally:
            if self.rank == 0 and self.folder is not None:
                done = self.state.step >= self.steps
                self._record("finished" if done else "paused", step=self.state.step)
                self.folder.release()

    def _record(self, event: str, **details: Any) -> None:
        if self.rank == 0 and self.folder is not None:
            self.folder.record(event, **details)

    def _fit(self, target: int) -> TrainState:
        if self.rank == 0 and self.out is not None:
            if self.config is not None:
                atomic_write_text(json.dumps(self.config.to_dict(), indent=2) + "\n",
                                  self.out / "config.json")
        self.algo.train()
        bar = tqdm(total=target, initial=self.state.step, desc=self.algo.name,
                   disable=not self.progress, dynamic_ncols=True)
        sums: dict[str, float] = {}
        summed = 0  # steps in ``sums`` (fewer than log_every after resuming between log steps)
        marks_done = min(int(self._budget_used() * BUDGET_VALIDATIONS), BUDGET_VALIDATIONS)
        while self.state.step < target:
            step = self.state.step
            started, started_cpu = time.perf_counter(), time.process_time()
            torch.manual_seed(self.seed * 1_000_003 + step)  # any randomness inside the model
            batch = sample_tasks(self.train_tasks, self.seed, step, self.share)
            self.optimizer.zero_grad(set_to_none=True)
            try:
                loss, metrics = self._meta_backward(batch.to(self.device))
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not isinstance(error, torch.OutOfMemoryError) and (
                        "allocate" not in str(error)):
                    raise
                bar.close()
                raise ValueError(
                    f"training step {step + 1} ran out of memory on {self.device} with "
                    f"{len(self.share)} tasks per step; back-propagate fewer tasks at a time "
                    f"(--set task_chunk=4: the same gradient) or lower tasks_per_batch. "
                    f"The last checkpoint is kept; add --resume to continue from it.") \
                    from error
            if not math.isfinite(loss):
                bar.close()
                raise TrainingDiverged(self._diverged_message(step, loss))
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.algo.parameters(), self.grad_clip)
            self.optimizer.step()
            if nonfinite_tensors(self.algo):
                bar.close()
                raise TrainingDiverged(self._diverged_message(step, "weights"))
            if self.scheduler is not None:
                self.scheduler.step()
            self.state.step += 1
            self.state.train_seconds += time.perf_counter() - started
            self.state.cpu_seconds += time.process_time() - started_cpu

            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value
            summed += 1
            budget_used = self._budget_used()
            last_step = self.state.step == target or budget_used >= 1
            # a budgeted run also validates at each fifth of its budget (learning curves)
            budget_mark = min(int(budget_used * BUDGET_VALIDATIONS), BUDGET_VALIDATIONS)
            if self.state.step % self.log_every == 0 or last_step:
                means = {k: v / summed for k, v in sums.items()}
                self._log({"step": self.state.step, "lr": self._learning_rate(),
                           "train_seconds": round(self.state.train_seconds, 3),
                           "cpu_seconds": round(self.state.cpu_seconds, 3), **means})
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
                sums, summed = {}, 0
            bar.update()
            if self.state.step % self.val_every == 0 or last_step or budget_mark > marks_done:
                self._validate_and_save()
                marks_done = budget_mark
            elif self.checkpoint_every and self.state.step % self.checkpoint_every == 0:
                self._save("last.pt")
            if last_step:
                break
        bar.close()
        return self.state

    def _meta_backward(self, batch: TaskBatch | RaggedTaskBatch) -> tuple[float, dict[str, float]]:
        """:func:`meta_backward` of this rank's share of the step; with several ranks, then
        the whole meta-batch's gradient, buffers, loss and metrics on every rank."""
        if self.world_size == 1:
            return meta_backward(self.algo, batch, self.task_chunk, self.precision)
        start = [b.clone() for b in distributed.floating_buffers(self.algo)]
        loss, metrics = meta_backward(self.algo, batch, self.task_chunk, self.precision)
        return distributed.reduce_step(self.algo, loss, metrics,
                                       len(batch) / self.tasks_per_batch, start)

    def _budget_used(self) -> float:
        """The share of ``time_budget`` the training steps have taken (0 without a budget);
        with several ranks, rank 0's clock decides for all, so that they act at the same
        step."""
        if not self.time_budget:
            return 0.0
        used = torch.tensor([self.state.train_seconds / self.time_budget],
                            dtype=torch.float64, device=self.device)
        distributed.broadcast_tensors_([used])
        return used.item()

    def _validate_and_save(self) -> None:
        if self.val_tasks is None:  # nothing to select on: the latest weights are best
            self._save("last.pt", "best.pt")
            return
        result = self.validate()
        if not math.isfinite(result.mean):
            message = (f"validation {result.metric} is {result.mean} at step "
                       f"{self.state.step}: best.pt is not updated")
            self._record("notice", message=message)
            if self.progress:
                print(f"metalab: {message}", file=sys.stderr)
        better = self.kind.better(result.mean, self.state.best)
        if better:
            self.state.best = result.mean
        self._log({"step": self.state.step, f"val_{result.metric}": result.mean,
                   "val_ci95": result.ci95, "train_seconds": round(self.state.train_seconds, 3)})
        self._save("last.pt", *(["best.pt"] if better else []))

    def _diverged_message(self, step: int, value: float | str) -> str:
        last = self.out / "last.pt" if self.out is not None else None
        kept = (f"the last good checkpoint {last} (step {read_checkpoint(last)['step']}) is kept"
                if last is not None and last.exists() else "no checkpoint had been written yet")
        what = "the weights became non-finite" if isinstance(value, str) else (
            f"the loss became {value}")
        return (f"training stopped: {what} at step {step + 1}; {kept}. "
                "Lower lr or set grad_clip (e.g. --set grad_clip=1.0), then rerun; "
                "with a checkpoint, add --resume to continue from it.")


def meta_backward(
    algo: MetaLearner, batch: TaskBatch | RaggedTaskBatch, task_chunk: int = 0,
    precision: str = "fp32",
) -> tuple[float, dict[str, float]]:
    """Meta-loss of ``batch``, with its gradient added to the parameters' ``.grad``.

    With ``task_chunk`` > 0 the tasks are back-propagated ``task_chunk`` at a time and the
    gradients accumulate, weighted by chunk size: the same gradient as one pass, with the
    memory of one chunk. A :class:`~metalab.tasks.RaggedTaskBatch` is padded in one batch for
    an algorithm that honours the masks (``pads_tasks``) on a network that does not normalise
    over its batch, else computed one dense group of equal-size tasks
    (:meth:`~metalab.tasks.RaggedTaskBatch.groups`) at a time: either way the mean over its
    tasks, as if each were computed alone. Every chunk starts from
    the step's buffers (BatchNorm running statistics), which end as the chunk-weighted mean
    of what the chunks left, as one pass leaves them (see :mod:`metalab.algorithms.pertask`).
    Stops at the first chunk whose loss is not finite and returns that loss.
    """
    groups = [batch]
    if isinstance(batch, RaggedTaskBatch):
        padded = batch.padded() if algo.pads_tasks and not normalises_over_batch(algo) else None
        groups = [padded] if padded is not None else [group for _, group in batch.groups()]
    parts = []
    for group in groups:
        chunk = task_chunk or len(group)
        parts += [group[start:start + chunk] for start in range(0, len(group), chunk)]
    weights = [len(part) / len(batch) for part in parts]
    total, sums, stopped = 0.0, {}, None

    def backward(index: int) -> None:
        nonlocal total, stopped
        if stopped is not None:
            return
        part = parts[index]
        device_type = part.support_x.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, metrics = algo.meta_loss(part)
        value = loss.item()
        if not math.isfinite(value):
            stopped = value, metrics
            return
        (loss * weights[index]).backward()
        total += value * weights[index]
        for key, metric in metrics.items():
            sums[key] = sums.get(key, 0.0) + metric * weights[index]

    each_task(algo, len(parts), backward, weights)
    return stopped if stopped is not None else (total, sums)
