"""``ssl-bench bench clusterers``: each registered clusterer's fit time and peak memory on N x d region embeddings.

Each fit runs in a fresh process (spawned), so its peak resident memory is its own: the figure is the peak
of the whole process (Python, torch and the data included) and, beside it, the growth over the process
after the data is made. The regions are a seeded mixture of ``clusters`` Gaussian groups in d dimensions
around random unit directions (what L2-normalised crop embeddings look like to a clusterer); real region
embeddings of 100k crops are not at hand here.

The attention-based clusterer's paper setting (500 epochs of batch 4096: 12,500 AdamW steps at 100k) is
hours on a CPU, so ``abc_max_steps`` times that many steps and its row says so (``"extrapolated": true``):
the full fit's time is the measured one plus the remaining steps at the measured time per step. Beside it,
the row gives the arithmetic that bounds any implementation of the same computation: the matmul FLOPs of one
training step (counted by torch's FlopCounterMode: forward and backward, elementwise work not counted), the
paper setting's steps, and the machine's best sustained float32 matmul rate at the step's own FFN shapes
with the same threads; ``floor_seconds`` = FLOPs / rate, the time no faster code could beat here.
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
    row = {"seconds": seconds, "peak_rss_mib": peak / 1024, "growth_mib": (peak - before) / 1024,
           "clusters_found": int(len(np.unique(fitted.labels_))), "steps": getattr(fitted, "steps_", None)}
    if name == "abc":
        row.update(abc_arithmetic(fitted, x, seconds))
    queue.put(row)


def abc_arithmetic(fitted, x: np.ndarray, seconds: float) -> dict:
    """The attention-based clusterer's paper-setting steps, its FLOP floor on this machine, and (when the fit
    was capped) the extrapolation of the measured time per step to them."""
    import torch

    batch = min(fitted.batch_size, len(x))
    full, rest = divmod(len(x), batch)
    paper_steps = fitted.epochs * (full + (rest > 0))
    data = torch.from_numpy(fitted.transform.transform(x))
    batch_flops = step_flops(fitted.net, data[:batch], fitted.bounds)
    paper_flops = fitted.epochs * (full * batch_flops + (step_flops(fitted.net, data[:rest], fitted.bounds)
                                                         if rest else 0))
    d, hidden = fitted.net.centres.shape[1], fitted.architecture["ffn_width"]
    rate = max(matmul_flops_per_second(batch, d, hidden), matmul_flops_per_second(batch, hidden, d),
               matmul_flops_per_second(hidden, batch, d))  # the FFN's forward, input- and weight-gradient shapes
    per_step = fitted.train_seconds_ / fitted.steps_
    row = {"paper_steps": paper_steps, "batch_step_gflop": round(batch_flops / 1e9, 2),
           "paper_tflop": round(paper_flops / 1e12, 1), "matmul_gflop_per_s": round(rate / 1e9, 1),
           "floor_seconds": round(paper_flops / rate, 1), "seconds_per_step": round(per_step, 4),
           "gflop_per_s_for_120_s": round(paper_flops / 120 / 1e9)}  # the rate issue 14's 2-minute target needs
    if fitted.fit_stats_["stopped"] == "max_steps":
        row.update(extrapolated=True,
                   extrapolated_seconds=round(seconds + (paper_steps - fitted.steps_) * per_step, 1))
    return row


def step_flops(net, rows, bounds) -> int:
    """Matmul FLOPs of one training step (forward and backward) of ``net`` on ``rows``, as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    from .attention import abc_loss

    with FlopCounterMode(display=False) as counter:
        abc_loss(net(rows), *bounds).backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_flops_per_second(m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """The best float32 rate of an (m x k) @ (k x n) product over repeated runs for about ``seconds``."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b  # warm-up: thread pool, allocator
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def benchmark(sizes: tuple[int, ...] = (10_000, 100_000), dim: int = 384, k: int = 27, threads: int = 1,
              clusterers: str = "kmeans,kmeans-cosine,spectral,sinkhorn,abc", abc_max_steps: int = 100) -> dict:
    """Fit time and peak memory of each clusterer (default parameters, K = 27) at 10k and 100k regions of 384
    dimensions, one process per fit. ``kmeans-cosine`` is ``kmeans`` with ``metric=cosine``; ``abc_max_steps``
    > 0 caps the attention-based clusterer's optimisation steps and its row extrapolates to the paper setting (see
    the module docstring); 0 runs the paper setting in full (500 epochs: hours at 100k on a CPU)."""
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


def abc_stopping(regions: int = 10_000, dim: int = 384, k: int = 27, tolerances: str = "0.003,0.001,0.0003",
                 patience: int = 10, threads: int = 1) -> dict:
    """The attention-based clusterer's opt-in stopping rule against its paper setting on the same regions
    (``ssl-bench bench abc-stopping``). The reference fit runs the paper's 500 epochs and records each epoch's share
    of regions whose label changed (it ends early only once no region changed for ``patience`` epochs: its
    labels are then final). A fit with a tolerance follows the same seeded trajectory up to the epoch where
    its rule fires; its labels are compared with the reference's by the adjusted Rand index."""
    from sklearn.metrics import adjusted_rand_score

    from ...ops import set_threads
    from .attention import AttentionClustering

    set_threads(threads)
    x = region_embeddings(regions, dim, k)
    t0 = time.perf_counter()
    reference = AttentionClustering(k, seed=0, stop_label_change=1 / (regions + 1), stop_patience=patience).fit(x)
    rows = [{"tolerance": None, "epochs_run": reference.fit_stats_["epochs_run"],
             "stopped": reference.fit_stats_["stopped"], "seconds": round(time.perf_counter() - t0, 1)}]
    print(rows[-1], flush=True)
    for tolerance in map(float, str(tolerances).split(",")):
        t0 = time.perf_counter()
        fit = AttentionClustering(k, seed=0, stop_label_change=tolerance, stop_patience=patience).fit(x)
        rows.append({"tolerance": tolerance, "epochs_run": fit.fit_stats_["epochs_run"],
                     "stopped": fit.fit_stats_["stopped"], "seconds": round(time.perf_counter() - t0, 1),
                     "ari_vs_reference": round(float(adjusted_rand_score(reference.labels_, fit.labels_)), 4)})
        print(rows[-1], flush=True)
    return {"regions": regions, "dim": dim, "k": k, "patience": patience, "threads": threads,
            "data": "seeded Gaussian mixture around 27 unit directions (see module docstring)", "rows": rows,
            "reference_label_changes": [round(c, 5) for c in reference.label_changes_],
            "reference_losses": [round(loss, 3) for loss in reference.losses_],
            "load_average_1min": os.getloadavg()[0]}
