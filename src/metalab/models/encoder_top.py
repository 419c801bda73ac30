"""The top of a sentence encoder as a backbone: its last transformer layers, trainable, over
token states cached below them (:func:`metalab.text.token_states`).

Meta-training a head over frozen sentence embeddings cannot change what the encoder
distinguishes; fine-tuning the whole encoder per episode costs seconds on a CPU. Splitting it
keeps both cheap: every sentence runs once through the frozen lower layers, and an episode
runs only through the last ``layers`` (two of all-MiniLM-L6-v2's six: about 3.5 M
parameters) and the encoder's pooling, the L2-normalised mean of the token states. Before
any training the backbone gives exactly the encoder's sentence embedding. Dopierre et al.
(ACL 2021, ProtAugment) fine-tune a whole BERT with the ProtoNet loss; here the same loss
trains the top (config ``banking77/protonet-5w1s-top2``).

Configs pair it with the text data sets' ``top_layers`` option, which must equal
``layers``::

    dataset_options: {fold: 1, top_layers: 2}
    backbone: encoder-top
    backbone_options: {layers: 2}
"""

from __future__ import annotations

import copy
import os

import torch.nn.functional as F
from torch import Tensor, nn

from metalab.text import (
    DEFAULT_ENCODER,
    SentenceEncoder,
    frozen_layers,
    run_layers,
    transformer_parts,
)

__all__ = ["EncoderTop", "token_mask", "top_layers_of"]


def token_mask(states: Tensor) -> Tensor:
    """Which of the token states ``[B, T, D]`` are tokens ``[B, T]``: zero vectors are the
    padding of sentences shorter than ``T``."""
    return states.abs().sum(-1) > 0


class EncoderTop(nn.Module):
    """The last ``layers`` transformer layers of sentence encoder ``encoder`` (copies,
    trainable) and its pooling: token states ``[B, T, D]`` (zero vectors are padding) ->
    unit-norm sentence embeddings ``[B, D]``."""

    def __init__(self, input_shape: tuple[int, ...],
                 encoder: str | os.PathLike | SentenceEncoder = DEFAULT_ENCODER,
                 layers: int = 2) -> None:
        super().__init__()
        bert, _ = transformer_parts(encoder)
        below = frozen_layers(bert, layers)
        width = bert.config.hidden_size
        if len(input_shape) != 2 or input_shape[1] != width:
            raise ValueError(f"encoder-top takes token states [tokens, {width}]; the data give "
                             f"examples of shape {list(input_shape)}: set the text data set's "
                             f"top_layers option (dataset_options: {{top_layers: {layers}}}).")
        self.top_layers = layers
        self.layers = copy.deepcopy(bert.encoder.layer[below:])

    def forward(self, states: Tensor) -> Tensor:
        mask = token_mask(states)
        length = max(int(mask.sum(1).max()), 1)  # right padding: drop the all-padding tail
        states, mask = states[:, :length], mask[:, :length]
        states = run_layers(self.layers, states, mask)
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)


def top_layers_of(module: nn.Module) -> int:
    """The encoder layers the :class:`EncoderTop` inside ``module`` holds (0 if there is
    none): the ``top_layers`` its sentence inputs need (:func:`metalab.text.sentence_inputs`)."""
    return next((m.top_layers for m in module.modules() if isinstance(m, EncoderTop)), 0)
