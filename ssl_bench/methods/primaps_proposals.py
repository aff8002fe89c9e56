"""PriMaPs stage 1 and 2: principal mask proposals of one image, and their refinement to image resolution.

Hahn et al., TMLR 2024, Sec. 3.1 (reference code: github.com/visinf/primaps, ``primaps_modules/primaps.py``).
Per image, on the patch features (h, w, d):

1. take the first principal direction v of the features not assigned yet (Eqs. 2-3, 7);
2. anchor it: the patch whose feature has the largest cosine to v (Eq. 4);
3. cut the mask of unassigned patches whose cosine to the anchor is at least ``psi`` times the largest one
   (Eqs. 5-6; the mask's soft values are those cosines over the largest), and mark them assigned;
4. repeat until ``coverage`` of the patches are assigned; the rest is left out (Eq. 8).

Where the paper is silent we follow the reference code, and say so:

- The direction is the exact first eigenvector of the unassigned features' covariance; the code's
  ``torch.pca_lowrank(q=3, niter=100)`` approximates it. Its sign is the one that routine returns on a CPU
  once it has converged, which its random start does not change (``routine_signs``; the test compares it
  with the routine itself). Where the routine has not converged (nearly equal leading eigenvalues, as on
  pure noise) its sign and direction depend on its random start; ours stay the converged ones.
  ``principal="lowrank"`` runs the reference routine itself under a seeded generator (slower). The
  non-iterative ablation, which the code lacks, signs each component by the same rule.
- ``anchor="signed"`` (default, paper and code): the anchor maximises the signed cosine, assigned patches
  scoring 0 as in the code, so when no unassigned patch has a positive cosine the anchor is the first assigned
  patch in raster order (the code's ``sim == sim.max()``), whose similarity still only cuts unassigned
  patches. ``anchor="abs"``: the largest |cosine| among the unassigned patches (ssl-bench before version 2 of
  the task: sign-free, another patch in most iterations).
- The stop counts patches: at least ``ceil(coverage * patches)`` assigned (the code's float32 ratio equals this
  except where rounding decides; ssl-bench before version 2 added one mask at exactly 95%).
- Where the anchor's similarity to every unassigned patch is <= 0 the code divides by zero (NaN masks, then
  stops after three unchanged iterations); we stop at once. A constant set of unassigned features has no
  principal direction: their mean direction stands in (any anchor among them cuts the same mask).
"""

from __future__ import annotations

import contextlib
import functools
import math
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

from ..kernels import dot64
from ..ops import softmax, upsample_scores
from .primaps_directions import (SVD_FLIPS_FROM_WIDTH, DirectionTracker, principal_directions,  # noqa: F401
                                 routine_signs, sign_pivot, top_directions)

ANCHORS = ("signed", "abs")
PRINCIPAL = ("exact", "lowrank")


def _t(a, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Tensor copy of an array-like (cached features may be read-only memmaps; torch warns on those)."""
    if isinstance(a, torch.Tensor):
        return a.to(dtype)
    return torch.tensor(np.asarray(a), dtype=dtype)


def coverage_target(coverage: float, patches: int) -> int:
    """Patches to assign before stopping: ``ceil(coverage * patches)`` in exact decimal arithmetic (0.95 of 1600
    is 1520, not one more because 0.95 is a little less than 0.95 in binary)."""
    return math.ceil(Fraction(str(coverage)) * patches)


# ---- the proposal loop ---------------------------------------------------------------------------------------

def check_choices(anchor: str, principal: str) -> None:
    if anchor not in ANCHORS:
        raise ValueError(f"unknown anchor rule {anchor!r} -- use one of {', '.join(ANCHORS)}")
    if principal not in PRINCIPAL:
        raise ValueError(f"unknown principal routine {principal!r} -- use one of {', '.join(PRINCIPAL)}")


def proposal_soft_masks(features: np.ndarray, psi: float = 0.4, coverage: float = 0.95, nn_anchor: bool = True,
                        iterative: bool = True, max_masks: int | None = None, anchor: str = "signed",
                        principal: str = "exact", seed: int = 0, incremental: bool = True) -> np.ndarray:
    """Soft principal mask proposals (n_masks, h, w) float32 of one image's features (h, w, d).

    Inside mask m the value is the anchor similarity divided by its maximum (in [psi, 1]), 0 elsewhere;
    masks are disjoint. As in the reference code, the similarity is computed to all features but only
    unassigned positions may join (assigned ones are zeroed before thresholding). ``nn_anchor=False``: the
    direction itself, not its nearest feature, gives the similarities; ``iterative=False``: the next direction
    of the whole image instead of the first one of the unassigned features (both ablations of the paper).
    ``incremental=False``: the straightforward loop (covariance formed again and fully decomposed for every
    mask). The default follows the direction with a ``DirectionTracker`` instead and takes from its estimate
    only the anchors (and signs) that the estimate's proven error bound decides, the exact direction otherwise:
    the same masks (primaps_directions' docstring).
    """
    check_choices(anchor, principal)
    feats = _t(features)
    h, w, d = feats.shape
    x = feats.reshape(-1, d)
    xn = F.normalize(x, dim=1)
    rows, unit = x.numpy(), xn.numpy()
    patches = FreePatches(unit)
    free = patches.free
    target = coverage_target(coverage, len(x))
    limit = len(x) if max_masks is None else max_masks
    fixed = None if iterative else principal_directions(x, min(limit, d, len(x)), "exact")
    tracker = DirectionTracker(x) if iterative and incremental and principal == "exact" else None
    masks: list[tuple[np.ndarray, np.ndarray]] = []  # (patches, values) of each mask
    psi32, signed, slack = np.float32(psi), anchor == "signed", float32_slack(d)
    assigned = 0
    # the tracker makes ~1,500 small products on a noise map, where a second BLAS thread only waits (2.2 s
    # instead of 1 s on two threads), and BLAS threads spinning between calls slow torch's (a limit entered only
    # once the tracker took over made structured maps 3x slower); the other loops keep the run's threads
    with _one_blas_thread() if tracker is not None else contextlib.nullcontext():
        while len(masks) < limit and assigned < target:
            best = -1
            if tracker is not None and nn_anchor:  # the anchor alone decides the mask: take it where it is proven
                estimate = tracker.estimate()
                if estimate is not None:
                    v, bound = estimate
                    best = proven_anchor(unit, rows, free, patches.packed, patches.patch, patches.count, v,
                                         bound + slack, tracker.mean, signed, SVD_FLIPS_FROM_WIDTH)
            if best >= 0:  # the common case on weak features (~1,500 times per image): kept lean
                taken, values = _anchor_mask(unit, patches.packed, patches.patch, patches.count, best, psi32)
            else:
                if iterative:
                    v = principal_directions(x[torch.from_numpy(free)], 1, principal, seed,
                                             tracker.top if tracker else top_directions)[:, 0]
                elif len(masks) < fixed.shape[1]:
                    v = fixed[:, len(masks)]  # ablation: next component of the whole image, not recomputed
                else:
                    break
                taken, values = _cut(xn, v, patches, psi, nn_anchor, anchor)
            if len(taken) == 0:  # nothing similar enough to form a mask
                break
            masks.append((taken, values))  # a mask of one patch is the common case: keep its entries only
            if tracker is not None:
                tracker.remove(taken)
            patches.remove(taken)
            assigned += len(taken)
    soft = np.zeros((len(masks), h * w), dtype=np.float32)
    for m, (taken, values) in enumerate(masks):
        soft[m, taken] = values
    return soft.reshape(-1, h, w)


@functools.cache
def _blas_controller():
    """threadpoolctl's handle on the loaded BLAS libraries, found once per process (2 ms; a limit then costs 40 us)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _one_blas_thread():
    return _blas_controller().limit(limits=1, user_api="blas")


def float32_slack(dim: int) -> float:
    """How far the exact loop's float32 scores can be from exact ones: a dim-term dot product of unit vectors in
    float32, in any order, errs by at most dim * 2^-24 (2.3e-5 at 384, 1.2e-4 at 2048), its float32 direction
    moves them by at most 6e-8, and its float64 eigenvector is within ~1e-6 of the exact one wherever the
    tracker's proof holds (a gap above 1e-7 of the eigenvalue); a quarter more for safety. Decisions closer than
    this are left to the exact direction."""
    return 1.25 * dim * 2.0 ** -24 + 2e-6


class FreePatches:
    """The unassigned patches' unit features, packed into the first ``count`` rows of one array (a removed row's
    place goes to the last one), so that a pass over them is one float32 BLAS product over exactly those rows
    (on a noise map the loop passes over them twice per mask, ~1,500 times per image)."""

    def __init__(self, unit: np.ndarray):
        self.packed, self.count = unit.copy(), len(unit)
        self.patch = np.arange(len(unit))  # packed row -> patch
        self.slot = np.arange(len(unit))  # patch -> packed row (-1: assigned)
        self.free = np.ones(len(unit), dtype=bool)

    def remove(self, taken: np.ndarray) -> None:
        self.count = _unpack(self.packed, self.patch, self.slot, self.count, taken)
        self.free[taken] = False


@njit(cache=True)
def _unpack(packed, patch, slot, count, taken):
    for i in taken:
        row, last = slot[i], count - 1
        packed[row], patch[row] = packed[last], patch[last]
        slot[patch[row]], slot[i] = row, -1
        count -= 1
    return count


@njit(cache=True)
def float32_product_error(dim, norm):
    """A bound on how far a float32 BLAS product of a (nearly) unit row with a float64 vector of this norm,
    rounded to float32, is from the exact dot product: gamma_(dim + 2) |x| |v| in any summation order (the
    +2: the vector's rounding), a percent more for rows normalised in float32."""
    gamma = (dim + 2) * 2.0 ** -24
    return 1.01 * gamma / (1.0 - gamma) * norm


@njit(cache=True)
def proven_anchor(xn, x, free, packed, patch, count, v, slack, mean, signed, flips_from_width):
    """The anchor ``_cut`` would pick with the exact direction, where the estimate v (unsigned, at most ``slack``
    from the exact direction, float32 slack included) proves it; -1 where it does not. Every score moves by at
    most the slack, so a decision with a margin wider than twice that is the exact loop's. ``packed``,
    ``patch``, ``count``: ``FreePatches``. The scores come from one float32 product over the free rows; only
    those within its error bound of deciding are summed exactly (float64), in raster order, as before. Compiled
    (numba): a noise map asks ~1,500 times per image."""
    n, d = xn.shape
    first, first_assigned = -1, -1
    for i in range(n):
        if free[i]:
            first = i if first < 0 else first
        elif first_assigned < 0:
            first_assigned = i
        if first >= 0 and first_assigned >= 0:
            break
    sign = 1.0
    if signed:  # the sign first: the direction the exact loop uses is +v or -v (``sign_pivot``'s two rules)
        if count >= d:
            offset = x[first].astype(np.float64) - mean
            # the exact loop forms the offset in float32 too: its error scales with the row and the mean
            scale = np.sqrt(np.sum(offset ** 2)) + np.sqrt(np.sum(x[first].astype(np.float64) ** 2)) + \
                np.sqrt(np.sum(mean ** 2))
            pivot, narrow = offset @ v, d < flips_from_width
        else:
            pivot, narrow, scale = v[0], count < flips_from_width, 1.0
        if not abs(pivot) > slack * scale:
            return -1
        sign = 1.0 if (pivot > 0) != narrow else -1.0
    rough = packed[:count] @ v.astype(np.float32)
    error = float32_product_error(d, np.sqrt(np.sum(v ** 2)))
    for j in range(count):
        rough[j] = sign * rough[j] if signed else abs(rough[j])
    # a row more than 4 error + 2 slack below the rough top can neither be the anchor nor come within 2 slack of it
    # (NaN rows, which no comparison picks, are left out as before)
    floor = np.nanmax(rough) - 4 * error - 2 * slack if count > 0 else np.inf
    near = np.sort(patch[:count][rough >= floor])
    best, top, runner_up = -1, -np.inf, -np.inf
    for i in near:
        score = dot64(xn[i], v)  # float64 sum: errs by ~1e-16
        score = sign * score if signed else abs(score)
        if score > top:
            best, top, runner_up = i, score, top
        elif score > runner_up:
            runner_up = score
    if signed and count < n:  # assigned patches score 0
        if top < -slack:  # no unassigned patch is positive: the first assigned patch is the anchor
            return first_assigned
        if top <= slack:
            return -1
    return best if top - runner_up > 2 * slack else -1


def _cut(xn: torch.Tensor, v: torch.Tensor, patches: FreePatches, psi: float, nn_anchor: bool,
         anchor: str) -> tuple[np.ndarray, np.ndarray]:
    """One mask from direction v: the anchor, its similarities to the unassigned rows, the threshold. Returns the
    mask's rows and values (``_threshold``); the anchor's mask where the anchor is already known: ``_anchor_mask``."""
    free = patches.free
    cos_v, free_t = xn @ v, torch.from_numpy(free)
    if anchor == "signed":
        best = int(torch.where(free_t, cos_v, torch.zeros(())).argmax())  # assigned ones score 0, as in the code
        sim = None if nn_anchor else cos_v
    else:
        best = int(torch.where(free_t, cos_v.abs(), torch.full_like(cos_v, -1.0)).argmax())
        sim = None if nn_anchor else cos_v * torch.sign(cos_v[best])
    if sim is not None:  # the ablation: the direction's own cosines
        return _threshold(sim.numpy(), free, np.float32(psi))
    return _anchor_mask(xn.numpy(), patches.packed, patches.patch, patches.count, best, np.float32(psi))


@njit(cache=True)
def _anchor_mask(xn, packed, patch, count, best, psi):
    """The mask of the unassigned rows (``FreePatches``) whose cosine to row ``best`` reaches ``psi`` times the
    largest one: (patches in raster order, values), as ``_threshold`` makes it from all cosines. The cosines are
    float64 sums rounded to float32 (``dot64``), the same values whatever the BLAS or order; a float32 product
    finds the rows that matter (the mask's own and those within its error of the peak or the threshold), and
    only those are summed exactly: on a noise map, one."""
    rough = packed[:count] @ xn[best]
    # rough and exact (rounded) cosines differ by the product's error and half a float32 step at most
    error = float32_product_error(xn.shape[1], np.sqrt(np.sum(xn[best].astype(np.float64) ** 2))) + 2.0 ** -24
    peak = np.float32(0.0)  # assigned rows count as 0
    if count > 0:
        for j in np.flatnonzero(rough >= np.nanmax(rough) - 2 * error):
            peak = max(peak, np.float32(dot64(packed[j], xn[best])))
    if not peak > 1e-6:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    level = psi * peak
    near = np.flatnonzero(rough >= level - error)
    sims = np.empty(len(near), np.float32)
    for c in range(len(near)):
        sims[c] = np.float32(dot64(packed[near[c]], xn[best]))
    keep = (sims >= level) & (sims > 0)
    order = np.argsort(patch[near[keep]])
    return patch[near[keep]][order], sims[keep][order] / peak


@njit(cache=True)
def _threshold(sim, free, psi):
    """The mask: the unassigned rows with sim >= psi * peak (and > 0), and their values sim / peak; none when the
    peak is not positive (the code would divide by zero there). float32 throughout, as the reference's tensors."""
    peak = np.float32(0.0)  # assigned rows count as 0
    for i in range(sim.shape[0]):
        if free[i] and sim[i] > peak:
            peak = sim[i]
    taken = np.empty(sim.shape[0], np.int64)
    count = 0
    if peak > 1e-6:
        level = psi * peak
        for i in range(sim.shape[0]):
            if free[i] and sim[i] >= level and sim[i] > 0:
                taken[count] = i
                count += 1
    values = np.empty(count, np.float32)
    for c in range(count):
        values[c] = sim[taken[c]] / peak
    return taken[:count].copy(), values


def principal_mask_proposals(features: np.ndarray, psi: float = 0.4, coverage: float = 0.95,
                             nn_anchor: bool = True, iterative: bool = True, max_masks: int | None = None,
                             anchor: str = "signed", principal: str = "exact", seed: int = 0) -> np.ndarray:
    """Proposal-id map (h, w) int64 on the patch grid; -1 = left unassigned (the 1 - coverage remainder)."""
    soft = proposal_soft_masks(features, psi, coverage, nn_anchor, iterative, max_masks, anchor, principal, seed)
    if len(soft) == 0:
        return np.full(np.shape(features)[:2], -1, dtype=np.int64)
    return np.where(soft.max(0) > 0, soft.argmax(0), -1).astype(np.int64)


# ---- stage 2: to image resolution ----------------------------------------------------------------------------

def _median3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 median filter of (n, h, w) maps, reflect padding (as the reference MedianPool2d)."""
    mode = "reflect" if min(x.shape[-2:]) > 1 else "replicate"
    p = F.pad(x[None], (1, 1, 1, 1), mode=mode)[0]
    return p.unfold(1, 3, 1).unfold(2, 3, 1).reshape(*x.shape, 9).median(-1).values


def proposals_to_image(soft_masks: np.ndarray, size: tuple[int, int], image: np.ndarray | None = None,
                       crf: bool = True, gain: float = 10.0, median: bool = True) -> np.ndarray:
    """Patch-grid soft masks (n, h, w) -> proposal ids (H, W) int64 at image resolution, -1 = background.

    Follows the reference: median filter, saturate (x gain, clip to [0, 1]), a background channel that is
    high where no mask is, log-softmax, bilinear upsampling, softmax, dense CRF on the image, argmax.
    """
    n = len(soft_masks)
    if n == 0:
        return np.full(size, -1, dtype=np.int64)
    m = _t(soft_masks)
    if median:
        m = _median3x3(m)
    m = (m * gain).clamp(0, 1)
    level = m[m > 0].mean() if (m > 0).any() else torch.tensor(1.0)
    bg = (level - m.sum(0, keepdim=True)).clamp(0, 1)
    logp = F.log_softmax(torch.cat([bg, m]), dim=0).numpy()
    probs = softmax(upsample_scores(logp, tuple(size)), axis=0)
    if crf:
        if image is None:
            raise ValueError("proposals_to_image(crf=True) needs the image")
        from ..crf import dense_crf

        probs = dense_crf(np.asarray(image), probs.astype(np.float32), turned_off_by="-p proposal_crf=false")
    return (probs.argmax(0) - 1).astype(np.int64)


# ---- `ssl-bench bench primaps-proposals` ----------------------------------------------------------------------

def benchmark(images: int = 4, noise_maps: int = 1, grid: int = 40, dim: int = 384, repeats: int = 3,
              authors_routine: bool = True, authors_routine_on_noise: bool = False, threads: int = 1,
              seed: int = 0) -> dict:
    """Principal mask proposals per image: this loop (``incremental``), the straightforward loop (covariance
    formed and fully decomposed for every mask) and the reference code's routine (``torch.pca_lowrank(q=3,
    niter=100)`` for every mask, as in github.com/visinf/primaps), side by side on identical inputs, with how
    many images get identical masks; and the effect of the |cosine| anchor (masks, oracle pseudo-label scores).

    Inputs: ``images`` CamVid val feature maps of a random-weight dino-vits8 (40 x 40 x 384 at the protocol's
    320 pixels; the synthetic set where ../shared/data is absent), ``images`` synthetic maps of a dozen
    clustered regions, and ``noise_maps`` Gaussian noise maps (``grid`` x ``grid`` x ``dim``): a map without
    structure, where every mask is one patch. Seconds per image are the best of ``repeats`` runs of this loop
    (one of each slower loop), on ``threads`` threads (torch, BLAS, numba), after one small call that loads the
    compiled kernels (``kernel_load_s``: once per process). ``authors_routine=False`` skips the slowest column;
    on noise maps it runs only with ``authors_routine_on_noise`` (over 20 minutes per map on these machines)."""
    from ..ops import set_threads

    before = torch.get_num_threads()
    set_threads(threads)
    try:
        return _measure(images, noise_maps, grid, dim, repeats, authors_routine, authors_routine_on_noise, seed)
    finally:
        set_threads(before)


def _clustered_maps(count: int, grid: int, dim: int, seed: int) -> list[np.ndarray]:
    """Maps of 12 random rectangles-and-stripes regions, each a random mean plus noise at a third of its scale."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(count):
        means = rng.standard_normal((12, dim)) + 0.5 * rng.standard_normal(dim)
        regions = np.zeros((grid, grid), np.int64)
        for r in range(1, 12):
            top, left = rng.integers(0, grid - 1, 2)
            height, width = rng.integers(2, max(grid // 2, 3), 2)
            regions[top:top + height, left:left + width] = r
        maps.append((means[regions] + rng.standard_normal((grid, grid, dim)) / 3).astype(np.float32))
    return maps


def _measure(images: int, noise_maps: int, grid: int, dim: int, repeats: int, authors_routine: bool,
             authors_routine_on_noise: bool, seed: int) -> dict:
    import os
    import time

    from ..features import benchmark_inputs

    camvid_images, camvid, source = benchmark_inputs("dino-vits8", images)
    rng = np.random.default_rng(seed)
    sets = {"camvid": [f["patch"] for f in camvid], "clustered": _clustered_maps(images, grid, dim, seed),
            "noise": [rng.standard_normal((grid, grid, dim)).astype(np.float32) for _ in range(noise_maps)]}
    loops = {"incremental": {}, "straightforward": {"incremental": False}}
    if authors_routine:
        loops["authors_routine"] = {"principal": "lowrank", "seed": seed}
    t0 = time.perf_counter()
    proposal_soft_masks(np.random.default_rng(seed).standard_normal((8, 8, 16)).astype(np.float32))
    out: dict = {"camvid_features": source, "threads": torch.get_num_threads(),
                 "kernel_load_s": time.perf_counter() - t0, "sets": {},
                 "machine_speed": {"refresh_ms_before": _refresh_ms(dim)}}
    for name, maps in sets.items():
        row: dict = {"maps": len(maps), "shape": list(maps[0].shape)}
        masks = {}
        for loop, options in loops.items():
            if loop == "authors_routine" and name == "noise" and not authors_routine_on_noise:
                row[loop] = "skipped (-a authors_routine_on_noise=true: over 20 minutes per map)"
                continue
            seconds, masks[loop] = [], []
            for _ in range(repeats if loop == "incremental" else 1):
                t0 = time.perf_counter()
                masks[loop] = [proposal_soft_masks(f, **options) for f in maps]
                seconds.append((time.perf_counter() - t0) / len(maps))
            row[loop] = {"s_per_image": min(seconds), "masks_per_image": float(np.mean([len(m) for m in masks[loop]]))}
        for loop in masks:
            if loop != "incremental":
                same = sum(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(masks["incremental"], masks[loop]))
                row[f"identical_to_{loop}"] = f"{same} of {len(maps)} maps"
        absolute = [proposal_soft_masks(f, anchor="abs") for f in maps]
        same = sum(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(masks["incremental"], absolute))
        row["abs_anchor"] = {"identical_masks": f"{same} of {len(maps)} maps",
                             "masks_per_image": float(np.mean([len(m) for m in absolute]))}
        if name == "camvid":
            row["abs_anchor"]["oracle"] = _oracle_scores(camvid_images, masks["incremental"], absolute)
        out["sets"][name] = row
    out["machine_speed"]["refresh_ms_after"] = _refresh_ms(dim)
    out["machine_speed"]["note"] = ("the tracker's refresh alone (float64 eigendecomposition of a dim x dim scatter "
                                    "on one BLAS thread, best of 10) before and after the sets: how fast this "
                                    "machine ran")
    out["load_average_1min"] = os.getloadavg()[0]
    return out


def _refresh_ms(dim: int) -> float:
    """Milliseconds of one eigendecomposition of a fixed dim x dim scatter as the tracker refreshes it, best of 10:
    a yardstick of the machine's speed during the benchmark (a shared virtual machine's varies by tens of %)."""
    import time

    import scipy.linalg

    rows = np.random.default_rng(0).standard_normal((4 * dim, dim))
    scatter = rows.T @ rows
    seconds = []
    with _one_blas_thread():  # as the tracker runs it
        for _ in range(10):
            t0 = time.perf_counter()
            scipy.linalg.eigh(scatter, driver="evd", check_finite=False)
            seconds.append(time.perf_counter() - t0)
    return 1e3 * min(seconds)


def _oracle_scores(images: list[np.ndarray], signed: list[np.ndarray], absolute: list[np.ndarray]) -> dict:
    """Table 5 oracle (each proposal takes its majority true class; no CRF) with the two anchor rules, scored on
    the proposals' pixels ("pseudo") and on all pixels ("all"), on the benchmark's CamVid images."""
    from ..data import open_dataset
    from ..data.protocol import Protocol
    from ..data.shared import shared_data_dir
    from ..metrics import StreamingConfusion
    from .primaps_em import oracle_pseudo_labels

    shared = shared_data_dir()
    if shared is None or not (shared / "camvid").is_dir():
        return {"skipped": "no ../shared/data/camvid"}
    dataset = open_dataset("camvid", shared / "camvid", "val")
    labels = [Protocol().apply_label(dataset.load_label(i), 8) for i in range(len(images))]
    scores = {}
    for rule, soft in (("signed", signed), ("abs", absolute)):
        conf = StreamingConfusion(dataset.num_classes, dataset.num_classes)
        for masks, label in zip(soft, labels):
            pseudo = oracle_pseudo_labels(proposals_to_image(masks, label.shape, crf=False), label)
            conf.update(pseudo, label)
        m = conf.compute(dataset.num_classes)
        scores[rule] = {"pseudo_miou": m["labelled"]["miou"], "all_miou": m["miou"], "all_acc": m["acc"]}
    return scores
