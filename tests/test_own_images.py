"""Own images, own outputs: a folder of photos without masks is a dataset (statistics of the predictions, no
metrics), and ``--save-predictions`` writes each image's prediction as an indexed PNG whose ids are the stored
prediction (cluster ids there; class ids after the run's matching where ground truth exists) plus an overlay."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ssl_bench import samples
from ssl_bench.cli import app
from ssl_bench.data import open_dataset
from ssl_bench.data.camvid import CamVid
from ssl_bench.predictions import OVERLAY_ALPHA, read_ids
from ssl_bench.store import ResultStore

CAMVID_FRAMES = 3


@pytest.fixture
def photos(shared_dataset, tmp_path):
    """Three CamVid frames as a user's folder of photos: no masks, no lists, one in a sub-folder."""
    frames = sorted((shared_dataset("camvid") / "val").glob("*.png"))[:CAMVID_FRAMES]
    folder = tmp_path / "photos"
    for i, frame in enumerate(frames):
        target = folder / ("street" if i == 0 else "") / frame.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(frame, target)
        except OSError:  # a file system without links
            shutil.copy(frame, target)
    return folder


def _cli(tmp_path, *args):
    cache = ["--cache", str(tmp_path / "cache")] if args[0] in ("run", "sweep") else []
    result = CliRunner().invoke(app, [*args, "--store", str(tmp_path / "results.sqlite"), *cache],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _run_folder(out, row):
    (folder,) = [p for p in out.iterdir() if p.name.endswith(row["config_hash"])]
    return folder


def _check_files_equal_the_stored_prediction(folder, store_path, row, ids):
    """One indexed PNG per image, ids equal to the run's stored prediction (its samples: every image of a
    run of at most ``SAMPLES_PER_RUN``), and an overlay painting those ids' colours over the image."""
    info = json.loads((folder / "run.json").read_text())
    colours = np.array(info["colours"], dtype=np.float32)
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == len(ids) == info["images"]
    kept = samples.load(store_path, row["config_hash"])
    assert sorted(kept.indices) == list(range(len(ids)))  # every image's prediction is stored
    for index, stored, image in zip(kept.indices, kept.predictions, kept.images):
        png = folder / f"{ids[index].replace('/', '_')}.png"
        with Image.open(png) as written:
            assert written.mode == "P"  # indexed: a viewer shows colours, a script reads the ids
        found = read_ids(png)
        np.testing.assert_array_equal(found, stored)
        overlay = np.asarray(Image.open(folder / "overlay" / f"{png.stem}.jpg"), dtype=np.float32)
        painted = np.where((found >= 0)[..., None], (1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colours[found], image)
        assert overlay.shape == image.shape and np.abs(overlay - painted).mean() < 4  # JPEG's loss only
    return info


def test_a_folder_of_photos_without_masks_is_segmented_and_saved(photos, tmp_path):
    out = tmp_path / "segmented"
    said = _cli(tmp_path, "run", "--dataset", "images", "--data-root", str(photos), "--k", "4",
                "--save-predictions", str(out))
    assert said.count("no ground truth, so no metrics") == 1
    (row,) = ResultStore(tmp_path / "results.sqlite").query()
    assert row["miou"] is None and row["metrics"] == {} and row["config"]["num_classes"] == 0
    stats = row["stats"]["predictions"]  # what the predictions look like, instead of scores
    assert stats["images"] == CAMVID_FRAMES and 1 <= stats["clusters_used"] <= 4
    assert sum(stats["pixel_percent"]) + stats["unlabelled_percent"] == pytest.approx(100, abs=0.01)
    assert len(stats["image_percent"]) == 4 and 1 <= stats["clusters_per_image"] <= 4

    ids = open_dataset("images", str(photos), None).ids
    assert ids[-1].startswith("street/")  # sub-folders are part of the id
    info = _check_files_equal_the_stored_prediction(_run_folder(out, row), tmp_path / "results.sqlite", row, ids)
    assert info["ids"] == "clusters" and info["names"] == [f"cluster {i}" for i in range(4)]
    assert max(read_ids(p).max() for p in _run_folder(out, row).glob("*.png")) < 4

    shown = _cli(tmp_path, "show", row["config_hash"][:12])  # these printed a TypeError on a run without scores
    assert "headline: no ground truth, so no metrics" in shown and "clusters_per_image" in shown
    listed = _cli(tmp_path, "runs")
    assert row["config_hash"][:12] in listed and "images:all" in listed
    reported = _cli(tmp_path, "report", "--format", "markdown", "--table", "predictions")
    assert "Predictions of runs without ground truth" in reported  # a table, not only `show`
    assert f"{stats['clusters_used']}.0" in reported and f"{stats['clusters_per_image']:.1f}" in reported


def test_a_folder_of_photos_needs_k(photos, tmp_path):
    result = CliRunner().invoke(app, ["run", "--dataset", "images", "--data-root", str(photos),
                                      "--store", str(tmp_path / "r.sqlite"), "--cache", str(tmp_path / "cache")])
    assert result.exit_code != 0 and "no ground truth, so no class count to set K from -- give K" in str(result.exception)


def test_with_ground_truth_the_files_hold_class_ids_after_the_matching(shared_dataset, tmp_path):
    camvid = shared_dataset("camvid")
    out = tmp_path / "predicted"
    _cli(tmp_path, "sweep", "--backbone", "reference", "--task", "kmeans", "--dataset", "camvid", "--data-root",
         str(camvid), "-o", f"limit={CAMVID_FRAMES}", "--k", "C", "--k", "2C", "--save-predictions", str(out))
    rows = ResultStore(tmp_path / "results.sqlite").query()
    assert sorted(r["k"] for r in rows) == [11, 22]
    ids = open_dataset("camvid", str(camvid), "val", limit=CAMVID_FRAMES).ids
    for row in rows:
        info = _check_files_equal_the_stored_prediction(_run_folder(out, row), tmp_path / "results.sqlite", row, ids)
        assert info["ids"] == "classes" and info["names"] == list(CamVid.class_names)
        written = np.concatenate([read_ids(p).ravel() for p in _run_folder(out, row).glob("*.png")])
        assert written.max() < 11  # class ids, not the 22 cluster ids
        matching = row["metrics"]["final@val"]["cluster_to_class"]
        assert set(np.unique(written)) - {-1} <= {c for c in matching if c >= 0}

    # stored already, but their files are asked for elsewhere: computed again for them, each row kept once
    again = tmp_path / "again"
    _cli(tmp_path, "sweep", "--backbone", "reference", "--task", "kmeans", "--dataset", "camvid", "--data-root",
         str(camvid), "-o", f"limit={CAMVID_FRAMES}", "--k", "C", "--k", "2C", "--save-predictions", str(again))
    for row in rows:
        assert len(list(_run_folder(again, row).glob("*.png"))) == CAMVID_FRAMES
    assert len(ResultStore(tmp_path / "results.sqlite").query()) == 2
