"""Segment maps, shared by every segmenter and by the composed task that clusters their regions.

A *segment map* is an int array on the patch grid (h, w): ids 0..V-1 are the image's valid regions (in
raster order of each region's first patch), ``NOISE`` (-1) marks patches no region claims (too-small
fragments, uncovered proposals: they stay unlabelled), ``BACKGROUND`` (-2) marks patches a segmenter calls
background (painted with the background cluster, never clustered). Each segmenter also reports one *info*
dict per image (``n_segments``, ``n_valid``, ``valid_sizes``, and what else it knows), from which
``summarize_segments`` gives the segment statistics of DatUS^2's Table II for any segmenter.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NOISE = -1
BACKGROUND = -2


def upsample_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (h, w) to (H, W), sampling at pixel centres."""
    h, w = labels.shape
    return labels[_nearest_index(h, size[0])[:, None], _nearest_index(w, size[1])[None, :]]


def split_into_segments(groups: np.ndarray, tau: int = 5, connected: bool = True) -> tuple[np.ndarray, dict]:
    """Segments of a grouping of the patch grid (h, w) (ids >= 0; ``NOISE``/``BACKGROUND`` entries are kept as
    they are): each group split into 8-connected components when ``connected``, components with more than
    ``tau`` patches valid, the rest ``NOISE``.

    Returns (segment map int64 (h, w), info {n_groups, n_segments, n_valid, valid_sizes}); valid ids follow
    the raster order of each segment's first patch (canonical, whatever the grouping's own ids).
    """
    from scipy import ndimage

    groups = np.asarray(groups)
    components = np.zeros(groups.shape, dtype=np.int64)  # 0 = not a segment (noise / background)
    offset = 0
    group_ids = np.unique(groups[groups >= 0])
    for g in group_ids:
        inside = groups == g
        if connected:
            lab, n = ndimage.label(inside, structure=np.ones((3, 3), dtype=bool))
        else:
            lab, n = inside.astype(np.int64), 1
        components[lab > 0] = lab[lab > 0] + offset
        offset += n
    ids, first, sizes = np.unique(components.ravel(), return_index=True, return_counts=True)
    valid = (sizes > tau) & (ids > 0)
    new_id = np.full(offset + 1, NOISE, dtype=np.int64)
    order = np.argsort(first[valid], kind="stable")  # raster order: canonical, seed-independent
    new_id[ids[valid][order]] = np.arange(valid.sum())
    segment_map = new_id[components]
    segment_map[groups == BACKGROUND] = BACKGROUND
    info = {
        "n_groups": int(group_ids.size),
        "n_segments": int(offset),
        "n_valid": int(valid.sum()),
        "valid_sizes": sizes[valid][order].tolist(),
    }
    return segment_map, info


def border_background(groups: np.ndarray) -> np.ndarray:
    """``groups`` with the group touching the image border most marked ``BACKGROUND`` (Deep Spectral Methods'
    background heuristic: border patches are counted on all four sides, corners twice, as the authors do)."""
    border = np.concatenate([groups[:, 0], groups[:, -1], groups[0, :], groups[-1, :]])
    border = border[border >= 0]
    if border.size == 0:
        return groups
    ids, counts = np.unique(border, return_counts=True)
    out = groups.copy()
    out[groups == ids[counts.argmax()]] = BACKGROUND  # ties: the lowest id, as argmax over sorted ids
    return out


def summarize_segments(infos: Sequence[dict]) -> dict:
    """Dataset segment statistics (DatUS^2 Table II) from per-image infos, for any segmenter.

    The schema every segment-producing task shares (``report.tables.SEGMENT_FIELDS``): total and valid
    segments (summed over images), % valid, segments and valid segments per image (and the spread of the
    latter over images: how adaptive the segmenter is), and the mean number of patches of a *valid* segment.
    """
    n_images = len(infos)
    total = sum(i["n_segments"] for i in infos)
    valid = sum(i["n_valid"] for i in infos)
    sizes = [s for i in infos for s in i["valid_sizes"]]
    return {
        "images": n_images,
        "total": total,
        "valid": valid,
        "valid_percent": 100.0 * valid / total if total else 0.0,
        "per_image": total / n_images if n_images else 0.0,
        "valid_per_image": valid / n_images if n_images else 0.0,
        "valid_per_image_std": float(np.std([i["n_valid"] for i in infos])) if n_images else 0.0,
        "patches_per_segment": float(np.mean(sizes)) if sizes else 0.0,
    }


def paint_segments(segment_map: np.ndarray, segment_labels: np.ndarray, background: int = NOISE) -> np.ndarray:
    """Pseudo mask from a segment map and one label per valid segment: noise stays ``NOISE`` (unlabelled),
    background patches get the label ``background``."""
    # lookup table: the labels, then background at index -2 and noise at index -1
    lut = np.concatenate([np.asarray(segment_labels, dtype=np.int64), [background, NOISE]])
    return lut[segment_map]


def paint_split(segment_maps: Sequence[np.ndarray], infos: Sequence[dict], labels: np.ndarray,
                background: int = NOISE) -> list[np.ndarray]:
    """Pseudo masks of a split: ``labels`` holds every image's valid segments in order (``n_valid`` each)."""
    bounds = np.cumsum([0] + [i["n_valid"] for i in infos])
    return [paint_segments(seg, labels[a:b], background) for seg, a, b in zip(segment_maps, bounds[:-1], bounds[1:])]


def region_sums(segment_map: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per valid segment, the sum of ``values`` (a patch-grid map (h, w)) over its pixels: a map at a finer
    resolution than the grid (a segmenter that upsamples its soft assignment) counts each pixel with the value
    of the patch it lies in. Returns (n_valid,) float64."""
    n_valid = int(segment_map.max()) + 1 if segment_map.size and segment_map.max() >= 0 else 0
    values = np.asarray(values, dtype=np.float64)
    if values.shape != segment_map.shape:
        values = upsample_nearest(values, segment_map.shape)
    inside = segment_map >= 0
    return np.bincount(segment_map[inside], weights=values[inside], minlength=n_valid)[:n_valid]


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output position of a nearest-neighbour resize (as ``upsample_nearest``)."""
    return np.minimum(((np.arange(size_out) + 0.5) * size_in / size_out).astype(np.int64), size_in - 1)


def mark_background(segment_map: np.ndarray, info: dict, background_ids) -> tuple[np.ndarray, dict]:
    """The segments ``background_ids`` (valid ids) marked ``BACKGROUND``, the others renumbered 0..V'-1 in their
    order (a region filter's output). The info keeps the segmenter's counts and gains ``n_background`` (regions
    called background); ``n_valid`` and ``valid_sizes`` describe the segments left."""
    drop = np.zeros(info["n_valid"], dtype=bool)
    drop[np.asarray(list(background_ids), dtype=np.int64)] = True
    lut = np.full(info["n_valid"] + 2, NOISE, dtype=np.int64)  # valid ids, then BACKGROUND (-2) and NOISE (-1)
    lut[:info["n_valid"]][~drop] = np.arange((~drop).sum())
    lut[:info["n_valid"]][drop] = BACKGROUND
    lut[-2] = BACKGROUND
    out = {**info, "n_valid": int((~drop).sum()), "n_background": int(drop.sum()),
           "valid_sizes": [s for s, d in zip(info["valid_sizes"], drop) if not d]}
    return lut[segment_map], out


def class_counts(segment_map: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """(n_valid, num_classes): how many pixels of each valid segment have each class of ``classes`` (a map of
    class ids, -1 or below: no class; the segment map is brought to its resolution)."""
    segment_map = np.asarray(segment_map, dtype=np.int64)
    if segment_map.shape != classes.shape:
        segment_map = upsample_nearest(segment_map, classes.shape)
    n_valid = int(segment_map.max()) + 1 if segment_map.size and segment_map.max() >= 0 else 0
    both = (segment_map >= 0) & (classes >= 0)
    counts = np.bincount(segment_map[both] * num_classes + classes[both], minlength=n_valid * num_classes)
    return counts[:n_valid * num_classes].reshape(n_valid, num_classes)


def majority_labels(segment_map: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """The ground-truth class covering most of each valid segment's labelled pixels; -1 for a segment without
    labelled pixels. Returns (n_valid,) int64."""
    counts = class_counts(segment_map, label, num_classes)
    return np.where(counts.sum(1) > 0, counts.argmax(1), -1)
