"""Small numeric helpers shared by several methods (arrays in, arrays out)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import kernels
from .errors import UserError


def as_float32(x: np.ndarray) -> np.ndarray:
    """``x`` as a float32 array; float16 (the feature cache's dtype) converts through torch, ~5x faster than
    numpy's half-to-float loop and bit-identical to it."""
    if isinstance(x, np.ndarray) and x.dtype == np.float16 and x.flags.writeable:
        return torch.from_numpy(x).float().numpy()
    return np.asarray(x, dtype=np.float32)


def l2_normalize(x: np.ndarray, eps: float = 1e-8, copy: bool = True) -> np.ndarray:
    """Rows (last axis) of ``x`` divided by max(their norm, eps), float32. ``copy=False`` normalises a float32
    array in place (a caller's scratch copy: no second allocation of a split's worth of patches)."""
    x = as_float32(x)  # the same object when it already is a float32 array
    norms = np.sqrt(np.einsum("...d,...d->...", x, x))[..., None]  # einsum: ~5x faster than np.linalg.norm
    if copy:
        return x / np.maximum(norms, eps)
    x /= np.maximum(norms, eps)
    return x


def set_threads(threads: int) -> None:
    """Torch, faiss (OpenMP), numpy's BLAS and numba (``kernels``) thread counts, for this process: a fixed
    count keeps torch's float reductions in one order run after run, and makes a benchmark's thread count
    mean what it says (the kernels' results do not depend on it)."""
    import faiss
    import numba
    import scipy.linalg  # noqa: F401  (loads scipy's own OpenBLAS now, so that the limit below reaches it too)
    from threadpoolctl import threadpool_limits

    # numba first: launching its threading layer (at its first call) resets OpenMP's thread count, torch's included
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # at most the cores numba started with
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")


def upsample_scores(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of per-class scores (K, h, w) to (K, H, W), as STEGO/PriMaPs do before argmax."""
    t = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()


def bilinear_sources(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output position of a bilinear resize (align_corners=False), its two source positions and the
    weight of the second, by torch's formula (float32: scale in/out, clamped at the edges). Torch's vectorised
    CPU kernels fuse its multiply-add and may differ in the last bit, which moves a label only at a near-tie."""
    scale = np.float32(size_in) / np.float32(size_out)
    source = np.maximum((np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
                        np.float32(0.0))
    first = np.minimum(source.astype(np.int64), size_in - 1)
    weight = np.clip(source - first.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    return first, first + (first < size_in - 1), weight


def upsample_argmax(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Labels (H, W) = argmax (first maximum) of the bilinearly upsampled scores (K, h, w), as
    ``upsample_scores(scores, size).argmax(0)`` without the (K, H, W) array (``kernels.upsample_argmax``:
    3-5x faster at K = 11-33). Labels differ only where two classes tie to float32 rounding, about 1 pixel
    in 10^6 on CamVid."""
    k, h, w = scores.shape
    rows = bilinear_sources(h, size[0])
    cols = bilinear_sources(w, size[1])
    out = np.empty(size, dtype=np.int64)
    kernels.upsample_argmax(np.ascontiguousarray(scores.transpose(1, 2, 0), dtype=np.float32), *rows, *cols, out)
    return out


def upsample_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a label map (h, w) to (H, W); -1 (unlabelled) is kept."""
    t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="nearest")[0, 0].numpy().astype(np.int64)


def softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


# Bound slack on a cosine similarity: far above float32 rounding of the stored bounds (~1e-7), so a
# centroid is skipped only when it cannot be the nearest.
_SIMILARITY_SLACK = 1e-5


def _unit_rows(sums: np.ndarray) -> np.ndarray:
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-30)).astype(np.float32)


def spherical_kmeans(x: np.ndarray, k: int, seed: int, iterations: int = 50, bounds: bool = True,
                     init: np.ndarray | None = None, progress: Callable = lambda it, **_: it) -> np.ndarray:
    """Cosine k-means (Lloyd) on the rows of ``x`` (n, d), normalised first unless they are unit-norm already:
    unit-norm centroids (k, d).

    All-zero rows (no direction) take no part. Starts from k distinct rows drawn with ``seed`` (or from the
    caller's ``init`` centroids); each of
    ``iterations`` rounds assigns every row to its most similar centroid (first one on ties), then sets each
    centroid to its rows' normalised float64 sum. A cluster left empty takes the row least similar to its
    centroid among clusters of two rows or more. Similarities are float64 sums of exact products
    (``kernels.dot64``), so the result does not depend on the BLAS or the thread count.

    That loop's result, computed faster (Elkan, ICML 2003; ``kernels.kmeans_assign_bounded``):
    triangle-inequality bounds on each row's distance to every centroid, loosened by how far each centroid
    moved, skip the comparisons that cannot change a row's cluster. The cluster sums follow the rows that
    change cluster instead of being summed afresh: they differ by float64 rounding (~1e-15), which reaches
    a float32 centroid only at a rounding boundary (not seen on features; rows whose components span 14
    orders of magnitude show it). ``bounds=False`` compares every row with every centroid and sums afresh
    at every step (the plain loop, for tests and benchmarks). ``progress`` wraps the steps (a run's bar: a
    large K takes minutes)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    squared_norms = np.einsum("ij,ij->i", x, x)  # one pass: NaN and inf reach the sums, zero rows sum to 0
    if not np.isfinite(squared_norms).all():
        raise UserError("the features hold NaN or infinite values -- the backbone's weights or inputs are broken; "
                        "once fixed, delete the backbone's entry in the feature cache (--cache) and run again")
    directed = squared_norms > 0
    if not directed.all():
        x = x[directed]
    if np.abs(squared_norms[directed] - 1.0).max(initial=0.0) > 1e-4:  # the bounds hold for unit rows only
        x = l2_normalize(x)
    n, d = x.shape
    if n < k:
        nonzero = "" if directed.all() else " with non-zero features"
        raise UserError(f"K={k} clusters need at least {k} patches{nonzero} to fit on, got {n} -- lower --k, or use "
                        f"more or larger images")
    if init is None:
        centroids = x[np.random.default_rng(seed).choice(n, k, replace=False)]
    else:  # the caller's seeds (e.g. k-means++), as unit rows
        centroids = _unit_rows(np.asarray(init, dtype=np.float64))
    labels = np.empty(n, dtype=np.int64)
    upper = np.empty(n, dtype=np.float32)      # >= distance to the own centroid
    lower = np.empty((n, k), dtype=np.float32)  # <= distance to every other centroid (own: unused)
    kernels.kmeans_assign_all(x, centroids, labels, upper, lower, _SIMILARITY_SLACK)
    sums = kernels.cluster_sums(x, labels, k)
    for step in progress(range(1, iterations + 1), desc="k-means", total=iterations, unit="steps"):
        if _fill_empty_clusters(x, centroids, labels, sums, upper, lower) and not bounds:
            sums = kernels.cluster_sums(x, labels, k)  # the plain loop sums afresh
        if step == iterations:
            break
        moved_to = _unit_rows(sums)
        if bounds:
            # rounded up by more than float32 rounding of the bound updates (< 2.4e-7 per step)
            moved = (np.linalg.norm(moved_to - centroids, axis=1) * (1 + 1e-6) + 1e-6).astype(np.float32)
            centroids = moved_to
            # half the distance between two centroids, rounded down by the slack: a row closer than that to
            # its own centroid cannot be nearer the other (Elkan's lemma 1)
            c = centroids.astype(np.float64)
            half_gap = (np.sqrt(np.maximum(2.0 - 2.0 * (c @ c.T + _SIMILARITY_SLACK), 0.0)) / 2).astype(np.float32)
            np.fill_diagonal(half_gap, np.inf)
            kernels.kmeans_assign_bounded(x, centroids, labels, upper, lower, moved, half_gap, sums,
                                          _SIMILARITY_SLACK)
        else:
            centroids = moved_to
            kernels.kmeans_assign_all(x, centroids, labels, upper, lower, _SIMILARITY_SLACK)
            sums = kernels.cluster_sums(x, labels, k)
    return _unit_rows(sums)


def _fill_empty_clusters(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, sums: np.ndarray,
                         upper: np.ndarray, lower: np.ndarray) -> bool:
    """Each empty cluster takes the row least similar to its own centroid (from a cluster that keeps a row);
    the moved rows are compared with every centroid at the next step. Returns whether any row moved."""
    counts = np.bincount(labels, minlength=len(centroids))
    empty = np.flatnonzero(counts == 0)
    if not len(empty):
        return False
    own = kernels.own_similarity(x, centroids, labels)
    for cluster in empty:
        row = int(np.where(counts[labels] > 1, own, np.inf).argmin())
        source = labels[row]
        sums[source] -= x[row]
        sums[cluster] += x[row]
        counts[source] -= 1
        counts[cluster] += 1
        labels[row] = cluster
        own[row] = np.inf
        upper[row] = np.inf
        lower[row, source] = 0.0  # it was the own centroid (no bound kept): 0 is a valid lower bound
    return True


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Assignment of each row to its closest centroid (squared L2) and the (n, k) negative distances."""
    x = np.asarray(x, dtype=np.float32)
    d = (x * x).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None]
    return d.argmin(1), -d


def sample_rows(n_total: int, n_max: int, seed: int) -> np.ndarray:
    """Sorted row indices of a uniform sample (all rows when there are few enough)."""
    if n_total <= n_max:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, n_max, replace=False))
