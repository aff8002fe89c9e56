"""DatUS^2's segment discovery (Kumar, Sur, Baruah; arXiv 2401.12820): Louvain communities of the key graph.

Per image, a graph on the patch grid with an edge wherever two last-block keys have a positive dot product
(paper Eq. 1), Louvain communities on it, every community split into 8-connected components on the grid;
components with more than ``tau`` patches are valid segments, the rest noise.

Reading of the authors' code (github.com/SonalKumar95/DatUS), followed unless noted:
- adjacency is binary (``adj = A > 0``), not weighted by A; ``weighted=True`` is offered as an option. Their
  matrix also sets the diagonal (A_ii > 0); we leave self-loops out so every backend and ``modularity`` share
  one convention (a loop only adds a constant to each degree).
- their Louvain is scikit-network's; we use python-louvain (the algorithm the design names) or igraph's C
  multilevel Louvain, which reaches the same modularity (tested) and is much faster.
- grouping uses 8-neighbourhood BFS on the grid, validity is ``len(segment) > 5``.
"""

from __future__ import annotations

import random

import numpy as np

from ...errors import UserError
from ...registry import is_number, is_whole
from ..regions import split_into_segments, upsample_nearest

BACKENDS = ("louvain", "igraph")


def key_adjacency(keys: np.ndarray, weighted: bool = False) -> np.ndarray:
    """Dense symmetric adjacency (n, n) of flattened keys (n, d): edge where k_i . k_j > 0.

    Binary like the authors' code unless ``weighted`` (then the edge weight is the dot product).
    The diagonal is zero (no self-loops, see module docstring).
    """
    k = np.asarray(keys, dtype=np.float64).reshape(-1, np.shape(keys)[-1])
    affinity = k @ k.T
    adjacency = np.where(affinity > 0, affinity if weighted else 1.0, 0.0)
    np.fill_diagonal(adjacency, 0.0)
    return adjacency


def modularity(adjacency: np.ndarray, communities: np.ndarray, resolution: float = 1.0) -> float:
    """Newman modularity of a partition of a symmetric loop-free weighted graph.

    Computed here, not by a backend, so partitions from different backends are scored alike.
    """
    adjacency = np.asarray(adjacency, dtype=np.float64)
    _, comm = np.unique(np.asarray(communities).ravel(), return_inverse=True)
    total = adjacency.sum()
    if total <= 0:
        return 0.0
    onehot = np.zeros((comm.size, comm.max() + 1))
    onehot[np.arange(comm.size), comm] = 1.0
    internal = np.einsum("ic,ij,jc->c", onehot, adjacency, onehot)
    degree = onehot.T @ adjacency.sum(1)
    return float((internal / total - resolution * (degree / total) ** 2).sum())


def detect_communities(
    adjacency: np.ndarray, seed: int = 0, backend: str = "louvain", resolution: float = 1.0
) -> np.ndarray:
    """Modularity communities of a dense adjacency: int64 (n,), ids 0..C-1."""
    n = adjacency.shape[0]
    binary = bool(np.all((adjacency == 0) | (adjacency == 1)))  # no weight attribute: faster
    if backend == "louvain":
        import community as community_louvain
        import networkx as nx

        graph = nx.Graph()
        graph.add_nodes_from(range(n))
        rows, cols = np.nonzero(np.triu(adjacency, 1))
        if binary:
            graph.add_edges_from(zip(rows.tolist(), cols.tolist()))
        else:
            graph.add_weighted_edges_from(zip(rows.tolist(), cols.tolist(), adjacency[rows, cols].tolist()))
        part = community_louvain.best_partition(graph, resolution=resolution, random_state=seed)
        labels = np.array([part[i] for i in range(n)], dtype=np.int64)
    elif backend == "igraph":
        import igraph as ig

        # building from the matrix is ~5x faster than from an edge list (C-side loop)
        if binary:
            graph, w = ig.Graph.Adjacency(adjacency.astype(np.int8), mode="upper", loops=False), None
        else:
            graph = ig.Graph.Weighted_Adjacency(adjacency, mode="upper", loops=False)
            w = "weight"
        # igraph's multilevel shuffles the vertex order with its global RNG: seed it, then restore
        ig.set_random_number_generator(random.Random(seed))
        try:
            labels = np.array(graph.community_multilevel(weights=w, resolution=resolution).membership)
        finally:
            ig.set_random_number_generator(random)
    else:
        raise ValueError(f"unknown community backend {backend!r}; expected one of {BACKENDS}")
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


def discover_segments(
    keys: np.ndarray,
    tau: int = 5,
    seed: int = 0,
    backend: str = "louvain",
    weighted: bool = False,
    resolution: float = 1.0,
) -> tuple[np.ndarray, dict]:
    """Segments of one image from its keys (h, w, d): (segment_map int64 (h, w), info dict).

    The info holds n_communities, n_segments (J), n_valid and valid_sizes (patches each).
    """
    h, w = keys.shape[:2]
    adjacency = key_adjacency(keys.reshape(h * w, -1), weighted=weighted)
    communities = detect_communities(adjacency, seed=seed, backend=backend, resolution=resolution)
    segment_map, info = split_into_segments(communities.reshape(h, w), tau=tau)
    info["n_communities"] = info.pop("n_groups")
    return segment_map, info


class Louvain:
    """The segmenter stage: ``discover_segments`` on the run's keys, seeded by the run's seed."""

    marks_background = False

    def __init__(self, tau: int = 5, backend: str = "igraph", weighted: bool = False, resolution: float = 1.0,
                 seed: int = 0):
        self.tau, self.backend, self.weighted, self.resolution, self.seed = tau, backend, weighted, resolution, seed

    @classmethod
    def from_context(cls, ctx, **params):
        return cls(**params, seed=ctx.seed)

    def segment(self, features: dict, image=None) -> tuple[np.ndarray, dict]:
        return discover_segments(features["key"], tau=self.tau, seed=self.seed, backend=self.backend,
                                 weighted=self.weighted, resolution=self.resolution)


def check_params(p: dict) -> None:
    """One-line errors before any work (the stage file's ``validate`` hook)."""
    if p["backend"] not in BACKENDS:
        raise UserError(f"backend={p['backend']!r} -- use one of {', '.join(BACKENDS)}")
    if not is_whole(p["tau"]) or p["tau"] < 0:
        raise UserError(f"tau={p['tau']!r} -- use a whole number of patches >= 0 (-p segmenter.tau=5)")
    if not is_number(p["resolution"]) or p["resolution"] < 0:
        raise UserError(f"resolution={p['resolution']!r} -- use a number >= 0 (-p segmenter.resolution=1.0)")


def synthetic_keys(
    h: int, w: int, dim: int = 64, n_regions: int = 4, noise: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Blocky regions with one random key direction each plus Gaussian noise: (keys, regions).

    A shared offset makes most dot products positive, as with real ViT keys, so the graph is
    dense: a realistic load for timing ``discover_segments`` (e.g. 28x28 and 40x40 grids).
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, n_regions, size=(max(1, h // 7), max(1, w // 7)))
    regions = upsample_nearest(coarse, (h, w))
    centres = rng.normal(size=(n_regions, dim)) + 0.3
    keys = centres[regions] + noise * rng.normal(size=(h, w, dim))
    return keys.astype(np.float32), regions
