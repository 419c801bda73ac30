"""The adaptation service without HTTP: tasks of named classes registered from a handful of
examples, adapted when they change, predicted with abstention.

    service = Service("runs/banking77/default-5w1s/best.pt", "intents.sqlite")
    service.create_task("support-bot")
    service.add_class("support-bot", "card_arrival", [b"my card has not arrived", ...])
    service.add_class("support-bot", "top_up", [b"how do i top up", ...])
    service.predict("support-bot", [b"where is my new card"])

**Adaptation happens on writes.** Every change to a task's classes or support examples
adapts the model to the task again (``algorithm.adapt``: prototypes, adapted weights or a
memory) and stores the predictor's state (:mod:`metalab.predictors`) in the same SQLite
transaction as the change, so a prediction is one forward pass, and a restart restores every
task without encoding an example. The examples are kept, so ``readapt=True`` adapts every task
again when the checkpoint is replaced.

**Abstention.** A task may have a threshold on the winning class's probability: below it the
answer is "unknown". It is set by hand, fitted on held-out examples the user marks (some
labelled with a class, some with none), or fitted by leave-one-out on the support set (each
example scored by the task adapted without it; each class's examples, as unknowns, by the task
adapted without that class). Both fits choose the threshold that maximises accuracy with
"unknown" counted as one more class (:func:`metalab.evaluate.fit_threshold`).

Writes are serialised (one lock) and each is one transaction; a :class:`ServiceError` says
what was wrong and what to do, with the HTTP status that fits it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metalab.evaluate import fit_threshold
from metalab.predictors import (
    UnsupportedPredictor,
    predictor_state,
    restore_predictor,
    state_bytes,
    state_from_bytes,
)
from metalab.serve.inputs import InputError, inputs_for
from metalab.serve.store import Example, Store, StoreError, content_hash

__all__ = ["Prediction", "Service", "ServiceError"]

NAME = re.compile(r"[^\x00-\x1f\x7f/\\]{1,100}")
MAX_EXAMPLES_PER_CLASS = 1000
# Stored examples kept decoded (least recently used dropped first): every write adapts to the
# task's whole support set, which would otherwise decode every one of its images again.
DECODED_KEPT = 4096
THRESHOLD_METHODS = ("none", "fixed", "held-out", "leave-one-out")


class ServiceError(Exception):
    """A request the service refuses; ``status`` is the HTTP status that fits it."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Prediction:
    label: str | None  # None: unknown (below the task's threshold)
    score: float  # probability of the most likely class
    scores: dict[str, float]  # every class's probability

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "unknown": self.label is None, "score": self.score,
                "scores": self.scores}


@dataclass
class _Adapted:
    """A task as it is served: its classes in label order and its predictor, or why none."""

    classes: list[str]
    predictor: Any = None
    reason: str = ""
    threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Service:
    """Serve the classifier in ``checkpoint`` with tasks kept in the SQLite ``store``.

    The store remembers which checkpoint adapted its tasks; opening it with another checkpoint
    raises :class:`StoreError` unless ``readapt`` is set, which adapts every task again from
    its stored examples.
    """

    def __init__(self, checkpoint: str | Path, store: str | Path, readapt: bool = False) -> None:
        from metalab.runs import load_checkpoint

        self.checkpoint = Path(checkpoint)
        self.algorithm, self.config = load_checkpoint(self.checkpoint)
        self.inputs = inputs_for(self.algorithm, self.config)
        self.inputs.load()
        self.digest = checkpoint_digest(self.checkpoint)
        self._lock = threading.RLock()
        # (sha256, media type) -> inputs.prepare of that content; read and written under the
        # lock only
        self._decoded: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.decoded_kept = DECODED_KEPT
        self.store = Store(store)
        try:
            self._adapted: dict[str, _Adapted] = {}
            self._open_store(readapt)
        except BaseException:
            self.store.close()
            raise

    # -- start-up ---------------------------------------------------------------------------

    def _input_key(self) -> str:
        return json.dumps(self.inputs.describe(), sort_keys=True)

    def _open_store(self, readapt: bool) -> None:
        tasks = self.store.task_names()
        stored_input, stored_model = self.store.setting("input"), self.store.setting("model")
        if tasks and stored_input is not None and stored_input != self._input_key():
            raise StoreError(f"{self.store.path} holds tasks of {stored_input} examples; "
                             f"{self.checkpoint} reads {self._input_key()}. Serve it with "
                             "another --store.")
        if tasks and stored_model != self.digest and not readapt:
            raise StoreError(f"the tasks in {self.store.path} were adapted with another model "
                             f"(checkpoint sha256 {str(stored_model)[:12]}…, this one is "
                             f"{self.digest[:12]}…). Start with --readapt to adapt every task "
                             "again from its stored examples, or give --store a new file.")
        with self.store.transaction() as db:
            Store.set_setting(db, "input", self._input_key())
            Store.set_setting(db, "model", self.digest)
        for name in tasks:
            self._adapted[name] = self._restore(name) if not readapt else self._readapt(name)

    def _restore(self, name: str) -> _Adapted:
        """The task as stored; adapted again (and stored) if its state cannot be read."""
        task_id = self.store.task_id(name)
        row = self.store.state(task_id)
        if row is None:
            return self._readapt(name)
        model, classes, blob = row
        try:
            if model != self.digest:
                raise ValueError("adapted by another model")
            predictor = _load_predictor(state_from_bytes(blob), self.algorithm)
        except (ValueError, RuntimeError, KeyError):
            return self._readapt(name)
        return _Adapted(json.loads(classes), predictor, threshold=self._threshold(name))

    def _readapt(self, name: str) -> _Adapted:
        with self._lock, self.store.transaction() as db:
            return self._adapt(db, self.store.task_id(name), name)


    # -- reads --------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        from metalab import __version__

        algo = self.algorithm
        return {"metalab": __version__, "schema": self.store.query("PRAGMA user_version")[0][0],
                "algorithm": algo.name, "family": algo.family, "checkpoint": str(self.checkpoint),
                "checkpoint_sha256": self.digest, "input": self.inputs.describe(),
                "classes_per_task": algo.spec.n_way if algo.fixed_ways else None}

    def task_names(self) -> list[str]:
        return self.store.task_names()

    def task(self, name: str) -> dict[str, Any]:
        row = self._task_row(name)
        task_id, _, created, threshold, method = row
        adapted = self._adapted.get(name)
        counts = self.store.example_counts(task_id)
        return {"name": name, "created": created, "threshold": threshold,
                "threshold_method": method or "none",
                "classes": [{"name": c, "examples": n} for c, n in counts.items()],
                "held_out_examples": self.store.held_out_count(task_id),
                "ready": adapted is not None and adapted.predictor is not None,
                "reason": adapted.reason if adapted else ""}

    def examples(self, task: str, class_name: str) -> list[dict[str, Any]]:
        task_id = self._task_row(task)[0]
        self._class_id(task_id, task, class_name)
        return [{"sha256": e.sha256, "media_type": e.media_type,
                 **self.inputs.shown(e.content)}
                for e in self.store.examples(task_id, class_name=class_name)]

    # -- writes -------------------------------------------------------------------------------

    def create_task(self, name: str, threshold: float | None = None) -> dict[str, Any]:
        _check_name(name, "task")
        _check_threshold(threshold)
        with self._lock:
            if self.store.task_id(name) is not None:
                raise ServiceError(f"a task named {name!r} exists; choose another name or add "
                                   "classes to it.", 409)
            with self.store.transaction() as db:
                db.execute("INSERT INTO tasks (name, created, threshold, threshold_method) "
                           "VALUES (?, ?, ?, ?)", (name, time.time(), threshold,
                                                   None if threshold is None else "fixed"))
            self._adapted[name] = _Adapted([], reason=self._unready(0), threshold=threshold)
        return self.task(name)

    def delete_task(self, name: str) -> None:
        with self._lock:
            task_id = self._task_row(name)[0]
            with self.store.transaction() as db:
                db.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
            self._adapted.pop(name, None)

    def add_class(self, task: str, name: str, examples: Sequence[tuple[bytes, str]]
                  ) -> dict[str, Any]:
        """Register class ``name`` from ``examples`` (content, media type) and adapt."""
        _check_name(name, "class")
        prepared = self._prepare(examples)
        with self._lock:
            task_id = self._task_row(task)[0]
            if self.store.class_id(task_id, name) is not None:
                raise ServiceError(f"task {task!r} already has a class {name!r}; add examples to "
                                   "it, or choose another name.", 409)
            count = len(self.store.class_names(task_id)) + 1
            if self.algorithm.fixed_ways and count > self.algorithm.spec.n_way:
                raise ServiceError(f"this {self.algorithm.name} model classifies exactly "
                                   f"{self.algorithm.spec.n_way} classes per task and task "
                                   f"{task!r} has them all; create another task.", 409)
            with self.store.transaction() as db:
                class_id = db.execute("INSERT INTO classes (task_id, name, created) VALUES "
                                      "(?, ?, ?)", (task_id, name, time.time())).lastrowid
                _insert_examples(db, task_id, class_id, prepared, held_out=False)
                adapted = self._adapt(db, task_id, task)
            self._adapted[task] = adapted
        return self._class_summary(task, name, adapted)

    def add_examples(self, task: str, class_name: str, examples: Sequence[tuple[bytes, str]]
                     ) -> dict[str, Any]:
        prepared = self._prepare(examples)
        with self._lock:
            task_id = self._task_row(task)[0]
            class_id = self._class_id(task_id, task, class_name)
            with self.store.transaction() as db:
                _insert_examples(db, task_id, class_id, prepared, held_out=False)
                adapted = self._adapt(db, task_id, task)
            self._adapted[task] = adapted
        return self._class_summary(task, class_name, adapted)

    def remove_example(self, task: str, class_name: str, sha256: str) -> dict[str, Any]:
        with self._lock:
            task_id = self._task_row(task)[0]
            class_id = self._class_id(task_id, task, class_name)
            left = self.store.query("SELECT count(*) FROM examples WHERE class_id = ? AND "
                                    "held_out = 0", (class_id,))[0][0]
            with self.store.transaction() as db:
                gone = db.execute("DELETE FROM examples WHERE class_id = ? AND sha256 = ? AND "
                                  "held_out = 0", (class_id, sha256)).rowcount
                if not gone:
                    raise ServiceError(f"class {class_name!r} has no example {sha256}; list them "
                                       f"with GET .../classes/{class_name}/examples.", 404)
                if left == 1:
                    raise ServiceError(f"that is the last example of {class_name!r}; a class "
                                       "needs one at least. Delete the class instead.", 409)
                adapted = self._adapt(db, task_id, task)
            self._adapted[task] = adapted
        return self._class_summary(task, class_name, adapted)

    def rename_class(self, task: str, class_name: str, new_name: str) -> dict[str, Any]:
        _check_name(new_name, "class")
        with self._lock:
            task_id = self._task_row(task)[0]
            class_id = self._class_id(task_id, task, class_name)
            if new_name != class_name and self.store.class_id(task_id, new_name) is not None:
                raise ServiceError(f"task {task!r} already has a class {new_name!r}.", 409)
            with self.store.transaction() as db:
                db.execute("UPDATE classes SET name = ? WHERE id = ?", (new_name, class_id))
                adapted = self._adapted[task]
                classes = [new_name if c == class_name else c for c in adapted.classes]
                db.execute("UPDATE states SET classes = ? WHERE task_id = ?",
                           (json.dumps(classes), task_id))
                adapted.classes = classes  # labels keep their order: nothing to adapt
        return self._class_summary(task, new_name, adapted)

    def delete_class(self, task: str, class_name: str) -> None:
        with self._lock:
            task_id = self._task_row(task)[0]
            class_id = self._class_id(task_id, task, class_name)
            with self.store.transaction() as db:
                db.execute("DELETE FROM classes WHERE id = ?", (class_id,))
                adapted = self._adapt(db, task_id, task)
            self._adapted[task] = adapted

    def add_held_out(self, task: str, examples: Sequence[tuple[bytes, str, str | None]]
                     ) -> dict[str, Any]:
        """Keep examples aside (labelled with a class, or None: belongs to none) to fit the
        task's threshold with ``method="held-out"``; they are never adapted on."""
        prepared = self._prepare([(c, m) for c, m, _ in examples])
        with self._lock:
            task_id = self._task_row(task)[0]
            ids = {label: None if label is None else self._class_id(task_id, task, label)
                   for _, _, label in examples}
            with self.store.transaction() as db:
                for (content, media_type, label), _ in zip(examples, prepared, strict=True):
                    _insert_examples(db, task_id, ids[label], [(content, media_type)],
                                     held_out=True)
        return self.task(task)

    def set_threshold(self, task: str, method: str, value: float | None = None
                      ) -> dict[str, Any]:
        """Set the task's threshold: ``none``, ``fixed`` (``value``), or fitted on
        ``held-out`` examples or by ``leave-one-out`` on the support set."""
        if method not in THRESHOLD_METHODS:
            raise ServiceError(f"unknown threshold method {method!r}; use one of "
                               f"{', '.join(THRESHOLD_METHODS)}.", 422)
        if (value is None) != (method != "fixed"):
            raise ServiceError("give a value with method fixed, and only then.", 422)
        _check_threshold(value)
        with self._lock:
            task_id = self._task_row(task)[0]
            adapted = self._adapted[task]
            if method in ("held-out", "leave-one-out"):
                if adapted.predictor is None:
                    raise ServiceError(f"task {task!r} is not ready to predict: {adapted.reason}",
                                       409)
                fit = self._fit_held_out if method == "held-out" else self._fit_leave_one_out
                # a fitted threshold may lie past the scores' ends: 0 accepts all, 1 rejects all
                value = min(max(fit(task_id, task, adapted), 0.0), 1.0)
            with self.store.transaction() as db:
                db.execute("UPDATE tasks SET threshold = ?, threshold_method = ? WHERE id = ?",
                           (value, None if method == "none" else method, task_id))
            adapted.threshold = value
        return self.task(task)

    # -- predictions ---------------------------------------------------------------------------

    def prepare(self, content: bytes, media_type: str) -> Any:
        """Check and decode one query (raises :class:`ServiceError`)."""
        try:
            return self.inputs.prepare(content, media_type)
        except InputError as error:
            raise ServiceError(str(error), error.status) from None

    def predict(self, task: str, queries: Sequence[tuple[bytes, str]]) -> list[Prediction]:
        """The predictions for ``queries`` (content, media type) of one task."""
        result = self.predict_prepared([(task, [self.prepare(c, m) for c, m in queries])])[0]
        if isinstance(result, ServiceError):
            raise result
        return result

    def predict_prepared(self, requests: Sequence[tuple[str, list[Any]]]
                         ) -> list[list[Prediction] | ServiceError]:
        """Predictions for several requests (task, prepared queries) in one pass: the queries
        of all requests are encoded together, and each task's predictor runs once on all its
        queries. A request for a task that cannot predict gets its :class:`ServiceError`."""
        answers: list[list[Prediction] | ServiceError] = []
        served: list[tuple[int, _Adapted, int, int]] = []  # (request, task, start, stop)
        items: list[Any] = []
        for number, (task, queries) in enumerate(requests):
            adapted = self._adapted.get(task)
            if adapted is None:
                answers.append(ServiceError(f"no task named {task!r}; create it with POST "
                                            "/tasks, or list the tasks with GET /tasks.", 404))
            elif adapted.predictor is None:
                answers.append(ServiceError(f"task {task!r} cannot predict yet: "
                                            f"{adapted.reason}", 409))
            else:
                answers.append([])
                served.append((number, adapted, len(items), len(items) + len(queries)))
                items += queries
        if not items:
            return answers
        inputs = self.inputs.batch(items)
        by_task: dict[int, list[tuple[int, int, int]]] = {}
        for number, adapted, start, stop in served:
            by_task.setdefault(id(adapted), []).append((number, start, stop))
        tasks = {id(a): a for _, a, _, _ in served}
        with torch.no_grad():
            for key, parts in by_task.items():
                adapted = tasks[key]
                rows = torch.cat([torch.arange(start, stop) for _, start, stop in parts])
                probabilities = torch.softmax(adapted.predictor(inputs[rows]), -1)
                offset = 0
                for number, start, stop in parts:
                    answers[number] = _predictions(
                        probabilities[offset:offset + stop - start], adapted)
                    offset += stop - start
        return answers

    # -- internals ----------------------------------------------------------------------------

    def _task_row(self, name: str) -> tuple:
        row = self.store.task_row(name)
        if row is None:
            raise ServiceError(f"no task named {name!r}; create it with POST /tasks, or list "
                               "the tasks with GET /tasks.", 404)
        return row

    def _threshold(self, name: str) -> float | None:
        return self.store.task_row(name)[3]

    def _class_id(self, task_id: int, task: str, name: str) -> int:
        class_id = self.store.class_id(task_id, name)
        if class_id is None:
            raise ServiceError(f"task {task!r} has no class {name!r}; its classes: "
                               f"{', '.join(self.store.class_names(task_id)) or '(none)'}.", 404)
        return class_id

    def _class_summary(self, task: str, name: str, adapted: _Adapted) -> dict[str, Any]:
        task_id = self.store.task_id(task)
        return {"task": task, "name": name,
                "examples": self.store.example_counts(task_id).get(name, 0),
                "ready": adapted.predictor is not None, "reason": adapted.reason}

    def _prepare(self, examples: Sequence[tuple[bytes, str]]) -> list[tuple[bytes, str]]:
        if not examples:
            raise ServiceError("give at least one example.", 422)
        if len(examples) > MAX_EXAMPLES_PER_CLASS:
            raise ServiceError(f"{len(examples)} examples in one request, over the limit of "
                               f"{MAX_EXAMPLES_PER_CLASS}; send them in several.", 413)
        decoded = [((content_hash(c), m), self.prepare(c, m)) for c, m in examples]
        with self._lock:  # decoded outside it, so that a large upload blocks no other write
            for key, item in decoded:
                self._remember(key, item)
        return list(examples)

    def _remember(self, key: tuple[str, str], item: Any) -> Any:
        self._decoded[key] = item
        self._decoded.move_to_end(key)
        while len(self._decoded) > self.decoded_kept:
            self._decoded.popitem(last=False)
        return item

    def _decode(self, example: Example) -> Any:
        """``inputs.prepare`` of a stored example, decoded once while it stays in use."""
        key = (example.sha256, example.media_type)
        if key in self._decoded:
            return self._remember(key, self._decoded[key])
        return self._remember(key, self.inputs.prepare(example.content, example.media_type))

    def _encode_support(self, task_id: int) -> tuple[list[str], Tensor, Tensor]:
        classes = self.store.class_names(task_id)
        position = {name: i for i, name in enumerate(classes)}
        examples = self.store.examples(task_id)
        items = [self._decode(e) for e in examples]
        labels = torch.tensor([position[e.class_name] for e in examples], dtype=torch.long)
        return classes, (self.inputs.batch(items, remember=True) if items else torch.empty(0)), \
            labels

    def _adapt(self, db, task_id: int, task: str) -> _Adapted:
        """Adapt the model to the task's current support set and store the result, inside
        the caller's transaction."""
        classes, support_x, support_y = self._encode_support(task_id)
        adapted = _Adapted(classes, threshold=self._threshold(task))
        adapted.reason = self._unready(len(classes))
        db.execute("DELETE FROM states WHERE task_id = ?", (task_id,))
        if not adapted.reason:
            try:
                adapted.predictor = self._adapt_on(support_x, support_y)
            except ValueError as error:  # e.g. a learner that reads a fixed number of classes
                adapted.reason = str(error)
        if adapted.predictor is not None:
            db.execute("INSERT INTO states VALUES (?, ?, ?, ?)",
                       (task_id, self.digest, json.dumps(classes),
                        state_bytes(_predictor_record(adapted.predictor, self.algorithm,
                                                      support_x, support_y))))
        return adapted

    def _adapt_on(self, support_x: Tensor, support_y: Tensor) -> Any:
        with torch.no_grad():
            return self.algorithm.adapt(support_x, support_y)

    def _unready(self, count: int) -> str:
        algo = self.algorithm
        if algo.fixed_ways and count != algo.spec.n_way:
            return (f"this {algo.name} model classifies exactly {algo.spec.n_way} classes per "
                    f"task; this task has {count}.")
        return _too_few(count) if count < 2 else ""

    def _scores(self, predictor: Any, items: list[Any]) -> Tensor:
        with torch.no_grad():
            return torch.softmax(predictor(self.inputs.batch(items)), -1)

    def _fit_held_out(self, task_id: int, task: str, adapted: _Adapted) -> float:
        held = self.store.examples(task_id, held_out=True)
        known = [e for e in held if e.class_name is not None]
        unknown = [e for e in held if e.class_name is None]
        if not known or not unknown:
            raise ServiceError(f"task {task!r} has {len(known)} held-out examples of its classes "
                               f"and {len(unknown)} of none; the fit needs some of both (POST "
                               f".../held-out with labels, and label null for unknowns).", 409)
        position = {name: i for i, name in enumerate(adapted.classes)}
        items = [self._decode(e) for e in held]
        score, label = self._scores(adapted.predictor, items).max(-1)
        is_known = torch.tensor([e.class_name is not None for e in held])
        truth = torch.tensor([position.get(e.class_name, -1) for e in held])
        return fit_threshold(score[is_known], (label == truth)[is_known], score[~is_known])

    def _fit_leave_one_out(self, task_id: int, task: str, adapted: _Adapted) -> float:
        if self.algorithm.fixed_ways:
            raise ServiceError(f"this {self.algorithm.name} model classifies a fixed number of "
                               "classes, so classes cannot be left out; mark held-out examples "
                               "and fit with method held-out.", 409)
        classes, support_x, support_y = self._encode_support(task_id)
        if len(classes) < 3:
            raise ServiceError("leave-one-out needs three classes at least (one is left out, "
                               "two remain to choose between).", 409)
        in_scores, in_correct, out_scores = [], [], []
        everything = torch.arange(len(support_y))
        for i in everything.tolist():
            if int((support_y == support_y[i]).sum()) < 2:
                continue  # its class would vanish: that is the unknown case below
            keep = everything != i
            with torch.no_grad():
                predictor = self._adapt_on(support_x[keep], support_y[keep])
                probabilities = torch.softmax(predictor(support_x[i:i + 1]), -1)[0]
            in_scores.append(probabilities.max())
            in_correct.append(probabilities.argmax() == support_y[i])
        for c in range(len(classes)):
            keep = support_y != c
            others = support_y[keep]
            with torch.no_grad():
                predictor = self._adapt_on(support_x[keep], others - (others > c).long())
                out_scores.append(torch.softmax(predictor(support_x[~keep]), -1).max(-1).values)
        if not in_scores:
            raise ServiceError("leave-one-out needs a class with two examples at least.", 409)
        return fit_threshold(torch.stack(in_scores), torch.stack(in_correct),
                             torch.cat(out_scores))


def _predictions(probabilities: Tensor, adapted: _Adapted) -> list[Prediction]:
    score, label = probabilities.max(-1)
    out = []
    for row, s, i in zip(probabilities.tolist(), score.tolist(), label.tolist(), strict=True):
        rejected = adapted.threshold is not None and s < adapted.threshold
        out.append(Prediction(None if rejected else adapted.classes[i], s,
                              dict(zip(adapted.classes, row, strict=True))))
    return out


def _predictor_record(predictor: Any, algorithm, support_x: Tensor, support_y: Tensor) -> dict:
    """What is stored of an adapted task: the predictor's state, or, for a predictor that
    holds something :mod:`metalab.predictors` cannot write, the encoded support set (adapted
    again when the store is opened)."""
    try:
        return {"predictor": predictor_state(predictor, algorithm)}
    except UnsupportedPredictor:
        return {"support_x": support_x, "support_y": support_y}


def _load_predictor(record: dict, algorithm) -> Any:
    if "predictor" in record:
        return restore_predictor(record["predictor"], algorithm)
    with torch.no_grad():
        return algorithm.adapt(record["support_x"], record["support_y"])


def _insert_examples(db, task_id: int, class_id: int | None,
                     examples: Sequence[tuple[bytes, str]], held_out: bool) -> None:
    db.executemany("INSERT OR IGNORE INTO examples (task_id, class_id, held_out, sha256, "
                   "media_type, content) VALUES (?, ?, ?, ?, ?, ?)",
                   [(task_id, class_id, int(held_out), content_hash(c), m, c)
                    for c, m in examples])


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name) or name != name.strip():
        raise ServiceError(f"{what} name {name!r} is not allowed: use 1 to 100 characters, "
                           "without slashes, control characters or spaces at the ends.", 422)


def _check_threshold(value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ServiceError(f"a threshold is a probability between 0 and 1, got {value}.", 422)


def _too_few(count: int) -> str:
    return f"add at least two classes to predict (this task has {count})."
