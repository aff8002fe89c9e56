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
    assert set(kmeans["stats"]["stage_seconds"]) == {"fit", "predict"}
    assert {"segment", "embed", "cluster"} <= set(composed["stats"]["stage_seconds"])
    bars = figures.timing_bars([kmeans, composed])
    parts = next(p for label, p in bars.items() if "segment-cluster" in label)
    assert list(parts)[:3] == ["features", "labels", "task: segment"] and list(parts)[-1] == "evaluate"
    assert sum(parts.values()) == pytest.approx(sum(composed["timings"].values()), rel=1e-6)  # parts of the whole
    written = write_all(runner.store.query(), runner.store.path, tmp_path / "report")
    assert tmp_path / "report" / "timings.png" in written
    assert "Where each run&#x27;s time goes" in html_report(runner.store.query(), runner.store.path) or \
        "Where each run's time goes" in html_report(runner.store.query(), runner.store.path)


def test_a_streamed_crf_is_timed_as_the_tasks_crf_stage_and_shown_in_the_table(runner, monkeypatch):
    from ssl_bench.report import build_tables

    monkeypatch.setenv("SSL_BENCH_CRF_WORKERS", "1")  # in this process: quick, and the same time accounting
    record = runner.run(RunConfig(backbone="reference", task="kmeans-crf", dataset="synthetic",
                                  dataset_options=(("n", 3),))).record
    own = record["stats"]["stage_seconds"]
    assert set(own) == {"fit", "predict", "crf"} and own["crf"] > 0
    assert sum(own.values()) <= record["timings"]["task"]  # each counted once, inside the task's time
    row = [c.text() for c in build_tables([record])["timings"].rows[0]]
    own_stages = row[-2]  # then the kept values read: none here
    assert own_stages.startswith("fit ") and own_stages.index(", predict ") < own_stages.index("crf") and row[-1] == "-"


def test_a_stream_is_timed_by_its_waits_and_a_stage_inside_it_for_itself():
    import time

    from ssl_bench.runner import TaskContext

    ctx = object.__new__(TaskContext)  # only its timing state: no run behind it
    ctx.stage_seconds, ctx._open_stages = {}, []

    def jobs():
        for _ in range(3):
            with ctx.timed("predict"):
                time.sleep(0.05)
            yield

    def stream():  # a pool's map: pulls a job, then waits for its labels
        for _ in jobs():
            time.sleep(0.1)
            yield

    for _ in ctx.timed_stream("crf", stream()):
        time.sleep(0.2)  # the runner scoring the labels: neither stage
    assert ctx.stage_seconds["predict"] == pytest.approx(0.15, abs=0.04)
    assert ctx.stage_seconds["crf"] == pytest.approx(0.3, abs=0.06)


def test_a_bar_of_several_runs_says_it_is_their_mean():
    from test_report import fake_record

    def record(seed, fit):
        return fake_record(task="kmeans", seed=seed, stats={"stage_seconds": {"fit": fit}},
                           timings={"features": 1.0, "labels": 0.0, "task": 3.0, "evaluate": 0.5})

    bars = figures.timing_bars([record(0, 1.0), record(1, 2.0)])
    (label, parts), = bars.items()
    assert label.endswith("K=5 (mean of 2 runs)") and parts["task: fit"] == 1.5
    (label, _), = figures.timing_bars([record(0, 1.0)]).items()
    assert label.endswith("K=5")


def test_bars_keep_pipeline_order_whatever_run_comes_first():
    from test_report import fake_record

    def record(task, own):
        return fake_record(task=task, stats={"stage_seconds": own},
                           timings={"features": 1.0, "labels": 0.1, "task": 3.0, "evaluate": 0.5})

    bars = figures.timing_bars([record("datus2-initial", {"segment": 1.0, "embed": 0.5}),
                                record("kmeans", {"fit": 1.0, "crf": 0.5})])
    legend = [text.get_text() for text in figures.timings_figure(bars).legends[0].get_texts()]  # drawn in this order
    assert legend == ["features", "labels", "task: segment", "task: embed", "task: fit", "task: crf", "task, other",
                     "evaluate"]
    for parts in bars.values():
        assert list(parts) == sorted(parts, key=figures.stage_rank)
