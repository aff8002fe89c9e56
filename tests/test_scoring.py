"""The protocol's scoring rules (``overclustering``, ``absent_classes``): stored with every result, part of its
hash but not of the caches' keys, settable from run / sweep, named in every table, and never mixed with rows
scored before the rules existed. (The rules themselves are pinned on hand-made counts in test_metrics.py.)"""

import dataclasses
import io

import pandas as pd
import pytest
from typer.testing import CliRunner

from ssl_bench import report
from ssl_bench.cli import app
from ssl_bench.data.protocol import SCORING_FIELDS, Protocol
from ssl_bench.errors import UserError
from ssl_bench.runner import RunConfig, run_hash
from ssl_bench.sweep import describe, grid_from_mapping, make_plan

TINY = (("n", 4),)
DEFAULT_RULES = {"overclustering": "majority", "absent_classes": "zero-if-predicted"}


def cell(**protocol) -> RunConfig:
    return RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=TINY,
                     protocol=Protocol(**protocol))


def test_the_rules_are_in_the_config_and_hash_but_not_in_the_cache_keys(runner):
    default, ignore = runner.resolve(cell()), runner.resolve(cell(absent_classes="ignore"))
    assert {k: default.config["protocol"][k] for k in SCORING_FIELDS} == DEFAULT_RULES
    assert ignore.config["protocol"]["absent_classes"] == "ignore" and default.config_hash != ignore.config_hash
    key = runner.cache.key  # the same features and labels serve both: the rules change numbers, not inputs
    assert key("reference", "none", default.dataset, default.protocol) == key("reference", "none", ignore.dataset,
                                                                                 ignore.protocol)


def test_a_run_is_scored_by_its_rules(runner):
    record = runner.run(dataclasses.replace(cell(overclustering="hungarian-majority"), k=10)).record
    assert record["metrics"]["final@val"]["matching"] == "hungarian-majority"  # majority: see test_runner
    with pytest.warns(UserWarning, match="stego-drop ignored"):
        dropped = runner.run(dataclasses.replace(cell(overclustering="stego-drop"), k=10)).record
    assert dropped["metrics"]["final@val"]["ignored_pixels"] > 0
    assert len(list(runner.cache.root.glob("reference/synthetic-val/*/meta.json"))) == 1  # one extraction for all


def test_sweep_files_and_flags_set_the_rules(tmp_path):
    mapping = {"backbones": ["reference"], "tasks": ["kmeans"], "datasets": [{"name": "synthetic", "options": {"n": 4}}]}
    grid = grid_from_mapping({**mapping, "protocol": {"overclustering": "hungarian-majority", "absent_classes": "ignore"}})
    assert (grid.protocol.overclustering, grid.protocol.absent_classes) == ("hungarian-majority", "ignore")
    with pytest.raises(UserError, match="unknown absent_classes rule 'skip' -- choose one of: zero-if-predicted, ignore"):
        grid_from_mapping({**mapping, "protocol": {"absent_classes": "skip"}})
    (tmp_path / "grid.yaml").write_text(
        "backbones: [reference]\ntasks: [kmeans]\ndatasets: [{name: synthetic, options: {n: 4}}]\nk: [2C]\n"
        "protocol: {crop: center, overclustering: stego-drop}\n")
    where = ["--store", str(tmp_path / "s.sqlite"), "--cache", str(tmp_path / "cache")]
    swept = CliRunner().invoke(app, ["sweep", str(tmp_path / "grid.yaml"), "--overclustering", "hungarian-majority",
                                     "--absent-classes", "ignore", *where])
    run = CliRunner().invoke(app, ["run", "--dataset", "synthetic", "-o", "n=4", "--k", "2C",
                                   "--overclustering", "hungarian-majority", *where])
    assert swept.exit_code == 0 and run.exit_code == 0, swept.output + run.output
    from ssl_bench.store import ResultStore

    protocols = sorted((r["config"]["protocol"]["overclustering"], r["config"]["protocol"]["absent_classes"],
                        r["config"]["protocol"]["crop"]) for r in ResultStore(tmp_path / "s.sqlite").query())
    assert protocols == [("hungarian-majority", "ignore", "center"), ("hungarian-majority", "zero-if-predicted", "center")]
    bad = CliRunner().invoke(app, ["run", "--overclustering", "hungarian-first", *where])
    assert isinstance(bad.exception, UserError) and "unknown overclustering rule 'hungarian-first'" in str(bad.exception)


def _store_as_before_the_rules(runner, run) -> None:
    """Store ``run``'s cell as ssl-bench did before the protocol named its scoring rules."""
    computed = runner.compute(run)
    protocol = {k: v for k, v in run.config["protocol"].items() if k not in SCORING_FIELDS}
    config = {**run.config, "protocol": protocol}
    runner.store.put(dataclasses.replace(computed.record, config=config, config_hash=run_hash(config)))


def test_cells_stored_before_the_rules_are_computed_again_and_said_so(runner, tmp_path):
    grid = grid_from_mapping({"backbones": ["reference"], "tasks": ["kmeans"],
                              "datasets": [{"name": "synthetic", "options": {"n": 4}}], "seeds": [0, 1]})
    plan = make_plan(grid, runner)
    _store_as_before_the_rules(runner, plan.cells[0].run)
    lines = describe(make_plan(grid, runner))
    assert lines[0] == "cells: 2 in the grid, 0 already stored, 2 to compute"
    assert lines[1].startswith("  1 of them stored before the protocol named its scoring rules")
    where = ["--store", str(runner.store.path), "--cache", str(runner.cache.root)]
    now = CliRunner().invoke(app, ["run", "--dataset", "synthetic", "-o", "n=4", *where])
    assert now.exit_code == 0 and "(computed)" in now.output
    assert "stored before the protocol named its scoring rules" in now.output


def fake(miou: float, protocol: dict | None, backbone: str = "reference") -> dict:
    """A FABRICATED store row (the fields reports read) with the given stored protocol."""
    config = {"backbone": backbone, "task": "kmeans", "dataset": "synthetic", "split": "val", "k": 5, "seed": 0,
              "num_classes": 5, "params": {}, "dataset_options": {}, "random_weights": False, "weights": "none",
              "protocol": protocol, "task_version": 3}
    return {"config_hash": f"{backbone}-{miou}-{protocol}", "backbone": backbone, "weights": "none",
            "random_weights": False, "task": "kmeans", "dataset": "synthetic", "split": "val", "k": 5, "seed": 0,
            "miou": miou, "acc": 70.0, "f1": 60.0, "config": config, "stats": {}, "timings": {}, "environment": {},
            "metrics": {"final@val": {"miou": miou, "acc": 70.0, "f1": 60.0, "labelled_fraction": 1.0}}}


def test_tables_name_the_rules_and_keep_rows_of_other_rules_apart():
    now = Protocol().as_dict()
    before = Protocol().input_dict()  # a row stored before the rules: scored with absent classes left out
    table = report.leaderboard([fake(40.0, now), fake(60.0, before)])
    assert table.title.endswith("scoring: overclustering=majority, absent_classes=zero-if-predicted unless its column "
                                "names another rule")
    groups = [c.group for c in table.columns if c.numeric]
    assert groups[0] == "synthetic" and groups[-1] == "synthetic (absent_classes=ignore)"  # two columns, not a mean
    csv = pd.read_csv(io.StringIO(report.to_csv(table)))
    assert csv.loc[0, "absent_classes"] == "zero-if-predicted / ignore" and csv.loc[0, "overclustering"] == "majority"
    same = report.leaderboard([fake(40.0, now), fake(45.0, now, "dino-vits16")])
    assert same.title.endswith("; scoring: overclustering=majority, absent_classes=zero-if-predicted")
    stego = report.leaderboard([fake(40.0, {**now, "overclustering": "stego-drop"})])
    assert stego.title.endswith("scoring: overclustering=stego-drop, absent_classes=zero-if-predicted")
    assert any("not scored" in note for note in stego.notes) and "stego-drop" in report.to_markdown(stego)


def test_panels_show_dropped_clusters_as_unlabelled():
    import numpy as np

    from ssl_bench.samples import map_clusters

    assert map_clusters(np.array([[0, 1, 2, -1]]), [1, 0, -2]).tolist() == [[1, 0, -1, -1]]
