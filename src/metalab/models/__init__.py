"""Backbones: the networks that turn an example into features.

Any ``nn.Module`` mapping a batch of inputs ``[B, *input_shape]`` to features ``[B, ...]``
works with every algorithm; these are the standard ones, registered by name for configs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from metalab.models.embedding import EmbeddingMLP
from metalab.models.support_statistics import SupportStatistics

__all__ = ["BACKBONES", "MLP", "Conv4", "EmbeddingMLP", "ResidualMLP", "SupportStatistics",
           "build_backbone", "feature_shape", "register_backbone", "use_batch_statistics"]


def conv_block(in_channels: int, out_channels: int, pool: bool, stride: int = 1) -> nn.Sequential:
    """3x3 conv, BatchNorm, ReLU and (optionally) 2x2 max-pool: the Conv-4 building block."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Layers(nn.Sequential):
    """An ``nn.Sequential`` whose slices are plain ``nn.Sequential`` (``nn.Sequential``
    slices by calling ``type(self)(layers)``, which a subclass's own arguments break)."""

    def __getitem__(self, index: int | slice) -> nn.Module:
        if isinstance(index, slice):
            return nn.Sequential(*list(self)[index])
        return super().__getitem__(index)


class Conv4(_Layers):
    """Four conv blocks of ``hidden`` channels (Vinyals et al. 2016; Snell et al. 2017).

    On 28x28 Omniglot the output is 64 features. ``pool_blocks`` < 4 keeps the spatial size
    after the first ``pool_blocks`` blocks (Relation Networks pool only in the first two);
    ``flatten=False`` returns feature maps instead of vectors. ``stride=2`` with
    ``pool_blocks=0`` is the MAML paper's Omniglot network (strided convolutions instead of
    max-pooling, Finn et al. 2017, Sec. 5.2): about 4x fewer operations at 28x28.

    ``channels_last=True`` keeps the weights and activations in NHWC memory order, where
    oneDNN's CPU convolutions are faster, but float32 gradients move further from the exact
    ones (mostly in this torch's channels-last CPU BatchNorm kernel).
    ``benchmarks/conv4_layout.py`` measures both; docs/results.md has the figures. It is
    therefore off by default: turn it on for speed where float32 rounding noise is acceptable
    (``backbone_options: {channels_last: true}``).
    """

    def __init__(
        self, in_channels: int = 1, hidden: int = 64, pool_blocks: int = 4, flatten: bool = True,
        stride: int = 1, channels_last: bool = False,
    ) -> None:
        blocks = [conv_block(in_channels if i == 0 else hidden, hidden, i < pool_blocks, stride)
                  for i in range(4)]
        super().__init__(*blocks, *([nn.Flatten()] if flatten else []))
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class MLP(_Layers):
    """Fully connected ReLU network (``hidden`` sizes), flattening its input first.

    With ``out_features`` the last layer is linear (a regressor, e.g. the MAML sinusoid
    2x40 net); without it the output is the last hidden layer (a feature extractor).
    """

    def __init__(
        self, in_features: int, hidden: tuple[int, ...] = (40, 40), out_features: int | None = None,
        batch_norm: bool = False,
    ) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(nn.ReLU())
            width = size
        if out_features is not None:
            layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


class ResidualMLP(nn.Module):
    """``x + MLP(x)`` with the MLP's last layer zero-initialised: a head over fixed features
    (e.g. frozen sentence embeddings) that starts as the identity, so meta-training begins
    from the features' own nearest-class-mean quality instead of a random projection.
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (256,)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        last = nn.Linear(width, in_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.residual = nn.Sequential(nn.Flatten(), *layers, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) + self.residual(x)


BackboneFactory = Callable[..., nn.Module]  # (input_shape, **options) -> backbone

# name -> factory(input_shape, **options); register_backbone adds one.
BACKBONES: dict[str, BackboneFactory] = {
    "conv4": lambda input_shape, **options: Conv4(in_channels=input_shape[0], **options),
    "mlp": lambda input_shape, **options: MLP(in_features=math.prod(input_shape), **options),
    "residual": lambda input_shape, **options: ResidualMLP(math.prod(input_shape), **options),
    "embedding_mlp": lambda input_shape, **options: EmbeddingMLP(input_shape[-1], **options),
    "encoder-top": lambda input_shape, **options: _encoder_top(input_shape, **options),
}


def _encoder_top(input_shape: tuple[int, ...], **options: object) -> nn.Module:
    from metalab.models.encoder_top import EncoderTop  # imports sentence-transformers

    return EncoderTop(input_shape, **options)


def register_backbone(name: str, factory: BackboneFactory) -> BackboneFactory:
    """Make ``factory(input_shape, **options)`` available to configs as ``backbone: name``."""
    if name in BACKBONES and BACKBONES[name] is not factory:
        raise ValueError(f"a backbone named {name!r} is already registered.")
    BACKBONES[name] = factory
    return factory


def build_backbone(name: str, input_shape: tuple[int, ...], **options: object) -> nn.Module:
    """The registered backbone ``name`` for examples of shape ``input_shape``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: "
                         f"{', '.join(sorted(BACKBONES))} (register_backbone adds one).")
    return BACKBONES[name](tuple(input_shape), **options)


@torch.no_grad()
def feature_shape(
    backbone: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
) -> tuple[int, ...]:
    """Shape of the features ``backbone`` gives for one example of ``input_shape`` and
    ``dtype`` (integer ids for an embedding layer), found by a dry run on zeros."""
    was_training = backbone.training
    backbone.eval()
    try:
        out = backbone(torch.zeros(2, *input_shape, dtype=dtype))
    finally:
        backbone.train(was_training)
    return tuple(out.shape[1:])


def use_batch_statistics(module: nn.Module) -> None:
    """Make every BatchNorm in ``module`` normalise with the statistics of its current batch,
    in training and in eval mode (no running statistics): the MAML convention, transductive
    at test time, since the queries of a task are normalised together."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.track_running_stats = False
            layer.running_mean = layer.running_var = layer.num_batches_tracked = None
