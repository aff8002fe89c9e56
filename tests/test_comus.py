"""COMUS: saliency sources, uncertainty filtering, the self-training de-noiser's COMUS settings, the discovered-
categories count, the engine's COMUS streams, and full runs on the shared data."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest

from ssl_bench import registry
from ssl_bench.data.protocol import Protocol
from ssl_bench.errors import UserError
from ssl_bench.methods import segment_cluster
from ssl_bench.metrics import discovered_categories, evaluate_counts
from ssl_bench.runner import RunConfig
from ssl_bench.stages import denoise
from ssl_bench.stages.clusterers import filter_uncertain
from ssl_bench.stages.clusterers.spectral import Spectral
from ssl_bench.stages.embeddings import MeanPatchEmbedding, RegionImage
from ssl_bench.stages.regions import BACKGROUND, NOISE
from ssl_bench.stages.segmenters import basnet, saliency

from test_datus import one_hot_keys

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- saliency sources


def object_attention(h: int = 8, w: int = 10, heads: int = 3, seed: int = 0):
    """CLS attention (heads, h, w) of an image whose object (a 3 x 4 block) gets most of it; the object mask."""
    rng = np.random.default_rng(seed)
    obj = np.zeros((h, w), dtype=bool)
    obj[2:5, 3:7] = True
    attention = rng.uniform(0.0, 0.1, (heads, h, w)) + 3.0 * obj  # 12 object patches hold ~0.8 of the mass
    return attention / attention.sum((1, 2), keepdims=True), obj


def dino_mass_rule(attention: np.ndarray, mass: float) -> np.ndarray:
    """DINO's visualize_attention.py, for one map: sort ascending, keep where the cumulative share > 1 - mass."""
    flat = attention.ravel()
    order = np.argsort(flat)
    cumulative = np.cumsum(flat[order]) / flat.sum()
    keep = np.zeros(flat.size, dtype=bool)
    keep[order] = cumulative > 1 - mass
    return keep.reshape(attention.shape)


def test_attention_foreground_picks_the_object_and_keeps_the_mass_fraction():
    attention, obj = object_attention()
    segments, info = saliency.AttentionSaliency(theta=0.6, min_area=0, patch_size=8).segment({"attn": attention})
    mean, kept = attention.mean(0), segments == 0
    assert (segments[~kept] == BACKGROUND).all()
    assert not (kept & ~obj).any() and kept.sum() >= 6  # inside the object (its 12 patches hold ~90% of the mass)
    assert mean[kept].sum() >= 0.6 and mean[kept].sum() - mean[kept].min() < 0.6  # just reaches 60% of the mass
    for mass in (0.3, 0.6, 0.9):
        np.testing.assert_array_equal(saliency.mass_foreground(mean, mass), dino_mass_rule(mean, mass))
    full, _ = saliency.AttentionSaliency(theta=0.95, min_area=0, patch_size=8).segment({"attn": attention})
    assert (full[obj] == 0).all()  # enough mass: the whole object, and some background
    assert info == {"n_segments": 1, "n_valid": 1, "valid_sizes": [float(kept.sum())],
                    "foreground_fraction": float(kept.mean())}


def test_a_proposal_of_at_most_min_area_pixels_leaves_the_image_all_background():
    attention, obj = object_attention()
    segments, info = saliency.AttentionSaliency(theta=0.6, min_area=12 * 64, patch_size=8).segment({"attn": attention})
    assert (segments == BACKGROUND).all() and info["n_valid"] == 0 and info["n_segments"] == 1
    segments, info = saliency.AttentionSaliency(theta=0.6, min_area=64, patch_size=8).segment({"attn": attention})
    assert (segments == 0).sum() > 1 and info["n_valid"] == 1


def test_ncut_foreground_is_the_side_of_the_most_attended_patch():
    attention, obj = object_attention()
    keys = one_hot_keys(obj.astype(int)) + 0.05  # two groups of keys: object and background
    attended, _ = saliency.NcutSaliency(min_area=0, patch_size=8).segment({"key": keys, "attn": attention})
    assert ((attended == 0) == obj).all()
    elsewhere = attention.copy()
    elsewhere[:, 0, 0] = 1.0  # the most attended patch now lies in the background
    flipped, _ = saliency.NcutSaliency(min_area=0, patch_size=8).segment({"key": keys, "attn": elsewhere})
    assert ((flipped == 0) == ~obj).all()
    tokencut = saliency.ncut_foreground(keys, seed=None)  # TokenCut's rule: the largest |eigenvector entry|
    assert (tokencut == obj).all() or (tokencut == ~obj).all()


def test_ncut_reads_the_attention_only_to_pick_its_side():
    stage = registry.stages("segmenter")["saliency-ncut"]
    assert stage.features_for(stage.params) == ("key", "attn")
    assert stage.features_for({**stage.params, "seed_from": None}) == ("key",)


def files_source(tmp_path, sizes: dict, theta: float = 0.5) -> saliency.FilesSaliency:
    """The files source bound to a fake split whose images have the given original sizes (w, h)."""
    ids = list(sizes)
    dataset = SimpleNamespace(ids=ids, image_size=lambda i: sizes[ids[i]])
    source = saliency.FilesSaliency(dir=str(tmp_path), theta=theta, min_area=0, patch_size=8)
    source.prepare(SimpleNamespace(dataset_for=lambda split: dataset, protocol=Protocol(resize=32)), "val")
    return source


def test_files_source_reads_binary_and_soft_masks_at_protocol_resolution(tmp_path):
    from PIL import Image

    binary = np.zeros((40, 64), dtype=np.uint8)
    binary[10:30, 20:44] = 1
    Image.fromarray(binary).save(tmp_path / "a.png")
    soft = np.zeros((40, 64), dtype=np.uint8)
    soft[:, :32] = 100
    soft[:, 32:] = 200  # 0.39 and 0.78 of 255: only the right half passes theta = 0.5
    Image.fromarray(soft).save(tmp_path / "b.png")
    source = files_source(tmp_path, {"a": (64, 40), "b": (64, 40)})
    a, info = source.segment({}, None, index=0)
    assert a.shape == (32, 32) and info["n_valid"] == 1  # shorter side 32, centre crop, as the labels
    np.testing.assert_array_equal(a == 0, Protocol(resize=32).apply_label(binary.astype(np.int64), 8) == 1)
    b, _ = source.segment({}, None, index=1)
    right = Protocol(resize=32).apply_label((soft > 127).astype(np.int64), 8) == 1
    assert 0 < right.mean() < 1 and ((b == 0) == right).all() and (b[~right] == BACKGROUND).all()


def test_files_source_rejects_a_missing_or_mis_sized_mask_in_one_line(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((40, 60), dtype=np.uint8)).save(tmp_path / "a.png")
    source = files_source(tmp_path, {"a": (64, 40), "b": (64, 40)})
    with pytest.raises(UserError, match=r"saliency mask .*a.png is 60x40, image a is 64x40 -- save each mask at "
                                        r"its image's size") as wrong:
        source.segment({}, None, index=0)
    with pytest.raises(UserError, match=r"no saliency mask for image b: .*b.png is missing -- put one PNG per image "
                                        r"in .*, named after the image \(b.png\)") as missing:
        source.segment({}, None, index=1)
    assert "\n" not in str(wrong.value) + str(missing.value)
    with pytest.raises(UserError, match="-p segmenter.dir=FOLDER"):
        registry.task("comus").resolve_params({"segmenter": "saliency-files"})
    with pytest.raises(UserError, match="not found"):
        registry.task("comus").resolve_params({"segmenter": "saliency-files", "segmenter.dir": str(tmp_path / "x")})


# ---------------------------------------------------------------- BASNet


@pytest.mark.slow  # two 87M-parameter networks and a 350 MB checkpoint
def test_basnet_has_the_release_key_layout_and_loads_its_checkpoint(tmp_path):
    import torch

    model = basnet.load_basnet(None, seed=3)
    state = model.state_dict()
    assert len(state) == 517 and sum(p.numel() for p in model.parameters()) == 87_060_360
    layout = {"inconv.weight": (64, 3, 3, 3), "encoder2.0.downsample.0.weight": (128, 64, 1, 1),
              "resb6_3.bn2.running_var": (512,), "convbg_m.weight": (512, 512, 3, 3), "conv6d_1.weight": (512, 1024, 3, 3),
              "conv4d_2.weight": (256, 512, 3, 3), "outconvb.weight": (1, 512, 3, 3), "refunet.conv_d4.weight": (64, 128, 3, 3),
              "refunet.conv_d0.bias": (1,)}
    assert {k: tuple(state[k].shape) for k in layout} == layout
    # The unsupervised release: {"net": state dict}; saved from a DataParallel model here, so "module." too
    path = tmp_path / basnet.WEIGHTS_FILE
    torch.save({"net": {f"module.{k}": v for k, v in state.items()}, "epoch": 10}, path)
    loaded = basnet.load_basnet(path, seed=0)
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    ours = basnet.predict_saliency(loaded, image, input_size=64)
    np.testing.assert_allclose(ours, basnet.predict_saliency(model, image, input_size=64), atol=1e-6)
    assert ours.shape == (64, 64) and ours.min() == 0 and ours.max() == 1
    calls = []  # as COMUS's copy: stage 6d's last convolution goes through bn6d_2 (BASNet's own: bn5d_2 again)
    for name in ("bn6d_2", "bn5d_2"):
        getattr(loaded, name).register_forward_hook(lambda module, args, out, name=name: calls.append(name))
    basnet.predict_saliency(loaded, image, input_size=64)
    assert calls == ["bn6d_2", "bn5d_2"]
    torch.save({"net": {k: v for k, v in state.items() if not k.startswith("refunet.")}}, path)
    with pytest.raises(UserError, match=r"checkpoint does not fit BASNet .*: 58 weights missing"):
        basnet.load_basnet(path)


def test_basnet_weights_come_from_the_run_the_folder_or_a_path(tmp_path, monkeypatch):
    ctx = SimpleNamespace(random_weights=True, weights_seed=4)
    assert basnet.weights_source(ctx, None).identity == "random:4"
    ctx.random_weights = False
    monkeypatch.setenv("SSL_BENCH_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=r"no BASNet weights: put basnet_unsupervised.pth \(download: https://drive"):
        basnet.weights_source(ctx, None)
    (tmp_path / basnet.WEIGHTS_FILE).write_bytes(b"weights")
    found = basnet.weights_source(ctx, None)
    assert found.path == tmp_path / basnet.WEIGHTS_FILE and len(found.identity) == 64
    with pytest.raises(UserError, match="segmenter.weights=.*nope.pth: no such file"):
        basnet.weights_source(ctx, str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="input_size=100 -- BASNet needs a multiple of 32"):
        registry.task("comus").resolve_params({"segmenter": "saliency-basnet", "segmenter.input_size": 100})


# ---------------------------------------------------------------- clustering and filtering


def test_spectral_clustering_and_filtering_drop_exactly_p_percent_farthest_per_cluster():
    rng = np.random.default_rng(0)
    sizes = (40, 23, 17)  # 20%: 8, 4.6 -> 5, 3.4 -> 3 dropped
    centres = rng.normal(size=(3, 16)) * 3
    x = np.concatenate([c + 0.3 * rng.normal(size=(n, 16)) for c, n in zip(centres, sizes)]).astype(np.float32)
    fitted = Spectral(k=3, n_neighbors=10).fit(x)
    keep = filter_uncertain(fitted.labels_, fitted.uncertainty_, 20)
    dropped = {}
    for cluster in range(3):
        members = fitted.labels_ == cluster
        dropped[int(members.sum())] = int((members & ~keep).sum())
        # every dropped proposal lies farther from its cluster's centre than every kept one
        assert fitted.uncertainty_[members & ~keep].min() >= fitted.uncertainty_[members & keep].max()
    assert dropped == {40: 8, 23: 5, 17: 3}
    assert filter_uncertain(fitted.labels_, fitted.uncertainty_, 0).all()
    ties = filter_uncertain(np.zeros(5, dtype=int), np.zeros(5), 40)  # equal distances: the later ones go
    assert ties.tolist() == [True, True, True, False, False]


def test_spectral_clusters_as_many_proposals_as_clusters():
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)  # a tiny split: 4 proposals, 4 clusters
    fitted = Spectral(k=4, n_neighbors=30).fit(x)
    assert fitted.maps_.shape == (4, 4) and sorted(fitted.labels_.tolist()) == [0, 1, 2, 3]


def test_kmeans_ranks_proposals_by_cosine_distance_to_its_centroid_as_the_authors_code():
    from ssl_bench.stages.clusterers.kmeans import KMeans

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(30, 8)) + 4, rng.normal(size=(30, 8)) - 4]).astype(np.float32)
    fitted = KMeans(k=2, normalize=False, n_init=10).fit(x)
    for cluster in range(2):
        members = np.flatnonzero(fitted.labels_ == cluster)
        centre = fitted.centroids_[cluster]
        cosine = 1 - x[members] @ centre / np.linalg.norm(x[members], axis=1) / np.linalg.norm(centre)
        euclidean = fitted.uncertainty_[members]
        assert np.corrcoef(np.argsort(np.argsort(cosine)), np.argsort(np.argsort(euclidean)))[0, 1] > 0.5


# ---------------------------------------------------------------- the discovered-categories count


def test_discovered_categories_on_a_hand_made_confusion_matrix():
    # Clusters x classes pixel counts, matched one-to-one on the diagonal; the rest of each class is unlabelled
    # (counted wrong), so class i's IoU is its diagonal count over 100; class 5 is absent from the ground truth.
    counts = np.diag([50, 25, 20, 10, 1, 0])
    unlabelled = np.array([50, 75, 80, 90, 99, 0])
    scores = evaluate_counts(counts, unlabelled)
    np.testing.assert_allclose(scores["per_class_iou"][:5], [50, 25, 20, 10, 1])
    assert scores["per_class_iou"][5] is None and scores["cluster_to_class"] == [0, 1, 2, 3, 4, 5]
    found = scores["discovered"]
    assert found["iou>20"] == {"classes": 2, "miou": pytest.approx(37.5)}  # 20 itself is not above 20
    assert found["iou>2"] == {"classes": 4, "miou": pytest.approx(26.25)}
    assert found["iou>0"] == {"classes": 5, "miou": pytest.approx(21.2)}  # the absent class is not counted
    assert discovered_categories([None, 0.0, 1.0], (0, 5)) == {"iou>0": {"classes": 1, "miou": 1.0},
                                                               "iou>5": {"classes": 0, "miou": None}}


def test_the_report_shows_the_discovered_categories_of_every_stream():
    from ssl_bench.report.tables import discovered_table, to_markdown

    from test_report import fake_record

    def metrics(seed, found):
        counts = {"iou>20": {"classes": found, "miou": 40.0}, "iou>2": {"classes": 5, "miou": 25.0},
                  "iou>0": {"classes": 6, "miou": 21.0}}
        return {f"{s}@{split}": {"miou": 30.0 + seed, "acc": 1.0, "f1": 1.0, "discovered": counts}
                for s in ("pseudo", "final") for split in ("val", "train")}

    table = discovered_table([fake_record(seed=0, metrics=metrics(0, 3)), fake_record(seed=1, metrics=metrics(1, 5)),
                              fake_record(dataset="camvid")])  # stored before the count: not shown
    assert [[c.text() for c in row[4:9]] for row in table.rows] == [["final", "30.5 ± 0.7", "4.0 ± 1.4", "40.0 ± 0.0", "5 ± 0"],
                                                                    ["pseudo", "30.5 ± 0.7", "4.0 ± 1.4", "40.0 ± 0.0", "5 ± 0"]]
    one_seed = discovered_table([fake_record(seed=0, metrics=metrics(0, 3))])
    assert [c.text() for c in one_seed.rows[0][6:9]] == ["3", "40.0", "5"]  # a count of classes, not "3.0"
    assert "classes with IoU \\> 20%" in to_markdown(table)  # Markdown escapes ">"


# ---------------------------------------------------------------- the de-noiser's COMUS settings


def test_the_comus_presets_are_table_11():
    voc, coco = denoise.DENOISER_PRESETS["comus-gpu"], denoise.DENOISER_PRESETS["comus-coco-gpu"]
    assert (voc.optimizer, voc.lr, voc.weight_decay, voc.schedule, voc.batch_size) == ("adam", 6e-5, 0.0, "constant", 56)
    assert (voc.input_size, voc.crop_scale, voc.epochs, voc.later_epochs) == (512, (0.5, 2.0), 10, 5)
    assert (coco.input_size, coco.crop_scale, coco.epochs) == (256, (0.2, 1.0), 1)
    assert voc.arch == "resnet50" and voc.encoder == "dino-resnet50-os8"
    assert registry.backbone(voc.encoder).options["dilation"] == [False, True, True]  # the authors' output stride 8
    assert denoise.DenoiserConfig.from_params("comus-gpu").describe() == "comus-gpu"
    assert denoise.DenoiserConfig.from_params({"preset": "comus-cpu", "epochs": 2}).describe() == \
        "comus-cpu with epochs changed"
    settings = {name: denoise.setting_of(name) for name in ("comus-gpu", "comus-cpu with epochs changed", "gpu",
                                                            "comus-gpu with lr changed", "cpu")}
    assert settings == {"comus-gpu": "paper", "comus-cpu with epochs changed": "small (cpu)", "gpu": "ours",
                        "comus-gpu with lr changed": "ours", "cpu": "small (cpu)"}


@pytest.mark.parametrize("params, message", [
    ({"preset": "comus-cpu", "crop_scale": [0.9, 0.5]}, r"crop_scale \[0.9, 0.5\] -- use two area fractions"),
    ({"preset": "comus-cpu", "crop_scale": 0.5}, "crop_scale 0.5"),
    ({"preset": "comus-cpu", "schedule": "cosine"}, "schedule 'cosine'"),
    ({"preset": "comus-cpu", "encoder": "dino-resnet50-os8"}, "cannot start the resnet18 de-noiser"),
    ({"preset": "comus-gpu", "encoder": "dino-vits16"}, "cannot start the resnet50 de-noiser"),
    ({"preset": "comus-gpu", "encoder": "dino-resnet5"}, "did you mean"),
    ({"preset": "comus-cpu", "later_epochs": 0}, "later_epochs 0"),
])
def test_bad_denoiser_settings_are_one_line(params, message):
    with pytest.raises(UserError, match=message):
        denoise.DenoiserConfig.from_params(params)


def test_crop_resize_boxes_follow_random_resized_crop():
    rng = np.random.default_rng(0)
    boxes = [denoise.crop_box(60, 80, (0.5, 2.0), rng) for _ in range(500)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80 and h > 0 and w > 0
    def whole(boxes):
        return sum((h, w) == (60, 80) for *_, h, w in boxes) / len(boxes)

    narrow = [denoise.crop_box(60, 80, (0.5, 1.0), rng) for _ in range(500)]
    assert whole(boxes) > 0.05 > 0.01 > whole(narrow)  # an area above 1 never fits: the whole image, more often
    areas = [h * w / 4800 for *_, h, w in boxes if (h, w) != (60, 80)]
    assert min(areas) > 0.45 and max(areas) <= 1.0
    assert denoise.crop_box(10, 100, (0.5, 0.5), np.random.default_rng(0), attempts=0) == (0, 43, 10, 13)


def tiny_pair(n: int = 4):
    """Images half red / half blue with masks to match (at a coarser grid, as pseudo masks are)."""
    images, masks = [], []
    for i in range(n):
        image = np.zeros((32, 48, 3), dtype=np.uint8)
        image[:, :24, 0] = 200
        image[:, 24:, 2] = 200
        mask = np.zeros((4, 6), dtype=np.int16)
        mask[:, 3:] = 1
        images.append(image)
        masks.append(mask)
    return images, masks


def test_self_training_with_crops_trains_a_second_round_on_the_first_rounds_predictions():
    config = denoise.DenoiserConfig(input_size=32, epochs=2, later_epochs=1, batch_size=2, crop_scale=(0.5, 1.0),
                                    single_class_threshold=1.0)
    images, masks = tiny_pair()
    masks[3] = np.full((4, 6), NOISE, dtype=np.int16)  # nothing to learn from: not trained on
    rounds = denoise.self_train(images, masks, [0, 1, 2], 2, config, iterations=2, seed=0)
    assert [used for _, used in rounds] == [3, 4]  # round 2 learns from round 1's prediction of every image
    again = denoise.self_train(images, masks, [0, 1, 2], 2, config, iterations=1, seed=0)
    import torch

    for a, b in zip(rounds[0][0].state_dict().values(), again[0][0].state_dict().values()):
        assert torch.equal(a, b)  # seeded: round 1 of a 2-round run is the 1-round run


def test_a_prediction_stream_left_unfinished_leaves_gradients_on():
    import torch

    config = denoise.DenoiserConfig(input_size=32, epochs=1, batch_size=2, predict_batch_size=4)
    images, masks = tiny_pair()
    model, _ = denoise.train_denoiser(images, masks, 2, config)
    stream = denoise.predict_denoiser(model, images, config)
    next(stream)  # the engine reads one map per image and never asks past the last
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    stream.close()


def test_the_encoder_starts_from_a_backbones_weights():
    import torch
    import torchvision

    resnet = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    resnet.fc = torch.nn.Identity()
    model = denoise.build_denoiser(3, "resnet50")
    denoise.load_encoder(model, resnet.state_dict(), "dino-resnet50-os8")
    assert torch.equal(model.backbone.layer4[2].conv3.weight, resnet.layer4[2].conv3.weight)
    with pytest.raises(UserError, match="does not fit the de-noiser's encoder"):
        denoise.load_encoder(model, {"conv1.weight": resnet.conv1.weight}, "x")


# ---------------------------------------------------------------- the engine with COMUS's streams


def comus_ctx(params, n: int = 4):
    """Two saliency patterns (an object left or right), each object in its own colour: clusters by colour."""
    import torch

    spec = registry.task("comus")
    resolved = spec.resolve_params({"segmenter": "saliency-attention", "segmenter.min_area": 0,
                                    "denoiser": {"preset": "comus-cpu", "input_size": 32, "epochs": 1, "later_epochs": 1,
                                                 "batch_size": 2}, **params})
    attention, images = [], []
    for i in range(n):
        a = np.full((1, 4, 6), 0.01)
        image = np.zeros((32, 48, 3), dtype=np.uint8)
        cols = slice(0, 2) if i % 2 else slice(3, 6)
        a[0, 1:3, cols] = 1.0
        image[8:24, cols.start * 8:cols.stop * 8, i % 2] = 250
        attention.append(a)
        images.append(image)
    backbone = SimpleNamespace(spec=SimpleNamespace(name="fake-vit", input_size=16, embed_dim=3),
                               normalize=lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255,
                               embed=lambda x: x.mean((2, 3)))
    return SimpleNamespace(
        k=3, seed=0, split="val", params=resolved, stages=spec.stage_specs(resolved), patch_size=8,
        features=lambda kind, split=None: attention, image=lambda i, split=None: images[i].copy(),
        dataset_for=lambda split: [None] * n, label_size=lambda i, split=None: (32, 48), backbone=backbone,
        build_backbone=lambda name: backbone, backbone_identity=lambda name=None: {"backbone": "fake-vit"},
        reuse=lambda name, identity, compute, split=None, slots=None: compute(), device="cpu",
        progress=lambda it, **_: it, timed=lambda stage: contextlib.nullcontext(), stage_seconds={})


def test_comus_streams_proposals_pseudo_and_two_self_training_rounds():
    result = segment_cluster.run(comus_ctx({"filter_percent": 50.0, "clusterer.n_neighbors": 2}))
    predictions = list(result.predictions)
    assert [p.stream for p in predictions[:6]] == ["proposals", "pseudo", "self-trained", "self-trained-2", "final",
                                                   "proposals"]
    proposals = [p.labels for p in predictions if p.stream == "proposals"]
    pseudo = [p.labels for p in predictions if p.stream == "pseudo"]
    assert all(set(np.unique(m)) <= {0, 1, 2} and (m == 2).mean() > 0.5 for m in proposals)  # background = K-th
    filtered = [i for i, m in enumerate(pseudo) if (m == NOISE).any()]
    assert len(filtered) == 2 and result.stats["filtered_regions"] == 2  # half of each 2-proposal cluster
    for i in filtered:  # the filtered proposal is unlabelled, the background stays background
        assert ((pseudo[i] == NOISE) == (proposals[i] != 2)).all()
    stats = result.stats
    assert stats["denoiser_train_masks"] == 2 and stats["denoiser_train_masks_per_iteration"] == [2, 4]
    assert stats["denoiser_preset"] == "comus-cpu with input_size, epochs, batch_size, later_epochs changed"
    assert stats["denoiser_setting"] == "small (cpu)" and stats["clusters"] == 2 and stats["background_cluster"]


def test_without_self_training_final_is_the_proposals_and_without_filtering_there_is_no_pseudo():
    predictions = list(segment_cluster.run(comus_ctx({"filter_percent": 0.0, "denoise": False})).predictions)
    assert {p.stream for p in predictions} == {"proposals", "final"}
    with pytest.raises(UserError, match="clusterer 'mine' gives no distance to its clusters to filter by"):
        segment_cluster._filter(SimpleNamespace(labels_=np.zeros(3)), {"filter_percent": 20.0, "clusterer": "mine"}, {})


@pytest.mark.parametrize("params, message", [
    ({"filter_percent": 100.0}, "filter_percent=100.0"),
    ({"denoise_iterations": 0}, "denoise_iterations=0"),
    ({"streams": {"initial": "final"}}, "streams="),
    ({"streams": {"proposals": "x"}}, "streams="),
])
def test_bad_comus_parameters_are_one_line(params, message):
    with pytest.raises(UserError, match=message):
        registry.task("comus").resolve_params(params)


def test_every_saliency_source_bounds_k_by_one_proposal_per_image():
    task = registry.task("comus")
    for source in ("saliency-attention", "saliency-ncut", "saliency-files", "saliency-basnet"):
        params = task.resolve_params({"segmenter": source, **({"segmenter.dir": "."} if source == "saliency-files"
                                                              else {})})
        bound = task.k_bound_for(params)
        assert (bound.items, bound.cap(params)) == ("proposals", 1)
        eight_images = (params, "val", lambda split: [None] * 8, lambda dataset: [400] * 8, 400)
        bound.check(9, *eight_images)  # 8 object clusters and the background one
        with pytest.raises(UserError, match=r"K=10 clusters need at least 9 proposals \(besides 1 that needs none\)"
                                            r".*holds at most 8"):
            bound.check(10, *eight_images)


def test_the_engines_optional_steps_leave_older_task_files_as_they_were():
    for name in ("datus2", "dsm", "segment-cluster"):
        assert not {"filter_percent", "denoise_iterations", "streams"} & set(registry.task(name).params)


def test_mean_patch_embedding_weighs_patches_by_a_finer_maps_pixels():
    grid = np.arange(8, dtype=np.float32).reshape(2, 2, 2)  # features of 4 patches
    fine = np.full((4, 4), NOISE)
    fine[0, 0:2] = 0  # two pixels of patch (0, 0)
    fine[0:2, 2] = 0  # two pixels of patch (0, 1)
    fine[3, 3] = 0  # one pixel of patch (1, 1)
    vector = MeanPatchEmbedding().embed([RegionImage(fine, None, {"patch": grid})])
    np.testing.assert_allclose(vector[0], (2 * grid[0, 0] + 2 * grid[0, 1] + grid[1, 1]) / 5)


# ---------------------------------------------------------------- full runs


def comus_run(runner, dataset, root, segmenter: dict, options=(("limit", 4),), k=None):
    params = {"denoiser": {"preset": "comus-cpu", "input_size": 64, "epochs": 1, "later_epochs": 1, "batch_size": 4},
              "segmenter.min_area": 0, **segmenter}
    return runner.run(RunConfig(backbone="dino-vits16", weights="random", task="comus-cpu", dataset=dataset,
                                data_root=root, dataset_options=options, k=k,
                                params=tuple(sorted(params.items())))).record


@pytest.mark.slow
@pytest.mark.parametrize("segmenter", ["saliency-attention", "saliency-ncut", "saliency-files", "saliency-basnet"])
def test_comus_runs_on_the_voc_samples_with_each_saliency_source(runner, shared_dataset, tmp_path, segmenter):
    from PIL import Image

    from ssl_bench.data import open_dataset

    root = str(shared_dataset("voc2012"))
    params = {"segmenter": segmenter}
    if segmenter == "saliency-files":  # any detector's masks: here the ground truth's objects
        voc = open_dataset("voc2012", root, "val", limit=4)
        for i, image_id in enumerate(voc.ids):
            Image.fromarray(((voc.load_label(i) > 0) * 255).astype(np.uint8)).save(tmp_path / f"{image_id}.png")
        params["segmenter.dir"] = str(tmp_path)
    rec = comus_run(runner, "voc2012", root, params, k=5)
    assert set(rec["metrics"]) == {"proposals@val", "pseudo@val", "self-trained@val", "self-trained-2@val", "final@val"}
    assert rec["stats"]["clusters"] == 4 and rec["stats"]["denoiser_setting"] == "small (cpu)"
    assert rec["stats"]["segments"]["images"] == 4 and rec["metrics"]["final@val"]["discovered"]["iou>0"]["classes"] > 0
    if segmenter == "saliency-files":  # the ground truth's objects as proposals: well above a one-label guess
        assert rec["metrics"]["proposals@val"]["acc"] > 60


@pytest.mark.slow
@pytest.mark.parametrize("dataset, options", [("suim", ()), ("camvid", (("limit", 4),)), ("synthetic", (("n", 6),))])
def test_comus_runs_on_suim_camvid_and_the_synthetic_set(runner, shared_dataset, dataset, options):
    root = None if dataset == "synthetic" else str(shared_dataset(dataset))
    rec = comus_run(runner, dataset, root, {}, options=options, k=3)
    assert "self-trained-2@val" in rec["metrics"] or "self-trained-2@" + rec["split"] in rec["metrics"]
    assert rec["stats"]["denoiser_iterations"] == 2
