"""Executors of a sweep plan: ``local`` (in this process) and ``ray`` (tasks on a Ray cluster).

Both extract each needed feature-cache entry once, with the union of kinds its cells read, before the
cells that read it, and both store results through the driver's ``ResultStore`` only: Ray workers
return records and never open the SQLite file (SQLite over a network file system is unsafe). The
feature cache must be on storage every worker sees (a shared file system on a real cluster).
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError
from .features import FeatureCache
from .ops import set_threads
from .runner import Computed, RunConfig, Runner
from .store import file_lock
from .sweep import Cell, CellCallback, Plan, SweepSummary, one_line

EXECUTORS = ("local", "ray")


def _stored_meanwhile(runner: Runner, cell: Cell, summary: SweepSummary, on_cell: CellCallback) -> bool:
    """True (and counted) when another sweep on this store got there first."""
    if not runner.store.has(cell.run.config_hash):
        return False
    summary.already_stored += 1
    on_cell(cell, "stored meanwhile")
    return True


def _store_record(runner: Runner, cell: Cell, computed: Computed, summary: SweepSummary,
                  on_cell: CellCallback) -> None:
    if _stored_meanwhile(runner, cell, summary, on_cell):
        return
    try:
        runner.persist(computed)  # INSERT OR IGNORE on a UNIQUE hash: a racing duplicate is dropped
    except UserError as err:  # a full disk or a read-only store: this cell fails, the sweep goes on
        _fail(cell, err, summary, on_cell)
        return
    summary.computed += 1
    on_cell(cell, "computed")


def _fail(cell: Cell, err: BaseException, summary: SweepSummary, on_cell: CellCallback) -> None:
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


# ---- Ray ----------------------------------------------------------------------------------------------

def _extract_task(config: RunConfig, kinds: list[str], cache_root: str, device: str | None, threads: int) -> str:
    """Ray task: fill one feature-cache entry; returns its folder (the cells' dependency)."""
    set_threads(threads)  # as the driver's: a cell gives the local executor's numbers to the last digit
    runner = Runner(None, FeatureCache(cache_root), device)
    run = runner.resolve(config)
    runner.features(run, run.dataset, kinds, lambda it, **_: it)
    return str(cache_root)


def _cell_task(config: RunConfig, cache_root: str, device: str | None, threads: int,
               _extracted: str | None) -> Computed:
    """Ray task: compute one cell from the cache and return it (the driver stores it)."""
    set_threads(threads)  # as the driver's: a cell gives the local executor's numbers to the last digit
    runner = Runner(None, FeatureCache(cache_root), device)
    return runner.compute(runner.resolve(config))


def _largest_node_cpus(ray) -> int:
    return int(max((node["Resources"].get("CPU", 1) for node in ray.nodes() if node.get("Alive")), default=1))


def _threads_per_task(ray, asked: int | None, local: bool = True) -> int:
    """CPUs (and torch/OpenMP/BLAS/numba threads) per task: as asked, else this process's torch threads, capped by the
    largest node. Asking more than a node has would make Ray wait forever without a word: refused on the
    local instance started here, a warning on a cluster (an autoscaler may yet add a bigger node)."""
    import torch

    largest = _largest_node_cpus(ray)
    if asked is not None and asked > largest:
        message = (f"--cpus-per-task {asked}: the largest Ray node has {largest} CPUs, so no task could "
                   f"ever start")
        if local:
            raise UserError(f"{message} -- use --cpus-per-task {largest} or less")
        warnings.warn(f"{message} unless the cluster adds a node that large", stacklevel=2)
    return asked or max(1, min(torch.get_num_threads(), largest))


def local_runtime_env() -> dict:
    """Workers of a Ray instance started here import this very checkout (not another installed copy)."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    paths = [package_parent, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}


def _check_reachable(address: str) -> None:
    """A wrong --address fails in seconds: Ray itself retries an unreachable head for many minutes."""
    import socket

    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms: Ray's own resolution
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        raise UserError(f"cannot reach the Ray cluster at {address} ({err}) -- check --address "
                        f"(e.g. ray://head:10001) or start one with `ray start --head`") from None


def _gpus_per_task(device: str | None, cluster: dict) -> int:
    """A GPU per task where the cluster has them, unless the sweep asked for the CPU: reserving a GPU there
    would only cap how many tasks run at once."""
    return 1 if cluster.get("GPU", 0) >= 1 and device != "cpu" else 0


def run_ray(plan: Plan, runner: Runner, address: str | None = None, device: str | None = None,
            on_cell: CellCallback = lambda cell, status: None, cpus_per_task: int | None = None) -> SweepSummary:
    """Extractions and cells as Ray tasks; a cell takes its extraction's ObjectRef as an argument, so Ray
    starts it only once that entry is filled. Uses a running Ray instance if this process has one.
    Each task gets ``cpus_per_task`` CPUs and as many torch/OpenMP/BLAS/numba threads (default: this
    process's torch thread count, capped by the largest node), so results equal the local executor's."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray -- pip install 'ssl-bench[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            _check_reachable(address)
        try:
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, log_to_driver=False,
                         runtime_env=local_runtime_env())
        except ConnectionError as err:
            raise UserError(f"cannot reach the Ray cluster at {address} ({one_line(err)}) -- "
                            f"check --address (e.g. ray://head:10001) or start one with `ray start --head`") from None
    try:
        gpus = _gpus_per_task(device, ray.cluster_resources())
        threads = _threads_per_task(ray, cpus_per_task, local=started_here and not address)
        extract = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=2)(_extract_task)
        compute = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=2)(_cell_task)
        cache_root = str(runner.cache.root.resolve())  # workers may run elsewhere: no relative paths
        summary = SweepSummary()
        extracted = {entry.key: extract.remote(entry.config, entry.kinds, cache_root, device, threads)
                     for entry in plan.extractions_needed}
        dependency = {cell.run.config_hash: extracted[entry.key]
                      for entry in plan.extractions_needed for cell in entry.cells}
        pending = {compute.remote(cell.config, cache_root, device, threads, dependency.get(cell.run.config_hash)): cell
                   for cell in plan.todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                computed = ray.get(ready[0])
            except Exception as err:
                _fail(cell, getattr(err, "cause", None) or err, summary, on_cell)
                continue
            _store_record(runner, cell, computed, summary, on_cell)
        for ref in extracted.values():  # all finished by now (their cells did)
            try:
                ray.get(ref)
                summary.extractions += 1
            except Exception:
                pass  # its cells were reported as failed
        return summary
    finally:
        if started_here:
            ray.shutdown()

