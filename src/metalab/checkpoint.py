"""The checkpoint format: what a training run saves, how it is read back safely, and whether
it can continue a run or be scored with other settings.

A checkpoint is a dict of tensors and plain values (``format``, ``config``, ``algorithm``,
``backbone``, ``spec``, ``model``, ``optimizer``, ``scheduler``, ``step``, ``best``, timing and
``run_id``), written atomically (:func:`metalab.io.atomic_save`) and always loaded with
``torch.load(weights_only=True)``, so a malicious file cannot run code. ``config`` is the run's
:class:`~metalab.config.Config` as a dict, or None for a :class:`~metalab.train.Trainer` built
from objects (its weights load with :func:`load_weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from metalab.algorithms import ALGORITHMS
from metalab.config import Config
from metalab.io import atomic_save

__all__ = ["CHECKPOINT_FORMAT", "check_compatible", "load_weights", "read_checkpoint",
           "recorded_config", "save_checkpoint"]

CHECKPOINT_FORMAT = 1


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write ``checkpoint`` to ``path`` atomically (a crash leaves the old file or the new)."""
    atomic_save({"format": CHECKPOINT_FORMAT, **checkpoint}, Path(path))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a metalab checkpoint safely (``weights_only=True``) and check its format."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; 'metalab train CONFIG' writes "
                                "best.pt and last.pt to the config's 'out' folder.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated or not a torch file
        raise ValueError(f"{path} is not a readable metalab checkpoint ({error}).") from error
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a metalab checkpoint (format {CHECKPOINT_FORMAT}).")
    return ckpt


def load_weights(module: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load the weights of the checkpoint at ``path`` into ``module`` (an algorithm built
    like the one that was trained); returns the checkpoint."""
    ckpt = read_checkpoint(path)
    try:
        module.load_state_dict(ckpt["model"])
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit this {type(module).__name__}: {error}") from error
    return ckpt


def recorded_config(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The config the checkpoint's run recorded; a clear error for a checkpoint of a Trainer
    built from objects, which records none."""
    if ckpt.get("config") is None:
        raise ValueError(f"{path} was written by a Trainer built from objects and records no "
                         f"config to rebuild its algorithm from; build the algorithm as you "
                         f"did for training and load the weights with "
                         f"metalab.checkpoint.load_weights(algorithm, path).")
    return ckpt["config"]


def check_compatible(ckpt: dict[str, Any], config: Config, path: str | Path) -> None:
    """A checkpoint can only continue a run of the same algorithm and backbone, with the
    same options (apart from the algorithm's ``runtime_options``)."""
    recorded_config(ckpt, path)
    for key in ("algorithm", "backbone"):
        if ckpt[key] != getattr(config, key):
            raise ValueError(
                f"{path} holds a {ckpt[key]} {key}, but the config asks for "
                f"{getattr(config, key)}; use that checkpoint's config, or a new 'out' folder.")
    runtime = getattr(ALGORITHMS.get(config.algorithm), "runtime_options", ())
    for key in ("algorithm_options", "backbone_options"):
        trained = {k: v for k, v in ckpt["config"][key].items() if k not in runtime}
        wanted = {k: v for k, v in getattr(config, key).items() if k not in runtime}
        if trained != wanted:
            raise ValueError(
                f"{path} was trained with {key}={ckpt['config'][key]}, but the config has "
                f"{getattr(config, key)}; they must match to load its weights.")
