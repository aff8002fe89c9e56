"""Region filters: after the segmenter, a filter may call some of an image's regions background; those are
painted with the background label and never embedded, clustered or classified (the ``filter`` slot of a
composed task; ``ssl_bench/stages/__init__.py`` describes the interface).

- ``AttentionForeground`` (stage ``attention-foreground``): ACSeg's foreground detection (shared paper 001,
  Sec. 4.1.2). Each region's score is the sum over its pixels of the last block's CLS attention, the minimum
  over the heads (a pixel counts as foreground when every head attends to it at least that much); the scores
  of one image are split in two by 2-means and the regions of the larger centre are the foreground.
  Chosen where the paper is silent: the 2-means is solved exactly (one dimension: the best of every split of
  the sorted scores, no seed), an image whose regions all score the same keeps them all as foreground, and by
  default the filter acts only on datasets with a background class (VOC), as the paper uses it.
- ``KeepAll`` (stage ``none``): no filter.
"""

from __future__ import annotations

import numpy as np

from .regions import mark_background, region_sums


def two_means_upper(scores: np.ndarray) -> np.ndarray:
    """Boolean per score: in the group of the larger centre of the exact 2-means of 1-d ``scores``. Fewer than
    two distinct values: all True (nothing to separate)."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.unique(scores).size < 2:
        return np.ones(scores.shape, dtype=bool)
    ordered = np.sort(scores)
    cost = [ordered[:i].var() * i + ordered[i:].var() * (ordered.size - i) for i in range(1, ordered.size)]
    threshold = ordered[int(np.argmin(cost)) + 1]  # the smallest score of the upper group
    return scores >= threshold


class AttentionForeground:
    """The filter stage ``attention-foreground``: regions of low summed CLS attention are background."""

    reads = ("attn",)

    def __init__(self, only_with_background_class: bool = True, dataset_has_background: bool = True):
        self.active = dataset_has_background or not only_with_background_class

    @classmethod
    def from_context(cls, ctx, **params):
        return cls(**params, dataset_has_background=getattr(ctx.dataset, "background_class", None) is not None)

    @staticmethod
    def scores(segment_map: np.ndarray, attention: np.ndarray) -> np.ndarray:
        """Foreground score per valid region: CLS attention (heads, h, w), min over heads, summed over its pixels."""
        return region_sums(segment_map, np.asarray(attention).min(0))

    def filter(self, segment_map: np.ndarray, info: dict, features: dict) -> tuple[np.ndarray, dict]:
        if not self.active or info["n_valid"] == 0:
            return segment_map, {**info, "n_background": 0}
        foreground = two_means_upper(self.scores(segment_map, features["attn"]))
        return mark_background(segment_map, info, np.flatnonzero(~foreground))


class KeepAll:
    """The filter stage ``none``: every region is kept."""

    reads: tuple[str, ...] = ()

    def filter(self, segment_map: np.ndarray, info: dict, features: dict) -> tuple[np.ndarray, dict]:
        return segment_map, info
