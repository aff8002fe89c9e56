"""Small numeric helpers shared by several methods (arrays in, arrays out)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-8) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def set_threads(threads: int) -> None:
    """Torch and faiss (OpenMP) thread counts: fixed counts keep float reductions in one order, run after run."""
    import faiss

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def _upsampled(scores: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0]


def upsample_scores(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of per-class scores (K, h, w) to (K, H, W), as STEGO/PriMaPs do before argmax."""
    return _upsampled(scores, size).numpy()


def upsample_argmax(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Labels (H, W) = argmax of the bilinearly upsampled scores (K, h, w), without a numpy copy of them."""
    up = _upsampled(scores, size)
    # A running max over the K contiguous maps: ~3x faster than argmax(0), which reduces along the
    # strided outer axis; strict ">" keeps the first maximum, as argmax does.
    best, labels = up[0].clone(), torch.zeros(up.shape[1:], dtype=torch.int64)
    for k in range(1, len(up)):
        better = up[k] > best
        labels[better] = k
        torch.maximum(best, up[k], out=best)
    return labels.numpy()


def upsample_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a label map (h, w) to (H, W); -1 (unlabelled) is kept."""
    t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="nearest")[0, 0].numpy().astype(np.int64)


def softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def kmeans(x: np.ndarray, k: int, seed: int, iterations: int = 50, redo: int = 1,
           spherical: bool = False) -> np.ndarray:
    """faiss k-means on rows of ``x``; returns centroids (k, d). Deterministic for a given seed.
    ``spherical`` keeps centroids on the unit sphere (cosine k-means of L2-normalised features)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) < k:
        raise ValueError(f"k-means needs at least k={k} points, got {len(x)}")
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, nredo=redo, seed=seed, verbose=False, spherical=spherical,
                      max_points_per_centroid=max(256, len(x) // k + 1))
    km.train(x)
    return km.centroids.copy()


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
