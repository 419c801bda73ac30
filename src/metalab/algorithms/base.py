"""The two-method interface every meta-learner implements, and the registry of them.

    loss, metrics = algo.meta_loss(batch)        # TaskBatch of T tasks -> differentiable loss
    predictor = algo.adapt(support_x, support_y)  # fast adaptation to ONE task
    predictor(query_x)                            # logits (classification) or predictions

``adapt`` never mutates the algorithm: everything specific to the task (prototypes, adapted
weights, encoded memory) lives in the returned predictor. Call ``algo.eval()`` before
adapting so that BatchNorm uses its running statistics and does not update them.

A new algorithm is one file: subclass :class:`MetaLearner`, set ``name`` and ``family``, and
decorate it with :func:`register`. The trainer, evaluator, comparison and CLI only ever call
``meta_loss`` and ``adapt``.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metalab.kinds import CLASSIFICATION, TaskKind, get_kind
from metalab.tasks import TaskBatch, TaskSource

__all__ = [
    "ALGORITHMS",
    "MetaLearner",
    "Predictor",
    "TaskSpec",
    "build_algorithm",
    "check_n_way",
    "option_parameters",
    "register",
    "task_spec",
]

Predictor = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TaskSpec:
    """What an algorithm needs to know about its tasks to build its layers.

    ``kind`` is the :class:`~metalab.kinds.TaskKind` (a registered kind's name is accepted),
    ``n_way`` the number of classes per training task (0 when targets are values),
    ``num_classes`` the number of meta-training classes (used by the fine-tune baseline),
    ``input_shape`` and ``input_dtype`` describe one example (integer ids for embeddings),
    ``output_dim`` the size of a value target.
    """

    kind: TaskKind = CLASSIFICATION
    n_way: int = 5
    input_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 0
    output_dim: int = 1
    input_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", get_kind(self.kind))
        object.__setattr__(self, "input_shape", tuple(self.input_shape))

    @property
    def outputs(self) -> int:
        """Outputs per query of a predictor for these tasks (classes or target size)."""
        return self.kind.output_size(self.n_way, self.output_dim)

    def example(self, batch: int = 2) -> Tensor:
        """A batch of zero inputs, e.g. to find a backbone's feature shape by a dry run."""
        return torch.zeros(batch, *self.input_shape, dtype=self.input_dtype)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (kind and dtype by name), as checkpoints store them."""
        return {**asdict(self), "kind": self.kind.name, "input_shape": list(self.input_shape),
                "input_dtype": str(self.input_dtype).removeprefix("torch.")}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TaskSpec:
        dtype = getattr(torch, values.get("input_dtype", "float32"))
        return cls(**{**values, "input_dtype": dtype})


def check_n_way(n_way: int, trained_n_way: int, name: str) -> None:
    """A learner with one output per class of its training tasks cannot classify a task with
    another number of classes: an error that says so."""
    if n_way != trained_n_way:
        raise ValueError(f"this {name} model was trained for {trained_n_way}-way tasks and "
                         f"cannot classify {n_way}-way tasks; evaluate it on "
                         f"{trained_n_way}-way tasks or train one for {n_way}-way tasks.")


def task_spec(source: TaskSource) -> TaskSpec:
    """What an algorithm must know to learn ``source``'s tasks, read from one task it draws
    (a fixed generator: the global random state is not touched)."""
    probe = source.sample(1, torch.Generator().manual_seed(0))
    task = probe.task(0)
    kind = source.kind
    spec = TaskSpec(kind=kind, n_way=0, input_shape=tuple(task.support_x.shape[1:]),
                    num_classes=getattr(source, "num_classes", 0),
                    input_dtype=task.support_x.dtype)
    if kind.classes:
        n_way = probe.n_way if isinstance(probe, TaskBatch) else int(task.support_y.max()) + 1
        return replace(spec, n_way=getattr(source, "n_way", n_way))
    return replace(spec, output_dim=task.support_y.shape[-1])


class MetaLearner(nn.Module, ABC):
    """Base class of every algorithm: an ``nn.Module`` with ``meta_loss`` and ``adapt``."""

    name: str = ""
    family: str = ""  # "metric", "optimization", "model" or "baseline"
    spec: TaskSpec  # the tasks it was built for
    kind: TaskKind  # spec.kind: the loss, score and outputs of those tasks
    # Options that do not change the weights (e.g. test-time steps): a checkpoint may be
    # evaluated with other values than it was trained with.
    runtime_options: tuple[str, ...] = ()
    # The common checks (metalab.testing): options of a small, quick instance per task kind
    # ("*": every kind), backbone options it needs, and {check (or "check:kind"): reason}
    # for checks that do not apply.
    check_options: ClassVar[dict[str, dict[str, Any]]] = {}
    # True if meta_loss honours a padded batch's support_mask / query_mask (tasks of
    # different sizes in one call); otherwise such tasks come in groups of equal sizes.
    pads_tasks: ClassVar[bool] = False
    # True if its outputs are sized for the training tasks' number of classes (a fixed head)
    fixed_ways: ClassVar[bool] = False
    check_backbone_options: ClassVar[dict[str, Any]] = {}
    check_exemptions: ClassVar[dict[str, str]] = {}

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__()
        self.spec = spec
        self.kind = spec.kind

    @classmethod
    def supports(cls, kind: TaskKind) -> bool:
        """Whether the algorithm can learn tasks of ``kind``. By default: tasks whose
        targets are classes (the metric family, most model-based learners)."""
        return kind.classes

    @abstractmethod
    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """Differentiable loss of a meta-batch, and metrics (floats) for the log: the mean
        over its tasks. (A :class:`~metalab.tasks.RaggedTaskBatch` goes through
        :func:`metalab.train.meta_backward`, which hands it here padded, if ``pads_tasks``,
        or as groups of equal-size tasks.)"""

    @abstractmethod
    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """A predictor for the task described by one support set (no task dimension)."""

    def check_ways(self, n_way: int) -> None:
        """Raise a clear error if this model cannot classify ``n_way``-way tasks (a head
        sized for its training tasks); call before evaluating or adapting."""
        if self.fixed_ways and self.kind.classes:
            check_n_way(n_way, self.spec.n_way, self.name)

    def adaptation_steps(self) -> int:
        """Gradient steps taken by :meth:`adapt` (0 for metric and model-based methods)."""
        return 0


ALGORITHMS: dict[str, type[MetaLearner]] = {}


def register(cls: type[MetaLearner]) -> type[MetaLearner]:
    """Class decorator adding an algorithm to :data:`ALGORITHMS` under ``cls.name``."""
    if not cls.name or cls.family not in {"metric", "optimization", "model", "baseline"}:
        raise TypeError(f"{cls.__name__} needs a name and a family to be registered.")
    if cls.name in ALGORITHMS and ALGORITHMS[cls.name] is not cls:
        raise ValueError(f"an algorithm named {cls.name!r} is already registered.")
    ALGORITHMS[cls.name] = cls
    return cls


def option_parameters(cls: type[MetaLearner]) -> dict[str, inspect.Parameter]:
    """The keyword options of algorithm class ``cls`` (its ``__init__`` after ``backbone``
    and ``spec``), by name: those of the classes it extends too where its ``__init__`` passes
    ``**options`` on to theirs (a variant adds options, it does not restate its parent's)."""
    options: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        options.update({p.name: p for p in parameters if p.name not in options
                        and p.name not in ("self", "backbone", "spec")
                        and p.kind is not inspect.Parameter.VAR_KEYWORD})
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    return options


def build_algorithm(
    name: str, backbone: nn.Module, spec: TaskSpec, **options: object
) -> MetaLearner:
    """Instantiate the registered algorithm ``name`` around ``backbone``.

    ``options`` are the algorithm's own keyword arguments; an unknown one is an error that
    lists the valid ones.
    """
    if name not in ALGORITHMS:
        raise ValueError(
            f"unknown algorithm {name!r}; registered algorithms: {', '.join(sorted(ALGORITHMS))}."
        )
    cls = ALGORITHMS[name]
    if not cls.supports(spec.kind):
        able = sorted(n for n, c in ALGORITHMS.items() if c.supports(spec.kind))
        raise ValueError(
            f"{name} cannot learn {spec.kind.name} tasks; algorithms that can: "
            f"{', '.join(able) or '(none)'}."
        )
    valid = list(option_parameters(cls))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for algorithm {name}; "
            f"valid options: {', '.join(valid) or '(none)'}."
        )
    return cls(backbone, spec, **options)
