"""Every registered algorithm, trained 20 steps on the quick suite's glyphs and sinusoid
configs, ends with bit-identical weights to those recorded in ``fixtures/weights_20_steps.json``
(a sha256 per state-dict tensor, recorded before the core was reorganised around task kinds
and a Trainer built from objects, and before configs became a base plus deltas). A change
that moves any weight by one bit fails here; a deliberate one re-records the fixture and says
why in the CHANGELOG."""

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


@pytest.fixture(scope="module")
def recorded() -> dict[str, dict[str, str]]:
    return json.loads(FIXTURE.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("part", "name"), RUNS, ids=[p.format(n) for p, n in RUNS])
def test_twenty_steps_give_the_recorded_weights(part, name, recorded, tmp_path) -> None:
    config = part_config(part, name)
    if not ALGORITHMS[name].supports(task_kind(config)):
        assert part.format(name) not in recorded
        return
    config = config.replace(steps=20, val_split=None, device="cpu", out=str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as recorded: MAML's task threads follow torch's thread count
    try:
        trainer = Trainer.from_config(config, progress=False)
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    assert digest(trainer.algo.state_dict()) == recorded[part.format(name)]


def test_every_recorded_run_is_still_run(recorded) -> None:
    assert set(recorded) <= {part.format(name) for part, name in RUNS}
