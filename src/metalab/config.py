"""Run configuration: one flat dataclass, read from YAML, overridable with ``key=value``."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Config", "apply_overrides", "find_config", "load_config"]


@dataclass
class Config:
    """Everything that defines a training run. Defaults: ProtoNet on the embedded glyphs.

    Training episodes are ``n_way``-way ``k_shot``-shot with ``q_query`` queries per class,
    ``tasks_per_batch`` per optimiser step; validation and test episodes use the ``test_*``
    sizes. The learning rate is multiplied by ``lr_decay`` every ``lr_decay_every`` steps.
    With ``val_split: null`` nothing is validated and the final weights are the ones scored:
    the protocol of a rerun on train+val for a step count chosen on a validated run (Snell et
    al. 2017 trained their published Omniglot models so).
    """

    algorithm: str = "protonet"
    algorithm_options: dict[str, Any] = field(default_factory=dict)
    backbone: str = "conv4"
    backbone_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "glyphs"
    dataset_options: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    train_split: str = "train"
    train_fraction: float = 1.0  # <1: meta-train on this share of the train split's alphabets
    val_split: str | None = "val"  # None: no validation; best.pt is the latest weights
    test_split: str = "test"
    n_way: int = 5
    k_shot: int = 1
    q_query: int = 15
    tasks_per_batch: int = 1
    task_chunk: int = 0  # >0: back-propagate this many tasks at a time (bounds memory)
    test_n_way: int = 5
    test_k_shot: int = 1
    test_q_query: int = 15
    steps: int = 1000
    time_budget: float = 0.0  # >0: stop once training steps have taken this many seconds
    optimizer: str = "adam"  # "adam" or "sgd" (Reptile's plain interpolation)
    lr: float = 1e-3
    lr_decay: float = 0.5
    lr_decay_every: int = 0  # 0: constant learning rate
    weight_decay: float = 0.0
    grad_clip: float | None = None
    val_every: int = 250
    checkpoint_every: int = 0  # >0: also write last.pt every this many steps (restarts lose less)
    val_episodes: int = 200
    test_episodes: int = 600
    log_every: int = 10
    precision: str = "fp32"  # "bf16": autocast the training forward pass (evaluation stays fp32)
    seed: int = 0
    device: str = "auto"
    out: str = "runs/default"

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> Config:
        """Build from a mapping; an unknown key is an error that lists the valid keys."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(
                f"unknown key(s) in {source}: {', '.join(unknown)}; valid keys: {', '.join(names)}."
            )
        config = cls(**values)
        if config.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {config.precision!r}.")
        if config.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {config.optimizer!r}.")
        if not 0 < config.train_fraction <= 1:
            raise ValueError(f"train_fraction is a share of the meta-train classes in (0, 1], "
                             f"got {config.train_fraction}.")
        if config.time_budget < 0:
            raise ValueError(f"time_budget is in seconds and must be 0 (none) or positive, "
                             f"got {config.time_budget}.")
        if config.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every is in steps and must be 0 (at validation only) "
                             f"or positive, got {config.checkpoint_every}.")
        if config.task_chunk < 0:
            raise ValueError(f"task_chunk must be 0 (all tasks at once) or positive, "
                             f"got {config.task_chunk}.")
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"--set expects key=value (e.g. --set lr=0.0005), got {item!r}.")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (values parsed as YAML; ``a.b=1`` sets a nested option)."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        path, value = _parse_override(item)
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {item}: {part} is not a mapping of options.")
        target[path[-1]] = value
    return values


def find_config(name: str) -> Path:
    """A config file path, or the name of a built-in config such as ``omniglot/protonet-5w1s``."""
    path = Path(name)
    if path.is_file():
        return path
    builtin = resources.files("metalab") / "configs" / (name.removesuffix(".yaml") + ".yaml")
    if builtin.is_file():
        return Path(str(builtin))
    raise FileNotFoundError(
        f"no config file {name!r} (looked at {path.resolve()} and the built-in configs); "
        f"built-in configs: {', '.join(builtin_configs())}."
    )


def builtin_configs() -> list[str]:
    root = Path(str(resources.files("metalab") / "configs"))
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def load_config(name: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (path or built-in name) and apply ``--set`` overrides."""
    path = find_config(str(name))
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(values).__name__}.")
    return Config.from_dict(apply_overrides(values, overrides or []), source=str(path))
