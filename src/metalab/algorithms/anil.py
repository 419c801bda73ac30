"""ANIL: Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020).

The paper shows that MAML's inner loop barely changes the backbone's features, and that
adapting the head alone keeps MAML's accuracy: the backbone f is meta-learned in the outer
loop only, and the inner loop adapts the linear head (W, b) on the task's features,

    (W, b)' = (W, b) − α ∇_{W,b} L_support(W f(x) + b),

so each task's images go through the backbone once, and the inner steps cost a few matrix
products. Everything else is :class:`metalab.algorithms.maml.MAML`.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call

from metalab.algorithms.base import register
from metalab.algorithms.maml import MAML, Params


@register
class ANIL(MAML):
    """MAML whose inner loop adapts only the head."""

    name = "anil"

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
