import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_bench.errors import UserError
from ssl_bench.ops import l2_normalize, spherical_kmeans, upsample_argmax


@pytest.mark.parametrize("k", [1, 2, 11, 27])
def test_upsample_argmax_equals_argmax_of_upsampled_scores(k):
    scores = np.random.default_rng(k).standard_normal((k, 7, 9)).astype(np.float32)
    up = F.interpolate(torch.from_numpy(scores)[None], size=(50, 61), mode="bilinear", align_corners=False)[0]
    assert (upsample_argmax(scores, (50, 61)) == up.argmax(0).numpy()).all()


def test_ties_go_to_the_first_class_like_argmax():
    scores = np.zeros((3, 4, 4), np.float32)
    scores[2, :2] = 1.0  # class 2 wins the top rows only
    labels = upsample_argmax(scores, (8, 8))
    assert labels.dtype == np.int64 and (labels[-1] == 0).all() and (labels[0] == 2).all()


@pytest.mark.parametrize("grid,size", [((4, 6), (32, 48)), ((6, 4), (48, 30)), ((3, 3), (9, 9)), ((1, 5), (7, 40)),
                                       ((5, 5), (5, 5)), ((7, 9), (4, 5))])  # up, odd ratios, one row, same, down
def test_upsample_argmax_follows_torch_at_any_ratio(grid, size):
    scores = np.random.default_rng(sum(size)).standard_normal((9, *grid)).astype(np.float32)
    up = F.interpolate(torch.from_numpy(scores)[None], size=size, mode="bilinear", align_corners=False)[0]
    labels = upsample_argmax(scores, size)
    assert labels.shape == size and (labels == up.argmax(0).numpy()).all()


def test_upsample_argmax_finds_a_class_on_top_only_between_two_patches():
    # class 2 is below classes 0 and 1 at both patch centres but above their mix halfway: the pixels in
    # between must be 2, which a rule looking only at the patches' own winners would miss
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.8]], np.float32)[:, None, :]
    up = F.interpolate(torch.from_numpy(scores)[None], size=(1, 16), mode="bilinear", align_corners=False)[0]
    labels = upsample_argmax(scores, (1, 16))
    assert (labels == up.argmax(0).numpy()).all() and set(labels[0]) == {0, 1, 2}


def test_upsample_argmax_gives_a_three_way_tie_at_a_crossing_to_the_first_class():
    # at the midpoint all three classes score 0.5 exactly: argmax takes class 0, not the steepest line
    scores = np.array([[0.5, 0.5], [0.0, 1.0], [1.0, 0.0]], np.float32)[:, None, :]
    for size in [(1, 1), (1, 3), (1, 5)]:
        up = F.interpolate(torch.from_numpy(scores)[None], size=size, mode="bilinear", align_corners=False)[0]
        assert (upsample_argmax(scores, size) == up.argmax(0).numpy()).all()


def test_l2_normalize_copies_unless_told_and_keeps_zero_rows():
    from ssl_bench.ops import l2_normalize

    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    y = l2_normalize(x)
    assert np.allclose(y, [[0.6, 0.8], [0.0, 0.0]]) and x[0, 0] == 3.0
    assert l2_normalize(x, copy=False) is x and np.allclose(x, y)
    assert l2_normalize(np.ones((2, 3, 4), np.float16)).dtype == np.float32


def plain_lloyd(x, k, seed, iterations=50):
    """The loop ``spherical_kmeans`` promises to equal, written the obvious way (every row, every step;
    similarities in float64, as it computes them)."""
    n, d = x.shape
    x64 = x.astype(np.float64)
    centroids = x[np.random.default_rng(seed).choice(n, k, replace=False)]
    for _ in range(iterations):
        labels = (x64 @ centroids.T.astype(np.float64)).argmax(1)
        counts = np.bincount(labels, minlength=k)
        for empty in np.flatnonzero(counts == 0):
            own = np.where(counts[labels] > 1, np.einsum("ij,ij->i", x64, centroids[labels].astype(np.float64)), np.inf)
            row = own.argmin()
            counts[labels[row]] -= 1
            counts[empty] += 1
            labels[row] = empty
        sums = np.stack([x[labels == j].sum(0, dtype=np.float64) for j in range(k)])
        centroids = (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)
    return centroids


def blobs(n, d, centres, spread, seed):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, d))
    return l2_normalize(means[rng.integers(centres, size=n)] + spread * rng.normal(size=(n, d)))


@pytest.mark.parametrize("spread", [0.3, 3.0])  # separated clusters (bounds skip most rows) and a single fog
@pytest.mark.parametrize("seed", [0, 1])
def test_spherical_kmeans_equals_the_plain_lloyd_loop(spread, seed):
    x = blobs(3000, 48, 6, spread, seed)
    fast, plain = spherical_kmeans(x, 9, seed, iterations=30), plain_lloyd(x, 9, seed, iterations=30)
    np.testing.assert_array_equal((x @ fast.T).argmax(1), (x @ plain.T).argmax(1))
    np.testing.assert_allclose(fast, plain, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(spherical_kmeans(x, 9, seed, iterations=30, bounds=False), fast)


def test_spherical_kmeans_refills_empty_clusters_like_the_plain_loop():
    # 4 distinct directions, each repeated: 6 initial centroids must coincide, so clusters empty out
    x = np.repeat(l2_normalize(np.random.default_rng(0).normal(size=(4, 16))), [30, 20, 10, 5], axis=0)
    fast, plain = spherical_kmeans(x, 6, 3, iterations=10), plain_lloyd(x, 6, 3, iterations=10)
    np.testing.assert_allclose(fast, plain, atol=1e-6)
    assert np.isfinite(fast).all() and len(np.unique((x @ fast.T).argmax(1))) == 4


def test_spherical_kmeans_normalises_rows_that_are_not_unit_norm():
    x = blobs(600, 16, 4, 1.0, 0)
    scaled = x * np.random.default_rng(1).uniform(0.2, 5.0, size=(len(x), 1)).astype(np.float32)
    fast = spherical_kmeans(scaled, 5, 0)  # unnormalised, the chord-distance bounds would skip wrongly
    np.testing.assert_array_equal(fast, spherical_kmeans(scaled, 5, 0, bounds=False))
    np.testing.assert_allclose(fast, spherical_kmeans(x, 5, 0), atol=1e-6)  # rows equal to float32 rounding


def test_spherical_kmeans_is_seeded_and_refuses_more_clusters_than_rows():
    x = blobs(500, 16, 5, 1.0, 0)
    np.testing.assert_array_equal(spherical_kmeans(x, 5, 7), spherical_kmeans(x, 5, 7))
    assert not np.array_equal(spherical_kmeans(x, 5, 7), spherical_kmeans(x, 5, 8))
    with pytest.raises(UserError, match="K=6 clusters need at least 6 patches"):
        spherical_kmeans(x[:5], 6, 0)


def test_spherical_kmeans_leaves_zero_rows_out_and_refuses_non_finite_features():
    x = blobs(400, 16, 4, 0.5, 0)
    with_zeros = np.insert(x, [0, 10, 10, 399], 0.0, axis=0)  # patches with no direction (l2_normalize keeps 0)
    centroids = spherical_kmeans(with_zeros, 6, 1)
    np.testing.assert_array_equal(centroids, spherical_kmeans(x, 6, 1))
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-6)
    x[5, 3] = np.nan
    with pytest.raises(UserError, match="NaN or infinite"):
        spherical_kmeans(x, 6, 1)


def test_kernels_give_the_same_result_on_any_number_of_threads():
    import numba

    from ssl_bench.ops import set_threads

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba sees one core: nothing to compare")
    x = blobs(4000, 32, 8, 2.0, 0)
    scores = np.random.default_rng(0).standard_normal((12, 9, 11)).astype(np.float32)
    results, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            set_threads(threads)
            results.append((spherical_kmeans(x, 10, 0, iterations=20), upsample_argmax(scores, (70, 90))))
    finally:
        set_threads(before)
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_set_threads_holds_for_torch_once_its_thread_pool_has_started():
    # numba launches its threading layer at its first set_num_threads, which reset torch's (OpenMP's) count
    # when it came last: a "one thread" benchmark then measured two
    import subprocess
    import sys

    code = ("import torch; from ssl_bench.ops import set_threads; torch.get_num_threads(); "  # torch's pool started
            "set_threads(1); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_set_threads_reaches_scipys_own_blas_even_before_scipy_linalg_is_imported():
    # scipy ships an OpenBLAS of its own, loaded by the first `import scipy.linalg`: when that came after
    # set_threads(1), its LAPACK ran on every core, and a 384 x 384 eigh on a busy 2-core machine took 0.5 s, not 20 ms
    import subprocess
    import sys

    code = ("from ssl_bench.ops import set_threads; set_threads(1); import scipy.linalg; "
            "from threadpoolctl import threadpool_info; "
            "print(sorted({i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[1]"
