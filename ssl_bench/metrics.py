"""Streaming evaluation of unsupervised segmentation.

A (clusters x classes) pixel-count matrix is updated image by image, so memory is bounded by K x C
whatever the number of images; two states merge by addition (``merge``). Cluster ids are mapped
to classes only at the end: Hungarian matching on pixel counts when K <= C, majority vote (each cluster
to its most frequent class) when K > C. The policy used is returned with the metrics.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


class StreamingConfusion:
    """Pixel counts of (predicted cluster, true class); row ``-1`` collects unlabelled pixels."""

    def __init__(self, num_classes: int, num_clusters: int = 0):
        self.num_classes = num_classes
        self.counts = np.zeros((max(num_clusters, 1), num_classes), dtype=np.int64)
        self.unlabelled = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {pred.shape} and label {target.shape} differ in shape")
        pred = pred.ravel().astype(np.int64)
        target = target.ravel().astype(np.int64)
        valid = (target >= 0) & (target < self.num_classes)  # ignore pixels never count
        pred, target = pred[valid], target[valid]
        missing = pred < 0
        self.unlabelled += np.bincount(target[missing], minlength=self.num_classes)
        pred, target = pred[~missing], target[~missing]
        if pred.size == 0:
            return
        rows = int(pred.max()) + 1
        if rows > len(self.counts):
            self.counts = np.pad(self.counts, ((0, rows - len(self.counts)), (0, 0)))
        flat = np.bincount(pred * self.num_classes + target, minlength=rows * self.num_classes)
        self.counts[:rows] += flat.reshape(rows, self.num_classes)

    def merge(self, other: "StreamingConfusion") -> "StreamingConfusion":
        rows = max(len(self.counts), len(other.counts))
        merged = StreamingConfusion(self.num_classes, rows)
        merged.counts[: len(self.counts)] += self.counts
        merged.counts[: len(other.counts)] += other.counts
        merged.unlabelled = self.unlabelled + other.unlabelled
        return merged

    def compute(self, num_clusters: int | None = None) -> dict:
        return evaluate_counts(self.counts, self.unlabelled, num_clusters)


def match_clusters(counts: np.ndarray, num_clusters: int | None = None) -> tuple[np.ndarray, str]:
    """Map every cluster row to a class; -1 for clusters left unmatched by Hungarian (K < C)."""
    k, c = counts.shape
    k = max(k, num_clusters or 0)
    counts = np.pad(counts, ((0, k - len(counts)), (0, 0)))
    if k > c:
        return counts.argmax(1), "majority"
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = np.full(k, -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping, "hungarian"


def _scores(conf: np.ndarray, missed: np.ndarray) -> dict:
    """Metrics from a class confusion (pred x true) plus per-class pixels counted wrong."""
    tp = np.diag(conf).astype(np.float64)
    support = conf.sum(0) + missed  # all pixels of each true class
    predicted = conf.sum(1)
    fp = predicted - tp
    fn = support - tp
    present = support > 0  # classes absent from the ground truth do not count (nan-mean of STEGO)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(present, tp / (tp + fp + fn), np.nan)
        f1 = np.where(present, 2 * tp / (2 * tp + fp + fn), np.nan)
    total = support.sum()
    return {
        "miou": float(np.nanmean(iou) * 100) if present.any() else float("nan"),
        "acc": float(tp.sum() / total * 100) if total else float("nan"),
        "f1": float(np.nanmean(f1) * 100) if present.any() else float("nan"),
        "per_class_iou": [None if np.isnan(v) else float(v * 100) for v in iou],
    }


def evaluate_counts(counts: np.ndarray, unlabelled: np.ndarray, num_clusters: int | None = None) -> dict:
    """Match clusters to classes, then score. Two views when some pixels are unlabelled:
    ``labelled`` counts only pixels a method labelled; ``all`` counts unlabelled pixels as wrong."""
    mapping, policy = match_clusters(counts, num_clusters)
    c = counts.shape[1]
    conf = np.zeros((c, c), dtype=np.int64)
    unmatched = np.zeros(c, dtype=np.int64)
    for cluster, cls in enumerate(mapping[: len(counts)]):
        if cls >= 0:
            conf[cls] += counts[cluster]
        else:
            unmatched += counts[cluster]  # pixels in a cluster Hungarian left without a class: wrong
    labelled = _scores(conf, unmatched)
    everything = _scores(conf, unmatched + unlabelled)
    n_labelled = counts.sum()
    n_total = n_labelled + unlabelled.sum()
    return {
        **everything,
        "labelled": {k: labelled[k] for k in ("miou", "acc", "f1")},
        "labelled_fraction": float(n_labelled / n_total) if n_total else float("nan"),
        "matching": policy,
        "cluster_to_class": mapping.tolist(),
        "pixels": int(n_total),
    }
