"""Meta-training any registered algorithm: meta-batches, Adam, validation, checkpoints, resume.

The loop reads top to bottom::

    for step in range(start, steps):
        batch = sample_tasks(train_tasks, seed, step, share)  # task i: (seed, step, i)
        loss, metrics = meta_backward(algo, batch)   # algo.meta_loss(batch), then backward
        (several processes: one all-reduce adds the ranks' gradients, weighted by share)
        optimizer.step()
        every val_every steps: score fixed validation episodes, write last.pt (and best.pt)

Task ``i`` of step ``s`` comes from a generator seeded by ``(seed, s, i)``, so ``--resume``
from ``last.pt`` continues exactly the trajectory of an uninterrupted run, and a run split over
``P`` processes (torchrun, :mod:`metalab.distributed`), where each process draws only its
``share`` of the tasks, trains on exactly the tasks of a one-process run with the same
``tasks_per_batch``. (Earlier versions drew a whole step from one generator seeded by
``(seed, s)``: the same seed now gives other tasks than it did then.) Checkpoints are written
atomically, by rank 0 alone, and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metalab import data, distributed
from metalab.algorithms import ALGORITHMS, MetaLearner, TaskSpec, build_algorithm
from metalab.algorithms.pertask import each_task
from metalab.config import Config
from metalab.evaluate import EvalResult, evaluate
from metalab.io import atomic_save, atomic_write_text
from metalab.models import build_backbone, use_batch_statistics
from metalab.tasks import TaskBatch, TaskSource, fixed_episodes, sample_tasks

__all__ = [
    "TEST_SEED",
    "VAL_SEED",
    "Trainer",
    "TrainingDiverged",
    "build",
    "load_checkpoint",
    "meta_backward",
    "read_checkpoint",
    "resolve_device",
    "score_checkpoint",
    "task_spec",
]

VAL_SEED = 1234  # the fixed validation episodes
TEST_SEED = 1  # the fixed test episodes (as in the MAML reference code)
CHECKPOINT_FORMAT = 1
BUDGET_VALIDATIONS = 5  # a run with a time_budget validates after each fifth of it


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def task_sources(config: Config, split: str, train: bool) -> TaskSource:
    """The task source of ``split`` with the training or the test episode sizes."""
    sizes = ((config.n_way, config.k_shot, config.q_query) if train else
             (config.test_n_way, config.test_k_shot, config.test_q_query))
    fraction = config.train_fraction if train else 1.0
    return data.task_source(config.dataset, split, *sizes, data_dir=config.data_dir,
                            class_fraction=fraction, seed=config.seed, **config.dataset_options)


def task_spec(config: Config, train_source: TaskSource) -> TaskSpec:
    """What the algorithm must know about ``train_source``'s tasks to build its layers."""
    if train_source.kind == "classification":
        dataset = train_source.dataset
        return TaskSpec(kind="classification", n_way=config.n_way,
                        input_shape=dataset.example_shape, num_classes=dataset.num_classes)
    probe = train_source.sample(1, torch.Generator().manual_seed(0))
    return TaskSpec(kind="regression", n_way=0, input_shape=tuple(probe.support_x.shape[2:]),
                    output_dim=probe.support_y.shape[-1])


def build(config: Config, spec: TaskSpec) -> MetaLearner:
    """The algorithm and backbone the config names, sized for tasks described by ``spec``."""
    torch.manual_seed(config.seed)
    backbone = build_backbone(config.backbone, spec.input_shape, **config.backbone_options)
    return build_algorithm(config.algorithm, backbone, spec, **config.algorithm_options)


@dataclass
class TrainState:
    step: int = 0
    best: float | None = None  # best validation score (higher accuracy / lower mse)
    train_seconds: float = 0.0  # wall-clock time of the training steps (not validation)
    cpu_seconds: float = 0.0  # CPU time of those steps, all threads (robust to a busy machine)


class Trainer:
    """Trains ``config``'s algorithm, writing ``log.jsonl``, ``last.pt`` and ``best.pt`` to
    ``config.out``.

    In a process group (torchrun, see :mod:`metalab.distributed`) every rank trains on its
    share of each step's tasks and the ranks take identical optimiser steps; rank 0 alone
    logs, shows progress and writes checkpoints, and validation is shared out between ranks.
    """

    def __init__(self, config: Config, progress: bool = True) -> None:
        self.config = config
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.share = distributed.task_share(config.tasks_per_batch, self.rank, self.world_size)
        self.progress = progress and self.rank == 0
        self.device = distributed.local_device(resolve_device(config.device))
        if self.device.type == "cuda":  # same seed, same weights: no autotuned, racy kernels
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        self.out = Path(config.out)
        self.train_tasks = task_sources(config, config.train_split, train=True)
        self.kind = self.train_tasks.kind
        self.spec = task_spec(config, self.train_tasks)
        self.algo = build(config, self.spec).to(self.device)
        # build() seeds every rank alike; copying rank 0's weights makes sure of it.
        distributed.broadcast_tensors_(
            [t for t in self.algo.state_dict().values() if t.is_floating_point()])
        optimizers = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
        self.optimizer = optimizers[config.optimizer](
            self.algo.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=config.lr_decay_every or 10**12, gamma=config.lr_decay)
        self.state = TrainState()
        self._val_episodes = None

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "algorithm": self.config.algorithm,
            "backbone": self.config.backbone,
            "spec": {**dataclasses.asdict(self.spec),
                     "input_shape": list(self.spec.input_shape)},
            "model": self.algo.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
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
        path = Path(path) if path else self.out / "last.pt"
        ckpt = self._read_on_rank0(path)
        if isinstance(ckpt, Exception):
            raise ckpt
        self._load(ckpt)

    def resume_restarted(self) -> bool:
        """After torchrun restarted the workers (``--max-restarts``): continue from
        ``<out>/last.pt`` if this torchrun job wrote it. Returns False, and the run starts
        afresh, if the job had written no checkpoint yet (an older run's is left alone)."""
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
                check_compatible(ckpt, self.config, path)
            except (FileNotFoundError, ValueError) as error:
                ckpt = error
        return distributed.broadcast_object(ckpt)

    def _load(self, ckpt: dict[str, Any]) -> None:
        self.algo.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = TrainState(ckpt["step"], ckpt["best"], ckpt["train_seconds"],
                                ckpt.get("cpu_seconds", 0.0))
        if self.rank == 0:
            self._truncate_log(self.state.step)

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be redone)."""
        log = self.out / "log.jsonl"
        if log.exists():
            kept = [line for line in log.read_text().splitlines()
                    if line and json.loads(line)["step"] <= step]
            atomic_write_text("".join(line + "\n" for line in kept), log)

    def _save(self, *names: str) -> None:
        """Rank 0 writes the checkpoint under ``names``; the other ranks wait for it."""
        if self.rank == 0:
            ckpt = self.checkpoint()
            for name in names:
                atomic_save(ckpt, self.out / name)
        distributed.barrier()

    # -- the loop ----------------------------------------------------------------------------

    def validation_episodes(self) -> list:
        if self._val_episodes is None:
            source = task_sources(self.config, self.config.val_split, train=False)
            self._val_episodes = fixed_episodes(source, self.config.val_episodes, VAL_SEED)
        return self._val_episodes

    def validate(self) -> EvalResult:
        """Scores on the fixed validation episodes, shared out between the ranks (every rank
        gets the result, the same as one process scoring them all)."""
        return distributed.evaluate_sharded(self.algo, self.validation_episodes(), self.kind,
                                            self.device)

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self) -> TrainState:
        """Train until ``config.steps``, or until the training steps have taken
        ``config.time_budget`` seconds; returns the final state. Raises TrainingDiverged."""
        cfg = self.config
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json.dumps(cfg.to_dict(), indent=2) + "\n",
                              self.out / "config.json")
        self.algo.train()
        bar = tqdm(total=cfg.steps, initial=self.state.step, desc=cfg.algorithm,
                   disable=not self.progress, dynamic_ncols=True)
        sums: dict[str, float] = {}
        summed = 0  # steps in ``sums`` (fewer than log_every after resuming between log steps)
        marks_done = min(int(self._budget_used() * BUDGET_VALIDATIONS), BUDGET_VALIDATIONS)
        while self.state.step < cfg.steps:
            step = self.state.step
            started, started_cpu = time.perf_counter(), time.process_time()
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # any randomness inside the model
            batch = sample_tasks(self.train_tasks, cfg.seed, step, self.share)
            self.optimizer.zero_grad(set_to_none=True)
            loss, metrics = self._meta_backward(batch.to(self.device))
            if not math.isfinite(loss):
                bar.close()
                raise TrainingDiverged(self._diverged_message(step, loss))
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.algo.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.state.step += 1
            self.state.train_seconds += time.perf_counter() - started
            self.state.cpu_seconds += time.process_time() - started_cpu

            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value
            summed += 1
            budget_used = self._budget_used()
            last_step = self.state.step == cfg.steps or budget_used >= 1
            # a budgeted run also validates at each fifth of its budget (learning curves)
            budget_mark = min(int(budget_used * BUDGET_VALIDATIONS), BUDGET_VALIDATIONS)
            if self.state.step % cfg.log_every == 0 or last_step:
                means = {k: v / summed for k, v in sums.items()}
                self._log({"step": self.state.step, "lr": self.scheduler.get_last_lr()[0],
                           "train_seconds": round(self.state.train_seconds, 3),
                           "cpu_seconds": round(self.state.cpu_seconds, 3), **means})
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
                sums, summed = {}, 0
            bar.update()
            if self.state.step % cfg.val_every == 0 or last_step or budget_mark > marks_done:
                self._validate_and_save()
                marks_done = budget_mark
            elif cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                self._save("last.pt")
            if last_step:
                break
        bar.close()
        return self.state

    def _meta_backward(self, batch: TaskBatch) -> tuple[float, dict[str, float]]:
        """:func:`meta_backward` of this rank's share of the step; with several ranks, then
        the whole meta-batch's gradient, buffers, loss and metrics on every rank."""
        cfg = self.config
        if self.world_size == 1:
            return meta_backward(self.algo, batch, cfg.task_chunk, cfg.precision)
        start = [b.clone() for b in floating_buffers(self.algo)]
        loss, metrics = meta_backward(self.algo, batch, cfg.task_chunk, cfg.precision)
        return reduce_step(self.algo, loss, metrics, len(batch) / cfg.tasks_per_batch, start)

    def _budget_used(self) -> float:
        """The share of ``time_budget`` the training steps have taken (0 without a budget);
        with several ranks, rank 0's clock decides for all, so that they act at the same
        step."""
        if not self.config.time_budget:
            return 0.0
        used = torch.tensor([self.state.train_seconds / self.config.time_budget],
                            dtype=torch.float64, device=self.device)
        distributed.broadcast_tensors_([used])
        return used.item()

    def _validate_and_save(self) -> None:
        if self.config.val_split is None:  # nothing to select on: the latest weights are best
            self._save("last.pt", "best.pt")
            return
        result = self.validate()
        better = (self.state.best is None or
                  (result.mean > self.state.best if result.metric == "accuracy"
                   else result.mean < self.state.best))
        if better:
            self.state.best = result.mean
        self._log({"step": self.state.step, f"val_{result.metric}": result.mean,
                   "val_ci95": result.ci95, "train_seconds": round(self.state.train_seconds, 3)})
        self._save("last.pt", *(["best.pt"] if better else []))

    def _diverged_message(self, step: int, value: float) -> str:
        last = self.out / "last.pt"
        kept = (f"the last good checkpoint {last} (step {read_checkpoint(last)['step']}) is kept"
                if last.exists() else "no checkpoint had been written yet")
        return (f"training stopped: the loss became {value} at step {step + 1}; {kept}. "
                "Lower lr or set grad_clip (e.g. --set grad_clip=1.0), then rerun; "
                "with a checkpoint, add --resume to continue from it.")


def meta_backward(
    algo: MetaLearner, batch: TaskBatch, task_chunk: int = 0, precision: str = "fp32",
) -> tuple[float, dict[str, float]]:
    """Meta-loss of ``batch``, with its gradient added to the parameters' ``.grad``.

    With ``task_chunk`` > 0 the tasks are back-propagated ``task_chunk`` at a time and the
    gradients accumulate, weighted by chunk size: the same gradient as one pass, with the
    memory of one chunk. Every chunk starts from the step's buffers (BatchNorm running
    statistics), which end as the chunk-weighted mean of what the chunks left, as one pass
    leaves them (see :mod:`metalab.algorithms.pertask`). Stops at the first chunk whose loss
    is not finite and returns that loss.
    """
    chunk = task_chunk or len(batch)
    parts = [batch[start:start + chunk] for start in range(0, len(batch), chunk)]
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
    distributed.weighted_sum_([*grads, *changes, scalars], weight)
    has_grad = scalars[1 + len(names):].tolist()
    for p, grad, given in zip(params, grads, has_grad, strict=True):
        p.grad = grad if given else None
    for b, b0, change in zip(buffers, start, changes, strict=True):
        b.copy_(b0 + change)
    values = scalars[:1 + len(names)].tolist()
    return values[0], dict(zip(names, values[1:], strict=True))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a metalab checkpoint safely (``weights_only=True``) and check its format."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; 'metalab train CONFIG' writes "
                                "best.pt and last.pt to the config's 'out' folder.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated or not a torch file
        raise ValueError(f"{path} is not a readable metalab checkpoint ({error}).") from error
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a metalab checkpoint (format {CHECKPOINT_FORMAT}).")
    return ckpt


def check_compatible(ckpt: dict[str, Any], config: Config, path: str | Path) -> None:
    """A checkpoint can only continue a run of the same algorithm and backbone."""
    for key in ("algorithm", "backbone"):
        if ckpt[key] != getattr(config, key):
            raise ValueError(
                f"{path} holds a {ckpt[key]} {key}, but the config asks for "
                f"{getattr(config, key)}; use that checkpoint's config, or a new 'out' folder.")
    runtime = getattr(ALGORITHMS.get(config.algorithm), "runtime_options", ())
    for key in ("algorithm_options", "backbone_options"):
        trained = {k: v for k, v in ckpt["config"][key].items() if k not in runtime}
        wanted = {k: v for k, v in getattr(config, key).items() if k not in runtime}
        if trained != wanted:
            raise ValueError(
                f"{path} was trained with {key}={ckpt['config'][key]}, but the config has "
                f"{getattr(config, key)}; they must match to load its weights.")


def load_checkpoint(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[MetaLearner, Config]:
    """The trained algorithm in ``path`` (in eval mode) and the config that trained it.

    ``overrides`` change config fields that do not affect the weights (e.g. ``test_n_way``);
    ``algorithm_options`` in it are merged into the trained ones and may only name the
    algorithm's ``runtime_options`` (e.g. MAML's ``test_inner_steps``).
    """
    ckpt = read_checkpoint(path)
    overrides = dict(overrides or {})
    options = overrides.pop("algorithm_options", {})
    runtime = getattr(ALGORITHMS.get(ckpt["algorithm"]), "runtime_options", ())
    fixed = sorted(set(options) - set(runtime))
    if fixed:
        raise ValueError(f"{', '.join(fixed)} cannot change after training {ckpt['algorithm']}; "
                         f"options that can: {', '.join(runtime) or '(none)'}.")
    values = {**ckpt["config"], **overrides}
    values["algorithm_options"] = {**ckpt["config"]["algorithm_options"], **options}
    config = Config.from_dict(values, source=str(path))
    check_compatible(ckpt, config, path)
    spec = TaskSpec(**{**ckpt["spec"], "input_shape": tuple(ckpt["spec"]["input_shape"])})
    algo = build(config, spec)
    try:
        algo.load_state_dict(ckpt["model"])
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit {config.algorithm} with backbone "
                         f"{config.backbone}: {error}") from error
    return algo.eval(), config


def score_checkpoint(
    path: str | Path, overrides: dict[str, Any] | None = None, episodes: int | None = None,
    seed: int = TEST_SEED, progress: bool = False, transductive: bool = False,
) -> tuple[MetaLearner, Config, EvalResult]:
    """The checkpoint's algorithm scored on fixed test episodes of its config's test split.

    ``overrides`` change test settings (e.g. ``test_n_way``); ``episodes`` defaults to the
    config's ``test_episodes``. ``transductive`` makes every BatchNorm normalise each batch it
    sees with that batch's statistics (the MAML convention; each call of the backbone is a
    batch, e.g. a task's support set, then its queries together) instead of the running
    statistics of training. Runs on the config's device.
    """
    algo, config = load_checkpoint(path, overrides)
    if transductive and getattr(algo, "batch_norm", "running") == "support":
        raise ValueError(f"{path} normalises every task with its support set's statistics "
                         f"(batch_norm: support), in training and at test; batch statistics "
                         f"do not apply to it. Evaluate it without --transductive-bn.")
    if transductive:
        use_batch_statistics(algo)
    device = resolve_device(config.device)
    source = task_sources(config, config.test_split, train=False)
    tasks = fixed_episodes(source, episodes or config.test_episodes, seed)
    return algo, config, evaluate(algo.to(device), tasks, source.kind, device, progress)
