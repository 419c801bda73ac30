"""A run, a checkpoint or an input can never silently cost the user their work or a wrong
number. Grouped by class: run folders, resuming with changed settings, honest numbers,
inputs checked before work starts; then kill -9 at random moments and concurrent starts."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metalab.checkpoint import read_checkpoint, save_checkpoint
from metalab.cli import main
from metalab.evaluate import EvalResult, evaluate
from metalab.runfolder import RunFolder, RunFolderError
from metalab.runs import load_checkpoint, score_checkpoint
from metalab.tasks import fixed_episodes
from metalab.train import Trainer, TrainingDiverged

from .conftest import easy_config

ROOT = Path(__file__).resolve().parents[1]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in (".lock", "history.jsonl")}


def events(folder: Path) -> list[str]:
    return [record["event"] for record in RunFolder(folder).history()]


# -- run folders --------------------------------------------------------------------------------

def test_a_new_run_into_a_finished_run_is_refused_and_touches_nothing(easy_data, tmp_path):
    Trainer.from_config(easy_config(tmp_path, steps=10), progress=False).fit()
    before = digests(tmp_path)
    with pytest.raises(RunFolderError, match=r"holds another run .*--resume.*--overwrite"):
        Trainer.from_config(easy_config(tmp_path, steps=10), progress=False).fit()
    assert digests(tmp_path) == before
    assert events(tmp_path) == ["start", "finished"]


def test_overwrite_moves_the_old_run_aside(easy_data, tmp_path):
    out = tmp_path / "run"
    Trainer.from_config(easy_config(out, steps=10), progress=False).fit()
    before = digests(out)
    Trainer.from_config(easy_config(out, steps=10, seed=1), progress=False,
                        overwrite=True).fit()
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert digests(aside) == before  # the old run, whole, nothing deleted
    assert events(out)[:2] == ["overwrite", "start"]
    assert RunFolder(out).history()[0]["moved_to"] == str(aside)


def test_a_lock_left_by_a_killed_process_is_reported_and_taken_over(easy_data, tmp_path):
    (tmp_path / ".lock").write_text("pid 99999 on elsewhere since 2026-01-01")
    Trainer.from_config(easy_config(tmp_path, steps=5), progress=False).fit()
    notices = [r["message"] for r in RunFolder(tmp_path).history() if r["event"] == "notice"]
    assert any("pid 99999" in n and "ended without releasing" in n for n in notices)
    assert (tmp_path / ".lock").read_text() == ""  # released cleanly this time


def test_a_folder_in_use_is_refused_with_the_holder(tmp_path):
    first = RunFolder(tmp_path)
    first.claim("new")
    try:
        with pytest.raises(RunFolderError, match=rf"in use by another run \(pid {os.getpid()}"):
            RunFolder(tmp_path).claim("new")
    finally:
        first.release()


def test_leftovers_of_an_interrupted_save_are_removed_on_resume(easy_data, tmp_path):
    Trainer.from_config(easy_config(tmp_path, steps=10), progress=False).fit()
    (tmp_path / ".last.pt.k3j2.tmp").write_bytes(b"half a checkpoint")
    trainer = Trainer.from_config(easy_config(tmp_path, steps=15), progress=False)
    trainer.resume()
    trainer.fit()
    assert not list(tmp_path.glob(".*.tmp"))
    notices = [r["message"] for r in RunFolder(tmp_path).history() if r["event"] == "notice"]
    assert any(".last.pt.k3j2.tmp" in n for n in notices)


def test_a_damaged_last_log_line_is_dropped_on_resume_with_a_message(easy_data, tmp_path,
                                                                      capsys):
    Trainer.from_config(easy_config(tmp_path, steps=10), progress=False).fit()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 11, "lo')  # power loss mid-line
    trainer = Trainer.from_config(easy_config(tmp_path, steps=15), progress=True)
    trainer.resume()
    trainer.fit()
    assert "dropped the damaged last line" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").open()]
    assert steps == sorted(steps) and max(steps) == 15


def test_a_damaged_log_line_in_the_middle_is_an_error_naming_file_and_line(easy_data,
                                                                          tmp_path):
    Trainer.from_config(easy_config(tmp_path, steps=10), progress=False).fit()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    lines[1] = "garbage"
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    trainer = Trainer.from_config(easy_config(tmp_path, steps=15), progress=False)
    trainer.resume()
    with pytest.raises(ValueError, match=r"log.jsonl, line 2, is not JSON"):
        trainer.fit()


def test_output_files_respect_the_umask(easy_data, tmp_path):
    previous = os.umask(0o027)
    try:
        Trainer.from_config(easy_config(tmp_path, steps=5), progress=False).fit()
    finally:
        os.umask(previous)
    for name in ("last.pt", "best.pt", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


# -- resuming with changed settings -------------------------------------------------------------

def test_resume_applies_a_new_learning_rate_and_records_it(easy_data, tmp_path):
    Trainer.from_config(easy_config(tmp_path, steps=10, lr_decay_every=4), progress=False).fit()
    trainer = Trainer.from_config(easy_config(tmp_path, steps=20, lr=1e-4, lr_decay_every=4,
                                              weight_decay=0.01), progress=False)
    trainer.resume()
    groups = trainer.optimizer.param_groups
    assert groups[0]["lr"] == pytest.approx(1e-4 * 0.5 ** 2)  # two decays by step 10
    assert groups[0]["weight_decay"] == 0.01
    trainer.fit()
    changes = [r for r in RunFolder(tmp_path).history() if r["event"] == "settings-changed"]
    assert changes[0]["changes"]["lr"] == [3e-3, 1e-4]
    assert changes[0]["changes"]["steps"] == [10, 20]
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").open()]
    last_lr = [line["lr"] for line in lines if "lr" in line][-1]
    assert last_lr == pytest.approx(1e-4 * 0.5 ** 5)  # the new rate, on the old schedule


def test_resume_with_another_optimizer_is_refused(easy_data, tmp_path):
    Trainer.from_config(easy_config(tmp_path, steps=5), progress=False).fit()
    trainer = Trainer.from_config(easy_config(tmp_path, steps=10, optimizer="sgd"),
                                  progress=False)
    with pytest.raises(ValueError, match="trained with adam with sgd: its state does not"):
        trainer.resume()


# -- honest numbers -----------------------------------------------------------------------------

def test_non_finite_weights_stop_training_and_keep_the_last_checkpoint(easy_data, tmp_path):
    trainer = Trainer.from_config(easy_config(tmp_path, steps=20, checkpoint_every=5),
                                  progress=False)
    def poison(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if trainer.state.step == 7:  # the loss of step 8 is still finite
            next(trainer.algo.parameters()).data[0] = float("nan")

    trainer.optimizer.register_step_post_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"weights became non-finite at step 8.*step 5"):
        trainer.fit()
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 5
    assert events(tmp_path)[-2:] == ["stopped", "paused"]


def test_a_checkpoint_with_nan_weights_is_refused_not_scored(easy_data, tmp_path):
    Trainer.from_config(easy_config(tmp_path, steps=5), progress=False).fit()
    ckpt = read_checkpoint(tmp_path / "best.pt")
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name] = torch.full_like(ckpt["model"][name], float("nan"))
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=rf"nan.pt has non-finite weights \({name}"):
        score_checkpoint(tmp_path / "nan.pt")


def test_a_nan_validation_score_never_freezes_best_pt(easy_data, tmp_path, monkeypatch):
    trainer = Trainer.from_config(easy_config(tmp_path, steps=20, val_every=5), progress=False)
    scores = iter([math.nan, 40.0, 30.0, 50.0])
    monkeypatch.setattr(trainer, "validate", lambda: EvalResult(
        "accuracy", next(scores), 1.0, 10, 0.0, 0.0, "%"))
    state = trainer.fit()
    assert state.best == 50.0 and read_checkpoint(tmp_path / "best.pt")["step"] == 20
    notices = [r["message"] for r in RunFolder(tmp_path).history() if r["event"] == "notice"]
    assert any("validation accuracy is nan at step 5: best.pt is not updated" in n
               for n in notices)


def test_non_finite_test_scores_are_counted_and_said(easy_data, tmp_path):
    from metalab.algorithms import TaskSpec, build_algorithm
    from metalab.data.sinusoid import SinusoidTasks
    from metalab.models import MLP

    torch.manual_seed(0)
    spec = TaskSpec(kind="regression", n_way=0, input_shape=(1,))
    algo = build_algorithm("maml", MLP(1, hidden=(8,)), spec, inner_lr=1e30,
                           test_inner_steps=3)  # adaptation overflows
    result = evaluate(algo, fixed_episodes(SinusoidTasks(5, 5), 10, seed=1))
    assert result.nonfinite > 0 and math.isnan(result.mean)
    assert f"{result.nonfinite} of 10 episodes gave a non-finite score" in str(result)


# -- inputs checked before work starts ----------------------------------------------------------

def test_another_n_way_on_a_fixed_head_is_a_clear_error(easy_data, tmp_path):
    Trainer.from_config(easy_config(tmp_path, algorithm="maml", steps=2), progress=False).fit()
    with pytest.raises(ValueError, match="trained for 5-way tasks and cannot classify 10-way"):
        score_checkpoint(tmp_path / "best.pt", {"test_n_way": 10})
    algo, _ = load_checkpoint(tmp_path / "best.pt")
    with pytest.raises(ValueError, match="cannot classify 7-way tasks"):
        algo.adapt(torch.zeros(7, 1, 16, 16), torch.arange(7))


def test_adapt_refuses_a_regression_checkpoint_on_images(tmp_path, capsys):
    from metalab.config import Config

    config = Config.from_dict(dict(
        dataset="sinusoid", backbone="mlp", backbone_options={"hidden": [8]},
        algorithm="maml", algorithm_options={"inner_lr": 0.01}, steps=2, val_every=2,
        val_episodes=2, test_episodes=2, device="cpu", out=str(tmp_path / "run")))
    Trainer.from_config(config, progress=False).fit()
    for name in ("a", "b"):
        (tmp_path / "support" / name).mkdir(parents=True)
    assert main(["adapt", str(tmp_path / "run" / "best.pt"), "--support",
                 str(tmp_path / "support"), "--query", str(tmp_path / "support")]) == 2
    assert "labels images with an image classifier" in capsys.readouterr().err


def test_a_mistyped_test_split_stops_before_training(easy_data, tmp_path):
    from metalab import data

    load = data.DATASETS["easy"].load

    def strict(split: str, data_dir: object = None):
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}")
        return load(split, data_dir)

    data.DATASETS["easy"].load = strict
    with pytest.raises(ValueError, match="unknown split 'tset'"):
        Trainer.from_config(easy_config(tmp_path, test_split="tset"), progress=False)
    assert not (tmp_path / "log.jsonl").exists()


def test_an_impossible_meta_batch_is_refused_with_a_hint(easy_data, tmp_path):
    with pytest.raises(ValueError, match=r"meta-batch of 10000000 tasks holds .* GiB .*lower "
                                         r"tasks_per_batch"):
        Trainer.from_config(easy_config(tmp_path, tasks_per_batch=10_000_000), progress=False)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")])
def test_running_out_of_memory_in_a_step_is_a_clear_error(error, easy_data, tmp_path):
    trainer = Trainer.from_config(easy_config(tmp_path, steps=5), progress=False)

    def too_big(batch):
        raise error

    trainer.algo.meta_loss = too_big
    with pytest.raises(ValueError, match=r"step 1 ran out of memory on cpu with 2 tasks per "
                                         r"step; .*--set task_chunk=4"):
        trainer.fit()


# -- kill -9 at random moments, and two runs at once --------------------------------------------

JOB = dict(algorithm="protonet", backbone="conv4", backbone_options={"hidden": 8},
           dataset="glyphs", n_way=3, k_shot=1, q_query=2, tasks_per_batch=2, test_n_way=3,
           test_q_query=2, steps=2000, val_every=100, checkpoint_every=3, val_episodes=6,
           test_episodes=6, log_every=5, device="cpu")


def command(config: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "metalab", "train", str(config), "--quiet", *flags]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("job")
    (folder / "job.yaml").write_text(json.dumps(JOB))  # JSON is YAML
    return folder


def wait_until_it_holds(process: subprocess.Popen, folder: Path) -> None:
    """Return once `process` holds the run folder's lock, or has ended; start-up takes up to
    two minutes on a loaded machine."""
    lock, deadline = folder / ".lock", time.time() + 120
    while process.poll() is None and time.time() < deadline and not (
            lock.exists() and f"pid {process.pid} " in lock.read_text()):
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_9_at_20_random_moments_then_resume_gives_the_uninterrupted_weights(job):
    straight, killed = job / "straight", job / "killed"
    process = subprocess.Popen(command(job / "job.yaml", "--out", str(straight)),
                               env=environment())
    wait_until_it_holds(process, straight)
    held = time.perf_counter()
    assert process.wait(timeout=300) == 0
    held = time.perf_counter() - held
    # 15 of the 20 kills come while the run holds the folder; at most held/25 each, they use at
    # most 60% of the work however fast the machine is, so the run cannot finish before kill 20
    longest_wait = min(2.0, held / 25)
    moments = random.Random(0)
    kills, died_holding = 0, []
    flags: tuple[str, ...] = ()
    while kills < 20:
        errors = job / f"stderr-{kills}.txt"
        with errors.open("w") as stderr:
            process = subprocess.Popen(command(job / "job.yaml", "--out", str(killed), *flags),
                                       env=environment(), stderr=stderr)
        if kills % 4 == 3:  # in start-up
            time.sleep(moments.uniform(0.05, 0.5))
        else:  # in training, saves or validation
            wait_until_it_holds(process, killed)
            time.sleep(moments.uniform(0.0, longest_wait))
        if process.poll() is not None:  # ended before the kill: it must have finished well
            assert process.returncode == 0, errors.read_text()[-2000:]
            break
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        kills += 1
        lock = killed / ".lock"
        if lock.exists() and f"pid {process.pid} " in lock.read_text():
            died_holding.append(process.pid)  # killed while it held the folder
        flags = ("--resume",) if (killed / "last.pt").exists() else ("--overwrite",)
    finished = subprocess.run(command(job / "job.yaml", "--out", str(killed), "--resume"),
                              env=environment(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert kills == 20
    ours, theirs = (read_checkpoint(folder / "last.pt")["model"] for folder in (killed,
                                                                                 straight))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not list(killed.glob(".*.tmp"))
    # the history names every process killed while it held the folder, and how it ended
    history = RunFolder(killed).history()
    takeovers = [r["message"] for r in history if "ended without releasing" in
                 r.get("message", "")]
    assert all(f"pid {pid} " in message for pid, message in zip(died_holding, takeovers,
                                                                  strict=True))
    assert len(died_holding) >= 5 and history[-1]["event"] == "finished"
    assert sum(r["event"] == "resume" for r in history) >= len(died_holding)


@pytest.mark.slow
def test_two_runs_started_into_one_folder_one_runs_the_other_is_refused(job):
    out = job / "together"
    first = subprocess.Popen(command(job / "job.yaml", "--out", str(out)), env=environment(),
                             stderr=subprocess.PIPE, text=True)
    wait_until_it_holds(first, out)
    assert first.poll() is None and f"pid {first.pid} " in (out / ".lock").read_text()
    second = subprocess.run(command(job / "job.yaml", "--out", str(out)), env=environment(),
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert f"is in use by another run (pid {first.pid}" in second.stderr
    assert first.wait(timeout=300) == 0
    before = digests(out)
    third = subprocess.run(command(job / "job.yaml", "--out", str(out)), env=environment(),
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 2 and "holds another run" in third.stderr
    assert digests(out) == before  # the finished run's files are untouched
