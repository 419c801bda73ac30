"""Forecasting for a new transformer (ETT): meta-train on one transformer's series, adapt to
another's with 5% or 10% of its training windows, against the transfer baselines, in one run.

Protocol (Informer's split and windows, GPT4TS's few-shot rule; :mod:`metalab.data.ett`):
lookback 336, horizons 96 / 192 / 336 / 720, MSE and MAE on the test windows of the target
normalised per channel with the scaler of the target's 12 training months, each window
relative to its last lookback value. For each horizon:

* baselines (:mod:`metalab.studies.forecasting`): **zero-shot** (the source's ridge model,
  its λ chosen on the source's validation windows, applied to the target), **ridge from
  scratch** on the target's kept windows, **ridge shrunk toward the source solution**, and
  **target-only SGD** (the linear forecaster from zero, trained by gradient steps on the kept
  windows): λ and step counts chosen on the target's validation windows;
* meta-learners, from their built-in configs ``ett/<algorithm>`` (``dataset_options`` set to
  the source and horizon), trained on the source's windows as tasks with the config's seed,
  then adapted to the target's kept windows: MAML and Reptile (and the **pretrain + fine-tune**
  baseline, ``pretrained``) by gradient steps whose number (0 to 100) is chosen on the
  target's validation windows, as λ is for the ridge baselines; the CNP by encoding them;
* the **learned prior** (:func:`~metalab.studies.forecasting.learn_precision`): the shrunk
  ridge's penalty weighted per lookback lag by a precision meta-learned on the source's
  tasks (closed-form adaptation inside, as R2-D2; the prior of ALPaCA, centred on the source
  solution), seeded by the seed, adapted as the shrunk ridge is (λ on validation windows).

Results per (direction, seed, method, horizon) are kept under ``<out>``, so a run cut short
resumes::

    METALAB_DATA=../shared/data python -m metalab.studies.ett --seeds 0 1 2
    python -m metalab.studies.ett --source ETTh2 --target ETTh1 --seeds 0
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metalab.data import ett
from metalab.io import cached_json
from metalab.studies.common import markdown, study_parser, summary
from metalab.studies.forecasting import choose_ridge, errors, learn_precision, predict

__all__ = ["BASELINES", "FRACTIONS", "META_LEARNERS", "adapt_by_validation", "main", "prepare"]

FRACTIONS = (0.05, 0.1)
BASELINES = ("zero-shot", "ridge-scratch", "ridge-shrunk", "target-only-sgd")
LEARNED_PRIOR = "learned-prior"
META_LEARNERS = ("maml", "reptile", "cnp", "pretrained", LEARNED_PRIOR)
# the learned prior's meta-training: its tasks are the meta-learners' (configs ett/_base)
PRIOR_TRAINING = {"steps": 300, "tasks_per_step": 16, "lr": 0.05, "start": 100.0}
STEP_GRID = (0, 1, 3, 10, 30, 100, 300)  # adaptation steps chosen from, on validation windows
DEFAULT_OUT = Path("runs/studies/ett")


def prepare(source: str, target: str, horizon: int, fraction: float,
            data_dir: str | None = None, scaler: str = "train") -> dict[str, Tensor]:
    """The windows of one (direction, horizon, fraction): the source's training and
    validation windows (scaled on its 12 training months), the target's kept training windows
    and its validation and test windows (scaled as ``scaler`` says)."""
    src, tgt = ett.read(source, data_dir), ett.read(target, data_dir)
    src_scaler = ett.fit_scaler(src, ett.scaler_rows("train", 1.0))
    tgt_scaler = ett.fit_scaler(tgt, ett.scaler_rows(scaler, fraction))
    out = {}
    for name, series, scale, split, frac in (
            ("source", src, src_scaler, "train", 1.0), ("source_val", src, src_scaler, "val", 1.0),
            ("train", tgt, tgt_scaler, "train", fraction), ("val", tgt, tgt_scaler, "val", 1.0),
            ("test", tgt, tgt_scaler, "test", 1.0)):
        out[name + "_x"], out[name + "_y"] = ett.split_windows(series, split, scale, horizon,
                                                               fraction=frac)
    return out


def baselines(w: dict[str, Tensor], source_weights: Tensor) -> dict[str, dict[str, Any]]:
    """The four baselines' test errors (and what was chosen for each) on prepared windows."""
    test = (w["test_x"], w["test_y"])
    scratch, scratch_reg = choose_ridge(w["train_x"], w["train_y"], w["val_x"], w["val_y"])
    shrunk, shrunk_reg = choose_ridge(w["train_x"], w["train_y"], w["val_x"], w["val_y"],
                                      prior=source_weights)
    sgd = _LinearSGD(w["train_x"].shape[1], w["train_y"].shape[1])
    sgd_result = adapt_by_validation(sgd, w["train_x"], w["train_y"], w["val_x"], w["val_y"],
                                     test, grid=(*STEP_GRID, 1000))
    return {
        "zero-shot": errors(predict(source_weights, test[0]), test[1]),
        "ridge-scratch": {**errors(predict(scratch, test[0]), test[1]), "reg": scratch_reg},
        "ridge-shrunk": {**errors(predict(shrunk, test[0]), test[1]), "reg": shrunk_reg},
        "target-only-sgd": sgd_result,
    }


class _LinearSGD(torch.nn.Module):
    """The linear forecaster from zero, adapted by the same gradient steps as MAML's inner
    loop (MSE, step 0.2): the "trained on the target only" baseline."""

    inner_lr = 0.2

    def __init__(self, lookback: int, horizon: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(lookback, horizon)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def fast_params(self) -> dict[str, Tensor]:
        return dict(self.named_parameters())

    def features(self, x: Tensor) -> Tensor:
        return x

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return x @ params["head.weight"].T + params["head.bias"]

    def inner_loop(self, params: dict[str, Tensor], x: Tensor, y: Tensor, steps: int,
                   create_graph: bool = False) -> dict[str, Tensor]:
        for _ in range(steps):
            with torch.enable_grad():
                fast = {k: v.detach().requires_grad_() for k, v in params.items()}
                loss = torch.nn.functional.mse_loss(self.predict(fast, x), y)
                grads = torch.autograd.grad(loss, list(fast.values()))
            params = {k: v.detach() - self.inner_lr * g
                      for (k, v), g in zip(fast.items(), grads, strict=True)}
        return params


def adapt_by_validation(algo: Any, x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor,
                        test: tuple[Tensor, Tensor], grid: Sequence[int] = STEP_GRID,
                        ) -> dict[str, Any]:
    """Gradient steps of ``algo``'s inner loop (a MAML-family learner) on ``(x, y)`` from its
    initialisation; the number of steps in ``grid`` with the lowest validation MSE is kept
    and scored on ``test``."""
    with torch.no_grad():
        params = {name: p.detach() for name, p in algo.fast_params().items()}
        support, done, best = algo.features(x), 0, None
        for steps in sorted(grid):
            if steps > done:
                params = algo.inner_loop(params, support, y, steps - done, create_graph=False)
                done = steps
            mse = errors(algo.predict(params, algo.features(val_x)), val_y)["mse"]
            if best is None or mse < best[0]:
                best = (mse, steps, params)
        _, steps, params = best
        return {**errors(algo.predict(params, algo.features(test[0])), test[1]),
                "steps": steps}


def train_meta(algorithm: str, source: str, horizon: int, seed: int, out: Path,
               data_dir: str | None, steps: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Meta-learner ``algorithm`` trained on the source's windows as tasks from its config."""
    from metalab.config import load_config
    from metalab.runs import load_checkpoint
    from metalab.train import Trainer

    overrides = [f"seed={seed}", f"dataset_options.series={source}",
                 f"dataset_options.horizon={horizon}"]
    config = load_config(f"ett/{algorithm}", [
        *overrides, f"out={out / f'{source}-seed{seed}' / f'{algorithm}-h{horizon}'}",
        *([f"data_dir={data_dir}"] if data_dir else []),
        *([f"steps={steps}"] if steps is not None else [])])
    state = Trainer.from_config(config, progress=False, overwrite=True).fit()
    algo, _ = load_checkpoint(Path(config.out) / "best.pt")
    return algo, {"train_seconds": state.train_seconds, "steps": state.step,
                  "overrides": overrides, "config": config.to_dict()}


def adapt_meta(algo: Any, w: dict[str, Tensor]) -> dict[str, Any]:
    """A trained meta-learner adapted to the target's kept windows, scored on its test."""
    test = (w["test_x"], w["test_y"])
    if hasattr(algo, "inner_loop"):
        return adapt_by_validation(algo, w["train_x"], w["train_y"], w["val_x"], w["val_y"],
                                   test)
    with torch.no_grad():
        predictor = algo.adapt(w["train_x"], w["train_y"])
        outputs = torch.cat([predictor(chunk) for chunk in test[0].split(4096)])
    return errors(outputs, test[1])


def _all_baselines(windows: dict[float, dict[str, Tensor]]) -> dict[str, Any]:
    """Every baseline at every fraction of ``windows``, the source model fitted once."""
    started = time.perf_counter()
    w = next(iter(windows.values()))
    weights, reg = choose_ridge(w["source_x"], w["source_y"], w["source_val_x"],
                                w["source_val_y"])
    per = {str(f): baselines(windows[f], weights) for f in windows}
    return {"by_fraction": per, "source_reg": reg, "seconds": time.perf_counter() - started}


def _learned_prior(source: str, horizon: int, seed: int, data_dir: str | None,
                   steps: int | None, windows: dict[float, dict[str, Tensor]]
                   ) -> dict[str, Any]:
    """The learned prior: its precision meta-learned on the source's window tasks (sized as
    the gradient meta-learners'), then the penalty's scale chosen on each fraction's target
    validation windows."""
    from metalab.config import load_config

    started = time.perf_counter()
    w = next(iter(windows.values()))
    source_weights, _ = choose_ridge(w["source_x"], w["source_y"], w["source_val_x"],
                                     w["source_val_y"])
    sizes = load_config("ett/default")
    tasks = ett.tasks("train", k_shot=sizes.k_shot, q_query=sizes.q_query, data_dir=data_dir,
                      series=source, horizon=horizon)
    settings = {**PRIOR_TRAINING, **({"steps": steps} if steps is not None else {})}
    precision = learn_precision(tasks, source_weights, seed=seed, **settings)
    seconds = time.perf_counter() - started
    by_fraction = {}
    for fraction, wf in windows.items():
        weights, reg = choose_ridge(wf["train_x"], wf["train_y"], wf["val_x"], wf["val_y"],
                                    prior=source_weights, precision=precision)
        by_fraction[str(fraction)] = {**errors(predict(weights, wf["test_x"]), wf["test_y"]),
                                      "reg": reg}
    return {"train_seconds": seconds, "steps": settings["steps"],
            "config": {"algorithm": LEARNED_PRIOR, "seed": seed, **settings},
            "by_fraction": by_fraction}


def _meta_result(algorithm: str, source: str, horizon: int, seed: int, out: Path,
                 data_dir: str | None, steps: int | None,
                 windows: dict[float, dict[str, Tensor]]) -> dict[str, Any]:
    """One meta-learner trained on the source and adapted at every fraction of ``windows``."""
    if algorithm == LEARNED_PRIOR:
        return _learned_prior(source, horizon, seed, data_dir, steps, windows)
    algo, info = train_meta(algorithm, source, horizon, seed, out, data_dir, steps)
    return {**info, "by_fraction": {str(f): adapt_meta(algo, windows[f]) for f in windows}}


def run(source: str, target: str, seeds: Sequence[int], methods: Sequence[str],
        horizons: Sequence[int], out: Path, data_dir: str | None, steps: int | None = None,
        fresh: bool = False) -> dict[str, Any]:
    """``results[method][seed][fraction][horizon]`` (baselines under seed 0 only: they are
    deterministic), cached under ``out``."""
    torch.set_num_threads(1)
    direction = f"{source}-{target}"
    results: dict[str, Any] = {m: {} for m in methods}
    for horizon in horizons:
        fractions = [f for f in FRACTIONS if horizon in ett.horizons_with_windows(f)]
        windows = {f: prepare(source, target, horizon, f, data_dir) for f in fractions}
        base = [m for m in methods if m in BASELINES]
        if base:
            got = cached_json(out / direction / f"baselines-h{horizon}.json",
                              functools.partial(_all_baselines, windows), fresh)
            for m in base:  # their time: fitting all of them (and the source's ridge)
                for f, per in got["by_fraction"].items():
                    results[m].setdefault(0, {}).setdefault(f, {})[horizon] = {
                        **per[m], "train_seconds": got["seconds"] / len(got["by_fraction"])}
        for seed in seeds:
            for m in (m for m in methods if m in META_LEARNERS):
                got = cached_json(out / direction / f"seed{seed}" / f"{m}-h{horizon}.json",
                                  functools.partial(_meta_result, m, source, horizon, seed,
                                                    out / direction, data_dir, steps, windows),
                                  fresh)
                for f, per in got["by_fraction"].items():
                    results[m].setdefault(seed, {}).setdefault(f, {})[horizon] = {
                        **per, "train_seconds": got["train_seconds"]}
            print(f"{direction} horizon {horizon} seed {seed} done", flush=True)
    return results


def averages(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``avg[method][fraction]``: per seed, the MSE and MAE averaged over the horizons that
    fraction has, then summarised over seeds; training seconds summed over horizons."""
    avg: dict[str, dict[str, dict[str, Any]]] = {}
    for method, by_seed in results.items():
        for fraction in sorted({f for s in by_seed.values() for f in s}):
            seeds = sorted(s for s in by_seed if fraction in by_seed[s])
            per_seed = {metric: [statistics.fmean(v[metric] for v in
                                                  by_seed[s][fraction].values())
                                 for s in seeds] for metric in ("mse", "mae")}
            horizons = sorted(by_seed[seeds[0]][fraction])
            seconds = [sum(v.get("train_seconds", 0.0) for v in by_seed[s][fraction].values())
                       for s in seeds]
            avg.setdefault(method, {})[fraction] = {
                "mse": summary(per_seed["mse"]), "mae": summary(per_seed["mae"]),
                "seeds": seeds, "horizons": horizons, "per_seed_mse": per_seed["mse"],
                "train_seconds": statistics.fmean(seconds)}
    return avg


def table(avg: dict[str, dict[str, dict[str, Any]]]) -> str:
    fractions = sorted({f for by in avg.values() for f in by})
    rows = []
    for method, by in avg.items():
        cells = [method]
        for f in fractions:
            a = by.get(f)
            cells += (["", ""] if a is None else
                      [f"{a['mse']['mean']:.4f} ± {a['mse']['std']:.4f}",
                       f"{a['mae']['mean']:.4f} ± {a['mae']['std']:.4f}"])
        any_f = next(iter(by.values()))
        cells += [str(any_f["seeds"]), f"{any_f['train_seconds']:.0f}"]
        rows.append(cells)
    header = ["method", *(f"{float(f):.0%} {m} (mean ± std)" for f in fractions
                          for m in ("MSE", "MAE")), "seeds", "train s (all horizons)"]
    return markdown(header, rows)


def bar(avg: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The issue's bar: at 10% the best meta-learned adaptation's MSE at or below the shrunk
    ridge's; at 5% below it by more than the meta-learner's seed-to-seed spread (std)."""
    lines = []
    metas = [m for m in avg if m in META_LEARNERS and m != "pretrained"]  # that: a baseline
    if "ridge-shrunk" not in avg or not metas:
        return "bar: needs ridge-shrunk and a meta-learner"
    for f, rule in (("0.1", "<="), ("0.05", "< by more than std")):
        if f not in avg["ridge-shrunk"]:  # no horizon run has windows at this fraction
            continue
        ridge = avg["ridge-shrunk"][f]["mse"]["mean"]
        best = min(metas, key=lambda m: avg[m][f]["mse"]["mean"])
        mean, std = avg[best][f]["mse"]["mean"], avg[best][f]["mse"]["std"]
        met = mean <= ridge if f == "0.1" else ridge - mean > std
        lines.append(f"{float(f):.0%}: best meta-learner {best} MSE {mean:.4f} ± {std:.4f} vs "
                     f"shrunk ridge {ridge:.4f} ({rule}): {'MET' if met else 'NOT MET'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = study_parser("ett", __doc__, [0, 1, 2], [*BASELINES, *META_LEARNERS],
                          "ett-small/", DEFAULT_OUT)
    parser.add_argument("--source", default="ETTh1", choices=ett.SERIES)
    parser.add_argument("--target", default="ETTh2", choices=ett.SERIES)
    parser.add_argument("--horizons", type=int, nargs="+", default=list(ett.HORIZONS))
    args = parser.parse_args(argv)
    if args.source == args.target:
        parser.error("--source and --target must be different transformers")
    results = run(args.source, args.target, args.seeds, args.methods, args.horizons, args.out,
                  args.data_dir, args.steps, args.fresh)
    avg = averages(results)
    text = table(avg) + "\n\n" + bar(avg)
    print(text)
    (args.out / f"{args.source}-{args.target}" / "table.md").write_text(text + "\n")
    if args.records:
        from metalab.studies.records import ett_records, write_records

        for path in write_records(ett_records(avg, args.source, args.target, args.machine,
                                              args.note),
                                  args.records):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
