"""Spectral clustering of region embeddings with a nearest-neighbours affinity (COMUS, appendix Table 9).

As COMUS's code (github.com/zadaianchuk/comus, ``clustering/cluster.py``) does with scikit-learn: the
connectivity graph of each region's ``n_neighbors`` = 30 Euclidean nearest neighbours (itself included),
symmetrised as (A + A^T) / 2; the first ``n_components`` (= K) eigenvectors of its normalised Laplacian
(``sklearn.manifold.spectral_embedding``, AMG-preconditioned LOBPCG as COMUS runs it, the first eigenvector
kept); k-means with 10 restarts on them. ``uncertainty_`` is each region's cosine distance to its cluster
centre in that spectral embedding, what COMUS's filtering ranks.

Ours: the neighbours are found by faiss (exact search by default; ``knn: approx`` uses an HNSW index for
very large region sets), and a held-out split's regions take the majority cluster of their ``n_neighbors``
nearest clustered regions (spectral clustering has no out-of-sample rule of its own).
"""

from __future__ import annotations

import warnings

import numpy as np

from ...errors import UserError
from . import InputTransform, check_enough_rows

EIGEN_SOLVERS = ("amg", "arpack", "lobpcg")
KNN_SEARCHES = ("exact", "approx")


def knn_indices(x: np.ndarray, queries: np.ndarray, n_neighbors: int, search: str = "exact",
                seed: int = 0) -> np.ndarray:
    """Indices (len(queries), n_neighbors) of each query's nearest rows of ``x`` (Euclidean), nearest first."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if search == "exact":
        index = faiss.IndexFlatL2(x.shape[1])
    else:
        faiss.cvar.rand_seed = seed  # noqa -- the HNSW level draw; kept for determinism
        index = faiss.IndexHNSWFlat(x.shape[1], 32)
        index.hnsw.efSearch = max(64, 2 * n_neighbors)
    index.add(x)
    _, neighbours = index.search(queries, min(n_neighbors, len(x)))
    return neighbours.astype(np.int64)


def knn_affinity(x: np.ndarray, n_neighbors: int, search: str = "exact", seed: int = 0):
    """Symmetrised kNN connectivity (scikit-learn's ``kneighbors_graph(include_self=True)``, then (A + A^T)/2)."""
    from scipy import sparse

    n = len(x)
    neighbours = knn_indices(x, x, n_neighbors, search, seed)
    k = neighbours.shape[1]
    rows = np.repeat(np.arange(n), k)
    connectivity = sparse.csr_matrix((np.ones(n * k), (rows, neighbours.ravel())), shape=(n, n))
    connectivity.data[:] = 1.0  # a duplicate neighbour (possible with approximate search) counts once
    return 0.5 * (connectivity + connectivity.T)


def spectral_maps(affinity, n_components: int, eigen_solver: str = "amg", seed: int = 0) -> np.ndarray:
    """The spectral embedding (n, n_components) of an affinity graph, as scikit-learn computes it."""
    from sklearn.manifold import spectral_embedding

    if n_components >= affinity.shape[0]:  # as many eigenvectors as nodes: only the dense solver takes them
        affinity = affinity.toarray()
    with warnings.catch_warnings():
        # scikit-learn says when the graph is not connected and when it falls back from AMG to ARPACK on a
        # tiny graph; neither changes what is computed here, and both are expected on small splits
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return spectral_embedding(affinity, n_components=n_components, eigen_solver=eigen_solver,
                                  random_state=seed, eigen_tol=0.0, drop_first=False)


class Spectral:
    """The clusterer stage ``spectral``."""

    def __init__(self, k: int, seed: int = 0, n_neighbors: int = 30, n_components: int | None = None,
                 n_init: int = 10, eigen_solver: str = "amg", knn: str = "exact", normalize: bool = False,
                 standardize: bool = False, pca_dim: int = 0):
        self.k, self.seed, self.n_neighbors, self.n_init = k, seed, n_neighbors, n_init
        self.n_components = n_components or k
        self.eigen_solver, self.knn = eigen_solver, knn
        self.transform = InputTransform(normalize, standardize, pca_dim)

    def fit(self, x: np.ndarray) -> "Spectral":
        from sklearn.cluster import k_means

        x = self.transform.fit_transform(x)
        check_enough_rows(len(x), max(self.k, 2))
        self.x_ = x
        maps = spectral_maps(knn_affinity(x, self.n_neighbors, self.knn, self.seed), self.n_components,
                             self.eigen_solver, self.seed)
        centers, labels, _ = k_means(maps, self.k, random_state=self.seed, n_init=self.n_init)
        self.maps_, self.centers_, self.labels_ = maps, centers, labels.astype(np.int64)
        unit_maps = maps / np.maximum(np.linalg.norm(maps, axis=1, keepdims=True), 1e-12)
        unit_centers = centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
        self.uncertainty_ = 1.0 - (unit_maps * unit_centers[self.labels_]).sum(1)  # cosine distance, as COMUS
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        neighbours = knn_indices(self.x_, self.transform.transform(x), self.n_neighbors, self.knn, self.seed)
        votes = self.labels_[neighbours]
        counts = np.zeros((len(x), self.k), dtype=np.int64)
        np.add.at(counts, (np.repeat(np.arange(len(x)), votes.shape[1]), votes.ravel()), 1)
        return counts.argmax(1).astype(np.int64)  # ties: the lowest cluster id


def check_params(p: dict) -> None:
    if p["eigen_solver"] not in EIGEN_SOLVERS:
        raise UserError(f"eigen_solver={p['eigen_solver']!r} -- use one of {', '.join(EIGEN_SOLVERS)}")
    if p["knn"] not in KNN_SEARCHES:
        raise UserError(f"knn={p['knn']!r} -- use one of {', '.join(KNN_SEARCHES)} (-p clusterer.knn=exact)")
    for key in ("n_neighbors", "n_init"):
        if p[key] < 1:
            raise UserError(f"{key}={p[key]} -- use 1 or more (-p clusterer.{key}=...)")
