"""The common checks of a meta-RL algorithm, run by the test suite on every one of them (as
:mod:`metalab.testing` is on every ``MetaLearner``), each on a tiny run of 2D navigation:

* the same seed gives the same parameters, history and test returns;
* a run stopped and resumed from ``last.pt`` equals an uninterrupted one;
* ``best.pt`` holds the weights of the best validation return logged;
* the checkpoint loads with ``weights_only=True`` and ``metalab evaluate`` scores it: returns
  after 0..``eval_steps`` steps, finite, with their 95% CI, the same on every call.

    from metalab.rl.checks import check_rl_algorithm
    check_rl_algorithm("rl2", tmp_path)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from metalab.rl.run import RLConfig, chosen_checkpoint, evaluate_run, train_run

__all__ = ["TINY", "check_rl_algorithm"]

# Small enough for a test: two tasks of two episodes, two iterations, a tiny policy.
TINY: dict[str, Any] = {"kind": "rl", "env": "navigation", "hidden": [8], "meta_batch": 2,
                        "trajectories": 2, "iterations": 2, "eval_steps": 1,
                        "eval_trajectories": 2, "seed": 3}


def _state(folder: Path) -> dict[str, torch.Tensor]:
    """The trained weights of a run folder, flattened to name -> tensor."""
    state = torch.load(folder / "last.pt", weights_only=True)
    return dict(state["params"] if "params" in state else state["policy"])


def _history(folder: Path) -> list[dict[str, float]]:
    history = torch.load(folder / "last.pt", weights_only=True)["history"]
    return [{k: v for k, v in h.items() if k not in ("seconds", "train_seconds")}
            for h in history]  # without the clock


def check_rl_algorithm(algorithm: str, folder: Path, **options: Any) -> None:
    """Run every common check on ``algorithm`` (``RLConfig.algorithm``) in ``folder``;
    ``options`` override :data:`TINY`. Raises ``AssertionError`` naming the broken check."""
    values = {**TINY, **options, "algorithm": algorithm}
    config = RLConfig.from_dict({**values, "out": str(folder / "a")})
    first = train_run(config, progress=False)
    again = train_run(config.replace(out=str(folder / "b")), progress=False)
    for name, value in _state(folder / "a").items():
        assert torch.equal(value, _state(folder / "b")[name]), (
            f"{algorithm}: the same seed gave other weights ({name})")
    assert _history(folder / "a") == _history(folder / "b"), (
        f"{algorithm}: the same seed gave another training history")
    assert first["returns"] == again["returns"], (
        f"{algorithm}: the same seed gave other test returns")

    parts = config.replace(out=str(folder / "parts"), iterations=1)
    train_run(parts, progress=False)
    train_run(parts.replace(iterations=config.iterations), resume=True, progress=False)
    for name, value in _state(folder / "a").items():
        assert torch.equal(value, _state(folder / "parts")[name]), (
            f"{algorithm}: a resumed run differs from an uninterrupted one ({name})")

    logged = [h["val_return"] for h in _history(folder / "a") if "val_return" in h]
    best = torch.load(folder / "a" / "best.pt", weights_only=True)
    assert logged and best["best"] == max(logged), (
        f"{algorithm}: best.pt does not hold the best validation return logged")
    assert len(best["history"]) == best["best_iteration"], (
        f"{algorithm}: best.pt's weights are not those of its best iteration")

    scored = evaluate_run(chosen_checkpoint(folder / "a"), write=False)
    assert scored["returns"] == first["returns"], (
        f"{algorithm}: evaluating the checkpoint again gave other returns")
    assert len(scored["returns"]) == config.eval_steps + 1, (
        f"{algorithm}: expected returns after 0..{config.eval_steps} steps")
    for row in scored["returns"]:
        assert math.isfinite(row["mean"]) and row["ci95"] >= 0, (
            f"{algorithm}: a return is not finite or its CI is negative: {row}")
    assert scored["iterations"] == config.iterations and scored["env_steps"] > 0, (
        f"{algorithm}: the record lost the training's iterations or environment steps")
