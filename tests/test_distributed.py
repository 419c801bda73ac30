"""Distributed meta-training: 2 gloo processes under torchrun against one process.

The in-process tests check the pieces (task shares, task streams, every algorithm treating
the tasks of a step apart); the others launch real torchrun jobs on this machine, one thread
per process. A launch costs about 5 s here, so one job trains every algorithm in turn: this
file, run as ``python -m tests.test_distributed OUT``, is that job's worker.

Tolerance: the 2-process weights equal the 1-process ones to 1e-5 relative (1e-6 absolute)
after 3 steps. The tiny configs use plain SGD: the ranks add their gradients in another order
than one process does, and Adam divides a gradient by its own running magnitude, which turns
the float noise of a gradient that is zero in exact arithmetic (a convolution's bias before
BatchNorm) into steps of the size of the learning rate. SGD keeps the comparison to what the
distributed code is responsible for: the gradient of each step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from metalab import distributed
from metalab.algorithms import ALGORITHMS
from metalab.checkpoint import read_checkpoint
from metalab.config import Config
from metalab.data import task_source
from metalab.evaluate import evaluate
from metalab.tasks import sample_tasks
from metalab.train import Trainer, meta_backward

from .conftest import easy_dataset

ROOT = Path(__file__).resolve().parents[1]

# Small networks, so that every algorithm trains a few steps in a fraction of a second.
OPTIONS: dict[str, dict] = {
    "snail": {"attention": [[8, 4], [8, 4]], "filters": 8, "k_shot": 1},
    "mann": {"controller_size": 16, "memory_slots": 8, "memory_width": 8, "read_heads": 2},
    "recurrent": {"hidden_size": 16},
    "cnp": {"encoder_sizes": [16, 16], "decoder_sizes": [16]},
    "finetune": {"finetune_steps": 5},
    "matchingnet": {"fce": True, "fce_steps": 2},
    "fomaml": {"batch_norm": "running"},  # running statistics: buffers combined across ranks
    "reptile": {"inner_steps": 2},
    "pretrained": {"test_inner_steps": 2},
}
REGRESSION = {"pretrained"}


def tiny_config(name: str, out: Path) -> Config:
    """A few SGD steps of ``name`` on 5 tasks a step (shares of 3 and 2 on 2 processes)."""
    values = dict(algorithm=name, algorithm_options=OPTIONS.get(name, {}), dataset="easy",
                  backbone="conv4", backbone_options={"hidden": 8}, n_way=3, k_shot=1,
                  q_query=2, tasks_per_batch=5, test_n_way=3, test_k_shot=1, test_q_query=2,
                  steps=3, val_every=1000, val_episodes=6, test_episodes=6, log_every=1,
                  optimizer="sgd", lr=0.1, device="cpu", out=str(out))
    if name in REGRESSION:
        values.update(dataset="sinusoid", backbone="mlp", backbone_options={"hidden": [16, 16]},
                      k_shot=5, q_query=5, test_k_shot=5, test_q_query=5)
    return Config.from_dict(values)


def register_easy() -> None:
    """The conftest ``easy`` data set, for a worker process (no pytest fixtures there)."""
    import types

    from metalab import data
    from metalab.tasks import ClassDataset

    full = easy_dataset(num_classes=30, size=16)

    def load(split: str, data_dir: object = None) -> ClassDataset:
        part = slice(0, 20) if split == "train" else slice(20, 30)
        return ClassDataset(full.data[part], full.names[part])

    data.DATASETS["easy"] = types.SimpleNamespace(load=load, status=lambda d=None: "")


def floats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if v.is_floating_point()}


# -- in one process ---------------------------------------------------------------------------


def test_task_shares_cover_the_batch_and_refuse_too_few_tasks() -> None:
    shares = [distributed.task_share(5, rank, 2) for rank in range(2)]
    assert [list(s) for s in shares] == [[0, 1, 2], [3, 4]]
    assert [len(distributed.task_share(32, rank, 3)) for rank in range(3)] == [11, 11, 10]
    with pytest.raises(ValueError, match=r"tasks_per_batch \(2\).*3.*--nproc_per_node"):
        distributed.task_share(2, 0, 3)


def test_a_process_draws_exactly_its_share_of_the_tasks(easy_data) -> None:
    source = task_source("easy", "train", 3, 1, 2)
    whole = sample_tasks(source, 7, 11, range(5))
    first, second = (sample_tasks(source, 7, 11, share) for share in (range(3), range(3, 5)))
    for field in ("support_x", "query_y", "classes"):
        assert torch.equal(getattr(whole, field),
                           torch.cat([getattr(first, field), getattr(second, field)]))
    assert not torch.equal(whole.query_x, sample_tasks(source, 7, 12, range(5)).query_x)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_no_algorithm_couples_the_tasks_of_a_step(name: str, easy_data, tmp_path) -> None:
    """In float64, one pass over 5 tasks gives the gradients and buffers (BatchNorm running
    statistics) of the tasks taken one at a time: so any split of a step is exact."""
    results = []
    for chunk in (0, 1):
        trainer = Trainer.from_config(tiny_config(name, tmp_path), progress=False)
        algo = trainer.algo.double().train()
        batch = sample_tasks(trainer.train_tasks, 0, 0, range(5)).to("cpu", torch.float64)
        loss, _ = meta_backward(algo, batch, task_chunk=chunk)
        grads = {n: p.grad for n, p in algo.named_parameters() if p.grad is not None}
        results.append((loss, grads, floats(algo.state_dict())))
    (loss, grads, buffers), (loss1, grads1, buffers1) = results
    assert loss1 == pytest.approx(loss, rel=1e-12)
    assert grads.keys() == grads1.keys() and grads
    for key in grads:
        torch.testing.assert_close(grads1[key], grads[key], rtol=1e-9, atol=1e-12, msg=key)
    for key in buffers:
        torch.testing.assert_close(buffers1[key], buffers[key], rtol=1e-9, atol=1e-12, msg=key)


# -- torchrun jobs ----------------------------------------------------------------------------


def torchrun(*args: str, restarts: int = 0) -> list[str]:
    """The command line of a 2-process gloo job on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One torchrun job that trains every algorithm for 3 steps on 2 processes."""
    out = tmp_path_factory.mktemp("two-processes")
    job = run(torchrun("-m", "tests.test_distributed", str(out)), cwd=ROOT)
    assert job.returncode == 0, job.stdout + job.stderr
    return out


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_two_processes_train_like_one(name: str, two_processes: Path, easy_data,
                                      tmp_path) -> None:
    one = Trainer.from_config(tiny_config(name, tmp_path), progress=False)
    one.fit()
    two = read_checkpoint(two_processes / name / "last.pt")
    assert two["step"] == 3
    expected = floats(one.algo.state_dict())
    for key, value in floats(two["model"]).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    steps = [json.loads(line)["step"] for line in (two_processes / name / "log.jsonl").open()]
    assert steps == [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").open()]


def test_ranks_step_and_stop_alike_and_validation_shares_out_exactly(two_processes: Path) -> None:
    report = json.loads((two_processes / "report.json").read_text())
    assert report["identical_ranks"] == sorted(ALGORITHMS)  # bitwise equal weights
    sharded, alone = report["validation"]
    assert sharded == alone  # mean, CI and episode count of one process scoring all
    first, second = report["budget_steps"]
    assert first == second and 0 < first < 10**6


def worker(out: Path) -> None:
    """Each rank of the job that ``two_processes`` launches."""
    register_easy()
    with distributed.process_group(torch.device("cpu")):
        identical, validation = [], None
        for name in sorted(ALGORITHMS):
            trainer = Trainer.from_config(tiny_config(name, out / name), progress=False)
            trainer.fit()
            flat = torch.cat([v.flatten().double() for v in trainer.algo.state_dict().values()])
            if all(torch.equal(flat, other) for other in distributed.gather_objects(flat)):
                identical.append(name)
            if name == "protonet":
                sharded = trainer.validate()
                alone = evaluate(trainer.algo, trainer.validation_episodes(), trainer.kind)
                validation = [[r.mean, r.ci95, r.episodes] for r in (sharded, alone)]
        # A time budget: rank 0's clock decides for both, so they stop at the same step.
        config = tiny_config("protonet", out / "budget").replace(steps=10**6, time_budget=0.3)
        stopped = distributed.gather_objects(Trainer.from_config(config, progress=False).fit().step)
        if distributed.rank() == 0:
            report = {"identical_ranks": identical, "validation": validation,
                      "budget_steps": stopped}
            (out / "report.json").write_text(json.dumps(report))


CLI_CONFIG = dict(algorithm="protonet", backbone="conv4", backbone_options={"hidden": 8},
                  dataset="glyphs", n_way=3, k_shot=1, q_query=2, tasks_per_batch=2,
                  test_n_way=3, test_k_shot=1, test_q_query=2, steps=60, val_every=30,
                  checkpoint_every=5, val_episodes=6, test_episodes=6, log_every=5,
                  device="cpu")


def cli_job(folder: Path, **changes: object) -> tuple[list[str], Path]:
    """``torchrun ... -m metalab train`` of a small glyph config written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump({**CLI_CONFIG, "out": str(folder / "run"), **changes}))
    return torchrun("-m", "metalab", "train", str(config), "--quiet", restarts=1), folder / "run"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    command, out = cli_job(folder)
    job = run(command, cwd=folder)
    assert job.returncode == 0, job.stdout + job.stderr
    return out, job.stdout + job.stderr


def workers_of(launcher: int) -> dict[int, int]:
    """{rank: pid} of the worker processes that a torchrun process started."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # not a process, or it has just exited
        if parent == launcher:
            rank = [int(v[5:]) for v in env if v.startswith(b"RANK=")]
            if rank:
                ranks[rank[0]] = int(entry.name)
    return ranks


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers in /proc")
def test_a_lost_worker_is_restarted_from_the_last_checkpoint(uninterrupted, tmp_path) -> None:
    command, out = cli_job(tmp_path)
    job = subprocess.Popen(command, cwd=tmp_path, env=environment(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists():  # the first checkpoint (step 5)
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.02)
        os.kill(workers_of(job.pid)[1], signal.SIGKILL)
        output, _ = job.communicate(timeout=180)
    finally:
        if job.poll() is None:  # the test failed: stop the job and its workers
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0, output
    resumed = [int(line.rsplit(" ", 1)[1]) for line in output.splitlines()
               if line.startswith("resumed ")]
    assert len(resumed) == 1 and 5 <= resumed[0] < 60, output
    reference = read_checkpoint(uninterrupted[0] / "last.pt")
    restarted = read_checkpoint(out / "last.pt")
    assert restarted["step"] == reference["step"] == 60
    for key, value in reference["model"].items():
        assert torch.equal(restarted["model"][key], value), key
    log = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [
        json.loads(line)["step"] for line in (uninterrupted[0] / "log.jsonl").open()]


def test_two_process_jobs_exit_cleanly(uninterrupted, tmp_path) -> None:
    """Without an ordered teardown, about 1 such job in 5 aborted at exit."""
    outputs = [uninterrupted[1]]
    for attempt in range(2):
        command, _ = cli_job(tmp_path / str(attempt), steps=4, val_every=4)
        job = run(command, cwd=tmp_path)
        assert job.returncode == 0, job.stdout + job.stderr
        outputs.append(job.stdout + job.stderr)
    assert not any("terminate called" in output for output in outputs)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
