"""DatUS^2 as composed stages (Louvain segmenter, crop embedding, k-means, de-noiser) and its adapter."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest

from ssl_bench.methods import segment_cluster
from ssl_bench.stages import denoise, embeddings, regions
from ssl_bench.stages.clusterers.kmeans import KMeans
from ssl_bench.stages.segmenters import louvain


def one_hot_keys(groups: np.ndarray, dim: int = 8) -> np.ndarray:
    """Keys (h, w, dim): patch with group g gets basis vector e_g, so groups are orthogonal."""
    return np.eye(dim, dtype=np.float32)[groups]


# ---------------------------------------------------------------- segment discovery


@pytest.mark.parametrize("backend", louvain.BACKENDS)
def test_two_orthogonal_regions_give_two_segments(backend):
    groups = np.zeros((4, 6), dtype=int)
    groups[:, 3:] = 1
    seg, info = louvain.discover_segments(one_hot_keys(groups), tau=5, backend=backend)
    expected = np.where(groups == 0, 0, 1)
    np.testing.assert_array_equal(seg, expected)
    assert seg.dtype == np.int64
    assert info == {"n_communities": 2, "n_segments": 2, "n_valid": 2, "valid_sizes": [12, 12]}


def test_community_in_two_separate_regions_gives_two_segments():
    groups = np.zeros((4, 9), dtype=int)
    groups[:, 3:6] = 1  # group 0 occupies two stripes separated by group 1
    seg, info = louvain.discover_segments(one_hot_keys(groups), tau=5)
    expected = np.repeat(np.array([[0, 0, 0, 1, 1, 1, 2, 2, 2]]), 4, axis=0)
    np.testing.assert_array_equal(seg, expected)
    assert (info["n_communities"], info["n_segments"], info["n_valid"]) == (2, 3, 3)


def test_segments_up_to_tau_patches_are_noise():
    groups = np.zeros((6, 6), dtype=int)
    groups[0, :5] = 1  # exactly 5 patches: noise for tau=5
    groups[5, :] = 2  # 6 patches: valid
    seg, info = louvain.discover_segments(one_hot_keys(groups), tau=5)
    assert (seg[0, :5] == -1).all()
    assert (seg[5] == 1).all()
    assert (seg[groups == 0] == 0).all()
    assert (info["n_segments"], info["n_valid"], info["valid_sizes"]) == (3, 2, [25, 6])
    # one lower threshold makes the 5-patch segment valid
    seg4, info4 = louvain.discover_segments(one_hot_keys(groups), tau=4)
    assert info4["n_valid"] == 3 and (seg4[0, :5] == 0).all()


def test_diagonal_touch_is_one_segment():
    groups = np.zeros((6, 6), dtype=int)
    groups[:3, 3:] = 1
    groups[3:, :3] = 1  # each group: two 3x3 blocks touching only at a corner
    seg, info = louvain.discover_segments(one_hot_keys(groups), tau=5)
    np.testing.assert_array_equal(seg, np.where(groups == 0, 0, 1))
    assert info["n_segments"] == 2  # 4-connectivity would give 4


@pytest.mark.parametrize("shape", [(5, 9), (11, 3)])
def test_non_square_grids(shape):
    h, w = shape
    groups = np.zeros(shape, dtype=int)
    groups[h // 2 :, :] = 1
    seg, info = louvain.discover_segments(one_hot_keys(groups), tau=2)
    assert seg.shape == shape
    np.testing.assert_array_equal(seg, groups)
    assert info["n_valid"] == 2


@pytest.mark.parametrize("backend", louvain.BACKENDS)
def test_seeded_discovery_is_deterministic(backend):
    keys, _ = louvain.synthetic_keys(14, 14, noise=1.5, seed=1)
    a = louvain.discover_segments(keys, seed=3, backend=backend)
    b = louvain.discover_segments(keys, seed=3, backend=backend)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


def test_modularity_matches_python_louvain():
    import community as community_louvain
    import networkx as nx

    keys, _ = louvain.synthetic_keys(10, 10, noise=1.5, seed=0)
    adjacency = louvain.key_adjacency(keys.reshape(100, -1), weighted=True)
    labels = np.random.default_rng(0).integers(0, 4, 100)
    graph = nx.from_numpy_array(adjacency)
    reference = community_louvain.modularity(dict(enumerate(labels.tolist())), graph)
    assert louvain.modularity(adjacency, labels) == pytest.approx(reference, abs=1e-9)


def mean_modularity(backend: str, noise: float, side: int = 16, restarts: int = 1, weighted: bool = False) -> float:
    scores = []
    for seed in range(4):
        keys, _ = louvain.synthetic_keys(side, side, noise=noise, seed=seed)
        graph = louvain.key_graph(keys, weighted)
        communities = louvain.detect_communities(graph, seed, backend, restarts=restarts)
        assert louvain.graph_modularity(graph, communities) == pytest.approx(
            louvain.modularity(louvain.key_adjacency(keys.reshape(side * side, -1), weighted), communities), abs=1e-6)
        scores.append(louvain.graph_modularity(graph, communities))
    return float(np.mean(scores))


@pytest.mark.parametrize("weighted", [False, True])
def test_on_structured_keys_every_backend_finds_the_reference_modularity(weighted):
    reference = mean_modularity("louvain", 2.0, weighted=weighted)
    assert reference > 0.05  # a graph with real structure, not a trivial one
    for backend in ("sknetwork", "igraph"):
        assert mean_modularity(backend, 2.0, weighted=weighted) == pytest.approx(reference, abs=0.002)


def test_on_noise_keys_scikit_network_reaches_the_authors_pipelines_modularity():
    # noise keys: Louvain's local optima differ between backends and node orders by a few percent; the default
    # must not fall below what the authors' pipeline (scikit-network with the library's tolerances) finds
    keys = [np.random.default_rng(seed).standard_normal((14, 14, 64)).astype(np.float32) for seed in range(3)]
    ours, theirs = [], []
    for key in keys:
        graph = louvain.key_graph(key)
        ours.append(louvain.graph_modularity(graph, louvain.detect_communities(graph)))
        theirs.append(louvain.graph_modularity(graph, louvain.reference_discovery(key)[0]))
    assert np.mean(ours) >= np.mean(theirs) - 1e-4


def test_restarts_shuffle_the_node_order_by_seed_and_keep_the_best():
    keys = np.random.default_rng(0).standard_normal((16, 16, 64)).astype(np.float32)
    graph = louvain.key_graph(keys)
    plain = [louvain.detect_communities(graph, seed) for seed in (0, 1)]
    np.testing.assert_array_equal(*plain)  # the authors' run: nodes in order, no seed involved
    shuffled = [louvain.detect_communities(graph, seed, shuffle=True) for seed in (1, 2, 3)]
    assert any(not np.array_equal(plain[0], s) for s in shuffled)  # the seed reaches scikit-network now
    best = louvain.detect_communities(graph, 0, restarts=4)
    scores = [louvain.graph_modularity(graph, c) for c in [plain[0]] + shuffled]
    assert louvain.graph_modularity(graph, best) == pytest.approx(max(scores))


def test_the_csr_key_graph_is_the_dense_adjacency():
    keys, _ = louvain.synthetic_keys(9, 11, noise=1.5, seed=0)
    for weighted in (False, True):
        dense = louvain.key_adjacency(keys.reshape(99, -1), weighted=weighted)
        graph = louvain.key_graph(keys, weighted, block=16).toarray()  # blocks that do not divide 99 rows
        np.testing.assert_array_equal(graph, graph.T)  # exactly: one product per pair, mirrored
        np.testing.assert_array_equal(graph != 0, dense != 0)
        np.testing.assert_allclose(graph, dense, rtol=1e-5)


def test_summarize_segments():
    infos = [
        {"n_communities": 2, "n_segments": 4, "n_valid": 2, "valid_sizes": [10, 20]},
        {"n_communities": 4, "n_segments": 6, "n_valid": 1, "valid_sizes": [30]},
    ]
    assert regions.summarize_segments(infos) == {  # the schema of the segment statistics
        "images": 2, "total": 10, "valid": 3, "valid_percent": 30.0,
        "per_image": 5.0, "valid_per_image": 1.5, "valid_per_image_std": 0.5, "patches_per_segment": 20.0,
    }


# ---------------------------------------------------------------- crops, clustering


def test_upsample_nearest_non_square():
    labels = np.arange(6).reshape(2, 3)
    up = regions.upsample_nearest(labels, (4, 9))
    np.testing.assert_array_equal(up, np.repeat(np.repeat(labels, 2, 0), 3, 1))


def test_segment_crop_tight_box_and_fill():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    seg = np.full((20, 30), -1)
    seg[5:9, 10:14] = 3
    seg[6, 11] = 4  # another segment inside the box must be filled
    crop = embeddings.segment_crop(image, seg, 3, fill=7, size=4)  # same size: no resampling
    expected = image[5:9, 10:14].copy()
    expected[1, 1] = 7
    np.testing.assert_array_equal(crop, expected)
    assert embeddings.segment_crop(image, seg == 3, None, size=16).shape == (16, 16, 3)
    assert embeddings.segment_crop(image, seg, 3, size=16, fit="authors").shape == (16, 16, 3)
    with pytest.raises(ValueError):
        embeddings.segment_crop(image, seg, 99)


def test_kmeans_groups_segments_of_the_same_class():
    rng = np.random.default_rng(0)
    classes = np.repeat(np.arange(3), 30)
    centres = rng.normal(size=(3, 16)) * 3
    feats = centres[classes] + rng.normal(size=(90, 16)) * 0.3
    clusterer = KMeans(k=3, seed=0).fit(feats)
    labels = clusterer.labels_
    assert clusterer.centroids_.shape == (3, 16)
    for c in range(3):  # every class in one cluster, different classes in different clusters
        assert len(set(labels[classes == c])) == 1
    assert len(set(labels)) == 3
    np.testing.assert_array_equal(clusterer.predict(feats), labels)


def test_paint_segments_keeps_noise_unlabelled():
    seg = np.array([[0, 0, -1], [1, 2, 2]])
    np.testing.assert_array_equal(
        regions.paint_segments(seg, np.array([5, 1, 5])), [[5, 5, -1], [1, 5, 5]]
    )


# ---------------------------------------------------------------- denoiser

TINY = denoise.DenoiserConfig(arch="resnet18", input_size=32, epochs=1, batch_size=2,
                            predict_batch_size=3)


def test_usable_masks_drops_near_single_class():
    single = np.zeros((4, 4), int)
    empty = np.full((4, 4), -1)
    mixed = np.zeros((4, 4), int)
    mixed[:, 2:] = 1
    mostly = np.zeros((10, 10), int)
    mostly[0, 0] = 1  # 99 % one class
    keep = denoise.usable_masks([single, empty, mixed, mostly], threshold=0.95)
    np.testing.assert_array_equal(keep, [False, False, True, False])


def test_denoiser_smoke_shapes():
    rng = np.random.default_rng(0)
    sizes = [(40, 50), (36, 36), (30, 44), (32, 32)]
    images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]
    masks = [rng.integers(-1, 3, (5, 6)) for _ in sizes]
    model, used = denoise.train_denoiser(images, masks, num_classes=3, config=TINY, seed=0)
    assert used == 4
    preds = list(denoise.predict_denoiser(model, images, TINY))
    assert [p.shape for p in preds] == sizes
    assert all(p.dtype == np.int64 and p.min() >= 0 and p.max() < 3 for p in preds)


def test_denoiser_config_rejects_unknown_params():
    from ssl_bench.errors import UserError

    assert denoise.DenoiserConfig.from_params({"epochs": 5}).epochs == 5
    assert denoise.DenoiserConfig.from_params("gpu").arch == "resnet50"
    gpu_small = denoise.DenoiserConfig.from_params({"preset": "gpu", "input_size": 64})
    assert (gpu_small.arch, gpu_small.input_size) == ("resnet50", 64)
    with pytest.raises(UserError, match="stepz"):
        denoise.DenoiserConfig.from_params({"stepz": 5})
    with pytest.raises(UserError, match="preset"):
        denoise.DenoiserConfig.from_params("tpu")
    with pytest.raises(UserError, match="batch_size 1"):
        denoise.DenoiserConfig.from_params({"batch_size": 1})
    with pytest.raises(UserError, match="arch 'vgg'"):
        denoise.DenoiserConfig.from_params({"arch": "vgg"})


def test_epoch_batches_cover_every_mask_once_per_epoch():
    rng = np.random.default_rng(0)
    batches = denoise.epoch_batches(np.arange(10), 4, 2, rng)
    assert len(batches) == 4 and all(len(b) == 4 for b in batches)
    assert len(set(np.concatenate(batches[:2]))) == 8  # no repeat within an epoch
    assert [len(b) for b in denoise.epoch_batches(np.arange(3), 4, 2, rng)] == [4, 4]


# ---------------------------------------------------------------- adapter


def fake_ctx(params, split="val", task="datus2"):
    """Images half red / half blue; keys orthogonal on the two halves of a 4x6 grid."""
    import torch

    from ssl_bench import registry

    groups = np.zeros((4, 6), dtype=int)
    groups[:, 3:] = 1
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    image[:, :24, 0] = 200
    image[:, 24:, 2] = 200
    n = {"train": 3, "val": 2}
    built = []

    def backbone(name="fake-vit"):
        built.append(name)
        return SimpleNamespace(
            spec=SimpleNamespace(name=name, input_size=16, embed_dim=3),
            normalize=lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255,
            embed=lambda x: x.mean((2, 3)),  # mean colour: crops of the same half look alike
        )

    spec = registry.task(task)
    resolved = spec.resolve_params(params)
    return SimpleNamespace(
        k=2, seed=0, split=split, params=resolved, stages=spec.stage_specs(resolved),
        features=lambda kind, split=None: [one_hot_keys(groups)] * n[split],
        image=lambda i, split=None: image.copy(),
        dataset_for=lambda split: [None] * n[split], label_size=lambda i, split=None: (32, 48),
        backbone=backbone(), build_backbone=backbone, built=built,
        backbone_identity=lambda name=None: {"backbone": name or "fake-vit", "weights": "none"},
        reuse=lambda name, identity, compute, split=None, slots=None: compute(),  # the runner's keeps it on disk
        device="cpu", progress=lambda it, **_: it, stage_seconds={}, timed=lambda stage: contextlib.nullcontext(),
    )


TINY_PARAMS = {"denoiser": {f: getattr(TINY, f) for f in ("arch", "input_size", "epochs", "batch_size")}}


def test_adapter_streams_and_stats():
    result = segment_cluster.run(fake_ctx(TINY_PARAMS))
    preds = list(result.predictions)
    streams = {(p.stream, p.split) for p in preds}
    assert streams == {("initial", None), ("denoised", None), ("final", None)}
    initial = [p.labels for p in preds if p.stream == "initial"]
    assert len(initial) == 2 and initial[0].shape == (32, 48)
    left, right = initial[0][:, :24], initial[0][:, 24:]
    assert len(np.unique(left)) == 1 and len(np.unique(right)) == 1 and left[0, 0] != right[0, 0]
    final = [p.labels for p in preds if p.stream == "final"]
    denoised = [p.labels for p in preds if p.stream == "denoised"]
    assert all((f == d).all() for f, d in zip(final, denoised))  # final = de-noised masks
    assert result.stats["segments"] == {
        "images": 2, "total": 4, "valid": 4, "valid_percent": 100.0,
        "per_image": 2.0, "valid_per_image": 2.0, "valid_per_image_std": 0.0, "patches_per_segment": 12.0,
    }
    assert result.stats["denoiser_train_masks"] == 2 and result.stats["denoiser"]["epochs"] == 1
    assert result.stats["communities_per_image"] == 2.0 and result.stats["crop_backbone"] == "fake-vit"


def test_adapter_without_denoising_final_is_initial():
    preds = list(segment_cluster.run(fake_ctx({"denoise": False})).predictions)
    assert {p.stream for p in preds} == {"initial", "final"}
    initial = [p.labels for p in preds if p.stream == "initial"]
    final = [p.labels for p in preds if p.stream == "final"]
    assert all((a == b).all() for a, b in zip(initial, final))


def test_adapter_fit_split_yields_train_and_val():
    result = segment_cluster.run(fake_ctx({**TINY_PARAMS, "fit_split": "train"}))
    counts = {}
    for p in result.predictions:
        counts[(p.stream, p.split)] = counts.get((p.stream, p.split), 0) + 1
    assert counts == {("initial", "train"): 3, ("denoised", "train"): 3,
                      ("initial", None): 2, ("denoised", None): 2, ("final", None): 2}
    assert result.stats["fit_split"] == "train"
    assert result.stats["segments@train"]["images"] == 3
    assert result.stats["denoiser_train_masks"] == 3


def test_adapter_crops_go_to_the_named_backbone():
    ctx = fake_ctx({"denoise": False, "embed.backbone": "some-cnn"})
    result = segment_cluster.run(ctx)
    assert ctx.built == ["fake-vit", "some-cnn"] and result.stats["crop_backbone"] == "some-cnn"


@pytest.mark.parametrize("params, message", [
    ({"segmenter.backend": "leiden"}, "backend='leiden'"),
    ({"embed.fit": "squash"}, "fit='squash'"),
    ({"denoiser": "tpu"}, "denoiser preset 'tpu'"),
    ({"tau": 3}, r"tau is now segmenter.tau: renamed by a later version"),  # version 1's name
    ({"crop_size": 224}, r"crop_size is now embed.size"),
    ({"clusterer.tau": 3}, r"kmeans' \(clusterer\) has no parameter\(s\) \['clusterer.tau'\]"),
])
def test_adapter_bad_params_are_one_clear_error(params, message):
    from ssl_bench.errors import UserError

    with pytest.raises(UserError, match=message):
        segment_cluster.run(fake_ctx(params))


@pytest.mark.parametrize("arch", denoise.DENOISER_ARCHS)
def test_every_denoiser_arch_builds_untrained_and_predicts(arch):
    import torch

    model = denoise.build_denoiser(num_classes=3, arch=arch).eval()
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, 64, 64))["out"]
    assert out.shape == (1, 3, 64, 64)
