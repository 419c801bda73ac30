"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

MAML learns an initialisation θ from which a few gradient steps on a task's support set
give parameters φ that do well on its query set:

    φ_0 = θ,   φ_{s+1} = φ_s − α_s ∇_φ L_support(φ_s)          (inner loop)
    θ ← θ − β ∇_θ  1/T Σ_tasks L_query(φ_S)                     (outer step, by the trainer)

The outer gradient flows through the inner updates (second order). ``first_order=True``
drops the inner loop's second derivatives (FOMAML, same paper, Sec. 5.2).

The inner loop is functional (``torch.func.functional_call`` on a dict of tensors), so the
module is never cloned or mutated, and it works on any ``nn.Module``. Tasks are adapted one
after the other: on this CPU a per-task loop beat ``vmap`` and one large grouped call
(``benchmarks/maml_step.py`` measures the layouts); the trainer's ``task_chunk`` bounds
memory by back-propagating a few tasks at a time (the result is unchanged).

Step sizes α (``learn_inner_lr``): ``"none"`` (a fixed α), ``"layer"`` (one learned α per
parameter tensor), ``"layer_step"`` (per tensor and per step, as in MAML++, Antoniou et al.
2019) or ``"element"`` (one per weight: Meta-SGD, Li et al. 2017).

BatchNorm (``batch_norm``): ``"transductive"`` (the MAML convention) normalises every batch
with its own statistics, in training and at test time, so the query set of a task is
normalised with its own statistics; ``"running"`` keeps running statistics during
meta-training and uses them when adapting and predicting (non-transductive: every query is
classified on its own). Every task of a meta-batch starts from the same running statistics,
and the step leaves their mean over the tasks (``metalab.algorithms.pertask``), so tasks never
affect each other and a meta-batch may be split over processes.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metalab.algorithms.base import MetaLearner, TaskSpec, register
from metalab.algorithms.parallel import parallel_meta_loss
from metalab.algorithms.pertask import each_task
from metalab.kinds import TaskKind
from metalab.models import feature_shape, use_batch_statistics
from metalab.tasks import TaskBatch

Params = dict[str, Tensor]

LEARNED_LR_MODES = ("none", "layer", "layer_step", "element")
BATCH_NORM_MODES = ("transductive", "running")


@register
class MAML(MetaLearner):
    """MAML on ``backbone`` followed by a linear head (``n_way`` logits or the target).

    ``inner_steps`` gradient steps of size ``inner_lr`` adapt to a task during meta-training,
    ``test_inner_steps`` (default: the same) when adapting to a new task.

    How the tasks of a meta-batch are computed (the result is the same): with ``vectorize``
    (default: when the network has no BatchNorm) all at once with ``torch.func.vmap``, by far
    the fastest for small networks; otherwise, on the CPU, in ``task_workers`` threads
    (default ``torch.get_num_threads()``, see :mod:`metalab.algorithms.parallel`), or one
    after the other. ``vectorize=True`` is refused where ``vmap`` is inexact: a second-order
    inner loop through BatchNorm (torch's fused ``F.batch_norm`` under ``vmap`` gives wrong
    second derivatives: over 1e-2 relative in float64, Conv-4, 1 and 3 inner steps).
    """

    name = "maml"
    family = "optimization"
    runtime_options = ("test_inner_steps", "task_workers", "vectorize")  # free after training
    fixed_ways = True
    check_options: ClassVar[dict[str, dict[str, Any]]] = {
        "classification": {"test_inner_steps": 3},
        "regression": {"inner_lr": 0.01, "test_inner_steps": 10}}

    def __init__(
        self, backbone: nn.Module, spec: TaskSpec, inner_steps: int = 1,
        test_inner_steps: int | None = None, inner_lr: float = 0.4, first_order: bool = False,
        learn_inner_lr: str = "none", batch_norm: str = "transductive",
        task_workers: int | None = None, vectorize: bool | None = None,
    ) -> None:
        super().__init__(spec)
        if learn_inner_lr not in LEARNED_LR_MODES:
            raise ValueError(f"learn_inner_lr must be one of {', '.join(LEARNED_LR_MODES)}; "
                             f"got {learn_inner_lr!r}.")
        if batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"batch_norm must be one of {', '.join(BATCH_NORM_MODES)}; "
                             f"got {batch_norm!r}.")
        if inner_steps < 1 or (test_inner_steps is not None and test_inner_steps < 1):
            raise ValueError("inner_steps and test_inner_steps must be at least 1.")
        self.inner_steps = inner_steps
        self.test_inner_steps = test_inner_steps or inner_steps
        self.first_order = first_order
        self.learn_inner_lr = learn_inner_lr
        self.task_workers, self.vectorize = task_workers, vectorize
        if batch_norm == "transductive":
            use_batch_statistics(backbone)
        self.backbone = backbone
        features = math.prod(feature_shape(backbone, spec.input_shape, spec.input_dtype))
        self.head = nn.Linear(features, spec.outputs)
        self.inner_lr = inner_lr
        if vectorize and not self.vmap_exact():
            raise ValueError(
                f"vectorize=True would compute a wrong meta-gradient here: the second-order "
                f"inner loop of {self.name} runs through BatchNorm, whose second derivatives "
                f"torch.func.vmap gets wrong. Leave vectorize unset (the tasks then run one "
                f"after the other or in threads, exactly), or use first_order=True or a "
                f"network without BatchNorm.")
        if learn_inner_lr != "none":
            self.inner_lrs = nn.ParameterDict()  # filled in order (a dict would be sorted)
            for key, p in self.fast_params().items():
                self.inner_lrs[key.replace(".", "-")] = self._initial_lr(p, inner_lr)

    @classmethod
    def supports(cls, kind: TaskKind) -> bool:
        """Any kind whose loss is a function of the network's predictions: the inner and
        outer losses are the kind's."""
        return True

    def _initial_lr(self, param: Tensor, value: float) -> Tensor:
        shape = {"layer": (), "layer_step": (self.inner_steps,),
                 "element": param.shape}[self.learn_inner_lr]
        return torch.full(shape, value)

    # -- what the inner loop adapts, and how a prediction is made from it --------------------

    def fast_params(self) -> Params:
        """The parameters the inner loop adapts (MAML: all of backbone and head)."""
        return {name: p for name, p in self.named_parameters()
                if name.startswith(("backbone.", "head."))}

    def features(self, x: Tensor) -> Tensor:
        """What the inner loop sees of ``x``: MAML adapts the backbone, so ``x`` itself."""
        return x

    def predict(self, params: Params, inputs: Tensor) -> Tensor:
        """Outputs of the network with ``params`` in place of its own parameters."""
        return functional_call(self, params, (inputs,))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x).flatten(1))

    def step_size(self, name: str, step: int) -> Tensor | float:
        """α for parameter ``name`` at inner step ``step``."""
        if self.learn_inner_lr == "none":
            return self.inner_lr
        lr = self.inner_lrs[name.replace(".", "-")]
        return lr[min(step, self.inner_steps - 1)] if self.learn_inner_lr == "layer_step" else lr

    def inner_loop(
        self, params: Params, support_x: Tensor, support_y: Tensor, steps: int,
        create_graph: bool,
    ) -> Params:
        """``steps`` gradient steps on the support loss from ``params``. With
        ``create_graph`` the result stays differentiable in ``params`` (second order).

        The gradient is ``torch.func.grad``'s, so the same loop runs per task and under
        ``vmap``, and needs no ``requires_grad`` (``adapt`` runs it under ``no_grad``).
        """
        # Running BatchNorm statistics are updated in place: a function transformed by
        # ``grad`` may only mutate its inputs, so the buffers are passed in.
        buffers = dict(self.named_buffers())
        for step in range(steps):
            def support_loss(fast: Params, buffers: Params) -> Tensor:
                return self.kind.loss(self.predict({**fast, **buffers}, support_x), support_y)

            grads = grad(support_loss)(params, buffers)
            params = {name: p - self.step_size(name, step) *
                      (grads[name] if create_graph else grads[name].detach())
                      for name, p in params.items()}
        return params

    # -- the two-method interface ------------------------------------------------------------

    @property
    def metric(self) -> str:
        """Name of the per-task metric that ``task_objective`` returns (the kind's)."""
        return self.kind.metric

    def task_objective(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Adapt to one task's support set: the differentiable query loss, and the score of
        the adapted network on the query set (both the task kind's)."""
        support, query = self.features(support_x), self.features(query_x)
        if self.first_order:
            support = support.detach()  # no path from the support set to θ except the step
        params = self.inner_loop(self.fast_params(), support, support_y,
                                 self.inner_steps, create_graph=not self.first_order)
        output = self.predict(params, query)
        score = self.kind.score(output.detach(), query_y)
        return self.kind.loss(output, query_y), score

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        tasks = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        workers = min(self.task_workers or torch.get_num_threads(), len(batch))
        if self.vectorize if self.vectorize is not None else not self.has_batch_norm():
            objectives, metrics = vmap(self.task_objective, randomness="different")(*tasks)
        elif workers > 1 and batch.support_x.device.type == "cpu" and self.stateless():
            return parallel_meta_loss(self, batch, type(self).task_objective, workers)
        else:  # one task after the other, each from the same running BatchNorm statistics
            results = each_task(self, len(batch),
                                lambda i: self.task_objective(*(t[i] for t in tasks)))
            objectives, metrics = (torch.stack(values) for values in zip(*results, strict=True))
        return objectives.mean(), {self.metric: metrics.mean().item()}

    def inner_network(self) -> nn.Module:
        """The part of the network the inner loop runs (MAML: all of it)."""
        return self

    def vmap_exact(self) -> bool:
        """Whether ``vmap`` computes this meta-gradient exactly: it does unless second
        derivatives go through a BatchNorm of the inner loop."""
        return self.first_order or not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                           for m in self.inner_network().modules())

    def has_batch_norm(self) -> bool:
        """True if the network normalises over a batch (then tasks are not vectorised: on
        torch 2.13 ``vmap`` of a second-order step through ``F.batch_norm`` is inexact)."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())

    def stateless(self) -> bool:
        """True when a forward pass writes no buffer (no running BatchNorm statistics), so
        tasks can run in parallel threads."""
        return not (self.training and any(b.numel() for b in self.buffers()))

    def adapt(self, support_x: Tensor, support_y: Tensor) -> AdaptedPredictor:
        if self.kind.classes:
            self.check_ways(int(support_y.max()) + 1)
        with torch.no_grad():
            start = {name: p.detach() for name, p in self.fast_params().items()}
            params = self.inner_loop(start, self.features(support_x), support_y,
                                     self.test_inner_steps, create_graph=False)
        return AdaptedPredictor(self, params)

    def adaptation_steps(self) -> int:
        return self.test_inner_steps


class AdaptedPredictor:
    """The network with the parameters adapted to one task; reusable on many query batches."""

    def __init__(self, learner: MAML, params: Params) -> None:
        self.learner, self.params = learner, params

    def __call__(self, query_x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.learner.predict(self.params, self.learner.features(query_x))
