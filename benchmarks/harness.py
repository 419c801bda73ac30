"""The one measurement harness of metalab's benchmarks; every script imports it, none another:
interleaved timing with medians and paired ratios, peak memory in fresh processes, the common
options, the JSON record (machine, load, commit), and the peer libraries, imported without
their unneeded dependencies and put behind metalab's ``meta_loss``/``adapt`` interface by one
adapter each, so that a peer is one more row stepped by :func:`metalab.train.meta_backward` or
trained by :class:`metalab.train.Trainer`, never a loop of its own. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metalab
from metalab.algorithms import MetaLearner, TaskSpec
from metalab.memory import PeakMemory, status_kib
from metalab.tasks import TaskBatch
from metalab.train import Trainer, meta_backward

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WARMUP = 1_000_000  # warm-up steps use episode indices far from the timed ones
SETUP_HINT = "run `bash benchmarks/setup_peers.sh` and use `.venv-peers/bin/python`"


def _source_digest() -> str:
    """sha256 of metalab's Python files: whether the tree changed while a benchmark ran (other
    work edits it; subprocesses would import the new code)."""
    digest = hashlib.sha256()
    for path in sorted(Path(metalab.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


LOAD_AT_START, SOURCE_AT_START = os.getloadavg(), _source_digest()


# --- options -----------------------------------------------------------------------------------

HELP = {"repeats": "timed rounds", "steps": "timed steps per row and round",
        "warmup": "untimed steps per row first", "threads": "torch.set_num_threads"}
CAN_BE_ZERO = {"warmup", "seed", "task_chunk", "launches", "control_launches"}


class Options(argparse.ArgumentParser):
    """The common options: ``--quick``, ``--out`` and an integer option per key of ``full``
    (its default; under ``--quick`` ``quick``'s where it has one; a value given wins)."""

    def __init__(self, doc: str, stem: str | Callable[[argparse.Namespace], str],
                 full: dict[str, int | None], quick: dict[str, int]) -> None:
        super().__init__(description=doc.split("\n\n")[0], epilog="See benchmarks/README.md")
        self.stem, self.full, self.quick = stem, full, quick
        for name, value in full.items():
            self.add_argument(f"--{name.replace('_', '-')}", type=int, help=(
                f"{HELP.get(name, name.replace('_', ' '))}: {'torch' if value is None else value}"
                + (f", --quick: {quick[name]}" if name in quick else "")))
        self.add_argument("--quick", action="store_true", help="smoke run")
        self.add_argument("--out", type=Path, help="JSON (default: in results/, -quick.json "
                          "under --quick, so a smoke run never overwrites a measurement)")

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        """Parse, fill the defaults and set the torch threads."""
        args = self.parse_args(argv)
        for name, value in self.full.items():
            if getattr(args, name) is None:
                setattr(args, name, self.quick.get(name, value) if args.quick else value)
            given, least = getattr(args, name), 0 if name in CAN_BE_ZERO else 1
            if given is not None and given < least:
                self.error(f"--{name.replace('_', '-')} must be at least {least}")
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        stem = self.stem(args) if callable(self.stem) else self.stem
        args.out = args.out or RESULTS / f"{stem}{'-quick' if args.quick else ''}.json"
        return args


# --- timing ------------------------------------------------------------------------------------


def interleave(rows: dict[str, Callable[[int], object]], repeats: int, steps: int = 1,
               warmup: int = 0, prepare: Callable[[range], object] = lambda indices: None,
               ) -> dict[str, list[list[float]]]:
    """Seconds of each call ``rows[name](index)``, per row ``[round][step]``: first ``warmup``
    untimed calls of every row (indices from ``WARMUP``), then ``repeats`` rounds in which
    every row makes ``steps`` calls on the same indices, in an order rotated each round (A B C,
    B C A, ...) so that drift of a shared machine hits all rows alike and none always follows
    the same one. ``prepare(indices)`` runs untimed before (e.g. draws the episodes)."""
    names = list(rows)
    prepare(range(WARMUP, WARMUP + warmup))
    for index in range(WARMUP, WARMUP + warmup):
        for name in names:
            rows[name](index)
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(repeats):
        indices = range(r * steps, (r + 1) * steps)
        prepare(indices)
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            laps = []
            for index in indices:
                start = time.perf_counter()
                rows[name](index)
                laps.append(time.perf_counter() - start)
            times[name].append(laps)
        if (r + 1) % max(1, repeats // 10) == 0:  # progress, ten lines at most
            print(f"  round {r + 1}/{repeats}: " + ", ".join(
                f"{name} {statistics.fmean(times[name][-1]):.4g} s" for name in names),
                file=sys.stderr, flush=True)
    return times


def summarise(times: dict[str, list[list[float]]], baseline: str) -> dict[str, dict[str, float]]:
    """Per row: ``s`` the median over rounds of the round's mean seconds per call, ``spread``
    max/min of those means, ``ratio`` the median over rounds of the row's mean / the
    baseline's in the same round (paired, so drift of the machine cancels)."""
    base = [statistics.fmean(laps) for laps in times[baseline]]
    out = {}
    for name, rounds in times.items():
        means = [statistics.fmean(laps) for laps in rounds]
        out[name] = {"s": statistics.median(means), "spread": max(means) / min(means),
                     "ratio": statistics.median(m / b for m, b in zip(means, base, strict=True))}
    return out


def relative_difference(got: list[Tensor], expected: list[Tensor]) -> float:
    """``||got - expected|| / ||expected||`` over all tensors, in float64."""
    flat = [torch.cat([t.detach().double().flatten() for t in ts]) for ts in (got, expected)]
    return float((flat[0] - flat[1]).norm() / flat[1].norm())


# --- memory ------------------------------------------------------------------------------------


def peak_memory(work: Callable[[], object]) -> dict[str, float | None]:
    """Run ``work()`` under :class:`metalab.memory.PeakMemory` (CPU: the peak resident set
    size above the level at entry, after freed heap pages are handed back)."""
    gc.collect()
    with PeakMemory("cpu") as peak:
        work()
    return {"peak_mib": peak.mib, "rss_after_mib": status_kib("VmRSS") / 1024}


def in_subprocess(arguments: list[str], threads: int | None = None) -> dict[str, Any]:
    """Run this script again with ``arguments`` in a fresh interpreter (so that one row's
    allocator caches never hide another's peak) and return the JSON line it prints last,
    or ``{"error": ...}``."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    job = subprocess.run([sys.executable, sys.argv[0], *arguments], capture_output=True,
                         text=True, env=env, check=False)
    lines = [line for line in job.stdout.splitlines() if line.startswith("{")]
    if job.returncode or not lines:
        return {"error": f"exit {job.returncode}: "
                + " | ".join((job.stderr or job.stdout).strip().splitlines()[-3:])}
    return json.loads(lines[-1])


# --- the record --------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What timings depend on: CPU, threads, versions, metalab's commit, the load."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # Linux names the model
        cpu = next((line.split(":")[1].strip() for line in Path("/proc/cpuinfo").read_text()
                    .splitlines() if line.startswith("model name")), cpu)
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()
    source = _source_digest()
    if source != SOURCE_AT_START:
        print("WARNING: metalab's source changed while this ran (see metalab_source_sha256)",
              file=sys.stderr)
    return {"cpu_model": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "executable": sys.executable, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "metalab": importlib.metadata.version("metalab"), "metalab_commit": commit or None,
            "metalab_source_sha256": {"start": SOURCE_AT_START, "end": source},
            "loadavg": {"start": LOAD_AT_START, "end": os.getloadavg()}}


def command() -> str:
    """The command line that produced the record (with OMP_NUM_THREADS when set)."""
    def shown(path: str) -> str:
        resolved = Path(path).absolute()
        return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else path

    threads = os.environ.get("OMP_NUM_THREADS")
    python = shown(sys.executable) if ".venv-peers" in sys.executable else "python"
    return " ".join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), python,
                     shown(sys.argv[0]), *sys.argv[1:]])


def write_json(path: Path, benchmark: str, report: dict[str, Any]) -> None:
    """``report`` with the benchmark's name, command, date and machine, to ``path``."""
    record = {"benchmark": benchmark, "command": command(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **report, "machine": machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"JSON: {path}")


# --- peer libraries ----------------------------------------------------------------------------


@dataclass
class Peer:
    """An imported peer library (``module``), or why it is not there (``error``)."""

    name: str
    module: types.ModuleType | None
    version: str | None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"version": self.version, "error": self.error, "notes": self.notes}


def _bare_packages(root: str, *names: str) -> None:
    """Register packages ``names`` (under ``root``) without running their ``__init__``, which
    imports dependencies the benchmarked modules never use (torchvision, gym, ...)."""
    folder = Path(importlib.util.find_spec(root).origin).parent  # found, not imported
    for name in names:
        if name not in sys.modules:
            package = sys.modules[name] = types.ModuleType(name)
            package.__path__ = [str(folder.joinpath(*name.split(".")[1:]))]
            package.__package__ = name


@contextlib.contextmanager
def _placeholder_torchvision(notes: list[str]) -> Iterator[None]:
    """easyfsl's ``modules/predesigned_modules.py`` imports ``torchvision.models.resnet`` for
    ResNet builders never called here. Where torchvision does not import (.venv-peers leaves it
    out: PyPI's build does not load beside the local CPU torch), a placeholder whose classes
    raise if ever used stands in while easyfsl loads."""
    try:
        importlib.import_module("torchvision")
    except Exception:  # not installed, or a build that does not load beside this torch
        pass
    else:
        yield
        return
    names = ("torchvision", "torchvision.models", "torchvision.models.resnet")
    saved = {name: sys.modules.pop(name, None) for name in names}

    def placeholder(name: str) -> type:
        def fail(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"torchvision.models.resnet.{name}: a placeholder (harness.py)")
        return type(name, (), {"__init__": fail})

    sys.modules.update({name: types.ModuleType(name) for name in names})
    sys.modules[names[-1]].__getattr__ = placeholder  # any name it is asked for (PEP 562)
    notes.append("easyfsl's predesigned_modules loaded with a placeholder torchvision")
    try:
        yield
    finally:
        for name, module in saved.items():
            sys.modules.pop(name)
            if module is not None:
                sys.modules[name] = module


def _learn2learn(notes: list[str]) -> types.ModuleType:
    _bare_packages("learn2learn", "learn2learn", "learn2learn.algorithms")
    notes.append("imported learn2learn.algorithms.maml (+ base_learner, utils) only")
    return importlib.import_module("learn2learn.algorithms.maml")


def _easyfsl(notes: list[str]) -> types.ModuleType:
    _bare_packages("easyfsl", "easyfsl.methods", "easyfsl.modules")
    with _placeholder_torchvision(notes):
        for name in ("prototypical_networks", "matching_networks", "relation_networks"):
            importlib.import_module(f"easyfsl.methods.{name}")
    notes.append("imported easyfsl.methods.{prototypical,matching,relation}_networks only")
    return sys.modules["easyfsl.methods"]


def _torchopt(notes: list[str]) -> types.ModuleType:
    module = importlib.import_module("torchopt")
    with contextlib.suppress(Exception):
        from torchopt.accelerated_op import is_available

        if not is_available():
            notes.append("torchopt's C++ ops (built for another torch) do not load; it uses "
                         "its pure-PyTorch code (MetaSGD never uses them anyway)")
    return module


IMPORTERS: dict[str, Callable[[list[str]], types.ModuleType]] = {
    "learn2learn": _learn2learn, "easyfsl": _easyfsl, "torchopt": _torchopt,
    "higher": lambda notes: importlib.import_module("higher")}


def import_peer(name: str) -> Peer:
    """Peer library ``name`` (a key of ``IMPORTERS``): learn2learn as
    ``learn2learn.algorithms.maml`` and easyfsl as its bare ``easyfsl.methods`` (their package
    ``__init__`` files import dependencies .venv-peers leaves out); never raises."""
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return Peer(name, None, None, f"{name} is not installed for {sys.executable}; "
                    f"{SETUP_HINT}")
    notes: list[str] = []
    try:
        return Peer(name, IMPORTERS[name](notes), version, notes=notes)
    except Exception as error:  # any failure: the caller measures without it and says why
        return Peer(name, None, version, f"{name} {version} failed to import: {error!r}")


class Learn2LearnMAML(MetaLearner):
    """``l2l.algorithms.MAML`` on a metalab MAML's network, weights and settings: per task
    ``clone()``, ``adapt()``, the query loss (its ``maml_omniglot.py`` example); at test time
    ``adapt(first_order=True)`` under ``enable_grad`` (learn2learn needs autograd there)."""

    name, family = "l2l.algorithms.MAML", "optimization"

    def __init__(self, l2l: types.ModuleType, init: MetaLearner) -> None:
        if init.learn_inner_lr != "none":
            raise ValueError(f"learn_inner_lr={init.learn_inner_lr!r}: l2l.algorithms.MAML "
                             "has one fixed inner learning rate; compare with 'none'.")
        super().__init__(init.spec)
        net = nn.Sequential(copy.deepcopy(init.backbone), nn.Flatten(), copy.deepcopy(init.head))
        self.maml = l2l.MAML(net, lr=init.inner_lr, first_order=init.first_order)
        self.inner_steps, self.test_inner_steps = init.inner_steps, init.test_inner_steps

    def _adapted(self, x: Tensor, y: Tensor, steps: int, first_order: bool | None) -> nn.Module:
        learner = self.maml.clone()
        for _ in range(steps):
            learner.adapt(self.kind.loss(learner(x), y), first_order=first_order)
        return learner

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        losses, scores = [], []
        for i in range(len(batch)):
            learner = self._adapted(batch.support_x[i], batch.support_y[i], self.inner_steps,
                                    None)
            output = learner(batch.query_x[i])
            losses.append(self.kind.loss(output, batch.query_y[i]))
            scores.append(self.kind.score(output.detach(), batch.query_y[i]))
        return torch.stack(losses).mean(), {self.kind.metric: torch.stack(scores).mean().item()}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> nn.Module:
        with torch.enable_grad():
            return self._adapted(support_x, support_y, self.test_inner_steps, True)

    def adaptation_steps(self) -> int:
        return self.test_inner_steps


class EasyFSL(MetaLearner):
    """An easyfsl ``FewShotClassifier``: per task ``process_support_set(support)`` then
    ``forward(query)``; the predictor is the model itself (it holds the support state).
    ``loss``: ``ce`` on logits, ``nll`` on log-probabilities (MatchingNetworks), ``mse`` or
    ``ce-logit`` on relation scores in [0, 1] (RelationNetworks)."""

    family = "metric"

    def __init__(self, model: nn.Module, name: str, loss: str, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.model, self.name, self.loss = model, name, loss

    LOSSES: ClassVar[dict[str, Callable[[Tensor, Tensor], Tensor]]] = {
        "ce": F.cross_entropy, "nll": F.nll_loss,
        "mse": lambda out, y: F.mse_loss(out, F.one_hot(y, out.shape[-1]).to(out.dtype)),
        "ce-logit": lambda out, y: F.cross_entropy(torch.logit(out, eps=1e-6), y)}

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        losses, correct = [], []
        for i in range(len(batch)):
            self.model.process_support_set(batch.support_x[i], batch.support_y[i])
            output = self.model(batch.query_x[i])
            losses.append(self.LOSSES[self.loss](output, batch.query_y[i]))
            correct.append((output.argmax(-1) == batch.query_y[i]).float().mean())
        return torch.stack(losses).mean(), {"accuracy": torch.stack(correct).mean().item()}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> nn.Module:
        self.model.process_support_set(support_x, support_y)
        return self.model


def train_step(algo: nn.Module, optimizer: torch.optim.Optimizer, batch: TaskBatch,
               task_chunk: int = 0) -> float:
    """One training step as metalab's ``Trainer`` takes it, for metalab and peers alike:
    ``meta_backward`` then the optimiser step; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss, _ = meta_backward(algo, batch, task_chunk)
    optimizer.step()
    return loss


# --- metalab serve -----------------------------------------------------------------------------

SERVE_TOKEN = "benchmark"
SERVE_AUTH = {"Authorization": f"Bearer {SERVE_TOKEN}"}


def trained_checkpoint(name: str, config: str, *overrides: str) -> Path:
    """``config`` with ``overrides`` trained once into runs/benchmarks/<name>/ (reused after)."""
    from metalab.config import load_config

    out = REPO / "runs" / "benchmarks" / name
    if not (out / "best.pt").exists():
        Trainer.from_config(load_config(config, [*overrides, f"out={out}"]),
                            progress=False).fit()
    return out / "best.pt"


class Server:
    """A `metalab serve` process on a free port of 127.0.0.1 with its own store in ``folder``
    (serve_load, serve_end_to_end)."""

    def __init__(self, ckpt: Path, folder: Path, *options: str) -> None:
        import socket

        import httpx

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "metalab", "serve", str(ckpt), "--port", str(self.port),
             "--store", str(folder / f"store-{self.port}.sqlite"), "--token", SERVE_TOKEN,
             *options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"metalab serve on port {self.port} did not start")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def png(image: Tensor) -> bytes:
    """A ``[1, H, W]`` uint8 image as PNG bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[0].numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def register(url: str, kind: str, task: str, support: dict[str, list]) -> None:
    """Create ``task`` on the server at ``url`` with a class per ``support`` item: a list of
    sentences (``kind`` text) or of image files' bytes."""
    import httpx

    with httpx.Client(base_url=url, timeout=120, headers=SERVE_AUTH) as client:
        client.post("/tasks", json={"name": task}).raise_for_status()
        for name, examples in support.items():
            if kind == "text":
                client.post(f"/tasks/{task}/classes", json={"name": name, "examples": examples}
                            ).raise_for_status()
            else:
                client.post(f"/tasks/{task}/classes", data={"name": name}, files=[
                    ("files", (f"{i}.png", e, "image/png")) for i, e in enumerate(examples)]
                ).raise_for_status()
