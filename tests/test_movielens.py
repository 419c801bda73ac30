"""MovieLens 100K users as tasks (MeLU's protocol): counts, the user filter and split, the
support/query split, the normalisation, the baselines against hand computations, and that
the data is only ever read (the GroupLens licence forbids redistributing it)."""

from __future__ import annotations

import builtins
import math
import os
from pathlib import Path

import pytest
import torch

from metalab.data import DATASETS, dataset_kind
from metalab.data import movielens100k as ml
from metalab.data.paths import DataNotFoundError
from metalab.kinds import REGRESSION
from metalab.models import build_backbone
from metalab.studies import ratings as R
from metalab.studies.movielens import score
from tests.conftest import real_data_dir

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_dir() -> Path:
    return real_data_dir("movielens-100k")


# -- the real data ---------------------------------------------------------------------------

@pytest.mark.realdata
def test_counts_and_features(data_dir: Path) -> None:
    data = ml.read()
    assert data.ratings.shape == (100_000, 3) and len(data.users) == 943
    assert len(data.items) == 1682 and len(data.occupations) == 21
    assert torch.equal(data.ratings[:, 0].unique(), torch.arange(943))
    assert torch.equal(data.ratings[:, 1].unique(), torch.arange(1682))
    assert torch.bincount(data.ratings[:, 2])[1:].tolist() == [6110, 11370, 27145, 34174, 21201]
    assert torch.bincount(data.ratings[:, 0]).min() == 20  # every user rated at least 20
    # user 1 (u.user: "1|24|M|technician|85711"): 18-24, male; Toy Story: 1995, 3 genres.
    assert data.users[0, :2].tolist() == [1, 0]
    assert data.occupations[int(data.users[0, 2])] == "technician"
    assert data.items[0, 0] == (1995 - 1920) // 5 and data.items[0, 1:].sum() == 3
    x = data.examples(torch.arange(5))
    assert x.shape == (5, len(ml.FEATURES)) and x.dtype == torch.long
    for column, size in enumerate(ml.CARDINALITIES):
        assert int(data.examples(torch.arange(100_000))[:, column].max()) < size


@pytest.mark.realdata
def test_user_filter_and_split(data_dir: Path) -> None:
    data = ml.read()
    users = ml.eligible_users(data)
    counts = torch.bincount(data.ratings[:, 0], minlength=943)
    assert len(users) == 582 and counts[users].min() >= 13 and counts[users].max() <= 100
    for seed in range(3):
        splits = ml.split_users(users, seed)
        sets = {name: set(part.tolist()) for name, part in splits.items()}
        assert [len(sets[s]) for s in ("train", "val", "test")] == [408, 58, 116]
        assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"]
        assert not sets["val"] & sets["test"]
        assert sets["train"] | sets["val"] | sets["test"] == set(users.tolist())
    assert not torch.equal(ml.split_users(users, 0)["test"], ml.split_users(users, 1)["test"])
    assert torch.equal(ml.split_users(users, 3)["test"], ml.split_users(users, 3)["test"])


@pytest.mark.realdata
def test_support_and_query_are_disjoint_and_cover_the_user(data_dir: Path) -> None:
    source = ml.tasks("test", split_seed=0)
    assert source.kind is REGRESSION and dataset_kind("movielens100k") is REGRESSION
    sizes = set()
    for position, batch in enumerate(source.all_users(seed=0)[:40]):
        task = batch.task(0)
        user_items = ml.read().ratings[source.ratings[position], 1]
        support, query = set(task.support_x[:, 0].tolist()), set(task.query_x[:, 0].tolist())
        assert len(query) == 10 and not support & query  # each user rates an item once
        assert support | query == set(user_items.tolist())
        sizes.add(len(support))
    assert len(sizes) > 5  # support sets differ in size
    # The same seed gives the same query sets; another seed other ones.
    again, other = source.all_users(0)[3].task(0), source.all_users(1)[3].task(0)
    first = source.all_users(0)[3].task(0)
    assert torch.equal(first.query_x, again.query_x) and not torch.equal(first.query_x,
                                                                         other.query_x)


@pytest.mark.realdata
def test_targets_are_centred_on_the_meta_train_users_only(data_dir: Path) -> None:
    data = ml.read()
    splits = ml.split_users(ml.eligible_users(data), 0)
    train_mean = data.ratings[torch.isin(data.ratings[:, 0], splits["train"]), 2].double().mean()
    test_mean = data.ratings[torch.isin(data.ratings[:, 0], splits["test"]), 2].double().mean()
    assert abs(train_mean - test_mean) > 1e-3  # the choice matters
    for split in ml.SPLITS:
        source = ml.tasks(split, split_seed=0)
        assert source.center == pytest.approx(train_mean.item(), abs=1e-12)
    task = ml.tasks("test", split_seed=0).all_users(0)[0].task(0)
    ratings = task.query_y + ml.tasks("test", split_seed=0).center
    assert torch.allclose(ratings, ratings.round(), atol=1e-5)  # back on the 1..5 scale


@pytest.mark.realdata
def test_a_ragged_batch_trains_the_rating_model(data_dir: Path) -> None:
    from metalab.algorithms import build_algorithm, task_spec
    from metalab.tasks import RaggedTaskBatch
    from metalab.train import meta_backward

    source = ml.tasks("train", split_seed=0)
    batch = source.sample(3, torch.Generator().manual_seed(0))
    assert isinstance(batch, RaggedTaskBatch)
    spec = task_spec(source)
    torch.manual_seed(0)
    backbone = build_backbone("embedding_mlp", spec.input_shape,
                              cardinalities=list(ml.CARDINALITIES), dim=4, hidden=[8])
    algo = build_algorithm("anil", backbone, spec, inner_steps=1, inner_lr=0.1)
    loss, _ = meta_backward(algo, batch)
    assert math.isfinite(loss)
    assert all(p.grad is not None for p in algo.backbone.parameters())


@pytest.mark.realdata
def test_movielens_is_only_read_never_written(data_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading and drawing tasks opens no file for writing, and nothing new appears in the
    project or the cache; no copy of the data lies in the project."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("METALAB_CACHE", str(cache))
    ml._parse.cache_clear()
    # runs/ is left out of the before/after comparison only: jobs running meanwhile (a study)
    # write their checkpoints there; the search for copies below includes it.
    before = _files(PROJECT, skip=("runs",)) | _files(cache)
    real_open, written = builtins.open, []

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            written.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    source = ml.tasks("train", split_seed=1)
    source.sample(8, torch.Generator().manual_seed(0))
    ml.status()
    monkeypatch.setattr(builtins, "open", real_open)
    assert written == []
    assert _files(PROJECT, skip=("runs",)) | _files(cache) == before
    assert not cache.exists() or not any(cache.rglob("*"))
    copies = [p for p in _files(PROJECT) if Path(p[0]).name in
              ("u.data", "u.item", "u.user", "ml-100k.zip")]
    assert copies == []


def _files(root: Path, skip: tuple[str, ...] = ()) -> set[tuple[str, int]]:
    """(path, mtime) of the files under ``root``, the virtual environment, git and the
    top-level folders ``skip`` excluded."""
    if not root.exists():
        return set()
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv", "__pycache__", ".ruff_cache",
                                                ".pytest_cache", ".hypothesis")
                   and not (folder == str(root) and d in skip)]
        for name in files:
            path = os.path.join(folder, name)
            try:
                found.add((path, os.stat(path).st_mtime_ns))
            except FileNotFoundError:  # a file another process removed meanwhile
                continue
    return found


# -- without the data ------------------------------------------------------------------------

def test_missing_data_says_how_to_obtain_it(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALAB_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError, match=f"ml-100k.zip.*MD5 {ml.MD5}"):
        ml.tasks("train")
    assert "not found" in ml.status()
    assert DATASETS["movielens100k"] is ml
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "ml-100k.zip").write_bytes(b"not the zip")
    with pytest.raises(DataNotFoundError, match="MD5"):
        ml.read()


def test_query_split_and_user_split_rules() -> None:
    support, query = ml.query_split(15, 10, torch.Generator().manual_seed(0))
    assert len(query) == 10 and len(support) == 5
    assert sorted(support.tolist() + query.tolist()) == list(range(15))
    with pytest.raises(ValueError, match="more than 10"):
        ml.query_split(10, 10, torch.Generator())
    with pytest.raises(ValueError, match="three shares"):
        ml.split_users(torch.arange(10), 0, (0.5, 0.5))


def test_embedding_backbone_sizes_and_flags() -> None:
    backbone = build_backbone("embedding_mlp", (5,), cardinalities=[4, 3], dim=2, hidden=[6])
    x = torch.tensor([[3, 2, 1, 0, 1], [0, 0, 0, 0, 0]])
    assert backbone(x).shape == (2, 6)
    flat = build_backbone("embedding_mlp", (5,), cardinalities=[4, 3], dim=2, hidden=[])
    out = flat(x)
    assert out.shape == (2, 6)
    # The flags' part is the mean embedding of the flags that are set (none: zeros).
    expected = (flat.flag_embedding.weight[:, 0] + flat.flag_embedding.weight[:, 2]) / 2
    assert torch.allclose(out[0, 4:], expected) and torch.equal(out[1, 4:], torch.zeros(2))
    with pytest.raises(ValueError, match="one per categorical column"):
        build_backbone("embedding_mlp", (1,), cardinalities=[4, 3])


# -- the baselines and metrics, by hand ---------------------------------------------------------

# Users 0 and 1 rate items 0..2; item 2 is rated once; item 3 never.
TRAIN = R.Ratings(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 2]),
                  torch.tensor([4, 2, 5, 3, 1]))


def test_global_and_item_means_by_hand() -> None:
    glob = R.GlobalMean().fit(TRAIN, 4)
    assert glob.predict(None, None, torch.tensor([0, 3])).tolist() == [3.0, 3.0]  # 15 / 5
    item = R.ItemMean().fit(TRAIN, 4)
    assert item.predict(None, None, torch.tensor([0, 1, 2, 3])).tolist() == [4.5, 2.5, 1, 3]


def test_item_bias_plus_user_offset_by_hand() -> None:
    model = R.ItemBiasUserOffset(item_reg=1.0, user_reg=2.0).fit(TRAIN, 4)
    # μ = 3; b_0 = (1 + 2) / (1 + 2) = 1; b_1 = (−1 + 0) / 3; b_2 = −2 / 2; b_3 = 0.
    assert model.item_bias.tolist() == pytest.approx([1.0, -1 / 3, -1.0, 0.0])
    # New user: rated item 0 a 5 and item 2 a 3 -> residuals 5−3−1 = 1 and 3−3+1 = 1;
    # offset = 2 / (2 + 2) = 0.5.
    predicted = model.predict(torch.tensor([0, 2]), torch.tensor([5.0, 3.0]),
                              torch.tensor([1, 3]))
    assert predicted.tolist() == pytest.approx([3 - 1 / 3 + 0.5, 3 + 0.5])


def test_matrix_factorization_fold_in_is_the_ridge_solution() -> None:
    model = R.MatrixFactorization(rank=2, reg=0.5, iterations=10, seed=0).fit(TRAIN, 4)
    items, values = torch.tensor([0, 1, 2]), torch.tensor([5.0, 1.0, 2.0])
    features = torch.cat([torch.ones(3, 1, dtype=torch.float64), model.item_factors[items]], 1)
    residual = values.double() - model.mu - model.item_bias[items]
    # The normal equations of  min ‖F w − r‖² + λ‖w‖²,  solved by hand with an inverse.
    expected = torch.inverse(features.T @ features + 0.5 * torch.eye(3,
                             dtype=torch.float64)) @ features.T @ residual
    assert torch.allclose(model.fold_in(items, values), expected)
    predicted = model.predict(items, values, torch.tensor([3]))
    # An unseen item has zero factors and bias: the prediction is μ + b_u.
    assert predicted.item() == pytest.approx(model.mu.item() + expected[0].item(), abs=1e-6)


def test_matrix_factorization_fits_a_low_rank_matrix() -> None:
    generator = torch.Generator().manual_seed(0)
    users, items = torch.randn(30, 2, generator=generator), torch.randn(20, 2, generator=generator)
    full = 3 + users @ items.T
    u, i = torch.meshgrid(torch.arange(30), torch.arange(20), indexing="ij")
    keep = torch.rand(30, 20, generator=generator) < 0.7
    train = R.Ratings(u[keep], i[keep], full[keep])
    model = R.MatrixFactorization(rank=2, reg=0.01, iterations=30).fit(train, 20)
    bias = R.ItemBiasUserOffset(0.0, 0.0).fit(train, 20)
    new_user = torch.randn(2, generator=generator)
    truth = 3 + items @ new_user
    known, unknown = torch.arange(10), torch.arange(10, 20)
    mf_error = R.rmse(model.predict(known, truth[known], unknown), truth[unknown])
    bias_error = R.rmse(bias.predict(known, truth[known], unknown), truth[unknown])
    assert mf_error < 0.1 < bias_error


def test_metrics_by_hand() -> None:
    predicted, actual = torch.tensor([3.0, 4.0, 2.0]), torch.tensor([3.0, 2.0, 4.0])
    assert R.mae(predicted, actual) == pytest.approx(4 / 3)
    assert R.rmse(predicted, actual) == pytest.approx(math.sqrt(8 / 3))
    # Ranked by prediction: items 1, 0, 2 with gains 3, 7, 15; ideal order 15, 7, 3.
    dcg = 3 + 7 / math.log2(3) + 15 / 2
    ideal = 15 + 7 / math.log2(3) + 3 / 2
    assert R.ndcg_at(predicted, actual, 3) == pytest.approx(dcg / ideal)
    assert R.ndcg_at(actual, actual, 3) == 1.0


def test_study_score_clips_and_averages() -> None:
    from metalab.tasks import TaskBatch

    x = torch.zeros(1, 4, 1, dtype=torch.long)
    tasks = [TaskBatch(x, torch.zeros(1, 4, 1), x[:, :2], torch.tensor([[[1.0], [-1.0]]]))]
    perfect = score(tasks, 3.0, lambda sx, sy, qx: torch.tensor([4.0, 2.0]))
    assert perfect["mae"] == 0 and perfect["ndcg3"] == 1.0
    clipped = score(tasks, 3.0, lambda sx, sy, qx: torch.tensor([9.0, 2.0]))
    assert clipped["mae"] == pytest.approx(0.5)  # 9 is clipped to 5
    # actual 4 and 2: 3.6 and 2.4 are 0.4 off each, rounded to 4 and 2 they are exact;
    # 4.7 rounds to 5 (1 off where it was 0.7)
    off = score(tasks, 3.0, lambda sx, sy, qx: torch.tensor([3.6, 2.4]))
    assert off["mae"] == pytest.approx(0.4) and off["mae_star"] == 0
    assert score(tasks, 3.0, lambda sx, sy, qx: torch.tensor([4.7, 2.0]))["mae_star"] == 0.5


def test_study_bar_and_records_from_results() -> None:
    from metalab.studies.movielens import bar
    from metalab.studies.records import movielens_records

    def result(mae: float, **extra: object) -> dict:
        return {"mae": mae, "mae_star": mae - 0.03, "rmse": mae + 0.2, "ndcg3": 0.7, **extra}

    results = {
        "matrix-factorization": {0: result(0.80, seconds=3.0, settings={"reg": 10.0}),
                                 1: result(0.78, seconds=3.0, settings={"reg": 3.0})},
        "anil": {0: result(0.76, train_seconds=60.0, steps=1000, config={"algorithm": "anil"}),
                 1: result(0.79, train_seconds=62.0, steps=1000, config={"algorithm": "anil"})},
    }
    assert bar(results).startswith("bar NOT MET") and "below it on 1 of 2 seeds" in bar(results)
    results["anil"][1]["mae"] = 0.77
    assert bar(results).startswith("bar MET on MAE:")
    # rounded to stars, the baseline wins seed 1: the bar is asked of each metric alone
    results["matrix-factorization"][1]["mae_star"] = 0.70
    assert bar(results, "mae_star").startswith("bar NOT MET on MAE to stars")
    records = dict(movielens_records(results, "test machine", bar_note="a note"))
    assert set(records) == {f"movielens/{m}-{s}.json" for m in results
                            for s in ("mae", "mae-stars", "rmse", "ndcg3")} | {
        "movielens-seeds/anil.json", "movielens-seeds/matrix-factorization.json"}
    mae = records["movielens/anil-mae.json"]
    assert mae["results"][0]["mean"] == pytest.approx(0.765) and mae["note"] == "a note"
    stars = records["movielens/anil-mae-stars.json"]["results"][0]
    assert stars["setting"] == "mae-stars" and stars["mean"] == pytest.approx(0.745)
    assert mae["training"] == {"minutes": 1.0, "machine": "test machine", "steps": 1000}
    assert "seeds 0, 1" in mae["protocol"]["variant"]
    seeds = records["movielens-seeds/matrix-factorization.json"]["results"]
    assert [(r["setting"], r["mean"]) for r in seeds] == [("seed0", 0.80), ("seed1", 0.78)]


def test_blend_mixes_the_meta_learner_and_the_baseline(data_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from metalab.studies import movielens as study

    methods = ["matrix-factorization", "anil", "anil+matrix-factorization"]
    with pytest.raises(FileNotFoundError, match="needs anil's run"):
        study.run([0], methods[2:], tmp_path, str(data_dir), steps=5)
    results = study.run([0], methods[:2], tmp_path, str(data_dir), steps=5)
    # weight 1 is the meta-learner alone, weight 0 the baseline alone
    for weight, alone in ((1.0, "anil"), (0.0, "matrix-factorization")):
        monkeypatch.setattr(study, "BLEND_WEIGHTS", (weight,))
        blend = study.run([0], methods[2:], tmp_path, str(data_dir), steps=5, fresh=True)
        assert blend[methods[2]][0]["mae"] == pytest.approx(results[alone][0]["mae"], abs=1e-6)
        assert blend[methods[2]][0]["settings"] == {"weight": weight}
    # an even mix is neither, and the weight is the one with the lowest validation MAE
    monkeypatch.setattr(study, "BLEND_WEIGHTS", (0.5,))
    half = study.run([0], methods[2:], tmp_path, str(data_dir), steps=5, fresh=True)
    assert half[methods[2]][0]["mae"] not in (results["anil"][0]["mae"],
                                              results["matrix-factorization"][0]["mae"])
    val = {w: r for w, r in ((0.5, half[methods[2]][0]["val_mae"]),
                             (0.0, results["matrix-factorization"][0]["val_mae"]))}
    monkeypatch.setattr(study, "BLEND_WEIGHTS", (0.0, 0.5))
    both = study.run([0], methods[2:], tmp_path, str(data_dir), steps=5, fresh=True)
    assert both[methods[2]][0]["settings"]["weight"] == min(val, key=val.get)
    assert "blend anil+matrix-factorization" in study.bar({**results, **both})
