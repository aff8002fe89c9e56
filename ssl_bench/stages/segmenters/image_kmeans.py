"""Per-image k-means of the patch features: the plain baseline the learned and spectral segmenters are
compared with (ACSeg's "k-means on the same patch features"; Deep Spectral Methods' ``kmeans_baseline``)."""

from __future__ import annotations

import numpy as np

from ...errors import UserError
from ...ops import l2_normalize, spherical_kmeans
from ..regions import split_into_segments


class ImageKMeans:
    """The segmenter stage ``image-kmeans``: cosine k-means of one image's patches into ``segments`` groups."""

    marks_background = False
    uses_image = False

    def __init__(self, feature: str = "patch", segments: int = 5, iterations: int = 20, tau: int = 0,
                 connected: bool = False, seed: int = 0):
        self.feature, self.segments, self.iterations = feature, segments, iterations
        self.tau, self.connected, self.seed = tau, connected, seed

    @classmethod
    def from_context(cls, ctx, **params):
        return cls(**params, seed=ctx.seed)

    def segment(self, features: dict, image=None) -> tuple[np.ndarray, dict]:
        grid = features[self.feature]
        h, w, d = grid.shape
        x = l2_normalize(grid.reshape(h * w, d))
        k = min(self.segments, len(np.unique(x, axis=0)))
        centroids = spherical_kmeans(x, k, self.seed, self.iterations)
        groups = (x @ centroids.T).argmax(1).reshape(h, w)
        return split_into_segments(groups, tau=self.tau, connected=self.connected)


def check_params(p: dict) -> None:
    if p["segments"] < 1 or p["iterations"] < 1:
        raise UserError("segments and iterations must be 1 or more (-p segmenter.segments=5)")
