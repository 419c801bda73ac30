"""What the studies share: mean ± CI over seeds and tables (per-run results are cached with
:func:`metalab.io.cached_json`)."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

from metalab.evaluate import mean_ci95

__all__ = ["markdown", "study_parser", "summary"]


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


def study_parser(name: str, doc: str, seeds: Sequence[int], methods: Sequence[str],
                 data_folder: str, out: Path) -> argparse.ArgumentParser:
    """The options every study takes (seeds, methods, steps, output and cache folder, data
    folder, --fresh, result records); a study adds its own."""
    parser = argparse.ArgumentParser(prog=f"python -m metalab.studies.{name}",
                                     description=doc.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    parser.add_argument("--methods", nargs="+", default=list(methods))
    parser.add_argument("--steps", type=int, help="training steps (default: the configs')")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--data-dir", help=f"folder holding {data_folder} (or METALAB_DATA)")
    parser.add_argument("--fresh", action="store_true", help="recompute cached results")
    parser.add_argument("--records", type=Path, help="write result records to this folder")
    parser.add_argument("--machine", default="2-core CPU", help="with --records")
    parser.add_argument("--note", help="with --records: whether the bar is met and why, "
                        "for the table's notes")
    return parser
