"""Every registered algorithm, trained 20 steps on the quick suite's glyphs and sinusoid
configs, ends with bit-identical weights to those recorded in ``fixtures/weights_20_steps.json``
(a sha256 per state-dict tensor, recorded before the core was reorganised around task kinds
and a Trainer built from objects, and before configs became a base plus deltas). A change
that moves any weight by one bit fails here; a deliberate one re-records the fixture and says
why in the CHANGELOG.

Bit-identity holds on one kind of CPU only: the float kernels round differently from one
instruction set to another (AVX2, AVX-512 with AMX), and 20 Adam steps carry that rounding
into every weight (a convolution's bias before BatchNorm has a zero gradient up to rounding,
which Adam scales to full-size steps). So the fixture keeps, per run, one digest set for each
kind of CPU it was recorded on, and a run must equal one of them. On a new kind of CPU, check
out a commit whose weights a recorded CPU confirms, then add that CPU's digests with
``python -m tests.test_weights_fixture``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from metalab.algorithms import ALGORITHMS
from metalab.compare import part_config, task_kind
from metalab.train import Trainer

FIXTURE = Path(__file__).parent / "fixtures" / "weights_20_steps.json"
PARTS = ("quick/{}", "quick/sinusoid-{}")
RUNS = [(part, name) for part in PARTS for name in sorted(ALGORITHMS)]


def digest(state: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
            for k, v in sorted(state.items())}


def twenty_steps(part: str, name: str, out: Path) -> dict[str, str] | None:
    """The weight digests of ``name`` after 20 steps on ``part`` (None: it cannot run there)."""
    config = part_config(part, name)
    if not ALGORITHMS[name].supports(task_kind(config)):
        return None
    config = config.replace(steps=20, val_split=None, device="cpu", out=str(out))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as recorded: MAML's task threads follow torch's thread count
    try:
        trainer = Trainer.from_config(config, progress=False)
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    return digest(trainer.algo.state_dict())


@pytest.fixture(scope="module")
def recorded() -> dict[str, list[dict[str, str]]]:
    return json.loads(FIXTURE.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("part", "name"), RUNS, ids=[p.format(n) for p, n in RUNS])
def test_twenty_steps_give_the_recorded_weights(part, name, recorded, tmp_path) -> None:
    weights = twenty_steps(part, name, tmp_path)
    if weights is None:
        assert part.format(name) not in recorded
        return
    assert weights in recorded[part.format(name)], (
        f"{part.format(name)}: the weights after 20 steps match none of the "
        f"{len(recorded[part.format(name)])} recorded CPU kinds (see this module's docstring)")


def test_every_recorded_run_is_still_run(recorded) -> None:
    assert set(recorded) <= {part.format(name) for part, name in RUNS}
    assert all(isinstance(kinds, list) and kinds for kinds in recorded.values())


def record_this_cpu() -> None:
    """Add this CPU's digests to the fixture (runs whose digests are already there are kept)."""
    import tempfile

    recorded = json.loads(FIXTURE.read_text())
    with tempfile.TemporaryDirectory() as scratch:
        for part, name in RUNS:
            weights = twenty_steps(part, name, Path(scratch) / part.format(name))
            if weights is not None and weights not in recorded.setdefault(part.format(name), []):
                recorded[part.format(name)].append(weights)
    FIXTURE.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    record_this_cpu()
