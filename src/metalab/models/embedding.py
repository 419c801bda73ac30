"""A backbone for examples made of integer ids: one embedding per categorical column, one
summed embedding of the multi-hot flags that follow, concatenated and fed to an MLP.

This is the rating model of MeLU (Lee et al., KDD 2019, Sec. 3.1): user and item features
as embeddings, then fully connected "decision" layers; the algorithm's head is the output
layer. Registered as ``embedding_mlp``::

    backbone: embedding_mlp
    backbone_options: {cardinalities: [1682, 17, 7, 2, 21], dim: 16, hidden: [64]}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["EmbeddingMLP"]


class EmbeddingMLP(nn.Module):
    """Inputs ``[B, C + M]`` long: ``C`` categorical columns, column ``c`` an id in
    ``0..cardinalities[c]-1``, then ``M`` 0/1 flags. Output ``[B, hidden[-1]]`` (or the
    concatenated embeddings ``[B, (C + 1) * dim]`` with ``hidden`` empty)."""

    def __init__(self, num_columns: int, cardinalities: Sequence[int], dim: int = 16,
                 hidden: Sequence[int] = (64,)) -> None:
        super().__init__()
        if not cardinalities or min(cardinalities) < 1 or dim < 1:
            raise ValueError(f"cardinalities must list a positive number of ids per "
                             f"categorical column and dim be positive, got {cardinalities!r} "
                             f"and {dim}.")
        self.flags = num_columns - len(cardinalities)
        if self.flags < 0:
            raise ValueError(f"{len(cardinalities)} cardinalities for inputs of "
                             f"{num_columns} columns; give one per categorical column.")
        self.embeddings = nn.ModuleList(nn.Embedding(n, dim) for n in cardinalities)
        # Flags (genres): the mean of the embeddings of the flags set, one linear map.
        self.flag_embedding = nn.Linear(self.flags, dim, bias=False) if self.flags else None
        layers: list[nn.Module] = []
        width = dim * (len(cardinalities) + (1 if self.flags else 0))
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        parts = [table(x[:, c]) for c, table in enumerate(self.embeddings)]
        if self.flag_embedding is not None:
            flags = x[:, len(self.embeddings):].to(self.flag_embedding.weight.dtype)
            parts.append(self.flag_embedding(flags) / flags.sum(1, keepdim=True).clamp_min(1))
        return self.mlp(torch.cat(parts, dim=1))

