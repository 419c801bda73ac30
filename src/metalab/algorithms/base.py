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

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from metalab.tasks import TaskBatch

__all__ = [
    "ALGORITHMS",
    "MetaLearner",
    "Predictor",
    "TaskSpec",
    "build_algorithm",
    "register",
]

Predictor = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TaskSpec:
    """What an algorithm needs to know about its tasks to build its layers.

    ``n_way`` is the number of classes per training task (0 for regression),
    ``num_classes`` the number of meta-training classes (used by the fine-tune baseline),
    ``input_shape`` the shape of one example and ``output_dim`` the regression target size.
    """

    kind: str = "classification"
    n_way: int = 5
    input_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 0
    output_dim: int = 1


class MetaLearner(nn.Module, ABC):
    """Base class of every algorithm: an ``nn.Module`` with ``meta_loss`` and ``adapt``."""

    name: str = ""
    family: str = ""  # "metric", "optimization", "model" or "baseline"
    kinds: tuple[str, ...] = ("classification",)  # task kinds the algorithm supports
    spec: TaskSpec  # set by build_algorithm: the tasks it was built for
    # Options that do not change the weights (e.g. test-time steps): a checkpoint may be
    # evaluated with other values than it was trained with.
    runtime_options: tuple[str, ...] = ()

    @abstractmethod
    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """Differentiable loss of a meta-batch, and metrics (floats) for the log."""

    @abstractmethod
    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """A predictor for the task described by one support set (no task dimension)."""

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


def build_algorithm(
    name: str, backbone: nn.Module, spec: TaskSpec, **options: object
) -> MetaLearner:
    """Instantiate the registered algorithm ``name`` around ``backbone``.

    ``options`` are the algorithm's own keyword arguments; an unknown one is an error that
    lists the valid ones.
    """
    import inspect

    if name not in ALGORITHMS:
        raise ValueError(
            f"unknown algorithm {name!r}; registered algorithms: {', '.join(sorted(ALGORITHMS))}."
        )
    cls = ALGORITHMS[name]
    if spec.kind not in cls.kinds:
        raise ValueError(
            f"{name} handles {' and '.join(cls.kinds)} tasks, not {spec.kind}; "
            f"choose another algorithm or task source."
        )
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p not in ("self", "backbone", "spec")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for algorithm {name}; "
            f"valid options: {', '.join(valid) or '(none)'}."
        )
    algo = cls(backbone, spec, **options)
    algo.spec = spec
    return algo
