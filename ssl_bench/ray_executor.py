"""The ``ray`` executor: a sweep plan as Ray tasks, on a cluster or on a Ray instance started here.

Only the driver writes the results store (workers return their records: SQLite over a network file
system is unsafe); the feature cache must be on a file system every node mounts at the same path.
What a cluster adds to a sweep, and how each is met:

- **A node is lost** (a preempted machine). A task whose node or worker dies runs again elsewhere
  (Ray's retries, ``NODE_LOSS_RETRIES``); its cell is stored once, by the driver, under a UNIQUE hash.
  An extraction killed mid-way leaves the batches it committed and no lock: its flock goes with its
  process (the workers of a raylet that dies exit within a second, measured on a simulated cluster),
  and the retry resumes after the last committed batch. On NFS a dead client's lock is released by
  the server only when the client's lease expires (NFSv4: 90 s by default), so there a retry may wait
  that long first. A driver killed with -9 ends its Ray job, whose workers Ray stops at once; started
  again, the sweep computes what is not stored, as the local executor does.
- **Nodes differ.** Extractions, and the cells of tasks whose registry file says ``gpu: true``, ask
  for one GPU where the cluster has any (so they run on GPU nodes); the other cells ask for none and
  compute with ``device="cpu"`` (Ray leaves all CUDA devices visible to a task that holds none, so a
  k-means cell on a GPU node would otherwise use a GPU another task holds).
- **Every node must see the cache.** The driver keeps an identity file in the cache folder; a task
  first checks that its node reads the same file at the same path, else it fails with one line naming
  the node and the path (a node without the mount would fill a local folder of its own, unseen by the
  other nodes, whose cells would then extract everything again).
- **A grid is large.** At most ``max_in_flight`` tasks are submitted at a time (default: twice the
  task slots of the live nodes, re-read as nodes join or leave); a cell is submitted once its
  extraction is done, so no submitted cell waits on another task; each result is stored and dropped
  as it arrives. ``progress`` draws the overall count (cells finished of the cells to compute).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
import warnings
from collections import defaultdict, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError
from .executors import _fail, _store_record, _stored_meanwhile
from .features import FeatureCache
from .ops import set_threads
from .runner import Computed, RunConfig, Runner
from .sweep import Cell, CellCallback, Extraction, Plan, SweepSummary, one_line

NODE_LOSS_RETRIES = 3  # runs of a task after its node or worker died (an error of the task itself is not retried)
CACHE_ID_FILE = ".ssl-bench-cache-id"
RECHECK_S = 5.0  # how often the driver re-reads the live nodes (the in-flight bound follows them)


# ---- in the workers -----------------------------------------------------------------------------------

def node_name() -> str:
    """This Ray node as a user finds it: host name, IP address and the start of Ray's node id."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()[:8]
    return f"{socket.gethostname()} ({ray.util.get_node_ip_address()}, Ray node {node_id})"


def check_sees_cache(cache_root: str, identity: str | None, node: str) -> None:
    """One line naming the node and the path when this node does not read the driver's cache folder."""
    if identity is None:  # the driver could not mark its cache (read-only): nothing to compare with
        return
    try:
        found = (Path(cache_root) / CACHE_ID_FILE).read_text().strip()
    except OSError:
        found = None
    if found != identity:
        what = "does not see the feature cache" if found is None else "sees another folder than the driver at"
        raise UserError(f"node {node} {what} {cache_root} -- mount the shared cache at that path on every node "
                        f"(or pass --cache a folder all nodes see)")


def _on_node(work: Callable[[], object], cache_root: str, identity: str | None) -> object:
    """A task's work, after the cache check; a failure names the node (nodes differ in mounts and data)."""
    node = node_name()
    check_sees_cache(cache_root, identity, node)
    try:
        return work()
    except Exception as err:  # noqa: BLE001 -- the driver reports it as one FAILED line
        raise UserError(f"on node {node}: {err if isinstance(err, UserError) else one_line(err)}") from err


def _extract_task(config: RunConfig, kinds: list[str], cache_root: str, identity: str | None,
                  device: str | None, threads: int) -> float:
    """Ray task: fill one feature-cache entry; returns the seconds it took."""
    started = time.perf_counter()

    def work():
        set_threads(threads)  # as the driver's: a cell gives the local executor's numbers to the last digit
        runner = Runner(None, FeatureCache(cache_root), device)
        run = runner.resolve(config)
        runner.features(run, run.dataset, kinds, lambda it, **_: it)

    _on_node(work, cache_root, identity)
    return time.perf_counter() - started


def _cell_task(config: RunConfig, cache_root: str, identity: str | None, device: str | None,
               threads: int, predictions: str | None = None) -> tuple[Computed, float]:
    """Ray task: compute one cell from the cache and return it (the driver stores it), with its seconds; with
    ``predictions`` (a folder every node sees) the worker writes the cell's prediction files there."""
    started = time.perf_counter()

    def work():
        set_threads(threads)
        runner = Runner(None, FeatureCache(cache_root), device, predictions)
        return runner.compute(runner.resolve(config))

    return _on_node(work, cache_root, identity), time.perf_counter() - started


# ---- on the driver ------------------------------------------------------------------------------------

def cache_identity(root: Path) -> str | None:
    """The identity of a cache folder, made once (atomically: two drivers on one cache agree); None when
    the folder cannot be written (the nodes' view of it is then not checked)."""
    path = root / CACHE_ID_FILE
    try:
        if not path.exists():
            root.mkdir(parents=True, exist_ok=True)
            draft = root / f"{CACHE_ID_FILE}.{os.getpid()}.tmp"
            draft.write_text(uuid.uuid4().hex)
            try:
                os.link(draft, path)  # fails if another driver made it first (atomic on NFS too)
            except FileExistsError:
                pass
            finally:
                draft.unlink(missing_ok=True)
        return path.read_text().strip()
    except OSError as err:
        warnings.warn(f"cannot mark the feature cache {root} ({err}); nodes that do not see it are not "
                      f"detected", stacklevel=2)
        return None


def _largest_node_cpus(ray) -> int:
    return int(max((node["Resources"].get("CPU", 1) for node in ray.nodes() if node.get("Alive")), default=1))


def _task_slots(ray, threads: int) -> int:
    """Tasks of ``threads`` CPUs the live nodes can run at once."""
    return sum(int(node["Resources"].get("CPU", 0) // threads) for node in ray.nodes() if node.get("Alive"))


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


def _gpus_per_task(device: str | None, cluster: dict) -> int:
    """A GPU per model-running task where the cluster has them, unless the sweep asked for the CPU: reserving
    a GPU there would only cap how many tasks run at once."""
    return 1 if cluster.get("GPU", 0) >= 1 and device != "cpu" else 0


def local_runtime_env() -> dict:
    """Workers of a Ray instance started here import this very checkout (not another installed copy)."""
    from .registry import REGISTRY_ENV

    package_parent = str(Path(__file__).resolve().parent.parent)
    paths = [package_parent, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    if os.environ.get(REGISTRY_ENV):  # the user's registry folders (--registry): the workers resolve names too
        env[REGISTRY_ENV] = os.environ[REGISTRY_ENV]
    return {"env_vars": env}


def _check_reachable(address: str) -> None:
    """A wrong --address fails in seconds: Ray itself retries an unreachable head for many minutes."""
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms: Ray's own resolution
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        raise UserError(f"cannot reach the Ray cluster at {address} ({err}) -- check --address "
                        f"(e.g. ray://head:10001) or start one with `ray start --head`") from None


@contextmanager
def _session(address: str | None) -> Iterator[tuple[object, bool]]:
    """Ray, connected: to ``address``, to the instance this process already has, or to one started here
    (and stopped on the way out). Yields the module and whether the instance was started here."""
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
                ray.init(include_dashboard=False, log_to_driver=False, runtime_env=local_runtime_env())
        except ConnectionError as err:
            raise UserError(f"cannot reach the Ray cluster at {address} ({one_line(err)}) -- "
                            f"check --address (e.g. ray://head:10001) or start one with `ray start --head`") from None
    try:
        yield ray, started_here
    finally:
        if started_here:
            ray.shutdown()


class _Tasks:
    """Submits extractions and cells with the resources they need (see the module docstring)."""

    def __init__(self, ray, cache_root: str, identity: str | None, device: str | None, threads: int, gpus: int,
                 predictions: str | None = None):
        self.cache_root, self.identity, self.device, self.threads = cache_root, identity, device, threads
        self.predictions = predictions
        options = {"num_cpus": threads, "max_retries": NODE_LOSS_RETRIES}
        self._extract = ray.remote(**options, num_gpus=gpus)(_extract_task)
        self._model_cell = ray.remote(**options, num_gpus=gpus)(_cell_task)
        self._cpu_cell = ray.remote(**options, num_gpus=0)(_cell_task)

    # Tasks are named by kind ("extract", "cell kmeans"), not by cell: the driver keeps a record per
    # distinct task name (about 12 KiB each, measured), which would grow with the grid.
    def extract(self, entry: Extraction):
        return self._extract.options(name="extract").remote(
            entry.config, entry.kinds, self.cache_root, self.identity, self.device, self.threads)

    def cell(self, cell: Cell):
        name = f"cell {cell.run.task.name}"
        if cell.run.task.gpu:  # as asked; None: the GPU Ray gives it, if any
            return self._model_cell.options(name=name).remote(
                cell.config, self.cache_root, self.identity, self.device, self.threads, self.predictions)
        return self._cpu_cell.options(name=name).remote(cell.config, self.cache_root, self.identity, "cpu", self.threads,
                                                        self.predictions)


def _cause(err: BaseException) -> BaseException:
    return getattr(err, "cause", None) or err  # a RayTaskError carries the task's own exception


def _in_flight_bound(ray, threads: int, fixed: int | None) -> Callable[[], int]:
    """The most tasks to have submitted at once: ``fixed``, else twice the live nodes' task slots (enough
    to keep every slot busy while results travel back), re-read every ``RECHECK_S`` seconds."""
    if fixed is not None:
        return lambda: fixed
    last = {"at": -RECHECK_S, "bound": 2}

    def bound() -> int:
        if time.monotonic() - last["at"] >= RECHECK_S:
            last.update(at=time.monotonic(), bound=max(2, 2 * _task_slots(ray, threads)))
        return last["bound"]

    return bound


def _sweep(ray, plan: Plan, runner: Runner, tasks: _Tasks, bound: Callable[[], int], summary: SweepSummary,
           on_cell: CellCallback) -> Iterator[None]:
    """The plan on Ray, yielding once per cell finished (computed, stored meanwhile or failed)."""
    extractions = deque(plan.extractions_needed)
    entry_of = {cell.run.config_hash: entry.key for entry in extractions for cell in entry.cells}
    waiting: dict = defaultdict(list)  # cache entry -> its cells, until its extraction is done
    ready: deque[Cell] = deque()  # cells whose features are cached
    for cell in plan.todo:
        key = entry_of.get(cell.run.config_hash)
        if key:
            waiting[key].append(cell)
        else:
            ready.append(cell)
    running: dict = {}  # ObjectRef -> the Extraction or Cell it computes
    extracting = 0
    while ready or extractions or running:
        limit = bound()
        while extractions and len(running) < limit and extracting < max(1, limit // 2):  # leave cells room
            entry = extractions.popleft()
            running[tasks.extract(entry)] = entry
            extracting += 1
        while ready and len(running) < limit:
            cell = ready.popleft()
            if _stored_meanwhile(runner, cell, summary, on_cell):
                yield
                continue
            running[tasks.cell(cell)] = cell
        if not running:
            continue  # the cells taken were all stored meanwhile by another sweep
        done, _ = ray.wait(list(running), num_returns=1, timeout=RECHECK_S)
        if not done:
            continue  # nothing finished yet: re-read the live nodes
        item = running.pop(done[0])
        if isinstance(item, Extraction):
            extracting -= 1
            try:
                summary.task_seconds += ray.get(done[0])
            except Exception as err:  # noqa: BLE001 -- its cells fail; the others go on
                for cell in waiting.pop(item.key):
                    _fail(cell, _cause(err), summary, on_cell)
                    yield
                continue
            summary.extractions += 1
            ready.extend(waiting.pop(item.key))
            continue
        try:
            computed, seconds = ray.get(done[0])
        except Exception as err:  # noqa: BLE001 -- one broken cell must not stop a long sweep
            _fail(item, _cause(err), summary, on_cell)
            yield
            continue
        summary.task_seconds += seconds
        _store_record(runner, item, computed, summary, on_cell)  # then dropped: results do not pile up
        yield


def run_ray(plan: Plan, runner: Runner, address: str | None = None, device: str | None = None,
            on_cell: CellCallback = lambda cell, status: None, cpus_per_task: int | None = None,
            max_in_flight: int | None = None, progress: Callable = lambda it, **_: it) -> SweepSummary:
    """Extractions and cells as Ray tasks (see the module docstring). Uses the Ray instance this process
    already has, else connects to ``address``, else starts one here. Each task gets ``cpus_per_task`` CPUs
    and as many torch/OpenMP/BLAS/numba threads (default: this process's torch thread count, capped by the
    largest node), so results equal the local executor's."""
    if max_in_flight is not None and max_in_flight < 1:
        raise UserError(f"--max-in-flight must be at least 1, got {max_in_flight} -- e.g. --max-in-flight 64")
    with _session(address) as (ray, started_here):
        threads = _threads_per_task(ray, cpus_per_task, local=started_here and not address)
        cache_root = runner.cache.root.resolve()  # workers may run elsewhere: no relative paths
        predictions = str(runner.save_predictions) if runner.save_predictions is not None else None
        tasks = _Tasks(ray, str(cache_root), cache_identity(cache_root), device, threads,
                       _gpus_per_task(device, ray.cluster_resources()), predictions)
        summary = SweepSummary()
        cells = _sweep(ray, plan, runner, tasks, _in_flight_bound(ray, threads, max_in_flight), summary, on_cell)
        for _ in progress(cells, desc="cells", total=len(plan.todo)):
            pass
        return summary
