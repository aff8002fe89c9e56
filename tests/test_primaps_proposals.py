"""PriMaPs mask proposals as the paper and the reference code (github.com/visinf/primaps) make them: the signed
nearest-neighbour anchor, the reference routine's sign, the stop at exactly the coverage; and the incremental
loop giving the straightforward loop's masks on structured and noise maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_bench.methods import primaps_proposals as pp


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small tensors: see conftest's one_thread."""


def offset_line(rows: int = 8, cols: int = 8, dim: int = 64) -> np.ndarray:
    """Features t * e0 + 2 * e1: t = +1 on all patches but the last 4, where t = -3. The principal direction is
    e0; the cosines to it are +0.45 (t = 1) and -0.83 (t = -3)."""
    f = np.zeros((rows, cols, dim), np.float32)
    f[..., 0], f[..., 1] = 1.0, 2.0
    f.reshape(-1, dim)[-4:, 0] = -3.0
    return f


def test_the_signed_anchor_is_not_the_largest_absolute_cosine():
    f = offset_line()
    signed, absolute = pp.proposal_soft_masks(f), pp.proposal_soft_masks(f, anchor="abs")
    # the routine signs e0 so that the first patch lies on its positive side: the anchor is a t = +1 patch
    assert (signed[0] > 0).sum() == 60 and (signed[1] > 0).sum() == 4
    assert (absolute[0] > 0).sum() == 4 and (absolute[1] > 0).sum() == 60  # |cos|: the t = -3 patches first
    assert np.array_equal(pp.proposal_soft_masks(f, principal="lowrank"), signed)  # the reference routine agrees


def test_with_no_positive_cosine_left_the_anchor_is_the_first_assigned_patch():
    # Two tight clusters along e0 and e1; once the first is cut, the second's principal direction (its noise) can
    # have a negative cosine to all of it: the code then anchors on the first assigned patch, whose similarity
    # (~0) only picks a few of the remaining patches, and so do we.
    rng = np.random.default_rng(0)
    f = np.zeros((10, 10, 8), np.float32)
    f[:, :5, 0] = f[:, 5:, 1] = 1.0
    f += 0.05 * rng.standard_normal(f.shape).astype(np.float32)
    soft = pp.proposal_soft_masks(f)
    x = torch.tensor(f.reshape(-1, 8))
    free = torch.tensor(~(soft[0] > 0).reshape(-1))
    v = pp.principal_directions(x[free])[:, 0]
    assert (torch.nn.functional.normalize(x[free], dim=1) @ v).max() < 0  # no unassigned patch is positive
    assert (soft[1] > 0).sum() < 50  # the second mask is a fragment of the right half, as in the code
    assert np.array_equal(pp.proposal_soft_masks(f, principal="lowrank"), soft)
    assert len(pp.proposal_soft_masks(f, anchor="abs")) == 2  # |cos| anchors on an unassigned patch: two halves


def test_the_stop_is_at_exactly_the_coverage():
    # 1520 of 1600 patches (95%) along e0, 80 along e1: the first mask takes the 1520 and the loop stops
    f = np.zeros((40, 40, 4), np.float32)
    f[..., 0] = 1.0
    f[-2:, :, 0], f[-2:, :, 1] = 0.0, 1.0
    soft = pp.proposal_soft_masks(f, anchor="abs")  # the two |cosines| tie: the first patch, an e0 one
    assert len(soft) == 1 and (soft[0] > 0).sum() == 1520  # a float32 ratio below 0.95 asked for one more mask
    assert [pp.coverage_target(c, n) for c, n in ((0.95, 1600), (0.1, 1600), (0.95, 529), (1.0, 7))] == \
        [1520, 160, 503, 7]


def _stable_lowrank_direction(x: torch.Tensor) -> torch.Tensor | None:
    """torch.pca_lowrank's first direction (q=3, niter=100, as the reference code calls it) where two random
    starts give the same sign (converged), else None."""
    found = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        found.append(torch.pca_lowrank(x, q=3, niter=100)[2][:, 0])
    return found[0] if float(found[0] @ found[1]) > 0.99 else None


def test_the_direction_has_the_sign_the_reference_routine_gives_it():
    g = torch.Generator().manual_seed(11)
    compared = 0
    for dim in (8, 59, 60, 64, 200):
        for rows in (10, 59, 60, 61, 150):  # both sides of the SVD's width rule, rows above and below dim
            centres = torch.randn(4, dim, generator=g) * torch.tensor([4.0, 3.0, 2.0, 1.0])[:, None]
            x = centres[torch.randint(0, 4, (rows,), generator=g)] + 0.1 * torch.randn(rows, dim, generator=g)
            x += torch.randn(dim, generator=g)  # a shared offset, as real features have
            reference = _stable_lowrank_direction(x)
            if reference is None:
                continue
            ours = pp.principal_directions(x)[:, 0]
            assert float(ours @ reference) > 0.999, (rows, dim)
            compared += 1
    assert compared >= 20


def clustered(count: int = 2, grid: int = 16, dim: int = 64) -> list[np.ndarray]:
    return pp._clustered_maps(count, grid, dim, seed=0)


def test_mask_values_are_float64_cosines_rounded_to_float32():
    # the same values whatever BLAS, thread count or order computes them: both loops (and any machine) agree
    f = clustered(1)[0]
    x = torch.tensor(f.reshape(-1, f.shape[-1]))
    unit = torch.nn.functional.normalize(x, dim=1).numpy()
    patches = pp.FreePatches(unit)
    patches.remove(np.arange(0, len(unit), 3))
    free = patches.free
    taken, values = pp._anchor_mask(unit, patches.packed, patches.patch, patches.count, 5, np.float32(0.4))
    cosines = (unit.astype(np.float64) @ unit[5].astype(np.float64)).astype(np.float32)
    cosines[~free] = 0
    peak = cosines.max()
    expected = np.flatnonzero(free & (cosines >= np.float32(0.4) * peak) & (cosines > 0))
    assert np.array_equal(taken, expected) and len(taken) > 1
    assert np.array_equal(values, cosines[expected] / peak)
    # rows whose cosines lie a float32 step or so either side of the threshold: the product only picks rows
    rng = np.random.default_rng(1)
    anchor = rng.standard_normal(64)
    anchor /= np.linalg.norm(anchor)
    cosines = np.float32(0.4) + rng.integers(-40, 40, 200) * 2.0 ** -25  # the threshold 0.4 * peak, peak = 1
    other = rng.standard_normal((200, 64))
    other -= np.outer(other @ anchor, anchor)
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    unit = np.vstack([anchor, cosines[:, None] * anchor + np.sqrt(1 - cosines[:, None] ** 2) * other])
    unit = unit.astype(np.float32)
    patches = pp.FreePatches(unit)
    taken, values = pp._anchor_mask(unit, patches.packed, patches.patch, patches.count, 0, np.float32(0.4))
    exact = (unit.astype(np.float64) @ unit[0].astype(np.float64)).astype(np.float32)
    expected = np.flatnonzero(exact >= np.float32(0.4) * exact.max())
    assert 20 < len(expected) < 180 and np.array_equal(taken, expected)
    assert np.array_equal(values, exact[expected] / exact.max())


def _anchor_by_the_rule(unit, rows, free, v, slack, mean, signed):
    """``proven_anchor``'s rule over every free row in float64, without the float32 product that picks the few
    rows it sums exactly: -1 where the margin (or the sign) is within the slack."""
    n, d = unit.shape
    count, first = int(free.sum()), int(np.flatnonzero(free)[0])
    sign = 1.0
    if signed:
        if count >= d:
            offset = rows[first].astype(np.float64) - mean
            scale = np.linalg.norm(offset) + np.linalg.norm(rows[first].astype(np.float64)) + np.linalg.norm(mean)
            pivot, narrow = offset @ v, d < pp.SVD_FLIPS_FROM_WIDTH
        else:
            pivot, narrow, scale = v[0], count < pp.SVD_FLIPS_FROM_WIDTH, 1.0
        if not abs(pivot) > slack * scale:
            return -1
        sign = 1.0 if (pivot > 0) != narrow else -1.0
    scores = unit.astype(np.float64) @ v
    scores = sign * scores if signed else np.abs(scores)
    order = np.flatnonzero(free)[np.argsort(-scores[free], kind="stable")]
    top, runner_up = scores[order[0]], scores[order[1]] if len(order) > 1 else -np.inf
    if signed and count < n:
        if top < -slack:
            return int(np.flatnonzero(~free)[0])
        if top <= slack:
            return -1
    return int(order[0]) if top - runner_up > 2 * slack else -1


def test_the_anchor_from_the_float32_product_is_the_rules_anchor():
    # the float32 product only picks which rows to sum exactly: near-ties and every sign case decide the same
    rng = np.random.default_rng(2)
    decided = undecided = 0
    for trial in range(300):
        n, d = int(rng.integers(20, 120)), int(rng.choice([8, 48, 100]))
        rows = rng.standard_normal((n, d)).astype(np.float32)
        unit = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
        patches = pp.FreePatches(unit)
        patches.remove(np.flatnonzero(rng.random(n) < rng.choice([0.0, 0.3, 0.9]))[: n - 2])
        assert sorted(patches.patch[:patches.count]) == list(np.flatnonzero(patches.free))
        assert np.array_equal(patches.packed[:patches.count], unit[patches.patch[:patches.count]])
        v = rng.standard_normal(d)
        v /= np.linalg.norm(v)
        if trial % 3 == 0:  # a near-tie: the two best free rows' cosines a slack or so apart
            best = np.flatnonzero(patches.free)[:2]
            v = unit[best[0]].astype(np.float64) + unit[best[1]] + rng.normal(0, 1e-5, d)
            v /= np.linalg.norm(v)
        mean = rows[patches.free].astype(np.float64).mean(0)
        slack = float(rng.choice([0.0, 1e-6, 3e-5, 1e-3, 0.05]))
        for signed in (True, False):
            got = pp.proven_anchor(unit, rows, patches.free, patches.packed, patches.patch, patches.count, v, slack,
                                   mean, signed, pp.SVD_FLIPS_FROM_WIDTH)
            assert got == _anchor_by_the_rule(unit, rows, patches.free, v, slack, mean, signed), (trial, signed)
            decided, undecided = decided + (got >= 0), undecided + (got < 0)
    assert decided > 100 and undecided > 50
    # a NaN row is never picked and hides no other (no comparison is true for it), as in the float64 loop
    unit[3] = np.nan
    patches, without = pp.FreePatches(unit), pp.FreePatches(unit)
    without.remove(np.array([3]))
    free = patches.free.copy()
    v = unit[5].astype(np.float64)
    got = pp.proven_anchor(unit, rows, free, patches.packed, patches.patch, patches.count, v, 0.0, mean, False, 60)
    assert got == 5
    masks = [pp._anchor_mask(unit, f.packed, f.patch, f.count, 5, np.float32(0.4)) for f in (patches, without)]
    assert np.array_equal(masks[0][0], masks[1][0]) and np.array_equal(masks[0][1], masks[1][1])


@pytest.mark.parametrize("maps", [clustered(), [np.random.default_rng(0).standard_normal((16, 16, 64))
                                               .astype(np.float32)]], ids=["clustered", "noise"])
def test_the_incremental_loop_gives_the_straightforward_loops_masks(maps):
    for f in maps:
        fast, plain = pp.proposal_soft_masks(f), pp.proposal_soft_masks(f, incremental=False)
        assert len(fast) > 3 and fast.shape == plain.shape and np.array_equal(fast, plain)


@pytest.mark.slow
def test_the_incremental_loop_gives_the_straightforward_loops_masks_on_camvid_features(shared_dataset):
    from ssl_bench.features import benchmark_inputs

    shared_dataset("camvid")
    _, feats, _ = benchmark_inputs("dino-vits8", 2)  # 40 x 40 x 384, random weights
    for f in (f["patch"] for f in feats):
        assert np.array_equal(pp.proposal_soft_masks(f), pp.proposal_soft_masks(f, incremental=False))


# ---- the direction tracker: proofs from inertia, bounds that hold, masks that do not change ---------------------

from ssl_bench.methods import primaps_directions as pdir  # noqa: E402


def _downdated(seed: int, d: int = 24, k: int = 6):
    rng = np.random.default_rng(seed)
    lam = np.sort(rng.uniform(1, 10, d))
    p = rng.standard_normal((k, d))
    return lam, p, np.diag(lam) - p.T @ p


def test_the_inertia_counts_the_eigenvalues_above_a_shift():
    for seed in range(20):
        lam, p, a = _downdated(seed)
        exact = np.linalg.eigvalsh(a)
        for tau in (*np.linspace(exact[0] - 1, exact[-1] + 1, 15), lam[-1], lam[3]):  # also on poles
            assert pdir.eigenvalues_above(lam, p, tau) == int((exact > tau).sum()), (seed, tau)
    rng = np.random.default_rng(0)
    pivots = set()
    for k in (1, 2, 7, 40):  # symmetric indefinite: 2x2 Bunch-Kaufman blocks and interchanges included
        for _ in range(20):
            m = rng.standard_normal((k, k))
            m = m + m.T + rng.standard_normal() * np.eye(k)
            assert pdir.negative_eigenvalues(m) == int((np.linalg.eigvalsh(m) < 0).sum())
            a, blocks, order, _, _ = pdir._bunch_kaufman(m)  # the same factors solve: the Lanczos operator's M^-1
            b = rng.standard_normal(k)
            assert np.allclose(pdir._ldl_solve(a, blocks, order, b), np.linalg.solve(m, b), rtol=1e-8, atol=1e-10)
            pivots |= set(blocks.tolist()) | ({"swapped"} if (order != np.arange(k)).any() else set())
    assert pivots >= {1, 2, "swapped"}
    singular = np.zeros((3, 3))
    singular[0, 0], singular[2, 2] = -1.0, 2.0  # a zero pivot: a zero eigenvalue, which the proof counts too
    assert pdir._bunch_kaufman(singular)[3:] == (1, 1)
    assert pdir._bunch_kaufman(np.array([[0.0, 1.0], [1.0, 0.0]]))[3:] == (1, 0)  # a 2x2 pivot
    lam, p = np.array([1.0, 2.0]), np.array([[0.0, 1.0]])  # A = diag(1, 1): none just above 1 (M nearly singular)
    assert pdir.eigenvalues_above(lam, p, 1.0 + 1e-6) == 0 and pdir.eigenvalues_above(lam, p, 0.5) == 2


def test_the_trackers_estimate_is_within_its_proven_bound_of_the_exact_direction():
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((300, 48))
    tracker = pdir.DirectionTracker(torch.tensor(rows, dtype=torch.float32), max_pending=16)
    free = np.ones(len(rows), bool)
    estimated = 0
    for step in range(120):
        x = tracker.rows[free]
        xc = x - x.mean(0)
        exact = np.linalg.eigh(xc.T @ xc)[1][:, -1]
        found = tracker.estimate()
        if found is not None:
            v, bound = found
            assert min(np.linalg.norm(v - exact), np.linalg.norm(v + exact)) <= bound + 1e-9, step
            estimated += 1
        taken = np.zeros(len(rows), bool)  # the row most aligned with the direction: the anchor of a noise map
        taken[np.flatnonzero(free)[np.argmax(np.abs(x @ exact) / np.linalg.norm(x, axis=1))]] = True
        if step % 40 == 39:  # now and then a larger mask: the tracker drops its basis and starts again
            taken[np.flatnonzero(free & ~taken)[:30]] = True
        tracker.remove(taken)
        free &= ~taken
    assert estimated >= 100  # all but the few steps after a large mask or a refresh


@pytest.mark.parametrize("anchor", ["signed", "abs"])
def test_noise_masks_come_from_proven_estimates_and_equal_the_straightforward_loops(anchor, monkeypatch):
    f = np.random.default_rng(5).standard_normal((24, 24, 96)).astype(np.float32)
    exact_calls = []
    top = pdir.DirectionTracker.top
    monkeypatch.setattr(pdir.DirectionTracker, "top", lambda self, *a: exact_calls.append(1) or top(self, *a))
    fast = pp.proposal_soft_masks(f, anchor=anchor)
    plain = pp.proposal_soft_masks(f, anchor=anchor, incremental=False)
    assert len(fast) > 400 and fast.shape == plain.shape and np.array_equal(fast, plain)
    assert len(exact_calls) < 0.1 * len(fast)  # the exact direction only where the estimate proves nothing
