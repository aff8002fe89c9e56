"""The composable stages on hand-made inputs whose answer is known: DSM eigen-segments, region embeddings and
the dataset-level clusterers (k-means, spectral, Sinkhorn/OT, attention-based)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_bench.stages import regions
from ssl_bench.stages.clusterers.attention import AttentionClustering, abc_loss
from ssl_bench.stages.clusterers.kmeans import KMeans
from ssl_bench.stages.clusterers.sinkhorn import SinkhornKMeans, sinkhorn, sinkhorn_log
from ssl_bench.stages.clusterers.spectral import Spectral
from ssl_bench.stages.embeddings import CropEmbedding, MeanPatchEmbedding, RegionImage, erode_dilate
from ssl_bench.stages.segmenters import dsm

pytestmark = pytest.mark.usefixtures("one_thread")  # small arrays: extra threads only contend


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labellings that group the same elements (ids may differ)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def blobs(n_per: int, k: int, dim: int = 16, spread: float = 0.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 3
    truth = np.repeat(np.arange(k), n_per)
    return (centres[truth] + spread * rng.normal(size=(len(truth), dim))).astype(np.float32), truth


# ---------------------------------------------------------------- Deep Spectral Methods


def block_features(h: int = 8, w: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Three blocks of orthogonal features: their affinity is block-diagonal."""
    blocks = np.zeros((h, w), dtype=int)
    blocks[:, 3:5], blocks[:, 5:] = 1, 2
    return np.eye(4, dtype=np.float32)[blocks], blocks


def test_a_block_diagonal_affinity_gives_its_blocks_as_eigen_segments():
    features, blocks = block_features()
    segmenter = dsm.DeepSpectral(eigenvectors=3, segments=3, background=False)
    segments, info = segmenter.segment({"key": features})
    assert same_partition(segments, blocks)
    assert info["n_valid"] == 3 and sorted(info["valid_sizes"]) == [16, 24, 32]
    values, _ = dsm.laplacian_eigenvectors(dsm.feature_affinity(features.reshape(-1, 4)), 3)
    np.testing.assert_allclose(values, 0, atol=1e-6)  # one zero eigenvalue per component (float32 affinity)


def test_background_is_the_segment_on_the_border():
    features, blocks = block_features(9, 9)
    frame = np.zeros((9, 9), dtype=int)
    frame[2:7, 2:7] = 1  # an object in the middle, framed by background
    segments, info = dsm.DeepSpectral(eigenvectors=2, segments=2).segment({"key": np.eye(2, dtype=np.float32)[frame]})
    assert (segments[frame == 0] == regions.BACKGROUND).all() and (segments[frame == 1] == 0).all()
    assert info["n_valid"] == 1 and info["background_patches"] == 56


def reference_dense(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The straightforward computation: the dense generalised symmetric eigenproblem (D - W) y = lambda D y."""
    import scipy.linalg

    d = np.diag(w.sum(1))
    values, vectors = scipy.linalg.eigh(d - w, d, subset_by_index=[0, k - 1])
    return values, vectors.T


def d_subspace_cosines(a: np.ndarray, b: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the spans of two D-orthonormal sets of vectors (rows)."""
    return np.linalg.svd(a @ (degrees[:, None] * b.T), compute_uv=False)


@pytest.mark.parametrize("side, noise", [(12, 1.0), (20, 3.0), (28, 1.0)])
def test_dsm_eigenvectors_equal_the_dense_reference_and_the_authors_solver(side, noise):
    from ssl_bench.stages.segmenters.louvain import synthetic_keys

    keys, _ = synthetic_keys(side, side, dim=64, noise=noise, seed=side)
    w = dsm.feature_affinity(keys.reshape(side * side, -1)).astype(np.float64)
    k = 5
    values, vectors = dsm.laplacian_eigenvectors(w.astype(np.float32), k)
    dense_values, dense_vectors = reference_dense(w, k + 1)  # one more: is the k-th eigenvalue separated?
    authors_values, authors_vectors = dsm.reference_eigenvectors(w, k)
    np.testing.assert_allclose(values, dense_values[:k], atol=1e-5)
    np.testing.assert_allclose(values, authors_values, atol=1e-5)
    assert dense_values[k] - dense_values[k - 1] > 1e-3  # else the span of k vectors is not defined
    degrees = w.sum(1)
    np.testing.assert_allclose((vectors * degrees) @ vectors.T, np.eye(k), atol=1e-4)  # D-orthonormal
    np.testing.assert_allclose(d_subspace_cosines(vectors, dense_vectors[:k], degrees), 1, atol=1e-4)
    np.testing.assert_allclose(d_subspace_cosines(vectors, authors_vectors, degrees), 1, atol=1e-4)
    gaps = np.diff(dense_values[:k])
    for i in np.flatnonzero((np.r_[np.inf, gaps] > 1e-3) & (np.r_[gaps, np.inf] > 1e-3)):  # simple eigenvalues:
        assert np.array_equal(vectors[i] > 0, authors_vectors[i] > 0) or i == 0  # one vector, the same sign


def test_the_authors_sign_rule():
    vectors = np.array([[1.0, 2.0, -1.0], [-1.0, -2.0, 3.0], [1.0, 1.0, 1.0]])
    flipped = dsm.flip_signs(vectors)
    np.testing.assert_array_equal(flipped[0], -vectors[0])  # 2 of 3 positive: negated
    np.testing.assert_array_equal(flipped[1:], vectors[1:])  # 1 of 3, and all positive: kept


def test_colour_affinity_is_added_only_with_a_weight():
    features, _ = block_features(6, 6)
    image = np.zeros((48, 48, 3), dtype=np.uint8)
    image[:, 24:] = 255
    plain = dsm.DeepSpectral(eigenvectors=3, segments=2)
    coloured = dsm.DeepSpectral(eigenvectors=3, segments=2, image_color_lambda=10.0)
    assert not plain.uses_image and coloured.uses_image
    grid = features[:, :, :4]
    added = coloured.affinity(grid, image) - plain.affinity(grid)
    # a pair of mutual neighbours at both scales counts 4 times (each pixel's list, each scale), as the
    # authors' sparse matrix sums its duplicate entries
    assert added.max() == pytest.approx(10.0 * 4)
    assert (added >= 0).all() and (added == added.T).all()


def test_adaptive_segment_count_takes_the_largest_eigengap():
    assert dsm.adaptive_segments(np.array([0.0, 0.01, 0.02, 0.5, 0.55])) == 3
    assert dsm.adaptive_segments(np.array([0.0, 0.9, 0.95])) == 2  # the first gap never counts


# ---------------------------------------------------------------- segment bookkeeping and embeddings


def test_split_into_segments_keeps_background_and_counts_groups():
    groups = np.array([[0, 0, -2], [1, 1, -2], [0, -1, 0]])
    segments, info = regions.split_into_segments(groups, tau=0, connected=True)
    assert (segments[groups == -2] == regions.BACKGROUND).all() and segments[2, 1] == regions.NOISE
    assert info == {"n_groups": 2, "n_segments": 4, "n_valid": 4, "valid_sizes": [2, 2, 1, 1]}
    segments, info = regions.split_into_segments(groups, tau=0, connected=False)
    assert info["n_segments"] == 2 and segments[0, 0] == segments[2, 2]


def test_paint_gives_background_its_own_label():
    segments = np.array([[0, 1, -2], [-1, 1, -2]])
    np.testing.assert_array_equal(regions.paint_segments(segments, np.array([3, 0]), background=4),
                                  [[3, 0, 4], [-1, 0, 4]])


def test_mean_patch_embedding_is_the_mean_of_each_segments_features():
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(3, 4, 5)).astype(np.float32)
    segments = np.array([[0, 0, 1, -1], [0, 2, 1, -2], [2, 2, 1, 1]])
    vectors = MeanPatchEmbedding("patch").embed([RegionImage(segments, None, {"patch": grid})] * 2)
    assert vectors.shape == (6, 5)
    for s in range(3):
        np.testing.assert_allclose(vectors[s], grid[segments == s].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(vectors[:3], vectors[3:])


def test_dsm_crops_take_the_box_of_the_eroded_then_dilated_mask_unmasked():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:8, 2:8] = True
    mask[0, 9] = True  # a stray patch: two erosions remove it, the dilations do not bring it back
    shaped = erode_dilate(mask, erode=2, dilate=1)  # 6x6 -> 4x4 -> 2x2 (rows 4-5), then a cross-shaped growth
    assert not shaped[0, 9] and shaped[4:6, 3:7].all() and shaped[3:7, 4:6].all() and not shaped[3, 3]
    assert shaped.sum() == 12
    tiny = np.zeros((4, 4), dtype=bool)
    tiny[1, 1] = True
    assert erode_dilate(tiny, erode=2).sum() == 1  # an erosion that would empty the mask is skipped

    seen = []
    model = type("M", (), {"spec": type("S", (), {"embed_dim": 3})(),
                           "normalize": staticmethod(lambda x: torch.from_numpy(x).float()),
                           "embed": staticmethod(lambda x: (seen.append(x.numpy()) or x.mean((1, 2))))})()
    image = np.arange(40 * 40 * 3, dtype=np.uint8).reshape(40, 40, 3)
    segments = np.full((10, 10), -1)
    segments[4:6, 4:6] = 0
    CropEmbedding(model, size=8, mask=False, erode=0, dilate=1).embed([RegionImage(segments, image)])
    # box of the dilated mask (patches 3..6 -> pixels 12..27), the image kept inside it: no fill
    from PIL import Image

    expected = np.asarray(Image.fromarray(image[12:28, 12:28]).resize((8, 8), Image.BICUBIC))
    np.testing.assert_array_equal(seen[0][0], expected)


# ---------------------------------------------------------------- clusterers


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("prepare", [{}, {"standardize": True}, {"pca_dim": 4}])
def test_kmeans_finds_blobs_and_predicts_with_the_fitted_transform(metric, prepare):
    x, truth = blobs(40, 3)
    clusterer = KMeans(k=3, seed=0, metric=metric, **prepare).fit(x)
    assert same_partition(clusterer.labels_, truth)
    np.testing.assert_array_equal(clusterer.predict(x), clusterer.labels_)


def test_sinkhorn_assignment_has_the_prescribed_marginals():
    scores = torch.from_numpy(np.random.default_rng(0).normal(size=(12, 3)) * 3)
    q = sinkhorn_log(scores, 200).exp()
    np.testing.assert_allclose(q.sum(1), 1, atol=1e-9)
    np.testing.assert_allclose(q.sum(0), 4, atol=1e-6)
    np.testing.assert_allclose(sinkhorn(scores, 200), q, rtol=1e-9, atol=1e-12)


def test_the_kernel_form_is_the_log_domain_iterations_at_the_default_temperature():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 16))
    c = rng.normal(size=(7, 16))
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    scores = torch.from_numpy(cos / 0.02)  # cosines over the temperature: a kernel spanning e^-100
    expected = sinkhorn_log(scores, 10).exp()
    np.testing.assert_allclose(sinkhorn(scores, 10), expected, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sinkhorn_assigns_balanced_blobs_equally(seed):
    x, truth = blobs(30, 4, spread=0.05, seed=seed)
    clusterer = SinkhornKMeans(k=4, seed=seed, init="kmeans++").fit(x)
    assert same_partition(clusterer.labels_, truth)
    assert np.bincount(clusterer.labels_).tolist() == [30, 30, 30, 30]
    np.testing.assert_array_equal(clusterer.predict(x), clusterer.labels_)


def test_sinkhorn_balances_what_kmeans_leaves_unbalanced():
    # one blob of 90 rows that is really two close sub-blobs, and one small far blob of 10:
    # the equipartition prior splits the big blob, k-means keeps the far blob apart
    rng = np.random.default_rng(1)
    big = np.concatenate([rng.normal([1, 0.05], 0.01, (45, 2)), rng.normal([1, -0.05], 0.01, (45, 2))])
    small = rng.normal([0, 1], 0.01, (10, 2))
    x = np.concatenate([big, small]).astype(np.float32)
    balanced = np.bincount(SinkhornKMeans(k=2, seed=0).fit(x).labels_)
    unbalanced = np.bincount(KMeans(k=2, seed=0).fit(x).labels_)
    assert sorted(unbalanced.tolist()) == [10, 90]
    assert abs(balanced[0] - balanced[1]) <= 10  # the equipartition prior pulls towards 50 / 50


def two_rings(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0, 2 * np.pi, 2 * n)
    radius = np.repeat([1.0, 3.0], n)
    x = np.stack([radius * np.cos(angles), radius * np.sin(angles)], 1) + 0.05 * rng.normal(size=(2 * n, 2))
    return x.astype(np.float32), np.repeat([0, 1], n)


def test_spectral_separates_two_rings_that_kmeans_cannot():
    from sklearn.metrics import adjusted_rand_score

    x, truth = two_rings()
    spectral = Spectral(k=2, seed=0, n_neighbors=10).fit(x)
    assert adjusted_rand_score(truth, spectral.labels_) == 1.0
    assert adjusted_rand_score(truth, KMeans(k=2, seed=0, normalize=False).fit(x).labels_) < 0.1
    held_out, held_truth = two_rings(50, seed=1)
    assert adjusted_rand_score(held_truth, spectral.predict(held_out)) == 1.0


def test_spectral_matches_scikit_learns_spectral_clustering():
    from sklearn.cluster import SpectralClustering
    from sklearn.metrics import adjusted_rand_score

    x, _ = blobs(60, 3, spread=1.5, seed=2)
    ours = Spectral(k=3, seed=0, eigen_solver="arpack").fit(x).labels_
    theirs = SpectralClustering(3, affinity="nearest_neighbors", n_neighbors=30, random_state=0).fit(x).labels_
    assert adjusted_rand_score(ours, theirs) == 1.0


def test_abc_loss_is_zero_inside_its_bounds_and_grows_outside():
    n, k = 16, 4  # bounds: sizes between 16 / 4^2 = 1 and 16 / 4^0.5 = 8
    onehot = torch.zeros(n, k)
    onehot[torch.arange(n), torch.tensor([0] * 8 + [1] * 4 + [2] * 3 + [3])] = 1  # sizes 8, 4, 3, 1: at the bounds
    assert abc_loss(onehot).item() == 0
    too_big = torch.zeros(n, k)
    too_big[torch.arange(n), torch.tensor([0] * 10 + [1] * 3 + [2] * 2 + [3])] = 1  # size 10 > 8
    assert abc_loss(too_big).item() == pytest.approx(2 / k)  # mean over clusters of relu(10 - 8)
    assert abc_loss(too_big, max_size_exponent=0).item() == 0  # exponent 0: no upper bound
    empty = onehot.clone()
    empty[15] = 0  # a row covered by no cluster, and cluster 3 left with 0 < 1
    assert abc_loss(empty).item() == pytest.approx(1 / n + 1 / k)
    overlap = onehot.clone()
    overlap[0, 1] = 0.5  # row 0 in clusters 0 and 1: disjointness 2 * 1 * 0.5
    assert abc_loss(overlap).item() == pytest.approx(1.0 + relu_over(overlap))


def relu_over(output: torch.Tensor) -> float:
    """The upper-bound term of a cluster pushed over 8 by half a row (cluster 1: 4.5 is still inside)."""
    sizes = output.sum(0)
    return float(torch.relu(sizes - 8).mean())


def test_abc_learns_to_separate_blobs_and_is_seeded():
    x, truth = blobs(50, 3, dim=8, spread=0.2)
    # an FFN in proportion to the toy d = 8 (the default 512 is the authors' width for d = 384)
    first = AttentionClustering(k=3, seed=0, epochs=200, batch_size=64, lr=1e-3, ffn_width=32).fit(x)
    short, again = (AttentionClustering(k=3, seed=0, epochs=5, batch_size=64, lr=1e-3).fit(x) for _ in range(2))
    np.testing.assert_array_equal(short.net.centres.detach(), again.net.centres.detach())  # seeded: same weights
    assert same_partition(first.labels_, truth)
    assert first.losses_[-1] < first.losses_[0]
    np.testing.assert_array_equal(first.predict(x), first.labels_)


@pytest.mark.parametrize("layers, attention, mlp", [(2, True, True), (1, False, True), (1, False, False)])
def test_abc_architectures_of_table_2_run(layers, attention, mlp):
    x, _ = blobs(20, 3, dim=8)
    fit = AttentionClustering(k=3, seed=0, layers=layers, attention=attention, mlp=mlp, epochs=2, batch_size=16).fit(x)
    assert fit.labels_.shape == (60,) and fit.steps_ == 8


def _attention_in_torch_order(attention, queries, centres):
    """The reference: torch's own MultiheadAttention, as the net computed it before the closed form."""
    return attention(queries[None], centres[None], centres[None], need_weights=False)[0][0]


@pytest.mark.parametrize("heads", [1, 2])
def test_abc_attention_regrouped_around_the_centres_is_torchs_multihead_attention(heads):
    from ssl_bench.stages.clusterers.attention import attend_to_centres

    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(32, heads, batch_first=True)
    for bias in (attention.in_proj_bias, attention.out_proj.bias):  # torch starts them at 0: make them count
        torch.nn.init.normal_(bias)
    x, centres = torch.randn(200, 32), torch.randn(5, 32)
    ours, theirs = attend_to_centres(attention, x, centres), _attention_in_torch_order(attention, x, centres)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_abc_fit_is_the_same_as_with_torchs_attention(monkeypatch):
    """Same seed, same weights: outputs within 1e-5 and the same labels after a short fit as the net computed
    with torch's MultiheadAttention; fails if the closed form changes the maths."""
    from ssl_bench.stages.clusterers import attention as abc

    x, _ = blobs(40, 3, dim=24, spread=0.3)
    fits = [AttentionClustering(k=3, seed=0, layers=2, epochs=20, batch_size=32, lr=1e-3).fit(x)]
    monkeypatch.setattr(abc, "attend_to_centres", _attention_in_torch_order)
    fits.append(AttentionClustering(k=3, seed=0, layers=2, epochs=20, batch_size=32, lr=1e-3).fit(x))
    np.testing.assert_array_equal(fits[0].labels_, fits[1].labels_)
    np.testing.assert_allclose(fits[0].net.centres.detach(), fits[1].net.centres.detach(), atol=1e-5)
    with torch.no_grad():
        rows = torch.from_numpy(fits[0].transform.transform(x))
        np.testing.assert_allclose(fits[0].net(rows), fits[1].net(rows), atol=1e-5)
        fits[1].net.load_state_dict(fits[0].net.state_dict())  # same weights: the two computations agree
        reference = fits[1].net(rows)
        monkeypatch.undo()
        np.testing.assert_allclose(fits[0].net(rows), reference, atol=1e-5)


def test_abc_stops_once_labels_settle_only_when_asked():
    x, _ = blobs(50, 3, dim=8, spread=0.2)
    fixed = AttentionClustering(k=3, seed=0, epochs=60, batch_size=64, lr=1e-3, ffn_width=32).fit(x)
    assert fixed.fit_stats_["stopped"] == "epochs" and fixed.fit_stats_["epochs_run"] == 60  # default: the paper's
    early = AttentionClustering(k=3, seed=0, epochs=60, batch_size=64, lr=1e-3, ffn_width=32,
                                stop_label_change=0.01, stop_patience=3).fit(x)
    record = early.fit_stats_
    assert record["stopped"] == "labels settled" and record["epochs_run"] < 60
    assert len(early.label_changes_) == record["epochs_run"] - 1  # epoch 1 has nothing to compare with
    assert max(early.label_changes_[-3:]) < 0.01
    assert "stopped by labels settled" in record["configuration"] and "epochs=60 (paper 500)" in record["configuration"]
    assert record["configuration"].count("(paper") == 4  # epochs, batch, lr and the toy's FFN width
    capped = AttentionClustering(k=3, seed=0, epochs=60, batch_size=64, max_steps=7).fit(x)
    assert capped.fit_stats_["stopped"] == "max_steps" and capped.steps_ == 7


def test_masked_attention_cls_attends_only_to_the_segments_patches():
    from ssl_bench import registry
    from ssl_bench.models import build_backbone, resolve
    from ssl_bench.stages.embeddings import MaskedAttentionEmbedding

    spec = registry.backbone("dino-vits16")
    vit = build_backbone(spec, resolve(spec, "random"), 0)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    segments = np.full((4, 4), -1)
    segments[1:3, 0:2] = 0  # a 2x2-patch segment: its box is the image's left-middle 32x32
    embedder = MaskedAttentionEmbedding(vit, size=64)
    [(crop, patches)] = embedder.crops(RegionImage(segments, image))
    assert patches.all()  # the segment fills its box: every patch of the crop is in it
    segments[1, 1] = -1  # now an L: the box is the same, one quarter of it is not the segment
    [(crop, patches)] = embedder.crops(RegionImage(segments, image))
    np.testing.assert_array_equal(patches, [[True, True, False, False], [True, True, False, False],
                                            [True, True, True, True], [True, True, True, True]])
    masked = embedder._forward([(crop, patches)])[0]

    # by hand: the last block's input, then CLS attending to itself and the allowed patches only
    model, captured = vit.model, {}
    hook = model.blocks[-1].register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
    with torch.inference_mode():
        plain = model.forward_features(vit.normalize(crop[None]))[0, 0]
        hook.remove()
        block, x = model.blocks[-1], captured["x"]
        attention = block.attn
        qkv = attention.qkv(block.norm1(x)).reshape(1, x.shape[1], 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        logits = (q[:, :, :1] * attention.scale) @ k.transpose(-2, -1)  # (1, heads, 1, N)
        keep = torch.cat([torch.ones(1, dtype=torch.bool), torch.from_numpy(patches.ravel())])
        logits[..., ~keep] = float("-inf")
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(1, 1, -1)
        cls = x[:, :1] + block.ls1(attention.proj(out))
        cls = cls + block.ls2(block.mlp(block.norm2(cls)))
        expected = model.norm(cls)[0, 0]
    np.testing.assert_allclose(masked, expected.numpy(), atol=1e-5)
    assert not np.allclose(masked, plain.numpy(), atol=1e-3)  # the mask changed what CLS saw
