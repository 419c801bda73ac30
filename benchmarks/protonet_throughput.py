"""Seconds per ProtoNet training episode: metalab against easyfsl, on the same Omniglot episodes.

What is measured
    One *training step* on one episode: forward, cross-entropy on the query set, backward and
    an Adam step (lr 1e-3), with a Conv-4 backbone on 28x28x1 Omniglot, at two shapes:
    5-way 1-shot 15-query and 60-way 5-shot 5-query (the shapes of Snell et al.'s Omniglot
    training). Episodes come from :class:`metalab.tasks.EpisodeSampler` on the real Omniglot
    Vinyals train split (4112 rotated-character classes), one task per episode.

    * **metalab** -- ``build_algorithm("protonet", Conv4(), TaskSpec(n_way=N))`` trained by
      ``algo.meta_loss(batch)``. Its step *includes* drawing the episode
      (``EpisodeSampler.sample``), as in metalab's trainer; the sampling share (sampling time /
      whole step time) is reported separately, and so is the step without sampling.
    * **easyfsl** -- ``easyfsl.methods.PrototypicalNetworks`` around a second ``Conv4`` whose
      ``state_dict`` is copied from metalab's (identical initial weights): per episode
      ``process_support_set(support_x, support_y)``, ``model(query_x)``, cross-entropy,
      backward, Adam. It is fed the *same* episodes (same sampler, same per-step generators),
      drawn before its timed block, so its time is the model step alone: easyfsl's own data
      pipeline (a ``TaskSampler`` behind a ``DataLoader``) is not measured.

    Both sides do the same backbone work: two Conv-4 forward and backward calls, one over the
    support set and one over the queries (so BatchNorm's batch statistics are taken separately
    over support and query on both sides). The implementations differ in the rest, which is
    what the comparison is for: metalab computes prototypes with one batched matmul, easyfsl
    loops over the N classes in Python; easyfsl scores with -distance, metalab with
    -distance^2 (Snell et al.). (Until 2026-11-26 metalab embedded support and query in one
    call of N*(K+Q) images; ``benchmarks/results/protonet_throughput-joint-embedding.json``
    is that version's run.)

Methodology
    On shared machines one configuration's speed moves by up to 20% between runs, so both
    libraries are measured in the same process, interleaved: for each shape, after
    ``--warmup`` untimed steps of each, every repeat times ``--steps`` steps of metalab then
    ``--steps`` steps of easyfsl (A B A B ...). Reported: the median over ``--repeats`` of each
    repeat's seconds per episode, and the median of the per-repeat ratios easyfsl/metalab
    (paired, so slow drift of the machine cancels). Every per-step time is kept in the JSON.
    ``--threads`` sets ``torch.set_num_threads`` (default 2).

Setup and running (see benchmarks/README.md)
    bash benchmarks/setup_peers.sh           # .venv-peers: torch 2.13.0 CPU, easyfsl, metalab
    .venv-peers/bin/python benchmarks/protonet_throughput.py --quick     # smoke run, seconds
    .venv-peers/bin/python benchmarks/protonet_throughput.py             # 7 x 20 steps

Importing easyfsl without torchvision
    ``easyfsl/methods/__init__.py`` imports every method, some of which import
    ``easyfsl.modules`` and so torchvision (which does not load beside the local CPU torch, and
    would pull in another torch). ``PrototypicalNetworks`` itself needs only
    ``few_shot_classifier.py`` and ``utils.py`` (torch alone). :func:`import_easyfsl` therefore
    registers an empty package object as ``easyfsl.methods`` whose ``__path__`` is the real
    folder, so ``import easyfsl.methods.prototypical_networks`` loads that file and its two
    dependencies without running the package ``__init__``. If easyfsl is missing or fails to
    import, metalab is measured alone and the reason is printed and recorded.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metalab.algorithms import TaskSpec, build_algorithm
from metalab.data import omniglot
from metalab.models import Conv4
from metalab.tasks import EpisodeSampler, Task, TaskBatch, step_generator

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHAPES: tuple[tuple[int, int, int], ...] = ((5, 1, 15), (60, 5, 5))  # (N-way, K-shot, Q-query)
LR = 1e-3
WARMUP_OFFSET = 1_000_000  # warm-up episodes use step indices far from the timed ones


# --- the peer ----------------------------------------------------------------------------------


@dataclass
class Peer:
    """easyfsl's ``PrototypicalNetworks`` class, or why it is unavailable."""

    cls: type[nn.Module] | None
    version: str | None
    reason: str | None = None  # set when cls is None


def import_easyfsl() -> Peer:
    """Import ``PrototypicalNetworks`` without executing ``easyfsl/methods/__init__.py``."""
    try:
        version = importlib.metadata.version("easyfsl")
    except importlib.metadata.PackageNotFoundError:
        return Peer(None, None, f"easyfsl is not installed for {sys.executable}; run "
                    "`bash benchmarks/setup_peers.sh` and use `.venv-peers/bin/python`.")
    try:
        import easyfsl  # its __init__ only sets __version__

        if "easyfsl.methods" not in sys.modules:
            # A bare package object pointing at the real folder: submodules import from it,
            # but the __init__ (which imports torchvision-dependent methods) never runs.
            methods = types.ModuleType("easyfsl.methods")
            methods.__path__ = [str(Path(easyfsl.__file__).parent / "methods")]
            methods.__package__ = "easyfsl.methods"
            sys.modules["easyfsl.methods"] = methods
        module = importlib.import_module("easyfsl.methods.prototypical_networks")
        return Peer(module.PrototypicalNetworks, version)
    except Exception as error:  # any failure: measure metalab alone and say why
        return Peer(None, version, f"easyfsl {version} failed to import: {error!r}")


# --- one shape ---------------------------------------------------------------------------------


@dataclass
class ShapeResult:
    """Raw per-step timings of one shape, per repeat, and their summaries."""

    n_way: int
    k_shot: int
    q_query: int
    metalab_sample_s: list[list[float]] = field(default_factory=list)  # [repeat][step]
    metalab_step_s: list[list[float]] = field(default_factory=list)  # incl. sampling
    easyfsl_step_s: list[list[float]] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    first_loss: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.n_way}-way {self.k_shot}-shot {self.q_query}-query"

    def summary(self) -> dict[str, float | None]:
        """Medians over repeats of per-repeat means (seconds per episode) and shares."""
        ml = [sum(r) / len(r) for r in self.metalab_step_s]
        sample = [sum(r) / len(r) for r in self.metalab_sample_s]
        compute = [m - s for m, s in zip(ml, sample, strict=True)]
        share = [s / m for m, s in zip(ml, sample, strict=True)]
        out: dict[str, float | None] = {
            "metalab_s_per_episode": statistics.median(ml),
            "metalab_compute_s_per_episode": statistics.median(compute),
            "metalab_sample_s_per_episode": statistics.median(sample),
            "metalab_sampling_share": statistics.median(share),
            "metalab_spread": max(ml) / min(ml),  # max/min over repeats: how noisy the run was
            "easyfsl_s_per_episode": None,
            "easyfsl_spread": None,
            "ratio_easyfsl_over_metalab": None,
            "ratio_easyfsl_over_metalab_compute": None,
        }
        if self.easyfsl_step_s:
            ef = [sum(r) / len(r) for r in self.easyfsl_step_s]
            out["easyfsl_s_per_episode"] = statistics.median(ef)
            out["easyfsl_spread"] = max(ef) / min(ef)
            out["ratio_easyfsl_over_metalab"] = statistics.median(
                [e / m for e, m in zip(ef, ml, strict=True)])
            out["ratio_easyfsl_over_metalab_compute"] = statistics.median(
                [e / c for e, c in zip(ef, compute, strict=True)])
        return out


def episode(sampler: EpisodeSampler, seed: int, index: int) -> TaskBatch:
    """Episode ``index`` (one task): the same tensors every time it is asked for."""
    return sampler.sample(1, step_generator(seed, index))


def metalab_steps(
    algo: nn.Module, opt: torch.optim.Optimizer, sampler: EpisodeSampler, seed: int,
    indices: range,
) -> tuple[list[float], list[float], float]:
    """Train on episodes ``indices``; per-step (sampling, whole step) seconds, first loss."""
    sample_s, step_s, first = [], [], float("nan")
    for i in indices:
        t0 = time.perf_counter()
        batch = episode(sampler, seed, i)
        t1 = time.perf_counter()
        loss, _ = algo.meta_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        sample_s.append(t1 - t0)
        step_s.append(t2 - t0)
        if i == indices[0]:
            first = float(loss.detach())
    return sample_s, step_s, first


def easyfsl_steps(
    model: nn.Module, opt: torch.optim.Optimizer, tasks: list[Task]
) -> tuple[list[float], float]:
    """Train on pre-drawn single tasks; per-step seconds, first loss."""
    step_s, first = [], float("nan")
    for task in tasks:
        t0 = time.perf_counter()
        model.process_support_set(task.support_x, task.support_y)
        loss = F.cross_entropy(model(task.query_x), task.query_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_s.append(time.perf_counter() - t0)
        if task is tasks[0]:
            first = float(loss.detach())
    return step_s, first


def run_shape(
    dataset: Any, shape: tuple[int, int, int], peer: Peer, args: argparse.Namespace
) -> ShapeResult:
    """Warm up, then ``args.repeats`` interleaved blocks of metalab and easyfsl steps."""
    n, k, q = shape
    result = ShapeResult(n, k, q)
    sampler = EpisodeSampler(dataset, n, k, q)

    torch.manual_seed(args.seed)
    algo = build_algorithm("protonet", Conv4(), TaskSpec(n_way=n)).train()
    algo_opt = torch.optim.Adam(algo.parameters(), lr=LR)
    model = peer_opt = None
    if peer.cls is not None:
        backbone = Conv4()
        backbone.load_state_dict(algo.backbone.state_dict())  # identical initial weights
        model = peer.cls(backbone).train()
        peer_opt = torch.optim.Adam(model.parameters(), lr=LR)
        probe = episode(sampler, args.seed, WARMUP_OFFSET).support_x[0]
        with torch.no_grad():  # eval mode: the check leaves BatchNorm's running stats alone
            same = torch.equal(algo.backbone.eval()(probe), backbone.eval()(probe))
        result.checks["same_backbone_output"] = same
        algo.train()
        model.train()
        result.checks["same_parameter_count"] = (
            sum(p.numel() for p in algo.parameters())
            == sum(p.numel() for p in model.parameters()))

    # Warm-up (untimed): allocator, oneDNN kernels, Adam state.
    warm = range(WARMUP_OFFSET, WARMUP_OFFSET + args.warmup)
    metalab_steps(algo, algo_opt, sampler, args.seed, warm)
    if model is not None:
        easyfsl_steps(model, peer_opt, [episode(sampler, args.seed, i).task(0) for i in warm])

    for r in range(args.repeats):
        indices = range(r * args.steps, (r + 1) * args.steps)
        gc.collect()
        sample_s, step_s, loss = metalab_steps(algo, algo_opt, sampler, args.seed, indices)
        result.metalab_sample_s.append(sample_s)
        result.metalab_step_s.append(step_s)
        line = f"  repeat {r + 1}/{args.repeats}: metalab {sum(step_s) / len(step_s):.4f} s/ep"
        if r == 0:
            result.first_loss["metalab"] = loss
        if model is not None:
            # The same episodes, drawn outside the timed block.
            tasks = [episode(sampler, args.seed, i).task(0) for i in indices]
            if r == 0:
                again = episode(sampler, args.seed, indices[0])
                result.checks["same_episodes"] = torch.equal(tasks[0].query_x, again.query_x[0])
            gc.collect()
            peer_s, loss = easyfsl_steps(model, peer_opt, tasks)
            result.easyfsl_step_s.append(peer_s)
            line += f", easyfsl {sum(peer_s) / len(peer_s):.4f} s/ep"
            if r == 0:
                result.first_loss["easyfsl"] = loss
        print(line, file=sys.stderr, flush=True)
    return result


# --- reporting ---------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    """CPU, versions and threads: what the timings depend on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "threads_requested": threads,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "metalab": importlib.metadata.version("metalab"),
        "metalab_commit": commit,
    }


def print_table(results: list[ShapeResult], peer: Peer) -> None:
    """One row per shape: medians in milliseconds per episode."""
    head = (f"{'shape':<25} {'metalab ms/ep':>13} {'(no sampling)':>13} {'sampling':>9} "
            f"{'easyfsl ms/ep':>13} {'easyfsl/metalab':>15}")
    print(head)
    print("-" * len(head))
    for res in results:
        s = res.summary()
        ef = s["easyfsl_s_per_episode"]
        ratio = s["ratio_easyfsl_over_metalab"]
        print(f"{res.label:<25} {1e3 * s['metalab_s_per_episode']:>13.2f} "
              f"{1e3 * s['metalab_compute_s_per_episode']:>13.2f} "
              f"{100 * s['metalab_sampling_share']:>8.2f}% "
              f"{'n/a' if ef is None else f'{1e3 * ef:.2f}':>13} "
              f"{'n/a' if ratio is None else f'{ratio:.2f}x':>15}")
    print("Medians over repeats. metalab includes drawing the episode (its share: 'sampling', "
          "goal < 5%);\neasyfsl/metalab is the median of per-repeat ratios against metalab's "
          "whole step.")
    if peer.cls is None:
        print(f"easyfsl not measured: {peer.reason}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, help="timed blocks per library (default 7)")
    parser.add_argument("--steps", type=int, help="episodes per timed block (default 20)")
    parser.add_argument("--warmup", type=int, help="untimed episodes first (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 repeats of 3 steps, 1 warm-up step (unless given)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    default_data = REPO.parent / "shared" / "data"
    parser.add_argument("--data-dir", type=Path,
                        default=default_data if default_data.is_dir() else None,
                        help="folder holding omniglot/ (default: ../shared/data if it exists, "
                             "then $METALAB_DATA and the cache)")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/"
                        "protonet_throughput.json; --quick: protonet_throughput-quick.json)")
    args = parser.parse_args(argv)
    defaults = (2, 3, 1) if args.quick else (7, 20, 5)
    for name, value in zip(("repeats", "steps", "warmup"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.repeats, args.steps, args.threads) < 1 or args.warmup < 0:
        parser.error("--repeats, --steps and --threads must be >= 1, --warmup >= 0")
    if args.out is None:
        name = "protonet_throughput-quick.json" if args.quick else "protonet_throughput.json"
        args.out = RESULTS / name
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    peer = import_easyfsl()
    if peer.cls is None:
        print(f"WARNING: {peer.reason} Measuring metalab alone.", file=sys.stderr)
    load_start = os.getloadavg()

    t0 = time.perf_counter()
    dataset = omniglot.load("train", data_dir=args.data_dir)  # Vinyals train split
    load_s = time.perf_counter() - t0
    print(f"Omniglot train: {dataset.num_classes} classes, {load_s:.1f} s to load; "
          f"{args.repeats} repeats x {args.steps} steps, {args.warmup} warm-up, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)

    results = []
    for shape in SHAPES:
        print(f"{shape[0]}-way {shape[1]}-shot {shape[2]}-query:", file=sys.stderr)
        results.append(run_shape(dataset, shape, peer, args))
    print_table(results, peer)

    report = {
        "benchmark": "protonet_throughput",
        "unit": "seconds per training episode (forward + backward + Adam step, 1 task)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {"repeats": args.repeats, "steps": args.steps, "warmup": args.warmup,
                   "quick": args.quick, "seed": args.seed, "lr": LR, "backbone": "Conv4",
                   "input_shape": [1, 28, 28], "dataset": "omniglot vinyals train",
                   "classes": dataset.num_classes, "dataset_load_s": load_s},
        "machine": machine_info(args.threads)
        | {"loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "peer": {"name": "easyfsl", "version": peer.version, "measured": peer.cls is not None,
                 "reason": peer.reason},
        "shapes": [{"n_way": r.n_way, "k_shot": r.k_shot, "q_query": r.q_query,
                    "median": r.summary(), "checks": r.checks, "first_loss": r.first_loss,
                    "raw": {"metalab_sample_s": r.metalab_sample_s,
                            "metalab_step_s": r.metalab_step_s,
                            "easyfsl_step_s": r.easyfsl_step_s}}
                   for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
