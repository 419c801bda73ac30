"""ETT: hourly Electricity Transformer Temperature series (Zhou et al., Informer, AAAI 2021),
for forecasting on a new transformer.

Data: ``ETTh1.csv`` and ``ETTh2.csv`` (zhouhaoyi/ETDataset, CC BY-ND 4.0: they are read and
evaluated, never modified or redistributed) in an ``ett-small/`` or ``ETT-small/`` folder
on the data search path: 17,420 hourly rows each, 7 channels (HUFL, HULL, MUFL, MULL, LUFL,
LULL, OT).

Protocol (Informer; PatchTST, GPT4TS and Time-LLM use it): the first 12 / 4 / 4 months
(8,640 / 2,880 / 2,880 hours) are train / validation / test; a window is ``lookback`` = 336
hours of one channel (channel independence, as in PatchTST and DLinear), its target the next
``horizon`` (96, 192, 336 or 720) hours; validation and test windows may look back into the
part before them (:func:`borders`). Few-shot: ``fraction`` (5% or 10%) keeps the first
``(8640 − lookback) · fraction`` training windows (GPT4TS's rule).

Normalisation, in two stages:

1. per channel, mean and standard deviation (:func:`fit_scaler`), fitted on the training
   rows of the series being forecast: with ``scaler: train`` (the default, as the Informer,
   PatchTST and GPT4TS code, also in GPT4TS's few-shot runs) on all 12 training months, i.e.
   the statistics of the whole training window though a few-shot run trains on 5% or 10% of
   its windows; with ``scaler: available`` only on the rows of the kept training windows.
   Measured here (ridge, ETTh2): fitted on the first 10% (about seven weeks, a quiet
   stretch), the test set's normalised MSE becomes 3 to 25, not comparable with anything
   published, so the reported runs use ``train``;
2. per window, the lookback's last value is subtracted from the lookback and the target
   (``instance: last``, NLinear, Zeng et al. AAAI 2023); forecasts add it back. It is what
   lets a model of one transformer serve another at a different level.

MSE and MAE are computed on the stage-1 normalised series (the published convention).

As a task source (``tasks``), a task is a stretch of one channel of the training part: a
random start, ``k_shot`` consecutive windows for support and the ``q_query`` windows that
follow for the query: the "windows as tasks" of meta-training on the source transformer.
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from metalab.data.paths import DataNotFoundError, data_dirs
from metalab.kinds import REGRESSION
from metalab.tasks import TaskBatch

__all__ = ["CHANNELS", "HORIZONS", "INSTANCE", "KIND", "LOOKBACK", "ROWS", "SCALERS", "SERIES",
           "SPLITS", "Scaler", "WindowTasks", "borders", "fit_scaler", "horizons_with_windows",
           "read", "scaler_rows", "split_windows", "status", "tasks", "train_rows", "windows"]

KIND = REGRESSION
SERIES = ("ETTh1", "ETTh2")
CHANNELS = ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
ROWS = 17_420
MONTH = 30 * 24
TRAIN, VAL, TEST = 12 * MONTH, 4 * MONTH, 4 * MONTH  # 8,640 / 2,880 / 2,880 hours
LOOKBACK = 336
HORIZONS = (96, 192, 336, 720)
SPLITS = ("train", "val", "test")
INSTANCE = ("last", "none")  # per-window normalisation: subtract the last lookback value, or not
SCALERS = ("train", "available")  # rows the per-channel scaler is fitted on
FOLDERS = ("ett-small", "ETT-small")
SOURCE = "https://github.com/zhouhaoyi/ETDataset (ETT-small/ETTh1.csv, ETTh2.csv)"


def _find(name: str, data_dir: str | os.PathLike | None) -> Path | None:
    for root in data_dirs(data_dir):
        for folder in FOLDERS:
            if (root / folder / f"{name}.csv").is_file():
                return root / folder / f"{name}.csv"
    return None


@functools.lru_cache(maxsize=4)
def _parse(path: Path, signature: tuple[int, int]) -> Tensor:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    if header[1:] != list(CHANNELS) or len(body) != ROWS:
        raise DataNotFoundError(f"{path} has columns {header} and {len(body)} rows; ETT's "
                                f"hourly files have date + {', '.join(CHANNELS)} and {ROWS:,} "
                                f"rows. Get the unmodified file from {SOURCE}.")
    return torch.tensor([[float(v) for v in row[1:]] for row in body], dtype=torch.float64)


def read(name: str, data_dir: str | os.PathLike | None = None) -> Tensor:
    """The series ``name`` (ETTh1 or ETTh2) as ``[17420, 7]`` float64, unnormalised."""
    if name not in SERIES:
        raise ValueError(f"unknown ETT series {name!r}; choose one of {', '.join(SERIES)}.")
    path = _find(name, data_dir)
    if path is None:
        places = ", ".join(str(d / FOLDERS[0]) for d in data_dirs(data_dir))
        raise DataNotFoundError(f"{name}.csv not found (looked in {places}). Download it "
                                f"from the Informer authors' repository, {SOURCE}, into an "
                                f"ett-small/ folder there, unmodified (CC BY-ND 4.0).")
    stat = path.stat()
    return _parse(path, (stat.st_size, stat.st_mtime_ns))


def borders(split: str, lookback: int = LOOKBACK) -> tuple[int, int]:
    """Rows ``[start, end)`` of ``split``: train ``[0, 8640)``, validation and test start
    ``lookback`` rows early so that their first window's target is their first hour."""
    starts = {"train": 0, "val": TRAIN - lookback, "test": TRAIN + VAL - lookback}
    ends = {"train": TRAIN, "val": TRAIN + VAL, "test": TRAIN + VAL + TEST}
    if split not in starts:
        raise ValueError(f"unknown ETT split {split!r}; choose one of {', '.join(SPLITS)}.")
    return starts[split], ends[split]


def train_rows(fraction: float = 1.0, lookback: int = LOOKBACK) -> int:
    """Rows of the training part a run with ``fraction`` of the training windows may use:
    ``(8640 − lookback) · fraction // 1 + lookback`` (GPT4TS's few-shot rule)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    return int((TRAIN - lookback) * fraction) + lookback


@dataclass(frozen=True)
class Scaler:
    """Per-channel standardisation ``(x − mean) / std``."""

    mean: Tensor
    std: Tensor

    def __call__(self, series: Tensor) -> Tensor:
        return (series - self.mean) / self.std


def fit_scaler(series: Tensor, rows: int) -> Scaler:
    """Mean and (population) standard deviation per channel of ``series[:rows]``, as
    scikit-learn's StandardScaler, which the Informer code uses."""
    part = series[:rows]
    return Scaler(part.mean(0), part.std(0, unbiased=False))


def windows(series: Tensor, lookback: int, horizon: int, instance: str = "none",
            ) -> tuple[Tensor, Tensor]:
    """Every window of ``series`` ``[rows, channels]``, one channel at a time: inputs
    ``[n, lookback]`` and targets ``[n, horizon]`` (float32), ``n = channels · (rows −
    lookback − horizon + 1)``, channel by channel in time order. ``instance="last"``
    subtracts each window's last lookback value from its inputs and targets (an error in
    the targets is then the same as in the series)."""
    if instance not in INSTANCE:
        raise ValueError(f"instance must be one of {', '.join(INSTANCE)}, got {instance!r}.")
    count = series.shape[0] - lookback - horizon + 1
    if count < 1:
        return (torch.empty(0, lookback), torch.empty(0, horizon))
    unfolded = series.T.unfold(1, lookback + horizon, 1)  # [channels, count, L + H]
    flat = unfolded.reshape(-1, lookback + horizon)
    if instance == "last":
        flat = flat - flat[:, lookback - 1:lookback]
    flat = flat.float()
    return flat[:, :lookback].contiguous(), flat[:, lookback:].contiguous()


def split_windows(series: Tensor, split: str, scaler: Scaler, horizon: int,
                  lookback: int = LOOKBACK, fraction: float = 1.0, instance: str = "last",
                  ) -> tuple[Tensor, Tensor]:
    """The normalised windows of ``split`` (training: of the first ``fraction``)."""
    start, end = borders(split, lookback)
    if split == "train":
        end = train_rows(fraction, lookback)
    return windows(scaler(series[start:end]), lookback, horizon, instance)


def scaler_rows(scaler: str, fraction: float, lookback: int = LOOKBACK) -> int:
    """Training rows the per-channel scaler is fitted on (see the module docstring)."""
    if scaler not in SCALERS:
        raise ValueError(f"scaler must be one of {', '.join(SCALERS)}, got {scaler!r}.")
    return train_rows(fraction if scaler == "available" else 1.0, lookback)


class WindowTasks:
    """Stretches of one channel as tasks: ``k_shot`` consecutive windows (a random channel
    and start) as the support set, the ``q_query`` windows after them as the query set.
    ``series`` is normalised ``[rows, channels]``."""

    kind = KIND

    def __init__(self, series: Tensor, lookback: int, horizon: int, k_shot: int, q_query: int,
                 stride: int = 1, instance: str = "last") -> None:
        self.x, self.y = (t.view(series.shape[1], -1, t.shape[-1])
                          for t in windows(series, lookback, horizon, instance))
        self.k_shot, self.q_query, self.stride = k_shot, q_query, stride
        span = (k_shot + q_query - 1) * stride + 1
        self.starts = self.x.shape[1] - span + 1
        if self.starts < 1:
            raise ValueError(f"{k_shot} + {q_query} windows of {lookback} + {horizon} hours do "
                             f"not fit in {series.shape[0]} rows; lower k_shot or q_query.")

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        channel = torch.randint(self.x.shape[0], (num_tasks, 1), generator=generator)
        start = torch.randint(self.starts, (num_tasks, 1), generator=generator)
        offsets = torch.arange(self.k_shot + self.q_query) * self.stride
        x, y = self.x[channel, start + offsets], self.y[channel, start + offsets]
        k = self.k_shot
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def __repr__(self) -> str:
        return (f"WindowTasks({self.x.shape[0]} channels, {self.x.shape[1]} windows each, "
                f"k_shot={self.k_shot}, q_query={self.q_query}, stride={self.stride})")


def tasks(
    split: str, n_way: int = 0, k_shot: int = 32, q_query: int = 32,
    data_dir: str | os.PathLike | None = None, series: str = "ETTh1",
    horizon: int = 96, lookback: int = LOOKBACK, fraction: float = 1.0,
    scaler: str = "train", stride: int = 1, instance: str = "last",
) -> WindowTasks:
    """Window tasks of ``split`` of ``series`` (``n_way`` does not apply), normalised by the
    scaler fitted on all 12 training months (``scaler: train``) or on the rows of its
    ``fraction`` of training windows (``scaler: available``), then per window
    (``instance``)."""
    data = read(series, data_dir)
    fitted = fit_scaler(data, scaler_rows(scaler, fraction, lookback))
    start, end = borders(split, lookback)
    if split == "train":
        end = train_rows(fraction, lookback)
    return WindowTasks(fitted(data[start:end]), lookback, horizon, k_shot, q_query, stride,
                       instance)


def status(data_dir: str | os.PathLike | None = None) -> str:
    """One line for ``metalab datasets``: which hourly files were found."""
    found = {name: _find(name, data_dir) for name in SERIES}
    if not any(found.values()):
        return f"not found; download ETTh1.csv and ETTh2.csv from {SOURCE}"
    return "; ".join(f"{name}: {path or 'missing'}" for name, path in found.items())


def horizons_with_windows(fraction: float, lookback: int = LOOKBACK,
                          horizons: Sequence[int] = HORIZONS) -> list[int]:
    """The horizons for which ``fraction`` of the training part holds at least one window
    (at 5%, 751 rows hold no 336 + 720-hour window)."""
    rows = train_rows(fraction, lookback)
    return [h for h in horizons if rows - lookback - h + 1 >= 1]
