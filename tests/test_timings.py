"""Where a run's time goes (issue 22.5): the runner's stages and a task's own (``ctx.timed``) are stored with
every result and drawn as one stacked bar per run in the report."""

import pytest

from ssl_bench.report import figures, html_report, write_all
from ssl_bench.runner import RunConfig


def test_a_tasks_own_stages_are_stored_and_drawn(runner, tmp_path):
    kmeans = runner.run(RunConfig(backbone="reference", task="kmeans", dataset="synthetic",
                                  dataset_options=(("n", 4),))).record
    composed = runner.run(RunConfig(backbone="reference", task="segment-cluster", dataset="synthetic",
                                    dataset_options=(("n", 4),), params=(("segmenter", "image-kmeans"),))).record
    assert set(kmeans["stats"]["stage_seconds"]) == {"fit"}
    assert {"segment", "embed", "cluster"} <= set(composed["stats"]["stage_seconds"])
    bars = figures.timing_bars([kmeans, composed])
    parts = next(p for label, p in bars.items() if "segment-cluster" in label)
    assert list(parts)[:3] == ["features", "labels", "task: segment"] and list(parts)[-1] == "evaluate"
    assert sum(parts.values()) == pytest.approx(sum(composed["timings"].values()), rel=1e-6)  # parts of the whole
    written = write_all(runner.store.query(), runner.store.path, tmp_path / "report")
    assert tmp_path / "report" / "timings.png" in written
    assert "Where each run&#x27;s time goes" in html_report(runner.store.query(), runner.store.path) or \
        "Where each run's time goes" in html_report(runner.store.query(), runner.store.path)
