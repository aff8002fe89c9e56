"""What a sweep shows while it works: one overall bar, units and totals, the time estimate, warnings before
hours of work, and sweep files that mean the same wherever they are run from."""

from __future__ import annotations

import dataclasses

import pytest

from ssl_bench import registry
from ssl_bench.errors import UserError
from ssl_bench.executors import run_local
from ssl_bench.sweep import describe, grid_from_mapping, load_grid, make_plan, read_grid_file

TINY = {"name": "synthetic", "options": {"n": 4, "size": 64}}


class Recorder:
    """A progress callback that records every bar: description, total, unit, and how far it got."""

    def __init__(self):
        self.bars: list[dict] = []

    def __call__(self, iterable, desc="", total=None, unit="steps", step=None):
        bar = {"desc": desc, "total": total, "unit": unit, "done": 0}
        self.bars.append(bar)
        for item in iterable:
            yield item
            bar["done"] += step(item) if step else 1


def test_every_stage_counts_in_units_toward_a_known_total(runner):
    grid = grid_from_mapping({"backbones": [{"name": "dino-vits16", "weights": "random"}], "tasks": ["kmeans"],
                              "datasets": [TINY], "protocol": {"resize": 32}})
    progress = Recorder()
    run_local(make_plan(grid, runner), runner, progress)
    by_stage = {bar["desc"].split(" ")[0]: bar for bar in progress.bars}
    extract, labels, predictions = by_stage["extract"], by_stage["decode"], by_stage["kmeans"]
    assert (extract["unit"], extract["total"], extract["done"]) == ("images", 4, 4)  # not batches without a unit
    assert (labels["unit"], labels["total"], labels["done"]) == ("images", 4, 4)
    assert (predictions["unit"], predictions["total"], predictions["done"]) == ("images", 4, 4)  # not "4/?" streams


def test_the_display_keeps_one_overall_bar_and_the_running_stage_only():
    from rich.console import Console

    from ssl_bench.terminal import Display

    display = Display()
    display.bars_console = Console(record=True, width=100, force_terminal=False)
    with display.bars() as bars:
        advance = bars.overall(3, "sweep")
        for _ in bars.progress(range(5), desc="extract x", total=5, unit="images"):
            pass
        advance()
        shown = {task.description: task for task in bars._progress.tasks}
        assert list(shown) == ["[bold]sweep"]  # the finished stage's bar is gone: no stack of 24 bars
        assert shown["[bold]sweep"].completed == 1 and shown["[bold]sweep"].fields["unit"] == "cells"


def test_the_plan_estimates_the_time_from_stored_runs_and_cached_extractions(runner):
    from ssl_bench.estimate import estimate

    def plan_for(ks, n=4):
        data = dict(TINY, options={"n": n, "size": 64})
        return make_plan(grid_from_mapping({"backbones": ["reference"], "tasks": ["kmeans"], "datasets": [data],
                                            "k": ks, "protocol": {"resize": 32}}), runner)

    first = plan_for(["C"])
    unknown = estimate(first, runner.store.query(), runner.cache.root)
    assert unknown.text().startswith("estimated time: unknown")
    run_local(first, runner)
    later = plan_for(["2C", "3C"], n=6)  # other K, more images: a new extraction and two new cells
    found = estimate(later, runner.store.query(), runner.cache.root)
    stored = runner.store.query()[0]
    per_image = sum(stored["timings"][s] for s in ("labels", "task", "evaluate")) / 4
    timing = next(runner.cache.root.glob("reference/*/*/timing.json"))
    from ssl_bench.integrity import read_checked_json

    extraction = read_checked_json(timing)
    expected = 2 * per_image * 6 + extraction["seconds"] / extraction["images"] * 6
    assert (found.cells_priced, found.extractions_priced) == (2, 1)
    assert found.seconds == pytest.approx(expected)
    assert "2 cells from stored runs, 1 extraction from cached timings" in found.text()


def test_a_method_that_takes_hours_on_a_cpu_says_so_before_starting(runner):
    grid = grid_from_mapping({"backbones": [{"name": "dino-vits16", "weights": "random"}],
                              "tasks": ["datus2", "datus2-cpu"], "datasets": [TINY]})
    lines = describe(make_plan(grid, runner))
    warning = [line for line in lines if line.startswith("warning:")]
    assert warning == [f"warning: 1 cell(s) run {registry.task('datus2').cpu_note(registry.task('datus2').params)}"]
    assert "datus2-cpu" in warning[0] and "hours without a GPU" in warning[0]
    from ssl_bench.runner import RunConfig

    cfg = RunConfig(backbone="dino-vits16", weights="random", task="datus2", dataset="synthetic",
                    dataset_options=(("n", 4), ("size", 64)))
    runner.compute = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)  # stop where the work would start
    with pytest.warns(UserWarning, match="datus2 on a CPU: the paper-size de-noiser"), pytest.raises(KeyboardInterrupt):
        runner.run(cfg)


def test_sweep_file_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "sweeps"
    data = tmp_path / "project" / "data" / "site"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    (data / "classes.txt").write_text("a\nb\n")
    from PIL import Image

    Image.new("RGB", (16, 16)).save(data / "images" / "0.png")
    Image.new("L", (16, 16)).save(data / "masks" / "0.png")
    folder.mkdir()
    (folder / "grid.yaml").write_text("backbones: [reference]\ntasks: [kmeans]\n"
                                      "datasets: [{name: folder, data_root: ../data/site}]\n")
    monkeypatch.chdir(tmp_path)  # run from elsewhere: the file still means its own folder's ../data/site
    resolved: list = []
    read_grid_file(folder / "grid.yaml", resolved=resolved)
    assert resolved == [("../data/site", str(data.resolve()))]
    assert load_grid(folder / "grid.yaml").datasets[0].data_root == str(data.resolve())
    from typer.testing import CliRunner

    from ssl_bench.cli import app

    result = CliRunner().invoke(app, ["sweep", str(folder / "grid.yaml"), "--plan", "--store",
                                      str(tmp_path / "s.sqlite"), "--cache", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert f"../data/site is read from the file's folder: {data.resolve()}" in result.output


def test_weights_for_backbones_that_learn_nothing_are_not_silently_ignored():
    with pytest.warns(UserWarning, match="weights random apply to learned backbones only, and reference is not"):
        grid_from_mapping({"backbones": ["reference"], "tasks": ["kmeans"], "datasets": [TINY], "weights": "random"})


@pytest.mark.parametrize("subset", ["stride", "random"])
def test_a_limit_can_take_a_strided_or_seeded_random_subset(shared_dataset, subset):
    from ssl_bench.data import open_dataset

    root = shared_dataset("camvid")
    full = open_dataset("camvid", root, "val").ids
    first = open_dataset("camvid", root, "val", limit=5).ids
    chosen = open_dataset("camvid", root, "val", limit=5, subset=subset, subset_seed=1).ids
    assert first == full[:5] and len(chosen) == 5 and chosen != first and set(chosen) <= set(full)
    assert chosen == sorted(chosen, key=full.index)  # in split order
    if subset == "stride":
        assert chosen[0] == full[0] and chosen[-1] == full[-1]  # spread over the whole video
    else:
        assert open_dataset("camvid", root, "val", limit=5, subset="random", subset_seed=2).ids != chosen
    with pytest.raises(UserError, match="subset=stride chooses which images limit=N keeps -- add -o limit=N"):
        open_dataset("camvid", root, "val", subset="stride")


def test_subset_options_that_change_nothing_keep_one_run(runner):
    from ssl_bench.runner import RunConfig

    base = RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=(("n", 4),))
    plain = runner.resolve(dataclasses.replace(base, dataset_options=(("limit", 3), ("n", 4))))
    explicit = runner.resolve(dataclasses.replace(base, dataset_options=(("limit", 3), ("n", 4), ("subset", "first"),
                                                                         ("subset_seed", 0))))
    assert plain.config_hash == explicit.config_hash
    whole = runner.resolve(dataclasses.replace(base, dataset_options=(("limit", 10), ("n", 4))))
    assert whole.config_hash == runner.resolve(base).config_hash  # a limit that cuts nothing is no limit


def test_a_training_stage_has_one_bar_over_all_its_epochs():
    """PriMaPs drew a bar per epoch: its time left was one epoch's, never the training's."""
    import numpy as np

    from ssl_bench.methods.primaps_em import PrimapsEM

    rng = np.random.default_rng(0)
    features = [rng.standard_normal((3, 3, 8)).astype(np.float32) for _ in range(10)]
    proposals = [rng.integers(-1, 3, (3, 3)) for _ in range(10)]
    progress = Recorder()
    PrimapsEM(3, pretrain_epochs=2, epochs=3, batch_size=4, augment=False, progress=progress).fit(features, proposals)
    assert [(b["desc"], b["total"], b["done"], b["unit"]) for b in progress.bars] == [
        ("PriMaPs k-means (2 epochs)", 4, 4, "batches"), ("PriMaPs-EM (3 epochs)", 6, 6, "batches")]
    capped = Recorder()
    model = PrimapsEM(3, 0, epochs=3, max_steps=5, batch_size=4, augment=False, progress=capped)
    assert model.fit(features, proposals).steps == 5 and capped.bars[-1]["total"] == capped.bars[-1]["done"] == 5
