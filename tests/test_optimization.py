"""The optimization-based family against a plain reference written independently.

The reference below is what the papers write down, one task at a time: an explicit forward
pass over a list of tensors (BatchNorm from mean/var primitives, not ``F.batch_norm``), the
inner loop with ``torch.autograd.grad`` and the outer gradient of the mean query loss. Every
algorithm's meta-gradient must equal it to 1e-6 relative in float64, for an MLP and for a
network with BatchNorm, with 1 and 3 inner steps, second and first order.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.algorithms import TaskSpec, build_algorithm
from metalab.data import task_source
from metalab.evaluate import evaluate
from metalab.models import build_backbone
from metalab.tasks import EpisodeSampler, TaskBatch, fixed_episodes
from metalab.train import meta_backward

from .conftest import easy_dataset

N_WAY, SHAPE = 3, (1, 6, 6)
LR = 0.3


def mlp_backbone() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())


def conv_backbone() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten())


def reference_forward(kind: str, params: list[Tensor], x: Tensor) -> Tensor:
    """The networks above written out by hand (batch statistics for BatchNorm)."""
    if kind == "mlp":
        w1, b1, w2, b2, wh, bh = params
        h = F.relu(F.linear(F.relu(F.linear(x.flatten(1), w1, b1)), w2, b2))
    else:
        wc, bc, gamma, beta, wh, bh = params
        h = F.conv2d(x, wc, bc, padding=1)
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = (h - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
        h = F.max_pool2d(F.relu(h), 2).flatten(1)
    return F.linear(h, wh, bh)


def reference_meta_gradient(
    name: str, kind: str, params: list[Tensor], lrs: list[Tensor] | None, batch: TaskBatch,
    steps: int, first_order: bool, inner_batch_size: int | None = None,
) -> list[Tensor]:
    """Gradient of the outer objective with respect to ``params`` (and ``lrs``), task by task.
    Reptile's inner step ``s`` trains on examples ``s*b .. (s+1)*b - 1`` (mod the task's
    size) of support and query together when ``inner_batch_size`` ``b`` is given."""
    leaves = [p.detach().clone().requires_grad_() for p in params]
    lr_leaves = [a.detach().clone().requires_grad_() for a in lrs] if lrs else None
    adapted_from = len(leaves) - 2 if name == "anil" else 0  # ANIL adapts the head only
    total = 0.0
    for i in range(len(batch)):
        sx, sy, qx, qy = (batch.support_x[i], batch.support_y[i],
                          batch.query_x[i], batch.query_y[i])
        if name == "reptile":
            sx, sy = torch.cat([sx, qx]), torch.cat([sy, qy])
        fast = list(leaves)
        for step in range(steps):
            window = slice(None)
            if inner_batch_size:
                window = [(step * inner_batch_size + j) % len(sy) for j in range(inner_batch_size)]
            loss = F.cross_entropy(reference_forward(kind, fast, sx[window]), sy[window])
            grads = torch.autograd.grad(loss, fast[adapted_from:],
                                        create_graph=not first_order)
            for j, g in enumerate(grads, start=adapted_from):
                step = lr_leaves[j] if lr_leaves else LR
                fast[j] = fast[j] - step * (g.detach() if first_order else g)
        if name == "reptile":
            total = total + sum(0.5 * (p - q.detach()).pow(2).sum()
                                for p, q in zip(leaves, fast, strict=True))
        else:
            total = total + F.cross_entropy(reference_forward(kind, fast, qx), qy)
    return list(torch.autograd.grad(total / len(batch), leaves + (lr_leaves or [])))


CASES = [  # (algorithm, options); first_order is spelled out where the algorithm has a choice
    ("maml", {"first_order": False}),
    ("maml", {"first_order": True}),
    ("fomaml", {}),
    ("anil", {"first_order": False}),
    ("anil", {"first_order": True}),
    ("metasgd", {"first_order": False}),
    ("metasgd", {"first_order": True}),
    ("reptile", {}),
    ("reptile", {"inner_batch_size": 6}),  # 15 examples a task: the third window wraps
]


@pytest.fixture(scope="module")
def batch() -> TaskBatch:
    sampler = EpisodeSampler(easy_dataset(num_classes=8, size=6), n_way=N_WAY, k_shot=2,
                             q_query=3)
    return sampler.sample(3, torch.Generator().manual_seed(0)).to("cpu", torch.float64)


LAYOUTS = {  # how the tasks of a meta-batch are computed
    "loop": {"task_workers": 1, "vectorize": False},
    "threads": {"task_workers": 2, "vectorize": False},
    "vmap": {"vectorize": True},
}
# vmap is only used without BatchNorm (inexact through F.batch_norm on torch 2.13).
MODELS = [("mlp", "loop"), ("mlp", "threads"), ("mlp", "vmap"), ("conv", "loop"),
          ("conv", "threads")]


@pytest.mark.parametrize(("kind", "layout"), MODELS)
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize(("name", "options"), CASES)
def test_meta_gradient_equals_reference(name, options, steps, kind, layout, batch) -> None:
    torch.manual_seed(0)
    backbone = mlp_backbone() if kind == "mlp" else conv_backbone()
    spec = TaskSpec(kind="classification", n_way=N_WAY, input_shape=SHAPE)
    algo = build_algorithm(name, backbone, spec, inner_steps=steps, inner_lr=LR,
                           **LAYOUTS[layout], **options).double()
    lrs = None
    if name == "metasgd":  # learned per-weight step sizes: start them away from uniform
        with torch.no_grad():
            for alpha in algo.inner_lrs.values():
                alpha.uniform_(0.1, 0.5)
        lrs = list(algo.inner_lrs.values())
    params = [p for n, p in algo.named_parameters() if not n.startswith("inner_lrs")]
    expected = reference_meta_gradient(name, kind, params, lrs, batch, steps,
                                       first_order=name in ("fomaml", "reptile")
                                       or options.get("first_order", False),
                                       inner_batch_size=options.get("inner_batch_size"))
    loss, _ = algo.meta_loss(batch)
    loss.backward()
    got = [p.grad for p in params] + ([a.grad for a in lrs] if lrs else [])
    scale = torch.cat([e.flatten() for e in expected]).norm()
    for g, e in zip(got, expected, strict=True):
        # Relative to the whole meta-gradient: some entries are exactly zero in theory (a
        # conv bias feeding a BatchNorm in training mode) and only round-off in practice.
        error = (g - e).norm() / scale
        assert error < 1e-6, f"{name} {options} {kind} steps={steps}: relative error {error:.2e}"
    if kind == "conv":
        assert params[1].grad.abs().max() < 1e-12 * scale  # BatchNorm cancels the conv bias


def test_threads_are_deterministic_and_match_the_loop(batch) -> None:
    results = []
    for workers in (1, 2, 2, 3):
        torch.manual_seed(0)
        spec = TaskSpec(kind="classification", n_way=N_WAY, input_shape=SHAPE)
        algo = build_algorithm("metasgd", conv_backbone(), spec, inner_steps=2,
                               task_workers=workers).double()
        loss, metrics = algo.meta_loss(batch)
        loss.backward()
        results.append((loss.item(), metrics,
                        torch.cat([p.grad.flatten() for p in algo.parameters()])))
    assert results[1][0] == results[2][0] and torch.equal(results[1][2], results[2][2])
    for loss, metrics, grad in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-12)
        assert metrics == pytest.approx(results[0][1], rel=1e-12)
        assert torch.allclose(grad, results[0][2], rtol=1e-10, atol=1e-14)


def test_per_step_learned_lrs_are_used_per_step(batch) -> None:
    torch.manual_seed(0)
    spec = TaskSpec(kind="classification", n_way=N_WAY, input_shape=SHAPE)
    algo = build_algorithm("maml", mlp_backbone(), spec, inner_steps=3,
                           learn_inner_lr="layer_step").double()
    loss, _ = algo.meta_loss(batch)
    loss.backward()
    for alpha in algo.inner_lrs.values():
        assert alpha.shape == (3,)
        assert (alpha.grad != 0).all()  # each step's size gets its own meta-gradient


def test_task_chunks_give_the_same_gradient(batch) -> None:
    grads = []
    for chunk in (0, 1, 2):
        torch.manual_seed(0)
        spec = TaskSpec(kind="classification", n_way=N_WAY, input_shape=SHAPE)
        algo = build_algorithm("maml", conv_backbone(), spec, inner_steps=2).double()
        meta_backward(algo, batch, task_chunk=chunk)
        grads.append(torch.cat([p.grad.flatten() for p in algo.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-15)
    assert torch.allclose(grads[0], grads[2], rtol=1e-12, atol=1e-15)


def test_running_batch_norm_is_not_transductive(batch) -> None:
    torch.manual_seed(0)
    spec = TaskSpec(kind="classification", n_way=N_WAY, input_shape=SHAPE)
    algo = build_algorithm("maml", conv_backbone(), spec, batch_norm="running").double()
    algo.meta_loss(batch)  # updates the running statistics
    algo.eval()
    task = batch.task(0)
    predictor = algo.adapt(task.support_x, task.support_y)
    together = predictor(task.query_x)
    alone = torch.cat([predictor(task.query_x[i:i + 1]) for i in range(len(task.query_x))])
    assert torch.allclose(together, alone, atol=1e-12)  # each query classified on its own

    transductive = build_algorithm("maml", conv_backbone(), spec).double().eval()
    predictor = transductive.adapt(task.support_x, task.support_y)
    assert not torch.allclose(predictor(task.query_x[:2]), predictor(task.query_x)[:2])


def test_bad_options_are_clear() -> None:
    spec = TaskSpec(kind="classification", n_way=N_WAY, input_shape=SHAPE)
    with pytest.raises(ValueError, match="learn_inner_lr must be one of"):
        build_algorithm("maml", mlp_backbone(), spec, learn_inner_lr="sometimes")
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        build_algorithm("maml", mlp_backbone(), spec, batch_norm="frozen")
    with pytest.raises(ValueError, match="at least 1"):
        build_algorithm("maml", mlp_backbone(), spec, inner_steps=0)


def test_adapting_more_steps_fits_the_support_set_better(batch) -> None:
    torch.manual_seed(0)
    spec = TaskSpec(kind="classification", n_way=N_WAY, input_shape=SHAPE)
    algo = build_algorithm("maml", mlp_backbone(), spec, inner_lr=0.1).double().eval()
    task, losses = batch.task(0), []
    for steps in (1, 5, 20):
        algo.test_inner_steps = steps
        with torch.no_grad():
            output = algo.adapt(task.support_x, task.support_y)(task.support_x)
        losses.append(F.cross_entropy(output, task.support_y).item())
    assert losses[0] > losses[1] > losses[2]
    assert algo.adaptation_steps() == 20


# -- regression: the MAML sinusoid setup ----------------------------------------------------

# (algorithm, its options beyond the inner learning rate of 0.01 and 5 adaptation steps)
REGRESSORS = [("maml", {}), ("fomaml", {}), ("anil", {}),
              # Meta-SGD learns its step sizes for the one training step; five overshoot
              ("metasgd", {"test_inner_steps": 1}), ("reptile", {"inner_lr": 0.02}),
              ("anil", {"head_solver": "ridge", "ridge_precision": 1.0})]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "extra"), REGRESSORS,
                         ids=[name + "-ridge" * ("head_solver" in extra)
                              for name, extra in REGRESSORS])
def test_learns_sinusoids(name: str, extra: dict) -> None:
    """A short meta-training on sinusoids (K=10) makes adaptation work on new ones."""
    torch.manual_seed(0)
    train = task_source("sinusoid", "train", 0, 10, 10)
    spec = TaskSpec(kind="regression", n_way=0, input_shape=(1,), output_dim=1)
    options = {"inner_lr": 0.01, "test_inner_steps": 5, **extra}
    algo = build_algorithm(name, build_backbone("mlp", (1,), hidden=(40, 40)), spec, **options)
    episodes = fixed_episodes(task_source("sinusoid", "test", 0, 10, 10), 50, seed=1)
    before = evaluate(algo, episodes, kind="regression").mean
    optimizer = torch.optim.Adam(algo.parameters(), lr=0.01)  # high, to learn in 300 steps
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        optimizer.zero_grad()
        meta_backward(algo, train.sample(5, generator))
        optimizer.step()
    after = evaluate(algo, episodes, kind="regression").mean
    # Untrained, the MSE is the signal's power (about 4.2). Observed after 300 steps: MAML 0.9,
    # ANIL 1.5, Meta-SGD 0.9, Reptile 0.6.
    assert after < 0.5 * before, f"{name}: MSE {before:.2f} -> {after:.2f}"


def test_reptile_inner_minibatches_hold_every_class_equally(batch) -> None:
    spec = TaskSpec(kind="classification", n_way=N_WAY, input_shape=SHAPE)
    algo = build_algorithm("reptile", mlp_backbone(), spec, inner_steps=4,
                           inner_batch_size=2 * N_WAY)
    labels = torch.cat([batch.support_y[0], batch.query_y[0]])  # 15 examples, 5 per class
    windows = algo.inner_batches(len(labels))
    assert len(windows) == 4
    for window in windows:
        assert torch.bincount(labels[window], minlength=N_WAY).tolist() == [2] * N_WAY
    # A window as large as the task is the whole task: the full-batch inner loop.
    whole = build_algorithm("reptile", mlp_backbone(), spec, inner_steps=2,
                            inner_batch_size=len(labels))
    assert whole.inner_batches(len(labels)) == [slice(None)] * 2
    with pytest.raises(ValueError, match="inner_batch_size must be at least 1"):
        build_algorithm("reptile", mlp_backbone(), spec, inner_batch_size=0)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "metasgd"])
@pytest.mark.parametrize("network", ["conv4-batchnorm", "mlp"])
def test_vectorize_is_exact_or_refused(name: str, steps: int, network: str) -> None:
    """vmap over the tasks equals the per-task loop to 1e-6 relative in float64, or, where it
    cannot (second order through BatchNorm), vectorize=True is refused."""
    from metalab.models import MLP, Conv4
    from metalab.tasks import EpisodeSampler
    from metalab.testing import easy_dataset

    sampler = EpisodeSampler(easy_dataset(10, size=16), 5, 1, 3)
    batch = sampler.sample(4, torch.Generator().manual_seed(0)).to("cpu", torch.float64)
    spec = TaskSpec(kind="classification", n_way=5, input_shape=(1, 16, 16))

    def backbone() -> torch.nn.Module:
        return Conv4(hidden=8) if network == "conv4-batchnorm" else MLP(256, hidden=(32,))

    grads = []
    for vectorize in (False, True):
        torch.manual_seed(0)
        try:
            algo = build_algorithm(name, backbone(), spec, inner_steps=steps,
                                   vectorize=vectorize, task_workers=1).double()
        except ValueError as error:
            assert vectorize and network == "conv4-batchnorm" and name in ("maml", "metasgd")
            assert "would compute a wrong meta-gradient" in str(error)
            # and rightly: past the refusal, vmap's meta-gradient is more than 1e-2 off
            torch.manual_seed(0)
            algo = build_algorithm(name, backbone(), spec, inner_steps=steps,
                                   task_workers=1).double()
            algo.vectorize = True
            loss, _ = algo.meta_loss(batch)
            loss.backward()
            wrong = torch.cat([p.grad.flatten() for p in algo.parameters()])
            assert ((wrong - grads[0]).norm() / grads[0].norm()).item() > 1e-2
            return
        loss, _ = algo.meta_loss(batch)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in algo.parameters()]))
    assert not (network == "conv4-batchnorm" and name in ("maml", "metasgd"))
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 1e-6


# -- ANIL with the head solved in closed form (head_solver="ridge") ----------------------------

def sinusoid_batch(tasks: int = 4, seed: int = 0) -> TaskBatch:
    source = task_source("sinusoid", "train", 0, 5, 7)
    return source.sample(tasks, torch.Generator().manual_seed(seed)).to("cpu", torch.float64)


def ridge_anil(**options) -> nn.Module:
    torch.manual_seed(0)
    spec = TaskSpec(kind="regression", n_way=0, input_shape=(1,), output_dim=1)
    return build_algorithm("anil", build_backbone("mlp", (1,), hidden=(8,)), spec,
                           **{"head_solver": "ridge", **options}).double()


def test_ridge_head_is_the_penalised_least_squares_solution() -> None:
    from metalab.algorithms.anil import ridge_head

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, 2,
                                                                          generator=gen,
                                                                          dtype=torch.float64)
    weight, bias = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    precision = torch.tensor([0.5, 2.0, 4.0, 1.0], dtype=torch.float64)
    solved_w, solved_b = ridge_head(x, y, weight, bias, precision)
    # the penalised objective's gradient vanishes at the solution, and nowhere near it
    theta = torch.cat([solved_w, solved_b.unsqueeze(1)], 1).requires_grad_()

    def objective(theta: Tensor) -> Tensor:
        prior = torch.cat([weight, bias.unsqueeze(1)], 1)
        fit = (x @ theta[:, :3].T + theta[:, 3] - y).pow(2).sum()
        return fit + ((theta - prior).pow(2) * precision).sum()

    gradient, = torch.autograd.grad(objective(theta), theta)
    assert gradient.abs().max() < 1e-10
    assert objective(theta.detach() + 0.01) > objective(theta.detach())
    # an overwhelming penalty keeps the prior; a vanishing one is ordinary least squares
    kept_w, kept_b = ridge_head(x, y, weight, bias, torch.full((4,), 1e12, dtype=torch.float64))
    assert torch.allclose(kept_w, weight) and torch.allclose(kept_b, bias)
    free_w, free_b = ridge_head(x, y, weight, bias, torch.full((4,), 1e-12, dtype=torch.float64))
    design = torch.cat([x, torch.ones(6, 1, dtype=torch.float64)], 1)
    least_squares = torch.linalg.lstsq(design, y).solution
    assert torch.allclose(free_w, least_squares[:3].T) and torch.allclose(free_b, least_squares[3])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ridge_meta_gradient_equals_the_per_task_solve(layout: str) -> None:
    """The meta-gradient (vmap, threads or loop) equals one written task by task with the
    closed form by hand, to 1e-9 in float64, and reaches the learned penalties."""
    algo = ridge_anil(**LAYOUTS[layout])
    batch = sinusoid_batch()
    meta_backward(algo, batch)
    got = {name: p.grad.clone() for name, p in algo.named_parameters()}
    algo.zero_grad()
    losses = []
    for task in range(len(batch)):
        design = torch.cat([algo.backbone(batch.support_x[task]),
                            torch.ones(len(batch.support_x[task]), 1, dtype=torch.float64)], 1)
        prior = torch.cat([algo.head.weight.T, algo.head.bias.unsqueeze(0)])
        penalty = algo.ridge_precision * algo.precision_offset.exp()
        theta = torch.linalg.inv(design.T @ design + torch.diag(penalty)) @ (
            design.T @ batch.support_y[task] + penalty.unsqueeze(1) * prior)
        query = torch.cat([algo.backbone(batch.query_x[task]),
                           torch.ones(len(batch.query_x[task]), 1, dtype=torch.float64)], 1)
        losses.append(F.mse_loss(query @ theta, batch.query_y[task]))
    torch.stack(losses).mean().backward()
    for name, p in algo.named_parameters():
        assert torch.allclose(got[name], p.grad, rtol=1e-9, atol=1e-12), name
    assert got["precision_offset"].abs().sum() > 0


def test_ridge_adapt_fits_the_support_and_refuses_what_it_cannot_do() -> None:
    algo = ridge_anil().eval()
    task = sinusoid_batch(1).task(0)
    predictor = algo.adapt(task.support_x, task.support_y)
    # with the penalty at ~0 the head fits the 5 support points as least squares on 9 features
    algo.ridge_precision = 1e-9
    fitted = algo.adapt(task.support_x, task.support_y)
    assert F.mse_loss(fitted(task.support_x), task.support_y) < 1e-8
    assert F.mse_loss(predictor(task.support_x), task.support_y) > 1e-4
    assert algo.adaptation_steps() == 1
    spec = TaskSpec(kind="classification", n_way=N_WAY, input_shape=SHAPE)
    with pytest.raises(ValueError, match="value targets"):
        build_algorithm("anil", mlp_backbone(), spec, head_solver="ridge")
    with pytest.raises(ValueError, match="learn_inner_lr='none'"):
        ridge_anil(learn_inner_lr="element")
    with pytest.raises(ValueError, match="head_solver must be one of"):
        ridge_anil(head_solver="newton")

