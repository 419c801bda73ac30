"""ANIL: Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020).

The paper shows that MAML's inner loop barely changes the backbone's features, and that
adapting the head alone keeps MAML's accuracy: the backbone f is meta-learned in the outer
loop only, and the inner loop adapts the linear head (W, b) on the task's features,

    (W, b)' = (W, b) − α ∇_{W,b} L_support(W f(x) + b),

so each task's images go through the backbone once, and the inner steps cost a few matrix
products. Everything else is :class:`metalab.algorithms.maml.MAML`.

With ``head_solver="ridge"`` (value targets) the inner loop is run to its optimum in closed
form instead: the head minimising the support's squared error plus a penalty that pulls it
toward the meta-learned head, per feature,

    [W b]' = (ΦᵀΦ + Λ)⁻¹ (ΦᵀY + Λ [W b]),    Φ = [f(x) 1],  Λ = diag(λ),

R2-D2's differentiable ridge solver (Bertinetto, Henriques, Torr & Vedaldi, ICLR 2019) with
ALPaCA's prior (Harrison, Sharma & Pavone, WAFR 2018: the posterior mean of Bayesian linear
regression whose prior mean is the meta-learned head and whose precision λ is meta-learned
too, from ``ridge_precision``). A task with few examples stays near the meta-learned head and
one with many follows its own data; the meta-gradient goes through the solve, with no inner
learning rate and no unrolled steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalab.algorithms.base import TaskSpec, register
from metalab.algorithms.maml import MAML, Params

HEAD_SOLVERS = ("gradient", "ridge")


def ridge_head(features: Tensor, targets: Tensor, weight: Tensor, bias: Tensor,
               precision: Tensor) -> tuple[Tensor, Tensor]:
    """The linear head ``(weight [O, D], bias [O])`` minimising
    ``‖[features 1] [W b]ᵀ − targets‖² + Σ_d precision_d ‖[W b]_d − [weight bias]_d‖²`` over
    one task's ``features`` ``[S, D]`` and ``targets`` ``[S, O]``; ``precision`` ``[D+1]``
    (the last entry is the bias's)."""
    design = torch.cat([features, features.new_ones(len(features), 1)], 1)
    prior = torch.cat([weight.T, bias.unsqueeze(0)])  # [D+1, O]
    gram = design.T @ design + torch.diag(precision)
    solved = torch.linalg.solve(gram, design.T @ targets + precision.unsqueeze(1) * prior)
    return solved[:-1].T, solved[-1]


@register
class ANIL(MAML):
    """MAML whose inner loop adapts only the head, by gradient steps or (``head_solver``
    ``"ridge"``) in closed form, shrunk toward the meta-learned head with per-feature
    penalties that start at ``ridge_precision``."""

    name = "anil"

    def __init__(self, backbone: nn.Module, spec: TaskSpec, head_solver: str = "gradient",
                 ridge_precision: float = 10.0, **options: Any) -> None:
        super().__init__(backbone, spec, **options)
        if head_solver not in HEAD_SOLVERS:
            raise ValueError(f"head_solver must be one of {', '.join(HEAD_SOLVERS)}; "
                             f"got {head_solver!r}.")
        self.head_solver = head_solver
        if head_solver == "ridge":
            if spec.kind.classes:
                raise ValueError("head_solver='ridge' fits value targets (regression); a "
                                 "classification task's labels are a new permutation each "
                                 "episode, so a prior per output means nothing. Use the "
                                 "default head_solver='gradient'.")
            if self.learn_inner_lr != "none" or self.first_order or ridge_precision <= 0:
                raise ValueError(f"head_solver='ridge' takes no step sizes and "
                                 f"differentiates through the solve: it needs "
                                 f"learn_inner_lr='none', first_order=False and "
                                 f"ridge_precision > 0 (got {self.learn_inner_lr!r}, "
                                 f"{self.first_order}, {ridge_precision}).")
            self.ridge_precision = ridge_precision
            # Λ = ridge_precision · exp(offset): weight decay pulls the offset to the start
            self.precision_offset = nn.Parameter(torch.zeros(self.head.in_features + 1))

    def inner_network(self) -> nn.Module:
        return self.head

    def fast_params(self) -> Params:
        return {name: p for name, p in self.named_parameters() if name.startswith("head.")}

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x).flatten(1)

    def predict(self, params: Params, inputs: Tensor) -> Tensor:
        head_params = {name.removeprefix("head."): p for name, p in params.items()
                       if name.startswith("head.")}
        return functional_call(self.head, head_params, (inputs,))

    def inner_loop(self, params: Params, support_x: Tensor, support_y: Tensor, steps: int,
                   create_graph: bool) -> Params:
        if self.head_solver == "gradient":
            return super().inner_loop(params, support_x, support_y, steps, create_graph)
        precision = self.ridge_precision * self.precision_offset.exp()
        weight, bias = ridge_head(support_x, support_y.reshape(len(support_y), -1),
                                  params["head.weight"], params["head.bias"], precision)
        if not create_graph:
            weight, bias = weight.detach(), bias.detach()
        return {"head.weight": weight, "head.bias": bias}

    def adaptation_steps(self) -> int:
        return self.test_inner_steps if self.head_solver == "gradient" else 1
