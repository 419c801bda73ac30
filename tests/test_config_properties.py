"""Property-based tests over config values: any mapping of keys to values, written as YAML or
given as --set overrides, either loads as a valid config or is refused with an error that
names the file and an offending key. Never a traceback, never a silently wrong value."""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metalab.config import Config, ConfigError, load_config

KEYS = list(Config.model_fields)
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["1e-3", "5e-1", "-1", "0", "adam", "sgd", "bf16", "cuda:0", "auto",
                     "glyphs", "maml", "mlp", "train", "null", "~", "[1, 2]", "{a: 1}"]),
    st.text(max_size=12), st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.sampled_from(["inner_lr", "metric", "hidden"]), st.integers(0, 64),
                    max_size=2))
MAPPINGS = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=8)),
                           VALUES, max_size=6)
SETTINGS = settings(max_examples=400, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def check_valid(config: Config) -> None:
    """What a config that loaded promises: sizes and counts positive, rates in range."""
    for name in ("n_way", "k_shot", "q_query", "tasks_per_batch", "steps", "val_every",
                 "val_episodes", "test_episodes", "log_every"):
        assert isinstance(getattr(config, name), int) and getattr(config, name) >= 1, name
    assert math.isfinite(config.lr) and config.lr > 0
    assert 0 < config.lr_decay <= 1 and 0 < config.train_fraction <= 1
    assert config.grad_clip is None or (math.isfinite(config.grad_clip) and config.grad_clip > 0)
    assert config.optimizer in ("adam", "sgd") and config.precision in ("fp32", "bf16")


def load_or_refuse(path: Path, overrides: list[str] | None = None) -> None:
    try:
        config = load_config(path, overrides)
    except ConfigError as error:
        assert str(path) in str(error) or "--set" in str(error), error
        return
    check_valid(config)


@SETTINGS
@given(values=MAPPINGS)
def test_any_yaml_mapping_loads_valid_or_is_refused_by_name(values, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("config") / "run.yaml"
    path.write_text(yaml.safe_dump(values) if values else "# nothing\n")
    load_or_refuse(path)


@SETTINGS
@given(key=st.sampled_from(KEYS), raw=st.one_of(
    st.text(max_size=10).filter(lambda t: "\n" not in t), st.integers().map(str),
    st.floats().map(repr)))
def test_any_set_override_loads_valid_or_is_refused(key, raw, tmp_path_factory) -> None:
    load_or_refuse(Path("quick/default"), [f"{key}={raw}"])


@SETTINGS
@given(text=st.text(max_size=40))
def test_any_text_loads_valid_or_is_refused(text, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("config") / "run.yaml"
    path.write_text(text)
    load_or_refuse(path)
