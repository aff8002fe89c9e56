"""Deep Spectral Methods (Melas-Kyriazi, Rupprecht, Laina, Vedaldi, CVPR 2022): per-image eigen-segments.

Per image: the affinity W of the L2-normalised last-block keys (features of any cached kind), negative entries
set to 0, divided by its maximum, plus ``image_color_lambda`` times a colour kNN affinity of the image at
patch resolution (pymatting's kNN neighbourhoods, as the authors' ``knn_affinity``); the first
``eigenvectors`` solutions of the generalised problem (D - W) y = lambda D y (D the degrees); each
eigenvector's sign flipped when more than half but not all of its entries are positive; k-means on the
non-constant eigenvectors (each patch a point of ``eigenvectors`` - 1 dimensions) into ``segments``
segments; the segment touching the image border most is background (``background: true``, the authors'
``infer_bg_index``). The semantic step (crops -> CLS -> dataset k-means, adjacent regions of one label
merged by painting) is the composed task's; see tasks/dsm.yaml.

Reading of the authors' code (github.com/lukemelas/deep-spectral-segmentation, extract/extract.py):
defaults are its semantic-segmentation README's (5 eigenvectors, 15 segments per image, background
inference on, colour affinity off as in ``extract_eigs``); they solve the eigenproblem with ARPACK in
shift-invert mode at sigma = 0 on the dense Laplacian (``reference_eigenvectors``, kept for tests and the
benchmark). We solve the equivalent symmetric problem for the *largest* eigenvalues of
A = D^-1/2 W D^-1/2 (mu = 1 - lambda, y = D^-1/2 z) with Lanczos (ARPACK, which='LA', float32 products,
a fixed start vector): no factorisation of a singular matrix, the same eigenvalues to ~1e-8 (tested, and
measured by ``ssl-bench bench dsm``). Their per-image k-means is scikit-learn's unseeded KMeans (Lloyd from
k-means++ seeds, 10 restarts in the scikit-learn of the time); ours is the same algorithm seeded by the run's
seed (``small_kmeans``: Lloyd until no assignment changes, at most 300 iterations as scikit-learn's limit).
"""

from __future__ import annotations

import numpy as np

from ...errors import UserError
from ...ops import l2_normalize
from ..regions import border_background, split_into_segments


def feature_affinity(features: np.ndarray, normalize: bool = True, threshold_at_zero: bool = True) -> np.ndarray:
    """W (n, n) float32 of feature rows (n, d): cosine (dot products when ``normalize`` is off), negatives 0,
    divided by the largest entry (a no-op for unit rows, as the authors note)."""
    f = l2_normalize(features) if normalize else np.asarray(features, dtype=np.float32)
    w = f @ f.T
    if threshold_at_zero:
        np.maximum(w, 0, out=w)
    return w / max(float(w.max()), 1e-30)


def color_affinity(image: np.ndarray, n_neighbors=(20, 10), distance_weights=(2.0, 0.1)) -> np.ndarray:
    """Dense kNN colour affinity (n, n) of an RGB image (h, w, 3) in [0, 1]: 1 where one pixel is among the
    other's nearest in (r, g, b, weighted x, weighted y), at two scales (the authors' ``knn_affinity``)."""
    from pymatting.util.kdtree import knn
    from scipy import sparse

    h, w = image.shape[:2]
    r, g, b = image.reshape(-1, 3).T
    n = h * w
    x = np.tile(np.linspace(0, 1, w), h)
    y = np.repeat(np.linspace(0, 1, h), w)
    i, j = [], []
    for k, weight in zip(n_neighbors, distance_weights):
        points = np.stack([r, g, b, weight * x, weight * y], axis=1).astype(np.float32)
        _, neighbours = knn(points, points, k=min(k, n))
        i.append(np.repeat(np.arange(n), neighbours.shape[1]))
        j.append(neighbours.ravel())
    ij, ji = np.concatenate(i + j), np.concatenate(j + i)
    return sparse.csr_matrix((np.ones(len(ij)), (ij, ji)), (n, n)).toarray().astype(np.float32)


def _degrees(w: np.ndarray) -> np.ndarray:
    d = w.sum(1, dtype=np.float64)
    d[d < 1e-12] = 1.0  # as the authors' get_diagonal: no division by zero
    return d


def is_connected(w: np.ndarray) -> bool:
    """Whether the graph with edges where w > 0 is connected (breadth-first, a whole frontier per step)."""
    reached = np.zeros(len(w), dtype=bool)
    frontier = np.zeros(len(w), dtype=bool)
    frontier[0] = reached[0] = True
    while frontier.any():
        frontier = (w[frontier] > 0).any(0) & ~reached
        reached |= frontier
    return bool(reached.all())


def laplacian_eigenvectors(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest eigenvalues (k,) and D-normalised eigenvectors (k, n) of (D - W) y = lambda D y, with
    the authors' sign rule; Lanczos on A = D^-1/2 W D^-1/2 (largest eigenvalues, float32 products).

    A disconnected graph has eigenvalue 0 once per component, and a Krylov method from one start vector finds
    one copy of a repeated eigenvalue only: such graphs (and tiny ones) are solved densely instead."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    n = len(w)
    k = min(k, n)
    d = _degrees(w)
    scale = (1.0 / np.sqrt(d)).astype(np.float32)
    a = w * scale[:, None]
    a *= scale[None, :]
    if n <= max(2 * k + 1, 64) or not is_connected(w):
        mu, z = np.linalg.eigh(a.astype(np.float64))
        mu, z = mu[::-1][:k], z[:, ::-1][:, :k]
    else:
        op = LinearOperator((n, n), matvec=lambda v: a @ v.astype(np.float32), dtype=np.float64)
        mu, z = eigsh(op, k=k, which="LA", tol=1e-8, v0=np.sqrt(d))  # sqrt(d): A's top eigenvector
        order = np.argsort(-mu, kind="stable")
        mu, z = mu[order], z[:, order]
    vectors = (z / np.sqrt(d)[:, None]).T  # y = D^-1/2 z: y^T D y = 1, as eigsh(..., M=D) returns them
    return 1.0 - mu, flip_signs(vectors)


def reference_eigenvectors(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The authors' computation: ARPACK shift-invert at sigma = 0 on the dense (D - W) with M = D (falling back
    to which='SM' when the factorisation fails, as they do); smallest first, sign rule applied."""
    from scipy.sparse.linalg import eigsh

    w = np.asarray(w, dtype=np.float64)
    degrees = np.diag(_degrees(w))
    try:
        values, vectors = eigsh(degrees - w, k=k, sigma=0, which="LM", M=degrees)
    except Exception:  # noqa: BLE001 -- the authors' fallback, whatever ARPACK raised
        values, vectors = eigsh(degrees - w, k=k, which="SM", M=degrees)
    order = np.argsort(values)
    return values[order], flip_signs(vectors[:, order].T)


def flip_signs(vectors: np.ndarray) -> np.ndarray:
    """The authors' sign rule: an eigenvector with more than half, but not all, entries positive is negated."""
    positive = (vectors > 0).mean(1)
    flip = (positive > 0.5) & (positive < 1.0)
    return np.where(flip[:, None], -vectors, vectors)


def eigen_segments(vectors: np.ndarray, segments: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Per-patch segment ids (n,): k-means of the non-constant eigenvectors (rows 1: of ``vectors``), Lloyd from
    k-means++ seeds with ``n_init`` restarts (``clusterers.kmeans.small_kmeans``)."""
    from ..clusterers.kmeans import small_kmeans

    points = (vectors[1:] if len(vectors) > 1 else vectors).T
    segments = min(segments, len(np.unique(points, axis=0)))  # fewer distinct points than segments
    return small_kmeans(points, segments, seed, n_init)


def adaptive_segments(eigenvalues: np.ndarray) -> int:
    """The authors' adaptive count: 1 + the index of the largest gap between consecutive eigenvalues (not the
    first gap)."""
    gaps = np.argsort(np.diff(eigenvalues))[::-1]
    gaps = gaps[gaps != 0]
    return int(gaps[0]) + 1 if gaps.size else 1


def downsample_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGB image in [0, 1] at (h, w), bilinear (PIL), as the authors' low-resolution image."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR), dtype=np.float64) / 255.0


class DeepSpectral:
    """The segmenter stage ``dsm``."""

    def __init__(self, feature: str = "key", eigenvectors: int = 5, segments: int = 15, adaptive: bool = False,
                 image_color_lambda: float = 0.0, background: bool = True, kmeans_n_init: int = 10, seed: int = 0):
        self.feature, self.eigenvectors, self.segments, self.adaptive = feature, eigenvectors, segments, adaptive
        self.image_color_lambda, self.marks_background = image_color_lambda, background
        self.kmeans_n_init, self.seed = kmeans_n_init, seed
        self.uses_image = image_color_lambda > 0

    @classmethod
    def from_context(cls, ctx, **params):
        return cls(**params, seed=ctx.seed)

    def affinity(self, grid: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        h, w, d = grid.shape
        affinity = feature_affinity(grid.reshape(h * w, d))
        if self.image_color_lambda > 0:
            affinity += self.image_color_lambda * color_affinity(downsample_image(image, (h, w)))
        return affinity

    def segment(self, features: dict, image: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        grid = features[self.feature]
        h, w = grid.shape[:2]
        values, vectors = laplacian_eigenvectors(self.affinity(grid, image), self.eigenvectors)
        count = adaptive_segments(values) if self.adaptive else self.segments
        groups = eigen_segments(vectors, count, self.seed, self.kmeans_n_init).reshape(h, w)
        if self.marks_background:
            groups = border_background(groups)
        segment_map, info = split_into_segments(groups, tau=0, connected=False)  # a segment may be disjoint
        info["background_patches"] = int((segment_map < -1).sum())
        return segment_map, info


def check_params(p: dict) -> None:
    if p["eigenvectors"] < 2:
        raise UserError(f"eigenvectors={p['eigenvectors']} -- DSM needs the constant one and at least one more "
                        f"(-p segmenter.eigenvectors=5)")
    if p["segments"] < 1 or p["kmeans_n_init"] < 1:
        raise UserError("segments and kmeans_n_init must be 1 or more (-p segmenter.segments=15)")
    if p["image_color_lambda"] < 0:
        raise UserError(f"image_color_lambda={p['image_color_lambda']} -- use 0 (off) or a positive weight")


def benchmark(grids: tuple[int, ...] = (28, 40), images: int = 4, k: int = 5, repeats: int = 3,
              threads: int = 1) -> dict:
    """DSM's eigen step per image at 28x28 and 40x40 patch grids, ours (Lanczos on the normalised affinity)
    against the authors' (shift-invert ``eigsh(sigma=0)`` on the dense Laplacian) in the same run on the same
    affinities, with the largest eigenvalue difference; and the whole per-image segmenter (affinity, eigen
    step, k-means of the eigenvectors). Keys: a random-weight dino-vits8 on CamVid val at 224 / 320 px
    (28x28 / 40x40 patches) when ../shared/data is there, and synthetic structured keys (384-d) always."""
    import time

    from ...ops import set_threads
    from .louvain import synthetic_keys, vit_keys

    set_threads(threads)

    def best(call):
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = call()
            seconds.append(time.perf_counter() - t0)
        return min(seconds), out

    rows = []
    for side in grids:
        inputs = {"synthetic keys (384-d)": [synthetic_keys(side, side, dim=384, seed=i)[0] for i in range(images)]}
        inputs.update(vit_keys(side, images))
        for name, keys in inputs.items():
            for grid in keys:
                w = feature_affinity(grid.reshape(side * side, -1))
                laplacian_eigenvectors(w, k)  # warm-up (first-call set-up is not per-image cost)
                ours_s, (ours, _) = best(lambda: laplacian_eigenvectors(w, k))
                theirs_s, (theirs, _) = best(lambda: reference_eigenvectors(w.astype(np.float64), k))
                segment_s, _ = best(lambda: DeepSpectral(eigenvectors=k).segment({"key": grid}))
                rows.append({"grid": f"{side}x{side}", "keys": name, "ours_s": ours_s, "reference_s": theirs_s,
                             "speedup": theirs_s / ours_s, "max_eigenvalue_difference": float(np.abs(ours - theirs).max()),
                             "segmenter_s": segment_s})
    summary = {}
    for row in rows:
        key = f"{row['grid']} {row['keys']}"
        summary.setdefault(key, []).append(row)
    return {"threads": threads, "eigenvectors": k, "repeats": repeats,
            "summary": {key: {"ours_s_per_image": float(np.mean([r["ours_s"] for r in group])),
                              "reference_s_per_image": float(np.mean([r["reference_s"] for r in group])),
                              "speedup": float(np.mean([r["reference_s"] for r in group]) /
                                               np.mean([r["ours_s"] for r in group])),
                              "max_eigenvalue_difference": max(r["max_eigenvalue_difference"] for r in group),
                              "segmenter_s_per_image": float(np.mean([r["segmenter_s"] for r in group])),
                              "images": len(group)} for key, group in summary.items()},
            "rows": rows}
