"""Compiled loops (numba) for the two steps every K cell repeats: a k-means step and the bilinear
upsampling + argmax of cluster scores. In numpy each is several passes over memory (a gathered copy of
the rows, a (n, k) product, bounds, masks); here each row or pixel is visited once. Plain arrays in and out,
called through ``ops``; the first call of a process loads them from numba's on-disk cache (compiled once
per machine, a few seconds)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(fastmath={"reassoc", "contract"}, cache=True)
def dot64(a: np.ndarray, b: np.ndarray) -> float:
    """Dot product of two float32 vectors in float64 (each product is exact; the sum errs by ~1e-16), so
    comparing two similarities gives the same answer whatever the BLAS, thread count or summation order
    (the vector width picks the order), except at float64 near-ties."""
    total = 0.0
    for t in range(a.shape[0]):
        total += np.float64(a[t]) * np.float64(b[t])
    return total


@njit(cache=True)
def _chord(similarity: float) -> float:
    """Euclidean distance between unit vectors of this cosine similarity (a metric: the bounds need one)."""
    squared = 2.0 - 2.0 * similarity
    return np.sqrt(squared) if squared > 0.0 else 0.0


@njit(parallel=True, cache=True)
def kmeans_assign_all(x, centroids, labels, upper, lower, slack):
    """Every unit row (n, d) to its most similar centroid (first on ties), and bounds from the comparison:
    ``upper`` (n,) >= distance to the own centroid, ``lower`` (n, k) <= distance to the others (own: inf),
    widened by ``slack`` on the similarities, which covers float32 rounding of the stored bounds."""
    n, k = lower.shape
    for i in prange(n):
        best, best_similarity = 0, -np.inf
        for j in range(k):
            similarity = dot64(x[i], centroids[j])
            lower[i, j] = _chord(similarity + slack)
            if similarity > best_similarity:
                best, best_similarity = j, similarity
        lower[i, best] = np.inf
        upper[i] = _chord(best_similarity - slack)
        labels[i] = best


@njit(parallel=True, cache=True)
def kmeans_assign_bounded(x, centroids, labels, upper, lower, moved, half_gap, sums, slack):
    """One assignment step of Elkan's k-means (ICML 2003), with the result of ``kmeans_assign_all``.

    The bounds are first loosened by how far each centroid ``moved``; a centroid j is compared with row i
    only when neither the bounds (upper <= lower[j]) nor the centroids' half distance (upper <=
    ``half_gap[own, j]``) prove it farther than the own one. Rows are independent (spread over numba's
    threads); the rows that changed cluster then move their float64 contribution between ``sums`` (k, d)
    in row order, so the result is the same for any number of threads. Returns how many changed."""
    n, k = lower.shape
    previous = labels.copy()
    for i in prange(n):
        own = labels[i]
        bound = upper[i] + moved[own]
        row_lower = lower[i]
        candidates = 0
        for j in range(k):  # branch-free, so it vectorises: most rows stop here
            row_lower[j] -= moved[j]
            candidates += (bound > row_lower[j]) & (bound > half_gap[own, j])
        upper[i] = bound
        if candidates == 0:
            continue
        best = own
        best_similarity = dot64(x[i], centroids[own])
        bound = np.float32(_chord(best_similarity - slack))
        for j in range(k):
            if bound <= row_lower[j] or bound <= half_gap[best, j]:
                continue
            similarity = dot64(x[i], centroids[j])
            row_lower[j] = _chord(similarity + slack)
            # j < best on a tie: only while best is still the own centroid (later ones have smaller j)
            if similarity > best_similarity or (similarity == best_similarity and j < best):
                row_lower[best] = _chord(best_similarity + slack)
                row_lower[j] = np.inf
                best, best_similarity = j, similarity
                bound = np.float32(_chord(similarity - slack))
        upper[i] = bound
        labels[i] = best
    changed = 0
    for i in range(n):
        if labels[i] != previous[i]:
            for t in range(x.shape[1]):
                value = np.float64(x[i, t])
                sums[previous[i], t] -= value
                sums[labels[i], t] += value
            changed += 1
    return changed


@njit(cache=True)
def cluster_sums(x, labels, k):
    """Float64 sum of each cluster's rows (k, d), in row order."""
    sums = np.zeros((k, x.shape[1]))
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            sums[labels[i], t] += np.float64(x[i, t])
    return sums


@njit(cache=True)
def own_similarity(x, centroids, labels):
    """Similarity (float64) of each row to its own centroid."""
    out = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        out[i] = dot64(x[i], centroids[labels[i]])
    return out


@njit(cache=True)
def _envelope(left, right, first, last, breaks, classes):
    """Classes on top of the lines ``left[c] + t (right[c] - left[c])`` for t from 0 (where ``first`` is on
    top) towards 1 (``last``): each next one is the steeper line crossing the current one soonest. Fills
    ``breaks`` (the t where the top class changes) and ``classes`` (the top class from each break on);
    returns the number of breaks."""
    current, count, at = first, 0, 0.0
    classes[0] = first
    while current != last:
        slope = np.float64(right[current]) - np.float64(left[current])
        soonest, following, following_slope = np.inf, -1, -np.inf
        for c in range(left.shape[0]):
            steeper = np.float64(right[c]) - np.float64(left[c])
            if steeper <= slope:
                continue
            t = (np.float64(left[current]) - np.float64(left[c])) / (steeper - slope)
            if t < soonest or (t == soonest and steeper > following_slope):
                soonest, following, following_slope = t, c, steeper
        if following < 0:  # no steeper line: ``current`` stays on top (``last`` ties with it, by rounding)
            break
        at = max(at, soonest)
        breaks[count] = at
        count += 1
        classes[count] = following
        current = following
    return count


@njit(parallel=True, cache=True)
def upsample_argmax(scores, rows0, rows1, row_weights, cols0, cols1, col_weights, out):
    """``out`` (H, W) = first argmax over classes of the bilinear upsampling of ``scores`` (h, w, k), given
    the source rows/columns and weights of each output row/column (``ops.bilinear_sources``).

    Row by row (rows spread over threads): interpolate the output row between its two score rows (w, k);
    along the row, a pixel between columns i and i + 1 is a convex mix of their score vectors, so where both
    columns have the same top class, every pixel between them has it too, and elsewhere the top class
    changes only at the crossings of the upper envelope of k lines (``_envelope``), found once per column
    pair. Each pixel then costs a comparison or two instead of k interpolations; labels differ from
    interpolating every class only where two classes' scores agree to float32 rounding."""
    h, w, k = scores.shape
    height, width = out.shape
    for y in prange(height):  # output rows are independent (spread over numba's threads)
        # scratch (numba allocates it once per thread): every element is written before it is read
        row = np.empty((w, k), np.float32)
        top = np.empty(w, np.int64)
        breaks = np.empty(k + 1)
        classes = np.empty(k + 1, np.int64)
        below = row_weights[y]
        above = np.float32(1.0) - below
        for i in range(w):
            best = 0
            for c in range(k):
                row[i, c] = above * scores[rows0[y], i, c] + below * scores[rows1[y], i, c]
                if row[i, c] > row[i, best]:
                    best = c
            top[i] = best
        envelope_of, count = -1, 0
        for x in range(width):
            i, j = cols0[x], cols1[x]
            if top[i] == top[j]:
                out[y, x] = top[i]
                continue
            if i != envelope_of:
                envelope_of = i
                count = _envelope(row[i], row[j], top[i], top[j], breaks, classes)
            t, s = col_weights[x], 0
            while s < count and t > breaks[s]:
                s += 1
            if s < count and t == breaks[s]:  # on a crossing: ties go to the first class, as argmax does
                out[y, x] = _first_top(row[i], row[j], t)
            else:
                out[y, x] = classes[s]


@njit(cache=True)
def _first_top(left, right, t):
    """First class on top of ``left (1 - t) + right t`` (where the envelope crosses, several lines may tie)."""
    best, best_value = 0, -np.inf
    for c in range(left.shape[0]):
        value = (np.float32(1.0) - t) * left[c] + t * right[c]
        if value > best_value:
            best, best_value = c, value
    return best
