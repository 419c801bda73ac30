"""Cold-start recommendation on MovieLens 100K, users as tasks (MeLU's protocol, Lee et al.
KDD 2019), meta-learners against the baselines of :mod:`metalab.studies.ratings`, in one run.

For each seed of the user split (:func:`metalab.data.movielens100k.split_users`, 70/10/20):

1. the baselines are fitted on the meta-train users' ratings, their regularisers chosen by
   MAE on the validation users;
2. each meta-learner trains from its built-in config ``movielens/<algorithm>`` with that
   split (``dataset_options.split_seed`` = ``seed`` = the seed), keeping the weights with the
   lowest validation MSE;
3. every method predicts the same 10 query ratings of every test user (query sets drawn with
   the seed) from the rest of that user's ratings; predictions are clipped to 1..5 for every
   method; MAE, RMSE and nDCG@3 are computed over the test users.

Each (seed, method) result is kept in ``<out>/seed<k>/<method>.json``, so a run cut short
resumes. The table gives mean ± 95% CI (1.96 · s / √n over seeds) and each seed's MAE::

    METALAB_DATA=../shared/data python -m metalab.studies.movielens --seeds 0 1 2 3 4
    python -m metalab.studies.movielens --seeds 0 1 2 3 4 --records docs/records \
        --machine "2-core CPU"   # then: python -m metalab.results
"""

from __future__ import annotations

import functools
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metalab.data import movielens100k as ml
from metalab.io import cached_json
from metalab.studies.common import markdown, study_parser, summary
from metalab.studies.ratings import (
    GlobalMean,
    ItemBiasUserOffset,
    ItemMean,
    MatrixFactorization,
    Ratings,
    ndcg_at,
)
from metalab.tasks import TaskBatch

__all__ = ["BASELINE_GRIDS", "META_LEARNERS", "fit_baseline", "main", "score", "train_meta"]

META_LEARNERS = ("anil", "maml", "cnp", "pretrained")
# Each baseline's candidates, chosen on the validation users (MAE).
BASELINE_GRIDS: dict[str, list[Callable[[], Any]]] = {
    "global-mean": [GlobalMean],
    "item-mean": [ItemMean],
    "item-bias-user-offset": [lambda i=i, u=u: ItemBiasUserOffset(i, u)
                              for i, u in itertools.product((1.0, 5.0, 25.0), repeat=2)],
    "matrix-factorization": [lambda r=r: MatrixFactorization(rank=10, reg=r)
                             for r in (3.0, 10.0, 30.0)],
}
LOW, HIGH = 1.0, 5.0  # the rating scale; every method's predictions are clipped to it
DEFAULT_OUT = Path("runs/studies/movielens")


def score(tasks: Sequence[TaskBatch], center: float,
          predict: Callable[[Tensor, Tensor, Tensor], Tensor]) -> dict[str, float]:
    """MAE and RMSE over every query rating of ``tasks`` and the mean nDCG@3 over users, of
    ``predict(support_x, support_ratings, query_x) -> query ratings`` (clipped to 1..5)."""
    errors, absolute, ndcgs = [], [], []
    for batch in tasks:
        task = batch.task(0)
        actual = task.query_y[:, 0].double() + center
        predicted = predict(task.support_x, task.support_y[:, 0].double() + center,
                            task.query_x).double().clamp(LOW, HIGH)
        errors.append((predicted - actual).pow(2))
        absolute.append((predicted - actual).abs())
        ndcgs.append(ndcg_at(predicted, actual, 3))
    return {"mae": torch.cat(absolute).mean().item(),
            "rmse": torch.cat(errors).mean().sqrt().item(),
            "ndcg3": statistics.fmean(ndcgs)}


def _ratings(source: ml.UserTasks) -> Ratings:
    index = torch.cat(source.ratings)
    rows = source.data.ratings[index]
    return Ratings(rows[:, 0], rows[:, 1], rows[:, 2])


def fit_baseline(name: str, train: ml.UserTasks, val: ml.UserTasks, test: ml.UserTasks,
                 seed: int) -> dict[str, Any]:
    """Baseline ``name`` fitted on the meta-train users, its candidate chosen by validation
    MAE, scored on the test users."""
    started = time.perf_counter()
    ratings = _ratings(train)
    val_tasks, test_tasks = val.all_users(seed), test.all_users(seed)
    best = None
    for make in BASELINE_GRIDS[name]:
        model = make().fit(ratings, ml.NUM_ITEMS)

        def predict(sx: Tensor, sy: Tensor, qx: Tensor, model: Any = model) -> Tensor:
            return model.predict(sx[:, 0], sy, qx[:, 0])

        val_mae = score(val_tasks, train.center, predict)["mae"]
        if best is None or val_mae < best[0]:
            best = (val_mae, model, predict)
    val_mae, model, predict = best
    settings = {k: v for k, v in vars(model).items() if isinstance(v, (int, float))}
    return {**score(test_tasks, train.center, predict), "val_mae": val_mae,
            "settings": settings, "seconds": time.perf_counter() - started}


def train_meta(algorithm: str, seed: int, out: Path, data_dir: str | None,
               steps: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Meta-learner ``algorithm`` trained from ``movielens/<algorithm>`` on the user split
    ``seed`` (its run folder under ``out``), its ``best.pt`` scored on the test users."""
    from metalab.config import load_config
    from metalab.runs import load_checkpoint, task_sources
    from metalab.train import Trainer

    overrides = [f"seed={seed}", f"dataset_options.split_seed={seed}",
                 *([f"steps={steps}"] if steps is not None else [])]
    config = load_config(f"movielens/{algorithm}", [
        *overrides, f"out={out / f'seed{seed}' / algorithm}",
        *([f"data_dir={data_dir}"] if data_dir else [])])
    trainer = Trainer.from_config(config, progress=progress, overwrite=True)
    state = trainer.fit()
    algo, _ = load_checkpoint(Path(config.out) / "best.pt")
    test = task_sources(config, "test", train=False)

    def predict(sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
        centred = (sy - test.center).float().unsqueeze(1)
        return algo.adapt(sx, centred)(qx)[:, 0].double() + test.center

    result = score(test.all_users(seed), test.center, predict)
    return {**result, "train_seconds": state.train_seconds, "steps": state.step,
            "best_val_mse": state.best, "config": config.to_dict(), "overrides": overrides}


def run(seeds: Sequence[int], methods: Sequence[str], out: Path, data_dir: str | None,
        steps: int | None = None, fresh: bool = False, progress: bool = False,
        ) -> dict[str, dict[int, dict[str, Any]]]:
    """``results[method][seed]`` for every method and seed (cached under ``out``)."""
    torch.set_num_threads(1)  # small networks; the machine is shared
    results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in methods}
    for seed in seeds:
        splits = {s: ml.tasks(s, data_dir=data_dir, split_seed=seed) for s in ml.SPLITS}
        for method in methods:
            path = out / f"seed{seed}" / f"{method}.json"
            if method in BASELINE_GRIDS:
                compute = functools.partial(fit_baseline, method, splits["train"],
                                            splits["val"], splits["test"], seed)
            else:
                compute = functools.partial(train_meta, method, seed, out, data_dir, steps,
                                            progress)
            results[method][seed] = cached_json(path, compute, fresh)
            r = results[method][seed]
            print(f"seed {seed} {method:>22}: MAE {r['mae']:.4f} RMSE {r['rmse']:.4f} "
                  f"nDCG@3 {r['ndcg3']:.4f}", flush=True)
    return results


def table(results: dict[str, dict[int, dict[str, Any]]]) -> str:
    """Mean ± 95% CI over seeds of each metric, each seed's MAE, training seconds."""
    seeds = sorted({s for by_seed in results.values() for s in by_seed})
    rows = []
    for method, by_seed in results.items():
        cells = [method]
        for metric in ("mae", "rmse", "ndcg3"):
            s = summary([by_seed[k][metric] for k in seeds])
            cells.append(f"{s['mean']:.4f} ± {s['ci95']:.4f}")
        cells += [f"{by_seed[k]['mae']:.4f}" for k in seeds]
        seconds = [by_seed[k].get("train_seconds", by_seed[k].get("seconds", 0.0))
                   for k in seeds]
        cells.append(f"{statistics.fmean(seconds):.0f}")
        rows.append(cells)
    return markdown(["method", "MAE", "RMSE", "nDCG@3", *(f"MAE seed {k}" for k in seeds),
                     "train s / seed"], rows)


def bar(results: dict[str, dict[int, dict[str, Any]]]) -> str:
    """Whether the issue's bar is met: the best meta-learner's mean MAE at most 0.77 and below
    the strongest baseline's (the non-meta methods, the fine-tune baseline included) MAE on
    every seed."""
    seeds = sorted({s for by_seed in results.values() for s in by_seed})
    mean = {m: statistics.fmean(r[s]["mae"] for s in seeds) for m, r in results.items()}
    # the fine-tune baseline (pretrained) is a baseline too: no meta-training
    metas = [m for m in mean if m not in BASELINE_GRIDS and m != "pretrained"]
    bases = [m for m in mean if m in BASELINE_GRIDS or m == "pretrained"]
    if not metas or not bases:
        return "bar: needs at least one meta-learner and one baseline"
    best, strongest = min(metas, key=mean.get), min(bases, key=mean.get)
    below = [results[best][s]["mae"] < results[strongest][s]["mae"] for s in seeds]
    met = mean[best] <= 0.77 and all(below)
    return (f"bar {'MET' if met else 'NOT MET'}: best meta-learner {best} MAE "
            f"{mean[best]:.4f} (<= 0.77: {mean[best] <= 0.77}); strongest baseline {strongest} "
            f"{mean[strongest]:.4f}; below it on {sum(below)} of {len(seeds)} seeds")


def main(argv: list[str] | None = None) -> int:
    parser = study_parser("movielens", __doc__, [0, 1, 2, 3, 4],
                          [*BASELINE_GRIDS, *META_LEARNERS], "movielens-100k/", DEFAULT_OUT)
    args = parser.parse_args(argv)
    results = run(args.seeds, args.methods, args.out, args.data_dir, args.steps, args.fresh)
    text = table(results) + "\n\n" + bar(results)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    if args.records:
        from metalab.studies.records import movielens_records, write_records

        records = movielens_records(results, args.machine, args.note)
        for path in write_records(records, args.records):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
