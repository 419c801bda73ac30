"""Scoring an algorithm on fixed episodes: mean ± 95% CI, and how long adaptation takes.

Every episode is adapted to on its own (``algo.adapt`` on its support set) and scored on its
query set, the standard protocol (Finn et al. 2017 reference code: 600 test tasks, CI95 =
1.96 · std / sqrt(n)). The score is the task kind's (:mod:`metalab.kinds`): accuracy in %
for classification, the mean squared error for regression.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from metalab.kinds import TaskKind, get_kind
from metalab.tasks import RaggedTaskBatch, TaskBatch

if TYPE_CHECKING:
    from metalab.algorithms.base import MetaLearner

__all__ = ["EvalResult", "check_finite", "evaluate", "fit_threshold", "mean_ci95",
           "nonfinite_tensors", "open_set_right"]


@dataclass
class EvalResult:
    """Mean and 95% CI of the per-episode score, and median latencies in milliseconds."""

    metric: str  # the task kind's score: "accuracy", "mse", ...
    mean: float
    ci95: float
    episodes: int
    adapt_ms: float  # median time of algo.adapt on one support set
    query_ms: float  # median time of one predictor call on one query set
    unit: str = ""  # "%" for accuracy
    nonfinite: int = 0  # episodes whose score was NaN or infinite (then mean and CI are NaN)

    def __str__(self) -> str:
        broken = (f"; {self.nonfinite} of {self.episodes} episodes gave a non-finite score "
                  f"(adaptation diverged)" if self.nonfinite else "")
        return (f"{self.metric} {self.mean:.2f}{self.unit} ± {self.ci95:.2f} over {self.episodes} "
                f"episodes; adapt {self.adapt_ms:.2f} ms, query {self.query_ms:.2f} ms (median)"
                f"{broken}")

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval (1.96 · s / sqrt(n)).

    Both are NaN if any value is not finite (a diverged model), rather than an error.
    """
    if not all(math.isfinite(v) for v in values):
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def nonfinite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s floating-point parameters and buffers holding a NaN or an
    infinity."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return [key for key, t in named if t.is_floating_point() and not torch.isfinite(t).all()]


def check_finite(module: torch.nn.Module, name: str = "the model") -> None:
    """Raise a clear error if any weight or buffer of ``module`` is NaN or infinite: such a
    model would score as if it guessed, hiding that it is broken."""
    broken = nonfinite_tensors(module)
    if broken:
        raise ValueError(f"{name} has non-finite weights ({', '.join(broken[:5])}"
                         f"{', ...' if len(broken) > 5 else ''}); it diverged in training. "
                         f"Use an earlier checkpoint or retrain with a lower lr or grad_clip.")


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def evaluate(
    algo: MetaLearner, episodes: list[TaskBatch | RaggedTaskBatch],
    kind: TaskKind | str | None = None, device: torch.device | str = "cpu",
    progress: bool = False,
) -> EvalResult:
    """Adapt to and score every task of ``episodes`` (see :func:`metalab.tasks.fixed_episodes`)
    with ``kind``'s score (a kind or a registered kind's name; default: the kind the
    algorithm was built for).

    The algorithm is put in eval mode for the duration and restored afterwards.
    """
    kind = get_kind(kind) if kind is not None else algo.kind
    check_finite(algo)
    device = torch.device(device)
    was_training = algo.training
    algo.eval()
    scores, adapt_times, query_times = [], [], []
    total = sum(len(b) for b in episodes)
    try:
        with torch.no_grad(), tqdm(total=total, desc="evaluate", disable=not progress) as bar:
            for batch in episodes:
                batch = batch.to(device)
                for i in range(len(batch)):
                    task = batch.task(i)
                    start = _now(device)
                    predictor = algo.adapt(task.support_x, task.support_y)
                    adapted = _now(device)
                    output = predictor(task.query_x)
                    done = _now(device)
                    adapt_times.append(adapted - start)
                    query_times.append(done - adapted)
                    scores.append(kind.score(output, task.query_y).item() * kind.report_scale)
                    bar.update()
    finally:
        algo.train(was_training)
    mean, ci = mean_ci95(scores)
    return EvalResult(
        metric=kind.metric, mean=mean, ci95=ci, episodes=len(scores),
        adapt_ms=statistics.median(adapt_times) * 1e3,
        query_ms=statistics.median(query_times) * 1e3, unit=kind.unit,
        nonfinite=sum(not math.isfinite(s) for s in scores),
    )


def fit_threshold(in_scores: Tensor, in_correct: Tensor, out_scores: Tensor) -> float:
    """The score threshold that maximises the accuracy over all validation examples with
    "out of scope" as one more class: in-scope examples count when classified correctly and
    not rejected, out-of-scope ones when rejected (how Larson et al. 2019 fit theirs).

    Candidates are the midpoints between consecutive distinct scores (and the ends), so the
    result does not sit on a validation score; ties go to the lowest threshold.
    """
    values = torch.cat([in_scores, out_scores]).unique()
    candidates = torch.cat([values[:1] - 1, (values[1:] + values[:-1]) / 2, values[-1:] + 1])
    right = open_set_right(in_scores, in_correct, out_scores, candidates)
    return float(candidates[torch.argmax(right)])


def open_set_right(in_scores: Tensor, in_correct: Tensor, out_scores: Tensor,
                   thresholds: Tensor) -> Tensor:
    """Per threshold, how many examples are right with "out of scope" as one more class:
    in-scope ones classified correctly and kept (score >= threshold), out-of-scope ones
    rejected (score below it)."""
    accepted_correct = (in_scores[None] >= thresholds[:, None]) & in_correct[None]
    rejected_out = out_scores[None] < thresholds[:, None]
    return accepted_correct.sum(1) + rejected_out.sum(1)
