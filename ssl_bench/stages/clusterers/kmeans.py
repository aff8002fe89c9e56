"""k-means of region embeddings: Euclidean (Lloyd from k-means++ seeds; DatUS^2's) or cosine (spherical).

``metric: l2`` on L2-normalised rows is DatUS^2's clustering of crop embeddings: k-means++ seeding (faiss
seeds at random, which often merges well-separated classes) then faiss's Lloyd, ``n_init`` restarts of which
the lowest objective wins. The authors' full-rank PCA before MiniBatchKMeans is a rotation plus centring,
which leaves Euclidean k-means unchanged, so it is omitted; ``pca_dim`` reduces the dimension as Deep
Spectral Methods does (32 before its MiniBatchKMeans). ``metric: cosine`` is ``ops.spherical_kmeans`` (the
k-means baseline's exact Lloyd with Elkan's bounds, here from k-means++ seeds too). Table 5 of the semester project compares both, with and
without standardised inputs (``standardize``).
"""

from __future__ import annotations

import numpy as np

from ... import ops
from ...errors import UserError
from . import InputTransform, check_enough_rows

METRICS = ("l2", "cosine")


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability proportional to the squared distance to the
    nearest centre so far."""
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        i = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return np.stack(centres).astype(np.float32)


def lloyd_kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = 50, n_init: int = 1) -> np.ndarray:
    """Euclidean k-means (faiss Lloyd from seeded k-means++ seeds) of the rows of ``x``: centroids (k, d);
    with ``n_init`` > 1 the run with the lowest objective wins."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=int(rng.integers(2**31)), verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 30)  # no subsampling
        km.train(x, init_centroids=kmeans_pp_init(x, k, rng))
        if best is None or km.obj[-1] < best.obj[-1]:
            best = km
    return best.centroids.copy()


def small_kmeans(x: np.ndarray, k: int, seed: int = 0, n_init: int = 10, max_iterations: int = 300) -> np.ndarray:
    """Labels (n,) of Euclidean k-means on a few thousand low-dimensional rows (per-image k-means): Lloyd in
    numpy from k-means++ seeds until no assignment changes (at most ``max_iterations``), ``n_init`` restarts, the
    lowest objective wins. The algorithm of scikit-learn's KMeans without its per-call set-up, which costs
    more than the fit itself at this size."""
    x = np.asarray(x, dtype=np.float64)
    squared = (x * x).sum(1)
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        centroids = kmeans_pp_init(x, k, rng).astype(np.float64)
        labels = None
        for _ in range(max_iterations):
            distances = squared[:, None] - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None]
            new = distances.argmin(1)
            if labels is not None and (new == labels).all():
                break
            labels = new
            counts = np.bincount(labels, minlength=k)
            sums = np.stack([np.bincount(labels, weights=column, minlength=k) for column in x.T], 1)
            filled = counts > 0  # an emptied cluster keeps its centroid
            centroids[filled] = sums[filled] / counts[filled, None]
        objective = distances[np.arange(len(x)), labels].sum()
        if best is None or objective < best[0]:
            best = (objective, labels)
    return best[1].astype(np.int64)


class KMeans:
    """The clusterer stage ``kmeans``: fit on the clustered split's regions, nearest centroid elsewhere."""

    def __init__(self, k: int, seed: int = 0, metric: str = "l2", iterations: int = 50, n_init: int = 1,
                 normalize: bool = True, standardize: bool = False, pca_dim: int = 0):
        self.k, self.seed, self.metric, self.iterations, self.n_init = k, seed, metric, iterations, n_init
        self.transform = InputTransform(normalize, standardize, pca_dim)

    def fit(self, x: np.ndarray) -> "KMeans":
        x = self.transform.fit_transform(x)
        check_enough_rows(len(x), self.k)
        if self.metric == "l2":
            self.centroids_ = lloyd_kmeans(x, self.k, self.seed, self.iterations, self.n_init)
        else:
            best, unit = None, ops.l2_normalize(x)
            rng = np.random.default_rng(self.seed)
            for _ in range(self.n_init):  # restarts from other k-means++ seeds; the best objective wins
                seeds = kmeans_pp_init(unit, self.k, rng)
                centroids = ops.spherical_kmeans(unit, self.k, self.seed, self.iterations, init=seeds)
                objective = float((unit @ centroids.T).max(1).mean())
                if best is None or objective > best[0]:
                    best = (objective, centroids)
            self.centroids_ = best[1]
        self.labels_, self.uncertainty_ = self._assign(x)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._assign(self.transform.transform(x))[0]

    def _assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid of each row, and its distance (squared L2, or 1 - cosine)."""
        if self.metric == "l2":
            labels, negative = ops.nearest_centroid(x, self.centroids_)
            return labels.astype(np.int64), -negative[np.arange(len(x)), labels]
        scores = ops.l2_normalize(x) @ self.centroids_.T
        labels = scores.argmax(1)
        return labels.astype(np.int64), 1.0 - scores[np.arange(len(x)), labels]


def check_params(p: dict) -> None:
    if p["metric"] not in METRICS:
        raise UserError(f"metric={p['metric']!r} -- use one of {', '.join(METRICS)} (-p clusterer.metric=l2)")
    for key in ("iterations", "n_init"):
        if p[key] < 1:
            raise UserError(f"{key}={p[key]} -- k-means needs at least 1 (-p clusterer.{key}=1)")
