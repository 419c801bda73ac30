"""The whole text study: the four text suites of ``metalab compare`` (every default algorithm,
fresh trainings, from cached sentence embeddings) with their trainings one after the other
(``--jobs 1``, torch's threads shared by each run) and side by side (``--jobs N``, one
process per run with an equal share of the threads), alternating, medians.

The baseline is ``--jobs 1``; the figure is the wall-clock time of the study in each setting
and how many times faster side by side is, with the largest difference between the two
settings' scores (a run's result depends on where it trained only through the number of
threads its reductions use). Sentences are embedded first, untimed (from the cache, or
encoded once). Needs ``pip install "metalab[text]"`` and BANKING77 and CLINC150 under
``METALAB_DATA``.

    python benchmarks/text_study.py [--repeats 1] [--jobs 2] [--train-steps N] [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import harness
from metalab.compare import run_compare
from metalab.data import banking77, clinc150
from metalab.text import sentence_inputs

SUITES = ("banking77-5w1s", "banking77-5w5s", "banking77-77w", "clinc150-oos")
FULL = {"repeats": 1, "jobs": 2}
QUICK = {"repeats": 1}
QUICK_STEPS = 2  # meta-training steps of every run under --quick


def embed_everything() -> None:
    """Every sentence the suites read, through the embedding cache (untimed)."""
    texts = [text for file in ("train", "test") for text, _ in banking77.read(file)]
    texts += [text for part in ("train", "val", "test") for text, _ in clinc150.read(part)]
    texts += [text for split in ("train", "val", "test") for text in clinc150.out_of_scope(split)]
    sentence_inputs(texts)


def study(jobs: int, steps: int | None, out: Path) -> tuple[dict[str, float], dict[tuple, float]]:
    """Seconds per suite, and every row's score, of one fresh run of the study."""
    seconds, scores = {}, {}
    for suite in SUITES:
        start = time.perf_counter()
        rows = run_compare(suite, steps=steps, out=out, fresh=True, progress=False,
                           plots=False, jobs=jobs).rows
        seconds[suite] = time.perf_counter() - start
        scores.update({(suite, row.task, row.algorithm): row.mean for row in rows})
        print(f"  --jobs {jobs}: {suite} in {seconds[suite]:.0f} s", flush=True)
    return seconds, scores


def main() -> None:
    options = harness.Options(__doc__, "text_study", FULL, QUICK)
    options.add_argument("--train-steps", type=int, help="meta-training steps of every run "
                         f"(default: each config's own; --quick: {QUICK_STEPS})")
    args = options.parse()
    steps = args.train_steps or (QUICK_STEPS if args.quick else None)
    embed_everything()
    settings = (1, args.jobs)
    totals: dict[int, list[float]] = {jobs: [] for jobs in settings}
    per_suite: dict[int, list[dict[str, float]]] = {jobs: [] for jobs in settings}
    scores: dict[int, dict[tuple, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.repeats):
            for jobs in settings if round_ % 2 == 0 else settings[::-1]:
                seconds, scores[jobs] = study(jobs, steps, Path(folder) / f"jobs{jobs}")
                per_suite[jobs].append(seconds)
                totals[jobs].append(sum(seconds.values()))
                print(f"--jobs {jobs}: the study in {totals[jobs][-1]:.0f} s", flush=True)
    median = {jobs: statistics.median(times) for jobs, times in totals.items()}
    difference = max(abs(scores[1][key] - scores[args.jobs][key]) for key in scores[1])
    print(f"text study ({len(scores[1])} rows): {median[1] / 60:.1f} min one run after the "
          f"other, {median[args.jobs] / 60:.1f} min with --jobs {args.jobs} "
          f"({median[1] / median[args.jobs]:.2f}x faster); scores differ by at most "
          f"{difference:.2f} points")
    harness.write_json(args.out, "text_study", {
        "suites": list(SUITES), "jobs": args.jobs, "repeats": args.repeats, "steps": steps,
        "seconds": {str(jobs): times for jobs, times in totals.items()},
        "seconds_by_suite": {str(jobs): runs for jobs, runs in per_suite.items()},
        "median_s": {str(jobs): value for jobs, value in median.items()},
        "speedup": median[1] / median[args.jobs], "max_score_difference": difference,
        "rows": len(scores[1])})


if __name__ == "__main__":
    main()
