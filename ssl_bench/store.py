"""Embedded SQLite results store: one row per run, keyed by the hash of its resolved configuration.

WAL mode and a UNIQUE config hash make concurrent writers (two sweeps on one host) safe; Ray workers
never open it, the driver writes their results:
a second insert of the same configuration is ignored, never duplicated, and a crash mid-write leaves
the database consistent (SQLite transactions are atomic).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import tempfile
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .errors import UserError


@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock on ``path`` held across processes (flock) for the ``with`` block; yields True once
    held. ``wait=False``: yields False at once when another process holds it (nothing held then)."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomically(path: Path, dump: Callable[[BinaryIO], object]) -> None:
    """Whole or absent: ``dump`` writes a temporary file in ``path``'s folder, renamed over ``path`` (two
    writers never share the temporary; a crash leaves no half file under the name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=f".tmp{path.suffix}")
    try:
        with os.fdopen(fd, "wb") as f:
            dump(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are as readable as the store
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def config_hash(config: dict) -> str:
    """The key of a stored row: a hash of everything that determines its numbers."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:20]


SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    config_hash   TEXT UNIQUE NOT NULL,
    backbone      TEXT NOT NULL,
    weights       TEXT NOT NULL,      -- weights identity: sha256 of the file, 'random:<seed>', or 'none' (not learned)
    random_weights INTEGER NOT NULL,
    task          TEXT NOT NULL,
    dataset       TEXT NOT NULL,
    split         TEXT NOT NULL,
    k             INTEGER NOT NULL,
    seed          INTEGER NOT NULL,
    miou          REAL,
    acc           REAL,
    f1            REAL,
    config        TEXT NOT NULL,      -- full resolved configuration (JSON)
    metrics       TEXT NOT NULL,      -- all streams, per-class IoU, matching policy (JSON)
    stats         TEXT NOT NULL,      -- task statistics, e.g. segment statistics (JSON)
    timings       TEXT NOT NULL,      -- seconds per stage (JSON)
    environment   TEXT NOT NULL,      -- library versions, git commit, host (JSON)
    created_at    TEXT NOT NULL DEFAULT (datetime('now'))
);
CREATE INDEX IF NOT EXISTS runs_cell ON runs (backbone, task, dataset, split, k, seed);
"""

JSON_COLUMNS = ("config", "metrics", "stats", "timings", "environment")
COLUMNS = ("config_hash", "backbone", "weights", "random_weights", "task", "dataset", "split", "k", "seed", "miou",
           "acc", "f1", *JSON_COLUMNS)


def _check_is_store(db: sqlite3.Connection, path: Path) -> None:
    """A database holding other tables (another program's), or another ``runs`` table, is not written to."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")} - {"sqlite_sequence"}
    columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
    if (tables and "runs" not in tables) or ("runs" in tables and not set(COLUMNS) <= columns):
        raise UserError(f"{path} is an SQLite database but not an ssl-bench results store (tables: "
                        f"{', '.join(sorted(tables))}) -- pass --store with a new file or an ssl-bench store")


def default_store_path() -> Path:
    return Path(os.environ.get("SSL_BENCH_STORE", Path(".ssl-bench") / "results.sqlite"))


@dataclass
class RunRecord:
    config_hash: str
    backbone: str
    weights: str
    random_weights: bool
    task: str
    dataset: str
    split: str
    k: int
    seed: int
    miou: float
    acc: float
    f1: float
    config: dict
    metrics: dict
    stats: dict
    timings: dict
    environment: dict


class ResultStore:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_store_path()
        if self.path.is_dir():
            raise UserError(f"--store {self.path} is a directory -- give a file, e.g. {self.path / 'results.sqlite'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # one process at a time: switching a new file to WAL mode needs it alone, and SQLite answers
            # "database is locked" at once (no busy wait) to a second process opening it meanwhile
            with file_lock(self.path.with_name(self.path.name + "-init.lock")):
                with closing(sqlite3.connect(self.path, timeout=60)) as db:  # before WAL mode touches the file
                    _check_is_store(db, self.path)
                with closing(self._connect()) as db, db:
                    db.executescript(SCHEMA)
        except (sqlite3.DatabaseError, OSError) as err:  # sqlite3.OperationalError is a DatabaseError
            raise UserError(f"cannot use {self.path} as the results store ({err}) -- pass --store with a new "
                            f"file or an ssl-bench store") from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        db.row_factory = sqlite3.Row
        return db

    def has(self, config_hash: str) -> bool:
        with closing(self._connect()) as db:
            return db.execute("SELECT 1 FROM runs WHERE config_hash=?", (config_hash,)).fetchone() is not None

    def stored_hashes(self) -> set[str]:
        with closing(self._connect()) as db:
            return {r[0] for r in db.execute("SELECT config_hash FROM runs")}

    def put(self, record: RunRecord, replace: bool = False) -> None:
        row = dict(record.__dict__)
        for col in JSON_COLUMNS:
            row[col] = json.dumps(row[col], sort_keys=True, default=str)
        row["random_weights"] = int(row["random_weights"])
        cols = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with closing(self._connect()) as db, db:
            db.execute(f"{verb} INTO runs ({cols}) VALUES ({marks})", row)

    def get(self, config_hash: str) -> dict | None:
        rows = self.query("config_hash = ?", (config_hash,))
        return rows[0] if rows else None

    def query(self, where: str = "1", params: tuple = ()) -> list[dict]:
        with closing(self._connect()) as db:
            rows = db.execute(f"SELECT * FROM runs WHERE {where} ORDER BY id", params).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            for col in JSON_COLUMNS:
                d[col] = json.loads(d[col])
            d["random_weights"] = bool(d["random_weights"])
            out.append(d)
        return out
