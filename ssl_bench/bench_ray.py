"""``ssl-bench bench ray-sweep``: sweeps on simulated Ray clusters (``ray.cluster_utils.Cluster``: one
raylet per node, all on this machine, one CPU each).

Two measurements. (1) The same sweep (24 k-means cells by default: two backbones x K in {C, 2C, 3C} x
four seeds, two extractions) on 1, 2 and 3 nodes: wall time, and the slot-seconds per cell spent
outside any task, ``(nodes x wall - seconds inside tasks) / cells`` (the workers time their tasks),
which is the scheduling overhead on one node and that plus waiting on extractions on more. Each
cluster runs the sweep twice into fresh stores and caches: ``cold`` includes starting a worker
process on each node (imports), ``warm`` reuses them. The local executor's time for the same sweep
is the reference (one thread, as each task). (2) The driver's memory over grids of a quarter of
``grid_cells`` and of ``grid_cells`` cheap cells (two synthetic 32 x 32 images, so the cells cost
little beside their scheduling) on two nodes: resident-set growth (peak minus before) and the Python
heap's peak, with the default bound on tasks in flight and, for comparison, with every cell submitted
at once. Each is measured in a fresh driver process (so no run inherits another's memory) after a
one-seed warm-up that starts the workers; the plan is made before measuring. Nodes beyond the
machine's cores share them: read the wall times with ``cores`` and the load averages in the file.
"""

from __future__ import annotations

import os
import re
import resource
import tempfile
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import torch

from .executors import run_local
from .features import FeatureCache
from .ops import set_threads
from .runner import Runner
from .store import ResultStore
from .sweep import grid_from_mapping, make_plan


def _runner(folder: Path) -> Runner:
    return Runner(ResultStore(folder / "results.sqlite"), FeatureCache(folder / "cache"), "cpu")


@contextmanager
def _cluster(nodes: int, driver: bool = True):
    """A head without CPUs (it schedules only) and ``nodes`` one-CPU nodes; this process its driver unless
    ``driver`` is false. Yields the cluster's address."""
    import ray
    from ray.cluster_utils import Cluster

    from .ray_executor import local_runtime_env

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1)
        if not driver:
            yield cluster.address
            return
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=local_runtime_env())
        try:
            yield cluster.address
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


def _status_bytes(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _driver_memory(run: Callable[[], object]) -> dict:
    """Resident set before, its peak during ``run`` (Linux: VmHWM, reset first), and the Python heap's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM) to the current one
        peak_source = "VmHWM"
    except OSError:
        peak_source = "ru_maxrss (peak of the whole process, not of this run)"
    before = _status_bytes("VmRSS")
    tracemalloc.start()
    started = time.perf_counter()
    run()
    wall = time.perf_counter() - started
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = _status_bytes("VmHWM") if peak_source == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mib = 2**20
    return {"wall_s": wall, "rss_before_mib": before / mib if before else None, "rss_peak_mib": peak / mib,
            "rss_growth_mib": (peak - before) / mib if before else None, "python_heap_peak_mib": heap_peak / mib,
            "peak_from": peak_source}


def _sweep_on_ray(grid: dict, folder: Path, **options) -> dict:
    from .ray_executor import run_ray

    runner = _runner(folder)
    plan = make_plan(grid_from_mapping(grid), runner)
    started = time.perf_counter()
    summary = run_ray(plan, runner, device="cpu", cpus_per_task=1, **options)
    wall = time.perf_counter() - started
    if summary.failed:  # a benchmark of failures would measure nothing
        raise RuntimeError(f"the benchmark sweep failed: {summary.failed[0]}")
    return {"cells": summary.computed, "extractions": summary.extractions, "wall_s": wall,
            "task_seconds": summary.task_seconds}


def _measured_driver(address: str, grid: dict, bound: int | None, folder: str) -> dict:
    """In a fresh process: a driver of the cluster at ``address`` runs one seed of ``grid`` (its workers
    start), then the whole grid, measured (the plan is made before: it is not the executor's)."""
    import ray

    from .ray_executor import local_runtime_env, run_ray

    ray.init(address=address, log_to_driver=False, runtime_env=local_runtime_env())
    try:
        _sweep_on_ray({**grid, "seeds": [0]}, Path(folder) / "warm-up")
        runner = _runner(Path(folder) / "measured")
        plan = make_plan(grid_from_mapping(grid), runner)

        def run():
            summary = run_ray(plan, runner, device="cpu", cpus_per_task=1, max_in_flight=bound)
            if summary.failed:
                raise RuntimeError(f"the benchmark grid failed: {summary.failed[0]}")

        return {"cells": len(plan.todo), **_driver_memory(run)}
    finally:
        ray.shutdown()


def ray_sweep(node_counts: tuple[int, ...] = (1, 2, 3), backbones: str = "reference,reference-p16",
              images: int = 12, seeds: int = 4, grid_cells: int = 2000) -> dict:
    """Ray sweeps on simulated clusters: one sweep on 1, 2 and 3 nodes (wall, scheduling overhead per cell),
    and the driver's peak memory over a grid of 2,000 cheap cells (tasks in flight bounded, and not)."""
    sweep = {"backbones": backbones.split(","), "tasks": ["kmeans"],
             "datasets": [{"name": "synthetic", "options": {"n": images}}], "k": ["C", "2C", "3C"],
             "seeds": list(range(seeds))}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        threads = torch.get_num_threads()
        set_threads(1)  # as each Ray task (--cpus-per-task 1)
        try:
            for phase in ("warm-up", "measured"):  # the first pays this process's imports and compilations
                local = _runner(Path(tmp) / f"local-{phase}")
                plan = make_plan(grid_from_mapping(sweep), local)
                started = time.perf_counter()
                cells = run_local(plan, local).computed
                local_wall = time.perf_counter() - started
        finally:
            set_threads(threads)
        for nodes in node_counts:
            with _cluster(nodes):
                for phase in ("cold", "warm"):
                    run = _sweep_on_ray(sweep, Path(tmp) / f"{nodes}-{phase}")
                    idle = nodes * run["wall_s"] - run["task_seconds"]
                    rows.append({"nodes": nodes, "phase": phase, **run, "idle_slot_s_per_cell": idle / run["cells"],
                                 "load_1min": os.getloadavg()[0]})
    memory = []
    with tempfile.TemporaryDirectory() as tmp, _cluster(2, driver=False) as address:
        for size in sorted({max(1, grid_cells // 4), grid_cells}):  # the driver's memory should not grow with it
            ks = max(1, size // 100)
            cheap = {"backbones": ["reference"], "tasks": ["kmeans"], "protocol": {"resize": 32},
                     "datasets": [{"name": "synthetic", "options": {"n": 2, "size": 32}}],
                     "k": list(range(2, 2 + ks)), "seeds": list(range(-(-size // ks)))}
            for bound, label in ((None, "default (twice the task slots)"), (10**9, "none: every cell at once")):
                folder = str(Path(tmp) / f"{size}-{label.split(' ')[0]}")
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as fresh:  # no earlier run's memory
                    row = fresh.submit(_measured_driver, address, cheap, bound, folder).result()
                memory.append({"in_flight_bound": label, **row, "load_1min": os.getloadavg()[0]})
    described = {**cheap, "k": "2, 3, ... (a hundredth of the cells)", "seeds": "0, 1, ... (the rest)"}
    return {"sweep": {"grid": sweep, "cells": cells, "threads_per_task": 1, "local_executor_wall_s": local_wall,
                      "rows": rows},
            "large_grids": {"grid": described, "nodes": 2, "rows": memory},
            "cores": os.cpu_count(), "load_average_at_end": list(os.getloadavg())}
