"""ACSeg / the Dynamic Clustering Network: the concept generator and its modularity loss, the foreground filter,
the labelled k-NN probe, MaskCLIP's dense text classes, the engine's reuse of a learned segmenter, full runs."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssl_bench import registry
from ssl_bench.errors import UserError
from ssl_bench.methods import segment_cluster
from ssl_bench.runner import RunConfig
from ssl_bench.stages import maskclip, regions
from ssl_bench.stages.clusterers.classifiers import ArgmaxClasses, LabelledKNN, knn_vote
from ssl_bench.stages.filters import AttentionForeground, two_means_upper
from ssl_bench.stages.segmenters import acseg

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: extra threads only contend


# ---------------------------------------------------------------- the modularity loss


def networkx_modularity(affinity: np.ndarray, groups: np.ndarray) -> float:
    """Modularity of a weighted graph by networkx. Eq. 7 sums A_ij over all ordered pairs, a self-loop once, while
    networkx counts a self-loop twice in a degree: its self-loops get half the weight to mean the same graph."""
    import networkx as nx

    graph = nx.from_numpy_array(affinity - np.diag(np.diag(affinity)) / 2)
    communities = [set(np.flatnonzero(groups == g).tolist()) for g in np.unique(groups)]
    return nx.community.modularity(graph, communities, weight="weight")


def hard_assignment(groups: np.ndarray, k: int) -> torch.Tensor:
    return torch.from_numpy(np.eye(k, dtype=np.float32)[groups])[None]


def test_modularity_equals_networkx_for_hard_assignments_on_a_weighted_graph():
    rng = np.random.default_rng(0)
    affinity = rng.uniform(0, 1, (12, 12)) * (rng.uniform(size=(12, 12)) < 0.5)
    affinity = np.triu(affinity, 1) + np.triu(affinity, 1).T  # symmetric, no self-loops
    groups = rng.integers(0, 3, 12)
    delta = acseg.soft_co_assignment(hard_assignment(groups, 3))
    ours = acseg.modularity(torch.from_numpy(affinity)[None].float(), delta)
    assert float(ours) == pytest.approx(networkx_modularity(affinity, groups), abs=1e-5)
    assert abs(networkx_modularity(affinity, groups)) > 0.01  # a partition with something to score


def test_the_loss_of_features_is_minus_networkx_modularity_of_their_affinity_graph():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 10, 6)).astype(np.float32)
    groups = rng.integers(0, 2, 10)
    concepts = torch.eye(6)[None, :2] * 3  # two concepts; the assignment is made one-hot below
    affinity = np.maximum(0, (x[0] / np.linalg.norm(x[0], axis=1, keepdims=True)) @
                          (x[0] / np.linalg.norm(x[0], axis=1, keepdims=True)).T)  # Eq. 8, self-loops included
    np.testing.assert_allclose(acseg.feature_affinity(torch.from_numpy(x))[0], affinity, atol=1e-6)
    loss = -acseg.modularity(acseg.feature_affinity(torch.from_numpy(x)),
                             acseg.soft_co_assignment(hard_assignment(groups, 2)))
    assert float(loss) == pytest.approx(-networkx_modularity(affinity, groups), abs=1e-5)
    assert acseg.modularity_loss(torch.from_numpy(x), concepts).shape == ()


def test_the_fused_loss_has_the_value_and_gradient_of_the_written_out_one():
    torch.manual_seed(0)
    x = torch.randn(3, 30, 8, dtype=torch.float64)
    valid = torch.ones(3, 30, dtype=torch.bool)
    valid[1, 20:] = False
    concepts = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    fused = acseg.modularity_loss(x, concepts, valid)
    (fused_grad,) = torch.autograd.grad(fused, concepts)
    written_out = -acseg.modularity(acseg.feature_affinity(x, valid),  # Eqs. 8-10 through autograd's amax
                                    acseg.soft_co_assignment(acseg.assignment(x, concepts))).mean()
    (grad,) = torch.autograd.grad(written_out, concepts)
    torch.testing.assert_close(fused, written_out)
    torch.testing.assert_close(fused_grad, grad)


def test_the_gradient_is_finite_where_assignments_are_negative():
    x = torch.randn(2, 20, 8)
    concepts = torch.stack([x[0, 0], -x[0, 0], torch.zeros(8)])[None].repeat(2, 1, 1).requires_grad_(True)
    s = acseg.assignment(x, concepts)
    assert (s < 0).any()  # the anti-aligned concept has negative similarities, the zero concept none at all
    acseg.modularity_loss(x, concepts).backward()
    assert torch.isfinite(concepts.grad).all()
    everywhere_negative = -x.mean((0, 1)).abs() * 0 - 1  # a concept negative with every patch gets no gradient
    x_pos = x.abs() + 0.1
    c = torch.stack([x_pos[0, 0], everywhere_negative.expand(8)])[None].repeat(2, 1, 1).requires_grad_(True)
    acseg.modularity_loss(x_pos, c).backward()
    assert torch.isfinite(c.grad).all() and (c.grad[:, 1] == 0).all() and c.grad[:, 0].abs().sum() > 0


def test_padding_patches_change_nothing():
    torch.manual_seed(0)
    model = acseg.ConceptGenerator(8, prototypes=3, stages=2)
    x = torch.randn(1, 12, 8)
    padded = torch.cat([x, torch.randn(1, 5, 8)], dim=1)
    valid = torch.arange(17)[None] < 12
    torch.testing.assert_close(model(padded, valid), model(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acseg.modularity_loss(padded, model(padded, valid), valid),
                               acseg.modularity_loss(x, model(x)), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- the concept generator


@pytest.mark.parametrize("heads", [1, 4])
def test_prototype_attention_equals_the_attention_module(heads):
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(32, heads, bias=False, batch_first=True)
    prototypes, patches = torch.randn(3, 5, 32), torch.randn(3, 20, 32)
    padding = torch.zeros(3, 20, dtype=torch.bool)
    padding[1, 15:] = True
    expected, _ = module(prototypes, patches, patches, key_padding_mask=padding, need_weights=False)
    torch.testing.assert_close(acseg.prototype_attention(module, prototypes, patches, padding), expected)


def two_blob_grid(seed: int, h: int = 8, w: int = 8, d: int = 16, common: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Patch features of two blobs (left, right) that share a ``common`` direction: with a large one, random
    prototypes see one group, the modularity of their affinity graph sees two."""
    rng = np.random.default_rng(seed)
    shared, left, right = np.zeros(d), np.zeros(d), np.zeros(d)
    shared[0], left[1], right[2] = common, 1.0, 1.0
    blob = np.zeros((h, w), dtype=bool)
    blob[:, w // 2:] = True
    x = shared + np.where(blob[..., None], right, left) + 0.05 * rng.normal(size=(h, w, d))
    return x.astype(np.float32), blob


def test_a_two_blob_image_gives_two_regions_after_a_short_training():
    # Seeded (seed 0). Some seeds stop with one blob negative against every concept: by Eq. 9 such patches get
    # no gradient, so they stay unassigned and join the nearest concept at the argmax (a stationary point).
    grids = [two_blob_grid(s)[0] for s in range(8)]
    generator = acseg.AdaptiveConceptGenerator(prototypes=5, stages=2, iterations=60, batch_size=8, lr=1e-3,
                                               resolution="patch")
    x, blob = two_blob_grid(100)
    generator.load({"state": {k: v.numpy() for k, v in acseg.ConceptGenerator(16, 5, 2).state_dict().items()}})
    untrained, _ = generator.segment({"patch": x})
    assert not (untrained[blob] != untrained[~blob][0]).all()  # untrained: the blobs are not told apart

    fitted = generator.fit({"patch": grids})
    assert fitted["stats"]["final_loss"] < fitted["stats"]["first_loss"]
    assert "iterations=60 (paper 2500)" in fitted["stats"]["configuration"]
    segments, info = generator.segment({"patch": x})
    assert info["n_valid"] == 2 and len(np.unique(segments[blob])) == 1 and len(np.unique(segments[~blob])) == 1
    assert segments[blob][0] != segments[~blob][0]

    reloaded = acseg.AdaptiveConceptGenerator(stages=2, resolution="patch")  # weights as arrays: same regions
    reloaded.load(fitted)
    np.testing.assert_array_equal(reloaded.segment({"patch": x})[0], segments)


def test_train_seed_fixes_the_generator_whatever_the_runs_seed():
    grids = [two_blob_grid(s, 4, 4)[0] for s in range(4)]

    def weights(run_seed: int, train_seed=None) -> dict:
        generator = acseg.AdaptiveConceptGenerator(prototypes=3, stages=1, iterations=3, batch_size=2,
                                                   train_seed=train_seed, seed=run_seed)
        return generator.fit({"patch": grids})["state"]

    fixed, other_run = weights(0, train_seed=7), weights(1, train_seed=7)
    assert all(np.array_equal(fixed[k], other_run[k]) for k in fixed)  # Table 1: one generator, k-means reseeded
    own_seed = weights(1)
    assert not np.array_equal(own_seed["prototypes"], fixed["prototypes"])


def test_label_resolution_upsamples_the_soft_assignment_and_counts_sizes_in_patches():
    generator = acseg.AdaptiveConceptGenerator(prototypes=3, stages=1)
    generator.load({"state": {k: v.numpy() for k, v in acseg.ConceptGenerator(16, 3, 1).state_dict().items()}})
    x, _ = two_blob_grid(0, 4, 6)
    fine, info = generator.segment({"patch": x}, np.zeros((32, 48, 3), np.uint8))
    assert fine.shape == (32, 48)
    assert sum(info["valid_sizes"]) == pytest.approx(24)  # 4 x 6 patches in all
    scores = generator.scores(x)
    from ssl_bench.ops import upsample_scores

    np.testing.assert_array_equal(regions.split_into_segments(upsample_scores(scores, (32, 48)).argmax(0),
                                                              tau=0, connected=False)[0], fine)


@pytest.mark.parametrize("params, message", [
    ({"segmenter.resolution": "pixel"}, "resolution='pixel'"),
    ({"segmenter.epochs": 0}, "epochs=0"),
    ({"segmenter.lr": 0.0}, "lr=0.0"),
    ({"segmenter.prototypes": 0}, "prototypes=0"),
    ({"segmenter.train_seed": 0.5}, "train_seed=0.5"),
    ({"clusterer.neighbors": 0}, "neighbors=0"),
    ({"embed": "maskclip", "embed.pretrained": "nope"}, "'nope' is not an open_clip tag of ViT-B-16 -- known: openai"),
    ({"embed": "maskclip", "embed.model": "ViT-Q-99"}, "not an open_clip model"),
    ({"embed": "maskclip", "embed.templates": "many"}, "templates='many'"),
])
def test_bad_acseg_parameters_are_one_line(params, message):
    task = "acseg-labelled-knn" if "clusterer.neighbors" in params else "acseg"
    with pytest.raises(UserError, match=message):
        registry.task(task).resolve_params(params)


# ---------------------------------------------------------------- foreground detection


def test_foreground_detection_picks_the_high_attention_region():
    segments = np.zeros((6, 6), dtype=np.int64)
    segments[:, 2:4], segments[:, 4:] = 1, 2
    attention = np.full((3, 6, 6), 0.01)
    attention[:, :, 2:4] = 0.2  # region 1: every head attends to it
    attention[0, :, 4:] = 0.3  # region 2: one head only; the minimum over heads ignores it
    info = {"n_segments": 3, "n_valid": 3, "valid_sizes": [12, 12, 12]}
    out, info_out = AttentionForeground().filter(segments, info, {"attn": attention})
    assert (out[:, 2:4] == 0).all() and (out[:, :2] == regions.BACKGROUND).all() and (out[:, 4:] == regions.BACKGROUND).all()
    assert info_out["n_valid"] == 1 and info_out["n_background"] == 2 and info_out["valid_sizes"] == [12]
    assert info_out["n_segments"] == 3  # the segmenter's own count is kept


def test_foreground_detection_acts_only_on_datasets_with_a_background_class():
    segments = np.repeat(np.arange(3)[None], 4, axis=0)
    attention = np.stack([np.tile([0.0, 0.0, 1.0], (4, 1))])
    info = {"n_segments": 3, "n_valid": 3, "valid_sizes": [4, 4, 4]}
    kept, _ = AttentionForeground(dataset_has_background=False).filter(segments, info, {"attn": attention})
    np.testing.assert_array_equal(kept, segments)
    forced, _ = AttentionForeground(only_with_background_class=False, dataset_has_background=False).filter(
        segments, info, {"attn": attention})
    assert (forced[:, :2] == regions.BACKGROUND).all() and (forced[:, 2] == 0).all()


def test_two_means_is_the_exact_split_of_the_scores():
    assert two_means_upper([1.0, 1.1, 0.9, 5.0, 5.2]).tolist() == [False, False, False, True, True]
    assert two_means_upper([3.0, 3.0]).tolist() == [True, True]  # nothing to separate: all kept
    assert two_means_upper([0.0, 10.0, 11.0, 12.0]).tolist() == [False, True, True, True]


def test_region_sums_count_pixels_of_a_finer_map():
    values = np.array([[1.0, 2.0], [3.0, 4.0]])
    fine = np.zeros((4, 4), dtype=np.int64)
    fine[:, 2:] = 1
    np.testing.assert_allclose(regions.region_sums(fine, values), [4 * 1 + 4 * 3, 4 * 2 + 4 * 4])


# ---------------------------------------------------------------- region classification


def test_knn_with_one_neighbour_on_identical_train_and_val_regions_is_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12)).astype(np.float32)
    y = rng.integers(0, 6, 40)
    knn = LabelledKNN(k=6, neighbors=1).fit(x, y)
    np.testing.assert_array_equal(knn.predict(x), y)
    assert (knn.labels_ != y).any()  # on its own fit regions the vote is leave-one-out: no region sees itself


def test_knn_votes_are_weighted_by_cosine_similarity():
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]], dtype=np.float32)
    labels = np.array([0, 1, 1])
    query = np.array([[1.0, 0.05]], dtype=np.float32)
    assert knn_vote(train, labels, query, neighbors=3, num_classes=2).tolist() == [1]  # 2 fair votes beat 1 close
    heavy = np.array([[1.0, 0.0], [0.0, 1.0], [-0.1, 1.0]], dtype=np.float32)
    assert knn_vote(heavy, labels, query, neighbors=3, num_classes=2).tolist() == [0]  # ~1 vs ~0.04


def test_knn_regions_without_ground_truth_do_not_vote():
    x = np.eye(4, dtype=np.float32)
    knn = LabelledKNN(k=3, neighbors=1).fit(x, np.array([0, 1, -1, 2]))
    assert len(knn.train) == 3 and knn.labels_.shape == (4,)
    with pytest.raises(UserError, match="at least 2 regions with labelled pixels"):
        LabelledKNN(k=3).fit(x, np.array([0, -1, -1, -1]))


def test_majority_labels_take_the_class_with_most_labelled_pixels():
    segments = np.array([[0, 0, 1], [0, 1, 1]])
    label = np.array([[2, -1, 3], [1, 3, -1]])
    np.testing.assert_array_equal(regions.majority_labels(segments, label, 4), [1, 3])  # ties: the lower class
    assert regions.majority_labels(np.array([[0]]), np.array([[-1]]), 4).tolist() == [-1]


def test_argmax_names_the_class_with_most_votes():
    votes = np.array([[0, 5, 1], [7, 0, 0]], dtype=np.float32)
    assert ArgmaxClasses(k=3).fit(votes).labels_.tolist() == [1, 0]
    with pytest.raises(UserError, match="one score per class"):
        ArgmaxClasses(k=4).fit(votes)


def test_mark_background_renumbers_the_regions_left():
    segments = np.array([[0, 1, 2], [2, -1, 1]])
    out, info = regions.mark_background(segments, {"n_segments": 3, "n_valid": 3, "valid_sizes": [1, 2, 2]}, [1])
    np.testing.assert_array_equal(out, [[0, -2, 1], [1, -1, -2]])
    assert info["n_valid"] == 2 and info["valid_sizes"] == [1, 2]


# ---------------------------------------------------------------- MaskCLIP


def tiny_clip(seed: int = 0):
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)).eval()


def test_maskclip_dense_embeddings_are_the_last_block_with_each_patch_attending_to_itself():
    clip = tiny_clip()
    images = torch.randn(2, 3, 32, 32)
    ours = maskclip.dense_embeddings(clip, images)
    # the model's own forward, with the last block's attention limited to the diagonal: each token keeps its value
    n = 1 + 16
    only_self = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
    hook = clip.visual.transformer.resblocks[-1].register_forward_pre_hook(
        lambda m, args, kwargs: (args, {**kwargs, "attn_mask": only_self}), with_kwargs=True)
    clip.visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = clip.visual(images)
    finally:
        hook.remove()
    reference = torch.nn.functional.normalize(tokens @ clip.visual.proj, dim=-1).reshape(2, 4, 4, -1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_class_counts_count_each_regions_pixel_classes_at_their_resolution():
    segments = np.array([[0, 0], [1, -2]])
    pixel_classes = np.array([[2, 2, 0, 0], [2, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    votes = regions.class_counts(segments, pixel_classes, 3)
    np.testing.assert_array_equal(votes, [[4, 1, 3], [0, 4, 0]])


def test_text_classes_leave_out_the_background_class_unless_asked():
    voc = SimpleNamespace(class_names=["background", "aeroplane", "diningtable"], background_class=0,
                          prompt_names=["background", "aeroplane", "dining table"])
    assert maskclip.MaskClipVotes.prompt_classes(voc, False) == ([1, 2], ["aeroplane", "dining table"])
    assert maskclip.MaskClipVotes.prompt_classes(voc, True)[0] == [0, 1, 2]
    camvid = SimpleNamespace(class_names=["sky", "road"])
    assert maskclip.MaskClipVotes.prompt_classes(camvid, False) == ([0, 1], ["sky", "road"])


def test_maskclip_templates_are_maskclips_85():
    assert len(maskclip.prompt_templates("maskclip")) == 85 and len(maskclip.prompt_templates("imagenet")) == 80
    assert "a photo of a {}." in maskclip.prompt_templates("maskclip")


@pytest.fixture
def tiny_clip_config(tmp_path):
    import open_clip

    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                                              "head_width": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (tmp_path / "SslBenchTinyClip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "SslBenchTinyClip.json")
    return "SslBenchTinyClip"


def test_clip_weights_are_found_locally_and_loaded(tmp_path, monkeypatch, tiny_clip_config):
    import open_clip

    released = open_clip.create_model(tiny_clip_config)
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(released.state_dict(), folder / f"{tiny_clip_config}-mytag.bin")
    monkeypatch.setenv("SSL_BENCH_WEIGHTS", str(folder))
    source = maskclip.clip_weights(tiny_clip_config, "mytag", random=False)
    assert source.origin == "$SSL_BENCH_WEIGHTS" and len(source.identity) == 64
    loaded = maskclip.build_clip(tiny_clip_config, "mytag", source, seed=5)
    for (name, a), b in zip(released.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    random = maskclip.build_clip(tiny_clip_config, "mytag", maskclip.clip_weights(tiny_clip_config, "x", True, 5), 5)
    assert not torch.equal(random.visual.proj, released.visual.proj)
    with pytest.raises(UserError, match=f"put {tiny_clip_config}-other.safetensors"):
        maskclip.clip_weights(tiny_clip_config, "other", random=False)


# ---------------------------------------------------------------- the engine: a learned segmenter, reused


def blob_ctx(params: dict, task: str = "acseg", store: dict | None = None, computed: list | None = None):
    """Two splits of two-blob images (left class 1, right class 2; VOC-like: class 0 is background); the
    attention of the last block is high on the right blob only."""
    grids = {split: [two_blob_grid(s, 4, 6, common=0.3)[0] for s in seeds]
             for split, seeds in (("train", range(6)), ("val", range(10, 14)))}
    _, blob = two_blob_grid(0, 4, 6)
    attention = np.where(blob, 1.0, 0.2)[None].repeat(2, 0)
    label = np.where(np.kron(blob, np.ones((8, 8), dtype=bool)), 2, 1)
    label[:2] = 0  # a strip of background class the regions overlap a little
    store = {} if store is None else store
    computed = [] if computed is None else computed

    def reuse(name, identity, compute, split=None, slots=None):
        key = (name, split, json.dumps(identity, sort_keys=True, default=str))
        if key not in store:
            computed.append(name)
            store[key] = compute()
        return store[key]

    spec = registry.task(task)
    resolved = spec.resolve_params({"segmenter.stages": 2, "segmenter.iterations": 60, "segmenter.lr": 1e-3,
                                    "embed": "mean-patch", **params})
    dataset = SimpleNamespace(num_classes=3, background_class=0, class_names=["background", "left", "right"])
    return SimpleNamespace(
        k=3, seed=0, split="val", params=resolved, stages=spec.stage_specs(resolved), dataset=dataset,
        features=lambda kind, split="val": grids[split] if kind == "patch" else [attention] * len(grids[split]),
        image=lambda i, split=None: np.zeros((32, 48, 3), np.uint8), label=lambda i, split=None: label,
        dataset_for=lambda split: [None] * len(grids[split]), label_size=lambda i, split=None: (32, 48),
        reuse=reuse, device="cpu", progress=lambda it, **_: it,
        random_weights=True, weights_seed=0, protocol=SimpleNamespace(absent_classes="zero-if-predicted"),
        timed=lambda stage: contextlib.nullcontext(),
    ), computed


def test_a_second_classifier_or_k_does_not_train_the_concept_generator_again():
    store, computed = {}, []
    kmeans_ctx, _ = blob_ctx({}, store=store, computed=computed)
    result = segment_cluster.run(kmeans_ctx)
    list(result.predictions)
    assert computed.count("segmenter-fit") == 1 and result.stats["background_cluster"]
    assert result.stats["segmenter_fit"]["iterations"] == 60
    assert result.stats["segments"]["valid_per_image"] > result.stats["segments_after_filter"]["valid_per_image"]
    knn_ctx, _ = blob_ctx({}, task="acseg-labelled-knn", store=store, computed=computed)
    knn = segment_cluster.run(knn_ctx)
    list(knn.predictions)
    other_k, _ = blob_ctx({}, store=store, computed=computed)
    other_k.k = 2
    list(segment_cluster.run(other_k).predictions)
    assert computed.count("segmenter-fit") == 1 and computed.count("segments-val") == 1
    assert computed.count("regions-val") == 1  # the same embedding: the knn probe and the other K reuse it
    assert knn.stats["labelled_probe"].startswith("LABELLED") and "leave-one-out" in knn.stats["labelled_probe"]


def test_the_knn_probe_names_classes_and_paints_background_with_the_background_class():
    ctx, computed = blob_ctx({"fit_split": "train"}, task="acseg-labelled-knn")
    result = segment_cluster.run(ctx)
    final = [p.labels for p in result.predictions if p.stream == "final"]
    assert computed.count("segmenter-fit") == 1  # trained on the fit split, used for both splits
    assert set(np.unique(final[0])) <= {0, 1, 2}
    _, blob = two_blob_grid(0, 4, 6)
    right = np.kron(blob, np.ones((8, 8), dtype=bool))
    assert (final[0][right] == 2).mean() > 0.9 and (final[0][~right] == 0).mean() > 0.9  # left: background
    # scored as class ids: the right half right (its top strip is background), the left half, called background,
    # right only on its top strip: half the pixels
    assert result.stats["class_id_scores"]["all"]["acc"] == pytest.approx(50.0)
    assert "leave-one-out" not in result.stats["labelled_probe"]


def test_classes_named_by_a_clusterer_need_k_equal_to_c():
    ctx, _ = blob_ctx({}, task="acseg-labelled-knn")
    ctx.k = 5
    with pytest.raises(UserError, match="names the dataset's 3 classes: K must be 3, got 5"):
        segment_cluster.run(ctx)


# ---------------------------------------------------------------- full runs (random weights)


SMOKE = (("segmenter.iterations", 4), ("segmenter.stages", 1))


@pytest.mark.slow
@pytest.mark.parametrize("task, extra, k", [
    ("acseg", (), 4),
    ("acseg-labelled-knn", (), None),
    ("acseg-clip", (("embed.templates", "single"),), None),
])
def test_each_variant_runs_on_the_voc_samples(runner, shared_dataset, task, extra, k):
    rec = runner.run(RunConfig(backbone="dino-vits16", weights="random", task=task, dataset="voc2012",
                               data_root=str(shared_dataset("voc2012")), dataset_options=(("limit", 3),), k=k,
                               params=tuple(sorted(SMOKE + extra)))).record
    stats = rec["stats"]
    assert rec["random_weights"] and stats["background_cluster"] and "segments_after_filter" in stats
    assert stats["segmenter_fit"]["configuration"].startswith("not the paper's")
    assert 1 <= stats["segments"]["valid_per_image"] <= 5 and "valid_per_image_std" in stats["segments"]
    if task != "acseg":
        assert rec["k"] == 21 and "class_id_scores" in stats


@pytest.mark.slow
@pytest.mark.parametrize("task, extra", [
    ("acseg", ()),
    ("acseg-labelled-knn", (("fit_split", "train"),)),
    ("acseg-clip", (("embed.templates", "single"),)),
])
def test_each_variant_runs_on_camvid(runner, shared_dataset, task, extra):
    rec = runner.run(RunConfig(backbone="dino-vits16", weights="random", task=task, dataset="camvid",
                               data_root=str(shared_dataset("camvid")), dataset_options=(("limit", 3),),
                               k=3 if task == "acseg" else None, params=tuple(sorted(SMOKE + extra)))).record
    assert not rec["stats"]["background_cluster"]  # CamVid has no background class: the filter keeps every region
    assert rec["stats"]["segments"] == rec["stats"]["segments_after_filter"]
    if task == "acseg-labelled-knn":
        assert rec["stats"]["fit_split"] == "train"


@pytest.mark.slow
def test_variants_on_the_synthetic_set_share_one_trained_generator(runner):
    options = (("n", 6),)
    for task, extra in (("acseg", ()), ("acseg-labelled-knn", ()), ("acseg-clip", (("embed.templates", "single"),))):
        rec = runner.run(RunConfig(backbone="dino-vits16", weights="random", task=task, dataset="synthetic",
                                   dataset_options=options, params=tuple(sorted(SMOKE + extra)))).record
        assert rec["miou"] >= 0 and rec["stats"]["segments"]["images"] == 6
    fits = list(runner.cache.root.rglob("reuse/segmenter-fit-*.npz"))
    segments = list(runner.cache.root.rglob("reuse/segments-val-*.npz"))
    assert len(fits) == 1 and len(segments) == 1  # k-means, the k-NN probe and CLIP: one training, one segmentation


def test_k_other_than_c_for_a_class_naming_clusterer_is_refused_before_any_work(runner):
    from ssl_bench.runner import RunConfig

    def no_work(*_, **__):
        raise AssertionError("features extracted before K was checked")

    runner.features = no_work
    with pytest.raises(UserError, match="clusters are the dataset's 5 classes .*: K must be 5, got 3 -- drop --k"):
        runner.run(RunConfig(backbone="dino-vits16", task="acseg-labelled-knn", dataset="synthetic", k=3,
                             weights="random", dataset_options=(("n", 2),)))
