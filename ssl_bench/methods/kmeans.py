"""The k-means baseline ("DINO baseline" of STEGO, HP and PriMaPs).

Cosine k-means on L2-normalised patch features of a whole split; each patch takes its nearest
centroid; scores are upsampled bilinearly to label resolution before the argmax, optionally refined
by the dense CRF those papers share.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..crf import CRFPool, check_available as check_crf_available, crf_argmax
from ..errors import UserError
from ..ops import (as_float32, l2_normalize, sample_rows, softmax, spherical_kmeans, upsample_argmax,
                   upsample_scores)


def fit_centroids(features: np.ndarray, k: int, seed: int, iterations: int = 50, copy: bool = True,
                  progress: Callable = lambda it, **_: it) -> np.ndarray:
    """Unit-norm centroids (k, d) of cosine k-means on feature rows (n, d) (``copy=False``: a float32 scratch
    array the caller gives up, normalised in place; ``progress``: a run's bar over the steps)."""
    return spherical_kmeans(l2_normalize(features, copy=copy), k, seed=seed, iterations=iterations, progress=progress)


def cluster_scores(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cosine similarity of each patch (h, w, d) to each centroid: (k, h, w), a view of an (h, w, k) product
    (a matmul is 4x faster than the equivalent einsum; upsampling wants channels last anyway)."""
    return (l2_normalize(features) @ l2_normalize(centroids).T).transpose(2, 0, 1)


def predict(scores: np.ndarray, size: tuple[int, int], image: np.ndarray | None = None,
            crf_alpha: float = 0.0) -> np.ndarray:
    """Labels (H, W) from patch scores (k, h, w); with ``image`` and ``crf_alpha`` > 0, CRF-refined
    (probabilities are softmax(alpha * cosine), as STEGO's cluster probabilities)."""
    if image is None or crf_alpha <= 0:
        return upsample_argmax(scores, size)
    return crf_argmax(image, crf_probabilities(scores, size, crf_alpha))


def crf_probabilities(scores: np.ndarray, size: tuple[int, int], crf_alpha: float) -> np.ndarray:
    """The CRF's input: softmax(alpha * cosine) of the bilinearly upsampled scores, (k, H, W)."""
    return softmax(crf_alpha * upsample_scores(scores, size), axis=0)


def check_params(p: dict) -> None:
    """One-line errors before any work (the task file's ``validate`` hook); types are checked by the registry."""
    for key, example in (("iterations", 50), ("max_fit_patches", 200000)):
        if p[key] < 1:
            raise UserError(f"{key}={p[key]} -- k-means needs at least 1 (-p {key}={example})")
    if p["crf_alpha"] <= 0:
        raise UserError(f"crf_alpha={p['crf_alpha']} -- the CRF unaries need a positive scale (-p crf_alpha=2.0)")


def run(ctx):
    from ..runner import Prediction, TaskResult

    p = ctx.params
    check_crf_available(p)  # before the fit, not after it
    if p["max_fit_patches"] < ctx.k:
        raise UserError(f"max_fit_patches={p['max_fit_patches']} is fewer patches than K={ctx.k} clusters -- raise "
                        f"-p max_fit_patches (default 200000)")
    fit = ctx.features("patch", p["fit_split"])
    rows = sample_rows(len(fit.flat), p["max_fit_patches"], ctx.seed)
    feats = ctx.features("patch")
    pool = CRFPool().start(predict) if p["crf"] else None  # the CRF workers start (and load torch) while the fit runs
    try:
        with ctx.timed("fit"):
            centroids = fit_centroids(as_float32(fit.flat[rows]), ctx.k, ctx.seed, p["iterations"], copy=False,
                                      progress=ctx.progress)
    except BaseException:
        if pool is not None:
            pool.close()
        raise

    def predictions():
        if not p["crf"]:
            for i in range(len(feats)):
                with ctx.timed("predict"):
                    labels = predict(cluster_scores(feats[i], centroids), ctx.label_size(i))
                yield Prediction(i, labels)
            return

        # pulled by the pool as it streams: making a job is timed as "predict", the waits for labels as "crf". A job
        # carries the patch-resolution scores, which the worker upsamples: 1/64 of the probabilities' bytes at patch
        # 8 (11 MB per 320 px image at 27 labels), and the upsampling runs in parallel too
        jobs = ctx.timed_stream("predict", ((cluster_scores(feats[i], centroids), ctx.label_size(i), ctx.image(i),
                                             p["crf_alpha"]) for i in range(len(feats))))
        for i, labels in enumerate(ctx.timed_stream("crf", pool.map(predict, jobs))):  # in parallel, in order
            yield Prediction(i, labels)

    return TaskResult(predictions(), stats={"fit_patches": int(len(rows))})


def benchmark(images: int = 101, ks: tuple[int, ...] = (11, 22, 33), seeds: tuple[int, ...] = (0, 1),
              iterations: int = 50, threads: int = 1, repeats: int = 2) -> dict:
    """The k-means fit on a split's patches (dino-vits16 at 320 px, random weights, CamVid val when
    ../shared/data is there): ``spherical_kmeans`` with its bounds, the same loop comparing every patch at
    every step, and faiss's spherical k-means (k-means v1); one thread by default, best of 2 runs.
    Also how many labels differ from the plain loop's (the bounds promise none), and each fit's objective
    (mean cosine similarity of a patch to its centroid: faiss draws other initial rows for a seed, so only
    the spread over seeds compares)."""
    import os
    import time

    import faiss

    from ..features import benchmark_inputs
    from ..ops import set_threads

    set_threads(threads)
    _, feats, source = benchmark_inputs("dino-vits16", images)
    x = l2_normalize(np.concatenate([f["patch"].reshape(-1, f["patch"].shape[-1]) for f in feats]))

    def best_of(fit):
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            centroids = fit()
            seconds.append(time.perf_counter() - t0)
        return min(seconds), centroids

    def faiss_fit(k, seed):
        km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=len(x), min_points_per_centroid=1)
        km.train(x)
        return km.centroids

    spherical_kmeans(x, ks[0], 0, 2)  # untimed warm-up: first calls pay for thread pools and page faults
    faiss_fit(ks[0], 0)
    rows = []
    for k in ks:
        for seed in seeds:
            bounded_s, bounded = best_of(lambda: spherical_kmeans(x, k, seed, iterations))
            plain_s, plain = best_of(lambda: spherical_kmeans(x, k, seed, iterations, bounds=False))
            faiss_s, reference = best_of(lambda: faiss_fit(k, seed))
            labels = (x @ bounded.T).argmax(1)
            rows.append({"k": k, "seed": seed, "bounded_s": bounded_s, "plain_s": plain_s, "faiss_s": faiss_s,
                         "speedup_vs_plain": plain_s / bounded_s, "speedup_vs_faiss": faiss_s / bounded_s,
                         "labels_differing_from_plain": int((labels != (x @ plain.T).argmax(1)).sum()),
                         "objective": float((x @ bounded.T).max(1).mean()),
                         "objective_faiss": float((x @ reference.T).max(1).mean())})
    return {"features": source, "patches": int(len(x)), "dim": int(x.shape[1]), "iterations": iterations,
            "threads": threads, "rows": rows,
            "load_average_1min": os.getloadavg()[0]}  # the machine may be shared: read the figures with it
