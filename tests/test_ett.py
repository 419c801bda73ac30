"""ETT (ETTh1, ETTh2) for forecasting on a new transformer: counts, the standard split and
windows, the normalisation (fitted only on the training rows the protocol allows), the
window tasks, and the ridge baselines against hand computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metalab.data import DATASETS, dataset_kind, ett
from metalab.data.paths import DataNotFoundError
from metalab.kinds import REGRESSION
from metalab.studies import ett as study
from metalab.studies.forecasting import choose_ridge, errors, learn_precision, predict, ridge
from metalab.tasks import TaskBatch
from tests.conftest import real_data_dir


@pytest.fixture
def data_dir() -> Path:
    return real_data_dir("ett-small")


@pytest.mark.realdata
def test_counts_and_split(data_dir: Path) -> None:
    for name in ett.SERIES:
        series = ett.read(name)
        assert series.shape == (17_420, 7) and series.dtype == torch.float64
        assert torch.isfinite(series).all()
    assert [ett.borders(s) for s in ett.SPLITS] == [(0, 8640), (8304, 11520), (11184, 14400)]
    scaler = ett.fit_scaler(ett.read("ETTh2"), 8640)
    x, y = ett.split_windows(ett.read("ETTh2"), "test", scaler, 96)
    assert x.shape == (7 * (2880 - 96 + 1), 336) and y.shape == (7 * 2785, 96)
    # The first test window's target is the first test hour (row 11,520), channel 0, as
    # normalised and made relative to the lookback's last hour (row 11,519).
    raw = (ett.read("ETTh2")[:, 0] - scaler.mean[0]) / scaler.std[0]
    assert y[0, 0].item() == pytest.approx((raw[11520] - raw[11519]).item(), abs=1e-5)
    assert ett.train_rows(0.1) == 830 + 336 and ett.train_rows(0.05) == 415 + 336
    assert ett.horizons_with_windows(0.05) == [96, 192, 336]
    assert ett.horizons_with_windows(0.1) == list(ett.HORIZONS)
    assert DATASETS["ett"] is ett and dataset_kind("ett") is REGRESSION


@pytest.mark.realdata
def test_scalers_see_only_the_rows_the_protocol_allows(data_dir: Path) -> None:
    series = ett.read("ETTh2")
    full = ett.fit_scaler(series, ett.scaler_rows("train", 0.1))
    assert torch.allclose(full.mean, series[:8640].mean(0))
    assert torch.allclose(full.std, series[:8640].std(0, unbiased=False))
    kept = ett.fit_scaler(series, ett.scaler_rows("available", 0.1))
    assert torch.allclose(kept.mean, series[:1166].mean(0))
    # The prepared windows: the target's scaler from its training months only, the
    # source's from its own; validation and test rows never change them.
    windows = study.prepare("ETTh1", "ETTh2", 96, 0.1)
    assert windows["train_x"].shape[0] == 7 * (1166 - 336 - 96 + 1)
    changed = series.clone()
    changed[8640:] += 100.0
    assert torch.equal(ett.fit_scaler(changed, 8640).mean, full.mean)


def test_scaler_and_windows_on_a_tiny_series() -> None:
    series = torch.arange(20, dtype=torch.float64).view(10, 2)  # rows 0..9, two channels
    scaler = ett.fit_scaler(series, 4)
    assert scaler.mean.tolist() == [3.0, 4.0]  # rows 0..3 only
    assert scaler.std.tolist() == pytest.approx([(5.0) ** 0.5] * 2)  # population std
    x, y = ett.windows(series, 3, 2)
    assert x.shape == (2 * 6, 3) and y.shape == (12, 2)
    assert x[0].tolist() == [0, 2, 4] and y[0].tolist() == [6, 8]  # channel 0 first
    assert x[6].tolist() == [1, 3, 5] and y[6].tolist() == [7, 9]  # then channel 1
    x, y = ett.windows(series, 3, 2, instance="last")
    assert x[0].tolist() == [-4, -2, 0] and y[0].tolist() == [2, 4]
    assert ett.windows(series, 8, 4)[0].shape == (0, 8)  # too short: no window
    with pytest.raises(ValueError, match="instance"):
        ett.windows(series, 3, 2, instance="mean")


def test_window_tasks_are_consecutive_and_disjoint() -> None:
    series = torch.arange(60, dtype=torch.float64).view(30, 2)
    source = ett.WindowTasks(series, lookback=4, horizon=2, k_shot=3, q_query=2,
                             instance="none")
    batch = source.sample(5, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (5, 3, 4) and batch.query_y.shape == (5, 2, 2)
    for t in range(5):
        starts = torch.cat([batch.support_x[t, :, 0], batch.query_x[t, :, 0]])
        assert torch.equal(starts.diff(), torch.full((4,), 2.0))  # one hour apart, in order
    with pytest.raises(ValueError, match="do not fit"):
        ett.WindowTasks(series, 20, 8, 3, 3)


def test_missing_files_say_where_to_get_them(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALAB_DATA", str(tmp_path))
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError, match="zhouhaoyi/ETDataset"):
        ett.read("ETTh1")
    assert "not found" in ett.status()
    with pytest.raises(ValueError, match="ETTh1, ETTh2"):
        ett.read("ETTm1")


# -- the baselines, by hand ----------------------------------------------------------------------

def test_ridge_and_shrunk_ridge_by_hand() -> None:
    x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[2.0], [4.0]])
    # A = [[1, 1], [2, 1]]; AᵀA + I = [[6, 3], [3, 3]]; Aᵀy = [10, 6] -> w = [4/3, 2/3].
    assert ridge(x, y, 1.0).flatten().tolist() == pytest.approx([4 / 3, 2 / 3])
    # Shrunk toward the exact solution [2, 0]: it stays there for any λ.
    prior = torch.tensor([[2.0], [0.0]])
    assert ridge(x, y, 1.0, prior).flatten().tolist() == pytest.approx([2.0, 0.0])
    # Toward [0, 1] with λ = 1: rhs = [10, 7] -> w = [1/9 (30 − 21), 1/9 (−30 + 42)].
    assert ridge(x, y, 1.0, torch.tensor([[0.0], [1.0]])).flatten().tolist() == \
        pytest.approx([1.0, 4 / 3])
    # Far from the data the prior wins; with little penalty, least squares.
    assert ridge(x, y, 1e9, prior * 3).flatten().tolist() == pytest.approx([6.0, 0.0], abs=1e-6)
    assert predict(ridge(x, y, 1e-9), torch.tensor([[3.0]])).item() == pytest.approx(6.0)


def test_choose_ridge_takes_the_best_validation_regulariser() -> None:
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(5, 1, generator=generator)
    x = torch.randn(8, 5, generator=generator)
    y = x @ w + 0.5 * torch.randn(8, 1, generator=generator)
    val_x = torch.randn(50, 5, generator=generator)
    val_y = val_x @ w
    chosen, reg = choose_ridge(x, y, val_x, val_y, grid=(0.01, 1.0, 100.0))
    scores = {r: errors(predict(ridge(x, y, r), val_x), val_y)["mse"] for r in (0.01, 1, 100)}
    assert reg == min(scores, key=scores.get)
    assert torch.allclose(chosen, ridge(x, y, reg))
    assert errors(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])) == \
        {"mse": 2.5, "mae": 1.5}


def test_precision_weighs_the_penalty_per_row_by_hand() -> None:
    x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[2.0], [4.0]])
    prior = torch.tensor([[0.0], [1.0]])
    assert torch.equal(ridge(x, y, 1.0, prior, precision=torch.ones(2)), ridge(x, y, 1.0, prior))
    # Penalty diag(2, 0.5) toward [0, 1]: AᵀA + P = [[7, 3], [3, 2.5]], rhs = [10, 6.5]
    # -> w = 1/8.5 [2.5·10 − 3·6.5, −3·10 + 7·6.5] = [11/17, 31/17].
    assert ridge(x, y, 1.0, prior, precision=torch.tensor([2.0, 0.5])).flatten().tolist() == \
        pytest.approx([11 / 17, 31 / 17])
    # A row with an overwhelming precision stays at the prior; the other fits the rest.
    pinned = ridge(x, y, 1.0, prior, precision=torch.tensor([1e12, 1e-12])).flatten()
    assert pinned.tolist() == pytest.approx([0.0, 3.0], abs=1e-6)  # bias = mean of y − 0·x


class _TasksAroundAPrior:
    """Linear tasks ``y = x w + noise`` whose ``w`` differs from ``prior`` on its first row
    only (the second, and the bias, are shared by every task)."""

    kind = None

    def __init__(self, prior: torch.Tensor, k: int = 8, q: int = 16) -> None:
        self.prior, self.k, self.q = prior, k, q

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        w = self.prior[:2].expand(num_tasks, 2, 1).clone()
        w[:, 0] += 2 * torch.randn(num_tasks, 1, generator=generator)
        x = torch.randn(num_tasks, self.k + self.q, 2, generator=generator)
        y = x @ w + self.prior[2] + 0.1 * torch.randn(num_tasks, self.k + self.q, 1,
                                                      generator=generator)
        return TaskBatch(x[:, :self.k], y[:, :self.k], x[:, self.k:], y[:, self.k:])


def test_learned_precision_frees_the_rows_tasks_differ_on() -> None:
    prior = torch.tensor([[1.0], [-1.0], [0.5]])  # two lags and the bias
    tasks = _TasksAroundAPrior(prior)
    precision = learn_precision(tasks, prior, steps=200, tasks_per_step=8, lr=0.1, start=10.0)
    assert precision.shape == (3,)
    assert precision[0] < 10.0 < precision[1] and precision[0] < precision[2]
    assert float(precision[1] / precision[0]) > 100
    assert torch.equal(precision, learn_precision(tasks, prior, steps=200, tasks_per_step=8,
                                                  lr=0.1, start=10.0))  # seeded
    # On a new task, adapting with it beats the isotropic penalty on the query windows.
    batch = tasks.sample(64, torch.Generator().manual_seed(5))

    def query_mse(**penalty: torch.Tensor) -> float:
        return sum(errors(predict(ridge(sx, sy, 1.0, prior, **penalty), qx), qy)["mse"]
                   for sx, sy, qx, qy in zip(batch.support_x, batch.support_y, batch.query_x,
                                             batch.query_y, strict=True)) / 64
    isotropic = min(query_mse(precision=torch.full((3,), r)) for r in (0.1, 1.0, 10.0, 100.0))
    assert query_mse(precision=precision) < 0.8 * isotropic


def test_zero_shot_and_gradient_adaptation_on_a_tiny_problem() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(200, 3, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    windows = {"train_x": x[:100], "train_y": y[:100], "val_x": x[100:150],
               "val_y": y[100:150], "test_x": x[150:], "test_y": y[150:]}
    source = ridge(x, y, 1e-6)
    result = study.baselines(windows, source)
    assert result["zero-shot"]["mse"] == pytest.approx(0.0, abs=1e-8)
    assert result["ridge-shrunk"]["mse"] == pytest.approx(0.0, abs=1e-8)
    assert result["ridge-scratch"]["mse"] < 1e-3
    # Target-only SGD from zero: more steps chosen when they lower the validation error.
    assert result["target-only-sgd"]["steps"] >= 100 and result["target-only-sgd"]["mse"] < 0.05
    sgd = study._LinearSGD(3, 1)
    none = study.adapt_by_validation(sgd, x[:100], y[:100], x[100:150], y[100:150],
                                     (x[150:], y[150:]), grid=(0,))
    assert none["steps"] == 0
    assert none["mse"] == pytest.approx(errors(torch.zeros(50, 1), y[150:])["mse"])


def test_study_averages_bar_and_records() -> None:
    from metalab.studies.records import ett_records

    def cell(mse: float) -> dict:
        return {"mse": mse, "mae": mse / 2, "train_seconds": 10.0}

    results = {"ridge-shrunk": {0: {"0.05": {96: cell(0.30)}, "0.1": {96: cell(0.40),
                                                                    720: cell(0.60)}}},
               "maml": {s: {"0.05": {96: cell(0.25 + s / 100)},
                            "0.1": {96: cell(0.40), 720: cell(0.50 + s / 100)}}
                        for s in (0, 1, 2)}}
    avg = study.averages(results)
    assert avg["ridge-shrunk"]["0.1"]["mse"]["mean"] == pytest.approx(0.5)  # over horizons
    assert avg["maml"]["0.1"]["per_seed_mse"] == pytest.approx([0.45, 0.455, 0.46])
    assert avg["maml"]["0.05"]["mse"]["std"] == pytest.approx(0.01)
    text = study.bar(avg)
    assert "10%: best meta-learner maml MSE 0.4550" in text and "10%" in text
    assert text.count("MET") == 2 and "NOT MET" not in text  # 0.455 <= 0.5; 0.3 - 0.26 > 0.01
    records = dict(ett_records(avg, "ETTh1", "ETTh2", "test machine", bar_note="why"))
    shrunk = records["ett-h1-h2/ridge-shrunk-mse.json"]
    assert shrunk["note"] == "why" and "deterministic" in shrunk["protocol"]["variant"]
    assert [r["setting"] for r in shrunk["results"]] == ["5pct-mse", "10pct-mse"]
    assert records["ett-h1-h2/maml-mae.json"]["results"][1]["mean"] == pytest.approx(0.2275)
