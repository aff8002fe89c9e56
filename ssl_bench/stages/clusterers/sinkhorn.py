"""Optimal-transport clustering: k-means whose assignment step is a Sinkhorn-balanced soft assignment.

As the semester project (paper 003, Sec. 3.2.2 and 4.2.1) describes it: ``k`` centroids drawn at random
(seeded: k distinct regions; ``init: kmeans++`` draws them by k-means++ instead); at each of ``iterations`` = 200 updates the cosine similarities of regions to
centroids, divided by ``temperature`` = 0.02, go through ``sinkhorn_iterations`` = 10 Sinkhorn-Knopp
normalisations towards an equipartition (every cluster the same total mass, every region mass 1: Cuturi
2013, as SwAV uses it), and each centroid becomes the assignment-weighted mean of the regions (re-normalised:
similarities are cosines). A region's cluster is the largest entry of its last soft assignment; held-out
regions take the most similar centroid (balancing them too would assume their class frequencies).
The normalisations run in float64 on the kernel exp(scores - max) (``sinkhorn``; ``sinkhorn_log``, the same
iterations in the log domain, is the reference its test compares with).

Measured, not promised: at temperature 0.02, 10 normalisations balance soft assignments only where the
regions' similarities to the centroids are close; between well-separated groups the kernel spans e^30 and the
assignment stays nearly that of k-means, so two initial centroids in one group may stay there (as with
k-means, ``init: kmeans++`` makes that unlikely).
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import UserError
from ...ops import l2_normalize
from . import InputTransform, check_enough_rows
from .kmeans import kmeans_pp_init

INITS = ("random", "kmeans++")


def sinkhorn(scores: torch.Tensor, iterations: int) -> torch.Tensor:
    """The balanced assignment (n, k) from scores (n, k): rows sum to 1, columns to n / k. The iterations of
    ``sinkhorn_log`` on the kernel exp(scores - max) itself: one exp per call instead of two per iteration (the
    same normalisations, so the same assignment up to float64 rounding; float64 holds the kernel's e^-2/T = e^-100
    at the default temperature with room to spare)."""
    n, k = scores.shape
    q = torch.exp(scores - scores.max())
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(0, keepdim=True) * k  # each cluster total 1 / k
        q /= q.sum(1, keepdim=True) * n  # each region total 1 / n
    return q * n


def sinkhorn_log(scores: torch.Tensor, iterations: int) -> torch.Tensor:
    """Log of the balanced assignment (n, k) from scores (n, k): rows sum to 1, columns to n / k."""
    n, k = scores.shape
    log_q = scores - torch.logsumexp(scores.reshape(-1), 0)
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, 0, keepdim=True) - np.log(k)  # each cluster total 1 / k
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True) - np.log(n)  # each region total 1 / n
    return log_q + np.log(n)


class SinkhornKMeans:
    """The clusterer stage ``sinkhorn``."""

    def __init__(self, k: int, seed: int = 0, temperature: float = 0.02, sinkhorn_iterations: int = 10,
                 iterations: int = 200, init: str = "random", normalize: bool = True, standardize: bool = False,
                 pca_dim: int = 0):
        self.k, self.seed, self.temperature, self.init = k, seed, temperature, init
        self.sinkhorn_iterations, self.iterations = sinkhorn_iterations, iterations
        self.transform = InputTransform(normalize, standardize, pca_dim)

    def fit(self, x: np.ndarray) -> "SinkhornKMeans":
        x = l2_normalize(self.transform.fit_transform(x), eps=1e-12)
        check_enough_rows(len(x), self.k)
        rows = torch.from_numpy(x.astype(np.float64))
        rng = np.random.default_rng(self.seed)
        if self.init == "random":
            centroids = rows[torch.from_numpy(rng.choice(len(x), self.k, replace=False))]
        else:
            centroids = torch.from_numpy(kmeans_pp_init(x, self.k, rng).astype(np.float64))
        for _ in range(self.iterations):
            weights = sinkhorn(rows @ centroids.T / self.temperature, self.sinkhorn_iterations)
            sums = weights.T @ rows
            centroids = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-30)
        self.centroids_ = centroids.numpy().astype(np.float32)
        self.weights_ = weights.numpy()
        self.labels_ = self.weights_.argmax(1).astype(np.int64)
        self.uncertainty_ = 1.0 - self.weights_.max(1)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = l2_normalize(self.transform.transform(x), eps=1e-12)
        return (x @ self.centroids_.T).argmax(1).astype(np.int64)


def check_params(p: dict) -> None:
    if p["init"] not in INITS:
        raise UserError(f"init={p['init']!r} -- use one of {', '.join(INITS)} (-p clusterer.init=random)")
    if not p["temperature"] > 0:
        raise UserError(f"temperature={p['temperature']} -- use a positive number (-p clusterer.temperature=0.02)")
    for key in ("sinkhorn_iterations", "iterations"):
        if p[key] < 1:
            raise UserError(f"{key}={p[key]} -- use 1 or more (-p clusterer.{key}=...)")
