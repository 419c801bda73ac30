"""Run configuration: a validated, frozen schema, read from YAML files that build on a base.

A config file holds the keys of :class:`Config` it sets; ``base: NAME`` starts from another
config (a built-in name such as ``omniglot/maml-5w1s``, or a path relative to the file) and
the file's keys override it, option mappings (``algorithm_options``, ...) key by key::

    # omniglot/fomaml-5w1s.yaml: MAML's Omniglot setup, first order
    base: omniglot/maml-5w1s
    algorithm: fomaml

``out`` is not inherited: it defaults to ``runs/<config name>``. ``--set key=value`` overrides
are applied last. A file that says ``kind: rl`` is a meta-reinforcement-learning run, checked
against :class:`metalab.rl.run.RLConfig` instead of :class:`Config`. Values are parsed as
YAML 1.2 numbers (``1e-3`` is a number), checked for type and range by a pydantic schema,
and the result is frozen: a bad value is an error that names the key and the file before
anything trains.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

if TYPE_CHECKING:
    from metalab.rl.run import RLConfig

__all__ = ["Config", "ConfigError", "Schema", "apply_overrides", "builtin_configs", "find_config",
           "load_config", "read_config"]

Positive = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]


class ConfigError(ValueError):
    """A config that cannot be read or does not validate; the message names file and key."""


class Schema(BaseModel):
    """A frozen, validated run configuration: unknown keys and non-finite numbers are
    errors that name the key and the file."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True,
                              allow_inf_nan=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> Self:
        """Build and validate from a mapping; any error names ``source`` and the key."""
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise ConfigError(_explain(error, source, cls)) from None

    def replace(self, **changes: Any) -> Self:
        """A validated copy with ``changes`` applied."""
        return self.from_dict({**self.to_dict(), **changes}, source="replace()")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


class Config(Schema):
    """Everything that defines a training run. Defaults: ProtoNet on the embedded glyphs.

    Training episodes are ``n_way``-way ``k_shot``-shot with ``q_query`` queries per class,
    ``tasks_per_batch`` per optimiser step; validation and test episodes use the ``test_*``
    sizes. The learning rate is multiplied by ``lr_decay`` every ``lr_decay_every`` steps.
    With ``val_split: null`` nothing is validated and the final weights are the ones scored:
    the protocol of a rerun on train+val for a step count chosen on a validated run (Snell et
    al. 2017 trained their published Omniglot models so). Frozen: :meth:`replace` returns a
    changed, validated copy.
    """

    algorithm: str = "protonet"
    algorithm_options: dict[str, Any] = Field(default_factory=dict)
    backbone: str = "conv4"
    backbone_options: dict[str, Any] = Field(default_factory=dict)
    dataset: str = "glyphs"
    dataset_options: dict[str, Any] = Field(default_factory=dict)
    data_dir: str | None = None
    train_split: str = "train"
    # <1: meta-train on this share of the train split's alphabets
    train_fraction: float = Field(1.0, gt=0, le=1)
    val_split: str | None = "val"  # None: no validation; best.pt is the latest weights
    test_split: str = "test"
    n_way: Positive = 5
    k_shot: Positive = 1
    q_query: Positive = 15
    tasks_per_batch: Positive = 1
    task_chunk: Count = 0  # >0: back-propagate this many tasks at a time (bounds memory)
    test_n_way: Positive = 5
    test_k_shot: Positive = 1
    test_q_query: Positive = 15
    steps: Positive = 1000
    time_budget: float = Field(0.0, ge=0)  # >0: stop once training steps took this many s
    optimizer: Literal["adam", "sgd"] = "adam"  # SGD: Reptile's plain interpolation
    lr: float = Field(1e-3, gt=0)
    lr_decay: float = Field(0.5, gt=0, le=1)
    lr_decay_every: Count = 0  # 0: constant learning rate
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)  # None: no clipping
    val_every: Positive = 250
    checkpoint_every: Count = 0  # >0: also write last.pt every this many steps
    val_episodes: Positive = 200
    test_episodes: Positive = 600
    log_every: Positive = 10
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast the training forward pass
    seed: Count = 0
    device: str = "auto"
    out: str = "runs/default"

    @field_validator("algorithm", "backbone", "dataset")
    @classmethod
    def _registered(cls, name: str, info: ValidationInfo) -> str:
        registry = _registries()[info.field_name]
        if name not in registry:
            raise ValueError(f"unknown {info.field_name} {name!r}; available: "
                             f"{', '.join(sorted(registry))}")
        return name

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return device


def _registries() -> dict[str, Iterable[str]]:
    """The registries that name algorithms, backbones and data sets (imported when needed:
    they import most of metalab, and users add to them before loading a config)."""
    from metalab.algorithms import ALGORITHMS
    from metalab.data import DATASETS
    from metalab.models import BACKBONES

    return {"algorithm": ALGORITHMS, "backbone": BACKBONES, "dataset": DATASETS}


def _explain(error: ValidationError, source: str, schema: type[BaseModel]) -> str:
    """One line per invalid key: the key, what is wrong, the value given."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(config)"
        if item["type"] == "extra_forbidden":
            names = ", ".join(schema.model_fields)
            lines.append(f"unknown key {key!r}; valid keys: {names}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {message} (got {item.get('input')!r})")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 numbers: ``1e-3`` and ``5e-1`` are floats (YAML 1.1 wants a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _parse(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source} is not valid YAML: {error}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. --set lr=0.0005), got {item!r}.")
    key, raw = item.split("=", 1)
    return key.strip().split("."), _parse(raw, f"--set {item}")


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (values parsed as YAML; ``a.b=1`` sets a nested option)."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        path, value = _parse_override(item)
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {item}: {part} is not a mapping of options.")
        target[path[-1]] = value
    return values


def _configs_root() -> Path:
    return Path(str(resources.files("metalab") / "configs"))


def find_config(name: str, relative_to: Path | None = None) -> Path:
    """A config file path (relative to ``relative_to`` if given, else to the working
    directory), or the name of a built-in config such as ``omniglot/protonet-5w1s``."""
    path = (relative_to / name) if relative_to is not None else Path(name)
    if path.is_file():
        return path
    builtin = _configs_root() / (name.removesuffix(".yaml") + ".yaml")
    if builtin.is_file():
        return builtin
    raise FileNotFoundError(
        f"no config file {name!r} (looked at {path.resolve()} and the built-in configs); "
        f"built-in configs: {', '.join(builtin_configs())}."
    )


def builtin_configs() -> list[str]:
    """Names of the built-in configs (files whose name starts with ``_`` are only bases)."""
    root = _configs_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")
                  if not p.name.startswith("_"))


def _merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """``base`` overridden by ``delta``; mappings (option dicts) merge key by key."""
    merged = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The values of the config file ``path`` with its ``base`` chain resolved (without
    ``out``, which is never inherited)."""
    if path.resolve() in chain:
        names = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"config bases form a cycle: {names}.")
    text = path.read_text()
    if not text.strip() or all(line.lstrip().startswith("#") for line in text.splitlines()
                               if line.strip()):
        raise ConfigError(f"{path} is empty; a config sets some keys (see 'metalab train -h') "
                          "or starts from another with 'base: NAME'.")
    values = _parse(text, str(path))
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got "
                          f"{type(values).__name__}.")
    base = values.pop("base", None)
    if base is None:
        return values
    try:
        base_path = find_config(str(base), relative_to=path.parent)
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: base {base!r} not found. {error}") from None
    inherited = read_config(base_path, (*chain, path.resolve()))
    inherited.pop("out", None)
    return _merge(inherited, values)


def load_config(name: str | os.PathLike, overrides: list[str] | None = None,
                ) -> Config | RLConfig:
    """Read a config (path or built-in name), resolve its bases, apply ``--set`` overrides
    and validate: a :class:`Config`, or an ``RLConfig`` for ``kind: rl``. ``out`` defaults to
    ``runs/<config name>``."""
    path = find_config(str(name))
    values = read_config(path)
    root = _configs_root()
    label = (str(path.relative_to(root).with_suffix("")) if path.is_relative_to(root)
             else path.stem)
    values.setdefault("out", f"runs/{label}")
    source = str(path) + (f" with --set {' '.join(overrides)}" if overrides else "")
    values = apply_overrides(values, overrides or [])
    if values.get("kind") == "rl":
        from metalab.rl.run import RLConfig

        return RLConfig.from_dict(values, source=source)
    return Config.from_dict(values, source=source)
