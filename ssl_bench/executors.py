"""Executors of a sweep plan: ``local`` (in this process, here) and ``ray`` (tasks on a Ray cluster,
``ray_executor.py``).

Both extract each needed feature-cache entry once, with the union of kinds its cells read, before the
cells that read it, and both store results through the driver's ``ResultStore`` only: Ray workers
return records and never open the SQLite file (SQLite over a network file system is unsafe). The
feature cache must be on storage every worker sees (a shared file system on a real cluster).
"""

from __future__ import annotations

import logging
import traceback
from collections import deque
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError
from .runner import Computed, Runner
from .store import file_lock
from .sweep import Cell, CellCallback, Plan, SweepSummary, one_line

EXECUTORS = ("local", "ray")
log = logging.getLogger("ssl_bench")


def _stored_meanwhile(runner: Runner, cell: Cell, summary: SweepSummary, on_cell: CellCallback) -> bool:
    """True (and counted) when another sweep on this store got there first (and, with --save-predictions, wrote
    the cell's prediction files)."""
    if not runner.store.has(cell.run.config_hash) or runner.predictions_missing(cell.run):
        return False
    summary.already_stored += 1
    on_cell(cell, "stored meanwhile")
    return True


def _store_record(runner: Runner, cell: Cell, computed: Computed, summary: SweepSummary,
                  on_cell: CellCallback) -> None:
    if computed.predictions is None and _stored_meanwhile(runner, cell, summary, on_cell):
        return
    try:
        runner.persist(computed)  # INSERT OR IGNORE on a UNIQUE hash: a racing duplicate is dropped
    except UserError as err:  # a full disk or a read-only store: this cell fails, the sweep goes on
        _fail(cell, err, summary, on_cell)
        return
    summary.computed += 1
    on_cell(cell, "computed")


def _fail(cell: Cell, err: BaseException, summary: SweepSummary, on_cell: CellCallback) -> None:
    log.debug("%s failed:\n%s", cell.label, "".join(traceback.format_exception(err)).rstrip())  # -v, --log-file
    summary.failed.append((cell.label, one_line(err)))
    on_cell(cell, f"failed: {one_line(err)}")


def run_local(plan: Plan, runner: Runner, progress: Callable = lambda it, **_: it,
              on_cell: CellCallback = lambda cell, status: None) -> SweepSummary:
    """Extractions first (each once, all kinds), then the cells in grid order. A failure (bad data in one
    dataset, a bad parameter in one cell) fails the cells it concerns and the sweep goes on, as on Ray;
    the failures are listed at the end."""
    summary = SweepSummary()
    broken: dict[str, BaseException] = {}  # cell hash -> why its extraction failed
    for entry in plan.extractions_needed:
        if not runner.cache.missing_kinds(entry.key, entry.kinds, len(entry.run.dataset)):
            continue  # another sweep on this cache filled it since the plan was made: not ours to count
        try:
            runner.features(entry.run, entry.run.dataset, entry.kinds, progress)
        except Exception as err:  # noqa: BLE001 -- its cells fail; other datasets and backbones go on
            broken.update((cell.run.config_hash, err) for cell in entry.cells)
            continue
        summary.extractions += 1
    pending, deferred = deque(plan.todo), set()
    while pending:
        cell = pending.popleft()
        if cell.run.config_hash in broken:
            _fail(cell, broken[cell.run.config_hash], summary, on_cell)
            continue
        if _stored_meanwhile(runner, cell, summary, on_cell):
            continue
        with _claim(runner, cell.run.config_hash, wait=cell.run.config_hash in deferred) as ours:
            if not ours:  # another sweep on this store is computing it: do the others first, then come back
                deferred.add(cell.run.config_hash)
                pending.append(cell)
                continue
            if _stored_meanwhile(runner, cell, summary, on_cell):
                continue
            try:
                computed = runner.compute(cell.run, progress)
            except Exception as err:  # noqa: BLE001 -- one broken cell must not stop a long sweep
                _fail(cell, err, summary, on_cell)
                continue
            _store_record(runner, cell, computed, summary, on_cell)
    return summary


CLAIM_STRIPES = 64  # lock files per store: cells share them, so a store keeps 64 files, not one per cell


@contextmanager
def _claim(runner: Runner, config_hash: str, wait: bool) -> Iterator[bool]:
    """Whether this process may compute a cell now: an flock beside the store, so two sweeps on one store
    do not compute the same cell at once (the second would only throw its copy away). Without ``wait``
    a held claim yields False at once; a folder that cannot hold the lock files yields True (no claim)."""
    folder = Path(runner.store.path).parent / ".claims"
    with ExitStack() as held:
        try:
            folder.mkdir(exist_ok=True)
            ours = held.enter_context(file_lock(folder / f"{int(config_hash[:8], 16) % CLAIM_STRIPES}.lock", wait))
        except OSError:
            ours = True
        yield ours
