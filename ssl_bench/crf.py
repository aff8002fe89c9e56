"""Dense CRF refinement with the parameters shared by STEGO, HP and PriMaPs, and a pool that runs it over a
stream of images in worker processes.

pydensecrf refines one image at a time on one core (1-3 s at 320 px). ``CRFPool.map`` keeps a few images in
flight in as many worker processes as this process has threads (each job one thread): the caller goes on
producing the next images' jobs meanwhile, and the labels come back in order, identical to the in-process call
(the CRF is deterministic and sees the same arrays).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from .errors import UserError


def dense_crf(image: np.ndarray, probs: np.ndarray, iterations: int = 10, gauss_sxy: float = 1,
              gauss_compat: float = 3, bilateral_sxy: float = 67, bilateral_srgb: float = 3,
              bilateral_compat: float = 4, turned_off_by: str = "--no-crf") -> np.ndarray:
    """Refine class probabilities (C, H, W) on an RGB image (H, W, 3) uint8; returns (C, H, W) float32.
    The defaults are the Gaussian (smoothness) and bilateral (appearance) kernels of STEGO, HP and PriMaPs.
    ``turned_off_by``: the option that runs without this CRF, named when pydensecrf is missing."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as err:
        raise _missing_library(turned_off_by) from err
    c, h, w = probs.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"CRF image {image.shape[:2]} and probabilities {(h, w)} differ in size")
    probs = np.clip(probs.astype(np.float32), 1e-8, 1.0)
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, compat=bilateral_compat,
                             rgbim=np.array(image, dtype=np.uint8, order="C"))  # a writable copy: pydensecrf rejects read-only buffers
    q = crf.inference(iterations)
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def check_available(params: dict, switches: dict[str, str] | None = None) -> None:
    """Refuse, in one line, a run whose dense CRF could not run (pydensecrf missing): a method calls it as it
    starts, so its training does not end in the missing library (not at validation: reports and plans of stored
    runs need no CRF). ``switches``: {parameter: the option that turns that CRF off} (default: ``crf``, --no-crf)."""
    wanted = [option for key, option in (switches or {"crf": "--no-crf"}).items() if params.get(key)]
    if not wanted:
        return
    try:
        import pydensecrf.densecrf  # noqa: F401  (a broken build fails here too)
    except ImportError as err:
        raise _missing_library(" ".join(wanted)) from err


def _missing_library(turned_off_by: str) -> UserError:
    return UserError(f"dense CRF needs pydensecrf -- `pip install pydensecrf2`, or run with {turned_off_by}")


# Deep Spectral Methods' CRF of hard label maps (SimpleCRF's densecrf with the authors' parameters: bilateral
# weight 10, spatial std 80, colour std 13; Gaussian weight 3, std 3; 5 iterations)
LABEL_CRF = dict(iterations=5, gauss_sxy=3, gauss_compat=3, bilateral_sxy=80, bilateral_srgb=13, bilateral_compat=10)


def label_crf(image: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """A label map (H, W) (-1 = unlabelled) refined on its image: one-hot probabilities clamped to [0.01, 0.99]
    as SimpleCRF does (unlabelled pixels uniform), the dense CRF with ``LABEL_CRF``; returns int64 (H, W)."""
    probs = np.full((n_labels, *labels.shape), 1.0 / n_labels, dtype=np.float32)
    labelled = labels >= 0
    probs[:, labelled] = 0.0
    rows, cols = np.nonzero(labelled)
    probs[labels[labelled], rows, cols] = 1.0
    refined = dense_crf(image, np.clip(probs, 0.01, 0.99), **LABEL_CRF)
    return refined.argmax(0).astype(np.int64)


def crf_argmax(image: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Labels (H, W) int64 of ``dense_crf`` with the STEGO / HP / PriMaPs parameters."""
    return dense_crf(image, probs).argmax(0).astype(np.int64)


def refine_scores(image: np.ndarray, scores: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, CRF-refined labels) (H, W) int64 of scores (K, h, w) bilinearly upsampled to ``size``: the argmax
    of the upsampled scores, and ``crf_argmax`` of their softmax (PriMaPs-EM's evaluation), in one job."""
    from .ops import softmax, upsample_scores

    up = upsample_scores(scores, tuple(size))
    return up.argmax(0).astype(np.int64), crf_argmax(np.asarray(image), softmax(up, 0))


def default_workers() -> int:
    """CRF worker processes: ``$SSL_BENCH_CRF_WORKERS``, else this process's torch threads (its share of the
    machine: a Ray task's --cpus-per-task, all cores on a workstation); never more than the cores this process
    may run on (its CPU affinity; a container's CPU quota is not seen): more only take turns on them, each
    costing a start-up. 1 runs in this process."""
    import torch

    value = os.environ.get("SSL_BENCH_CRF_WORKERS")
    if value is not None and not value.isdigit():
        raise UserError(f"SSL_BENCH_CRF_WORKERS={value!r} must be a whole number (1: no worker processes)")
    wanted = int(value) if value is not None else torch.get_num_threads()
    return max(1, min(wanted, _usable_cores()))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


class CRFPool:
    """``function(*job)`` for a stream of jobs (e.g. ``(image, probs)``), in order, in worker processes.

    Streaming: at most ``2 x workers`` jobs are in flight, so memory stays bounded whatever the number of
    images. Workers are spawned (a forked copy of a process running torch or numba threads can deadlock), and
    start in the background once asked: ``CRFPool().start()`` before a fit, then ``map`` after it (which closes
    them at its end), hides their start-up (spawn, imports: ~1 s) behind the fit; ``with CRFPool() as pool:``
    keeps them for several streams. ``map`` on a pool not started starts it. With one worker everything runs
    in this process.
    """

    def __init__(self, workers: int | None = None):
        self.workers = default_workers() if workers is None else max(1, workers)
        self._executor = None
        self._kept = False  # inside ``with``: map leaves the workers running for the next stream

    def __enter__(self) -> "CRFPool":
        self._kept = True
        return self.start()

    def __exit__(self, *exc) -> None:
        self._kept = False
        self.close()

    def start(self, job: Callable | None = None) -> "CRFPool":
        """Start the worker processes now, in the background (one warm-up job each: the executor spawns a
        process per job it cannot place, and the job imports pydensecrf, so the first image does not). ``job``:
        the function the streams will run, whose module the warm-up imports too (e.g. torch for an upsampling
        job: 2-3 s per worker, hidden behind what the caller does meanwhile)."""
        if self.workers == 1 or self._executor is not None:
            return self
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_one_thread_each)
        # a pool dropped unused (its stream never read, e.g. a failed cell) still stops its workers
        self._finalizer = weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
        for _ in range(self.workers):
            self._submit(_warm_up, getattr(job, "__module__", None))
        return self

    def _submit(self, function: Callable, *args):
        """``executor.submit``, which is where a spawned worker starts. A spawned process imports the parent's
        main script first; a user's training script that calls ``ssl_bench.evaluate`` without an
        ``if __name__ == "__main__"`` guard would then run again in every worker. The jobs are functions of
        importable modules (ssl_bench's), which need nothing from that script: workers start without it, the
        swap held under a lock and made only while the pool may still start a worker (``max_tasks_per_child``
        stays unset: with it, replacements would start from the executor's own thread, outside the swap)."""
        if getattr(function, "__module__", None) == "__main__":
            raise UserError(f"the CRF pool runs functions it can import by module name; {function.__name__} is "
                            "defined in the script itself -- move it into a module")
        with _worker_deaths_in_one_line():  # a worker that died since the last job breaks the pool here
            if len(getattr(self._executor, "_processes", None) or ()) >= self.workers:
                return self._executor.submit(function, *args)  # every worker started: nothing to spawn
            with _MAIN_SWAP:
                main = sys.modules["__main__"]
                sys.modules["__main__"] = types.ModuleType("__main__")  # no __file__, no __spec__: no re-import
                try:
                    return self._executor.submit(function, *args)
                finally:
                    sys.modules["__main__"] = main

    def close(self) -> None:
        if self._executor is not None:
            self._finalizer.detach()
            self._executor.shutdown()
            self._executor = None

    def map(self, function: Callable, jobs: Iterable[tuple]) -> Iterator:
        if self.workers == 1:
            for job in jobs:
                yield function(*job)
            return
        self.start(function)
        try:
            pending: deque = deque()
            for job in jobs:
                pending.append(self._submit(function, *job))
                if len(pending) >= 2 * self.workers:
                    yield _result(pending.popleft())
            while pending:
                yield _result(pending.popleft())
        finally:
            if not self._kept:
                self.close()


def _result(future):
    with _worker_deaths_in_one_line():
        return future.result()


@contextlib.contextmanager
def _worker_deaths_in_one_line():
    """A pool broken by a dead worker (killed from outside: out of memory, most often) as one line."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        yield
    except BrokenProcessPool as err:
        raise UserError("a CRF worker process died (killed, out of memory, or failed to start: see the lines "
                        "above) -- SSL_BENCH_CRF_WORKERS=1 runs the CRF in this process") from err


_MAIN_SWAP = threading.Lock()  # ``CRFPool._submit``: one swap of __main__ at a time


# a worker's thread pools, fixed before its jobs import them: the workers are the parallelism (one per thread of
# the run), and a job's torch / BLAS / numba threads would only contend with the other workers' CRFs (OpenMP's
# spin-waiting threads take their core: an upsampling job on 2 cores reached 1.26x in parallel at its ceiling,
# 1.79x with one thread each)
_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def _one_thread_each() -> None:
    """Each worker's initializer: one thread for its jobs' torch, BLAS and numba."""
    from threadpoolctl import threadpool_limits

    os.environ.update(dict.fromkeys(_ONE_THREAD, "1"))  # a spawned worker has imported neither torch nor numba yet
    threadpool_limits(1)  # ... but numpy's BLAS is loaded (this module imports numpy), past reading its variable


def _warm_up(module: str | None = None) -> int:
    """A worker's first job: import the CRF library, and the module of the jobs to come, now rather than with the
    first image."""
    import importlib

    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:  # the first real job says so, in one line
        pass
    if module and module != "__main__":  # __main__ jobs are refused with their first submission
        importlib.import_module(module)
    return os.getpid()


def _timed_share(function: Callable, jobs: list[tuple], share: int, shares: int) -> float:
    """Seconds ``function`` takes over this share of ``jobs`` in this process (the benchmark's no-communication
    ceiling)."""
    import time

    t0 = time.perf_counter()
    for job in jobs[share::shares]:
        function(*job)
    return time.perf_counter() - t0


def _timed_control(kind: str, _share: int = 0, _shares: int = 1) -> float:
    """Seconds of a fixed workload: ``arithmetic``, a pure-Python loop (one core, no memory traffic); ``memory``,
    sums over a 256 MB array (bound by memory bandwidth, as a CRF's passes over its label arrays are)."""
    import time

    if kind == "arithmetic":
        t0 = time.perf_counter()
        total = 0
        for i in range(2_000_000):
            total += i * i
        return time.perf_counter() - t0
    values = np.ones(32 * 2 ** 20)  # 256 MB of float64
    t0 = time.perf_counter()
    for _ in range(4):
        values.sum()
    return time.perf_counter() - t0


JOB_KINDS = ("probabilities", "scores")  # ``benchmark``: what a job carries (STEGO / HP's; k-means')


def benchmark(images: int = 8, labels: tuple[int, ...] = (6, 27), workers: tuple[int, ...] = (2,), size: int = 320,
              rounds: int = 3, jobs: tuple[str, ...] = JOB_KINDS) -> dict:
    """Dense CRF over a stream of images: in this process against ``CRFPool`` with each count of worker
    processes (cold: workers started inside the timing; started: before it), and the ceiling those processes
    reach with no communication at all, on CamVid val at size x size (synthetic images when ../shared/data is
    absent), 6 and 27 labels (PriMaPs' proposals and COCO-Stuff); labels compared. ``jobs``: ``probabilities``,
    class probabilities at full resolution (STEGO / HP's jobs: ``crf_argmax``), softmax(2 x upsampled random
    cosines on the patch grid, patch 8); ``scores``, those cosines, which the job upsamples and softmaxes before
    its CRF (k-means' jobs: ``kmeans.predict``, alpha 2). Also the caller's own seconds per job.

    Each figure is the best of ``rounds`` rounds, every round timing each way once in turn, so that a slow spell
    of a shared machine lowers one round, not one column. The same rounds time two controls in the same worker
    processes, one alone and then one in every worker at once: a pure-arithmetic loop (what the cores give now)
    and sums over an array larger than any cache (what memory bandwidth gives): read a speedup against them."""

    import pickle
    import time

    from .data import open_dataset
    from .data.protocol import Protocol
    from .data.shared import shared_data_dir
    from .methods.kmeans import predict as kmeans_job
    from .ops import softmax, upsample_scores

    workers = (workers,) if isinstance(workers, int) else tuple(workers)
    if not workers or min(workers) < 2:
        raise UserError(f"bench crf compares worker processes with the in-process CRF: workers={list(workers)} "
                        "must each be at least 2 (-a workers=2)")
    kinds = (jobs,) if isinstance(jobs, str) else tuple(jobs)
    if not kinds or set(kinds) - set(JOB_KINDS):
        raise UserError(f"bench crf: jobs={list(kinds)} -- each must be one of {', '.join(JOB_KINDS)} "
                        "(-a jobs=scores)")
    camvid = shared_data_dir() / "camvid" if shared_data_dir() else None
    dataset = open_dataset("camvid", camvid, "val") if camvid and camvid.is_dir() else open_dataset("synthetic", None, "val")
    protocol = Protocol(resize=size)
    frames = [protocol.apply_image(dataset.load_image(i), 8) for i in range(images)]
    rng = np.random.default_rng(0)
    rows = []
    labels_of_kinds: dict[int, list] = {}
    for n_labels in labels:
        patches = [rng.uniform(-1, 1, (n_labels, frame.shape[0] // 8, frame.shape[1] // 8)).astype(np.float32)
                   for frame in frames]  # random cosines on the patch grid: both kinds refine the same ones

        def job(kind, frame, patch):
            if kind == "probabilities":  # what the caller made before: softmax(alpha * upsampled) at full size
                return frame, softmax(2.0 * upsample_scores(patch, frame.shape[:2]), 0)
            return patch, frame.shape[:2], frame, 2.0

        for kind in kinds:
            function = crf_argmax if kind == "probabilities" else kmeans_job
            stream = []
            t0 = time.perf_counter()  # the caller's own seconds per job: making it and pickling it for a worker
            for frame, patch in zip(frames, patches):
                stream.append(job(kind, frame, patch))
                pickle.dumps(stream[-1], protocol=pickle.HIGHEST_PROTOCOL)
            caller_s = (time.perf_counter() - t0) / images
            reference = [function(*one) for one in stream]  # also loads the library before any clock
            kinds_agree = all((a == b).all() for a, b in zip(labels_of_kinds.setdefault(n_labels, reference),
                                                             reference))  # either kind: the same labels
            for count in workers:
                best: dict[str, float] = {}
                identical = kinds_agree
                for _ in range(max(1, rounds)):
                    seconds, streams = _one_round(function, stream, count)
                    best = {name: min(best.get(name, np.inf), s) for name, s in seconds.items()}
                    identical &= all((a == b).all() for labels_of in streams for a, b in zip(reference, labels_of))
                rows.append({"labels": n_labels, "job": kind, "caller_s_per_image": caller_s,
                             "workers_one_caller_feeds": best["serial"] / images / caller_s,
                             "workers": count, "images": images,
                             "rounds": max(1, rounds), "size": list(frames[0].shape[:2]),
                             "serial_s_per_image": best["serial"] / images,
                             "parallel_s_per_image": best["cold"] / images, "speedup": best["serial"] / best["cold"],
                             "speedup_started_before_fit": (best["fit"] + best["serial"]) / best["early"],
                             "fit_s": best["fit"], "speedup_started_pool": best["serial"] / best["warm"],
                             "speedup_ceiling_no_transfer": best["serial"] / best["ceiling"],
                             "cores_now_arithmetic": count * best["arithmetic_one"] / best["arithmetic_all"],
                             "cores_now_memory": count * best["memory_one"] / best["memory_all"],
                             "identical_labels": identical})
    return {"dataset": f"{dataset.name}/{dataset.split}", "cores": os.cpu_count(), "rows": rows,
            "note": "best of `rounds` interleaved rounds. job: probabilities, full-resolution class probabilities "
                    "sent to the CRF (STEGO / HP, and k-means before it sent scores); scores, the same random "
                    "patch-resolution cosines, which the job upsamples itself (k-means); identical_labels: every "
                    "stream against the in-process one, and the two kinds against each other. caller_s_per_image: "
                    "the caller's own seconds per job (making and pickling it); workers_one_caller_feeds: "
                    "serial_s_per_image over that, the workers past which the caller, not the CRF, sets the pace. "
                    "speedup: workers started inside the timing, when the "
                    "stream begins; speedup_started_before_fit: as k-means runs it, workers started before its fit "
                    "(stood in for by one in-process job of fit_s seconds), fit + stream against fit + serial "
                    "stream; speedup_started_pool: workers started before the clock; speedup_ceiling_no_transfer: "
                    "each worker process refines its share of the images on its own (no jobs or results sent), "
                    "the most these processes give the CRF; cores_now_arithmetic / cores_now_memory: the same "
                    "worker processes each running a pure-arithmetic loop / sums over a 256 MB array, all at once "
                    "against one alone (workers x one / all): what the cores and the memory bandwidth gave during "
                    "these rounds (a shared virtual machine may give less than its core count)",
            "load_average_1min": os.getloadavg()[0]}


def _one_round(function: Callable, jobs: list[tuple], count: int) -> tuple[dict[str, float], list[list[np.ndarray]]]:
    """One round of ``benchmark``: the seconds of each way and control, and the label streams to compare."""
    import time

    seconds = {}
    t0 = time.perf_counter()
    serial = [function(*job) for job in jobs]
    seconds["serial"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cold = list(CRFPool(count).map(function, jobs))
    seconds["cold"] = time.perf_counter() - t0
    # as k-means runs it: workers started, the caller's own work (its fit; here one in-process job, timed alone
    # as ``fit``), then the stream; against the fit and the serial stream one after the other
    t0 = time.perf_counter()
    function(*jobs[0])
    seconds["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool = CRFPool(count).start(function)
    function(*jobs[0])
    early = list(pool.map(function, jobs))
    seconds["early"] = time.perf_counter() - t0
    with CRFPool(count) as pool:  # started and ready before the clock: the streaming itself
        list(pool.map(function, jobs[:2 * count]))  # each worker past a first job (its imports)
        t0 = time.perf_counter()
        warm = list(pool.map(function, jobs))
        seconds["warm"] = time.perf_counter() - t0
        # the ceiling: each worker refines its own share with no job or result crossing a process
        seconds["ceiling"] = _concurrently(pool, count, _timed_share, function, jobs)
        for control in ("arithmetic", "memory"):
            seconds[f"{control}_one"] = _concurrently(pool, 1, _timed_control, control)
            seconds[f"{control}_all"] = _concurrently(pool, count, _timed_control, control)
    return seconds, [serial, cold, early, warm]


def _concurrently(pool: CRFPool, count: int, function: Callable, *args) -> float:
    """The longest of ``count`` runs of ``function(*args, share, count)`` started at once in the pool's workers
    (each returns its own seconds)."""
    shares = [pool._submit(function, *args, share, count) for share in range(count)]
    return max(_result(share) for share in shares)
