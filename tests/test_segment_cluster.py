"""Composed tasks: stage slots in the registry, the segment -> embed -> cluster engine, and full runs."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_bench import registry, versions
from ssl_bench.errors import UserError
from ssl_bench.methods import segment_cluster
from ssl_bench.runner import RunConfig
from ssl_bench.sweep import grid_from_mapping

from test_datus import fake_ctx, one_hot_keys


# ---------------------------------------------------------------- stage slots in the registry


def test_stage_parameters_are_named_by_slot_and_follow_the_chosen_stage():
    dsm = registry.task("dsm")
    params = dsm.resolve_params({"segmenter.segments": 8})
    assert params["segmenter"] == "dsm" and params["segmenter.segments"] == 8 and params["embed.erode"] == 2
    assert params["clusterer.pca_dim"] == 32  # the task file's value for its own clusterer
    swapped = dsm.resolve_params({"segmenter": "louvain", "clusterer": "sinkhorn"})
    assert "segmenter.segments" not in swapped and swapped["segmenter.tau"] == 5
    assert "clusterer.pca_dim" in swapped and swapped["clusterer.pca_dim"] == 0  # written for kmeans, not sinkhorn
    assert swapped["embed.erode"] == 2  # the embed slot kept its stage, so the task file's values hold


@pytest.mark.parametrize("overrides, message", [
    ({"segmenter": "dms"}, "unknown segmenter 'dms' -- did you mean dsm"),
    ({"clusterer.temperature": 0.1}, r"'kmeans' \(clusterer\) has no parameter\(s\) \['clusterer.temperature'\]"),
    ({"tau": 2}, r"did you mean segmenter.tau\?"),
    ({"segmenter.tau": 2.5}, "segmenter.tau=2.5 must be a whole number"),
    ({"segmenter.tau": -1}, "tau=-1"),
    ({"clusterer": "sinkhorn", "clusterer.temperature": 0}, "temperature=0"),
    ({"clusterer": "abc", "clusterer.stop_label_change": 2}, "stop_label_change=2 -- use null"),
    ({"clusterer": "abc", "clusterer.stop_patience": 0}, "stop_patience=0"),
    ({"colour.lambda": 1}, r"no parameter\(s\) \['colour.lambda'\]"),
])
def test_bad_stage_choices_are_one_line(overrides, message):
    with pytest.raises(UserError, match=message):
        registry.task("segment-cluster").resolve_params(overrides)


def test_a_label_names_only_what_differs_from_the_chosen_stages_defaults():
    def label(overrides):
        spec = registry.task("segment-cluster")
        params = spec.resolve_params(overrides)
        stages = versions.stage_versions(spec, params)  # as the runner stores them (louvain is at v2)
        return versions.task_label({"task": "segment-cluster", "params": params,
                                    **({"stage_versions": stages} if stages else {})})

    assert label({}) == "segment-cluster"
    assert label({"clusterer": "sinkhorn"}) == "segment-cluster (clusterer=sinkhorn)"
    assert label({"clusterer": "sinkhorn", "clusterer.temperature": 0.05}) == \
        "segment-cluster (clusterer=sinkhorn, clusterer.temperature=0.05)"


def test_the_features_a_run_reads_come_from_its_stages():
    spec = registry.task("segment-cluster")
    assert spec.features_for(spec.resolve_params({})) == ("key",)
    dsm_on_patches = spec.resolve_params({"segmenter": "dsm", "segmenter.feature": "patch", "embed": "mean-patch"})
    assert spec.features_for(dsm_on_patches) == ("patch",)
    both = spec.resolve_params({"embed": "mean-patch"})
    assert spec.features_for(both) == ("key", "patch")


def test_a_task_file_with_a_stage_parameter_its_stage_lacks_is_refused(tmp_path):
    spec = registry.TaskSpec(name="x", title="x", entrypoint="m:f", features=(), stages={"segmenter": "segmenter"},
                             params={"segmenter": "louvain", "segmenter.eigenvectors": 3})
    with pytest.raises(UserError, match="'segmenter.eigenvectors' is not a parameter of segmenter 'louvain'"):
        registry._check_slots(spec, tmp_path / "x.yaml")


def test_sweep_lists_of_stages_expand_into_cells():
    grid = grid_from_mapping({"backbones": ["reference"], "datasets": ["synthetic"], "tasks": [
        {"name": "segment-cluster", "params": {"segmenter": ["louvain", "dsm"],
                                               "clusterer": ["kmeans", "sinkhorn", "spectral", "abc"]}}]})
    assert len(grid.tasks) == 8 and len({t.params for t in grid.tasks}) == 8
    with pytest.raises(UserError, match="empty list of values for 'clusterer'"):
        grid_from_mapping({"backbones": ["reference"], "datasets": ["synthetic"],
                           "tasks": [{"name": "segment-cluster", "params": {"clusterer": []}}]})


# ---------------------------------------------------------------- the engine


def framed_ctx(params, k=2):
    """Keys of an object in the middle of a frame (two one-hot groups), images to match."""
    ctx = fake_ctx(params, task="dsm")
    frame = np.zeros((6, 6), dtype=int)
    frame[2:4, 1:5] = 1
    ctx.features = lambda kind, split=None: [one_hot_keys(frame)] * 2
    ctx.label_size = lambda i, split=None: (48, 48)
    image = np.zeros((48, 48, 3), dtype=np.uint8)
    image[16:32, 8:40] = 255
    ctx.image = lambda i, split=None: image.copy()
    ctx.k = k
    return ctx, frame


def test_background_is_the_last_cluster_and_is_never_clustered():
    ctx, frame = framed_ctx({"segmenter.eigenvectors": 2, "segmenter.segments": 2, "crf": False,
                             "embed.erode": 0, "embed.dilate": 0})
    result = segment_cluster.run(ctx)
    initial = [p.labels for p in result.predictions if p.stream == "initial"]
    object_pixels = np.kron(frame, np.ones((8, 8), dtype=int)) == 1
    assert (initial[0][~object_pixels] == 1).all() and (initial[0][object_pixels] == 0).all()
    assert result.stats["clusters"] == 1 and result.stats["background_cluster"] is True
    assert result.stats["segments"]["valid_per_image"] == 1.0


def test_k_counts_the_background_cluster():
    ctx, _ = framed_ctx({"segmenter.eigenvectors": 2, "segmenter.segments": 2, "crf": False}, k=4)
    with pytest.raises(UserError, match="K=4 clusters need at least 3 valid segments besides background, split "
                                        "'val' has 2"):
        segment_cluster.run(ctx)  # one object per image: two regions for three clusters


def test_the_crf_stream_refines_the_pseudo_masks_and_is_final():
    ctx, frame = framed_ctx({"segmenter.eigenvectors": 2, "segmenter.segments": 2, "embed.erode": 0,
                             "embed.dilate": 0})
    predictions = list(segment_cluster.run(ctx).predictions)
    assert [p.stream for p in predictions[:3]] == ["initial", "crf", "final"]
    crf, final = predictions[1].labels, predictions[2].labels
    assert crf.shape == (48, 48) and (crf == final).all()
    object_pixels = np.kron(frame, np.ones((8, 8), dtype=int)) == 1
    assert (crf[object_pixels] == 0).mean() > 0.9  # the white object keeps its label on its own edges


# ---------------------------------------------------------------- full runs


def one_label_miou(runner, dataset_options) -> float:
    """mIoU of a prediction with one label everywhere (the floor every composed run must clear)."""
    from ssl_bench.metrics import StreamingConfusion

    run = runner.resolve(RunConfig(backbone="reference", task="kmeans", dataset="synthetic",
                                   dataset_options=dataset_options))
    labels = runner.cache.labels.ensure(run.dataset, run.protocol, 8)
    confusion = StreamingConfusion(run.dataset.num_classes, 1)
    for i in range(len(labels)):
        confusion.update(np.zeros_like(labels[i]), labels[i])
    return confusion.compute(1)["miou"]


@pytest.mark.slow
@pytest.mark.parametrize("stages", [
    {"segmenter": "image-kmeans", "embed": "mean-patch", "clusterer": "kmeans"},
    {"segmenter": "image-kmeans", "embed": "mean-patch", "clusterer": "spectral", "clusterer.n_neighbors": 10},
    {"segmenter": "primaps", "embed": "mean-patch", "clusterer": "sinkhorn"},
    {"segmenter": "dsm", "segmenter.feature": "patch", "segmenter.background": False, "embed": "crop-cls",
     "clusterer": "abc", "clusterer.lr": 1e-3, "clusterer.batch_size": 64, "clusterer.epochs": 50,
     "clusterer.ffn_width": 32},  # in proportion to the reference features' d = 8 (512 is for d = 384)
])
def test_composed_runs_clear_the_one_label_floor_on_the_synthetic_set(runner, stages):
    options = (("n", 8),)
    rec = runner.run(RunConfig(backbone="reference", task="segment-cluster", dataset="synthetic",
                               dataset_options=options, params=tuple(sorted(stages.items())))).record
    floor = one_label_miou(runner, options)
    assert rec["miou"] > floor + 15, (rec["miou"], floor)
    assert rec["stats"]["segments"]["images"] == 8 and rec["config"]["params"]["clusterer"] == stages["clusterer"]
    if stages["clusterer"] == "abc":  # a trained clusterer's record reaches the run's stats
        assert rec["stats"]["clusterer_fit"]["epochs_run"] == 50
        assert rec["stats"]["clusterer_fit"]["configuration"].startswith(
            "not the paper's: ffn_width=32 (paper 512), epochs=50 (paper 500)")


@pytest.mark.slow
def test_dsm_runs_on_the_voc_samples(runner, shared_dataset):
    rec = runner.run(RunConfig(backbone="dino-vits16", weights="random", task="dsm", dataset="voc2012",
                               data_root=str(shared_dataset("voc2012")), dataset_options=(("limit", 4),),
                               k=21)).record
    assert set(rec["metrics"]) == {"initial@val", "crf@val", "final@val"}
    assert rec["stats"]["background_cluster"] and rec["stats"]["clusters"] == 20
    assert 0 < rec["stats"]["segments"]["valid_per_image"] <= 14  # 15 segments, one of them background
