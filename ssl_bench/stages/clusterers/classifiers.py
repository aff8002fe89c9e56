"""Labelled region classifiers in the clusterer slot: they name dataset classes instead of clusters.

- ``LabelledKNN`` (stage ``labelled-knn``): ACSeg's region retrieval (shared paper 001, Sec. 4.4, Table 2). The
  regions of the fit split carry the ground-truth class that covers most of their labelled pixels (the engine
  gives them: ``uses_labels``); a region is classified by the weighted vote of its ``neighbors`` most similar
  fit regions, each vote weighted by the cosine similarity of the region embeddings. This is a LABELLED probe
  of the regions, not an unsupervised result. On the fit split itself, a region never votes for itself (the
  leave-one-out vote), so a run whose fit split is the evaluated split is still a retrieval, not a lookup.
  Chosen where the paper is silent: the raw cosine is the weight (no temperature), "most overlapping
  ground-truth region" is read as the class with most pixels in the region, fit regions without labelled
  pixels do not vote, ties go to the lower class id.
- ``ArgmaxClasses`` (stage ``argmax``): each region takes the class its embedding scores highest (e.g. the
  ``maskclip`` embedding's votes: the mode of MaskCLIP's pixel classes in the region, Sec. 4.5).

Both set ``names_classes``: their labels are class ids of the dataset (0..C-1), K must be C, and regions a
filter calls background get the dataset's background class.
"""

from __future__ import annotations

import numpy as np

from ...errors import UserError
from ...ops import l2_normalize


def knn_vote(train: np.ndarray, labels: np.ndarray, queries: np.ndarray, neighbors: int, num_classes: int,
             exclude_self: bool = False, chunk: int = 4096) -> np.ndarray:
    """Class (n_queries,) of each query: the largest similarity-weighted vote of its ``neighbors`` nearest rows
    of ``train`` (cosine); ``exclude_self`` when the queries are the training rows themselves (row i skips i)."""
    train, queries = l2_normalize(train), l2_normalize(queries)
    k = min(neighbors, len(train) - int(exclude_self))
    out = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ train.T
        if exclude_self:
            rows = np.arange(sims.shape[0])
            sims[rows, rows + start] = -np.inf
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.take_along_axis(sims, nearest, axis=1)
        votes = np.zeros((sims.shape[0], num_classes))
        np.add.at(votes, (np.repeat(np.arange(sims.shape[0]), k), labels[nearest].ravel()), weights.ravel())
        out[start:start + chunk] = votes.argmax(1)
    return out


class LabelledKNN:
    """The clusterer stage ``labelled-knn``: ``fit(x, y)`` keeps the labelled regions, ``labels_`` is their
    leave-one-out vote, ``predict(x)`` the vote of all of them."""

    uses_labels = True
    names_classes = True

    def __init__(self, k: int, seed: int = 0, neighbors: int = 5):
        self.num_classes, self.neighbors = k, neighbors  # k: the number of classes (the engine gives C)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "LabelledKNN":
        y = np.asarray(y)
        known = y >= 0
        if known.sum() < 2:
            raise UserError(f"labelled-knn needs at least 2 regions with labelled pixels in the fit split, got "
                            f"{int(known.sum())} -- use more images or another fit_split")
        self.train, self.train_labels = np.asarray(x, dtype=np.float32)[known], y[known]
        self.labels_ = np.empty(len(y), dtype=np.int64)
        self.labels_[known] = knn_vote(self.train, self.train_labels, self.train, self.neighbors, self.num_classes,
                                       exclude_self=True)
        if (~known).any():  # regions without ground truth are classified like any held-out region
            self.labels_[~known] = self.predict(np.asarray(x, dtype=np.float32)[~known])
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return knn_vote(self.train, self.train_labels, np.asarray(x, dtype=np.float32), self.neighbors,
                        self.num_classes)


class ArgmaxClasses:
    """The clusterer stage ``argmax``: the class each region's embedding scores highest (no fitting)."""

    names_classes = True

    def __init__(self, k: int, seed: int = 0):
        self.num_classes = k

    def fit(self, x: np.ndarray) -> "ArgmaxClasses":
        self.labels_ = self.predict(x)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.num_classes:
            raise UserError(f"clusterer=argmax needs one score per class ({self.num_classes}) in each region "
                            f"embedding, got {x.shape[1:]} -- use it with embed=maskclip")
        return x.argmax(1).astype(np.int64)


def check_params(p: dict) -> None:
    if p["neighbors"] < 1:
        raise UserError(f"neighbors={p['neighbors']} -- use 1 or more (-p clusterer.neighbors=5)")
