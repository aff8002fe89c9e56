"""End to end through the runner: configuration -> cache -> task -> evaluation -> store."""

import contextlib
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from ssl_bench import registry
from ssl_bench.errors import UserError
from ssl_bench.runner import RunConfig

SMALL = (("n", 12),)  # synthetic images


def test_run_stores_once_and_rerun_does_no_work(runner):
    cfg = RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=SMALL)
    first = runner.run(cfg)
    assert first.computed and first.record["k"] == 5 and not first.record["random_weights"]
    again = runner.run(cfg)
    assert not again.computed and again.record["config_hash"] == first.record["config_hash"]
    assert len(runner.store.query()) == 1
    assert runner.run(cfg, force=True).computed and len(runner.store.query()) == 1
    cfg_k = RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=SMALL, k=10)
    assert runner.run(cfg_k).record["metrics"]["final@val"]["matching"] == "majority"


def test_kmeans_on_separable_features_beats_chance(runner):
    rec = runner.run(RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=SMALL)).record
    assert rec["miou"] > 45 and rec["acc"] > 60  # 5 classes: chance mIoU is about 20
    assert rec["config"]["protocol"]["resize"] == 320 and rec["environment"]["torch"]
    assert set(rec["timings"]) == {"features", "labels", "task", "evaluate"}


def test_synthetic_seeds_never_share_cached_features(runner):
    # seed=1 renders other images; it once reused seed=0's cached features and scored at chance
    runs = {seed: runner.run(RunConfig(backbone="reference", task="kmeans", dataset="synthetic",
                                       dataset_options=(("n", 12), ("seed", seed)))).record for seed in (0, 1)}
    assert runs[0]["miou"] > 45 and runs[1]["miou"] > 45
    assert len({p.parent for p in runner.cache.root.glob("reference/synthetic-val/*/meta.json")}) == 2


def test_two_folders_with_the_same_file_names_are_two_datasets(runner, tmp_path):
    from PIL import Image

    from ssl_bench.report.tables import dataset_label

    for name, colours in (("site-a", ((200, 30, 30), (30, 30, 200))), ("site-b", ((30, 200, 30), (90, 90, 90)))):
        root = tmp_path / name
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        (root / "classes.txt").write_text("left\nright\n")
        mask = np.zeros((64, 64), np.uint8)
        mask[:, 32:] = 1
        for stem in ("001", "002"):
            Image.fromarray(np.array(colours, np.uint8)[mask]).save(root / "images" / f"{stem}.png")
            Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    runs = [runner.run(RunConfig(backbone="reference", task="kmeans", dataset="folder", data_root=str(tmp_path / n)))
            for n in ("site-a", "site-b")]
    assert all(r.computed for r in runs)  # the second folder is not "already stored" as the first
    assert runs[0].record["config_hash"] != runs[1].record["config_hash"]
    assert len(list(runner.cache.root.glob("reference/folder-val/*/meta.json"))) == 2
    assert [dataset_label(r.record["config"]) for r in runs] == ["folder:site-a", "folder:site-b"]


def _chance(runner, cfg: RunConfig, seed: int = 0) -> dict:
    """Scores of seeded uniform-random labels through the same matching and metrics as a real run, and the
    pixel accuracy of always predicting the most frequent class: what "above chance" must beat."""
    from ssl_bench.metrics import StreamingConfusion
    from ssl_bench.runner import TaskContext

    run = runner.resolve(cfg)
    ctx = TaskContext(runner, run, lambda it, **_: it)
    rng = np.random.default_rng(seed)
    conf, counts = StreamingConfusion(run.config["num_classes"], ctx.k), np.zeros(run.config["num_classes"])
    for i in range(len(run.dataset)):
        label = ctx.label(i)
        conf.update(rng.integers(0, ctx.k, label.shape), label)
        counts += np.bincount(label[label >= 0], minlength=len(counts))
    scores = conf.compute(ctx.k)
    return {"miou": scores["miou"], "acc": scores["acc"], "majority_acc": 100 * counts.max() / counts.sum()}


@pytest.mark.slow
def test_primaps_em_scores_clearly_above_chance(runner, one_thread):
    # the paper's setting (image-resolution EM, photometric augmentation through the backbone, CRFs), on
    # 128-pixel images (the CRFs dominate the cost) and a short schedule
    from ssl_bench.data.protocol import Protocol

    cfg = RunConfig(backbone="reference", task="primaps-em", dataset="synthetic", dataset_options=SMALL,
                    params=(("epochs", 10),), protocol=Protocol(resize=128))
    rec = runner.run(cfg).record
    chance = _chance(runner, cfg)
    assert rec["stats"]["substitutions"] == [] and rec["stats"]["proposals_per_image"] > 1.5
    assert rec["miou"] > 2 * chance["miou"], (rec["miou"], chance)
    assert rec["acc"] > max(chance["acc"], chance["majority_acc"]) + 15, (rec["acc"], chance)


@pytest.mark.slow
def test_datus2_stores_metrics_and_segment_statistics(runner):
    tiny_denoiser = {"preset": "cpu", "input_size": 32, "epochs": 1, "batch_size": 2}
    cfg = RunConfig(backbone="dino-vits16", weights="random", task="datus2", dataset="synthetic",
                    dataset_options=(("n", 3),), params=(("denoiser", tiny_denoiser),))
    rec = runner.run(cfg).record
    assert rec["random_weights"] and rec["task"] == "datus2"
    assert set(rec["metrics"]) == {"initial@val", "denoised@val", "final@val"}
    assert rec["metrics"]["final@val"]["miou"] == rec["miou"]
    seg = rec["stats"]["segments"]
    assert set(seg) == {"images", "total", "valid", "valid_percent", "per_image", "valid_per_image",
                        "valid_per_image_std", "patches_per_segment"}
    assert seg["images"] == 3 and 0 < seg["valid"] <= seg["total"]
    assert seg["valid_percent"] == pytest.approx(100 * seg["valid"] / seg["total"])
    assert rec["stats"]["crop_backbone"] == "dino-vits16"
    # the CNN-ablation path: crops embedded by another registered backbone, built by the runner
    cnn = RunConfig(**{**cfg.__dict__, "params": (("denoise", False), ("embed.backbone", "reference"))})
    rec = runner.run(cnn).record
    assert rec["stats"]["crop_backbone"] == "reference" and set(rec["metrics"]) == {"initial@val", "final@val"}


@pytest.mark.slow
def test_datus2_cells_that_differ_in_k_share_their_segments(runner, monkeypatch):
    import dataclasses

    from ssl_bench.stages.segmenters import louvain

    discovered = []
    real = louvain.discover_segments
    monkeypatch.setattr(louvain, "discover_segments", lambda *a, **kw: discovered.append(1) or real(*a, **kw))
    cfg = RunConfig(backbone="dino-vits16", weights="random", task="datus2-initial", dataset="synthetic",
                    dataset_options=(("n", 3),))
    first = runner.run(cfg).record
    assert len(discovered) == 3  # one discovery per image
    assert "kept_seconds" not in first["stats"]  # it computed them: in its own stages
    for k in (6, 8):  # over-clustering: the segments and crop embeddings are reused, only k-means runs again
        rec = runner.run(dataclasses.replace(cfg, k=k)).record
        assert rec["k"] == k and set(rec["stats"]["kept_seconds"]) == {"segments-val", "regions-val"}
    # the first cell's computation of them: its segment stage and more (reading features), within its task
    assert first["stats"]["stage_seconds"]["segment"] <= rec["stats"]["kept_seconds"]["segments-val"] \
        <= first["timings"]["task"]
    assert len(discovered) == 3
    runner.run(dataclasses.replace(cfg, seed=1))  # Louvain is seeded: another seed discovers again
    assert len(discovered) == 6
    other = runner.run(dataclasses.replace(cfg, params=(("segmenter.tau", 2),))).record  # a segment parameter: again
    assert len(discovered) == 9 and other["config_hash"] != first["config_hash"]
    again = runner.run(cfg, force=True).record  # --force recomputes the kept segments too, to the same numbers
    assert again["metrics"] == first["metrics"] and len(discovered) == 12
    for kept in next(runner.cache.root.rglob("reuse")).glob("*.npz"):
        kept.write_bytes(b"damaged")  # an unreadable copy is computed again
    with pytest.warns(UserWarning, match="is not a kept value .*: computing regions-val again"):
        runner.run(dataclasses.replace(cfg, k=7))
    assert len(discovered) == 15
    with pytest.raises(UserError, match="K=10 clusters need at least 10 valid segments, split 'val' has 9"):
        runner.run(dataclasses.replace(cfg, k=10))  # it would store 9 clusters as K = 10


def test_reuse_computes_once_for_cells_running_at_once_and_survives_a_full_disk(runner, monkeypatch):
    import time
    from concurrent.futures import ThreadPoolExecutor

    from ssl_bench import runner as runner_module
    from ssl_bench.runner import TaskContext

    run = runner.resolve(RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=(("n", 2),)))
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.5)
        return {"x": np.arange(3)}

    contexts = [TaskContext(runner, run, lambda it, **_: it) for _ in range(2)]  # two cells, e.g. two Ray tasks
    with ThreadPoolExecutor(2) as pool:
        values = list(pool.map(lambda ctx: ctx.reuse("probe", {"a": 1}, slow), contexts))
    assert len(calls) == 1 and all(np.array_equal(v["x"], np.arange(3)) for v in values)

    def full(path, dump):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner_module, "save_value", full)
    with pytest.warns(UserWarning, match="could not keep probe"):
        assert contexts[0].reuse("probe", {"a": 2}, slow)["x"].tolist() == [0, 1, 2]  # the value, all the same
    monkeypatch.setattr(runner_module, "file_lock", lambda path: open("/proc/no-such-lock", "a"))  # read-only cache
    with pytest.warns(UserWarning, match="cannot keep probe .* computing it for this cell"):
        assert contexts[0].reuse("probe", {"a": 3}, slow)["x"].tolist() == [0, 1, 2]


def test_a_cell_that_reads_kept_values_is_told_what_they_took_the_cell_that_computed_them(runner, monkeypatch):
    # the next K of a sweep (or the K after one refused past that work) reads the segments in a second: the
    # minutes their computation took go with them, each kept value counted once, into stats["kept_seconds"]
    from types import SimpleNamespace

    from ssl_bench import runner as runner_module
    from ssl_bench.runner import TaskContext

    now = [0.0]
    monkeypatch.setattr(runner_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def work(seconds, value=1, then=None):
        def compute():
            now[0] += seconds
            return {"x": np.asarray(then() if then else value)}
        return compute

    run = runner.resolve(RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=(("n", 2),)))
    cell = lambda: TaskContext(runner, run, lambda it, **_: it)  # noqa: E731
    first = cell()  # computes both: its own timings hold them
    first.reuse("segments", {}, work(5.0, then=lambda: first.reuse("fit", {}, work(30.0))["x"]))
    assert first.kept_seconds == {}
    second = cell()  # reads the segments, made from the fit: both, by their own seconds
    second.reuse("segments", {}, work(99.0))
    assert second.kept_seconds == {"segments": 5.0, "fit": 30.0}
    third = cell()  # computes the regions from the kept fit (read inside), then the segments again (kept): fit once
    third.reuse("regions", {}, work(2.0, then=lambda: third.reuse("fit", {}, work(99.0))["x"]))
    third.reuse("segments", {}, work(99.0))
    assert third.kept_seconds == {"fit": 30.0, "segments": 5.0}
    fourth = cell()
    fourth.reuse("regions", {}, work(99.0))
    assert fourth.kept_seconds == {"regions": 2.0, "fit": 30.0}
    waiting = cell()  # waited 3 s at the lock for it (another cell computing it): in its own timings already
    real_lock = runner_module.file_lock

    @contextlib.contextmanager
    def slow_lock(path):
        now[0] += 3.0
        with real_lock(path):
            yield

    monkeypatch.setattr(runner_module, "file_lock", slow_lock)
    waiting.reuse("segments", {}, work(99.0))
    assert waiting.kept_seconds == {"segments": 2.0, "fit": 30.0}
    monkeypatch.setattr(runner_module, "file_lock", real_lock)
    reuse = next(runner.cache.root.rglob("reuse"))
    for kept in reuse.glob("fit-*"):
        kept.unlink()
    own = cell()  # computes the fit itself (its own timings), then reads the segments made from another fit
    own.reuse("fit", {}, work(7.0))
    own.reuse("segments", {}, work(99.0))
    assert own.kept_seconds == {"segments": 5.0}
    for seconds in reuse.glob("*.seconds.json"):
        seconds.unlink()  # kept before the seconds were: unknown, nothing claimed
    fifth = cell()
    assert fifth.reuse("regions", {}, work(99.0))["x"] == 1 and fifth.kept_seconds == {}


def test_a_limit_that_cuts_nothing_is_the_same_run(runner):
    whole = runner.resolve(RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=(("n", 4),)))
    for limit, same in ((4, True), (500, True), (3, False)):
        cfg = RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=(("limit", limit), ("n", 4)))
        assert (runner.resolve(cfg).config_hash == whole.config_hash) is same, limit


def test_a_new_version_of_a_task_is_a_new_run(runner, monkeypatch):
    cfg = RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=(("n", 4),))
    current = runner.resolve(cfg)
    assert current.config["task_version"] == registry.tasks()["kmeans"].version > 1
    tasks = dict(registry.tasks())
    tasks["kmeans"] = dataclasses.replace(tasks["kmeans"], version=1)
    monkeypatch.setattr(registry, "tasks", lambda: tasks)
    first = runner.resolve(cfg)
    assert "task_version" not in first.config and first.config_hash != current.config_hash  # v1 hashes unchanged


def test_a_users_checkpoint_is_recorded_by_file_and_the_registrys_file_is_not_called_own(runner, tmp_path):
    from ssl_bench.models.weights import expected_file

    spec = registry.backbone("dino-vits16")
    mine, official = tmp_path / "mine" / "my.pth", tmp_path / "official" / expected_file(spec)
    for path in (mine, official):
        path.parent.mkdir()
        path.write_bytes(b"the same bytes")  # resolve hashes the file; nothing is loaded yet
    base = RunConfig(backbone="dino-vits16", task="kmeans", dataset="synthetic", dataset_options=SMALL)
    own = runner.resolve(dataclasses.replace(base, weights=str(mine)))
    assert own.config["own_weights"] is True and own.config["weights_file"] == str(mine.resolve())
    theirs = runner.resolve(dataclasses.replace(base, weights=str(official)))
    assert "own_weights" not in theirs.config and theirs.config["weights_file"].endswith(expected_file(spec))
    assert own.config_hash == theirs.config_hash  # one file's content is one run, wherever it lies


def test_weights_on_a_backbone_that_learns_nothing_are_not_silently_ignored(runner, tmp_path):
    cfg = RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=SMALL)
    with pytest.warns(UserWarning, match="reference is not learned .*: --weights random does not apply to it"):
        runner.resolve(dataclasses.replace(cfg, weights="random"))
    (tmp_path / "w.pth").write_bytes(b"x")
    with pytest.raises(UserError, match="reference is not learned: it has no weights to load"):
        runner.resolve(dataclasses.replace(cfg, weights=str(tmp_path / "w.pth")))


def test_random_weights_are_recorded(runner):
    rec = runner.run(RunConfig(backbone="dino-vits16", task="kmeans", dataset="synthetic", weights="random",
                               dataset_options=(("n", 4),))).record
    assert rec["random_weights"] and rec["weights"] == "random:0"
    assert rec["config"]["protocol"]["resize"] == 320


def test_weights_seed_splits_random_runs_only(runner):
    def hashes(backbone, **kw):
        return {runner.resolve(RunConfig(backbone=backbone, task="kmeans", dataset="synthetic", weights_seed=seed,
                                         dataset_options=(("n", 4),), **kw)).config_hash for seed in (0, 1)}

    assert len(hashes("dino-vits16", weights="random")) == 2
    assert len(hashes("reference")) == 1  # not learned: a sweep-wide weights_seed must not recompute it


def test_dinov2_uses_322_protocol(runner):
    rec = runner.run(RunConfig(backbone="dinov2-vits14", task="kmeans", dataset="synthetic", weights="random",
                               dataset_options=(("n", 2),))).record
    assert rec["config"]["protocol"]["resize"] == 322


@pytest.mark.parametrize("cfg, message", [
    (dict(backbone="dino-vit16"), "unknown backbone 'dino-vit16' -- did you mean dino-vits16"),
    (dict(task="k-means"), "unknown task 'k-means'"),
    (dict(dataset="camvid", dataset_options=()), "needs a data root"),
    (dict(params=(("nope", 1),)), "task 'kmeans' has no parameter"),
    (dict(k=0), "--k must be at least 1, got 0"),
    (dict(seed=-1), r"the seed must be 0 to 2\^63-1, got -1"),  # numpy's generators would raise mid-task
    (dict(weights_seed=-2), r"the weights seed must be 0 to 2\^63-1, got -2"),
    (dict(seed=2**63), r"the seed must be 0 to 2\^63-1, got 9223372036854775808"),  # the store keeps 64 bits
    (dict(dataset_options=(("n", 2.5),)), "option n=2.5 must be a whole number >= 0"),  # not a column "n=2.5"
    (dict(params=(("crf", "maybe"),)), "parameter crf='maybe' must be true or false"),  # not "truthy"
    (dict(params=(("iterations", 0),)), "iterations=0 -- k-means needs at least 1"),
    (dict(params=(("iterations", -5),)), "iterations=-5 -- k-means needs at least 1"),  # its range, not ">= 0"
    (dict(task="primaps-em", params=(("epochs", 1.0),)), "parameter epochs=1.0 must be a whole number"),
    (dict(task="primaps-em", params=(("max_steps", 2.0),)), "max_steps=2.0 is invalid"),  # null default: task checks
    (dict(dataset_options=(("n", 1),), k=5000), "K=5000 clusters need at least 5000 patches, but split 'val' "
                                                 r"\(1 images\) holds at most 1,600"),
    (dict(params=(("max_fit_patches", 3),)), "max_fit_patches=3 is fewer patches than K=5 clusters -- raise"),
    (dict(task="primaps-em", params=(("psi", 2),)), "psi=2 is invalid"),  # the task's validate hook
    (dict(backbone="reference", task="datus2-initial"), "cannot give 'key' features"),
])
def test_bad_input_is_one_clear_error(runner, cfg, message):
    base = dict(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=SMALL)
    with pytest.raises(UserError, match=message):
        runner.run(RunConfig(**{**base, **cfg}))


@pytest.mark.parametrize("task, params, k, message", [
    ("kmeans", (), 3200, "K=3201 clusters need at least 3201 patches, but split 'val' \\(2 images\\) holds at most 3,200"),
    ("primaps-em-fast", (), 3200, "3201 patches"),  # accepted 15 GB of K=5000 on 2 images before the shared check
    ("datus2-initial", (), 532, "K=533 clusters need at least 533 segments of more than 5 patches "
                                "\\(segmenter.tau=5\\), but"),  # the Louvain segmenter's bound, in a composed task
    ("datus2-initial", (("segmenter.tau", 0),), 3200, "holds at most 3,200 -- lower --k, use more images .* or "
                                                      "lower -p segmenter.tau"),
    ("segment-cluster", (("segmenter", "primaps"), ("segmenter.max_masks", 3)), 6,
     "K=7 clusters need at least 7 proposals, at most 3 per image \\(segmenter.max_masks=3\\)"),
    ("dsm", (("segmenter.feature", "patch"), ("segmenter.segments", 7)), 15,  # 2 x 7 segments + a background
     "K=16 clusters need at least 15 segments, at most 7 per image \\(segmenter.segments=7\\) \\(besides 1"),
    ("segment-cluster", (("segmenter", "acseg"),), 11, "K=12 clusters need at least 11 regions, at most 5 per "
                                                        "image \\(segmenter.prototypes=5\\)"),
])
def test_every_task_refuses_a_k_its_split_cannot_hold_before_any_work(runner, task, params, k, message):
    """Synthetic images give 40 x 40 = 1,600 patches each at /8; the bound is exact: K passes, K + 1 fails."""
    cfg = RunConfig(backbone="reference", task=task, dataset="synthetic", k=k, params=params,
                    dataset_options=(("n", 2),))
    assert runner.resolve(cfg).config["k"] == k
    with pytest.raises(UserError, match=message):
        runner.resolve(dataclasses.replace(cfg, k=k + 1))


def test_the_fit_split_bounds_k(runner, tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("val", 1)):  # 64 x 64 images: 40 x 40 patches of /8 at 320 pixels
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "masks" / split).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (64, 64)).save(tmp_path / "images" / split / f"{i}.png")
            Image.new("L", (64, 64)).save(tmp_path / "masks" / split / f"{i}.png")
    (tmp_path / "classes.txt").write_text("a\nb\n")
    cfg = RunConfig(backbone="reference", task="kmeans", dataset="folder", data_root=str(tmp_path), k=1601)
    with pytest.raises(UserError, match="split 'val' \\(1 images\\) holds at most 1,600"):
        runner.resolve(cfg)
    fit_train = dataclasses.replace(cfg, params=(("fit_split", "train"),))
    assert runner.resolve(dataclasses.replace(fit_train, k=4800)).config["k"] == 4800
    with pytest.raises(UserError, match="split 'train' \\(3 images\\) holds at most 4,800"):
        runner.resolve(dataclasses.replace(fit_train, k=4801))


def test_a_task_file_says_what_bounds_k_or_clusters_patches():
    from ssl_bench.kbounds import KBound

    datus2 = registry.task("datus2")
    assert datus2.k_bound_for(datus2.params) == KBound("segments", "segmenter.tau", "fit_split")  # its segmenter's
    dsm = datus2.resolve_params({"segmenter": "dsm"})
    # another segmenter, another bound: DSM's `segments` per image, unless adaptive (its background needs none)
    assert datus2.k_bound_for(dsm) == KBound("segments", 0, "fit_split", "segmenter.segments", 1, "segmenter.adaptive")
    bound = datus2.k_bound_for(dsm)
    assert bound.cap({**dsm, "segmenter.segments": 7}) == 7
    assert bound.cap({**dsm, "segmenter.segments": 7, "segmenter.adaptive": True}) is None  # the eigengap decides
    acseg, knn = registry.task("acseg"), registry.task("acseg-labelled-knn")
    assert acseg.k_bound_for(acseg.params).items == "regions"  # the generator's, 5 per image
    assert knn.k_bound_for(knn.params).items == "classes"  # a clusterer naming the classes: K = C, whatever the regions
    with pytest.raises(UserError, match="unless='adaptive' is not a parameter of the task"):
        KBound.parse({"items": "segments", "per_image": 3, "unless": "adaptive"}, {"tau": 5}, "x.yaml")
    assert registry.task("kmeans").k_bound == KBound("patches", 0, "fit_split")
    assert KBound.parse(None, {}, "x.yaml") == KBound("patches", 0, None)
    with pytest.raises(UserError, match="larger_than='size' must be a whole number >= 0 or one of the parameters"):
        KBound.parse({"items": "segments", "larger_than": "size"}, {"tau": 5}, "x.yaml")


def test_cli_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from ssl_bench.cli import main; main()", "run",
                           "--backbone", "nope", "--store", str(tmp_path / "s.sqlite")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown backbone 'nope'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_camvid_random_dino_end_to_end(runner, shared_dataset):
    root = shared_dataset("camvid")
    cfg = RunConfig(backbone="dino-vits16", weights="random", task="kmeans", dataset="camvid",
                    data_root=str(root), split="val")
    rec = runner.run(cfg).record
    assert rec["config"]["images"] == 101 and rec["random_weights"] and rec["k"] == 11
    assert 0 < rec["miou"] < 100
    assert not runner.run(cfg).computed


def test_devices_this_machine_lacks_are_one_line():
    import torch

    from ssl_bench.runner import Runner

    with pytest.raises(UserError, match="unknown device 'nonsense'"):
        Runner(None, None, "nonsense")
    with pytest.raises(UserError, match="computes on cpu, cuda or mps"):
        Runner(None, None, "meta")
    if not torch.backends.mps.is_available():  # torch accepts the name; the first tensor moved there failed
        with pytest.raises(UserError, match="no Apple GPU \\(MPS\\) on this machine -- use --device cpu"):
            Runner(None, None, "mps")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device on this machine"):
            Runner(None, None, "cuda")


def test_a_foreign_or_broken_file_is_not_used_as_the_store(tmp_path):
    import sqlite3

    from ssl_bench.store import ResultStore

    foreign = tmp_path / "app.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(UserError, match="not an ssl-bench results store"):
        ResultStore(foreign)
    with sqlite3.connect(foreign) as db:  # left as it was: no tables added, journal mode unchanged
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["users"]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="cannot use .*notes.txt as the results store"):
        ResultStore(tmp_path / "notes.txt")


def test_processes_opening_a_new_store_at_once_all_get_it(tmp_path):
    # two sweeps started together: switching the new file to WAL mode made SQLite answer "database is
    # locked" at once to the other process (about 1 open in 4 failed before opening was serialised)
    script = tmp_path / "race.py"
    script.write_text(f"""
import multiprocessing as mp, pathlib
from ssl_bench.store import ResultStore

def open_store(path, barrier):
    barrier.wait()
    ResultStore(path).stored_hashes()

if __name__ == "__main__":
    for trial in range(12):
        barrier = mp.Barrier(2)
        path = pathlib.Path({str(tmp_path)!r}) / f"s{{trial}}.sqlite"
        procs = [mp.Process(target=open_store, args=(path, barrier)) for _ in range(2)]
        [p.start() for p in procs]
        [p.join() for p in procs]
        assert all(p.exitcode == 0 for p in procs), f"trial {{trial}}: a process could not open the store"
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_label_of_another_size_than_its_image_is_refused(runner, tmp_path):
    from PIL import Image

    root = tmp_path / "pairs"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "images" / "1.png")
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(root / "masks" / "1.png")  # resized apart, it would "fit"
    with pytest.raises(UserError, match="the label is 50x40 but its image is 64x64"):
        runner.run(RunConfig(backbone="reference", task="kmeans", dataset="folder", data_root=str(root)))
