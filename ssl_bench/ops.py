"""Small numeric helpers shared by several methods (arrays in, arrays out)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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
    """Torch, faiss (OpenMP) and numpy's BLAS thread counts, for this process: a fixed count keeps torch's
    float reductions in one order run after run, and makes a benchmark's thread count mean what it says."""
    import faiss
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")


def upsample_scores(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of per-class scores (K, h, w) to (K, H, W), as STEGO/PriMaPs do before argmax."""
    t = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()


class UpsampleArgmax:
    """Labels (H, W) = argmax (first maximum) of bilinearly upsampled scores (K, h, w), image after image.

    Upsampled channels-last, so each pixel's K scores are contiguous for the argmax (2.5-4x faster than
    channels-first), into one buffer reused while K and the size stay the same: a fresh multi-megabyte
    tensor per image costs as much in page faults as the interpolation. Channels-last rounds differently
    in the last bit, which changes a label only at exact float ties (about 1 pixel in 10^6 on CamVid)."""

    def __init__(self):
        self._buffer: torch.Tensor | None = None

    def __call__(self, scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))[None]
        t = t.contiguous(memory_format=torch.channels_last)
        shape = (1, t.shape[1], *size)
        if self._buffer is None or tuple(self._buffer.shape) != shape:
            self._buffer = torch.empty(shape).contiguous(memory_format=torch.channels_last)
        torch.ops.aten.upsample_bilinear2d.out(t, list(size), False, None, None, out=self._buffer)
        return self._buffer[0].permute(1, 2, 0).numpy().argmax(-1)  # numpy: faster over a short last axis


def upsample_argmax(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One image's labels; ``UpsampleArgmax`` does the same for a stream of images, reusing its buffer."""
    return UpsampleArgmax()(scores, size)


def upsample_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a label map (h, w) to (H, W); -1 (unlabelled) is kept."""
    t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="nearest")[0, 0].numpy().astype(np.int64)


def softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


# Bound slack on a cosine similarity: above float32 rounding of a dot product of unit vectors (~1e-6 at
# d = 384), so a row is skipped only when its nearest centroid cannot have changed.
_SIMILARITY_SLACK = 1e-5


def _chord(similarity: np.ndarray) -> np.ndarray:
    """Euclidean distance between unit vectors of this cosine similarity (a metric: the bounds need one)."""
    return np.sqrt(np.maximum(2.0 - 2.0 * similarity, 0.0))


def _unit_rows(sums: np.ndarray) -> np.ndarray:
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-30)).astype(np.float32)


def _move_rows(sums: np.ndarray, rows: np.ndarray, source: np.ndarray, target: np.ndarray) -> None:
    """Cluster sums (float64) after ``rows`` (m, d) leave clusters ``source`` (-1: none) for ``target``."""
    moves = np.zeros((len(sums), len(rows)))
    columns = np.arange(len(rows))
    moves[target, columns] = 1.0
    left = source >= 0
    moves[source[left], columns[left]] -= 1.0
    sums += moves @ rows.astype(np.float64)


def _cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    sums = np.zeros((k, x.shape[1]))
    for cluster in range(k):
        sums[cluster] = x[labels == cluster].sum(0, dtype=np.float64)
    return sums


def spherical_kmeans(x: np.ndarray, k: int, seed: int, iterations: int = 50, bounds: bool = True) -> np.ndarray:
    """Cosine k-means (Lloyd) on unit-norm rows of ``x`` (n, d): unit-norm centroids (k, d).

    All-zero rows (no direction) take no part. Starts from k distinct rows drawn with ``seed``; each of
    ``iterations`` rounds assigns every row to its most similar centroid (first one on ties), then sets each
    centroid to its rows' normalised sum. A cluster left empty takes the row least similar to its centroid
    among clusters of two rows or more.

    The plain loop's result, computed faster (Elkan, ICML 2003): triangle-inequality bounds on each row's
    distance to every centroid, loosened by how far each centroid moved, skip the rows whose nearest
    centroid cannot have changed; only the others are compared with all k centroids. Centroid sums are
    kept in float64 and updated from the rows that changed cluster. ``bounds=False`` compares every row at
    every step (the plain loop, for benchmarks)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    squared_norms = np.einsum("ij,ij->i", x, x)  # one pass: NaN and inf reach the sums, zero rows sum to 0
    if not np.isfinite(squared_norms).all():
        raise UserError("the features hold NaN or infinite values -- the backbone's weights or inputs are broken; "
                        "once fixed, delete the backbone's entry in the feature cache (--cache) and run again")
    directed = squared_norms > 0
    if not directed.all():
        x = x[directed]
    n, d = x.shape
    if n < k:
        nonzero = "" if directed.all() else " with non-zero features"
        raise UserError(f"K={k} clusters need at least {k} patches{nonzero} to fit on, got {n} -- lower --k, or use "
                        f"more or larger images")
    centroids = x[np.random.default_rng(seed).choice(n, k, replace=False)]
    labels = np.full(n, -1)
    upper = np.full(n, np.inf, dtype=np.float32)     # >= distance to the own centroid
    lower = np.zeros((k, n), dtype=np.float32)       # <= distance to every other centroid (inf: own);
    #                                                  k rows: the min over centroids is then 10x faster
    sums = np.zeros((k, d))
    for step in range(iterations):
        if step:
            moved_to = _unit_rows(sums)
            # rounded up by more than float32 rounding of the bound updates below (< 2.4e-7 per step)
            moved = np.linalg.norm(moved_to - centroids, axis=1) * (1 + 1e-6) + 1e-6
            centroids = moved_to
            upper += moved[labels]
            lower -= moved[:, None]
        stale = np.flatnonzero(upper > lower.min(0)) if bounds else np.arange(n)
        if len(stale):
            similarity = (x if len(stale) == n else x[stale]) @ centroids.T
            nearest = similarity.argmax(1)
            at = np.arange(len(stale))
            upper[stale] = _chord(similarity[at, nearest] - _SIMILARITY_SLACK)
            distance = _chord(similarity + _SIMILARITY_SLACK)
            distance[at, nearest] = np.inf
            lower[:, stale] = distance.T
            changed = nearest != labels[stale]
            rows = stale[changed]
            if len(rows) > n // 8:  # summing afresh is cheaper than moving so many rows
                labels[rows] = nearest[changed]
                sums = _cluster_sums(x, labels, k)
            else:
                _move_rows(sums, x[rows], labels[rows], nearest[changed])
                labels[rows] = nearest[changed]
        _fill_empty_clusters(x, centroids, labels, sums, upper)
    return _unit_rows(sums)


def _fill_empty_clusters(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, sums: np.ndarray,
                         upper: np.ndarray) -> None:
    """Each empty cluster takes the row least similar to its own centroid (from a cluster that keeps a row);
    the moved rows are compared with every centroid at the next step."""
    counts = np.bincount(labels, minlength=len(centroids))
    empty = np.flatnonzero(counts == 0)
    if not len(empty):
        return
    own = np.concatenate([np.einsum("ij,ij->i", x[i:i + 65536], centroids[labels[i:i + 65536]])  # no (n, d) copy
                          for i in range(0, len(x), 65536)])
    for cluster in empty:
        candidates = np.where(counts[labels] > 1, own, np.inf)
        row = int(candidates.argmin())
        _move_rows(sums, x[row:row + 1], labels[row:row + 1], np.array([cluster]))
        counts[labels[row]] -= 1
        counts[cluster] += 1
        labels[row] = cluster
        own[row] = np.inf
        upper[row] = np.inf


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
