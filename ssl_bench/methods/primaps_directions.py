"""The first principal direction of the patches a PriMaPs image has not assigned yet (``primaps_proposals``).

``principal_directions`` is the exact direction, signed as the reference code's routine signs it (see
``primaps_proposals`` for why). ``DirectionTracker`` follows it through the proposal loop for a fraction of
the cost, and says how far its estimate can be from the exact one, so the loop takes from it only the
decisions that estimate proves (the anchor patch and the sign) and asks for the exact direction otherwise:
the masks are those of the exact loop (tests compare them).

Why a tracker: on a map with little structure (noise, random or early-training backbones) every mask is one
patch, and a 40x40 image needs ~1,500 leading eigenvectors of 384 x 384 scatter matrices, each of which
costs a tridiagonal reduction (~8 ms) when computed from scratch. Between two masks the scatter changes by
a few rank-one downdates. The tracker keeps the full eigendecomposition Q diag(lam) Q^T of the scatter at its
last refresh and the downdates since, P (k x d, in Q's basis): the scatter now is Q (diag(lam) - P^T P) Q^T.
Its top eigenpair costs O(d k^2) through the Woodbury identity: a few Lanczos steps on (A - sigma)^-1. After a
one-patch mask (a rank-one downdate) the eigenvalues interlace, so the previous second eigenvalue lies between
the new first two: as the shift, it makes the top eigenvalue the only positive one of the operator, and the
inertia of the same factorisation (Sylvester's law, ``eigenvalues_above``) proves that exactly one eigenvalue
lies above it. Where that fails (larger masks), the shift goes just above the top eigenvalue (the previous one
bounds it: downdates only lower eigenvalues), with a separate count and Rayleigh-quotient polishing. Either way,
"exactly one eigenvalue above tau" means every other is at most tau, and by Davis-Kahan the vector is within
sqrt(2) r / (gap - r) of the exact one (r: the residual norm, gap: theta - tau).

The kernels (Woodbury operator, Bunch-Kaufman factorisation with its inertia and solves, Lanczos) are compiled
with numba: on k x d arrays this small (k <= 96, d = 384) numpy's per-call overhead, not arithmetic, was most of
their time. Per mask of a noise map what remains is arithmetic and memory: the capacitance matrix (k^2 d), the
amortised refresh (~17 ms every 96 masks) and two passes over Q (1.2 MB) and over the unassigned features.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.linalg
import torch
from numba import njit

LOWRANK_RANK, LOWRANK_ITERATIONS = 3, 100  # the reference code's torch.pca_lowrank(q=3, niter=100)


# ---- the exact direction and its sign ------------------------------------------------------------------------

def top_directions(x: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` leading principal directions (d, count) of the rows of x, largest variance first, from the
    float64 eigendecomposition of the smaller of the scatter (d x d) and Gram (n x n) matrices."""
    xc = (x - x.mean(0, keepdim=True)).double()
    if len(xc) >= xc.shape[1]:
        _, vecs = torch.linalg.eigh(xc.T @ xc)
        return vecs.flip(1)[:, :count].float()
    _, u = torch.linalg.eigh(xc @ xc.T)
    dirs = xc.T @ u.flip(1)[:, :count]
    return (dirs / dirs.norm(dim=0, keepdim=True).clamp_min(1e-300)).float()


# MKL's SVD (torch on a CPU) keeps the sign a Householder QR gave a 3-row matrix of fewer columns than this, and
# flips it from this width on; measured, and pinned by test_primaps_proposals against torch.pca_lowrank itself.
SVD_FLIPS_FROM_WIDTH = 60


def sign_pivot(count: int, first_offset, directions):
    """The numbers (count,) whose signs ``routine_signs`` reads for ``count`` rows, ``first_offset`` the first
    row minus the mean (read with at least as many rows as dimensions), and whether the rule is reversed."""
    d = len(directions)
    if count >= d:
        return first_offset @ directions, d < SVD_FLIPS_FROM_WIDTH
    return directions[0], count < SVD_FLIPS_FROM_WIDTH


def routine_signs(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Signs (count,) that ``torch.pca_lowrank`` gives the principal directions (d, count) of the rows of x (n, d)
    on a CPU once it has converged, whatever its random start. Its last QR makes the first row's coordinate on the
    basis negative (Householder), and its SVD then flips that sign when its 3-row matrix has at least
    ``SVD_FLIPS_FROM_WIDTH`` columns: so the first row lies on the positive side of the mean, or, with fewer rows
    than dimensions (the routine works on the transpose), the direction's first coordinate is positive; both
    rules reversed below that width. Depends only on the sign of a well-defined number, not on rounding."""
    pivot, narrow = sign_pivot(len(x), x[0] - x.mean(0), directions)
    signs = torch.where(pivot < 0, -1.0, 1.0)
    return -signs if narrow else signs


def principal_directions(x: torch.Tensor, count: int = 1, principal: str = "exact", seed: int = 0,
                         top: Callable[[torch.Tensor, int], torch.Tensor] = top_directions) -> torch.Tensor:
    """The first ``count`` principal directions (d, count) of the rows of x (n, d), signed as the reference
    code's routine signs them. ``principal="lowrank"``: that routine itself, seeded. ``top(x, width)``: the
    unsigned leading directions (the incremental loop passes its own)."""
    n, d = x.shape
    if n > 1 and principal == "lowrank" and min(n, d) >= LOWRANK_RANK >= count:
        with torch.random.fork_rng(devices=[]):  # the routine draws from the global generator: seed it, restore it
            torch.manual_seed(seed)
            return torch.pca_lowrank(x, q=LOWRANK_RANK, niter=LOWRANK_ITERATIONS)[2][:, :count]
    if n < 2 or not (x - x[0]).abs().max() > 0:  # no variance: the mean direction stands in (module docstring)
        mean = x.mean(0)
        return (mean / mean.norm().clamp_min(1e-30))[:, None].expand(d, count).clone()
    leading = top(x, min(count, n, d))
    return leading * routine_signs(x, leading)


# ---- the tracker ---------------------------------------------------------------------------------------------

class DirectionTracker:
    """The leading eigenvector of the unassigned rows' scatter through the proposal loop (module docstring).

    ``top`` is the exact direction (LAPACK's subset solver on the scatter, kept by subtracting the removed rows
    instead of forming it again); ``estimate`` is the fast one with its error bound, or None where it has
    none to give (after a large mask, or when the proof fails). ``max_pending`` downdates are kept before the
    eigendecomposition is refreshed (one ~17 ms decomposition instead of ~1,500 top-eigenvector solves)."""

    def __init__(self, x: torch.Tensor, max_pending: int = 96, lanczos_steps: int = 12):
        self.rows = x.double().numpy()
        self.n, self.d = self.rows.shape
        # the sums are kept about the first mean: the scatter is then sum_xx - n (mean - c)(mean - c)^T with a
        # small second term, not the difference of two large ones (features far from the origin lose digits)
        self.center = self.rows.mean(0)
        centered = self.rows - self.center
        self.sum_xx, self.sum_x, self.count = centered.T @ centered, centered.sum(0), self.n
        self.mean = self.center + self.sum_x / self.count
        self.removed: list[np.ndarray] = []  # indices of rows to take out of sum_xx (one GEMM, not one outer product each)
        self.max_pending, self.lanczos_steps = max_pending, lanczos_steps
        self.basis: tuple[np.ndarray, np.ndarray] | None = None  # (lam, Q) of the scatter at the last refresh
        self.pending = np.empty((max_pending, self.d))  # downdates since, in Q's basis
        self.k = 0
        self.warm: tuple | None = None  # in Q's basis: (last top vector, its eigenvalue, the second's estimate)
        self.small_steps = 0  # masks of a few rows in a row: when the fast path pays for a refresh

    # -- the scatter -------------------------------------------------------------------------------------------

    def scatter(self) -> np.ndarray:
        if self.removed:
            gone = self.rows[np.concatenate(self.removed)] - self.center
            self.sum_xx -= gone.T @ gone
            self.sum_x -= gone.sum(0)
            self.removed = []
        return self.sum_xx - np.outer(self.sum_x, self.sum_x / self.count)

    def remove(self, taken: np.ndarray) -> None:
        """Take the rows ``taken`` (indices, or a boolean mask) out of the scatter."""
        taken = np.flatnonzero(taken) if taken.dtype == bool else taken
        m, n = len(taken), self.count
        if m == 1 and self.basis is not None and n > 1 and self.k + 2 <= self.max_pending:  # a noise map's case
            self.removed.append(taken)
            self.count -= 1
            _downdate_one(self.basis[1], self.rows[taken[0]], self.mean, n, self.pending[self.k])
            self.k += 1
            self.small_steps += 1
            return
        self.removed.append(taken)
        self.count -= m
        rows = self.rows[taken]
        mean = self.mean
        self.mean = (n * mean - rows.sum(0)) / self.count if self.count else mean
        if self.basis is not None and m <= 4 and self.count > 0 and self.k + m + 1 <= self.max_pending:
            # removing set B (mean b) from n rows takes sum (r - b)(r - b)^T and m (n - m) / n (rest mean - b)
            # (rest mean - b)^T off the scatter: m + 1 rank-one downdates (one for m = 1)
            b = rows.mean(0)
            vectors = np.sqrt(m * self.count / n) * (self.mean - b)[None]
            if m > 1:
                vectors = np.concatenate([vectors, rows - b])
            np.dot(vectors, self.basis[1], out=self.pending[self.k:self.k + len(vectors)])  # Q^T v, in Q's basis
            self.k += len(vectors)
        else:
            self.basis, self.k, self.warm = None, 0, None
        self.small_steps = self.small_steps + 1 if m <= 4 else 0

    # -- the exact direction -----------------------------------------------------------------------------------

    def top(self, _x: torch.Tensor, count: int) -> torch.Tensor:
        """The ``count`` leading eigenvectors (d, count) of the scatter, largest first (as ``top_directions``)."""
        d = self.d
        vals, vecs = scipy.linalg.eigh(self.scatter(), subset_by_index=[d - count, d - 1], driver="evr",
                                       check_finite=False, overwrite_a=True)
        if count == 1 and self.basis is not None:  # the next estimate starts here (its second: from above)
            self.warm = (self.basis[1].T @ vecs[:, 0], float(vals[0]), -np.inf)
        return torch.from_numpy(vecs[:, ::-1].copy()).float()

    # -- the fast direction ------------------------------------------------------------------------------------

    def estimate(self) -> tuple[np.ndarray, float] | None:
        """(v, bound): the leading eigenvector (d,) float64 up to sign, and a proven bound on its distance to the
        exact one (up to sign); None where no estimate is proven."""
        if self.count < 2:
            return None
        if self.basis is None:
            if self.small_steps < 2:  # large masks: each changes the scatter too much to track
                return None
            lam, q = scipy.linalg.eigh(self.scatter(), driver="evd", check_finite=False)
            self.basis, self.k = (lam, q), 0
            self.warm = (np.eye(1, self.d, self.d - 1)[0], float(lam[-1]), float(lam[-2]))
        lam, q = self.basis
        p = self.pending[:self.k]
        y, theta, second = self.warm
        # A rank-one downdate interlaces: the new top eigenvalue is at least the old second, the new second at
        # most the old second. The old second eigenvalue is thus a shift between the new first two: one
        # factorisation there gives both the proof (its inertia) and the operator whose largest eigenvalue is the
        # top one.
        found = interior_lanczos(lam, p, y, second, self.lanczos_steps) if second < theta else None
        if found is None:  # the shift from above the spectrum, and a separate count for the proof
            y, theta, residual, second = lanczos_top(lam, p, y, theta, self.lanczos_steps)
            bound = proven_bound(lam, p, theta, residual, second)
            if bound > 1e-3:  # polish: Rayleigh-quotient iteration converges cubically from here
                y, theta, residual = rayleigh_polish(lam, p, y)
                bound = proven_bound(lam, p, theta, residual, -np.inf)
            found = y, theta, bound, second
        y, theta, bound, second = found
        if not np.isfinite(bound):
            return None
        self.warm = (y, theta, second)
        return q @ y, bound


@njit(cache=True)
def _downdate_one(q: np.ndarray, row: np.ndarray, mean: np.ndarray, n: int, out: np.ndarray) -> None:
    """``DirectionTracker.remove`` of one row of n, compiled: ``mean`` becomes the other rows' mean (in place),
    and ``out`` the rank-one downdate in Q's basis, Q^T u with u = sqrt((n - 1) / n) (new mean - row)."""
    scale = np.sqrt((n - 1) / n)
    for t in range(mean.shape[0]):
        mean[t] = (n * mean[t] - row[t]) / (n - 1)
    out[:] = np.dot(scale * (mean - row), q)


# ---- the kernels: the top eigenpair of A = diag(lam) - P^T P --------------------------------------------------
# Compiled (numba): a noise map calls them ~1,500 times per image on k x d arrays small enough (k <= 96) that
# numpy's per-call overhead, not arithmetic, was most of their time.

@njit(cache=True)
def _times(lam: np.ndarray, p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return lam * y - p.T @ (p @ y)


@njit(cache=True)
def _rayleigh(lam: np.ndarray, p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    ay = _times(lam, p, y)
    theta = y @ ay
    return theta, np.sqrt(np.sum((ay - theta * y) ** 2))


@njit(cache=True)
def _capacitance(lam: np.ndarray, p: np.ndarray, sigma: float):
    """(D^-1, P D^-1, M) at the shift sigma, D = diag(lam) - sigma: M = I - P D^-1 P^T is the Woodbury
    identity's capacitance matrix, and its inertia counts A's eigenvalues above sigma (``eigenvalues_above``)."""
    inv_d = 1.0 / (lam - sigma)
    pd = p * inv_d
    return inv_d, pd, np.eye(p.shape[0]) - pd @ p.T


@njit(cache=True)
def _shifted_inverse(inv_d, pd, a, blocks, order, y: np.ndarray) -> np.ndarray:
    """(A - sigma)^-1 y by the Woodbury identity: (D - P^T P)^-1 = D^-1 + D^-1 P^T M^-1 P D^-1 (``_capacitance``'s
    D^-1 and P D^-1; M^-1 from M's factors, ``_bunch_kaufman``)."""
    return inv_d * y + pd.T @ _ldl_solve(a, blocks, order, pd @ y)


@njit(cache=True)
def _shift_operator(lam: np.ndarray, p: np.ndarray, sigma: float):
    """What ``_shifted_inverse`` needs at sigma, and the number of eigenvalues of M that are not positive (A's
    above sigma are #(lam > sigma) minus those: ``eigenvalues_above``)."""
    inv_d, pd, capacitance = _capacitance(lam, p, sigma)
    a, blocks, order, negative, zero = _bunch_kaufman(capacitance)
    return (inv_d, pd, a, blocks, order), negative + zero


@njit(cache=True)
def _interior_result(lam: np.ndarray, p: np.ndarray, sigma: float, ritz: np.ndarray, vectors: np.ndarray):
    """(y, theta, bound, second) from the Ritz pairs of (A - sigma)^-1 where exactly one eigenvalue of A exceeds
    sigma: every other is then at most sigma, so the gap theta - sigma bounds the vector (Davis-Kahan); bound is
    inf where the gap is too small to prove anything (or so small that rounding could change the count)."""
    y = vectors[:, -1] / np.sqrt(np.sum(vectors[:, -1] ** 2))
    theta, residual = _rayleigh(lam, p, y)
    gap = theta - sigma
    second = sigma + 1.0 / ritz[0] if ritz[0] < 0 else -np.inf
    proven = gap > 2 * residual and gap > 1e-7 * abs(theta)
    bound = np.sqrt(2.0) * residual / (gap - residual) if proven else np.inf
    return y, theta, bound, second


@njit(cache=True)
def _lanczos(operator, y, steps, lam, p, sigma, target):
    """Lanczos with full re-orthogonalisation on (A - sigma)^-1 from the unit vector y: the Ritz values
    (ascending) and Ritz vectors (d, m) after ``steps`` steps or, where ``target`` > 0, from the 6th step on
    once ``_interior_result``'s bound is at most ``target`` (asked every second step and at the last)."""
    d = y.shape[0]
    basis = np.empty((steps, d))
    alpha, beta = np.zeros(steps), np.zeros(steps)
    basis[0] = y
    for j in range(steps):
        w = _shifted_inverse(*operator, basis[j])
        alpha[j] = basis[j] @ w
        w -= basis[:j + 1].T @ (basis[:j + 1] @ w)  # once: the proof does not rest on Lanczos' accuracy
        beta[j] = np.sqrt(np.sum(w ** 2))
        if not (np.isfinite(alpha[j]) and np.isfinite(beta[j])):  # a singular M (sigma an eigenvalue): no answer
            return np.zeros(0), np.zeros((d, 0))
        last = j + 1 == steps or not beta[j] > 1e-14 * abs(alpha[j])
        if last or (target > 0 and j >= 5 and j % 2 == 1):
            tridiagonal = np.diag(alpha[:j + 1])
            for i in range(j):
                tridiagonal[i, i + 1] = tridiagonal[i + 1, i] = beta[i]
            ritz, small = np.linalg.eigh(tridiagonal)
            vectors = basis[:j + 1].T @ small
            if last or _interior_result(lam, p, sigma, ritz, vectors)[2] <= target:
                return ritz, vectors
        basis[j + 1] = w / beta[j]
    return np.zeros(0), np.zeros((d, 0))  # not reached: the last step returns


@njit(cache=True)
def _interior_top(lam, p, y, sigma, steps, target):
    """``interior_lanczos`` compiled: (proven, y, theta, bound, second)."""
    if np.min(np.abs(lam - sigma)) < 1e-9 * max(np.max(np.abs(lam)), 1.0):  # too near a pole: as eigenvalues_above
        return False, y, 0.0, np.inf, -np.inf
    operator, nonpositive = _shift_operator(lam, p, sigma)
    if np.sum(lam > sigma) - nonpositive != 1:
        return False, y, 0.0, np.inf, -np.inf
    ritz, vectors = _lanczos(operator, y / np.sqrt(np.sum(y ** 2)), steps, lam, p, sigma, target)
    if len(ritz) == 0:
        return False, y, 0.0, np.inf, -np.inf
    y, theta, bound, second = _interior_result(lam, p, sigma, ritz, vectors)
    return np.isfinite(bound), y, theta, bound, second


def lanczos_top(lam: np.ndarray, p: np.ndarray, y: np.ndarray, upper: float, steps: int):
    """Top eigenpair of A from the start y, ``upper`` >= its top eigenvalue: Lanczos on (A - sigma)^-1, sigma
    just above ``upper``, whose most negative eigenvalue is A's top one. Returns (y, theta, residual, second):
    the Ritz vector, its Rayleigh quotient and residual norm, and the second Ritz value mapped back to A."""
    y = y / np.linalg.norm(y)
    theta, residual = _rayleigh(lam, p, y)
    if len(p) == 0 or residual <= 1e-13 * abs(theta):
        return y, theta, residual, -np.inf
    sigma = upper + 1e-9 * abs(upper) + 1e-12
    ritz, vectors = _lanczos(_shift_operator(lam, p, sigma)[0], y, steps, lam, p, sigma, -1.0)
    if len(ritz) == 0:
        return y, theta, residual, -np.inf
    y = vectors[:, 0] / np.linalg.norm(vectors[:, 0])
    theta, residual = _rayleigh(lam, p, y)
    second = sigma + 1.0 / ritz[1] if len(ritz) > 1 and ritz[1] < 0 else -np.inf
    return y, theta, residual, second


def interior_lanczos(lam: np.ndarray, p: np.ndarray, y: np.ndarray, sigma: float, steps: int,
                     target: float = 1e-4):
    """Top eigenpair of A with its proof from one factorisation at a shift sigma meant to lie between A's first
    two eigenvalues: the inertia of M(sigma) counts A's eigenvalues above sigma, and where that is exactly one,
    the largest eigenvalue of (A - sigma)^-1 is the top one's, well separated (the rest are negative).
    Returns (y, theta, bound, second) with ``proven_bound``'s meaning of bound, after ``steps`` steps or once
    the bound is at most ``target``; None where sigma is not between them or the gap is too small to prove
    anything."""
    if len(p) == 0:
        return None
    proven, *found = _interior_top(lam, p, y, float(sigma), steps, target)
    return tuple(found) if proven else None


def rayleigh_polish(lam: np.ndarray, p: np.ndarray, y: np.ndarray, iterations: int = 6):
    theta, residual = _rayleigh(lam, p, y)
    for _ in range(iterations):
        if residual <= 1e-12 * abs(theta):
            break
        z = _shifted_inverse(*_shift_operator(lam, p, theta)[0], y)
        y = z / np.linalg.norm(z)
        theta, residual = _rayleigh(lam, p, y)
    return y, theta, residual


def eigenvalues_above(lam: np.ndarray, p: np.ndarray, tau: float) -> int:
    """How many eigenvalues of A = diag(lam) - P^T P exceed tau, by Sylvester's law of inertia: with
    D = diag(lam) - tau, both A - tau and M = I - P D^-1 P^T are Schur complements of [[D, P^T], [P, I]], hence
    #(A > tau) = #(lam > tau) - #(M <= 0); M's eigenvalues are counted from its LDL^T factorisation
    (Bunch-Kaufman: O(k^3 / 3), no eigenvalues computed)."""
    margin = 1e-9 * max(float(np.abs(lam).max()), 1.0)
    near = np.abs(lam - tau) < margin
    if near.any():  # too close to a pole for D^-1 to leave I any digits: count above a shift a little lower,
        tau = float(lam[near].min()) - margin  # which only ever makes a proof of "one eigenvalue above" stricter
    above = int((lam > tau).sum())
    if len(p) == 0:
        return above
    _, _, _, negative, zero = _bunch_kaufman(_capacitance(lam, p, tau)[2])
    return above - negative - zero


@njit(cache=True)
def _bunch_kaufman(m: np.ndarray):
    """The Bunch-Kaufman factorisation P m P^T = L D L^T of a symmetric m, with LAPACK's pivot rule (dsytf2,
    lower triangle): (a, blocks, order, negative, zero). ``a`` holds L below the diagonal and D's 1x1 and 2x2 pivots
    on and next to it, ``blocks[k]`` is the size of the pivot starting at k (0 inside a 2x2), ``order`` is P
    (row i of P m P^T is row ``order[i]`` of m), and ``negative`` and ``zero`` count D's negative and zero
    eigenvalues: m's, by Sylvester's law of inertia. O(k^3 / 3), no eigenvalues computed."""
    a = m.copy()
    n = a.shape[0]
    order, blocks = np.arange(n), np.zeros(n, np.int64)
    alpha = (1.0 + np.sqrt(17.0)) / 8.0  # the rule's constant: bounds the growth of the entries
    negative, zero, k = 0, 0, 0
    while k < n:
        diagonal, largest, row = abs(a[k, k]), 0.0, k
        for i in range(k + 1, n):
            if abs(a[i, k]) > largest:
                largest, row = abs(a[i, k]), i
        step, swap = 1, k
        if diagonal < alpha * largest:
            row_largest = 0.0  # the largest off-diagonal entry of row ``row`` in the part left to factor
            for j in range(k, row):
                row_largest = max(row_largest, abs(a[row, j]))
            for i in range(row + 1, n):
                row_largest = max(row_largest, abs(a[i, row]))
            if diagonal * row_largest >= alpha * largest * largest:
                pass  # a 1x1 pivot at k after all
            elif abs(a[row, row]) >= alpha * row_largest:
                swap = row
            else:
                step, swap = 2, row
        into = k + step - 1
        if swap != into:
            _interchange(a, into, swap)
            order[into], order[swap] = order[swap], order[into]
        blocks[k] = step
        if step == 1:
            pivot = a[k, k]
            negative += pivot < 0
            zero += pivot == 0.0
            if pivot != 0.0:  # else a zero column: a zero pivot (solves then give inf)
                column = a[k + 1:, k].copy()
                for i in range(k + 1, n):
                    factor = column[i - k - 1] / pivot
                    rest = a[i, k + 1:i + 1]  # a view: the loop below vectorises
                    for j in range(rest.shape[0]):
                        rest[j] -= factor * column[j]
                    a[i, k] = factor  # L
        else:
            e00, e01, e11 = a[k, k], a[k + 1, k], a[k + 1, k + 1]
            det = e00 * e11 - e01 * e01
            # a 2x2 block with a negative determinant has one negative eigenvalue, else two of its trace's sign
            if det != 0:
                negative += 1 if det < 0 else 2 * (e00 + e11 < 0)
            else:  # one eigenvalue 0, the other the trace
                zero += 1 + (e00 + e11 == 0)
                negative += e00 + e11 < 0
            first, second = a[k + 2:, k].copy(), a[k + 2:, k + 1].copy()
            for i in range(k + 2, n):
                c0, c1 = first[i - k - 2], second[i - k - 2]
                w0, w1 = (e11 * c0 - e01 * c1) / det, (e00 * c1 - e01 * c0) / det
                rest = a[i, k + 2:i + 1]
                for j in range(rest.shape[0]):
                    rest[j] -= w0 * first[j] + w1 * second[j]
                a[i, k], a[i, k + 1] = w0, w1  # L
        k += step
    return a, blocks, order, negative, zero


@njit(cache=True)
def _interchange(a: np.ndarray, r: int, s: int) -> None:
    """Rows and columns r < s of a symmetric matrix swapped, in its lower triangle (with L's rows left of them)."""
    for j in range(r):
        a[r, j], a[s, j] = a[s, j], a[r, j]
    a[r, r], a[s, s] = a[s, s], a[r, r]
    for j in range(r + 1, s):
        a[j, r], a[s, j] = a[s, j], a[j, r]
    for i in range(s + 1, a.shape[0]):
        a[i, r], a[i, s] = a[i, s], a[i, r]


@njit(cache=True)
def negative_eigenvalues(m: np.ndarray) -> int:
    """The number of negative eigenvalues of the symmetric matrix m (``_bunch_kaufman``)."""
    return _bunch_kaufman(m)[3]


@njit(cache=True)
def _ldl_solve(a: np.ndarray, blocks: np.ndarray, order: np.ndarray, b: np.ndarray) -> np.ndarray:
    """m^-1 b from ``_bunch_kaufman``'s factors: permute, L, D, L^T, permute back. L's entries are those of
    ``a`` below the diagonal, except the one inside each 2x2 pivot (D's), which every loop takes back out."""
    n = b.shape[0]
    z = b[order].copy()
    for i in range(1, n):  # L z = z, row by row
        total = 0.0
        for j in range(i):
            total += a[i, j] * z[j]
        z[i] -= total - (a[i, i - 1] * z[i - 1] if blocks[i] == 0 else 0.0)
    k = 0
    while k < n:  # D z = z
        if blocks[k] == 1:
            z[k] /= a[k, k]
            k += 1
        else:
            e00, e01, e11 = a[k, k], a[k + 1, k], a[k + 1, k + 1]
            det = e00 * e11 - e01 * e01
            z[k], z[k + 1] = (e11 * z[k] - e01 * z[k + 1]) / det, (e00 * z[k + 1] - e01 * z[k]) / det
            k += 2
    for i in range(n - 1, 0, -1):  # L^T z = z, a row of L at a time
        for j in range(i):
            z[j] -= a[i, j] * z[i]
        if blocks[i] == 0:
            z[i - 1] += a[i, i - 1] * z[i]
    x = np.empty(n)
    x[order] = z
    return x


def proven_bound(lam: np.ndarray, p: np.ndarray, theta: float, residual: float, second: float) -> float:
    """A proven bound on |y - v| (up to sign) of a unit vector y with Rayleigh quotient theta and residual norm
    ``residual`` against A's top eigenvector v; ``second`` estimates the next eigenvalue (where to put tau).
    inf when the count does not prove theta's eigenvalue is the top one, or the gap is too small to say."""
    floor = 1e-7 * abs(theta)
    for gap in dict.fromkeys((max((theta - second) / 2, floor), floor)):
        if gap > 2 * residual and eigenvalues_above(lam, p, theta - gap) == 1:
            return float(np.sqrt(2) * residual / (gap - residual))
    return np.inf
