"""Task kinds: what a task asks of a learner, and how a learner is scored on it.

A :class:`TaskKind` is the one place that knows what a task's targets are, which loss trains
on them, which score judges a prediction and in which direction, and how a score is written.
Algorithms, the trainer, the evaluator and ``metalab compare`` ask the kind; none of them
compares kind names. A new kind (ordinal or multi-label classification, rating prediction,
reinforcement learning) is one subclass and :func:`register_kind`; nothing else changes.

    kind = task_source.kind
    loss = kind.loss(output, target)          # differentiable, what meta-training minimises
    score = kind.score(output, target)        # 0-d tensor in the units training logs
    kind.report_scale * score                 # the units evaluation reports (accuracy in %)
    kind.better(a, b)                         # is score a better than score b?
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CLASSIFICATION",
    "KINDS",
    "REGRESSION",
    "REINFORCEMENT",
    "Classification",
    "Regression",
    "Reinforcement",
    "TaskKind",
    "get_kind",
    "register_kind",
]


class TaskKind:
    """Base of every task kind. Subclasses set the attributes and implement ``loss`` and
    ``score``; the rest follows from them.

    ``classes``: a task's targets are class indices ``0..N-1`` (labels re-indexed per task)
    and a predictor returns one score per class, ``[Q, N]``; otherwise targets are values
    ``[Q, D]`` and a predictor returns ``[Q, D]``. ``metric`` names the score,
    ``higher_is_better`` its direction, ``report_scale`` and ``unit`` how evaluation reports
    it (accuracy: fraction x 100, in %).
    """

    name: str = ""
    classes: bool = False
    metric: str = ""
    higher_is_better: bool = True
    report_scale: float = 1.0
    unit: str = ""

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The differentiable training loss of predictions ``output`` against ``target``
        (any leading dimensions: one task ``[Q, ...]`` or a batch ``[T, Q, ...]``)."""
        raise NotImplementedError

    def score(self, output: Tensor, target: Tensor) -> Tensor:
        """The score of ``output`` against ``target``, a 0-d tensor (mean over queries)."""
        raise NotImplementedError

    def query_losses(self, output: Tensor, target: Tensor) -> Tensor | None:
        """The loss of each query ``[T, Q]``, when ``loss`` is their mean (it makes padded
        batches fast); None otherwise."""
        return None

    def query_scores(self, output: Tensor, target: Tensor) -> Tensor | None:
        """The score of each query ``[T, Q]``, when ``score`` is their mean; else None."""
        return None

    def metrics(self, output: Tensor, target: Tensor, mask: Tensor | None = None,
                ) -> dict[str, float]:
        """``{metric: score}`` for the training log (``mask``: see :meth:`objective`)."""
        output = output.detach()
        if mask is None:
            return {self.metric: self.score(output, target).item()}
        score = _masked_task_mean(self.query_scores(output, target), mask, self.score, output,
                                  target)
        return {self.metric: score.item()}

    def objective(self, output: Tensor, target: Tensor, mask: Tensor | None = None,
                  ) -> tuple[Tensor, dict[str, float]]:
        """``(loss, {metric: score})`` of a batch of tasks' predictions ``[T, Q, ...]``: what
        most ``meta_loss`` implementations return. With ``mask`` ``[T, Q]`` (padded queries
        of tasks of different sizes) both are means over tasks of each task's own, as if
        every task were computed alone."""
        if mask is None:
            return self.loss(output, target), self.metrics(output, target)
        loss = _masked_task_mean(self.query_losses(output, target), mask, self.loss, output,
                                 target)
        return loss, self.metrics(output, target, mask)

    def output_size(self, n_way: int, output_dim: int) -> int:
        """Outputs per query a predictor needs: one per class, or the target size."""
        return n_way if self.classes else output_dim

    def better(self, score: float, than: float | None) -> bool:
        """True if ``score`` is better than ``than`` (anything beats None; NaN beats nothing)."""
        if score != score:  # NaN
            return False
        if than is None or than != than:
            return True
        return score > than if self.higher_is_better else score < than

    def format(self, mean: float, ci95: float) -> str:
        """A score and its 95% CI as tables print it."""
        return f"{mean:.2f}{self.unit} ± {ci95:.2f}" if self.unit else (
            f"{mean:.3f} ± {ci95:.3f} {self.metric.upper()}")

    def label(self) -> str:
        """The score's axis label in plots."""
        arrow = "" if self.higher_is_better else " (lower is better)"
        unit = f" ({self.unit})" if self.unit else ""
        return f"{self.metric}{unit}{arrow}"

    def describe(self, n_way: int, k_shot: int) -> str:
        """How a task is named in tables and messages, e.g. ``5-way 1-shot``."""
        return f"{n_way}-way {k_shot}-shot" if self.classes else f"{k_shot}-shot {self.name}"

    def __repr__(self) -> str:
        return f"<task kind {self.name}>"


def _masked_task_mean(per_query: Tensor | None, mask: Tensor, reduce: Callable, output: Tensor,
                      target: Tensor) -> Tensor:
    """Mean over tasks of each task's mean over its marked queries: from per-query values
    ``[T, Q]`` when the kind gives them, else by ``reduce`` on each task's queries."""
    if per_query is not None:
        weights = mask.to(per_query.dtype)
        return ((per_query * weights).sum(1) / weights.sum(1)).mean()
    return torch.stack([reduce(o[m], t[m]) for o, t, m in zip(output, target, mask,
                                                              strict=True)]).mean()


class Classification(TaskKind):
    """N-way classification: cross-entropy on logits, scored by accuracy (reported in %)."""

    name = "classification"
    classes = True
    metric = "accuracy"
    report_scale = 100.0
    unit = "%"

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.flatten(0, -2), target.flatten())

    def score(self, output: Tensor, target: Tensor) -> Tensor:
        return (output.argmax(-1) == target).float().mean()

    def query_losses(self, output: Tensor, target: Tensor) -> Tensor:
        losses = F.cross_entropy(output.flatten(0, -2), target.flatten(), reduction="none")
        return losses.view(target.shape)

    def query_scores(self, output: Tensor, target: Tensor) -> Tensor:
        return (output.argmax(-1) == target).to(output.dtype)


class Regression(TaskKind):
    """Regression of real-valued targets: mean squared error for both loss and score."""

    name = "regression"
    metric = "mse"
    higher_is_better = False

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output, target)

    def score(self, output: Tensor, target: Tensor) -> Tensor:
        return (output - target).pow(2).mean()

    def query_losses(self, output: Tensor, target: Tensor) -> Tensor:
        return (output - target).pow(2).flatten(2).mean(-1)

    def query_scores(self, output: Tensor, target: Tensor) -> Tensor:
        return self.query_losses(output, target)


class Reinforcement(TaskKind):
    """Reinforcement learning: a task is an environment (a goal, a target velocity), and a
    policy is scored by the mean undiscounted return of its episodes. Its losses come from
    rollouts (:mod:`metalab.rl`), not from predictions against targets."""

    name = "reinforcement"
    metric = "return"

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise TypeError("reinforcement-learning tasks have no targets: their losses come "
                        "from rollouts (metalab.rl), not from predictions.")

    score = loss

    def format(self, mean: float, ci95: float) -> str:
        return f"{mean:.2f} ± {ci95:.2f}"


KINDS: dict[str, TaskKind] = {}


def register_kind(kind: TaskKind) -> TaskKind:
    """Add ``kind`` to :data:`KINDS`, so that checkpoints and tables can name it."""
    if not kind.name or not kind.metric:
        raise TypeError(f"{type(kind).__name__} needs a name and a metric to be registered.")
    if kind.name in KINDS and type(KINDS[kind.name]) is not type(kind):
        raise ValueError(f"a task kind named {kind.name!r} is already registered.")
    KINDS[kind.name] = kind
    return kind


def get_kind(kind: str | TaskKind) -> TaskKind:
    """The registered kind named ``kind`` (a kind object is returned as it is)."""
    if isinstance(kind, TaskKind):
        return kind
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; registered kinds: "
                         f"{', '.join(sorted(KINDS))}. A kind defined in your code must be "
                         f"registered (metalab.kinds.register_kind) before its checkpoints load.")
    return KINDS[kind]


CLASSIFICATION = register_kind(Classification())
REGRESSION = register_kind(Regression())
REINFORCEMENT = register_kind(Reinforcement())
