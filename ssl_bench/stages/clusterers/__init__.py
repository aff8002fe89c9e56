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
