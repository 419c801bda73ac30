"""The service's store: one SQLite file holding tasks, their classes, the examples they were
registered with (content-hashed) and each task's adapted state.

The file is in write-ahead-log mode and every change is one transaction (``with
store.transaction():``), so after a crash it holds every committed change and none of an
unfinished one. It is marked as metalab's (SQLite's ``application_id``) and carries its schema
version (``user_version``); opening applies the :data:`MIGRATIONS` it lacks. A file that is not
SQLite, is damaged, belongs to another program or was written by a newer metalab is refused
with a :class:`StoreError` and never written to.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_VERSION", "Example", "Store", "StoreError"]

APPLICATION_ID = 0x4D4C5356  # "MLSV"
_SQLITE_HEADER = b"SQLite format 3\x00"

# MIGRATIONS[i] takes a store from schema version i to i + 1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE tasks (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created REAL NOT NULL,
        threshold REAL, threshold_method TEXT);
    CREATE TABLE classes (
        id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
        name TEXT NOT NULL, created REAL NOT NULL, UNIQUE (task_id, name));
    -- held_out = 0: the support set; 1: examples kept aside to fit the rejection threshold
    -- (class_id NULL there: an example that belongs to no class, i.e. should be "unknown").
    CREATE TABLE examples (
        id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
        class_id INTEGER REFERENCES classes(id) ON DELETE CASCADE,
        held_out INTEGER NOT NULL CHECK (held_out IN (0, 1)),
        sha256 TEXT NOT NULL, media_type TEXT NOT NULL, content BLOB NOT NULL);
    CREATE UNIQUE INDEX examples_once ON examples (task_id, IFNULL(class_id, 0), held_out, sha256);
    CREATE TABLE states (
        task_id INTEGER PRIMARY KEY REFERENCES tasks(id) ON DELETE CASCADE,
        model TEXT NOT NULL, classes TEXT NOT NULL, state BLOB NOT NULL);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(ValueError):
    """The store file cannot be used as it is; the message says why and what to do."""


@dataclass(frozen=True)
class Example:
    sha256: str
    media_type: str
    content: bytes
    class_name: str | None  # None: a held-out example that belongs to no class
    held_out: bool


def content_hash(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


class Store:
    """The SQLite store at ``path`` (created if absent). Safe to use from several threads:
    one connection, one lock; a transaction holds the lock from start to commit."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        _check_file(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._prepare()
        except (sqlite3.DatabaseError, StoreError) as error:
            self._db.close()
            if isinstance(error, StoreError):
                raise
            raise StoreError(f"{self.path} cannot be read as a metalab store ({error}); it was "
                             "left as it is. Move it aside, or start with --store pointing to a "
                             "new file.") from error

    def _prepare(self) -> None:
        db = self._db
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise StoreError(f"{self.path} is damaged (SQLite's quick_check fails); it was left "
                             "as it is. Restore it from a backup, or start with --store pointing "
                             "to a new file.")
        application = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if application != APPLICATION_ID and (application or tables):
            raise StoreError(f"{self.path} is an SQLite file of another program (application id "
                             f"{application:#x}), not a metalab store; it was left as it is. "
                             "Give --store a new file.")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}, written by a newer "
                             f"metalab (this one reads up to {SCHEMA_VERSION}); upgrade metalab.")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
        for number in range(version, SCHEMA_VERSION):
            with self.transaction():
                for statement in _statements(MIGRATIONS[number]):
                    db.execute(statement)
                db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                db.execute(f"PRAGMA user_version={number + 1}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic change: committed when the block ends, rolled back if it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, parameters).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- settings ---------------------------------------------------------------------------

    def setting(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    @staticmethod
    def set_setting(db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))

    # -- reads ------------------------------------------------------------------------------

    def task_id(self, name: str) -> int | None:
        rows = self.query("SELECT id FROM tasks WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def task_names(self) -> list[str]:
        return [name for (name,) in self.query("SELECT name FROM tasks ORDER BY id")]

    def task_row(self, name: str) -> tuple | None:
        rows = self.query("SELECT id, name, created, threshold, threshold_method FROM tasks "
                          "WHERE name = ?", (name,))
        return rows[0] if rows else None

    def class_names(self, task_id: int) -> list[str]:
        return [n for (n,) in self.query("SELECT name FROM classes WHERE task_id = ? ORDER BY id",
                                         (task_id,))]

    def class_id(self, task_id: int, name: str) -> int | None:
        rows = self.query("SELECT id FROM classes WHERE task_id = ? AND name = ?", (task_id, name))
        return rows[0][0] if rows else None

    def examples(self, task_id: int, held_out: bool = False,
                 class_name: str | None = None) -> list[Example]:
        """The task's support (or held-out) examples, by class in order of registration."""
        sql = ("SELECT e.sha256, e.media_type, e.content, c.name, e.held_out FROM examples e "
               "LEFT JOIN classes c ON c.id = e.class_id WHERE e.task_id = ? AND e.held_out = ?")
        parameters: tuple = (task_id, int(held_out))
        if class_name is not None:
            sql += " AND c.name = ?"
            parameters += (class_name,)
        rows = self.query(sql + " ORDER BY IFNULL(c.id, 0), e.id", parameters)
        return [Example(s, m, c, n, bool(h)) for s, m, c, n, h in rows]

    def example_counts(self, task_id: int) -> dict[str, int]:
        rows = self.query("SELECT c.name, count(e.id) FROM classes c LEFT JOIN examples e ON "
                          "e.class_id = c.id AND e.held_out = 0 WHERE c.task_id = ? "
                          "GROUP BY c.id ORDER BY c.id", (task_id,))
        return dict(rows)

    def held_out_count(self, task_id: int) -> int:
        return self.query("SELECT count(*) FROM examples WHERE task_id = ? AND held_out = 1",
                          (task_id,))[0][0]

    def state(self, task_id: int) -> tuple[str, str, bytes] | None:
        """(model digest, JSON list of class names, state bytes) of the task, if adapted."""
        rows = self.query("SELECT model, classes, state FROM states WHERE task_id = ?",
                          (task_id,))
        return rows[0] if rows else None


def _check_file(path: Path) -> None:
    """Refuse, before SQLite touches it, a file that is not an SQLite database: opening one
    would not fail until a write, and a write could damage someone's file."""
    if not path.exists():
        return
    if path.is_dir():
        raise StoreError(f"{path} is a folder; --store takes a file, e.g. {path / 'store.sqlite'}.")
    with path.open("rb") as f:
        header = f.read(len(_SQLITE_HEADER))
    if header and header != _SQLITE_HEADER:
        raise StoreError(f"{path} is not an SQLite file (nor a metalab store); it was left as it "
                         "is. Give --store a new file.")


def _statements(script: str) -> list[str]:
    """The statements of a migration, one by one (``executescript`` would commit midway)."""
    code = "\n".join(line for line in script.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in code.split(";") if s.strip()]
