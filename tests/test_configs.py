"""Configs: a base plus small deltas, validated (types and ranges) and frozen.

Every built-in config resolves to the effective values it had before configs were written as
bases and deltas (``fixtures/builtin_configs.json``), apart from the deliberate corrections
listed here; bad values are clear errors that name the key and the file."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from pydantic import ValidationError

from metalab.config import Config, ConfigError, builtin_configs, load_config

FIXTURE = Path(__file__).parent / "fixtures" / "builtin_configs.json"
MAML_SCHEDULE = {"steps": 13000, "time_budget": 5340.0, "lr_decay_every": 4500,
                 "val_every": 1000, "val_episodes": 300}
# Deliberate corrections: FOMAML, ANIL and Meta-SGD take MAML's Omniglot schedule (their
# configs had kept the one MAML replaced); Meta-SGD says its test steps are its training
# steps; the quick suite's runs no longer share one output folder.
CORRECTIONS = {
    "omniglot/fomaml-5w1s": MAML_SCHEDULE,
    "omniglot/anil-5w1s": MAML_SCHEDULE,
    "omniglot/metasgd-5w1s": {**MAML_SCHEDULE, "algorithm_options": {
        "inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": None}},
    **{f"quick/{name}": {"out": f"runs/quick/{name}"} for name in (
        "default", "finetune", "relationnet", "reptile", "sinusoid-cnp", "sinusoid-default",
        "sinusoid-pretrained", "sinusoid-reptile")},
}


def test_every_builtin_config_resolves_to_its_recorded_values() -> None:
    recorded = json.loads(FIXTURE.read_text())
    assert builtin_configs() == sorted(recorded)
    for name in builtin_configs():
        expected = {**recorded[name], **CORRECTIONS.get(name, {})}
        assert load_config(name).to_dict() == expected, name


def test_builtin_configs_are_small_deltas() -> None:
    root = Path(str(resources.files("metalab") / "configs"))
    lines = [line for path in root.rglob("*.yaml") for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    # 1,063 before bases and deltas, 246 after; 304 with movielens/ and ett/ (issue 21); 402
    # with rl/ (issue 18); 425 with the BANKING77 configs that fine-tune the encoder's top; 431
    # with their trainval variants
    assert len(lines) < 450


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_config_builds_on_a_builtin_or_a_file(tmp_path) -> None:
    config = load_config(write(tmp_path, "base: omniglot/maml-5w1s\nalgorithm_options: "
                                         "{inner_lr: 1e-1}\nlr: 5e-4\n"))
    assert config.lr == 0.0005 and config.out == "runs/run"  # out is never inherited
    assert config.algorithm_options == {"inner_steps": 1, "test_inner_steps": 3, "inner_lr": 0.1}
    write(tmp_path, "base: run.yaml\nsteps: 10\n", "child.yaml")
    child = load_config(tmp_path / "child.yaml", ["lr_decay=5e-1", "grad_clip=1e0"])
    assert (child.steps, child.lr, child.lr_decay, child.grad_clip) == (10, 0.0005, 0.5, 1.0)


def test_configs_are_frozen() -> None:
    config = load_config("quick/default")
    with pytest.raises(ValidationError, match="frozen"):
        config.steps = 3
    changed = config.replace(steps=3)
    assert changed.steps == 3 and config.steps == 200
    with pytest.raises(ConfigError, match="steps: Input should be greater than or equal to 1"):
        config.replace(steps=0)


# (file text or --set overrides, the message it must give); every one names key and file
BAD = [
    ("lr: fast\n", r"lr: Input should be a valid number.*\(got 'fast'\)"),
    ("steps: 2.5\n", r"steps: Input should be a valid integer.*\(got 2.5\)"),
    ("grad_clip: -1\n", r"grad_clip: Input should be greater than 0 \(got -1\)"),
    ("lr_decay: -1\n", r"lr_decay: Input should be greater than 0 \(got -1\)"),
    ("lr_decay: 2\n", r"lr_decay: Input should be less than or equal to 1 \(got 2\)"),
    ("val_every: 0\n", r"val_every: Input should be greater than or equal to 1 \(got 0\)"),
    ("tasks_per_batch: 0\n", r"tasks_per_batch: Input should be greater than or equal to 1"),
    ("optimizer: adamw\n", r"optimizer: Input should be 'adam' or 'sgd' \(got 'adamw'\)"),
    ("precision: fp16\n", r"precision: Input should be 'fp32' or 'bf16'"),
    ("device: gpu\n", r"device: must be auto, cpu, cuda, cuda:N or mps \(got 'gpu'\)"),
    ("algorithm: mamll\n", r"algorithm: unknown algorithm 'mamll'; available: anil,"),
    ("dataset: omniglott\n", r"dataset: unknown dataset 'omniglott'; available:"),
    ("learning_rate: 0.1\n", r"unknown key 'learning_rate'; valid keys: algorithm,"),
    ("train_fraction: 0\n", r"train_fraction: Input should be greater than 0"),
    ("lr: [0.1\n", r"is not valid YAML: while parsing a flow sequence"),
    ("", r"is empty; a config sets some keys"),
    ("# only a comment\n", r"is empty; a config sets some keys"),
    ("- lr\n", r"must hold a mapping of config keys, got list"),
    ("base: nowhere/none\n", r"base 'nowhere/none' not found"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[t.split(":")[0] or "empty"
                                                         for t, _ in BAD])
def test_bad_values_are_clear_errors_naming_key_and_file(text, message, tmp_path) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_bad_overrides_and_cycles(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"default.yaml with --set lr=-1e-3:\n  lr: Input "
                                          r"should be greater than 0 \(got -0.001\)"):
        load_config("quick/default", ["lr=-1e-3"])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config("quick/default", ["lr"])
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="config bases form a cycle"):
        load_config(tmp_path / "a.yaml")


def test_from_dict_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"invalid config my-run:\n  n_way: .* \(got 0\)"):
        Config.from_dict({"n_way": 0}, source="my-run")
