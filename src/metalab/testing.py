"""The common checks every algorithm passes, per task kind (as scikit-learn's
``check_estimator`` checks every estimator).

    from metalab.testing import check_algorithm
    check_algorithm("protonet")                      # every check, on every kind it supports
    check_algorithm("maml", kinds=["regression"])

Each check builds a small instance of the algorithm on a small, seeded task source of one
kind (:data:`SETUPS`) and asserts one promise of the two-method interface: shapes, same seed
same result, a gradient for every parameter, ``adapt`` never mutates the model, the tasks of a
meta-batch never affect each other (float64, exact to 1e-9), a save/load round trip, and
learning (better than an untrained model after a short training). A check fails with an
``AssertionError`` that names the algorithm, the kind and what went wrong.

An algorithm describes its small instance and its exemptions itself:
``check_options`` (its options for a quick instance), ``check_backbone_options`` (merged into
the setup's backbone options) and ``check_exemptions`` (``{check: reason}``, where ``check`` is
a check's name, or ``name:kind`` for one kind only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from metalab.algorithms import ALGORITHMS, MetaLearner, build_algorithm, task_spec
from metalab.data.sinusoid import SinusoidTasks
from metalab.evaluate import evaluate
from metalab.kinds import TaskKind, get_kind
from metalab.models import build_backbone
from metalab.tasks import ClassDataset, EpisodeSampler, TaskBatch, TaskSource, fixed_episodes
from metalab.train import meta_backward

__all__ = ["CHECKS", "SETUPS", "CheckSetup", "check_algorithm", "checks", "easy_dataset",
           "make_algorithm", "run_check"]


def easy_dataset(num_classes: int = 30, per_class: int = 20, size: int = 16,
                 seed: int = 0) -> ClassDataset:
    """Classes that are fixed random binary patterns plus light noise: easy to tell apart."""
    gen = torch.Generator().manual_seed(seed)
    templates = (torch.rand(num_classes, 1, 1, size, size, generator=gen) > 0.5).float()
    noise = 0.15 * torch.randn(num_classes, per_class, 1, size, size, generator=gen)
    data = ((templates + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return ClassDataset(data, [f"pattern{i}" for i in range(num_classes)])


@dataclass(frozen=True)
class CheckSetup:
    """Small, seeded tasks of one kind to run the checks on: ``train`` and ``test`` task
    sources (``test`` holds tasks never trained on) and the backbone to build (by name and
    options, as configs name them)."""

    train: TaskSource
    test: TaskSource
    backbone: str
    backbone_options: dict[str, Any] = field(default_factory=dict)
    learn_steps: int = 40  # the learning check: steps, tasks per step, Adam's learning rate
    learn_tasks: int = 4
    learn_lr: float = 3e-3
    # the score the trained model must beat, given the untrained model's
    learn_bar: Callable[[float], float] = field(default=lambda untrained: 60.0)

    @property
    def kind(self) -> TaskKind:
        return self.train.kind


def classification_setup() -> CheckSetup:
    """5-way 1-shot 5-query episodes of 16x16 patterns, 20 training and 10 test classes.
    A trained model must beat 60% accuracy (chance: 20%; an untrained metric learner already
    separates these patterns well, so the bar is absolute)."""
    data = easy_dataset(num_classes=30, size=16)
    train = ClassDataset(data.data[:20], data.names[:20])
    test = ClassDataset(data.data[20:], data.names[20:])
    return CheckSetup(EpisodeSampler(train, 5, 1, 5), EpisodeSampler(test, 5, 1, 5),
                      "conv4", {"hidden": 16})


def regression_setup() -> CheckSetup:
    """10-shot 10-query sinusoid regression (Finn et al. 2017) with a 2x32 MLP. A trained
    model must have a 20% lower error than the untrained one."""
    tasks = SinusoidTasks(k_shot=10, q_query=10)
    return CheckSetup(tasks, tasks, "mlp", {"hidden": (32, 32)}, learn_steps=300,
                      learn_tasks=10, learn_lr=1e-2, learn_bar=lambda untrained: 0.8 * untrained)


# kind name -> the setup its checks run on; a new kind adds its own.
SETUPS: dict[str, Callable[[], CheckSetup]] = {
    "classification": classification_setup,
    "regression": regression_setup,
}


def make_algorithm(name: str, setup: CheckSetup, seed: int = 0) -> MetaLearner:
    """A small instance of ``name`` for ``setup``'s tasks (the algorithm's check options)."""
    cls = ALGORITHMS[name]
    spec = task_spec(setup.train)
    torch.manual_seed(seed)
    backbone = build_backbone(setup.backbone, spec.input_shape,
                              **{**setup.backbone_options, **cls.check_backbone_options})
    options = {**cls.check_options.get("*", {}), **cls.check_options.get(setup.kind.name, {})}
    return build_algorithm(name, backbone, spec, **options)


def _batch(source: TaskSource, tasks: int = 3, seed: int = 0) -> TaskBatch:
    return source.sample(tasks, torch.Generator().manual_seed(seed))


# -- the checks: (name, setup) -> None, raising AssertionError --------------------------------

def check_shapes(name: str, setup: CheckSetup) -> None:
    """A finite scalar loss, float metrics, and a predictor that returns ``[Q, outputs]`` for
    any number of queries."""
    algo = make_algorithm(name, setup)
    batch = _batch(setup.train)
    loss, metrics = algo.meta_loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss), f"loss {loss}"
    assert all(isinstance(v, float) for v in metrics.values()), f"metrics {metrics}"
    task = batch.task(0)
    algo.eval()
    with torch.no_grad():
        predictor = algo.adapt(task.support_x, task.support_y)
        for queries in (len(task.query_x), 3):
            shape = tuple(predictor(task.query_x[:queries]).shape)
            expected = (queries, algo.spec.outputs)
            assert shape == expected, f"predictor output {shape}, expected {expected}"


def check_deterministic(name: str, setup: CheckSetup) -> None:
    """The same seed gives the same loss and the same predictions."""
    batch = _batch(setup.train)
    task = batch.task(0)
    losses, outputs = [], []
    for _ in range(2):
        algo = make_algorithm(name, setup, seed=3)
        losses.append(algo.meta_loss(batch)[0].item())
        algo.eval()
        with torch.no_grad():
            outputs.append(algo.adapt(task.support_x, task.support_y)(task.query_x))
    assert losses[0] == losses[1], f"losses {losses}"
    assert torch.equal(outputs[0], outputs[1]), "predictions differ between two same-seed runs"


def check_gradient_reaches_every_parameter(name: str, setup: CheckSetup) -> None:
    """Every parameter gets a finite meta-gradient, nonzero unless the loss does not depend on
    the parameter at all (a bias added to every class's logit alike, which softmax ignores:
    its gradient is zero up to rounding, and exactly zero on some CPUs)."""
    algo = make_algorithm(name, setup)
    batch = _batch(setup.train)
    loss, _ = algo.meta_loss(batch)
    loss.backward()
    for pname, param in algo.named_parameters():
        assert param.grad is not None, f"no gradient for {pname}"
        assert torch.isfinite(param.grad).all(), f"non-finite gradient for {pname}"
        if param.grad.abs().sum() == 0:
            with torch.no_grad():
                param.add_(1.0)
                shifted, _ = algo.meta_loss(batch)
                param.sub_(1.0)
            assert torch.isclose(shifted, loss, rtol=1e-5), \
                f"zero gradient for {pname}, though the loss depends on it"


def check_adapt_does_not_mutate(name: str, setup: CheckSetup) -> None:
    """``adapt`` and its predictor leave every parameter and buffer as they were."""
    algo = make_algorithm(name, setup).eval()
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    task = _batch(setup.test).task(0)
    with torch.no_grad():
        algo.adapt(task.support_x, task.support_y)(task.query_x)
    after = algo.state_dict()
    assert before.keys() == after.keys(), "adapt added or removed state"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"adapt changed {changed}"


def check_tasks_independent(name: str, setup: CheckSetup) -> None:
    """In float64, one pass over 5 tasks gives the loss, gradients and buffers of the tasks
    taken one at a time: no task of a meta-batch affects another, so a meta-batch can be split
    into chunks or over processes exactly."""
    batch = _batch(setup.train, tasks=5).to("cpu", torch.float64)
    results = []
    for chunk in (0, 1):
        algo = make_algorithm(name, setup).double().train()
        loss, _ = meta_backward(algo, batch, task_chunk=chunk)
        grads = {n: p.grad.clone() for n, p in algo.named_parameters() if p.grad is not None}
        buffers = {k: v for k, v in algo.state_dict().items() if v.is_floating_point()}
        results.append((loss, grads, buffers))
    (loss, grads, buffers), (loss1, grads1, buffers1) = results
    assert math.isclose(loss, loss1, rel_tol=1e-12), f"loss {loss} in one pass, {loss1} per task"
    assert grads and grads.keys() == grads1.keys(), "gradients differ in which parameters"
    for key in [*grads, *buffers]:
        ours, theirs = (grads[key], grads1[key]) if key in grads else (buffers[key],
                                                                       buffers1[key])
        torch.testing.assert_close(theirs, ours, rtol=1e-9, atol=1e-12, msg=key)


def check_save_load_round_trip(name: str, setup: CheckSetup) -> None:
    """A state dict saved and loaded (``weights_only``) into a differently seeded instance
    predicts exactly like the original."""
    import io

    algo = make_algorithm(name, setup, seed=1)
    loss, _ = algo.meta_loss(_batch(setup.train))
    loss.backward()
    torch.optim.SGD(algo.parameters(), lr=0.1).step()  # move away from the initial weights
    buffer = io.BytesIO()
    torch.save(algo.state_dict(), buffer)
    buffer.seek(0)
    clone = make_algorithm(name, setup, seed=2)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    task = _batch(setup.test).task(0)
    algo.eval()
    clone.eval()
    with torch.no_grad():
        a = algo.adapt(task.support_x, task.support_y)(task.query_x)
        b = clone.adapt(task.support_x, task.support_y)(task.query_x)
    assert torch.allclose(a, b, atol=1e-6), "the loaded model predicts differently"


def check_learns(name: str, setup: CheckSetup) -> None:
    """After a short meta-training, the score on 100 fixed test tasks (never trained on)
    beats the setup's bar (``learn_bar`` of the untrained model's score)."""
    algo = make_algorithm(name, setup)
    episodes = fixed_episodes(setup.test, 100, seed=1)
    before = evaluate(algo, episodes).mean
    optimizer = torch.optim.Adam(algo.parameters(), lr=setup.learn_lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(setup.learn_steps):
        loss, _ = algo.meta_loss(setup.train.sample(setup.learn_tasks, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate(algo, episodes).mean
    bar = setup.learn_bar(before)
    assert setup.kind.better(after, bar), (
        f"{setup.kind.metric} {after:.4g} after training (untrained {before:.4g}) does not "
        f"beat {bar:.4g}")


def check_predictor_state_round_trip(name: str, setup: CheckSetup) -> None:
    """An adapted predictor written as a state (:mod:`metalab.predictors`), saved, loaded
    with ``weights_only`` and restored, predicts exactly like the original."""
    from metalab.predictors import predictor_state, restore_predictor, state_bytes, state_from_bytes

    algo = make_algorithm(name, setup).eval()
    task = _batch(setup.test).task(0)
    with torch.no_grad():
        predictor = algo.adapt(task.support_x, task.support_y)
        restored = restore_predictor(state_from_bytes(state_bytes(
            predictor_state(predictor, algo))), algo)
        a, b = predictor(task.query_x), restored(task.query_x)
    assert torch.equal(a, b), "the restored predictor predicts differently"


CHECKS: dict[str, Callable[[str, CheckSetup], None]] = {
    check.__name__: check for check in (
        check_shapes, check_deterministic, check_gradient_reaches_every_parameter,
        check_adapt_does_not_mutate, check_tasks_independent, check_save_load_round_trip,
        check_predictor_state_round_trip, check_learns)
}


def checks(names: Iterable[str] | None = None, kinds: Iterable[str | TaskKind] | None = None,
           ) -> Iterator[tuple[str, str, str, str | None]]:
    """``(algorithm, kind, check, exemption)`` for every registered algorithm (or ``names``),
    every kind of :data:`SETUPS` it supports (or ``kinds``) and every check; ``exemption`` is
    the algorithm's reason to skip the check, or None. For ``pytest.mark.parametrize``."""
    kinds = [get_kind(k).name for k in (kinds or SETUPS)]
    for name in sorted(names or ALGORITHMS):
        cls = ALGORITHMS[name]
        for kind in kinds:
            if not cls.supports(get_kind(kind)):
                continue
            for check in CHECKS:
                exempt = cls.check_exemptions
                yield name, kind, check, exempt.get(f"{check}:{kind}", exempt.get(check))


def run_check(name: str, kind: str, check: str) -> None:
    """Run one check of ``name`` on ``kind``'s setup; the error names all three."""
    try:
        CHECKS[check](name, SETUPS[kind]())
    except AssertionError as error:
        raise AssertionError(f"{name} on {kind} tasks, {check}: {error}") from error


def check_algorithm(name: str, kinds: Iterable[str | TaskKind] | None = None) -> None:
    """Every common check of algorithm ``name`` on every kind it supports (or ``kinds``),
    apart from those it declares exempt; raises ``AssertionError`` at the first failure."""
    for algorithm, kind, check, exemption in checks([name], kinds):
        if exemption is None:
            run_check(algorithm, kind, check)
