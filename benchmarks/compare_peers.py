"""``metalab compare``'s shared rows against the peer libraries, trained and scored alike.

What is compared
    Four pairs, each trained on the same training episodes and scored on the same test
    episodes, one row per (library, algorithm):

    ========================  ==========================================================
    metalab                   peer
    ========================  ==========================================================
    ``maml``                  learn2learn ``l2l.algorithms.MAML``
    ``protonet``              easyfsl ``PrototypicalNetworks``
    ``matchingnet``           easyfsl ``MatchingNetworks``
    ``relationnet``           easyfsl ``RelationNetworks``
    ========================  ==========================================================

    Settings come from ``metalab.compare``'s ``suite_parts(suite)`` and
    ``part_config(part, algorithm)``: exactly the config ``metalab compare --suite SUITE``
    trains that algorithm with on each classification part of the suite (episode sizes,
    meta-batch, optimiser, learning rate and schedule, steps, validation, test episodes,
    seed); regression parts (the quick suite's sinusoid) have no peer here and are left out.

    * **metalab** runs through its public API: ``metalab.train.Trainer.from_config(config)``
      trains (validating every ``val_every`` steps and keeping ``best.pt``, in a temporary
      folder), then ``metalab.runs.load_checkpoint(best.pt)`` and
      ``metalab.evaluate.evaluate`` score it.
    * **the peer** gets a copy of the metalab model's initial weights before training: the
      same backbone module (a ``copy.deepcopy`` of metalab's ``Conv4``, as the config builds
      it), and, for MAML, the same linear head (learn2learn wraps
      ``nn.Sequential(backbone, Flatten, head)`` in ``l2l.algorithms.MAML(lr=inner_lr,
      first_order=...)``, as the config says). Each peer is wrapped in a small adapter that
      presents metalab's two-method interface (``meta_loss`` / ``adapt``, ``name``, ``spec``,
      ``kind``) by calling the peer's own API (easyfsl: ``process_support_set`` then
      ``forward``; learn2learn: ``clone()`` then ``adapt()``), so that the peer is trained by
      the same, real loop: a ``metalab.train.Trainer`` built from objects (the adapter, the
      config's task sources, an optimiser and schedule built from the config as
      ``Trainer.from_config`` builds metalab's, and every other setting of the config). Both
      sides therefore draw the same tasks (``metalab.tasks.sample_tasks(source, seed, step,
      share)``, checked: both draw through a :class:`RecordingSource`, and the run stops if a
      task's digest differs), back-propagate with ``metalab.train.meta_backward`` (the same
      ``task_chunk`` granularity and precision), take the same optimiser steps, schedule and
      gradient clipping for the same number of steps (or ``--budget`` seconds of training
      steps), validate on the same validation episodes every ``val_every`` steps and keep the
      best weights in ``best.pt`` (checked too: the run stops if the two trainers' settings,
      optimisers or schedules differ). ``evaluate`` then scores both, so the latencies are
      timed by the same code.

    Both sides are then scored on the same fixed test episodes
    (``fixed_episodes(test source, test_episodes, TEST_SEED)``), episode by episode: the
    per-episode accuracies give the mean and 95% CI (``metalab.evaluate.mean_ci95``) and a
    *paired* difference (metalab minus peer, same episodes); latencies are medians over
    episodes.

    Where the peers' APIs differ from metalab's algorithm, the difference stays and is written
    in the output (``notes`` per pair): e.g. easyfsl's ``MatchingNetworks`` always uses full
    context embeddings (FCE) while the quick suite's metalab ``matchingnet`` does not, easyfsl
    scores ProtoNet with ``-distance`` (metalab: ``-distance^2``) and embeds support and
    query in two backbone calls per task (separate BatchNorm statistics). ``--set
    ALGO:key=value`` changes metalab's config (e.g. ``--set
    matchingnet:algorithm_options.fce=true``) when a closer match is wanted; weights of
    modules both sides then share (FCE LSTMs, relation module) are copied too.

Columns
    accuracy (%) ± 95% CI; train seconds (wall) and CPU seconds of the training steps
    (validation excluded, as ``Trainer`` counts them) and steps; adaptation latency per task
    and query latency (median ms, ``evaluate``'s timers); parameters; peak memory (MiB,
    ``metalab.memory.PeakMemory``: on the CPU the peak resident set size above the level at
    entry) during training (the largest over the training chunks, validation and checkpoint
    writes included, on both sides alike) and during adaptation (taken as ``metalab
    compare`` takes it: adapting to the first ``ADAPT_MEMORY_EPISODES`` test tasks in one
    ``PeakMemory`` block); gradient steps at adaptation.

Methodology (a shared 2-core machine)
    Both libraries run in one process with ``torch.set_num_threads(--threads)`` (default 1:
    robust when other work shares the cores; set ``OMP_NUM_THREADS`` to the same value).
    Training is interleaved in chunks of ``val_every`` steps (chunk boundaries are the
    validation steps, and ``Trainer.fit(steps=...)`` called chunk by chunk follows the
    trajectory of one uninterrupted run), alternating which library goes first; evaluation
    is interleaved episode by episode, alternating the order too. Before each measured block
    freed memory is handed back to the OS (``malloc_trim``) so that one library's freed
    memory does not hide the other's peak. A check before training computes both sides'
    loss on the first training batch from the same weights (and, for MAML, the relative
    difference of the meta-gradients: learn2learn computes the same maths, so it must be
    tiny, 7e-8 on the quick suite); the same step warms up both sides' kernels.

    Each side is one training run (the config's seed). The CIs cover the choice of test
    episodes, not the spread between training runs: the MAML pair, the same maths to 1e-7,
    ended 2.3 points apart on the quick suite (rounding differences grow over 200 steps and
    the best-validation checkpoint can fall on another step). Read an accuracy difference of
    a few points between a pair as that, not as a property of the library.

Running (needs .venv-peers: ``bash benchmarks/setup_peers.sh``)
    OMP_NUM_THREADS=1 .venv-peers/bin/python benchmarks/compare_peers.py --quick  # smoke run
    OMP_NUM_THREADS=1 .venv-peers/bin/python benchmarks/compare_peers.py --suite quick
    ... --steps N | --budget 10m, --algorithms maml,protonet, --out DIR, --threads N

    Writes ``compare_peers-<suite>.json`` and ``.md`` (``--quick``: ``-quick`` added) to
    ``--out`` (default benchmarks/results). Without learn2learn or easyfsl (e.g. outside
    ``.venv-peers``) it stops and says how to create the environment.

Importing the peers
    learn2learn: ``maml_step.import_learn2learn`` (only ``learn2learn.algorithms.maml``).
    easyfsl: ``protonet_throughput.import_easyfsl`` registers a bare ``easyfsl.methods``
    package so that single method files load without the package ``__init__``.
    ``matching_networks.py`` and ``relation_networks.py`` also import
    ``easyfsl.modules.predesigned_modules``, which imports torchvision at module level (for
    its ResNet builders, never used here) and torchvision does not load beside the local CPU
    torch; when torchvision is not importable, :func:`import_easyfsl_methods` loads that file
    with a placeholder ``torchvision.models.resnet`` (whose classes raise if ever used),
    removed again right after, so easyfsl's real default encoders and relation module are
    what run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

try:
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn

    import metalab
    from maml_step import Peer, import_learn2learn, machine_info  # sibling benchmark scripts
    from metalab.algorithms import MetaLearner, TaskSpec
    from metalab.checkpoint import load_weights
    from metalab.compare import (
        ADAPT_MEMORY_EPISODES,
        Row,
        parse_budget,
        part_config,
        suite_parts,
        task_kind,
        task_label,
    )
    from metalab.config import Config, apply_overrides
    from metalab.distributed import resolve_device
    from metalab.evaluate import EvalResult, evaluate, mean_ci95
    from metalab.memory import PeakMemory
    from metalab.models import feature_shape
    from metalab.runs import TEST_SEED, load_checkpoint, optimization, task_sources
    from metalab.tasks import TaskBatch, TaskSource, fixed_episodes, sample_tasks
    from metalab.train import Trainer, TrainState, meta_backward
    from protonet_throughput import import_easyfsl
except ModuleNotFoundError as missing:
    sys.exit(f"compare_peers.py: {missing}. Run it with the peers' environment: "
             "`bash benchmarks/setup_peers.sh` creates .venv-peers (metalab, learn2learn, "
             "easyfsl), then `.venv-peers/bin/python benchmarks/compare_peers.py`.")

REPO = Path(__file__).resolve().parents[1]
METALAB_FILES = ("algorithms/base.py", "algorithms/maml.py", "algorithms/protonet.py",
                 "algorithms/matchingnet.py", "algorithms/relationnet.py",
                 "algorithms/pertask.py", "algorithms/parallel.py", "train.py", "runs.py",
                 "checkpoint.py", "kinds.py", "distributed.py", "evaluate.py", "tasks.py",
                 "compare.py", "memory.py", "models/__init__.py")
RESULTS = REPO / "benchmarks" / "results"
SETUP_HINT = ("run `bash benchmarks/setup_peers.sh` (it creates .venv-peers) and use "
              "`.venv-peers/bin/python benchmarks/compare_peers.py`")

# metalab algorithm -> (peer library, the peer's name for it)
PAIRS: dict[str, tuple[str, str]] = {
    "maml": ("learn2learn", "l2l.algorithms.MAML"),
    "protonet": ("easyfsl", "PrototypicalNetworks"),
    "matchingnet": ("easyfsl", "MatchingNetworks"),
    "relationnet": ("easyfsl", "RelationNetworks"),
}
QUICK = {"steps": 5, "val_episodes": 10, "test_episodes": 20}  # --quick's sizes


# --- importing the peers -----------------------------------------------------------------------


@contextlib.contextmanager
def placeholder_torchvision() -> Iterator[list[str]]:
    """While active, ``torchvision.models.resnet`` imports as a placeholder when torchvision
    itself cannot be imported; yields the notes to record."""
    notes: list[str] = []
    try:
        importlib.import_module("torchvision")
        available = True
    except Exception:  # not installed, or a build that does not load beside this torch
        available = False
    if available:
        yield notes
        return

    def unavailable(name: str) -> type:
        def fail(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"torchvision.models.resnet.{name} is a placeholder "
                               "(compare_peers.py): torchvision is not installed")
        return type(name, (), {"__init__": fail})

    names = ("torchvision", "torchvision.models", "torchvision.models.resnet")
    saved = {name: sys.modules.get(name) for name in names}
    resnet = types.ModuleType("torchvision.models.resnet")
    for name in ("BasicBlock", "Bottleneck"):
        setattr(resnet, name, unavailable(name))
    resnet.conv1x1 = unavailable("conv1x1")
    sys.modules.update({"torchvision": types.ModuleType("torchvision"),
                        "torchvision.models": types.ModuleType("torchvision.models"),
                        "torchvision.models.resnet": resnet})
    notes.append("easyfsl.modules.predesigned_modules loaded with a placeholder "
                 "torchvision.models.resnet (torchvision does not import here; only its "
                 "ResNet builders use it, never called)")
    try:
        yield notes
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def import_easyfsl_methods() -> Peer:
    """easyfsl's three method modules; ``Peer.module`` is the (bare) ``easyfsl.methods``."""
    base = import_easyfsl()  # registers the bare easyfsl.methods package
    if base.cls is None:
        return Peer("easyfsl", None, base.version, base.reason)
    try:
        import easyfsl

        if "easyfsl.modules" not in sys.modules:  # its __init__ imports ResNets: skip it
            modules = types.ModuleType("easyfsl.modules")
            modules.__path__ = [str(Path(easyfsl.__file__).parent / "modules")]
            modules.__package__ = "easyfsl.modules"
            sys.modules["easyfsl.modules"] = modules
        with placeholder_torchvision() as notes:
            for name in ("matching_networks", "relation_networks"):
                importlib.import_module(f"easyfsl.methods.{name}")
        return Peer("easyfsl", sys.modules["easyfsl.methods"], base.version, notes=[
            "imported easyfsl.methods.{prototypical,matching,relation}_networks only; "
            "easyfsl/methods/__init__.py and easyfsl/modules/__init__.py not run", *notes])
    except Exception as error:
        return Peer("easyfsl", None, base.version,
                    f"easyfsl {base.version} failed to import: {error!r}")


# --- the peers behind metalab's two-method interface -------------------------------------------


class Learn2LearnMAML(MetaLearner):
    """learn2learn's MAML: per task ``clone()``, ``adapt(support loss)`` ``inner_steps``
    times, query loss. At test time ``adapt(..., first_order=True)`` (no graph is needed)."""

    name, family = "l2l.algorithms.MAML", "optimization"

    def __init__(self, l2l: types.ModuleType, init: MetaLearner) -> None:
        if init.learn_inner_lr != "none":
            raise ValueError(f"learn_inner_lr={init.learn_inner_lr!r}: l2l.algorithms.MAML "
                             "has one fixed inner learning rate; compare with 'none'.")
        if not init.kind.classes:  # the losses below are cross-entropies over classes
            raise ValueError("compare_peers.py compares classification suites only.")
        super().__init__(init.spec)  # metalab's tasks: the Trainer reads spec and kind
        net = nn.Sequential(copy.deepcopy(init.backbone), nn.Flatten(), copy.deepcopy(init.head))
        self.maml = l2l.MAML(net, lr=init.inner_lr, first_order=init.first_order)
        self.inner_steps, self.test_inner_steps = init.inner_steps, init.test_inner_steps

    def _adapted(self, support_x: Tensor, support_y: Tensor, steps: int,
                 first_order: bool | None) -> nn.Module:
        learner = self.maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(support_x), support_y),
                          first_order=first_order)
        return learner

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        losses, correct = [], []
        for i in range(len(batch)):
            learner = self._adapted(batch.support_x[i], batch.support_y[i], self.inner_steps,
                                    None)
            output = learner(batch.query_x[i])
            losses.append(F.cross_entropy(output, batch.query_y[i]))
            correct.append((output.argmax(-1) == batch.query_y[i]).float().mean())
        return torch.stack(losses).mean(), {"accuracy": torch.stack(correct).mean().item()}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> nn.Module:
        with torch.enable_grad():  # evaluate() runs under no_grad; adapt() takes a gradient
            return self._adapted(support_x, support_y, self.test_inner_steps, True)

    def adaptation_steps(self) -> int:
        return self.test_inner_steps


class EasyFSL(MetaLearner):
    """An easyfsl ``FewShotClassifier``: per task ``process_support_set(support)`` then
    ``forward(query)``; the predictor is the model itself (it holds the support state)."""

    family = "metric"

    def __init__(self, model: nn.Module, name: str, loss: str, spec: TaskSpec) -> None:
        super().__init__(spec)  # metalab's tasks: the Trainer reads spec and kind
        self.model, self.name, self.loss = model, name, loss

    def task_loss(self, output: Tensor, target: Tensor) -> Tensor:
        if self.loss == "nll":  # MatchingNetworks returns log-probabilities
            return F.nll_loss(output, target)
        if self.loss == "mse":  # RelationNetworks returns relation scores in [0, 1]
            return F.mse_loss(output, F.one_hot(target, output.shape[-1]).to(output.dtype))
        if self.loss == "ce-logit":  # relation scores, cross-entropy on their logits
            return F.cross_entropy(torch.logit(output, eps=1e-6), target)
        return F.cross_entropy(output, target)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        losses, correct = [], []
        for i in range(len(batch)):
            self.model.process_support_set(batch.support_x[i], batch.support_y[i])
            output = self.model(batch.query_x[i])
            losses.append(self.task_loss(output, batch.query_y[i]))
            correct.append((output.argmax(-1) == batch.query_y[i]).float().mean())
        return torch.stack(losses).mean(), {"accuracy": torch.stack(correct).mean().item()}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> nn.Module:
        self.model.process_support_set(support_x, support_y)
        return self.model


def copy_weights(source: nn.Module, target: nn.Module) -> bool:
    """Copy ``source``'s parameters into ``target``'s, in order, if every shape matches."""
    src, dst = list(source.parameters()), list(target.parameters())
    if len(src) != len(dst) or any(s.shape != d.shape for s, d in zip(src, dst, strict=True)):
        return False
    with torch.no_grad():
        for s, d in zip(src, dst, strict=True):
            d.copy_(s)
    return True


def build_peer(algorithm: str, init: MetaLearner, config: Config,
               peers: dict[str, Peer]) -> tuple[MetaLearner, list[str]]:
    """The peer of metalab ``algorithm`` from metalab's initial model ``init``, and the
    differences between the two that stay."""
    shape = feature_shape(init.backbone, tuple(init.spec.input_shape))
    if algorithm == "maml":
        peer = Learn2LearnMAML(peers["learn2learn"].module, init)
        notes = [
            f"same network and initial weights (backbone + linear head), inner lr "
            f"{init.inner_lr}, {init.inner_steps} inner step(s), "
            f"{'first' if init.first_order else 'second'}-order; BatchNorm as metalab's "
            "(the backbone is a copy)",
            "learn2learn adapts at test time with adapt(first_order=True) under "
            "torch.enable_grad (it needs autograd.grad); metalab under no_grad",
            "tasks of a meta-batch: learn2learn one after the other (clone per task); "
            "metalab picks its own way (per-task loop, threads or vmap)"]
        return peer, notes
    methods = peers["easyfsl"].module
    backbone = copy.deepcopy(init.backbone)  # the same backbone module, same initial weights
    if algorithm == "protonet":
        model = methods.prototypical_networks.PrototypicalNetworks(backbone)
        notes = ["same backbone and initial weights; no other parameters on either side",
                 "easyfsl scores with -euclidean distance, metalab with -squared distance "
                 f"(metric={init.metric!r})"]
        return (EasyFSL(model, "PrototypicalNetworks", "ce", init.spec),
                notes + _easyfsl_common())
    if algorithm == "matchingnet":
        if len(shape) != 1:
            raise ValueError(f"MatchingNetworks needs flat features; the backbone gives {shape}")
        model = methods.matching_networks.MatchingNetworks(backbone, feature_dimension=shape[0])
        notes = ["same backbone and initial weights"]
        if init.fce:
            copied = (copy_weights(init.support_lstm, model.support_features_encoder)
                      and copy_weights(init.query_lstm, model.query_features_encoding_cell))
            notes.append("both use FCE; LSTM initial weights "
                         + ("copied from metalab's" if copied else "NOT copied (shapes differ)"))
            notes.append(f"FCE read steps: easyfsl one per support example, metalab "
                         f"fce_steps={init.fce_steps}")
        else:
            notes.append("easyfsl always uses full context embeddings (a BiLSTM over the "
                         "support set, an attention LSTM cell for the queries, initialised by "
                         "torch); this metalab config does not (fce=False): more parameters "
                         "and work on easyfsl's side. --set matchingnet:algorithm_options."
                         "fce=true compares FCE with FCE")
        scale = float(init.scale.detach())
        notes.append("similarity: easyfsl softmax(query . normalised support), no temperature; "
                     f"metalab softmax(s * cosine), s={scale:g} "
                     f"({'learned' if isinstance(init.scale, nn.Parameter) else 'fixed'})")
        return EasyFSL(model, "MatchingNetworks", "nll", init.spec), notes + _easyfsl_common()
    if algorithm == "relationnet":
        if len(shape) != 3:
            raise ValueError("RelationNetworks needs feature maps: the config's backbone must "
                             f"keep [C, H, W] (flatten: false); it gives {shape}")
        model = methods.relation_networks.RelationNetworks(backbone, feature_dimension=shape[0])
        copied = copy_weights(init.relation, model.relation_module)
        notes = [
            "same backbone (feature maps " + "x".join(map(str, shape)) + ") and initial weights",
            "relation module: easyfsl's default (conv-BN-ReLU-AdaptiveMaxPool(5x5), conv(no "
            "padding)-BN-ReLU-AdaptiveMaxPool(1x1), FC 8, FC 1, sigmoid; BatchNorm momentum 1); "
            "metalab's as in the paper (two conv-BN-ReLU-maxpool(2) blocks, FC 8, FC 1); "
            + ("same parameter shapes, initial weights copied from metalab's" if copied
               else "parameter shapes differ: each library's own initialisation"),
            f"class representation: easyfsl the mean of the support maps, metalab the "
            f"{init.aggregate} (identical for 1 shot)"]
        loss = {"mse": "mse", "ce": "ce-logit"}[init.loss]
        notes.append(f"loss: {init.loss} (metalab's option) on both sides"
                     + ("; easyfsl's output is the sigmoid, so cross-entropy takes its logit"
                        if init.loss == "ce" else ""))
        return EasyFSL(model, "RelationNetworks", loss, init.spec), notes + _easyfsl_common()
    raise ValueError(f"no peer for {algorithm}")


def _easyfsl_common() -> list[str]:
    return ["easyfsl calls the backbone twice per task, on the support set and on the query "
            "set, so in training mode BatchNorm normalises the two with separate statistics "
            "and updates its running statistics at each call, task after task; metalab embeds "
            "a task's support and query images in one call (shared statistics) and updates "
            "the running statistics its own way (metalab.algorithms.pertask)"]


# --- training: one real Trainer per side -------------------------------------------------------


class RecordingSource:
    """A task source that keeps a digest of every task it draws (and forwards everything
    else, ``kind`` included), so that the two sides of a pair, each drawing from its own
    source built from the same config, can be checked to train on the same tasks. Both sides
    draw through one, so both pay the (small) hashing inside their timed steps."""

    def __init__(self, source: TaskSource) -> None:
        self.source, self.digests = source, []

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        batch = self.source.sample(num_tasks, generator)
        for i in range(len(batch)):
            digest = hashlib.sha1()
            for t in (batch.support_x[i], batch.support_y[i], batch.query_x[i],
                      batch.query_y[i]):
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
            self.digests.append(digest.hexdigest()[:16])
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)


def same_tasks(a: RecordingSource, b: RecordingSource, what: str) -> int:
    """How many training tasks both sides drew, checked to be the same (else stop)."""
    count = min(len(a.digests), len(b.digests))
    for k in range(count):
        if a.digests[k] != b.digests[k]:
            sys.exit(f"compare_peers.py: {what}: training task {k} differs between metalab's "
                     "Trainer and the peer's: their task sources, built from the same config, "
                     "no longer draw the same task for the same (seed, step, index).")
    return count


def peer_trainer(peer: MetaLearner, tasks: RecordingSource, config: Config,
                 out: Path) -> Trainer:
    """A ``Trainer`` for ``peer`` built from objects: everything ``Trainer.from_config``
    takes from ``config`` for metalab's side, but the algorithm. It writes its checkpoints
    (``best.pt``: the best validated weights) to ``out``; it records no config, since no
    config can rebuild a peer (its weights load back with ``load_weights``)."""
    peer.to(resolve_device(config.device))  # before the optimiser, as from_config does
    optimizer, scheduler = optimization(config, peer.parameters())
    val_tasks = (None if config.val_split is None else
                 task_sources(config, config.val_split, train=False))
    return Trainer(peer, tasks, val_tasks=val_tasks, optimizer=optimizer, scheduler=scheduler,
                   steps=config.steps, tasks_per_batch=config.tasks_per_batch, seed=config.seed,
                   out=out, val_every=config.val_every, val_episodes=config.val_episodes,
                   log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                   time_budget=config.time_budget, task_chunk=config.task_chunk,
                   grad_clip=config.grad_clip, precision=config.precision,
                   device=config.device, progress=False)


def training_settings(trainer: Trainer) -> dict[str, Any]:
    """What two Trainers must share to train alike, their algorithms and tasks aside."""
    names = ("steps", "tasks_per_batch", "seed", "share", "val_every", "val_episodes",
             "checkpoint_every", "time_budget", "task_chunk", "grad_clip", "precision",
             "device", "kind")
    settings = {name: getattr(trainer, name) for name in names}
    settings["optimizer"] = (type(trainer.optimizer).__name__, trainer.optimizer.defaults)
    scheduler = trainer.scheduler
    settings["scheduler"] = (None if scheduler is None else
                             (type(scheduler).__name__, scheduler.state_dict()))
    return settings


def same_training(a: Trainer, b: Trainer, what: str) -> None:
    """Stop unless the two Trainers (still untrained) have the same settings, optimiser and
    schedule: ``peer_trainer`` mirrors ``Trainer.from_config``, which may change."""
    ours, theirs = training_settings(a), training_settings(b)
    differ = [name for name in ours if ours[name] != theirs[name]]
    if differ:
        sys.exit(f"compare_peers.py: {what}: the peer's Trainer differs from metalab's in "
                 + "; ".join(f"{n} ({ours[n]!r} vs {theirs[n]!r})" for n in differ)
                 + ". Update peer_trainer to build it as Trainer.from_config "
                 "builds metalab's.")


class Side:
    """One library's run of one algorithm: its Trainer (state and ``best.pt``), peaks,
    scores."""

    def __init__(self, library: str, algorithm: str, family: str, trainer: Trainer,
                 tasks: RecordingSource) -> None:
        self.library, self.algorithm, self.family = library, algorithm, family
        self.trainer, self.tasks = trainer, tasks
        self.train_peak: float | None = None
        self.adapt_peak: float | None = None
        self.scores: list[float] = []
        self.adapt_s: list[float] = []
        self.query_s: list[float] = []
        self.eval_seconds = 0.0
        self._best: MetaLearner | None = None

    @property
    def state(self) -> TrainState:
        return self.trainer.state

    def done(self) -> bool:
        """Whether training is over: all steps taken, or the time budget spent (where
        ``Trainer.fit`` stops by itself)."""
        trainer = self.trainer
        return (trainer.state.step >= trainer.steps
                or 0 < trainer.time_budget <= trainer.state.train_seconds)

    def fit(self, until: int) -> None:
        """Train up to step ``until``. Chunk boundaries at validation steps keep the
        trajectory (validations, ``best.pt``) of one uninterrupted ``fit``."""
        self.trainer.fit(steps=until - self.trainer.state.step)

    def model(self) -> MetaLearner:
        """The best validated weights (``best.pt``), in eval mode, on the trainer's device."""
        if self._best is None:
            self._best = self.load_best(self.trainer.out / "best.pt").to(self.trainer.device)
        return self._best.eval()

    def load_best(self, path: Path) -> MetaLearner:
        raise NotImplementedError


class MetalabSide(Side):
    """metalab's algorithm, as ``metalab compare`` trains and loads it: from the config."""

    def __init__(self, config: Config) -> None:
        trainer = Trainer.from_config(config, progress=False)
        self.raw_tasks = trainer.train_tasks  # for the first-step check, drawn unrecorded
        tasks = trainer.train_tasks = RecordingSource(self.raw_tasks)
        super().__init__("metalab", config.algorithm, type(trainer.algo).family, trainer, tasks)

    def load_best(self, path: Path) -> MetaLearner:
        algo, _ = load_checkpoint(path)  # rebuilt from the config that best.pt records
        return algo


class PeerSide(Side):
    """A peer behind its adapter, trained by a ``Trainer`` built from objects."""

    def __init__(self, library: str, peer: MetaLearner, config: Config, out: Path) -> None:
        tasks = RecordingSource(task_sources(config, config.train_split, train=True))
        super().__init__(library, peer.name, peer.family, peer_trainer(peer, tasks, config, out),
                         tasks)

    def load_best(self, path: Path) -> MetaLearner:
        load_weights(self.trainer.algo, path)  # into the adapter the Trainer trained
        return self.trainer.algo


# --- memory ------------------------------------------------------------------------------------


def _libc() -> Any:
    with contextlib.suppress(OSError):
        return ctypes.CDLL("libc.so.6")
    return None


LIBC = _libc()


def release_memory(collect: bool = False) -> None:
    """Hand freed heap memory back to the OS (glibc), so the next block's peak resident set
    size counts what it allocates even where another block freed memory before it."""
    if collect:
        gc.collect()
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)


def measured(side: Side, kind: str, work: Any, device: torch.device) -> Any:
    """Run ``work()`` under ``PeakMemory``; keep the largest peak as ``side.<kind>_peak``."""
    release_memory()
    with PeakMemory(device) as peak:
        out = work()
    if peak.mib is not None:
        attr = f"{kind}_peak"
        setattr(side, attr, max(peak.mib, getattr(side, attr) or 0.0))
    return out


# --- one pair ----------------------------------------------------------------------------------


def first_step_check(ml: MetaLearner, peer: MetaLearner, batch: TaskBatch,
                     config: Config, paired_grads: bool) -> dict[str, float]:
    """Loss on the first training batch from the same weights (on copies: also warms up
    both sides), and for MAML the relative difference of the meta-gradients."""
    out = {}
    grads = []
    for name, model in (("metalab", ml), ("peer", peer)):
        model = copy.deepcopy(model).train()
        loss, _ = meta_backward(model, batch, config.task_chunk, config.precision)
        out[f"{name}_first_loss"] = loss
        grads.append([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in model.parameters()])
    if paired_grads:
        a, b = torch.cat(grads[0]), torch.cat(grads[1])
        out["meta_gradient_rel_diff"] = float((a - b).norm() / a.norm())
    return out


def evaluate_interleaved(sides: list[Side], episodes: list[TaskBatch],
                         device: torch.device) -> None:
    """Score every test episode with both sides, alternating which goes first."""
    models = [side.model() for side in sides]
    count = 0
    for batch in episodes:
        for i in range(len(batch)):
            one = [batch[i]]
            order = [0, 1] if count % 2 == 0 else [1, 0]
            for k in order:
                side, model = sides[k], models[k]
                started = time.perf_counter()
                result: EvalResult = evaluate(model, one, device=device)  # model.kind
                side.eval_seconds += time.perf_counter() - started
                side.scores.append(result.mean)
                side.adapt_s.append(result.adapt_ms / 1e3)
                side.query_s.append(result.query_ms / 1e3)
            count += 1


def adapt_all(model: MetaLearner, episodes: list[TaskBatch], device: torch.device) -> None:
    """Adapt to every task of ``episodes`` (eval mode, no gradient), as ``metalab compare``
    does while it measures the adaptation peak."""
    model.eval()
    with torch.no_grad():
        for batch in episodes:
            batch = batch.to(device)
            for i in range(len(batch)):
                model.adapt(batch.support_x[i], batch.support_y[i])


def run_pair(algorithm: str, config: Config, peers: dict[str, Peer],
             log: Any) -> dict[str, Any]:
    ml = MetalabSide(config)
    device = ml.trainer.device
    peer_model, notes = build_peer(algorithm, ml.trainer.algo, config, peers)
    library = PAIRS[algorithm][0]
    peer = PeerSide(library, peer_model, config, Path(f"{config.out}-{library}"))
    same_training(ml.trainer, peer.trainer, algorithm)
    first = sample_tasks(ml.raw_tasks, config.seed, 0, ml.trainer.share).to(device)
    check = first_step_check(ml.trainer.algo, peer.trainer.algo, first, config,
                             algorithm == "maml")
    log(f"== {algorithm} vs {library} {peer.algorithm}: "
        + ", ".join(f"{k} {v:.3g}" for k, v in check.items()))

    sides: list[Side] = [ml, peer]
    boundary, chunk = 0, 0
    while not all(side.done() for side in sides):
        boundary = min(boundary + config.val_every, config.steps)
        for side in sides if chunk % 2 == 0 else sides[::-1]:
            if not side.done():
                release_memory(collect=True)
                measured(side, "train", partial(side.fit, boundary), device)
        chunk += 1
        check["same_training_tasks"] = same_tasks(ml.tasks, peer.tasks, algorithm)
        log("   " + "; ".join(f"{s.library} step {s.state.step} "
                              f"({s.state.train_seconds:.1f} s)" for s in sides))

    test_source = task_sources(config, config.test_split, train=False)
    episodes = fixed_episodes(test_source, config.test_episodes, TEST_SEED)
    release_memory(collect=True)
    evaluate_interleaved(sides, episodes, device)
    # The adaptation peak as metalab compare takes it: adapting to the first
    # ADAPT_MEMORY_EPISODES test tasks in one PeakMemory block (here one side after the other).
    first_tasks = fixed_episodes(test_source, ADAPT_MEMORY_EPISODES, TEST_SEED)
    for side in sides[::-1]:
        measured(side, "adapt", partial(adapt_all, side.model(), first_tasks, device), device)
    rows = [row_of(side, task_label(config, ml.trainer.kind)) for side in sides]
    for row in rows:
        log(f"   {row['library']:<12} {row['mean']:.2f}% ± {row['ci95']:.2f}, adapt "
            f"{row['adapt_ms']:.2f} ms, query {row['query_ms']:.2f} ms")
    diffs = [a - b for a, b in zip(ml.scores, peer.scores, strict=True)]
    diff, diff_ci = mean_ci95(diffs)
    return {
        "algorithm": algorithm, "peer": {"library": library, "algorithm": peer.algorithm},
        "notes": notes, "check": check, "rows": rows,
        "paired_accuracy_difference": {"metalab_minus_peer": diff, "ci95": diff_ci},
        "config": config.to_dict(),
        "per_episode": {s.library: {"accuracy": [round(a, 2) for a in s.scores],
                                    "adapt_ms": [round(t * 1e3, 3) for t in s.adapt_s],
                                    "query_ms": [round(t * 1e3, 3) for t in s.query_s]}
                        for s in sides},
    }


ROW_COLUMNS = [f.name for f in fields(Row)]  # metalab compare's columns, in its order


def row_of(side: Side, task: str) -> dict[str, Any]:
    """The side's row: ``library``, then ``metalab.compare.Row``'s columns (``None`` for one
    this script does not compute), then the columns only this script has."""
    model = side.model()
    mean, ci = mean_ci95(side.scores)
    values = {
        "task": task, "algorithm": side.algorithm, "family": side.family,
        "kind": model.kind.name, "metric": model.kind.metric, "mean": mean, "ci95": ci,
        "train_seconds": side.state.train_seconds,
        "train_cpu_seconds": side.state.cpu_seconds, "train_steps": side.state.step,
        "adapt_ms": statistics.median(side.adapt_s) * 1e3,
        "query_ms": statistics.median(side.query_s) * 1e3,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_peak_mib": side.train_peak, "adapt_peak_mib": side.adapt_peak,
        "adapt_grad_steps": model.adaptation_steps(), "episodes": len(side.scores),
        "eval_seconds": side.eval_seconds, "best_validation_accuracy": side.state.best,
    }
    shared = {name: values.pop(name, None) for name in ROW_COLUMNS if name != "run_dir"}
    return {"library": side.library, **shared, **values}


# --- reporting ---------------------------------------------------------------------------------


def _f(value: float | None, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else spec.format(value)


def markdown(pairs: list[dict[str, Any]]) -> str:
    lines = ["| metalab X vs peer Y | task | library | algorithm | accuracy ± 95% CI | "
             "train s (CPU s) / steps | adapt ms | query ms | params | train peak MiB | "
             "adapt peak MiB | adapt grad steps |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for pair in pairs:
        label = f"{pair['algorithm']} vs {pair['peer']['library']}"
        for i, r in enumerate(pair["rows"]):
            lines.append(
                f"| {label if i == 0 else ''} | {r['task']} | {r['library']} | "
                f"{r['algorithm']} | "
                f"{_f(r['mean'], '{:.2f}')}% ± {_f(r['ci95'], '{:.2f}')} | "
                f"{r['train_seconds']:.1f} ({r['train_cpu_seconds']:.1f}) / {r['train_steps']} "
                f"| {r['adapt_ms']:.2f} | {r['query_ms']:.2f} | {r['parameters']:,} | "
                f"{_f(r['train_peak_mib'], '{:.0f}')} | {_f(r['adapt_peak_mib'], '{:.1f}')} | "
                f"{r['adapt_grad_steps']} |")
    lines += ["", "| metalab X vs peer Y | accuracy metalab − peer (paired 95% CI) | "
              "train time peer / metalab (wall; CPU) | adapt latency peer / metalab | "
              "query latency peer / metalab | train peak peer / metalab |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for pair in pairs:
        ml, peer = pair["rows"]
        d = pair["paired_accuracy_difference"]

        def ratio(key: str, ml: dict[str, Any] = ml, peer: dict[str, Any] = peer) -> str:
            a, b = ml[key], peer[key]
            return "n/a" if not a or b is None else f"{b / a:.2f}x"

        lines.append(
            f"| {pair['algorithm']} vs {peer['library']} {peer['algorithm']} | "
            f"{_f(d['metalab_minus_peer'], '{:+.2f}')} ± {_f(d['ci95'], '{:.2f}')} | "
            f"{ratio('train_seconds')}; {ratio('train_cpu_seconds')} | {ratio('adapt_ms')} | "
            f"{ratio('query_ms')} | "
            f"{ratio('train_peak_mib')} |")
    return "\n".join(lines)


def notes_markdown(pairs: list[dict[str, Any]]) -> str:
    lines = []
    for pair in pairs:
        lines.append(f"**{pair['algorithm']} vs {pair['peer']['library']} "
                     f"{pair['peer']['algorithm']}**")
        c = pair["config"]
        lines.append(
            f"- settings (both sides): {c['dataset']}, {c['n_way']}-way {c['k_shot']}-shot "
            f"{c['q_query']}-query, {c['tasks_per_batch']} task(s) per step, {c['optimizer']} "
            f"lr {c['lr']:g}, {c['backbone']} {c['backbone_options']}, "
            f"{c['algorithm']} options {c['algorithm_options']}; validation every "
            f"{c['val_every']} steps on {c['val_episodes']} episodes (best weights kept); test "
            f"{c['test_n_way']}-way {c['test_k_shot']}-shot {c['test_q_query']}-query")
        lines += [f"- {note}" for note in pair["notes"]]
        check = dict(pair["check"])
        tasks = check.pop("same_training_tasks", None)
        first = ", ".join(f"{k} {v:.4g}" for k, v in check.items())
        lines += [f"- first training batch, same weights: {first}",
                  f"- training tasks checked identical on both sides (digests): {tasks}", ""]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="metalab compare's shared rows against learn2learn (MAML) and easyfsl "
        "(ProtoNet, MatchingNet, RelationNet): same training tasks, initial weights, "
        "optimiser and steps, same test episodes. Run with .venv-peers/bin/python "
        "(bash benchmarks/setup_peers.sh).",
        epilog="The module docstring (python -m pydoc benchmarks/compare_peers.py) describes "
               "the methodology.")
    parser.add_argument("--suite", default="quick",
                        help="a built-in suite of metalab compare or a YAML config (default "
                             "quick)")
    parser.add_argument("--algorithms", default=",".join(PAIRS),
                        help=f"comma-separated metalab algorithms (default: {','.join(PAIRS)})")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="training steps for every run (default: "
                        "the suite config's; --quick: 5)")
    budget.add_argument("--budget", metavar="DURATION",
                        help="instead of steps: time of training steps per run, as metalab "
                             "compare takes it (90, 90s, 10m, 1h)")
    parser.add_argument("--test-episodes", type=int,
                        help="test episodes (default: the config's; --quick: 20)")
    parser.add_argument("--set", action="append", default=[], metavar="ALGO:KEY=VALUE",
                        help="override metalab's config of ALGO (e.g. "
                             "matchingnet:algorithm_options.fce=true); repeatable")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1); set OMP_NUM_THREADS too")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 5 steps, 10 validation and 20 test episodes")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for compare_peers-<suite>.json/.md (default "
                             "benchmarks/results)")
    args = parser.parse_args(argv)
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = sorted(set(args.algorithms) - set(PAIRS))
    if unknown or not args.algorithms:
        parser.error(f"unknown algorithm(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(PAIRS)}")
    if args.threads < 1 or (args.steps is not None and args.steps < 1) or (
            args.test_episodes is not None and args.test_episodes < 1):
        parser.error("--threads, --steps and --test-episodes must be >= 1")
    if args.budget is not None:
        try:
            args.budget = parse_budget(args.budget)
        except ValueError as error:
            parser.error(str(error))
    overrides: dict[str, list[str]] = {}
    for item in args.set:
        algo, sep, assignment = item.partition(":")
        if not sep or algo not in PAIRS or "=" not in assignment:
            parser.error(f"--set expects ALGO:key=value with ALGO one of {', '.join(PAIRS)}; "
                         f"got {item!r}")
        overrides.setdefault(algo, []).append(assignment)
    args.overrides = overrides
    return args


def configs_for(args: argparse.Namespace) -> tuple[list[tuple[str, Config]], list[str]]:
    """The (algorithm, config) runs: every algorithm on each classification part of the
    suite, configured by ``metalab.compare.part_config`` as ``metalab compare`` does; and the
    parts left out (whose tasks are not classification, e.g. regression: no peer here)."""
    runs, skipped = [], []
    for part in suite_parts(args.suite):
        if not task_kind(part_config(part, "protonet")).classes:
            skipped.append(part)
            continue
        for algorithm in args.algorithms:
            config = part_config(part, algorithm)
            if algorithm in args.overrides:
                config = Config.from_dict(apply_overrides(config.to_dict(),
                                                          args.overrides[algorithm]))
            if args.quick:
                config.val_episodes = min(config.val_episodes, QUICK["val_episodes"])
                config.test_episodes = QUICK["test_episodes"]
                if args.steps is None and args.budget is None:
                    config.steps = QUICK["steps"]
            if args.steps is not None:
                config.steps = args.steps
            if args.budget is not None:
                config.steps, config.time_budget = 10**9, args.budget
            config.val_every = min(config.val_every, config.steps)
            if args.test_episodes is not None:
                config.test_episodes = args.test_episodes
            runs.append((algorithm, config))
    return runs, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wanted = {PAIRS[a][0] for a in args.algorithms}
    importers = {"learn2learn": import_learn2learn, "easyfsl": import_easyfsl_methods}
    peers = {name: importers[name]() for name in sorted(wanted)}
    missing = [p for p in peers.values() if p.module is None]
    if missing:
        reasons = "; ".join(p.error if p.version else f"{p.name} is not installed"
                            for p in missing)
        sys.exit(f"compare_peers.py: cannot compare without the peer libraries: {reasons} "
                 f"for {sys.executable}. To create their environment, {SETUP_HINT}.")
    try:
        configs, skipped = configs_for(args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"compare_peers.py: {error}")
    if not configs:
        sys.exit(f"compare_peers.py: suite {args.suite} has no classification tasks; the "
                 "peers compared here are classification methods.")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started, load_start = time.time(), os.getloadavg()
    root = Path(metalab.__file__).parent  # the code this run imported (the tree may change)
    files_at_start = {name: hashlib.sha256((root / name).read_bytes()).hexdigest()[:12]
                      for name in METALAB_FILES if (root / name).is_file()}
    log(f"compare_peers: suite {args.suite}, {torch.get_num_threads()} thread(s), "
        f"load average {load_start[0]:.2f}"
        + "".join(f"; part {part} left out (not classification: no peer)" for part in skipped))
    pairs = []
    with tempfile.TemporaryDirectory(prefix="compare_peers-") as folder:
        for index, (algorithm, config) in enumerate(configs):
            config.out = str(Path(folder) / f"{index}-{algorithm}")
            pairs.append(run_pair(algorithm, config, peers, log))
    table = markdown(pairs)
    print(table)

    stem = "compare_peers-" + Path(args.suite).stem + ("-quick" if args.quick else "")
    command = ("OMP_NUM_THREADS={t} .venv-peers/bin/python benchmarks/compare_peers.py "
               .format(t=os.environ.get("OMP_NUM_THREADS", "unset"))
               + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    machine = machine_info(args.threads, peers) | {
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "metalab_files_sha256_at_start": files_at_start}
    budget = (f"{args.budget:g} s of training steps per run" if args.budget else
              "steps: " + ", ".join(f"{a} {c.steps}" for a, c in configs))
    report = {
        "benchmark": "compare_peers", "suite": args.suite, "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_seconds": time.time() - started,
        "budget": budget, "threads": args.threads, "quick": args.quick,
        "overrides": args.overrides, "parts_left_out": skipped, "machine": machine, "pairs": pairs,
        "columns": {
            "mean/ci95": "accuracy % on the fixed test episodes (TEST_SEED), mean and 95% CI "
                         "(metalab.evaluate.mean_ci95 over per-episode accuracies)",
            "train_seconds": "wall seconds of the training steps (sampling included, "
                             "validation excluded); train_cpu_seconds: their CPU time",
            "adapt_ms/query_ms": "medians over the test episodes (metalab.evaluate timers)",
            "train_peak_mib": "largest PeakMemory over the interleaved training chunks "
                              "(validation included)",
            "adapt_peak_mib": f"PeakMemory while adapting to the first "
                              f"{ADAPT_MEMORY_EPISODES} test tasks (as metalab compare)",
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1)
    # Lists of numbers (the per-episode values) on one line each.
    text = re.sub(r"\[\n\s*(-?[\d.e+-]+(?:,\n\s*-?[\d.e+-]+)*)\n\s*\]",
                  lambda m: "[" + re.sub(r",\n\s*", ", ", m[1]) + "]", text)
    (args.out / f"{stem}.json").write_text(text + "\n")
    cpu = machine.get("cpu_model", "unknown CPU")
    (args.out / f"{stem}.md").write_text(
        f"# metalab vs peers: suite `{args.suite}`\n\n"
        f"`{command}`\n\n"
        f"{report['created']}; {budget}; test episodes: "
        + ", ".join(f"{a} {c.test_episodes}" for a, c in configs)
        + f"; {args.threads} torch thread(s) on {cpu} ({machine.get('logical_cpus')} logical "
        f"CPUs), load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
        f"torch {torch.__version__}, "
        + ", ".join(f"{name} {p.version}" for name, p in peers.items())
        + f"; wall time {report['wall_seconds'] / 60:.1f} min.\n\n"
        + table + "\n\n"
        "Accuracy: mean over the same test episodes with the 95% CI; the paired difference "
        "uses the per-episode differences. Each side is one training run (the config's seed): "
        "the CIs cover the choice of test episodes, not the spread between training runs, so "
        "a difference of a point or two may be the run, not the library (the MAML pair "
        "computes the same maths, see its gradient check, and can still end apart). "
        "Times: training steps only (validation excluded), "
        "CPU seconds in brackets; latencies are medians per task. Peak memory: "
        "metalab.memory.PeakMemory (CPU: peak resident set size above the level at entry), "
        "training: the largest over the training chunks (validation included); adaptation: "
        f"adapting to the first {ADAPT_MEMORY_EPISODES} test tasks, as metalab compare "
        "measures it. Freed heap memory is handed back to the OS before each measured "
        "block.\n\n"
        "## Differences that stay\n\n" + notes_markdown(pairs))
    print(f"\nwrote {args.out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
