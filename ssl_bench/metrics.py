"""Streaming evaluation of unsupervised segmentation.

A (clusters x classes) pixel-count matrix is updated image by image, so memory is bounded by K x C
whatever the number of images; two states merge by addition (``merge``). Cluster ids are mapped to
classes only at the end, by two named rules of the protocol (``Protocol.overclustering`` and
``Protocol.absent_classes``, stored with every result):

Matching. K <= C: Hungarian matching on pixel counts (every method's code). K > C, ``overclustering``:

- ``majority`` (default): each cluster to its most frequent class (COMUS, MaskContrast, PiCIE);
- ``hungarian``: DatUS^2 (paper, Sec. IV-C): one cluster per class by Hungarian matching, the pixels of the
  K - C clusters left without a class count wrong;
- ``hungarian-majority``: PriMaPs' code: a Hungarian assignment on the transposed counts gives every class
  one cluster, the remaining clusters go to their most frequent class;
- ``stego-drop``: STEGO's code: pixels predicted as a cluster id >= C are dropped before counting (neither
  right nor wrong), the first C clusters are matched by Hungarian on the transposed counts, and the
  pixels of a cluster left without a class count wrong. It scores fewer pixels than the others, so it is
  only for reproducing STEGO's tables: a warning says how many pixels it ignored. (STEGO also averages a
  zero IoU for those left-over pixels into its mIoU when there are any; they occur only when the
  assignment ties, and we score them as wrong without the extra term.)

Absent classes (``absent_classes``): a class with no ground-truth pixel in the evaluated images

- ``zero-if-predicted`` (default; STEGO, PriMaPs, mmsegmentation): scores IoU and F1 0 when some pixel
  was predicted as it (its union is not empty) and is left out of the means only when nothing was;
- ``ignore``: is always left out (the rule of ssl-bench before these settings; it scores a subset of
  images higher than the common rule does).

Every stream also gets the count of classes it discovers (COMUS Table 3: ``discovered_categories``).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import linear_sum_assignment

OVERCLUSTERING = ("majority", "hungarian", "hungarian-majority", "stego-drop")
ABSENT_CLASSES = ("zero-if-predicted", "ignore")


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

    def compute(self, num_clusters: int | None = None, overclustering: str = "majority",
                absent_classes: str = "zero-if-predicted") -> dict:
        return evaluate_counts(self.counts, self.unlabelled, num_clusters, overclustering, absent_classes)


def _check(name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} rule {value!r} -- choose one of {', '.join(allowed)}")


def match_clusters(counts: np.ndarray, num_clusters: int | None = None,
                   overclustering: str = "majority") -> tuple[np.ndarray, str]:
    """Map every cluster row to a class: -1 for a cluster left without a class (its pixels count wrong), -2 for
    one whose pixels are dropped (``stego-drop``, ids >= C). Returns the mapping and the rule applied."""
    _check("overclustering", overclustering, OVERCLUSTERING)
    k, c = counts.shape
    k = max(k, num_clusters or 0)
    counts = np.pad(counts, ((0, k - len(counts)), (0, 0)))
    if k <= c or overclustering == "hungarian":  # one to one; a cluster left out (K > C) counts wrong
        rows, cols = linear_sum_assignment(counts, maximize=True)
        mapping = np.full(k, -1, dtype=np.int64)
        mapping[rows] = cols
        return mapping, "hungarian"
    if overclustering == "majority":
        return counts.argmax(1), "majority"
    if overclustering == "stego-drop":
        counts = counts.copy()
        counts[c:] = 0  # STEGO's update() never counts a pixel predicted as an id >= C
    # As both reference codes: assign on the transpose (classes x clusters), so every class gets one cluster.
    classes, clusters = linear_sum_assignment(counts.T, maximize=True)
    if overclustering == "hungarian-majority":
        mapping = counts.argmax(1)
    else:
        mapping = np.full(k, -1, dtype=np.int64)
        mapping[c:] = -2
    mapping[clusters] = classes
    return mapping, overclustering


def _scores(conf: np.ndarray, missed: np.ndarray, absent_classes: str = "zero-if-predicted") -> dict:
    """Metrics from a class confusion (pred x true) plus per-class pixels counted wrong."""
    _check("absent_classes", absent_classes, ABSENT_CLASSES)
    tp = np.diag(conf).astype(np.float64)
    support = conf.sum(0) + missed  # all pixels of each true class
    predicted = conf.sum(1)
    fp = predicted - tp
    fn = support - tp
    scored = support > 0  # "ignore": a class absent from the ground truth never counts
    if absent_classes == "zero-if-predicted":
        scored |= predicted > 0  # its union is not empty: IoU 0 (as STEGO's and PriMaPs' nan-mean of tp / union)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(scored, tp / (tp + fp + fn), np.nan)
        f1 = np.where(scored, 2 * tp / (2 * tp + fp + fn), np.nan)
    total = support.sum()
    return {
        "miou": float(np.nanmean(iou) * 100) if scored.any() else float("nan"),
        "acc": float(tp.sum() / total * 100) if total else float("nan"),
        "f1": float(np.nanmean(f1) * 100) if scored.any() else float("nan"),
        "per_class_iou": [None if np.isnan(v) else float(v * 100) for v in iou],
    }


DISCOVERY_THRESHOLDS = (20, 2, 0)  # IoU (%) a class must exceed to count as discovered (COMUS Table 3 and Sec. 4.4)


def discovered_categories(per_class_iou, thresholds=DISCOVERY_THRESHOLDS) -> dict:
    """COMUS's discovered-categories count (Table 3): for each threshold t, how many classes reach an IoU above
    t % (``iou>20``: discovered; ``iou>0``: has a cluster) and their mean IoU (None when there are none). Classes
    absent from the ground truth (IoU None) are not counted."""
    present = [v for v in per_class_iou if v is not None]
    out = {}
    for t in thresholds:
        chosen = [v for v in present if v > t]
        out[f"iou>{t:g}"] = {"classes": len(chosen), "miou": float(np.mean(chosen)) if chosen else None}
    return out


def evaluate_counts(counts: np.ndarray, unlabelled: np.ndarray, num_clusters: int | None = None,
                    overclustering: str = "majority", absent_classes: str = "zero-if-predicted") -> dict:
    """Match clusters to classes, then score. Two views when some pixels are unlabelled:
    ``labelled`` counts only pixels a method labelled; ``all`` counts unlabelled pixels as wrong."""
    mapping, policy = match_clusters(counts, num_clusters, overclustering)
    c = counts.shape[1]
    conf = np.zeros((c, c), dtype=np.int64)
    unmatched = np.zeros(c, dtype=np.int64)
    dropped = 0
    for cluster, cls in enumerate(mapping[: len(counts)]):
        if cls >= 0:
            conf[cls] += counts[cluster]
        elif cls == -1:
            unmatched += counts[cluster]  # pixels in a cluster left without a class: wrong
        else:
            dropped += int(counts[cluster].sum())
    if dropped:
        warnings.warn(f"overclustering=stego-drop ignored {dropped} of {int(counts.sum())} labelled pixels "
                      f"(predicted as cluster ids >= C, as STEGO's code does): the scores cover the other pixels "
                      f"only -- use it to reproduce STEGO's tables, not to compare methods", stacklevel=2)
    labelled = _scores(conf, unmatched, absent_classes)
    everything = _scores(conf, unmatched + unlabelled, absent_classes)
    n_labelled = counts.sum() - dropped
    n_total = n_labelled + unlabelled.sum()
    return {
        **everything,
        "labelled": {k: labelled[k] for k in ("miou", "acc", "f1")},
        "labelled_fraction": float(n_labelled / n_total) if n_total else float("nan"),
        "discovered": discovered_categories(everything["per_class_iou"]),
        "matching": policy,
        "absent_classes": absent_classes,
        "cluster_to_class": mapping.tolist(),
        "ignored_pixels": dropped,
        "pixels": int(n_total),
    }


def with_class_id_scores(predictions, ctx, stats: dict):
    """Pass a task's predictions through, scoring its "final" stream as class ids, without the runner's
    cluster-to-class matching (which can only flatter labels that are classes already: an oracle, a labelled
    probe, text-named classes). ``ctx`` gives the dataset, the evaluated split, its labels and the protocol.
    stats["class_id_scores"]: "all" counts unassigned pixels wrong, "labelled" does not."""
    c = ctx.dataset.num_classes
    conf, scored = StreamingConfusion(c, c), False
    for pred in predictions:
        if pred.stream == "final" and pred.split in (None, ctx.split):
            conf.update(pred.labels, ctx.label(pred.index))
            scored = True
        yield pred
    if scored:  # the runner reads stats once it has consumed every prediction
        wrong_class = conf.counts[c:].sum(0)  # predicted ids beyond the classes (K > C): wrong
        absent = ctx.protocol.absent_classes  # the run's rule for a class without ground truth
        stats["class_id_scores"] = {
            "all": _scores(conf.counts[:c], conf.unlabelled + wrong_class, absent),
            "labelled": _scores(conf.counts[:c], wrong_class, absent),
        }
