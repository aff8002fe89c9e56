"""``ssl-bench bench clusterers``: each registered clusterer's fit time and peak memory on N x d region embeddings.

Each fit runs in a fresh process (spawned), so its peak resident memory is its own: the figure is the peak
of the whole process (Python, torch and the data included) and, beside it, the growth over the process
after the data is made. The regions are a seeded mixture of ``clusters`` Gaussian groups in d dimensions
around random unit directions (what L2-normalised crop embeddings look like to a clusterer); real region
embeddings of 100k crops are not at hand here.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import time

import numpy as np


def region_embeddings(n: int, dim: int = 384, clusters: int = 27, spread: float = 0.6, seed: int = 0) -> np.ndarray:
    """``n`` rows around ``clusters`` random unit directions (unequal group sizes), float32."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    groups = rng.choice(clusters, n, p=rng.dirichlet(np.full(clusters, 2.0)))
    noise = rng.standard_normal((n, dim), dtype=np.float32) * (spread / np.sqrt(dim))
    return (centres[groups].astype(np.float32) + noise).astype(np.float32)


def _fit_in_child(name: str, params: dict, n: int, dim: int, k: int, threads: int, queue) -> None:
    from ...ops import set_threads
    from ...registry import stages
    from .. import build

    set_threads(threads)
    x = region_embeddings(n, dim, k)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    fitted = build(stages("clusterer")[name], {**stages("clusterer")[name].params, **params}, k=k, seed=0).fit(x)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    queue.put({"seconds": seconds, "peak_rss_mib": peak / 1024, "growth_mib": (peak - before) / 1024,
               "clusters_found": int(len(np.unique(fitted.labels_))), "steps": getattr(fitted, "steps_", None)})


def benchmark(sizes: tuple[int, ...] = (10_000, 100_000), dim: int = 384, k: int = 27, threads: int = 1,
              clusterers: str = "kmeans,kmeans-cosine,spectral,sinkhorn,abc", abc_max_steps: int = 0) -> dict:
    """Fit time and peak memory of each clusterer (default parameters, K = 27) at 10k and 100k regions of 384
    dimensions, one process per fit. ``kmeans-cosine`` is ``kmeans`` with ``metric=cosine``; ``abc_max_steps``
    > 0 caps the attention-based clusterer's optimisation steps (0: its paper setting, 500 epochs)."""
    variants = {"kmeans-cosine": ("kmeans", {"metric": "cosine"}),
                "abc": ("abc", {"max_steps": abc_max_steps} if abc_max_steps else {})}
    context = multiprocessing.get_context("spawn")
    rows = []
    for n in sizes:
        for label in clusterers.split(","):
            name, params = variants.get(label, (label, {}))
            queue = context.Queue()
            child = context.Process(target=_fit_in_child, args=(name, params, n, dim, k, threads, queue))
            child.start()
            child.join()
            result = queue.get() if child.exitcode == 0 else {"failed": f"exit code {child.exitcode}"}
            rows.append({"clusterer": label, "params": params, "regions": n, "dim": dim, "k": k, **result})
            print(rows[-1], flush=True)  # long runs: each figure as it comes
    return {"threads": threads, "data": "seeded Gaussian mixture around 27 unit directions (see module docstring)",
            "rows": rows, "load_average_1min": os.getloadavg()[0]}
