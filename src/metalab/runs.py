"""Runs described by a :class:`~metalab.config.Config`: the objects a config names (task
sources, backbone, algorithm), and trained checkpoints loaded back and scored.

This is what ``Trainer.from_config``, the CLI and ``metalab compare`` use; a Python user can
build the same objects directly and hand them to :class:`metalab.train.Trainer`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metalab import data
from metalab.algorithms import ALGORITHMS, MetaLearner, TaskSpec, build_algorithm, task_spec
from metalab.checkpoint import check_compatible, read_checkpoint, recorded_config
from metalab.config import Config
from metalab.distributed import resolve_device
from metalab.evaluate import EvalResult, check_finite, evaluate
from metalab.models import build_backbone, use_batch_statistics
from metalab.tasks import TaskSource, fixed_episodes

__all__ = ["TEST_SEED", "build", "load_checkpoint", "optimization", "score_checkpoint",
           "task_sources"]

TEST_SEED = 1  # the fixed test episodes (as in the MAML reference code)


def task_sources(config: Config, split: str, train: bool, progress: bool = True) -> TaskSource:
    """The task source of ``split`` with the training or the test episode sizes
    (``progress``: a bar while the data are prepared, e.g. sentences encoded)."""
    sizes = ((config.n_way, config.k_shot, config.q_query) if train else
             (config.test_n_way, config.test_k_shot, config.test_q_query))
    fraction = config.train_fraction if train else 1.0
    options = {"progress": progress, **config.dataset_options}  # dataset_options' wins
    return data.task_source(config.dataset, split, *sizes, data_dir=config.data_dir,
                            class_fraction=fraction, seed=config.seed, **options)


def build(config: Config, tasks: TaskSource | TaskSpec) -> MetaLearner:
    """The algorithm and backbone the config names, sized for ``tasks`` (a task source, or
    the :class:`~metalab.algorithms.TaskSpec` a checkpoint recorded), seeded by the config."""
    spec = tasks if isinstance(tasks, TaskSpec) else task_spec(tasks)
    if config.backbone == "encoder-top":
        layers = config.backbone_options.get("layers", 2)
        given = config.dataset_options.get("top_layers", 0)
        if given != layers:  # else the data's token states sit below another layer
            raise ValueError(f"backbone encoder-top holds the encoder's last {layers} layers, "
                             f"so its data must be token states below them: set "
                             f"dataset_options.top_layers={layers} (it is {given}).")
    torch.manual_seed(config.seed)
    backbone = build_backbone(config.backbone, spec.input_shape, **config.backbone_options)
    return build_algorithm(config.algorithm, backbone, spec, **config.algorithm_options)


def optimization(config: Config, parameters: Iterable[nn.Parameter],
                 ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The config's optimiser (Adam, or SGD for Reptile's plain interpolation) over
    ``parameters`` and its step-decay schedule (``lr_decay`` every ``lr_decay_every`` steps)."""
    optimizers = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    optimizer = optimizers[config.optimizer](
        parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.lr_decay_every or 10**12, gamma=config.lr_decay)
    return optimizer, scheduler


def load_checkpoint(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[MetaLearner, Config]:
    """The trained algorithm in ``path`` (in eval mode) and the config that trained it.

    ``overrides`` change config fields that do not affect the weights (e.g. ``test_n_way``);
    ``algorithm_options`` in it are merged into the trained ones and may only name the
    algorithm's ``runtime_options`` (e.g. MAML's ``test_inner_steps``).
    """
    ckpt = read_checkpoint(path)
    trained = recorded_config(ckpt, path)
    overrides = dict(overrides or {})
    options = overrides.pop("algorithm_options", {})
    runtime = getattr(ALGORITHMS.get(ckpt["algorithm"]), "runtime_options", ())
    fixed = sorted(set(options) - set(runtime))
    if fixed:
        raise ValueError(f"{', '.join(fixed)} cannot change after training {ckpt['algorithm']}; "
                         f"options that can: {', '.join(runtime) or '(none)'}.")
    values = {**trained, **overrides}
    values["algorithm_options"] = {**trained["algorithm_options"], **options}
    config = Config.from_dict(values, source=str(path))
    check_compatible(ckpt, config, path)
    algo = build(config, TaskSpec.from_dict(ckpt["spec"]))
    try:
        algo.load_state_dict(ckpt["model"])
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit {config.algorithm} with backbone "
                         f"{config.backbone}: {error}") from error
    check_finite(algo, str(path))
    return algo.eval(), config


def score_checkpoint(
    path: str | Path, overrides: dict[str, Any] | None = None, episodes: int | None = None,
    seed: int = TEST_SEED, progress: bool = False, transductive: bool = False,
) -> tuple[MetaLearner, Config, EvalResult]:
    """The checkpoint's algorithm scored on fixed test episodes of its config's test split.

    ``overrides`` change test settings (e.g. ``test_n_way``); ``episodes`` defaults to the
    config's ``test_episodes``. ``transductive`` makes every BatchNorm normalise each batch it
    sees with that batch's statistics (the MAML convention; each call of the backbone is a
    batch, e.g. a task's support set, then its queries together) instead of the running
    statistics of training. Runs on the config's device.
    """
    algo, config = load_checkpoint(path, overrides)
    if transductive and getattr(algo, "batch_norm", "running") == "support":
        raise ValueError(f"{path} normalises every task with its support set's statistics "
                         f"(batch_norm: support), in training and at test; batch statistics "
                         f"do not apply to it. Evaluate it without --transductive-bn.")
    algo.check_ways(config.test_n_way)
    if transductive:
        use_batch_statistics(algo)
    device = resolve_device(config.device)
    source = task_sources(config, config.test_split, train=False, progress=progress)
    tasks = fixed_episodes(source, episodes or config.test_episodes, seed)
    return algo, config, evaluate(algo.to(device), tasks, source.kind, device, progress)
