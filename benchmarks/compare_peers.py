"""``metalab compare``'s rows against learn2learn (MAML) and easyfsl (ProtoNet, MatchingNet,
RelationNet), trained and scored alike: each peer behind its adapter is trained by a real
``metalab.train.Trainer`` with metalab's settings, on the same tasks (checked by digest) from
the same weights, and scored by ``metalab.evaluate`` on the same episodes. Writes
``compare_peers-<suite>.json`` and ``.md``. See benchmarks/README.md.

    OMP_NUM_THREADS=1 .venv-peers/bin/python benchmarks/compare_peers.py --suite quick --threads 1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import harness
from harness import EasyFSL, Learn2LearnMAML, Peer, import_peer
from metalab.algorithms import MetaLearner
from metalab.checkpoint import load_weights
from metalab.compare import ADAPT_MEMORY_EPISODES, parse_budget, part_config, suite_parts
from metalab.config import Config, apply_overrides
from metalab.evaluate import evaluate, mean_ci95
from metalab.memory import PeakMemory
from metalab.models import feature_shape
from metalab.runs import TEST_SEED, load_checkpoint, optimization, task_sources
from metalab.tasks import TaskBatch, TaskSource, fixed_episodes, sample_tasks
from metalab.train import Trainer, meta_backward

PAIRS = {"maml": ("learn2learn", "l2l.algorithms.MAML"),
         "protonet": ("easyfsl", "PrototypicalNetworks"),
         "matchingnet": ("easyfsl", "MatchingNetworks"),
         "relationnet": ("easyfsl", "RelationNetworks")}
QUICK = {"steps": 5, "val_episodes": 10, "test_episodes": 20}
EASYFSL_BATCH_NORM = (
    "easyfsl embeds the support and the query set in two backbone calls per task (separate "
    "BatchNorm statistics, running statistics updated at each call); metalab in one call, "
    "updating the running statistics its own way (metalab.algorithms.pertask)")


def copy_weights(source: nn.Module, target: nn.Module) -> bool:
    """Copy ``source``'s parameters into ``target``'s, in order, if every shape matches."""
    pairs = list(zip(source.parameters(), target.parameters(), strict=False))
    if len(pairs) != len(list(target.parameters())) or any(a.shape != b.shape for a, b in pairs):
        return False
    with torch.no_grad():
        for a, b in pairs:
            b.copy_(a)
    return True


def build_peer(algorithm: str, init: MetaLearner, peers: dict[str, Peer]
               ) -> tuple[MetaLearner, list[str]]:
    """The peer of ``algorithm`` from metalab's initial model ``init``, and the differences
    between the two that stay."""
    if algorithm == "maml":
        return Learn2LearnMAML(peers["learn2learn"].module, init), [
            f"same network and initial weights, inner lr {init.inner_lr}, {init.inner_steps} "
            f"inner step(s), {'first' if init.first_order else 'second'}-order",
            "learn2learn adapts at test time with adapt(first_order=True) under enable_grad "
            "(it needs autograd.grad), metalab under no_grad",
            "tasks of a meta-batch: learn2learn one after the other; metalab its own way "
            "(per-task loop, threads or vmap)"]
    methods, backbone = peers["easyfsl"].module, copy.deepcopy(init.backbone)
    shape = feature_shape(init.backbone, tuple(init.spec.input_shape))
    if algorithm == "protonet":
        model = methods.prototypical_networks.PrototypicalNetworks(backbone)
        return EasyFSL(model, PAIRS[algorithm][1], "ce", init.spec), [
            "same backbone and initial weights", "easyfsl scores with -distance, metalab with "
            f"-squared distance (metric={init.metric!r})", EASYFSL_BATCH_NORM]
    if algorithm == "matchingnet":
        model = methods.matching_networks.MatchingNetworks(backbone, feature_dimension=shape[0])
        notes = ["same backbone and initial weights"]
        if init.fce:
            copied = (copy_weights(init.support_lstm, model.support_features_encoder)
                      and copy_weights(init.query_lstm, model.query_features_encoding_cell))
            notes.append(f"both use FCE; LSTM weights {'' if copied else 'NOT '}copied; read "
                         f"steps: easyfsl one per support example, metalab {init.fce_steps}")
        else:
            notes.append("easyfsl always uses full context embeddings, this metalab config "
                         "does not (--set matchingnet:algorithm_options.fce=true compares FCE)")
        notes.append("similarity: easyfsl softmax(query . normalised support); metalab "
                     f"softmax(s * cosine), s={float(init.scale.detach()):g}")
        return EasyFSL(model, PAIRS[algorithm][1], "nll", init.spec), [*notes,
                                                                       EASYFSL_BATCH_NORM]
    if len(shape) != 3:
        raise ValueError(f"RelationNetworks needs feature maps (flatten: false); got {shape}")
    model = methods.relation_networks.RelationNetworks(backbone, feature_dimension=shape[0])
    copied = copy_weights(init.relation, model.relation_module)
    return EasyFSL(model, PAIRS[algorithm][1], {"mse": "mse", "ce": "ce-logit"}[init.loss],
                   init.spec), [
        "same backbone and initial weights; relation module: easyfsl's default (adaptive "
        "max-pools, BatchNorm momentum 1), metalab's as in the paper; initial weights "
        + ("copied" if copied else "each library's own (shapes differ)"),
        f"class representation: easyfsl the mean of the support maps, metalab the "
        f"{init.aggregate} (the same at 1 shot)", f"loss {init.loss} on both sides",
        EASYFSL_BATCH_NORM]


class RecordingSource:
    """A task source that keeps a digest of every task it draws (forwarding everything else),
    so that the two sides, each drawing from its own source, can be checked to get the same
    tasks. Both sides hash inside their timed steps alike."""

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


# What a Trainer takes besides its algorithm, tasks, optimiser and schedule.
SETTINGS = ("steps", "tasks_per_batch", "seed", "val_tasks", "val_every", "val_episodes",
            "log_every", "checkpoint_every", "time_budget", "task_chunk", "grad_clip",
            "precision")


def peer_trainer(peer: MetaLearner, tasks: RecordingSource, config: Config, like: Trainer,
                 out: Path) -> Trainer:
    """A Trainer for ``peer`` with every setting of metalab's Trainer ``like`` and an
    optimiser and schedule built from ``config`` as ``Trainer.from_config`` builds them."""
    peer.to(like.device)  # before the optimiser, as from_config does
    optimizer, scheduler = optimization(config, peer.parameters())
    return Trainer(peer, tasks, optimizer=optimizer, scheduler=scheduler, out=out,
                   device=str(like.device), progress=False,
                   **{name: getattr(like, name) for name in SETTINGS})


@dataclasses.dataclass
class Side:
    """One library's run of one algorithm: its Trainer, its best weights, its measurements."""

    library: str
    algorithm: str
    trainer: Trainer
    tasks: RecordingSource
    load_best: Callable[[Path], MetaLearner]
    train_peak: float = 0.0
    adapt_peak: float = 0.0
    scores: list[float] = dataclasses.field(default_factory=list)
    adapt_ms: list[float] = dataclasses.field(default_factory=list)
    query_ms: list[float] = dataclasses.field(default_factory=list)

    def done(self) -> bool:  # all steps taken, or the time budget spent
        t = self.trainer
        return t.state.step >= t.steps or 0 < t.time_budget <= t.state.train_seconds

    @property
    def model(self) -> MetaLearner:
        if not hasattr(self, "_best"):
            self._best = self.load_best(self.trainer.out / "best.pt").to(self.trainer.device)
        return self._best.eval()

    def measured(self, kind: str, work: Callable[[], object]) -> None:
        """``work()`` under ``PeakMemory``, keeping the largest peak of ``kind``."""
        with PeakMemory(self.trainer.device) as peak:
            work()
        setattr(self, f"{kind}_peak", max(peak.mib or 0.0, getattr(self, f"{kind}_peak")))


def first_step(sides: list[Side], batch: TaskBatch, config: Config, maml: bool) -> dict:
    """Both sides' loss on the first training batch from the same weights (on copies: also a
    warm-up) and, for MAML, the relative difference of the meta-gradients, in float32 and
    float64 (the same maths: rounding only)."""
    out, grads = {}, {}
    for dtype in (torch.float32, torch.float64) if maml else (torch.float32,):
        typed = dataclasses.replace(batch, support_x=batch.support_x.to(dtype),
                                    query_x=batch.query_x.to(dtype))
        for side in sides:
            model = copy.deepcopy(side.trainer.algo).to(dtype).train()
            loss, _ = meta_backward(model, typed, config.task_chunk, config.precision)
            out[f"{side.library}_first_loss_{str(dtype)[6:]}"] = loss
            grads[side.library] = [torch.zeros_like(p) if p.grad is None else p.grad
                                   for p in model.parameters()]
        if maml:  # relative to metalab's
            out[f"meta_gradient_rel_diff_{str(dtype)[6:]}"] = harness.relative_difference(
                grads[sides[1].library], grads["metalab"])
    return out


def adapt_all(model: MetaLearner, episodes: list[TaskBatch], device: torch.device) -> None:
    with torch.no_grad():
        for batch in episodes:
            batch = batch.to(device)
            for i in range(len(batch)):
                model.adapt(batch.support_x[i], batch.support_y[i])


def run_pair(algorithm: str, config: Config, peers: dict[str, Peer]) -> dict[str, Any]:
    trainer = Trainer.from_config(config, progress=False)
    raw_tasks = trainer.train_tasks
    trainer.train_tasks = RecordingSource(raw_tasks)
    ml = Side("metalab", config.algorithm, trainer, trainer.train_tasks,
              lambda path: load_checkpoint(path)[0])
    peer_model, notes = build_peer(algorithm, trainer.algo, peers)
    tasks = RecordingSource(task_sources(config, config.train_split, train=True))
    peer_train = peer_trainer(peer_model, tasks, config, trainer, Path(f"{config.out}-peer"))
    peer = Side(PAIRS[algorithm][0], peer_model.name, peer_train, tasks,
                lambda path: (load_weights(peer_train.algo, path), peer_train.algo)[1])
    sides = [ml, peer]
    check = first_step(sides, sample_tasks(raw_tasks, config.seed, 0, trainer.share).to(
        trainer.device), config, algorithm == "maml")
    print(f"== {algorithm} vs {peer.library}: " + ", ".join(f"{k} {v:.3g}" for k, v in
                                                          check.items()), file=sys.stderr)
    boundary, chunk = 0, 0
    while not all(side.done() for side in sides):
        boundary = min(boundary + config.val_every, config.steps)
        for side in sides if chunk % 2 == 0 else sides[::-1]:
            if not side.done():  # chunks end at validation steps: one fit's trajectory
                side.measured("train", lambda s=side, b=boundary: s.trainer.fit(
                    steps=b - s.trainer.state.step))
        chunk += 1
        count = min(len(ml.tasks.digests), len(peer.tasks.digests))
        if ml.tasks.digests[:count] != peer.tasks.digests[:count]:
            sys.exit(f"compare_peers.py: {algorithm}: the two sides drew different tasks.")
        check["same_training_tasks"] = count
        print("   " + "; ".join(f"{s.library} step {s.trainer.state.step} "
                                f"({s.trainer.state.train_seconds:.1f} s)" for s in sides),
              file=sys.stderr, flush=True)
    test = task_sources(config, config.test_split, train=False)
    episodes = [b[i:i + 1] for b in fixed_episodes(test, config.test_episodes, TEST_SEED)
                for i in range(len(b))]
    for index, episode in enumerate(episodes):  # alternating which side goes first
        for side in sides if index % 2 == 0 else sides[::-1]:
            result = evaluate(side.model, [episode], device=side.trainer.device)
            side.scores.append(result.mean)
            side.adapt_ms.append(result.adapt_ms)
            side.query_ms.append(result.query_ms)
    first = fixed_episodes(test, ADAPT_MEMORY_EPISODES, TEST_SEED)  # as metalab compare does
    for side in sides[::-1]:
        side.measured("adapt", lambda s=side: adapt_all(s.model, first, s.trainer.device))
    label = f"{config.dataset} {trainer.kind.describe(config.test_n_way, config.test_k_shot)}"
    rows = [row_of(side, label) for side in sides]
    difference = mean_ci95([a - b for a, b in zip(ml.scores, peer.scores, strict=True)])
    return {"algorithm": algorithm, "peer": {"library": peer.library,
                                             "algorithm": peer.algorithm},
            "notes": notes, "check": check, "rows": rows, "config": config.to_dict(),
            "paired_accuracy_difference": dict(zip(("metalab_minus_peer", "ci95"), difference,
                                                   strict=True)),
            "per_episode": {s.library: {"accuracy": [round(a, 2) for a in s.scores],
                                        "adapt_ms": [round(t, 3) for t in s.adapt_ms],
                                        "query_ms": [round(t, 3) for t in s.query_ms]}
                            for s in sides}}


def row_of(side: Side, task: str) -> dict[str, Any]:
    """The side's row: ``metalab compare``'s columns, then this script's own."""
    model, state = side.model, side.trainer.state
    mean, ci = mean_ci95(side.scores)
    return {"library": side.library, "task": task, "algorithm": side.algorithm,
            "family": model.family, "metric": model.kind.metric, "mean": mean, "ci95": ci,
            "train_seconds": state.train_seconds, "train_steps": state.step,
            "adapt_ms": statistics.median(side.adapt_ms),
            "query_ms": statistics.median(side.query_ms),
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_peak_mib": side.train_peak, "adapt_peak_mib": side.adapt_peak,
            "adapt_grad_steps": model.adaptation_steps(), "kind": model.kind.name,
            "train_cpu_seconds": state.cpu_seconds, "best_validation": state.best}


def markdown(pairs: list[dict[str, Any]]) -> str:
    def f(value: float | None, spec: str) -> str:
        return "n/a" if value is None or not math.isfinite(value) else spec.format(value)

    lines = ["| metalab X vs peer Y | task | library | algorithm | accuracy ± 95% CI | "
             "train s (CPU s) / steps | adapt ms | query ms | params | train peak MiB | "
             "adapt peak MiB | adapt grad steps |", "| --- | --- | --- | --- |" + " ---: |" * 8]
    for pair in pairs:
        for i, r in enumerate(pair["rows"]):
            label = f"{pair['algorithm']} vs {pair['peer']['library']}" if i == 0 else ""
            lines.append(
                f"| {label} | {r['task']} | {r['library']} | {r['algorithm']} | "
                f"{f(r['mean'], '{:.2f}')}% ± {f(r['ci95'], '{:.2f}')} | "
                f"{r['train_seconds']:.1f} ({r['train_cpu_seconds']:.1f}) / {r['train_steps']} "
                f"| {r['adapt_ms']:.2f} | {r['query_ms']:.2f} | {r['parameters']:,} | "
                f"{r['train_peak_mib']:.0f} | {r['adapt_peak_mib']:.1f} | "
                f"{r['adapt_grad_steps']} |")
    lines += ["", "| metalab X vs peer Y | accuracy metalab − peer (paired 95% CI) | train time "
              "peer / metalab (wall; CPU) | adapt latency peer / metalab | query latency peer "
              "/ metalab | train peak peer / metalab |", "| --- |" + " ---: |" * 5]
    for pair in pairs:
        (ml, peer), d = pair["rows"], pair["paired_accuracy_difference"]
        ratio = {k: "n/a" if not ml[k] else f"{peer[k] / ml[k]:.2f}x" for k in (
            "train_seconds", "train_cpu_seconds", "adapt_ms", "query_ms", "train_peak_mib")}
        lines.append(f"| {pair['algorithm']} vs {peer['library']} {peer['algorithm']} | "
                     f"{f(d['metalab_minus_peer'], '{:+.2f}')} ± {f(d['ci95'], '{:.2f}')} | "
                     f"{ratio['train_seconds']}; {ratio['train_cpu_seconds']} | "
                     f"{ratio['adapt_ms']} | {ratio['query_ms']} | {ratio['train_peak_mib']} |")
    lines += ["", "## Differences that stay", ""]
    for pair in pairs:
        c, check = pair["config"], dict(pair["check"])
        lines += [f"**{pair['algorithm']} vs {pair['peer']['library']} "
                  f"{pair['peer']['algorithm']}**",
                  f"- settings (both sides): {c['dataset']}, {c['n_way']}-way {c['k_shot']}-shot"
                  f" {c['q_query']}-query, {c['tasks_per_batch']} task(s) per step, "
                  f"{c['optimizer']} lr {c['lr']:g}, {c['backbone']} {c['backbone_options']}, "
                  f"{c['algorithm']} options {c['algorithm_options']}; validation every "
                  f"{c['val_every']} steps on {c['val_episodes']} episodes (best weights kept); "
                  f"test {c['test_n_way']}-way {c['test_k_shot']}-shot "
                  f"{c['test_q_query']}-query", *(f"- {note}" for note in pair["notes"]),
                  f"- training tasks checked identical (digests): "
                  f"{check.pop('same_training_tasks', None)}",
                  "- first training batch, same weights: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in check.items()), ""]
    return "\n".join(lines)


def configs_for(args: argparse.Namespace) -> list[tuple[str, Config]]:
    """Every algorithm on each classification part of the suite, configured by
    ``metalab.compare.part_config`` as ``metalab compare`` does (no peer for regression)."""
    runs = []
    for part in suite_parts(args.suite):
        for algorithm in args.algorithms:
            config = part_config(part, algorithm)
            if not task_sources(config, config.test_split, train=False).kind.classes:
                break
            values = apply_overrides(config.to_dict(), args.overrides.get(algorithm, []))
            if args.quick:
                values |= {"val_episodes": min(config.val_episodes, QUICK["val_episodes"]),
                           "test_episodes": QUICK["test_episodes"], "steps": QUICK["steps"]}
            values |= {k: v for k, v in (("steps", args.steps),
                                         ("test_episodes", args.test_episodes)) if v}
            if args.budget:
                values |= {"steps": 10**9, "time_budget": args.budget}
            values["val_every"] = min(values["val_every"], values["steps"])
            runs.append((algorithm, Config.from_dict(values)))
    return runs


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                      epilog="Methodology: benchmarks/README.md")
    options.add_argument("--suite", default="quick",
                         help="a built-in suite of metalab compare or a YAML config (quick)")
    options.add_argument("--algorithms", default=",".join(PAIRS), help="comma-separated")
    budget = options.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="training steps of every run (default: the "
                        "config's; --quick: 5)")
    budget.add_argument("--budget", type=parse_budget, metavar="DURATION",
                        help="instead: seconds of training steps per run (90, 90s, 10m, 1h)")
    options.add_argument("--test-episodes", type=int, help="default: the config's; --quick: 20")
    options.add_argument("--set", action="append", default=[], metavar="ALGO:KEY=VALUE",
                         help="override metalab's config of ALGO; repeatable")
    options.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    options.add_argument("--quick", action="store_true", help="5 steps, 10 validation and 20 "
                         "test episodes (the output name gets -quick)")
    options.add_argument("--out", type=Path, default=harness.RESULTS, help="output folder")
    args = options.parse_args()
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    args.overrides = {}
    for item in args.set:
        algorithm, _, assignment = item.partition(":")
        args.overrides.setdefault(algorithm, []).append(assignment)
    if bad := sorted((set(args.algorithms) | set(args.overrides)) - set(PAIRS)):
        options.error(f"unknown algorithm(s) {', '.join(bad)}; choose from {', '.join(PAIRS)}")
    torch.set_num_threads(args.threads)
    peers = {name: import_peer(name) for name in {PAIRS[a][0] for a in args.algorithms}}
    if missing := [p.error for p in peers.values() if p.module is None]:
        sys.exit(f"compare_peers.py: {'; '.join(missing)}")
    started, pairs = time.time(), []
    with tempfile.TemporaryDirectory(prefix="compare_peers-") as folder:
        for index, (algorithm, config) in enumerate(configs_for(args)):
            config = config.replace(out=str(Path(folder) / f"{index}-{algorithm}"))
            pairs.append(run_pair(algorithm, config, peers))
    if not pairs:
        sys.exit(f"compare_peers.py: suite {args.suite} has no classification tasks.")
    table = markdown(pairs)
    print(table)
    stem = f"compare_peers-{Path(args.suite).stem}{'-quick' if args.quick else ''}"
    harness.write_json(args.out / f"{stem}.json", "compare_peers", {
        "suite": args.suite, "wall_seconds": time.time() - started, "quick": args.quick,
        "threads": args.threads, "overrides": args.overrides,
        "peers": {n: p.record() for n, p in peers.items()}, "pairs": pairs})
    machine = harness.machine()
    (args.out / f"{stem}.md").write_text(
        f"# metalab vs peers: suite `{args.suite}`\n\n`{harness.command()}`\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M')}; {args.threads} torch thread(s) on "
        f"{machine['cpu_model']} ({machine['logical_cpus']} logical CPUs), load average "
        f"{machine['loadavg']['start'][0]:.2f} at start, {machine['loadavg']['end'][0]:.2f} at "
        f"end; torch {torch.__version__}, "
        + ", ".join(f"{n} {p.version}" for n, p in peers.items())
        + f"; {(time.time() - started) / 60:.1f} min. Accuracy: mean and 95% CI over the same "
        "test episodes; the paired difference over per-episode differences. Each side is one "
        "training run, so a point or two may be the run, not the library. Times: training "
        "steps only (CPU seconds in brackets); latencies: medians per task; peak memory: "
        "metalab.memory.PeakMemory, training the largest over the chunks (validation "
        f"included), adaptation over the first {ADAPT_MEMORY_EPISODES} test tasks as metalab "
        f"compare takes it. Methodology: benchmarks/README.md.\n\n{table}\n")
    print(f"wrote {args.out / stem}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
