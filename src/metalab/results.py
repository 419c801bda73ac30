"""Results as data: one small JSON record per reported number set, and ``docs/results.md``
rendered from the records.

``python -m metalab.results`` writes ``docs/results.md`` from ``docs/records/``;
``python -m metalab.results --check`` exits with status 1 when the committed page differs from
what the records give (the test suite runs the same comparison, so CI fails on a difference);
``python -m metalab.results --record RUN_DIR --benchmark omniglot --machine "2-core CPU"``
turns a run folder of ``metalab train`` into records (:func:`records_from_run`).

Record schema
-------------
A record is a JSON object in ``docs/records/<benchmark>/<name>.json``. Unknown fields are
errors. Every record has

``kind``
    ``"run"`` (measured with metalab), ``"paper"`` (a published figure) or ``"measurement"``
    (figures of a benchmark script, for the speed table).
``benchmark``
    The table it belongs to: a key of :data:`BENCHMARKS` for runs and papers, ``"speed"``
    for measurements.
``note`` (optional)
    A caveat the table needs, printed as a numbered note under it.

Runs and papers (one table row per algorithm and protocol, one column per setting) also have

``algorithm``
    A registered algorithm name (``"protonet"``).
``protocol``
    ``{"train_split": ..., "batch_norm": ..., "variant": ...}``: ``train_split`` is what the
    model was meta-trained on, ``"train"`` or ``"trainval"`` (optional for papers);
    ``batch_norm`` how it normalised at test, one of :data:`BATCH_NORM`; ``variant``
    (optional) anything else the row depends on, in a few words. Records with equal
    algorithm, kind and protocol share a row.
``metric``
    ``"accuracy"`` (%) or ``"mse"``; it must be the metric of each result's setting.
``decimals`` (optional)
    Digits after the point, as the number was reported (default 2 for accuracy, 3 for MSE).
``results``
    A list of ``{"setting", "mean", "ci95", "episodes"}``: ``setting`` a key of the
    benchmark's settings (``"5w1s"``); ``mean`` a number, or null where the score is not
    finite (the model diverged); ``ci95`` the half-width of the 95% confidence interval, or
    null where not reported; ``episodes`` the number of test episodes (optional for papers).

Runs also have ``config`` (``{"name", "overrides", "values"}``: the built-in config, every
``--set`` override as ``key=value``, and all values of the effective config), ``training``
(``{"minutes", "machine", "steps"}``: recorded minutes of training steps or null where they
were not recorded per run, the machine, optionally the steps trained), ``code_version`` (the
git commit that produced or recorded the numbers, ``-dirty`` if the tree had changes) and
``reproduce`` (the commands, one per string). Papers have ``citation`` instead.

Measurements have ``title``, ``summary`` (the figures, in a sentence), ``results_file`` (the
JSON the script wrote), ``machine``, ``code_version`` and ``reproduce``.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import math
import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

__all__ = ["BATCH_NORM", "BENCHMARKS", "Benchmark", "RecordError", "Setting", "check",
           "load_records", "main", "records_from_run", "render", "validate", "write"]

RECORDS_DIR = Path("docs/records")
RESULTS_PAGE = Path("docs/results.md")


@dataclass(frozen=True)
class Setting:
    """A column: its header and the metric its cells hold."""

    label: str
    metric: str


@dataclass(frozen=True)
class Benchmark:
    """A table: its heading, what its numbers are, its columns in order, and the shell lines
    that come before its reproduce commands."""

    title: str
    description: str
    settings: dict[str, Setting]
    setup: tuple[str, ...] = ()


def _ways_shots(*pairs: tuple[int, int]) -> dict[str, Setting]:
    return {f"{n}w{k}s": Setting(f"{n}-way {k}-shot", "accuracy") for n, k in pairs}


def _sinusoid_steps(*shots: int) -> dict[str, Setting]:
    return {f"k{k}-{s}step{'s' if s > 1 else ''}":
            Setting(f"K={k}, {s} step{'s' if s > 1 else ''}", "mse")
            for k in shots for s in (1, 5, 10)}


_ETT_SETTINGS = {f"{share}pct-{metric}": Setting(f"{share}% {metric.upper()}", metric)
                 for share in (5, 10) for metric in ("mse", "mae")}
_ETT_SETUP = ("export METALAB_DATA=../shared/data   # the folder holding ett-small/",)
_MOVIELENS_SETUP = ("export METALAB_DATA=../shared/data   # a folder holding movielens-100k/ "
                    "or ml-100k.zip",)

BENCHMARKS: dict[str, Benchmark] = {
    "omniglot": Benchmark(
        "Omniglot",
        "Vinyals split: meta-training on the 1028 training characters (or the 1200 of "
        "train+val) × 4 rotations, testing on 600 fixed episodes (seed 1, 15 queries per "
        "class) of the 423 test characters × 4 rotations (1692 classes); images resized from "
        "105×105 to 28×28 (Lanczos) and inverted. Accuracy in %, mean ± 95% CI over the "
        "episodes (1.96 · s / √n), of the run's `best.pt` (best on fixed validation episodes, "
        "or the final weights where nothing was validated). One training serves every setting "
        "of its row unless a note says otherwise.",
        _ways_shots((5, 1), (5, 5), (20, 1), (20, 5)),
        ("export METALAB_DATA=../shared/data   # the folder holding omniglot/",)),
    "sinusoid": Benchmark(
        "Sinusoid regression",
        "The MAML sinusoids (amplitude U[0.1, 5], phase U[0, π], x U[−5, 5]) and a 2×40 ReLU "
        "MLP. Each row is one checkpoint (`best.pt`, lowest validation MSE after one step) "
        "trained with the K its protocol says, then adapted to 600 fixed test tasks (seed 1, "
        "100 query points each) with K = 5 or 10 support points and 1, 5 or 10 SGD steps of "
        "its inner step size (`benchmarks/sinusoid_steps.py`). Mean squared error, mean ± 95% "
        "CI over the tasks; \"diverges\": the error of some task is not finite.",
        _sinusoid_steps(5, 10)),
    "quick-glyphs": Benchmark(
        "The quick suite",
        "`metalab compare` on the quick suite (the README's first command): every algorithm "
        "trains briefly from its `quick/` config and is scored on the same 600 fixed test "
        "episodes. It demonstrates the comparison, not what the methods reach: the sequence "
        "learners need far more steps. Glyphs part: the embedded glyph data set (no download), "
        "5-way 1-shot, a 32-channel Conv-4, 200 steps (300 for the fine-tune baseline); "
        "accuracy in %, mean ± 95% CI. Latencies, parameters and memory of these runs: "
        "[comparison/quick-cpu/table.md](comparison/quick-cpu/table.md).",
        {"5w1s": Setting("glyphs 5-way 1-shot", "accuracy")}),
    "movielens": Benchmark(
        "Cold-start recommendation: MovieLens 100K, users as tasks",
        "MeLU's protocol (Lee et al. KDD 2019) on MovieLens 100K: the 582 users with 13-100 "
        "ratings split 70/10/20 into meta-train / validation / meta-test users by each seed; "
        "for each test user 10 random ratings are the query, the rest (3 to 90) the support "
        "set. Every method is fitted or trained on the meta-train users, chooses its "
        "regulariser or checkpoint on the validation users and predicts the same query "
        "ratings from the same support sets, clipped to 1-5; all in one run of "
        "`python -m metalab.studies.movielens`. Mean ± 95% CI (1.96 · s / √n) over the "
        "seeds of the user split; *training* is per seed. Meta-learners: one rating model "
        "(embeddings of item, release year, age, gender, occupation and genres into a 64-unit "
        "layer, then a linear head), targets centred on the meta-train users' mean rating. "
        "ANIL adapts the head by 5 gradient steps; *ANIL, ridge head in closed form* solves "
        "it on the user's support ratings, shrunk toward the meta-learned head with "
        "meta-learned per-feature penalties (R2-D2's solver with ALPaCA's prior). The "
        "blend (ANIL + matrix factorisation) is the weighted mean of the two's "
        "predictions, its weight (0.25, 0.5 or 0.75) chosen on the validation users; its "
        "training is ANIL's. *MAE to stars*: the same predictions rounded to the nearest "
        "star, not MeLU's protocol: ratings are whole stars, and the absolute error is least "
        "at the median of a rating's distribution, a whole star, where every method here fits "
        "the mean.",
        {"mae": Setting("MAE", "mae"), "mae-stars": Setting("MAE to stars", "mae"),
         "rmse": Setting("RMSE", "rmse"),
         "ndcg3": Setting("nDCG@3", "ndcg")},
        _MOVIELENS_SETUP),
    "movielens-seeds": Benchmark(
        "Cold-start recommendation: MAE on each seed",
        "The MovieLens 100K runs above, seed by seed (the same user split for every method "
        "in a column): the bar asks the best meta-learner to beat the strongest baseline on "
        "every seed.",
        {f"seed{k}": Setting(f"seed {k}", "mae") for k in range(5)},
        _MOVIELENS_SETUP),
    "ett-h1-h2": Benchmark(
        "A new transformer: ETTh1 → ETTh2",
        "Informer's ETT split (12/4/4 months), lookback 336, horizons 96/192/336/720; "
        "meta-trained (or pretrained) on ETTh1, adapted to ETTh2 with the first 5% or 10% of "
        "its training windows (GPT4TS's rule); normalised per channel with ETTh2's 12 "
        "training months (as the published code does), then per window by its last value "
        "(NLinear); MSE and MAE on the normalised test windows averaged over the horizons "
        "(5%: 96-336 only: 751 rows hold no 336 + 720-hour window). Ridge λ and adaptation "
        "steps chosen on ETTh2's validation windows. The learned prior is the ridge shrunk "
        "toward ETTh1's solution with a per-lag precision meta-learned on ETTh1's window tasks "
        "(300 Adam steps of 16 tasks through the closed-form fit), its scale chosen as λ; all "
        "in one run of "
        "`python -m metalab.studies.ett`. Mean ± 95% CI over seeds of the meta-training "
        "(baselines: deterministic); *training* sums the four horizons (baselines: the time "
        "to fit all four of them and the source's ridge).",
        _ETT_SETTINGS, _ETT_SETUP),
    "ett-h2-h1": Benchmark(
        "A new transformer: ETTh2 → ETTh1",
        "As above in the reverse direction: meta-trained on ETTh2, adapted to ETTh1.",
        _ETT_SETTINGS, _ETT_SETUP),
    "banking77-episodic": Benchmark(
        "Few-shot intents: BANKING77 5-way episodes on held-out intents",
        "Frozen all-MiniLM-L6-v2 sentence embeddings (384-d); each algorithm meta-learns a "
        "one-hidden-layer MLP head (256 units) on the 25 training intents of a ProtAugment "
        "fold (Dopierre et al. 2021) and is scored on 600 fixed episodes (seed 1, 5 queries "
        "per class) of the fold's 27 test intents; the five folds averaged (3,000 episodes; "
        "CI of the mean of the fold means). Nearest class mean: cosine to the class means of "
        "the frozen embeddings, on the same episodes. `metalab compare --suite "
        "banking77-5w1s` (and `-5w5s`). Rows marked \"MiniLM's last 2 layers "
        "meta-trained\" fine-tune the encoder's top instead of a head: ProtoNet (cosine) "
        "trains the last two of its six layers over token states computed once below them, "
        "10-way episodes, Adam at 2e-5, 400 steps, best of 4 validations (`metalab compare "
        "--suite banking77-5w1s-top2`, `-5w5s-top2`); the train+val rows train it on the "
        "fold's 25 training and 25 validation intents with the same settings and score its "
        "final weights (`--suite banking77-5w1s-top2-trainval`).",
        _ways_shots((5, 1), (5, 5)),
        ("export METALAB_DATA=../shared/data   # the folder holding banking77/",)),
    "banking77-77w": Benchmark(
        "Few-shot intents: BANKING77, all 77 intents with K examples each",
        "K training sentences of every intent (10 seeded draws), scored on the whole test set "
        "(3,080 sentences); mean ± 95% CI over the draws. Meta-learned heads are trained on "
        "another data set, CLINC150 without its banking and credit-card domains, in 77-way "
        "10-shot episodes, then adapted to the K-shot support; the baselines fit the frozen "
        "embeddings directly (logistic regression as MTEB does, nearest class mean). The "
        "fine-tuned encoder top trains MiniLM's last two layers and a cosine head on each "
        "K-shot support set (3 epochs, mini-batches of 32, Adam at 5e-5 for the layers and "
        "1e-3 for the head), nothing meta-trained (`metalab compare --suite "
        "banking77-77w-top2`, same draws); the means of 3 such fits differing in their "
        "batch order average their class probabilities, of the last two layers or of all six "
        "(`--suite banking77-77w-top2-ensemble`, `-top6-ensemble`). Published rows use other, "
        "larger encoders.",
        {f"k{k}": Setting(f"K={k}", "accuracy") for k in (5, 8, 10)},
        ("export METALAB_DATA=../shared/data   # the folder holding banking77/, clinc150/",)),
    "clinc150-oos": Benchmark(
        "Few-shot intents with rejection: CLINC150, 150-way 10-shot and out-of-scope",
        "10 training sentences of each of the 150 intents (5 seeded draws); a prediction "
        "whose score is below a threshold is \"out of scope\". The threshold maximises the "
        "accuracy, out of scope counted as one more class, over the validation sentences "
        "(3,000 + 100 out of scope), with the same support set; scored on the test set "
        "(4,500 + 1,000 out of scope) with Larson et al. (2019)'s metrics: in-scope accuracy "
        "(a rejected in-scope sentence is an error) and out-of-scope recall. Heads are "
        "meta-trained on BANKING77 (20-way episodes); only algorithms that take any number "
        "of classes apply. Frozen baselines: the nearest class mean, logistic regression, "
        "and logistic regression with the 100 out-of-scope training sentences as a 151st "
        "class (Larson et al.'s \"oos-train\"), each logistic regression's L2 weight chosen "
        "per draw by the same validation accuracy as the threshold. The fine-tuned encoder "
        "top trains MiniLM's last two layers and a cosine head on each support set as in "
        "the BANKING77 77-way table (`metalab compare --suite clinc150-oos-top2`, same "
        "draws). Published rows were trained on the full data (100 per intent).",
        {"in-scope": Setting("in-scope accuracy", "accuracy"),
         "oos-recall": Setting("out-of-scope recall", "recall")},
        ("export METALAB_DATA=../shared/data   # the folder holding clinc150/, banking77/",)),
    "quick-sinusoid": Benchmark(
        "The quick suite: sinusoid regression",
        "The same `metalab compare` run, regression part: 5-shot sinusoids, a 2×40 MLP, 1500 "
        "steps; mean squared error on 600 fixed test tasks, mean ± 95% CI.",
        {"k5": Setting("sinusoid 5-shot", "mse")}),
}

SPEED = "speed"  # the benchmark of measurement records

# How a network normalised at test time -> how the table says it.
BATCH_NORM: dict[str, str] = {
    "running": "running statistics",
    "support": "support-set statistics",
    "transductive": "batch statistics (transductive)",
    "none": "no BatchNorm",
    "not stated": "not stated",
}
TRAIN_SPLITS: dict[str, str] = {"trainval": "train+val splits", "train": "train split"}
DEFAULT_DECIMALS: dict[str, int] = {"accuracy": 2, "mse": 3, "mae": 3, "rmse": 3, "ndcg": 3,
                                     "recall": 2}
# Rows that are not registered metalab algorithms: the studies' own methods and baselines, and
# published models.
OTHER_DISPLAY_NAMES: dict[str, str] = {
    "global-mean": "Global mean", "item-mean": "Item mean",
    "item-bias-user-offset": "Item bias + user offset",
    "matrix-factorization": "Matrix factorisation (ALS, fold-in)",
    "anil+matrix-factorization": "ANIL + matrix factorisation (weighted mean)",
    "anil-ridge": "ANIL, ridge head in closed form",
    "zero-shot": "Zero-shot (source ridge)", "ridge-scratch": "Ridge from scratch",
    "ridge-shrunk": "Ridge shrunk toward source", "target-only-sgd": "Target-only SGD",
    "learned-prior": "Learned prior (ridge shrunk with a meta-learned precision)",
    "time-llm": "Time-LLM", "gpt4ts": "GPT4TS", "patchtst": "PatchTST",
    "dlinear": "DLinear", "nearest-class-mean": "Nearest class mean (frozen)",
    "logistic-regression": "Logistic regression (frozen)",
    "logistic-regression-oos-class": "Logistic regression + out-of-scope class (frozen)",
    "finetuned-encoder-top": "Fine-tuned encoder top (no meta-training)",
    "finetuned-encoder-tops": "Fine-tuned encoder tops, mean of 3 (no meta-training)",
    "finetuned-encoders": "Fine-tuned whole encoders, mean of 3 (no meta-training)",
    "finetuned-encoder-top-oos-class":
        "Fine-tuned encoder top + out-of-scope class (no meta-training)",
    "use-convert": "USE+ConveRT (frozen)", "cpft": "CPFT",
    "bert-threshold": "BERT + threshold",
}
OTHER_METHODS = tuple(OTHER_DISPLAY_NAMES)
DISPLAY_NAMES: dict[str, str] = {
    "protonet": "ProtoNet", "matchingnet": "MatchingNet", "relationnet": "RelationNet",
    "finetune": "Fine-tune baseline", "pretrained": "Pretrained baseline", "maml": "MAML",
    "fomaml": "FOMAML", "anil": "ANIL", "metasgd": "Meta-SGD", "reptile": "Reptile",
    "snail": "SNAIL", "mann": "MANN", "recurrent": "Recurrent (LSTM)", "cnp": "CNP",
    **OTHER_DISPLAY_NAMES,
}

HEADER = """\
# Results

<!-- Generated by `python -m metalab.results` from docs/records/; edit the records, not this
file (`python -m metalab.results --check` and tests/test_results.py compare them). -->

Each row is one algorithm under one protocol, each column a test setting, each cell the mean ±
95% confidence interval. *Protocol* says what the model was meta-trained on (the train split,
or train+val) and anything else the row depends on; *BatchNorm at test* says how the network
normalised when tested: with the running statistics of training or with each task's
support-set statistics (`batch_norm: support`, chosen at training), both classifying each
query on its own, or with batch statistics (`metalab evaluate --transductive-bn`, and always
in the MAML family), which normalise a task's queries together and so are transductive.
Rows marked *paper* are the published numbers (`../shared/REFERENCES.md`); *training* is the
recorded time of the training steps and the machine (2-core CPU: an AMD EPYC with 2 logical
CPUs, torch 2.13.0+cpu)."""

FOOTER = """\
Every number above is a record in [records/](records/) with its effective config, the commit
that produced it and the commands; where the code changed since (the per-task training
streams of 842be60, for one), a rerun gives a statistically equivalent, not an identical,
result. `python -m metalab.results --record RUN_DIR --benchmark NAME --machine MACHINE` turns
a finished `metalab train` run into records. How these results came about, superseded runs
included: [CHANGELOG.md](../CHANGELOG.md)."""


class RecordError(ValueError):
    """A record that does not follow the schema; the message names the file and the field."""


# -- validation --------------------------------------------------------------------------------

_COMMON = {"kind": str, "benchmark": str, "note": str}
_SCORED = {"algorithm": str, "protocol": dict, "metric": str, "decimals": int, "results": list}
FIELDS: dict[str, dict[str, type]] = {
    "run": {**_COMMON, **_SCORED, "config": dict, "training": dict, "code_version": str,
            "reproduce": list},
    "paper": {**_COMMON, **_SCORED, "citation": str},
    "measurement": {**_COMMON, "title": str, "summary": str, "results_file": str,
                    "machine": str, "code_version": str, "reproduce": list},
}
OPTIONAL = {"note", "decimals"}
_NUMBER = (int, float)


class _Checker:
    """Checks one record's fields, raising :class:`RecordError` that names file and field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, problem: str) -> NoReturn:
        raise RecordError(f"{self.source}: field {field!r}: {problem}")

    def fields(self, obj: dict[str, Any], spec: dict[str, Any], optional: set[str],
               prefix: str = "") -> None:
        """Every key of ``obj`` known to ``spec`` and of its type; required keys present."""
        for key in obj:
            if key not in spec:
                self.fail(prefix + key, f"unknown field; valid fields: {', '.join(spec)}")
        for key, kind in spec.items():
            if key not in obj:
                if key not in optional:
                    self.fail(prefix + key, "missing")
                continue
            value = obj[key]
            if value is None and key in optional:
                continue
            if kind is float:
                ok = isinstance(value, _NUMBER) and not isinstance(value, bool)
            else:
                ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if not ok:
                self.fail(prefix + key, f"must be {_TYPE_NAMES[kind]}, got {value!r}")
            if kind is str and not value.strip():
                self.fail(prefix + key, "must not be empty")

    def one_of(self, field: str, value: Any, allowed: Sequence[str]) -> None:
        if value not in allowed:
            self.fail(field, f"{value!r} is not one of {', '.join(map(repr, allowed))}")

    def strings(self, field: str, values: list[Any]) -> None:
        if not values or not all(isinstance(v, str) and v.strip() for v in values):
            self.fail(field, "must be a non-empty list of non-empty strings")


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object",
               list: "a list"}


def validate(record: Any, source: str) -> dict[str, Any]:
    """``record`` if it follows the schema of the module docstring, else :class:`RecordError`
    naming ``source`` and the field."""
    check = _Checker(source)
    if not isinstance(record, dict):
        raise RecordError(f"{source}: a record is a JSON object, got {type(record).__name__}")
    check.one_of("kind", record.get("kind"), list(FIELDS))
    kind = record["kind"]
    check.fields(record, FIELDS[kind], OPTIONAL)
    if kind == "measurement":
        check.one_of("benchmark", record["benchmark"], [SPEED])
        check.strings("reproduce", record["reproduce"])
        _check_commit(check, record["code_version"])
        return record
    check.one_of("benchmark", record["benchmark"], list(BENCHMARKS))
    check.one_of("algorithm", record["algorithm"], [*sorted(_algorithms()), *OTHER_METHODS])
    check.one_of("metric", record["metric"], list(DEFAULT_DECIMALS))
    if record.get("decimals") is not None and not 0 <= record["decimals"] <= 6:
        check.fail("decimals", f"must be 0 to 6, got {record['decimals']}")
    protocol = record["protocol"]
    check.fields(protocol, {"train_split": str, "batch_norm": str, "variant": str},
                 {"variant"} | ({"train_split"} if kind == "paper" else set()), "protocol.")
    if protocol.get("train_split") is not None:
        check.one_of("protocol.train_split", protocol["train_split"], list(TRAIN_SPLITS))
    check.one_of("protocol.batch_norm", protocol["batch_norm"], list(BATCH_NORM))
    _check_results(check, record, kind)
    if kind == "run":
        _check_run(check, record)
    return record


def _check_results(check: _Checker, record: dict[str, Any], kind: str) -> None:
    settings = BENCHMARKS[record["benchmark"]].settings
    if not record["results"]:
        check.fail("results", "must hold at least one result")
    seen = set()
    for i, result in enumerate(record["results"]):
        where = f"results[{i}]."
        if not isinstance(result, dict):
            check.fail(f"results[{i}]", f"must be an object, got {result!r}")
        check.fields(result, {"setting": str, "mean": float, "ci95": float, "episodes": int},
                     {"mean", "ci95"} | ({"episodes"} if kind == "paper" else set()), where)
        for key in ("mean", "ci95"):
            if key not in result:
                check.fail(where + key, "missing (null where there is no finite value)")
        check.one_of(where + "setting", result["setting"], list(settings))
        if settings[result["setting"]].metric != record["metric"]:
            check.fail(where + "setting", f"{result['setting']!r} holds "
                       f"{settings[result['setting']].metric}, the record {record['metric']}")
        if result["setting"] in seen:
            check.fail(where + "setting", f"{result['setting']!r} appears twice")
        seen.add(result["setting"])
        if result["mean"] is None and result["ci95"] is not None:
            check.fail(where + "ci95", "must be null where the mean is (not finite)")
        if result["ci95"] is not None and result["ci95"] < 0:
            check.fail(where + "ci95", f"must not be negative, got {result['ci95']}")


def _check_run(check: _Checker, record: dict[str, Any]) -> None:
    config = record["config"]
    check.fields(config, {"name": str, "overrides": list, "values": dict}, set(), "config.")
    if not all(isinstance(o, str) and "=" in o for o in config["overrides"]):
        check.fail("config.overrides", f"must be a list of key=value strings, got "
                   f"{config['overrides']!r}")
    # a row is its config's algorithm, or a variant of it named by its built-in config
    # (movielens/anil-ridge: anil with the head solved in closed form)
    if record["algorithm"] not in (config["values"].get("algorithm"),
                                   config["name"].rsplit("/", 1)[-1]):
        check.fail("config.values.algorithm", f"is {config['values'].get('algorithm')!r}, "
                   f"the record's algorithm {record['algorithm']!r} (nor does the config "
                   f"{config['name']!r} name it)")
    check.fields(record["training"], {"minutes": float, "machine": str, "steps": int},
                 {"minutes", "steps"}, "training.")
    if "minutes" not in record["training"]:
        check.fail("training.minutes", "missing (null where it was not recorded)")
    check.strings("reproduce", record["reproduce"])
    _check_commit(check, record["code_version"])


def _check_commit(check: _Checker, version: str) -> None:
    if not re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", version):
        check.fail("code_version", f"must be a git commit (7 to 40 hex digits, optionally "
                   f"-dirty), got {version!r}")


def _algorithms() -> dict[str, Any]:
    from metalab.algorithms import ALGORITHMS

    return ALGORITHMS


def _options(algorithm: str) -> dict[str, inspect.Parameter]:
    from metalab.algorithms.base import option_parameters

    return option_parameters(_algorithms()[algorithm])


def load_records(directory: Path = RECORDS_DIR) -> list[dict[str, Any]]:
    """Every ``*.json`` record under ``directory``, validated, in path order; each gets its
    file as ``_path``, for messages."""
    paths = sorted(directory.rglob("*.json"))
    if not paths:
        raise FileNotFoundError(f"no records (*.json) under {directory}.")
    records = []
    for path in paths:
        source = str(path)
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise RecordError(f"{source}: not valid JSON: {error}") from None
        validate(record, source)
        record["_path"] = source
        records.append(record)
    return records


# -- rendering ---------------------------------------------------------------------------------

def render(records: list[dict[str, Any]]) -> str:
    """The whole of docs/results.md for ``records`` (validated): the header, one table per
    benchmark with its notes and reproduce commands, the speed table, the footer."""
    sections = [HEADER]
    for key, benchmark in BENCHMARKS.items():
        chosen = [r for r in records if r["kind"] != "measurement" and r["benchmark"] == key]
        if chosen:
            sections.append(_benchmark_section(benchmark, chosen))
    measurements = [r for r in records if r["kind"] == "measurement"]
    if measurements:
        sections.append(_speed_section(measurements))
    sections.append(FOOTER)
    return "\n\n".join(sections) + "\n"


def _row_key(record: dict[str, Any]) -> tuple[str, ...]:
    """What puts records in one row: algorithm, kind, train split, BatchNorm mode, variant
    and citation."""
    protocol = record["protocol"]
    return (record["algorithm"], record["kind"], protocol.get("train_split") or "",
            protocol["batch_norm"], protocol.get("variant") or "", record.get("citation", ""))


def _row_order(key: tuple[str, ...]) -> tuple[Any, ...]:
    """Algorithms in :data:`DISPLAY_NAMES` order (others after, by name); a run's rows
    before the papers'; the built-in config (no variant) first; then train split, variant
    (numbers compared as numbers) and BatchNorm mode, so that one training's rows are
    adjacent."""
    algorithm, kind, split, batch_norm, variant, citation = key
    known = list(DISPLAY_NAMES)
    rank = known.index(algorithm) if algorithm in known else len(known)
    split_rank = list(TRAIN_SPLITS).index(split) if split else len(TRAIN_SPLITS)
    variant_key = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", variant)]
    return (rank, algorithm, kind == "paper", bool(variant), split_rank, variant_key,
            list(BATCH_NORM).index(batch_norm), citation)


def _benchmark_section(benchmark: Benchmark, records: list[dict[str, Any]]) -> str:
    """A benchmark's heading, description, table (columns: the settings any record has, in
    the benchmark's order; the BatchNorm column unless no row has BatchNorm), notes and
    reproduce commands."""
    rows: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for record in records:
        rows.setdefault(_row_key(record), []).append(record)
    keys = sorted(rows, key=_row_order)
    used = {result["setting"] for r in records for result in r["results"]}
    settings = [s for s in benchmark.settings if s in used]
    with_batch_norm = any(key[3] != "none" for key in keys)
    notes: list[str] = []
    header = ["algorithm", "protocol", *(["BatchNorm at test"] if with_batch_norm else []),
              *(benchmark.settings[s].label for s in settings), "training"]
    lines = [_table_line(header), _table_line(["---"] * len(header))]
    for key in keys:
        lines.append(_table_line(_row(key, rows[key], settings, with_batch_norm, notes)))
    parts = [f"## {benchmark.title}", _wrap(benchmark.description), "\n".join(lines)]
    if notes:
        parts.append(_notes(notes))
    parts.append("### How to reproduce\n\n" + _commands(benchmark.setup, keys, rows))
    return "\n\n".join(parts)


def _row(key: tuple[str, ...], records: list[dict[str, Any]], settings: list[str],
         with_batch_norm: bool, notes: list[str]) -> list[str]:
    """The cells of one table row; the notes of its records are added to ``notes`` and
    referred to by number after the algorithm's name."""
    algorithm, kind, split, batch_norm, variant, citation = key
    cells: dict[str, str] = {}
    for record in records:
        for result in record["results"]:
            if result["setting"] in cells:
                raise RecordError(
                    f"{record['_path']}: results: {result['setting']!r} of this row "
                    f"({algorithm}, {kind}, {split or '-'}, {batch_norm}, {variant or '-'}) "
                    f"is given by another record too; one of them is superseded (move it to "
                    f"CHANGELOG.md) or needs its own protocol variant")
            cells[result["setting"]] = _score(result, record)
    name = DISPLAY_NAMES.get(algorithm, algorithm)
    if kind == "paper":
        name += f" (paper: {citation})"
    for record in records:
        note = record.get("note")
        if note:
            if note not in notes:
                notes.append(note)
            name += f" [{notes.index(note) + 1}]"
    protocol = "; ".join(p for p in (TRAIN_SPLITS.get(split, "as published"), variant) if p)
    return [name, protocol, *([BATCH_NORM[batch_norm]] if with_batch_norm else []),
            *(cells.get(s, "") for s in settings), _training(records)]


def _score(result: dict[str, Any], record: dict[str, Any]) -> str:
    """``mean ± ci95`` with the record's digits; "diverges" where the mean is not finite."""
    if result["mean"] is None:
        return "diverges"
    digits = record.get("decimals")
    digits = DEFAULT_DECIMALS[record["metric"]] if digits is None else digits
    text = f"{result['mean']:.{digits}f}"
    return text if result["ci95"] is None else f"{text} ± {result['ci95']:.{digits}f}"


def _training(records: list[dict[str, Any]]) -> str:
    """Minutes and machine of the row's runs (per setting where the row joins several)."""
    runs = [r for r in records if r["kind"] == "run"]
    parts = []
    for record in runs:
        training = record["training"]
        minutes = training["minutes"]
        time = ("not recorded" if minutes is None else f"{round(minutes * 60)} s" if minutes < 1
                else f"{minutes} min")
        text = f"{time}, {training['machine']}"
        if len({json.dumps(r["training"], sort_keys=True) for r in runs}) == 1:
            return text  # one training gave the row's every record (metrics of one run)
        if len(runs) > 1:
            text = f"{', '.join(res['setting'] for res in record['results'])}: {text}"
        parts.append(text)
    return "; ".join(parts)


def _commands(setup: tuple[str, ...], keys: list[tuple[str, ...]],
              rows: dict[tuple[str, ...], list[dict[str, Any]]]) -> str:
    """The reproduce commands of the table's runs in row order, each once, the trainings
    before the commands that score trained models."""
    commands = dict.fromkeys(c for key in keys for r in rows[key] for c in r.get("reproduce", []))
    ordered = sorted(commands, key=lambda c: "metalab train " not in c)
    return _bash([*setup, *ordered])


def _bash(commands: list[str]) -> str:
    """A bash code block; a command longer than 100 characters continues on indented lines,
    broken before its ``--`` options."""
    lines = []
    for command in commands:
        line, *options = command.split(" --")
        for option in options:
            if len(line) + len(option) + 5 > 100:
                lines.append(line + " \\")
                line = "   "
            line += " --" + option
        lines.append(line)
    return "```bash\n" + "\n".join(lines) + "\n```"


def _speed_section(records: list[dict[str, Any]]) -> str:
    """The table of measurements (one row each, with its figures and data file), notes and
    the scripts' commands."""
    header = ["measurement", "figures", "machine", "data"]
    lines = [_table_line(header), _table_line(["---"] * len(header))]
    notes: list[str] = []
    commands: list[str] = []
    for record in records:
        title = record["title"]
        if record.get("note"):
            notes.append(record["note"])
            title += f" [{len(notes)}]"
        data = f"[{Path(record['results_file']).name}](../{record['results_file']})"
        lines.append(_table_line([title, record["summary"], record["machine"], data]))
        commands.extend(c for c in record["reproduce"] if c not in commands)
    parts = ["## Speed, memory and other measurements",
             _wrap("Figures of the scripts in `benchmarks/` (what each measures and how: "
                   "[benchmarks/README.md](../benchmarks/README.md)); every figure of a run "
                   "is in its JSON file."),
             "\n".join(lines)]
    if notes:
        parts.append(_notes(notes))
    parts.append("### How to reproduce\n\n" + _bash(commands))
    return "\n\n".join(parts)


def _wrap(text: str, indent: str = "") -> str:
    """``text`` wrapped at 100 characters, continuation lines indented by ``indent``."""
    return textwrap.fill(text, 100, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def _notes(notes: list[str]) -> str:
    """The notes as a list, ``[n]`` matching the markers in the table."""
    return "\n".join(_wrap(f"- [{i}] {note}", "  ") for i, note in enumerate(notes, 1))


def _table_line(cells: Sequence[str]) -> str:
    """One Markdown table line (``|`` inside a cell escaped)."""
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def write(records_dir: Path = RECORDS_DIR, page: Path = RESULTS_PAGE) -> None:
    """Render the records under ``records_dir`` into ``page``."""
    page.write_text(render(load_records(records_dir)))


def check(records_dir: Path = RECORDS_DIR, page: Path = RESULTS_PAGE) -> str | None:
    """None if ``page`` is what the records give, else a message with the first differences."""
    expected = render(load_records(records_dir))
    actual = page.read_text() if page.exists() else ""
    if actual == expected:
        return None
    diff = list(difflib.unified_diff(actual.splitlines(), expected.splitlines(),
                                     f"{page} (committed)", f"{page} (from {records_dir})",
                                     lineterm="", n=1))
    shown = "\n".join(diff[:40]) + ("\n..." if len(diff) > 40 else "")
    return (f"{page} differs from what the records in {records_dir} generate; run "
            f"`python -m metalab.results` and commit the page with the records.\n{shown}")


# -- records from a run folder -----------------------------------------------------------------

def records_from_run(
    run_dir: Path, benchmark: str, machine: str, *, config_name: str | None = None,
    evaluations: Sequence[Path] = (), setting: str | None = None,
    batch_norm: str | None = None, variant: str | None = None, note: str | None = None,
    code_version: str | None = None,
) -> list[dict[str, Any]]:
    """Records of a finished ``metalab train`` run: its ``test.json`` and any ``metalab
    evaluate --json`` files of its checkpoint (``evaluations``), one record per BatchNorm
    mode at test, the mode it was trained with first (a ``--transductive-bn`` evaluation of a
    model with running statistics gets its own record, hence its own row).

    The effective config is the run's ``config.json``; ``config_name`` (default: the run
    folder's last two parts, ``runs/omniglot/protonet-20w1s`` -> ``omniglot/protonet-20w1s``)
    names the built-in config it is compared with, and every value that differs becomes an
    override. Training minutes and steps come from the last line of ``log.jsonl``. The
    setting is ``<n>w<k>s`` unless ``setting`` names the test.json's one (regression
    benchmarks name theirs). The BatchNorm mode as trained is ``batch_norm`` if given, else
    the ``batch_norm`` option of the algorithm (its default where the config does not set
    it: ``transductive`` for the MAML family) when ``support`` or ``transductive``, ``none``
    for the built-in MLP without BatchNorm, else ``running``. ``code_version`` defaults to
    the checkout's HEAD (``-dirty`` with uncommitted changes).
    """
    from metalab.config import load_config

    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; benchmarks: "
                         f"{', '.join(BENCHMARKS)}.")
    values = _read_json(run_dir / "config.json", "metalab train writes it")
    name = config_name or "/".join(run_dir.parts[-2:])
    try:
        builtin = load_config(name).to_dict()
    except FileNotFoundError:
        raise ValueError(f"{name!r} is not a built-in config; name the one {run_dir} was "
                         f"trained from with --config.") from None
    overrides = _overrides(builtin, values)
    trained_as = batch_norm or _batch_norm_as_trained(values)
    # (BatchNorm mode, scores, setting, evaluate command)
    scored: list[tuple[str, dict[str, Any], str | None, str | None]] = [
        (trained_as, _read_json(run_dir / "test.json", "metalab train writes it"), setting,
         None)]
    for path in evaluations:
        evaluation = _read_json(path, "metalab evaluate --json writes it")
        mode = "transductive" if evaluation.get("batch_norm") == "transductive" else trained_as
        flags = [f"--n-way {evaluation['n_way']}", f"--k-shot {evaluation['k_shot']}",
                 f"--q-query {evaluation['q_query']}", f"--split {evaluation['split']}",
                 *(["--transductive-bn"] if mode == "transductive" else [])]
        scored.append((mode, evaluation, None,
                       f"metalab evaluate {values['out']}/best.pt {' '.join(flags)}"))
    minutes, steps = _training_time(run_dir)
    train = " ".join(["metalab train", name, *(f"--set {o}" for o in overrides)])
    version = code_version or _git_version()
    records = []
    for mode in dict.fromkeys(s[0] for s in scored):
        chosen = [s for s in scored if s[0] == mode]
        metrics = sorted({s[1]["metric"] for s in chosen})
        if len(metrics) > 1:
            raise ValueError(f"the scores of {run_dir} mix metrics ({', '.join(metrics)}).")
        record = {
            "kind": "run", "benchmark": benchmark, "algorithm": values["algorithm"],
            "protocol": {"train_split": values["train_split"], "batch_norm": mode,
                         **({"variant": variant} if variant else {})},
            "metric": metrics[0],
            "results": [_result(scores, s) for _, scores, s, _ in chosen],
            "config": {"name": name, "overrides": overrides, "values": values},
            "training": {"minutes": minutes, "machine": machine, "steps": steps},
            "code_version": version,
            "reproduce": [train, *(c for *_, c in chosen if c)],
            **({"note": note} if note else {}),
        }
        records.append(validate(record, f"record of {run_dir} ({mode})"))
    return records


def _read_json(path: Path, origin: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found ({origin}).")
    return json.loads(path.read_text())


def _result(scores: dict[str, Any], setting: str | None) -> dict[str, Any]:
    """A record's result from a test.json or an evaluation JSON; a score that is not finite
    (a diverged model) becomes null."""
    mean, ci95 = scores["mean"], scores["ci95"]
    finite = math.isfinite(mean)
    return {"setting": setting or f"{scores['n_way']}w{scores['k_shot']}s",
            "mean": mean if finite else None,
            "ci95": ci95 if finite and math.isfinite(ci95) else None,
            "episodes": scores["episodes"]}


def _overrides(builtin: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """``key=value`` for each value of the run (``values``) that differs from the built-in
    config, in key order. Option mappings compare key by key (``--set a.b=1``); an option
    the built-in config sets and the run did not is the algorithm's default there."""
    overrides = []
    for key in sorted(values):
        value, default = values[key], builtin.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            unset = {option: _option_default(values["algorithm"], key, option)
                     for option in default.keys() - value.keys()}
            overrides += [f"{key}.{option}={_yaml_value(v)}"
                          for option, v in sorted({**unset, **value}.items())
                          if option not in default or default[option] != v]
        elif value != default:
            overrides.append(f"{key}={_yaml_value(value)}")
    return overrides


def _option_default(algorithm: str, mapping: str, option: str) -> Any:
    """The value a run had for ``mapping.option`` without setting it: the algorithm's
    default for an algorithm option; for any other mapping there is no telling."""
    if mapping == "algorithm_options":
        parameter = _options(algorithm).get(option)
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    raise ValueError(f"the built-in config sets {mapping}.{option}, the run did not, and its "
                     f"default is not known; name the config the run trained from (--config).")


def _yaml_value(value: Any) -> str:
    """``value`` as ``--set`` parses it back (YAML flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix(
        "\n...\n").strip()


def _batch_norm_as_trained(values: dict[str, Any]) -> str:
    """How the config's network normalises at test without ``--transductive-bn``."""
    if values.get("backbone") == "mlp" and not values.get("backbone_options", {}).get(
            "batch_norm"):
        return "none"
    option = values.get("algorithm_options", {}).get("batch_norm")
    if option is None:
        parameter = _options(values["algorithm"]).get("batch_norm")
        option = parameter.default if parameter is not None else None
    return option if option in ("support", "transductive") else "running"


def _training_time(run_dir: Path) -> tuple[float, int]:
    """Recorded minutes of training steps (one decimal) and steps, from ``log.jsonl``."""
    log = run_dir / "log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    if not lines:
        raise FileNotFoundError(f"{log} not found or empty; the training time comes from it.")
    last = json.loads(lines[-1])
    return round(last["train_seconds"] / 60, 1), last["step"]


def _git_version() -> str:
    """HEAD of the checkout in the working directory, ``-dirty`` with tracked changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise ValueError("no git checkout here to take the code version from; pass "
                         "--code-version COMMIT.") from None
    return head + ("-dirty" if dirty else "")


# -- command line ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``python -m metalab.results``: write the page, ``--check`` it, or ``--record`` a run."""
    parser = argparse.ArgumentParser(
        prog="python -m metalab.results",
        description="Write docs/results.md from docs/records/, check it, or record a run.")
    parser.add_argument("--records", type=Path, default=RECORDS_DIR, help="records folder")
    parser.add_argument("--page", type=Path, default=RESULTS_PAGE, help="the page to write")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the page differs from what the records generate")
    parser.add_argument("--record", type=Path, metavar="RUN_DIR",
                        help="write records of this metalab train run folder")
    parser.add_argument("--benchmark", choices=list(BENCHMARKS), help="with --record")
    parser.add_argument("--machine", help='with --record: where it trained, e.g. "2-core CPU"')
    parser.add_argument("--config", help="with --record: the built-in config it trained from")
    parser.add_argument("--evaluation", type=Path, action="append", default=[],
                        help="with --record: a metalab evaluate --json file of its best.pt")
    parser.add_argument("--setting", help="with --record: the test.json's setting")
    parser.add_argument("--batch-norm", choices=("running", "support", "transductive", "none"),
                        help="with --record: the BatchNorm mode as trained")
    parser.add_argument("--variant", help="with --record: what else the row depends on")
    parser.add_argument("--note", help="with --record: a caveat for the table's notes")
    parser.add_argument("--code-version", help="with --record: the commit (default: HEAD)")
    args = parser.parse_args(argv)
    try:
        if args.record is not None:
            if not (args.benchmark and args.machine):
                parser.error("--record needs --benchmark and --machine")
            records = records_from_run(
                args.record, args.benchmark, args.machine, config_name=args.config,
                evaluations=args.evaluation, setting=args.setting, batch_norm=args.batch_norm,
                variant=args.variant, note=args.note, code_version=args.code_version)
            paths = [_record_path(args.records, args.record, record, first=i == 0)
                     for i, record in enumerate(records)]
            for path, record in zip(paths, records, strict=True):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
                print(f"wrote {path}")
            print("now run python -m metalab.results to regenerate the page")
            return 0
        if args.check:
            problem = check(args.records, args.page)
            if problem:
                print(problem, file=sys.stderr)
                return 1
            print(f"{args.page} is up to date with {args.records}")
            return 0
        write(args.records, args.page)
        print(f"wrote {args.page}")
        return 0
    except (ValueError, OSError) as error:
        print(f"metalab.results: error: {error}", file=sys.stderr)
        return 2


def _record_path(records_dir: Path, run_dir: Path, record: dict[str, Any], first: bool,
                 ) -> Path:
    """``<records>/<benchmark>/<run folder>.json``, ``-<BatchNorm mode>`` added for the
    records of evaluations with another mode than training's; never an existing file."""
    suffix = "" if first else f"-{record['protocol']['batch_norm']}"
    path = records_dir / record["benchmark"] / f"{run_dir.name}{suffix}.json"
    if path.exists():
        raise FileExistsError(f"{path} exists; a newer run of the same protocol replaces it: "
                              f"move the old figures to CHANGELOG.md and delete the record.")
    return path

if __name__ == "__main__":
    sys.exit(main())
