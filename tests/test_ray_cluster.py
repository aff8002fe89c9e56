"""Sweeps on simulated multi-node Ray clusters (``ray.cluster_utils.Cluster``: every node a raylet of
its own on this machine, one or two CPUs each): the local numbers on several nodes, a node lost
mid-sweep, a driver killed with -9, nodes with and without GPUs, a node that does not see the cache,
and the bound on tasks in flight. Every cluster is shut down in a ``finally``, failure or not.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from ssl_bench import report  # noqa: E402
from ssl_bench.executors import run_local  # noqa: E402
from ssl_bench.features import FeatureCache  # noqa: E402
from ssl_bench.integrity import read_checked_json  # noqa: E402
from ssl_bench.ray_executor import local_runtime_env, run_ray  # noqa: E402
from ssl_bench.runner import Runner  # noqa: E402
from ssl_bench.store import ResultStore  # noqa: E402
from ssl_bench.sweep import grid_from_mapping, make_plan  # noqa: E402
from test_sweep import stored_rows  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SLOW_IMAGES = 40  # dino-vits16 extraction of 40 images: several seconds, so a node can be lost in the middle
# Two cache entries: a quick one (reference) whose cells run while the slow one (dino-vits16) extracts.
GRID = {"backbones": ["reference", {"name": "dino-vits16", "weights": "random"}], "tasks": ["kmeans"],
        "datasets": [{"name": "synthetic", "options": {"n": SLOW_IMAGES}}], "k": ["C", "2C"], "seeds": [0, 1, 2],
        "protocol": {"resize": 224}}
CELLS = 12


def leaderboard(store: Path) -> str:
    """As printed (the CSV's unrounded means differ in the last digit with the order rows were stored)."""
    return report.to_markdown(report.leaderboard(ResultStore(store).query()))


def runner_at(folder: Path) -> Runner:
    return Runner(ResultStore(folder / "results.sqlite"), FeatureCache(folder / "cache"), "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def simulated_cluster(*workers: dict, head_cpus: int = 0, dashboard: bool = False):
    """A head node (``head_cpus`` CPUs) and one worker node per mapping of ``Cluster.add_node`` arguments,
    stopped on the way out whatever happened. Its raylets pass this checkout on to their workers."""
    from ray.cluster_utils import Cluster

    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [before])])
    head = {"num_cpus": head_cpus, "include_dashboard": dashboard}
    if dashboard:  # the state API (which task ran where, holding what) lives there
        head["dashboard_port"] = free_port()
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        yield cluster, [cluster.add_node(**worker) for worker in workers]
    finally:
        cluster.shutdown()
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


@contextmanager
def driver_of(cluster):
    """This process as the driver of ``cluster`` (a Ray job of its own)."""
    ray.init(address=cluster.address, log_to_driver=False, runtime_env=local_runtime_env())
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """GRID run by the local executor, uninterrupted: the store every cluster run must equal."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    runner = runner_at(folder)
    assert run_local(make_plan(grid_from_mapping(GRID), runner), runner).computed == CELLS
    return folder / "results.sqlite"


@pytest.fixture(scope="class")
def three_nodes():
    """Three nodes of one CPU (the head and two workers), shared by the tests of a class."""
    with simulated_cluster({"num_cpus": 1}, {"num_cpus": 1}, head_cpus=1) as (cluster, _):
        yield cluster


def complete_entries(cache: Path) -> None:
    """Every cache entry whole: each kind's committed progress covers every image, labels are published,
    and no temporary file is left (a killed writer's would be)."""
    entries = [meta.parent for meta in cache.rglob("meta.json")]
    assert len(entries) == 2
    for entry in entries:
        images = len(read_checked_json(entry / "meta.json")["ids"])
        assert read_checked_json(entry / "patch.progress.json")["done"] == images == SLOW_IMAGES
    assert list((cache / "_labels").rglob("labels.json"))
    assert not [p.name for p in cache.rglob("*") if ".tmp" in p.name]


def lock_holders(path: Path) -> set[int]:
    """Processes holding an flock on ``path`` (Linux: /proc/locks; waiters are lines with '->')."""
    stat = path.stat()
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "FLOCK" and fields[5] == device:
            holders.add(int(fields[4]))
    return holders


def parent_of(pid: int) -> int | None:
    try:  # the fields after the command name, which is in parentheses and may hold spaces
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def children_of(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and parent_of(int(p.name)) == pid]


def title_of(pid: int) -> str:
    """A Ray worker's process title: ray::IDLE, or ray::NAME while it runs a task (extract, cell TASK)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().strip()
    except OSError:
        return ""


def slow_entry(cache: Path) -> Path | None:
    found = [meta.parent for meta in cache.glob("dino-vits16/*/*/meta.json")]
    return found[0] if found else None


def committed(entry: Path | None) -> int:
    try:
        return read_checked_json(entry / "patch.progress.json")["done"]
    except (OSError, TypeError, AttributeError):
        return 0


CHEAP = {"backbones": ["reference"], "tasks": ["kmeans"], "datasets": [{"name": "synthetic", "options": {"n": 2, "size": 32}}],
         "k": [2, 3, 4, 5, 6, 7], "seeds": list(range(10)), "protocol": {"resize": 32}}  # 60 cells of a few ms


def sweep_command(grid_file: Path, folder: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "ssl_bench", "sweep", str(grid_file), "--executor", "ray", "--address", address,
            "--cpus-per-task", "1", "--device", "cpu", "--store", str(folder / "results.sqlite"),
            "--cache", str(folder / "cache")]


class TestThreeNodes:
    """One cluster of three one-CPU nodes for these tests (started once: about 15 s on a small machine)."""

    # ---- 1. several nodes, the local numbers ----
    def test_a_sweep_on_three_nodes_gives_the_local_numbers(self, three_nodes, uninterrupted, tmp_path):
        runner = runner_at(tmp_path)
        with driver_of(three_nodes):
            summary = run_ray(make_plan(grid_from_mapping(GRID), runner), runner, device="cpu", cpus_per_task=1)
        assert (summary.computed, summary.extractions, summary.failed) == (CELLS, 2, [])
        assert stored_rows(tmp_path / "results.sqlite") == stored_rows(uninterrupted)  # same hashes, same numbers
        complete_entries(tmp_path / "cache")

    # ---- 4. large grids: a bounded number of tasks in flight, overall progress ----
    @pytest.mark.parametrize("max_in_flight, bound", [(None, 6), (2, 2)])  # default: twice the 3 nodes' slots
    def test_a_large_grid_keeps_a_bounded_number_of_tasks_in_flight(self, three_nodes, tmp_path, monkeypatch,
                                                                     max_in_flight, bound):
        in_flight, bars = [], []
        real_wait = ray.wait

        def wait(refs, **kwargs):  # every task not finished is in the list the driver waits on
            in_flight.append(len(refs))
            return real_wait(refs, **kwargs)

        def progress(iterable, desc="", total=None):
            bars.append([desc, total, 0])
            for item in iterable:
                bars[-1][2] += 1
                yield item

        monkeypatch.setattr(ray, "wait", wait)
        runner = runner_at(tmp_path)
        plan = make_plan(grid_from_mapping(CHEAP), runner)
        with driver_of(three_nodes):
            summary = run_ray(plan, runner, device="cpu", cpus_per_task=1, max_in_flight=max_in_flight,
                              progress=progress)
        assert (summary.computed, summary.failed) == (60, []) and len(stored_rows(tmp_path / "results.sqlite")) == 60
        assert max(in_flight) == bound  # filled up to the bound, never past it
        assert bars == [["cells", 60, 60]]  # one overall count: every cell finished once

    def test_cells_another_sweep_stored_meanwhile_are_not_computed_again(self, three_nodes, tmp_path):
        runner = runner_at(tmp_path)
        grid = grid_from_mapping({**CHEAP, "k": [2], "seeds": [0, 1]})
        plan = make_plan(grid, runner)
        run_local(make_plan(grid, runner), runner)  # the other sweep, after this one made its plan
        with driver_of(three_nodes):
            summary = run_ray(plan, runner, device="cpu", cpus_per_task=1)
        assert (summary.computed, summary.already_stored, summary.failed) == (0, 2, [])

    # ---- 2b. a driver killed with -9 ----
    def test_a_driver_killed_mid_sweep_resumes_like_the_local_executor(self, three_nodes, uninterrupted, tmp_path):
        grid_file = tmp_path / "grid.yaml"
        grid_file.write_text(yaml.safe_dump(GRID))
        command = sweep_command(grid_file, tmp_path, three_nodes.address)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and driver.poll() is None and not (
                    stored_rows(tmp_path / "results.sqlite")
                    and 0 < committed(slow_entry(tmp_path / "cache")) <= SLOW_IMAGES - 16):
                time.sleep(0.05)  # some cells stored, the slow extraction at least two batches from its end
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
        before = stored_rows(tmp_path / "results.sqlite")
        entry = slow_entry(tmp_path / "cache")
        assert before and 0 < committed(entry) < SLOW_IMAGES, "the driver must die mid-way for this test to mean anything"
        deadline = time.time() + 10
        while lock_holders(entry / ".lock") and time.time() < deadline:  # Ray stops the dead driver's workers
            time.sleep(0.1)
        assert not lock_holders(entry / ".lock"), "a worker of the killed driver still holds the extraction's lock"
        done = committed(entry)

        again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr
        assert f"{len(before)} already stored, {CELLS - len(before)} to compute" in again.stdout
        assert f"[resumes after {done} of {SLOW_IMAGES} images]" in again.stdout  # committed batches were kept
        assert f"computed {CELLS - len(before)} cells" in again.stdout  # (no progress bars into a pipe)
        after = stored_rows(tmp_path / "results.sqlite")
        assert set(before) <= set(after) and after == stored_rows(uninterrupted)
        complete_entries(tmp_path / "cache")


# ---- 2. a node lost mid-sweep -------------------------------------------------------------------------

def test_a_node_lost_mid_sweep_changes_nothing_in_the_results(uninterrupted, tmp_path):
    from ray.util.state import list_tasks  # which tasks ran again, after the fact

    runner = runner_at(tmp_path)
    plan = make_plan(grid_from_mapping(GRID), runner)
    lost: dict = {}
    finished, seen = threading.Event(), set()

    def lock_of_slow_entry() -> set[int]:
        entry = slow_entry(tmp_path / "cache")
        return lock_holders(entry / ".lock") if entry and (entry / ".lock").exists() else set()

    def lose_a_node(cluster, nodes):
        """Remove (SIGKILL, as a preempted machine) the node whose worker holds the slow extraction's lock
        while another of its workers runs a cell. Read from /proc: Ray's task states lag by a second."""
        raylets = {node.all_processes["raylet"][0].process.pid: node for node in nodes}
        while not finished.is_set() and "node" not in lost:
            for holder in lock_of_slow_entry():
                raylet = parent_of(holder)
                titles = [title_of(pid) for pid in children_of(raylet)] if raylet in raylets else []
                seen.add((holder, raylet, tuple(sorted(titles))))
                if "ray::cell kmeans" in titles:  # another worker of that node runs a cell
                    lost.update(node=raylets[raylet], holders={holder}, committed=committed(slow_entry(tmp_path / "cache")))
                    cluster.remove_node(raylets[raylet], allow_graceful=False)
                    break
            time.sleep(0.05)
        started = time.time()
        while lost.get("holders", set()) & lock_of_slow_entry() and time.time() - started < 30:
            time.sleep(0.1)
        lost["released_s"] = time.time() - started

    with simulated_cluster({"num_cpus": 2}, {"num_cpus": 2}, dashboard=True) as (cluster, nodes), driver_of(cluster):
        chaos = threading.Thread(target=lose_a_node, args=(cluster, nodes))
        chaos.start()
        try:
            summary = run_ray(plan, runner, device="cpu", cpus_per_task=1)
        finally:
            finished.set()
            chaos.join()
        tasks = list_tasks(detail=True, timeout=30, limit=10_000)

    assert "node" in lost, f"no moment with an extraction and a cell on one node, the test proved nothing: {seen}"
    assert lost["committed"] < SLOW_IMAGES  # the lost extraction was unfinished, and held its lock
    assert lost["released_s"] < 10, "the dead extraction's lock was not released"
    retried = {t.name for t in tasks if t.attempt_number > 0}
    assert retried == {"extract", "cell kmeans"}, f"tasks run again after the node loss: {retried}"
    assert (summary.computed, summary.failed, summary.already_stored) == (CELLS, [], 0)
    rows = stored_rows(tmp_path / "results.sqlite")
    assert rows == stored_rows(uninterrupted) and len({r[0] for r in rows}) == CELLS  # once each, same numbers
    assert leaderboard(tmp_path / "results.sqlite") == leaderboard(uninterrupted)
    complete_entries(tmp_path / "cache")


# ---- 3. nodes that differ ------------------------------------------------------------------------------

MIXED = {"backbones": ["reference"], "datasets": [{"name": "synthetic", "options": {"n": 3, "size": 64}}],
         "tasks": ["kmeans", {"name": "primaps-em", "params": {"epochs": 1, "pretrain_epochs": 1, "batch_size": 4,
                                                                "crf": False, "proposal_crf": False}}],
         "seeds": [0, 1], "protocol": {"resize": 64}}  # primaps-em runs the backbone (gpu: true); kmeans does not


def test_only_model_tasks_hold_a_gpu_and_only_where_there_is_one(tmp_path):
    from ray.util.state import list_tasks

    runner = runner_at(tmp_path)
    plan = make_plan(grid_from_mapping(MIXED), runner)
    # the GPU is declared, not real: Ray schedules by it, torch finds no CUDA and computes on the CPU
    with simulated_cluster({"num_cpus": 1, "num_gpus": 1}, {"num_cpus": 1}, dashboard=True) as (cluster, nodes), \
            driver_of(cluster):
        summary = run_ray(plan, runner, cpus_per_task=1)
        tasks = list_tasks(detail=True, timeout=30, limit=10_000)
    assert (summary.computed, summary.failed) == (4, [])
    held = [(t.name, t.required_resources.get("GPU", 0), t.node_id) for t in tasks]
    model_tasks = [(gpus, node) for name, gpus, node in held if name in ("extract", "cell primaps-em")]
    cpu_cells = [gpus for name, gpus, _ in held if name == "cell kmeans"]
    assert len(model_tasks) == 3 and len(cpu_cells) == 2, held
    assert model_tasks == [(1, nodes[0].node_id)] * 3, held  # on the GPU node, holding its GPU
    assert cpu_cells == [0, 0], held  # never holding a GPU


def test_a_node_that_does_not_see_the_cache_fails_its_tasks_in_one_line(tmp_path):
    """The node runs in a mount namespace of its own where the test's folder is an empty tmpfs: like a
    machine without the shared file system mounted."""
    from ray.cluster_utils import Cluster

    if subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True).returncode:
        pytest.skip("no mount namespaces here (unshare --mount --map-root-user)")
    runner = runner_at(tmp_path)
    plan = make_plan(grid_from_mapping(CHEAP | {"k": [2], "seeds": [0, 1]}), runner)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    blind = None
    try:
        blind = subprocess.Popen(
            ["unshare", "--mount", "--map-root-user", "--propagation", "private", "sh", "-c",
             f"mount -t tmpfs none {tmp_path} && exec {sys.executable} -m ray.scripts.scripts start "
             f"--address={cluster.address} --num-cpus=1 --block"],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=local_runtime_env())
        deadline = time.time() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert blind.poll() is None and time.time() < deadline, "the blind node did not start"
            time.sleep(0.2)
        outcome = {}
        sweep = threading.Thread(target=lambda: outcome.update(summary=run_ray(plan, runner, cpus_per_task=1)))
        sweep.start()
        sweep.join(timeout=180)
        assert not sweep.is_alive(), "the sweep hangs on a node that does not see the cache"
    finally:
        ray.shutdown()
        if blind is not None:
            os.killpg(blind.pid, signal.SIGTERM)
            try:
                blind.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(blind.pid, signal.SIGKILL)
        cluster.shutdown()
    summary = outcome["summary"]
    assert summary.computed == 0 and len(summary.failed) == 2
    for _, reason in summary.failed:  # the extraction failed on that node, so both its cells
        assert "\n" not in reason and f"does not see the feature cache {(tmp_path / 'cache').resolve()}" in reason
        assert "Ray node" in reason and "-- mount the shared cache at that path on every node" in reason
