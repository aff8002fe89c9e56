"""Embedded SQLite results store: one row per run, keyed by the hash of its resolved configuration.

WAL mode and a UNIQUE config hash make concurrent writers (two sweeps on one host) safe; Ray workers
never open it, the driver writes their results:
a second insert of the same configuration is ignored, never duplicated, and a crash mid-write leaves
the database consistent (SQLite transactions are atomic).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import warnings
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator
from urllib.parse import quote

from .errors import UserError
from .integrity import NO_SPACE, NOT_WRITABLE, disk_error


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

MAX_INTEGER = 2**63 - 1  # SQLite's INTEGER: seeds and K beyond it could not be stored
JSON_COLUMNS = ("config", "metrics", "stats", "timings", "environment")
COLUMNS = ("config_hash", "backbone", "weights", "random_weights", "task", "dataset", "split", "k", "seed", "miou",
           "acc", "f1", *JSON_COLUMNS)


def _check_is_store(db: sqlite3.Connection, path: Path, needs_runs: bool = False) -> None:
    """A database holding other tables (another program's), or another ``runs`` table, is not written to."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")} - {"sqlite_sequence"}
    columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
    if (tables and "runs" not in tables) or ("runs" in tables and not set(COLUMNS) <= columns) \
            or (needs_runs and "runs" not in tables):
        raise UserError(f"{path} is an SQLite database but not an ssl-bench results store (tables: "
                        f"{', '.join(sorted(tables))}) -- pass --store with a new file or an ssl-bench store")


def _disk_full(err: sqlite3.DatabaseError, path: Path) -> bool:
    """Whether SQLite failed for want of space (it says "disk I/O error" when its shared-memory file cannot grow)."""
    if getattr(err, "sqlite_errorname", "") == "SQLITE_FULL":
        return True
    try:
        return shutil.disk_usage(path.parent).free < 2**20
    except OSError:
        return False


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that never writes ``path`` or its folder. A WAL-mode store needs its ``-shm`` file beside it,
    which a read-only folder cannot hold once the last writer has gone: it is then read as immutable."""
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    db = sqlite3.connect(uri, uri=True, timeout=60)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError:
        db.close()
        return sqlite3.connect(uri + "&immutable=1", uri=True, timeout=60)


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
    """The results database at ``path``. ``read_only``: an existing store opened for reading only (no lock, no
    schema, nothing written), so a report works on a store in a read-only folder or someone else's file."""

    def __init__(self, path: str | Path | None = None, read_only: bool = False):
        self.path = Path(path) if path else default_store_path()
        self.read_only = read_only
        if self.path.is_dir():
            raise UserError(f"--store {self.path} is a directory -- give a file, e.g. {self.path / 'results.sqlite'}")
        if self.path.exists() and not self.path.is_file():  # SQLite would block on a FIFO, forever
            raise UserError(f"--store {self.path} is not a regular file -- give an ssl-bench store or a new file name")
        try:
            if read_only:
                with closing(self._connect()) as db:
                    _check_is_store(db, self.path, needs_runs=True)
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # one process at a time: switching a new file to WAL mode needs it alone, and SQLite answers
            # "database is locked" at once (no busy wait) to a second process opening it meanwhile
            with file_lock(self.path.with_name(self.path.name + "-init.lock")):
                with closing(sqlite3.connect(self.path, timeout=60)) as db:  # before WAL mode touches the file
                    _check_is_store(db, self.path)
                with closing(self._connect()) as db, db:
                    db.executescript(SCHEMA)
        except (sqlite3.DatabaseError, OSError, UnicodeDecodeError) as err:  # OperationalError is a DatabaseError
            if isinstance(err, sqlite3.DatabaseError) and _disk_full(err, self.path):
                err = OSError(errno.ENOSPC, str(err))
            if isinstance(err, OSError) and err.errno in NOT_WRITABLE + NO_SPACE:
                raise disk_error(err, self.path.parent, "the results store",
                                 "pass --store with a file in a writable folder that has room") from None
            raise UserError(f"cannot use {self.path} as the results store ({err}) -- pass --store with a new "
                            f"file or an ssl-bench store") from None

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            db = _connect_read_only(self.path)
        else:
            db = sqlite3.connect(self.path, timeout=60)
            db.execute("PRAGMA journal_mode=WAL")
        db.row_factory = sqlite3.Row
        return db

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A connection for a query; a damaged database file is one line naming it."""
        try:
            with closing(self._connect()) as db:
                yield db
        except (sqlite3.DatabaseError, UnicodeDecodeError) as err:  # "database disk image is malformed", ...
            raise UserError(f"the results store {self.path} is damaged ({err}) -- restore it from a copy, or pass "
                            f"--store with another file") from None

    def has(self, config_hash: str) -> bool:
        with self._reading() as db:
            return db.execute("SELECT 1 FROM runs WHERE config_hash=?", (config_hash,)).fetchone() is not None

    def stored_hashes(self) -> set[str]:
        with self._reading() as db:
            return {r[0] for r in db.execute("SELECT config_hash FROM runs")}

    def put(self, record: RunRecord, replace: bool = False) -> None:
        """Store one run in one transaction; a full disk or a read-only store is one line (nothing half-written)."""
        row = dict(record.__dict__)
        for col in JSON_COLUMNS:
            row[col] = json.dumps(row[col], sort_keys=True, default=str)
        row["random_weights"] = int(row["random_weights"])
        cols = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        try:
            with closing(self._connect()) as db, db:
                db.execute(f"{verb} INTO runs ({cols}) VALUES ({marks})", row)
        except (sqlite3.DatabaseError, OverflowError) as err:  # "database or disk is full", a read-only file, ...
            raise UserError(f"cannot write run {record.config_hash} to the results store {self.path} ({err}) -- free "
                            f"space on its disk or make it writable, then run again (stored runs are kept)") from None

    def delete(self, config_hashes: list[str]) -> int:
        """Delete these runs in one transaction; returns how many rows went."""
        with closing(self._connect()) as db, db:
            return sum(db.execute("DELETE FROM runs WHERE config_hash=?", (h,)).rowcount for h in config_hashes)

    def get(self, config_hash: str) -> dict | None:
        rows = self.query("config_hash = ?", (config_hash,))
        return rows[0] if rows else None

    def query(self, where: str = "1", params: tuple = ()) -> list[dict]:
        """Stored runs; a row whose fields are not what ssl-bench writes (an edited or damaged file) is left out,
        with one warning naming the rows."""
        with self._reading() as db:
            rows = db.execute(f"SELECT * FROM runs WHERE {where} ORDER BY id", params).fetchall()
        out, damaged = [], []
        for r in rows:
            try:
                out.append(_record(dict(r)))
            except (ValueError, TypeError, RecursionError):
                damaged.append(str(r["id"]))
        if damaged:
            warnings.warn(f"the results store {self.path} has {len(damaged)} damaged row(s) (id {', '.join(damaged[:5])}"
                          f"{', ...' if len(damaged) > 5 else ''}), left out -- rerun those cells with --force",
                          stacklevel=2)
        return out


TEXT_COLUMNS = ("config_hash", "backbone", "weights", "task", "dataset", "split")


def _record(row: dict) -> dict:
    """A stored row as ssl-bench wrote it, or ValueError: text names, whole K and seed, numbers or NULL for the
    headline metrics, JSON mappings in the JSON columns."""
    if not all(isinstance(row[c], str) for c in TEXT_COLUMNS) or not all(type(row[c]) is int for c in ("k", "seed")):
        raise ValueError("names, K or seed of another type")
    if not all(row[c] is None or type(row[c]) in (int, float) for c in ("miou", "acc", "f1")):
        raise ValueError("metrics of another type")
    for col in JSON_COLUMNS:
        row[col] = json.loads(row[col]) if isinstance(row[col], str) else None
        if not isinstance(row[col], dict):
            raise ValueError(f"{col} is not a JSON mapping")
    if any(row["config"].get(c) != row[c] for c in ("backbone", "task", "dataset", "split", "k", "seed")):
        raise ValueError("its configuration says another cell")  # the columns are copies of it
    if not all(isinstance(m, dict) for m in row["metrics"].values()):
        raise ValueError("metrics of another shape")
    row["random_weights"] = bool(row["random_weights"])
    return row
