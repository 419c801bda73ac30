"""What the studies share: cached per-run results, mean ± CI over seeds, tables and records."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from metalab.evaluate import mean_ci95
from metalab.io import atomic_write_text

__all__ = ["cached", "markdown", "summary"]


def cached(path: Path, compute: Callable[[], dict[str, Any]], fresh: bool = False,
           ) -> dict[str, Any]:
    """``compute()``'s JSON-able result, stored at ``path`` (a rerun reads it back, so a
    study cut short resumes where it stopped)."""
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(value, indent=2) + "\n", path)
    return value


def summary(values: Sequence[float]) -> dict[str, float]:
    """Mean, 95% CI half-width (1.96 · s / √n, as :func:`metalab.evaluate.mean_ci95`) and
    standard deviation of per-seed values."""
    mean, ci95 = mean_ci95(list(values))
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "ci95": ci95 if len(values) > 1 else 0.0, "std": std,
            "n": len(values)}


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
