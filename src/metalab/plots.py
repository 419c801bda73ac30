"""The comparison's figures (matplotlib, written as PNG and SVG).

* :func:`score_vs_latency`: one point per algorithm, score ± 95% CI against the median
  adaptation latency per new task, coloured by family; one panel per kind of task.
* :func:`learning_curves`: validation score against meta-training time, from each run's
  ``log.jsonl``.
* :func:`curves`: a study's curves (score against shots, or against the fraction of
  meta-train classes, or return against adaptation steps), one panel per kind of task.
* :func:`paths_to_goals`: 2D trajectories towards goals, before and after adaptation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, safe in threads and on servers
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from metalab.kinds import get_kind

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


class Row(Protocol):
    """What the plots read of a comparison row (:class:`metalab.compare.Row`)."""

    task: str
    algorithm: str
    family: str
    kind: str
    mean: float
    ci95: float
    adapt_ms: float
    run_dir: str

__all__ = ["curves", "learning_curves", "paths_to_goals", "score_vs_latency"]

FAMILY_COLOURS = {"metric": "tab:blue", "optimization": "tab:orange", "model": "tab:green",
                  "baseline": "tab:gray"}
MARKERS = "osD^vP*Xh<>pd"
LINE_COLOURS = [plt.get_cmap("tab20")(i) for i in range(0, 20, 2)] + [
    plt.get_cmap("tab20")(i) for i in range(1, 20, 2)]  # 20 distinct colours, strong first


def _style(i: int) -> dict[str, object]:
    """Line ``i``'s colour and marker: no two of a panel's first 20 lines look alike."""
    return {"color": LINE_COLOURS[i % len(LINE_COLOURS)], "marker": MARKERS[i % len(MARKERS)],
            "markersize": 4}


def _panels(count: int, width: float = 6.4) -> tuple[Figure, list[Axes]]:
    fig, axes = plt.subplots(1, count, figsize=(width * count, 4.8), squeeze=False)
    return fig, list(axes[0])


def _plain_log(ax: Axes, which: str) -> None:
    """A log-scale ``which`` axis ("x" or "y") labelled 0.5, 1, 2 rather than 5x10^-1."""
    getattr(ax, f"set_{which}scale")("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _save(fig: Figure, stem: Path) -> list[Path]:
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")  # "tight": legends placed outside
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _by_task(rows: Sequence[Row]) -> dict[str, list[Row]]:
    tasks: dict[str, list[Row]] = {}
    for row in rows:
        tasks.setdefault(row.task, []).append(row)
    return tasks


def _label_points(ax: Axes, points: list[tuple[float, float, str]]) -> None:
    """Name each point; a label that would overlap one already placed moves down or up."""
    ax.autoscale_view()
    points_per_pixel = 72 / ax.figure.dpi
    placed: list[tuple[float, float, float]] = []  # x, y, width of each label, in points
    offsets = [0.0] + [sign * 9.0 * k for k in range(1, 8) for sign in (-1, 1)]
    for x, y, text in sorted(points, key=lambda point: -point[1]):
        px, py = (v * points_per_pixel for v in ax.transData.transform((x, y)))
        width = 5.0 * len(text)

        def free(dy: float, px: float = px, py: float = py, width: float = width) -> bool:
            return all(abs(py + dy - qy) >= 9 or px + width < qx or qx + w < px
                       for qx, qy, w in placed)

        dy = next((d for d in offsets if free(d)), 0.0)
        placed.append((px, py + dy, width))
        leader = {"arrowprops": {"arrowstyle": "-", "lw": 0.5, "color": "0.5"}} if dy else {}
        ax.annotate(text, (x, y), xytext=(6, dy - 3), textcoords="offset points", fontsize=8,
                    **leader)


def score_vs_latency(rows: Sequence[Row], stem: Path) -> list[Path]:
    """Score ± 95% CI against median adaptation latency (log scale), one point per algorithm."""
    tasks = _by_task(rows)
    fig, axes = _panels(len(tasks))
    for ax, (task, task_rows) in zip(axes, tasks.items(), strict=True):
        for row in task_rows:
            ax.errorbar(row.adapt_ms, row.mean, yerr=row.ci95, fmt="o", capsize=3,
                        color=FAMILY_COLOURS.get(row.family, "black"))
        _plain_log(ax, "x")
        _label_points(ax, [(r.adapt_ms, r.mean, r.algorithm) for r in task_rows])
        ax.set_xlabel("adaptation latency per new task (ms, median, log scale)")
        ax.set_ylabel(get_kind(task_rows[0].kind).label())
        ax.set_title(task)
        ax.grid(alpha=0.3)
        handles = [plt.Line2D([], [], color=FAMILY_COLOURS[f], marker="o", linestyle="",
                              label=f) for f in FAMILY_COLOURS
                   if any(r.family == f for r in task_rows)]
        ax.legend(handles=handles, title="family", fontsize=8, loc="best")
    return _save(fig, stem)


def _validation_curve(run_dir: Path) -> tuple[list[float], list[float], str]:
    seconds, scores, metric = [], [], ""
    log = run_dir / "log.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        record = json.loads(line)
        key = next((k for k in record if k.startswith("val_") and k != "val_ci95"), None)
        if key:
            seconds.append(record["train_seconds"])
            scores.append(record[key])
            metric = key.removeprefix("val_")
    return seconds, scores, metric


def learning_curves(rows: Sequence[Row], stem: Path) -> list[Path]:
    """Validation score against meta-training time for every row's run (nothing when no
    run logged a validation score)."""
    if not any(_validation_curve(Path(row.run_dir))[0] for row in rows):
        return []
    tasks = _by_task(rows)
    fig, axes = _panels(len(tasks))
    for ax, (task, task_rows) in zip(axes, tasks.items(), strict=True):
        for i, row in enumerate(task_rows):
            seconds, scores, _ = _validation_curve(Path(row.run_dir))
            ax.plot(seconds, scores, label=f"{row.algorithm} ({row.family})", **_style(i))
        ax.set_xlabel("meta-training time (s)")
        kind = get_kind(task_rows[0].kind)
        ax.set_ylabel("validation " + kind.label())
        if not kind.higher_is_better:  # errors shrink by orders of magnitude
            _plain_log(ax, "y")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the lines
    return _save(fig, stem)


def curves(
    data: dict[str, dict[str, list[tuple[float, float, float]]]], x_label: str, stem: Path,
    log_x: bool = False, y_labels: dict[str, str] | None = None,
) -> list[Path]:
    """``data[task][algorithm]`` = [(x, mean, ci95), ...] as lines with CI bands;
    ``y_labels[task]`` is the y axis's label (default: test accuracy)."""
    fig, axes = _panels(len(data))
    for ax, (task, by_algorithm) in zip(axes, data.items(), strict=True):
        for i, (name, curve) in enumerate(by_algorithm.items()):
            x, mean, ci = zip(*curve, strict=True)
            line, = ax.plot(x, mean, label=name, **_style(i))
            ax.fill_between(x, [m - c for m, c in zip(mean, ci, strict=True)],
                            [m + c for m, c in zip(mean, ci, strict=True)],
                            color=line.get_color(), alpha=0.12)
        if log_x:
            _plain_log(ax, "x")
            xs = sorted({point[0] for curve in by_algorithm.values() for point in curve})
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.set_xlabel(x_label)
        ax.set_ylabel((y_labels or {}).get(task, "test accuracy (%)"))
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the lines
    return _save(fig, stem)


def paths_to_goals(goals: Sequence[tuple[float, float]],
                   paths: dict[str, list[list[list[tuple[float, float]]]]], stem: Path,
                   limit: float = 0.6) -> list[Path]:
    """One panel per goal: ``paths[stage][goal]`` is a list of trajectories (each a list of
    positions from the start) drawn in the stage's colour; the goal is a star."""
    fig, axes = _panels(len(goals), width=3.6)
    for g, (ax, goal) in enumerate(zip(axes, goals, strict=True)):
        for i, (stage, by_goal) in enumerate(paths.items()):
            colour = LINE_COLOURS[i % len(LINE_COLOURS)]
            for n, trajectory in enumerate(by_goal[g]):
                x, y = zip(*trajectory, strict=True)
                ax.plot(x, y, color=colour, alpha=0.7, lw=1,
                        label=stage if n == 0 else None)
        ax.plot(*goal, marker="*", color="black", markersize=12, linestyle="", label="goal")
        ax.plot(0, 0, marker="o", color="black", markersize=4, linestyle="")
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.set_title(f"goal ({goal[0]:.2f}, {goal[1]:.2f})", fontsize=9)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, stem)
