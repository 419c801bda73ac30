"""MovieLens 100K as a cold-start task distribution: every user is a task (MeLU's protocol,
Lee, Im, Jang, Cho & Chung, KDD 2019).

Data: GroupLens's ``ml-100k`` (Harper & Konstan, ACM TiiS 2015): 100,000 ratings (1 to 5)
by 943 users of 1,682 movies, read from ``u.data``, ``u.item`` and ``u.user`` in a
``movielens-100k/`` or ``ml-100k/`` folder, or straight from the official ``ml-100k.zip``
(MD5 ``0e33842e24a9c977be4e0107933c0723``), under the data search path
(:func:`metalab.data.paths.data_dirs`). **The GroupLens licence forbids redistribution**: this
module only ever reads the files (:func:`read`; it has no ``load``: it is a task source, not a
data set of classes); nothing derived from them is written to disk (no cache:
parsing takes well under a second), so the data never enters a repository, a package or a
shipped cache.

Protocol (MeLU, Sec. 4.1): users with 13 to 100 ratings are tasks; they are split into
meta-train / validation / meta-test users by a seed (:func:`split_users`); a task's query set
is 10 of the user's ratings drawn at random, its support set the rest, so support sets
differ in size (a :class:`~metalab.tasks.RaggedTaskBatch`). An example is one rating, its
input a row of integer ids ``[item, release-year bucket, age bucket, gender, occupation,
19 genre flags]`` (:data:`FEATURES`), embedded by the ``embedding_mlp`` backbone; its target
the rating minus the mean rating of the meta-train users (the one normalisation, fitted on
meta-train users only; add :attr:`UserTasks.center` back to get a rating).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from metalab.data.paths import DataNotFoundError, data_dirs
from metalab.kinds import REGRESSION
from metalab.tasks import RaggedTaskBatch, TaskBatch, stack_tasks

__all__ = ["AGE_EDGES", "CARDINALITIES", "FEATURES", "KIND", "MD5", "SPLITS", "MovieLens",
           "UserTasks", "eligible_users", "query_split", "read", "split_users", "status",
           "tasks"]

KIND = REGRESSION
MD5 = "0e33842e24a9c977be4e0107933c0723"  # GroupLens's ml-100k.zip.md5
URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
FOLDERS = ("movielens-100k", "ml-100k")
FILES = ("u.data", "u.item", "u.user")
SPLITS = ("train", "val", "test")
NUM_USERS, NUM_ITEMS, NUM_RATINGS, NUM_GENRES = 943, 1682, 100_000, 19
# MovieLens-1M's age groups (MeLU's user feature): under 18, 18-24, 25-34, ..., 56+.
AGE_EDGES = (18, 25, 35, 45, 50, 56)
YEAR_FIRST, YEAR_BUCKET = 1920, 5  # release years 1922..1998 in 5-year buckets
YEAR_BUCKETS = (1998 - YEAR_FIRST) // YEAR_BUCKET + 2  # the last bucket: year unknown
FEATURES = ("item", "year", "age", "gender", "occupation",
            *(f"genre{g}" for g in range(NUM_GENRES)))
# Ids per categorical column (the rest are 0/1 genre flags): the backbone's embedding sizes.
CARDINALITIES = (NUM_ITEMS, YEAR_BUCKETS, len(AGE_EDGES) + 1, 2, 21)


@dataclass(frozen=True)
class MovieLens:
    """The parsed data, 0-based ids: ``ratings[R, 3]`` (user, item, rating) in file order,
    ``items[I, 1 + 19]`` (year bucket, genre flags) and ``users[U, 3]`` (age bucket, gender
    0 = M / 1 = F, occupation index in ``occupations``)."""

    ratings: Tensor
    items: Tensor
    users: Tensor
    occupations: tuple[str, ...]

    def examples(self, index: Tensor) -> Tensor:
        """Inputs ``[n, 24]`` (long, :data:`FEATURES`) of the ratings ``index``."""
        user, item = self.ratings[index, 0], self.ratings[index, 1]
        return torch.cat([item.unsqueeze(1), self.items[item, :1], self.users[user],
                          self.items[item, 1:]], dim=1)

    def by_user(self) -> list[Tensor]:
        """Indices into ``ratings`` of each user's ratings, in file order."""
        order = torch.argsort(self.ratings[:, 0], stable=True)
        counts = torch.bincount(self.ratings[:, 0], minlength=len(self.users))
        return list(torch.split(order, counts.tolist()))


# -- finding and parsing the files -------------------------------------------------------------

def _fix_hint(dirs: Sequence[Path]) -> str:
    return (f"MovieLens 100K may not be redistributed, so metalab does not download or ship "
            f"it: get GroupLens's ml-100k.zip yourself ({URL}, MD5 {MD5}) and put the zip, or "
            f"its unzipped ml-100k/ folder, in one of: {', '.join(map(str, dirs))} (or point "
            f"--data-dir / METALAB_DATA at a folder holding it).")


def _find(data_dir: str | os.PathLike | None) -> Path | None:
    """The first folder with the three files, or ``ml-100k.zip``, on the search path."""
    for root in data_dirs(data_dir):
        for folder in FOLDERS:
            if all((root / folder / name).is_file() for name in FILES):
                return root / folder
        if (root / "ml-100k.zip").is_file():
            return root / "ml-100k.zip"
    return None


def _read_files(source: Path) -> dict[str, bytes]:
    """The bytes of :data:`FILES`, from a folder or (without extracting) from the zip, whose
    MD5 is checked first."""
    if source.suffix != ".zip":
        return {name: (source / name).read_bytes() for name in FILES}
    blob = source.read_bytes()
    if hashlib.md5(blob).hexdigest() != MD5:
        raise DataNotFoundError(f"{source} has MD5 {hashlib.md5(blob).hexdigest()}, not "
                                f"GroupLens's {MD5}: the download is incomplete or another "
                                f"file. Download it again ({URL}).")
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        return {name: archive.read(f"ml-100k/{name}") for name in FILES}


@functools.lru_cache(maxsize=4)
def _parse(source: Path, signature: tuple[tuple[int, int], ...]) -> MovieLens:
    """Parse the files of ``source`` (cached in memory per path and file sizes/times)."""
    raw = _read_files(source)
    rows = [line.split("\t") for line in raw["u.data"].decode("ascii").splitlines() if line]
    ratings = torch.tensor([[int(u) - 1, int(i) - 1, int(r)] for u, i, r, _ in rows])
    items = torch.zeros(NUM_ITEMS, 1 + NUM_GENRES, dtype=torch.long)
    for line in raw["u.item"].decode("latin-1").splitlines():
        if not line:
            continue
        fields = line.split("|")
        date = fields[2]
        year = int(date[-4:]) if date else None
        bucket = (YEAR_BUCKETS - 1 if year is None else
                  min((year - YEAR_FIRST) // YEAR_BUCKET, YEAR_BUCKETS - 2))
        items[int(fields[0]) - 1] = torch.tensor([max(bucket, 0), *map(int, fields[5:24])])
    occupations: list[str] = []
    users = torch.zeros(NUM_USERS, 3, dtype=torch.long)
    for line in raw["u.user"].decode("latin-1").splitlines():
        if not line:
            continue
        uid, age, gender, job, _ = line.split("|")
        if job not in occupations:
            occupations.append(job)
        age_bucket = sum(int(age) >= edge for edge in AGE_EDGES)
        users[int(uid) - 1] = torch.tensor([age_bucket, int(gender == "F"),
                                            occupations.index(job)])
    data = MovieLens(ratings, items, users, tuple(occupations))
    _check_counts(data, source)
    return data


def _check_counts(data: MovieLens, source: Path) -> None:
    counts = (len(data.ratings), len(data.users), len(data.items))
    if counts != (NUM_RATINGS, NUM_USERS, NUM_ITEMS) or int(data.ratings[:, 0].max()) != \
            NUM_USERS - 1 or int(data.ratings[:, 1].max()) != NUM_ITEMS - 1:
        raise DataNotFoundError(f"{source} holds {counts[0]} ratings, {counts[1]} users and "
                                f"{counts[2]} items, not MovieLens 100K's 100,000 / 943 / 1,682: "
                                f"the files are damaged or another data set. {_fix_hint([])}")


def read(data_dir: str | os.PathLike | None = None) -> MovieLens:
    """MovieLens 100K from the data search path (read only; see the module docstring)."""
    source = _find(data_dir)
    if source is None:
        raise DataNotFoundError(f"MovieLens 100K not found. {_fix_hint(data_dirs(data_dir))}")
    paths = [source] if source.suffix == ".zip" else [source / name for name in FILES]
    signature = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    return _parse(source, signature)


def status(data_dir: str | os.PathLike | None = None) -> str:
    """One line for ``metalab datasets``: where the files were found (nothing is parsed)."""
    source = _find(data_dir)
    if source is None:
        return "not found; get GroupLens's ml-100k.zip yourself (redistribution is forbidden)"
    return f"found at {source} (read in place, never cached)"


# -- the protocol ------------------------------------------------------------------------------

def eligible_users(data: MovieLens, min_ratings: int = 13, max_ratings: int = 100) -> Tensor:
    """Users (0-based) with ``min_ratings`` to ``max_ratings`` ratings, MeLU's filter."""
    counts = torch.bincount(data.ratings[:, 0], minlength=len(data.users))
    return torch.nonzero((counts >= min_ratings) & (counts <= max_ratings)).flatten()


def split_users(users: Tensor, seed: int, fractions: Sequence[float] = (0.7, 0.1, 0.2),
                ) -> dict[str, Tensor]:
    """``users`` shuffled by ``seed`` and cut into train / val / test by ``fractions``
    (the test share rounded, then the validation share; train gets the rest)."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three shares (train, val, test) summing to 1, "
                         f"got {fractions!r}.")
    order = users[torch.randperm(len(users), generator=torch.Generator().manual_seed(seed))]
    test = round(fractions[2] * len(users))
    val = round(fractions[1] * len(users))
    return {"test": order[:test].sort().values, "val": order[test:test + val].sort().values,
            "train": order[test + val:].sort().values}


def query_split(count: int, q_query: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Positions ``(support, query)`` of a user's ``count`` ratings: ``q_query`` drawn at
    random for the query set, the rest (in their original order) for the support set."""
    if count <= q_query:
        raise ValueError(f"a user needs more than {q_query} ratings for a {q_query}-rating "
                         f"query set, this one has {count}.")
    order = torch.randperm(count, generator=generator)
    return order[q_query:].sort().values, order[:q_query]


class UserTasks:
    """Users as tasks: ``sample(T, generator)`` draws ``T`` of ``users`` (with replacement)
    and splits each one's ratings into a support set and ``q_query`` query ratings
    (:func:`query_split`); :meth:`all_users` gives every user once, for evaluation.

    Inputs are ``[n, 24]`` long ids (:data:`FEATURES`), targets ``[n, 1]`` the rating minus
    ``center`` (default: the mean rating of ``center_users``, the meta-train users).
    """

    kind = KIND

    def __init__(self, data: MovieLens, users: Tensor, q_query: int = 10,
                 center: float | None = None, center_users: Tensor | None = None) -> None:
        if len(users) == 0:
            raise ValueError("UserTasks needs at least one user.")
        self.data, self.users, self.q_query = data, users, q_query
        per_user = data.by_user()
        self.ratings = [per_user[u] for u in users.tolist()]
        if center is None:
            fit_on = users if center_users is None else center_users
            index = torch.cat([per_user[u] for u in fit_on.tolist()])
            center = data.ratings[index, 2].double().mean().item()
        self.center = float(center)

    def task(self, position: int, generator: torch.Generator) -> TaskBatch:
        """User ``users[position]`` as a task of one, its query ratings drawn by ``generator``."""
        index = self.ratings[position]
        support, query = query_split(len(index), self.q_query, generator)
        x = self.data.examples(index)
        y = self.data.ratings[index, 2:].float() - self.center
        return TaskBatch(x[support].unsqueeze(0), y[support].unsqueeze(0),
                         x[query].unsqueeze(0), y[query].unsqueeze(0))

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch | RaggedTaskBatch:
        picks = torch.randint(len(self.users), (num_tasks,), generator=generator)
        return stack_tasks([self.task(p, generator) for p in picks.tolist()])

    def all_users(self, seed: int) -> list[TaskBatch]:
        """Every user once, in order, each query set drawn from one generator seeded
        ``seed``: the fixed evaluation tasks (the same for every method)."""
        generator = torch.Generator().manual_seed(seed)
        return [self.task(p, generator) for p in range(len(self.users))]

    def __repr__(self) -> str:
        return (f"UserTasks({len(self.users)} users, q_query={self.q_query}, "
                f"center={self.center:.4f})")


def tasks(
    split: str, n_way: int = 0, k_shot: int = 0, q_query: int = 10,
    data_dir: str | os.PathLike | None = None, split_seed: int = 0, min_ratings: int = 13,
    max_ratings: int = 100, fractions: Sequence[float] = (0.7, 0.1, 0.2),
) -> UserTasks:
    """The users of ``split`` (train / val / test) of the user split seeded ``split_seed``
    as tasks with ``q_query`` query ratings each (``n_way`` and ``k_shot`` do not apply: the
    support set is the rest of the user's ratings). Targets are centred on the mean rating of
    the split's meta-train users."""
    if split not in SPLITS:
        raise ValueError(f"unknown movielens100k split {split!r}; choose one of "
                         f"{', '.join(SPLITS)}.")
    data = read(data_dir)
    splits = split_users(eligible_users(data, min_ratings, max_ratings), split_seed, fractions)
    return UserTasks(data, splits[split], q_query, center_users=splits["train"])
