"""Dataset-level clusterers of region embeddings (N, d): k-means, spectral, Sinkhorn/OT and attention-based.

Each is a small estimator, seeded and deterministic: ``Clusterer(k, seed, **params).fit(x)`` sets ``labels_``
(int64 (N,), ids 0..k-1) and ``predict(x)`` labels regions of another split. ``prepare`` is the input
transform they share (row L2-normalisation, the semester project's "norm/std" standardisation, PCA), fitted
on the clustered rows and applied unchanged to held-out ones.
"""

from __future__ import annotations

import numpy as np

from ...errors import UserError
from ...ops import l2_normalize


class InputTransform:
    """Row L2-normalisation, then per-dimension standardisation, then PCA: each optional, fitted once."""

    def __init__(self, normalize: bool = True, standardize: bool = False, pca_dim: int = 0):
        self.normalize, self.standardize, self.pca_dim = normalize, standardize, pca_dim
        self.mean = self.scale = self.components = None

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        x = self._normalized(x)
        if self.standardize:
            self.mean, self.scale = x.mean(0), x.std(0)
            self.scale[self.scale < 1e-12] = 1.0
        x = self._standardized(x)
        if self.pca_dim and self.pca_dim < x.shape[1]:
            self.center = x.mean(0)
            # right singular vectors of the centred rows: the principal axes, largest variance first
            _, _, vt = np.linalg.svd((x - self.center).astype(np.float64), full_matrices=False)
            self.components = _fixed_signs(vt[: self.pca_dim]).astype(np.float32)
        return self._projected(x)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return self._projected(self._standardized(self._normalized(x)))

    def _normalized(self, x):
        x = np.asarray(x, dtype=np.float32)
        return l2_normalize(x, eps=1e-12) if self.normalize else x

    def _standardized(self, x):
        return (x - self.mean) / self.scale if self.mean is not None else x

    def _projected(self, x):
        return np.ascontiguousarray((x - self.center) @ self.components.T) if self.components is not None else x


def _fixed_signs(vectors: np.ndarray) -> np.ndarray:
    """Each row with its largest-magnitude entry positive: a deterministic sign for a singular vector."""
    signs = np.sign(vectors[np.arange(len(vectors)), np.abs(vectors).argmax(1)])
    return vectors * np.where(signs == 0, 1, signs)[:, None]


def check_enough_rows(n: int, k: int, what: str = "regions") -> None:
    if n < k:
        raise UserError(f"K={k} clusters need at least {k} {what}, got {n} -- lower --k or use more images")


def filter_uncertain(labels: np.ndarray, uncertainty: np.ndarray, percent: float) -> np.ndarray:
    """Which regions to keep (bool (N,)): per cluster, the ``percent`` % of its regions with the largest
    ``uncertainty`` (a clusterer's ``uncertainty_``: distance to the cluster's centre) are dropped, that share of
    the cluster's size rounded half up (ties: the later region goes first). COMUS's Step 4, for any clusterer.

    COMUS's code keeps the regions strictly below the cluster's ``percent``-th percentile from the top
    (``np.percentile``, interpolated): the same count for clusters of 10 or 100 at 20%, one more dropped for
    some sizes, and a cluster of one region loses it; here a cluster of one keeps it."""
    labels, uncertainty = np.asarray(labels), np.asarray(uncertainty, dtype=np.float64)
    keep = np.ones(len(labels), dtype=bool)
    if percent <= 0:
        return keep
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        drop = int(np.floor(len(members) * percent / 100 + 0.5))
        if drop:
            by_distance = members[np.argsort(uncertainty[members], kind="stable")]
            keep[by_distance[len(members) - drop:]] = False
    return keep
