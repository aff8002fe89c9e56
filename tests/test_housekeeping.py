"""The housekeeping a user expects: ssl-bench runs / show / cache, --version, -q / -v, --log-file, readable help."""

from __future__ import annotations

import os
import re
import time

from typer.testing import CliRunner

from ssl_bench.cli import app
from ssl_bench.store import ResultStore


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def run_cell(tmp_path, *extra: str):
    """One small real cell through the CLI (reference backbone, 4 synthetic images at 64 px)."""
    result = invoke("run", "--dataset", "synthetic", "-o", "n=4", "--resize", "64", "--store", tmp_path / "s.sqlite",
                    "--cache", tmp_path / "cache", *extra)
    assert result.exit_code == 0, result.output
    return re.search(r"run ([0-9a-f]{20}) in", result.output).group(1)


def test_runs_lists_filters_and_deletes_with_their_samples(tmp_path):
    first = run_cell(tmp_path)
    second = run_cell(tmp_path, "--k", "7")
    store = ["--store", tmp_path / "s.sqlite"]
    listing = invoke("runs", *store)
    assert listing.exit_code == 0 and first[:12] in listing.output and second[:12] in listing.output
    assert "2 run(s) in" in listing.output
    only = invoke("runs", "--k", "7", *store)
    assert second[:12] in only.output and first[:12] not in only.output and "1 run(s) matching" in only.output
    assert invoke("runs", "--k", "C", *store).output.count("reference") == 1  # C = each run's classes (5)
    refused = invoke("runs", "--delete", "--yes", *store)
    assert refused.exit_code != 0 and "would delete every run" in str(refused.exception)
    assert first[:12] not in refused.output  # refused before listing every run of the store
    unconfirmed = invoke("runs", "--k", "7", "--delete", *store)  # nobody at a terminal to say yes
    assert unconfirmed.exit_code != 0 and "add --yes" in str(unconfirmed.exception)
    samples = tmp_path / "samples" / f"{second}.npz"
    assert samples.exists()
    deleted = invoke("runs", "--k", "7", "--delete", "--yes", *store)
    assert deleted.exit_code == 0 and "deleted 1 run(s)" in deleted.output
    assert [r["config_hash"] for r in ResultStore(tmp_path / "s.sqlite").query()] == [first]
    assert not samples.exists()


def test_show_prints_the_whole_configuration_weights_file_included(tmp_path):
    import torch

    from ssl_bench import registry
    from ssl_bench.models import build_backbone, resolve

    spec = registry.backbone("dino-vits16")
    checkpoint = tmp_path / "my-ssl-run.pth"
    torch.save(build_backbone(spec, resolve(spec, "random"), 3).model.state_dict(), checkpoint)
    run = run_cell(tmp_path, "--backbone", "dino-vits16", "--weights", checkpoint)
    shown = invoke("show", run[:8], "--store", tmp_path / "s.sqlite")
    assert shown.exit_code == 0, shown.output
    text = shown.output
    assert f"run: {run}" in text and "backbone: dino-vits16" in text and "headline: mIoU" in text
    assert f"weights_file: {checkpoint.resolve()}" in text and "the user's own checkpoint" in text
    for section in ("config:", "scores:", "timings (s):", "environment:"):
        assert section in text
    report = invoke("report", "--store", tmp_path / "s.sqlite")
    assert "dino-vits16 [my-ssl-run.pth " in report.output and "own checkpoint" in report.output
    assert "ImageNet-1k" not in report.output
    missing = invoke("show", "ffff", "--store", tmp_path / "s.sqlite")
    assert missing.exit_code != 0 and "no stored run has a hash starting with ffff" in str(missing.exception)


def test_cache_sizes_and_prune_keep_what_stored_runs_need(tmp_path):
    kept = run_cell(tmp_path)
    gone = run_cell(tmp_path, "--backbone", "reference-p16")  # its own features entry (and labels of /16)
    store = ["--store", tmp_path / "s.sqlite", "--cache", tmp_path / "cache"]
    stale = tmp_path / "cache" / "reference" / "left.tmp.npy"
    stale.write_bytes(b"0" * 10)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    listing = invoke("cache", *store)
    assert listing.exit_code == 0, listing.output
    assert listing.output.count("1 run(s)") == 4 and "0 needed by no run" in listing.output
    assert "1 stale temporary file(s)" in listing.output
    assert invoke("runs", "--hash", gone, "--delete", "--yes", "--store", tmp_path / "s.sqlite").exit_code == 0
    pruned = invoke("cache", "--prune", *store)
    assert pruned.exit_code == 0 and "deleted 2 entries" in pruned.output and "1 temporary file(s)" in pruned.output
    assert not list((tmp_path / "cache").glob("reference-p16/*/*")) and not stale.exists()
    assert list((tmp_path / "cache").glob("reference/*/*/patch.npy"))  # the stored run's features stay
    again = run_cell(tmp_path)  # ... and are read, not extracted again
    assert again == kept


def test_a_heads_training_views_count_as_needed_and_survive_a_prune(tmp_path):
    # STEGO reads five-crop training views (features and labels) beside the evaluated split's: four entries
    run_cell(tmp_path, "--task", "stego", "-p", "cpu_steps=1", "-p", "crf=false", "-p", "train_resize=64")
    store = ["--store", tmp_path / "s.sqlite", "--cache", tmp_path / "cache"]
    [record] = ResultStore(tmp_path / "s.sqlite").query()
    assert len(record["stats"]["cache_entries"]) == 4
    listing = invoke("cache", *store)
    assert listing.output.count("1 run(s)") == 4 and "0 needed by no run" in listing.output, listing.output
    assert listing.output.count("(five crops)") == 2
    assert "deleted 0 entries" in invoke("cache", "--prune", *store).output
    assert len(list((tmp_path / "cache").glob("*/*/*"))) == 4


def test_a_run_on_fewer_images_says_so_wherever_it_is_named(tmp_path):
    from ssl_bench.data import subset_text

    assert subset_text({"dataset": "camvid", "dataset_options": {"limit": 4}}) == " [limit=4]"
    assert subset_text({"dataset": "camvid", "dataset_options": {"limit": 4, "subset": "stride"}}) == \
        " [limit=4, subset=stride]"
    assert subset_text({"dataset": "synthetic", "dataset_options": {"n": 4, "size": 64}}) == " [n=4]"
    assert subset_text({"dataset": "camvid", "dataset_options": {"subset": "first"}}) == ""  # the default: all
    result = invoke("run", "--dataset", "synthetic", "-o", "n=4", "--resize", "64", "--store", tmp_path / "s.sqlite",
                    "--cache", tmp_path / "cache")
    assert "synthetic:val [n=4] K=" in result.output, result.output
    assert "synthetic:val [n=4]" in invoke("runs", "--store", tmp_path / "s.sqlite").output


def test_version_quiet_verbose_and_log_file(tmp_path):
    from ssl_bench import __version__

    assert invoke("--version").output.strip() == f"ssl-bench {__version__}"
    grid = ["sweep", "-b", "reference", "-t", "kmeans", "-d", "synthetic", "-o", "n=3", "-o", "size=64",
            "--store", tmp_path / "s.sqlite", "--cache", tmp_path / "c"]
    quiet = invoke("-q", *grid)
    assert quiet.exit_code == 0, quiet.output
    assert "cells:" not in quiet.output and "computed  reference" not in quiet.output  # plan, per-cell lines
    assert "computed 1 cell," in quiet.output  # the summary stays
    log = tmp_path / "logs" / "ssl-bench.log"
    bad = ["sweep", "-b", "reference", "-t", "kmeans", "-d", "synthetic", "-o", "n=3", "-o", "size=64", "--k", "4",
           "--store", tmp_path / "s.sqlite", "--cache", tmp_path / "c"]
    from ssl_bench.methods import kmeans

    original = kmeans.fit_centroids
    kmeans.fit_centroids = lambda *a, **k: (_ for _ in ()).throw(ValueError("the fit broke"))
    try:
        verbose = invoke("-v", "--log-file", log, *bad)
    finally:
        kmeans.fit_centroids = original
    assert verbose.exit_code == 1
    assert "Traceback (most recent call last)" in verbose.output and "the fit broke" in verbose.output
    written = log.read_text()
    assert "=== ssl-bench" in written and "cells: 1 in the grid" in written and "FAILED" in written
    assert "Traceback" in written and "\x1b[" not in written  # the details, without colour codes
    assert invoke("-q", "-v", "runs").exit_code != 0


def test_help_shows_switches_without_a_value():
    text = invoke("run", "--help").output
    assert re.search(r"--force\s+recompute", text) and "<bool>" not in text and "<list[" not in text
    assert "--param" in text and "<str> ..." in text


def test_an_extra_that_is_not_installed_is_one_line_naming_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as without the extra: import ray raises ImportError
    result = invoke("sweep", "-b", "reference", "-t", "kmeans", "-d", "synthetic", "-o", "n=2", "--executor", "ray",
                    "--store", tmp_path / "s.sqlite", "--cache", tmp_path / "c")
    assert result.exit_code != 0 and "--executor ray needs Ray -- pip install 'ssl-bench[ray]'" in str(result.exception)
