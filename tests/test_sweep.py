"""Sweeps: grid parsing, the plan, shared extraction, resuming after kill -9, concurrent sweeps, Ray."""

import dataclasses
import inspect
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ssl_bench import registry
from ssl_bench.errors import UserError
from ssl_bench.executors import run_local
from ssl_bench.sweep import grid_from_mapping, load_grid, make_plan, resolve_k

ROOT = Path(__file__).resolve().parents[1]
TINY = {"name": "synthetic", "options": {"n": 4}}


def grid(**axes):
    return grid_from_mapping({"backbones": ["reference"], "tasks": ["kmeans"], "datasets": [TINY], **axes})


def sweep_cli(*args, store: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "ssl_bench", "sweep", *args, "--store", str(store), "--cache", str(cache)]


def stored_rows(store: Path) -> list[tuple]:
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=60) as db:
            return db.execute("SELECT config_hash, miou, acc, f1 FROM runs ORDER BY config_hash").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []


@pytest.mark.parametrize("k, classes, expected", [("C", 5, 5), ("2C", 5, 10), ("3*C", 11, 33), (7, 5, 7), ("12", 5, 12)])
def test_k_values_are_numbers_or_multiples_of_classes(k, classes, expected):
    assert resolve_k(k, classes) == expected


@pytest.mark.parametrize("data, message", [
    ({"k": ["C", "half"]}, "K value 'half' is not a number or a multiple of C"),
    ({"k": [0]}, "K must be at least 1"),
    ({"backbones": ["dino-vit16"]}, "unknown backbone 'dino-vit16' -- did you mean dino-vits16"),
    ({"tasks": [{"name": "kmeans", "params": {"nope": 1}}]}, "task 'kmeans' has no parameter"),
    ({"kseeds": [1]}, "unknown key\\(s\\) kseeds"),
    ({"seeds": []}, "the sweep grid has an empty 'seeds' list"),
    ({"k": []}, "the sweep grid has an empty 'k' list"),
    ({"seeds": [0, -1]}, r"seeds must be whole numbers from 0 to 2\^63-1"),
    ({"seeds": [0, 2**63]}, r"seeds must be whole numbers from 0 to 2\^63-1, got \[0, 9223372036854775808\]"),
    ({"protocol": {"crop": "corner"}}, "unknown protocol crop"),
])
def test_bad_grids_fail_before_running_with_one_clear_error(data, message):
    with pytest.raises(UserError, match=message):
        grid(**data)


def test_example_grid_file_parses(tmp_path):
    example = load_grid(ROOT / "examples" / "sweep.yaml")
    assert len(example.backbones) == 2 and example.ks == ["C", "2C", "3C"] and example.seeds == [0, 1]
    with pytest.raises(UserError, match="not valid YAML"):
        (tmp_path / "bad.yaml").write_text("backbones: [a\n")
        load_grid(tmp_path / "bad.yaml")


def test_plan_counts_cells_dedups_k_and_shares_one_extraction(runner):
    plan = make_plan(grid(k=["C", 5, "2C"], seeds=[0, 1]), runner)  # C = 5 on synthetic: one cell, not two
    assert len(plan.cells) == 4 and len(plan.todo) == 4
    assert len(plan.extractions_needed) == 1 and len(plan.extractions[0].cells) == 4

    summary = run_local(plan, runner)
    assert (summary.computed, summary.extractions, summary.failed) == (4, 1, [])
    again = make_plan(grid(k=["C", "2C", "3C"], seeds=[0, 1]), runner)
    assert (len(again.cells), len(again.stored), len(again.todo)) == (6, 4, 2)
    assert again.extractions_needed == []  # the cached features serve the new K
    assert run_local(again, runner).extractions == 0 and len(runner.store.query()) == 6


def test_an_extraction_another_sweep_did_is_not_counted_as_ours(runner):
    plan = make_plan(grid(k=["C"], seeds=[0]), runner)
    entry = plan.extractions_needed[0]
    runner.features(entry.run, entry.run.dataset, entry.kinds, lambda it, **_: it)  # the other sweep, meanwhile
    summary = run_local(plan, runner)
    assert (summary.computed, summary.extractions) == (1, 0)


def test_two_sweeps_on_one_store_compute_each_cell_once(tmp_path, monkeypatch):
    import threading
    import time

    from ssl_bench.features import FeatureCache
    from ssl_bench.runner import Runner
    from ssl_bench.store import ResultStore

    computed = []
    real = Runner.compute

    def slow(self, run, *args, **kwargs):  # both sweeps reach the first cell together
        computed.append(run.config_hash)
        time.sleep(0.3)
        return real(self, run, *args, **kwargs)

    monkeypatch.setattr(Runner, "compute", slow)
    runners = [Runner(ResultStore(tmp_path / "s.sqlite"), FeatureCache(tmp_path / "cache"), "cpu") for _ in range(2)]
    plans = [make_plan(grid(k=["C", "2C", "3C"], seeds=[0, 1]), r) for r in runners]  # the same 6 cells
    summaries = [None, None]

    def sweep(i):
        summaries[i] = run_local(plans[i], runners[i])

    threads = [threading.Thread(target=sweep, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(computed) == sorted({c.run.config_hash for c in plans[0].cells})  # each once, none twice
    assert sum(s.computed for s in summaries) == 6 and sum(s.already_stored for s in summaries) == 6
    assert len(runners[0].store.query()) == 6


def test_extraction_takes_the_union_of_the_kinds_all_tasks_read(runner, monkeypatch):
    kmeans = registry.task("kmeans")
    reads_cls = dataclasses.replace(kmeans, name="kmeans-cls", features=("patch", "cls"))
    tasks = {**registry.tasks(), "kmeans-cls": reads_cls}
    monkeypatch.setattr(registry, "tasks", lambda: tasks)
    extracted = []
    real = runner.features
    monkeypatch.setattr(runner, "features", lambda run, ds, kinds, progress: extracted.append(sorted(kinds))
                        or real(run, ds, kinds, progress))
    g = grid_from_mapping({"backbones": [{"name": "dino-vits16", "weights": "random"}], "tasks": ["kmeans", "kmeans-cls"],
                           "datasets": [{"name": "synthetic", "options": {"n": 2}}]})
    plan = make_plan(g, runner)
    assert [e.kinds for e in plan.extractions_needed] == [["cls", "patch"]]
    assert run_local(plan, runner).computed == 2
    assert extracted[0] == ["cls", "patch"]  # one pass for both tasks; the cells then hit the cache
    assert all(not runner.cache.missing_kinds(e.key, ["cls", "patch"], 2) for e in plan.extractions)


def test_a_pair_that_cannot_run_is_skipped_not_failing_its_backbone(runner):
    from ssl_bench.sweep import describe

    g = grid_from_mapping({"backbones": ["reference"], "tasks": ["kmeans", "datus2-initial"],
                           "datasets": [{"name": "synthetic", "options": {"n": 2}}], "k": ["C", "2C"]})
    plan = make_plan(g, runner)  # reference has no attention keys: DatUS^2 cannot read it
    assert [c.run.task.name for c in plan.cells] == ["kmeans", "kmeans"]
    assert [e.kinds for e in plan.extractions_needed] == [["patch"]]  # not ["key", "patch"], which would fail
    assert "skipped 2 cell(s): datus2-initial reads key of the attention, which reference does not have" in describe(plan)
    assert run_local(plan, runner).computed == 2


def test_cell_labels_tell_parameter_sets_and_weight_seeds_apart(runner):
    g = grid_from_mapping({"backbones": [{"name": "dino-vits16", "weights": "random", "weights_seed": 7}],
                           "tasks": ["kmeans", {"name": "kmeans", "params": {"iterations": 20}}],
                           "datasets": [{"name": "synthetic", "options": {"n": 2}}]})
    labels = [cell.label for cell in make_plan(g, runner).cells]
    assert labels == ["dino-vits16 (random weights, seed 7) / kmeans / synthetic:val [n=2] K=5 seed=0",
                      "dino-vits16 (random weights, seed 7) / kmeans (iterations=20) / synthetic:val [n=2] K=5 seed=0"]


@pytest.mark.slow
def test_cli_grid_flags_print_the_plan(tmp_path):
    proc = subprocess.run(sweep_cli("--backbone", "reference", "--task", "kmeans", "--dataset", "synthetic",
                                    "-o", "n=4", "--k", "C", "--k", "2C", "--seed", "0", "--seed", "1", "--plan",
                                    store=tmp_path / "s.sqlite", cache=tmp_path / "cache"),
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "cells: 4 in the grid, 0 already stored, 4 to compute" in proc.stdout
    assert "feature extractions: 1 needed" in proc.stdout and stored_rows(tmp_path / "s.sqlite") == []
    bad = subprocess.run(sweep_cli("--backbone", "reference", "--task", "kmeans", "--dataset", "synthetic", "--k", "C/2",
                                   store=tmp_path / "s.sqlite", cache=tmp_path / "cache"),
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "K value 'C/2'" in bad.stderr
    (tmp_path / "twice.yaml").write_text("backbones: [reference]\nbackbones: [dino-vits16]\ntasks: [kmeans]\n")
    with pytest.raises(UserError, match="key 'backbones' is given twice"):  # YAML would keep the last silently
        load_grid(tmp_path / "twice.yaml")
    (tmp_path / "bad.yaml").write_text("backbones: [reference\n")  # the file goes through the same reader
    bad_file = subprocess.run(sweep_cli(str(tmp_path / "bad.yaml"), store=tmp_path / "s.sqlite", cache=tmp_path / "cache"),
                              capture_output=True, text=True, cwd=ROOT)
    assert bad_file.returncode == 2 and "Traceback" not in bad_file.stderr and "not valid YAML" in bad_file.stderr


KILL_GRID = {"backbones": ["reference"], "tasks": ["kmeans"], "datasets": [{"name": "synthetic", "options": {"n": 6}}],
             "k": [2, 3, 4, "C", 6, 7, 8, 9, "2C"], "seeds": [0, 1]}  # 18 quick cells


@pytest.mark.slow
def test_kill_9_mid_sweep_then_resume_loses_nothing_and_duplicates_nothing(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(KILL_GRID))
    store, cache = tmp_path / "s.sqlite", tmp_path / "cache"
    proc = subprocess.Popen(sweep_cli(str(grid_file), store=store, cache=cache), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(stored_rows(store)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = stored_rows(store)
    assert 3 <= len(before) < 18, "the sweep must be killed mid-way for this test to mean anything"

    resumed = subprocess.run(sweep_cli(str(grid_file), store=store, cache=cache), cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(before)} already stored, {18 - len(before)} to compute" in resumed.stdout
    assert "0 needed" in resumed.stdout  # the killed sweep had finished the extraction
    after = stored_rows(store)
    assert len(after) == 18 and len({row[0] for row in after}) == 18
    assert set(before) <= set(after)  # what was stored before the kill is kept unchanged
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.slow
def test_two_concurrent_sweeps_on_one_store_corrupt_nothing(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({**KILL_GRID, "backbones": ["reference", "reference-p16"], "k": [2, "C", 8],
                                         "seeds": [0]}))
    store, cache = tmp_path / "s.sqlite", tmp_path / "cache"
    procs = [subprocess.Popen(sweep_cli(str(grid_file), store=store, cache=cache), cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    rows = stored_rows(store)
    assert len(rows) == 6 and len({row[0] for row in rows}) == 6
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    entries = [p.parent for p in cache.rglob("meta.json")]
    assert len(entries) == 2 and all((e / "patch.npy").is_file() for e in entries)  # one per backbone, complete


@pytest.mark.slow
def test_ray_executor_gives_the_local_numbers(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an extra: pip install -e '.[ray]'")
    from ssl_bench.ray_executor import local_runtime_env, run_ray
    from ssl_bench.features import FeatureCache
    from ssl_bench.runner import Runner
    from ssl_bench.store import ResultStore

    g = grid_from_mapping({"backbones": ["reference", {"name": "dino-vits16", "weights": "random"}],
                           "tasks": ["kmeans"], "datasets": [{"name": "synthetic", "options": {"n": 3}}],
                           "k": ["C", "2C"], "seeds": [0, 1]})
    local = Runner(ResultStore(tmp_path / "local.sqlite"), FeatureCache(tmp_path / "local-cache"), "cpu")
    assert run_local(make_plan(g, local), local).computed == 8

    ray_store = tmp_path / "ray" / "results.sqlite"  # its own folder: samples are written beside the store
    distributed = Runner(ResultStore(ray_store), FeatureCache(tmp_path / "ray-cache"), "cpu")
    plan = make_plan(g, distributed)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=local_runtime_env())
    try:
        summary = run_ray(plan, distributed, device="cpu")
    finally:
        ray.shutdown()
    assert (summary.computed, summary.extractions, summary.failed) == (8, 2, [])
    assert stored_rows(ray_store) == stored_rows(tmp_path / "local.sqlite")
    assert len(list((tmp_path / "ray-cache").rglob("meta.json"))) == 2
    # panel samples travel back with the records and are written by the driver, beside its store
    hashes = {r["config_hash"] for r in ResultStore(ray_store).query()}
    assert {f.stem for f in (ray_store.parent / "samples").glob("*.npz") if not f.stem.startswith("view-")} == hashes


def test_default_weights_apply_to_learned_backbones_only():
    g = grid(backbones=["reference", "dino-vits16", {"name": "dino-vits8", "weights": "/w.pth"}], weights="random")
    assert [b.weights for b in g.backbones] == [None, "random", "/w.pth"]


def test_command_line_data_roots_are_one_per_dataset():
    from ssl_bench.cli import _dataset_entry

    assert _dataset_entry("camvid", ["suim=/s", "camvid=/c"], None, [])["data_root"] == "/c"
    assert _dataset_entry("camvid", ["/any"], None, [])["data_root"] == "/any"  # one plain root: every dataset
    with pytest.raises(UserError, match="several --data-root values for camvid"):
        _dataset_entry("camvid", ["/a", "/b"], None, [])  # the second used to be dropped silently


def test_bad_data_in_one_dataset_fails_its_cells_and_the_sweep_goes_on(runner, tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "broken"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("left\nright\n")
    for stem in ("001", "002"):
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "masks" / f"{stem}.png")
    (root / "images" / "003.png").write_text("not an image")  # a damaged file: extraction fails on it
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "masks" / "003.png")
    plan = make_plan(grid(datasets=[{"name": "folder", "data_root": str(root)}, TINY], k=["C", "2C"]), runner)
    summary = run_local(plan, runner)
    assert summary.computed == 2 and len(runner.store.query()) == 2  # the synthetic cells still ran
    assert len(summary.failed) == 2 and all("cannot read" in r and "003.png" in r for _, r in summary.failed)


def test_command_line_values_and_prefixes_are_checked():
    from ssl_bench.cli import _check_prefixes, parse_pairs

    with pytest.raises(UserError, match="--option 'n=\\[1,2': the value is not valid YAML"):
        parse_pairs(["n=[1,2"], "--option")
    with pytest.raises(UserError, match="--option prefix 'synthtic' names no --dataset"):
        _check_prefixes(["synthetic"], [], ["synthtic:n=2"])  # a typo used to be dropped silently
    _check_prefixes(["synthetic", "camvid"], ["camvid=/c"], ["synthetic:n=2", "limit=3"])


@pytest.mark.parametrize("data, message", [
    ({"backbones": [{"name": 5}]}, "a mapping with a 'name' text"),
    ({"backbones": [{"name": "dino-vits16", "weights": 5}]}, "weights must be 'random', a file or a hub name"),
    ({"weights": ["random"]}, "weights must be 'random'"),
    ({"backbones": [{"name": "reference", "weights_seed": "abc"}]}, "weights_seed must be a whole number from 0 to 2\\^63-1"),
    ({"protocol": {"foo": 1}}, "unknown protocol key\\(s\\) foo -- keys: resize"),
    ({"datasets": [{"name": "camvid", "data_root": ["a", "b"]}]}, "data_root must be one folder"),
])
def test_grid_values_of_the_wrong_type_are_one_clear_error(data, message):
    with pytest.raises(UserError, match=message):
        grid(**data)


def test_a_folder_with_two_images_of_one_stem_is_refused(tmp_path):
    from ssl_bench.data.base import pair_by_stem

    for folder, names in (("images", ("a.png", "a.jpg")), ("masks", ("a.png",))):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_bytes(b"")
    with pytest.raises(UserError, match="several images named a"):
        pair_by_stem(tmp_path / "images", tmp_path / "masks", "folder")


def test_an_unreachable_ray_address_fails_in_seconds():
    from ssl_bench.ray_executor import _check_reachable

    with pytest.raises(UserError, match="cannot reach the Ray cluster at ray://127.0.0.1:1"):
        _check_reachable("ray://127.0.0.1:1")  # port 1: refused at once (Ray would retry for minutes)
    _check_reachable("auto")  # left to Ray


def test_ray_task_sizes_are_checked_before_anything_waits(tmp_path):
    import types

    from typer.testing import CliRunner

    from ssl_bench.cli import app
    from ssl_bench.ray_executor import _threads_per_task

    two_cpus = types.SimpleNamespace(nodes=lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    assert _threads_per_task(two_cpus, 2) == 2 and 1 <= _threads_per_task(two_cpus, None) <= 2
    with pytest.raises(UserError, match="the largest Ray node has 2 CPUs, so no task could ever start"):
        _threads_per_task(two_cpus, 8)  # Ray would wait forever without a word
    with pytest.warns(UserWarning, match="unless the cluster adds a node that large"):
        assert _threads_per_task(two_cpus, 8, local=False) == 8  # a cluster may autoscale
    grid = ["sweep", "-b", "reference", "-t", "kmeans", "-d", "synthetic", "--plan", "--store", str(tmp_path / "s")]
    for extra, message in ((["--executor", "ray", "--cpus-per-task", "-2"], "--cpus-per-task must be at least 1"),
                           (["--address", "ray://head:10001"], "--address is for Ray -- add --executor ray"),
                           (["--cpus-per-task", "3"], "--cpus-per-task is for Ray")):
        result = CliRunner().invoke(app, grid + extra)
        assert result.exit_code != 0 and message in str(result.exception or result.output), extra


def test_ray_tasks_reserve_a_gpu_only_where_they_use_one(runner):
    import types

    from ssl_bench.ray_executor import _gpus_per_task, _Tasks

    assert _gpus_per_task(None, {"CPU": 16, "GPU": 8}) == 1 and _gpus_per_task("cuda", {"GPU": 1}) == 1
    assert _gpus_per_task("cpu", {"CPU": 16, "GPU": 8}) == 0  # --device cpu: no GPU held idle per task
    assert _gpus_per_task(None, {"CPU": 2}) == 0

    class FakeRay:  # records what each task would ask Ray for, and the device it would compute on
        submitted = []

        @staticmethod
        def remote(**resources):
            def wrap(function):
                class Remote:
                    @staticmethod
                    def options(name):
                        return types.SimpleNamespace(remote=lambda *args: FakeRay.submitted.append(
                            (function.__name__, resources["num_gpus"],
                             inspect.signature(function).bind(*args).arguments["device"], name)))
                return Remote
            return wrap

    plan = make_plan(grid(tasks=["kmeans", "primaps-em", "primaps-em-fast"], seeds=[0]), runner)
    tasks = _Tasks(FakeRay, "/cache", "id", None, 1, gpus=1)
    tasks.extract(plan.extractions_needed[0])
    for cell in plan.todo:
        tasks.cell(cell)
    asked = {(name, gpus, device) for name, gpus, device, _ in FakeRay.submitted}
    assert asked == {("_extract_task", 1, None), ("_cell_task", 1, None), ("_cell_task", 0, "cpu")}
    on_cpu = {label for name, gpus, device, label in FakeRay.submitted if gpus == 0}
    assert on_cpu == {"cell kmeans", "cell primaps-em-fast"}  # gpu: false in their task files; named by task


def test_a_task_on_a_node_that_does_not_see_the_cache_fails_in_one_line(tmp_path):
    from ssl_bench.ray_executor import CACHE_ID_FILE, cache_identity, check_sees_cache

    cache = tmp_path / "cache"
    identity = cache_identity(cache)
    assert identity and cache_identity(cache) == identity  # made once, then read
    check_sees_cache(str(cache), identity, "node-1 (10.0.0.1, Ray node 12345678)")
    with pytest.raises(UserError, match=r"^node node-2 \(10.0.0.2, Ray node 9\) does not see the feature cache /no/such "
                                        r"-- mount the shared cache at that path on every node"):
        check_sees_cache("/no/such", identity, "node-2 (10.0.0.2, Ray node 9)")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / CACHE_ID_FILE).write_text("another cache")  # a local folder at the shared path, say
    with pytest.raises(UserError, match="node n sees another folder than the driver at"):
        check_sees_cache(str(other), identity, "n")
    (tmp_path / "a-file").write_text("")
    with pytest.warns(UserWarning, match="nodes that do not see it are not detected"):
        assert cache_identity(tmp_path / "a-file" / "cache") is None  # cannot be made: the sweep goes on unchecked


def test_run_takes_k_as_a_multiple_of_the_classes(tmp_path):
    from typer.testing import CliRunner

    from ssl_bench.cli import app

    result = CliRunner().invoke(app, ["run", "--backbone", "reference", "--dataset", "synthetic", "-o", "n=2",
                                      "--resize", "64", "--k", "2C", "--store", str(tmp_path / "s.sqlite"),
                                      "--cache", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "K=10" in result.output  # synthetic has 5 classes


def test_a_mask_of_another_format_is_named_in_the_error(tmp_path):
    from ssl_bench.data.base import pair_by_stem

    for folder, name in (("images", "a.png"), ("masks", "a.jpg")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(b"")
    with pytest.raises(UserError, match=r"found a.jpg: masks must be .png"):
        pair_by_stem(tmp_path / "images", tmp_path / "masks", "folder")


@pytest.mark.parametrize("variant, message", [
    ("{name: kmeans-x, param: {crf: true}}", r"unknown key\(s\) \['param'\]"),  # would run the base task
    ("{name: kmeans-x, params: {crff: true}}", "must be parameters of 'kmeans'"),  # a parameter nothing reads
    ("{name: kmeans-x, params: {iterations: '50'}}", "iterations='50' must be a whole number"),
    ("{title: no name}", "each variant needs a name"),
    ("{name: kmeans, params: {crf: true}}", "the name 'kmeans' is registered twice"),
    ("{name: kmeans-x, gpu: 1}", "task 'kmeans-x': gpu must be true or false, got 1"),  # 1 is no switch
])
def test_task_file_mistakes_are_one_line(tmp_path, monkeypatch, variant, message):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "kmeans.yaml").write_text(
        (registry.registry_dir("tasks") / "kmeans.yaml").read_text().split("variants:")[0]
        + f"variants:\n  - {variant}\n")
    monkeypatch.setattr(registry, "_CHECKOUT", tmp_path)
    registry.tasks.cache_clear()
    try:
        with pytest.raises(UserError, match=message):
            registry.tasks()
    finally:
        monkeypatch.undo()
        registry.tasks.cache_clear()


def test_the_plan_says_which_cells_an_earlier_task_version_stored(runner, monkeypatch):
    from ssl_bench.sweep import describe

    grid = grid_from_mapping({"backbones": ["reference"], "tasks": ["kmeans"],
                              "datasets": [{"name": "synthetic", "options": {"n": 4}}], "k": ["C"], "seeds": [0, 1]})
    tasks = dict(registry.tasks())
    current = tasks["kmeans"]
    tasks["kmeans"] = dataclasses.replace(current, version=current.version - 1)
    monkeypatch.setattr(registry, "tasks", lambda: tasks)
    run_local(make_plan(grid, runner, lambda cell: cell.config.seed == 0), runner)  # seed 0 by the earlier version
    tasks["kmeans"] = current
    lines = describe(make_plan(grid, runner))
    assert lines[0] == "cells: 2 in the grid, 0 already stored, 2 to compute"
    assert lines[1].startswith(f"  1 of them stored by an earlier version of their task, whose numbers may differ "
                               f"(now kmeans v{current.version})")


@pytest.mark.parametrize("version", ["two", 0, 1.5])
def test_a_task_version_is_a_whole_number(tmp_path, monkeypatch, version):
    (tmp_path / "tasks").mkdir()
    text = (registry.registry_dir("tasks") / "kmeans.yaml").read_text()
    (tmp_path / "tasks" / "kmeans.yaml").write_text(re.sub(r"(?m)^version: .*$", f"version: {version}", text))
    monkeypatch.setattr(registry, "_CHECKOUT", tmp_path)
    registry.tasks.cache_clear()
    try:
        with pytest.raises(UserError, match="version must be a whole number, 1 or more"):
            registry.tasks()
    finally:
        monkeypatch.undo()
        registry.tasks.cache_clear()


def test_cli_warnings_and_listings_read_as_text():
    from ssl_bench.cli import _first_sentence, _one_line_warning, console

    with console.capture() as captured:
        _one_line_warning(UserWarning("no panel [kept]"), UserWarning, "/x/runner.py", 323)
    assert captured.get() == "warning: no panel [kept]\n"  # the message, not the file and line; no markup
    doc = """Cost of one more K (k-means cells
    over cached features). Each figure is the best of runs.

    Details."""
    assert _first_sentence(doc) == "Cost of one more K (k-means cells over cached features)."
    assert _first_sentence("The fit: ``spherical_kmeans`` with bounds. More.") == "The fit: spherical_kmeans with bounds."
    assert _first_sentence("Seconds on ``images`` VOC samples. More.", ["images"]) == "Seconds on <images> VOC samples."


def test_printed_lines_keep_their_brackets():
    from ssl_bench.cli import out

    with out.capture() as captured:
        out.print("  extract x [missing: key] [resumes after 3 of 5 images]", highlight=False)
    assert "[missing: key] [resumes after 3 of 5 images]" in captured.get()  # rich markup would eat both


def test_run_says_when_an_earlier_task_version_stored_the_cell(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ssl_bench.cli import app

    args = ["run", "--backbone", "reference", "--task", "kmeans", "--dataset", "synthetic", "-o", "n=4",
            "--store", str(tmp_path / "s.sqlite"), "--cache", str(tmp_path / "cache")]
    tasks = dict(registry.tasks())
    current = tasks["kmeans"]
    tasks["kmeans"] = dataclasses.replace(current, version=current.version - 1)
    monkeypatch.setattr(registry, "tasks", lambda: tasks)
    earlier = CliRunner().invoke(app, args)
    tasks["kmeans"] = current
    now = CliRunner().invoke(app, args)
    assert earlier.exit_code == 0 and "earlier version" not in earlier.output
    assert now.exit_code == 0 and "(computed)" in now.output
    assert "note: an earlier version of kmeans stored this cell too" in now.output


# ---- files of several grids, optional grids, $VARIABLES in data roots ----------------------------------

def test_a_file_of_several_grids_plans_them_together_and_skips_an_optional_one_without_data(tmp_path, runner):
    from ssl_bench.sweep import grids_from_mapping

    data = {"grids": [
        {"backbones": ["reference"], "tasks": ["kmeans"], "datasets": [TINY], "k": ["C"]},
        {"backbones": ["reference"], "tasks": ["kmeans"], "datasets": [TINY], "k": ["C", "2C"]},  # K=C again
        {"optional": True, "backbones": ["reference"], "tasks": ["kmeans"],
         "datasets": [{"name": "camvid", "data_root": "$CAMVID_HOME/camvid"}]},
        {"optional": True, "backbones": ["reference"], "tasks": ["kmeans"],
         "datasets": [{"name": "camvid", "data_root": str(tmp_path / "nowhere")}]}]}
    grids, skipped = grids_from_mapping(data, "two.yaml", env={})
    assert len(grids) == 2 and len(skipped) == 2
    assert skipped[0].reason == "two.yaml: grid 3 (camvid) skipped: $CAMVID_HOME/camvid: $CAMVID_HOME is not set"
    assert skipped[1].reason.endswith(f"{tmp_path / 'nowhere'} absent")
    assert skipped[0].covers("reference", "kmeans", "camvid") and not skipped[0].covers("reference", "kmeans", "suim")
    plan = make_plan(grids, runner)
    assert len(plan.cells) == 2 and len(plan.extractions) == 1  # one cell per distinct config, one extraction


def test_data_roots_read_variables_and_an_unset_one_is_one_line(tmp_path):
    from ssl_bench.sweep import grids_from_mapping

    (tmp_path / "camvid").mkdir()
    entry = {"backbones": ["reference"], "tasks": ["kmeans"],
             "datasets": [{"name": "camvid", "data_root": "${DATA}/camvid"}]}
    grids, _ = grids_from_mapping(entry, "g.yaml", env={"DATA": str(tmp_path)})
    assert grids[0].datasets[0].data_root == str(tmp_path / "camvid")
    with pytest.raises(UserError, match=r"data_root \$\{DATA\}/camvid names \$DATA, which is not set"):
        grids_from_mapping(entry, "g.yaml", env={})  # not optional: the file is wrong here, not skipped


@pytest.mark.parametrize("data, message", [
    ({"grids": [], }, "'grids' must be a list of sweep grids"),
    ({"grids": [{"backbones": ["reference"]}], "k": [5]}, "a file with 'grids' holds nothing else, found k"),
    ({"grids": [{"optional": "yes", "backbones": ["reference"]}]}, "grid 1: optional must be true or false"),
    ({"grids": [{"backbones": ["reference"], "tasks": ["kmeans"], "datasets": [TINY], "optional": False,
                 "k": ["x"]}]}, "K value 'x'"),
    ({"backbones": [{"name": "dino-vits16", "weights_match": "sha"}], "tasks": ["kmeans"], "datasets": [TINY]},
     "weights_match must be path .* or exact"),
    ({"grids": [{"optional": True, "backbones": ["refrence"], "tasks": ["kmeans"],
                 "datasets": [{"name": "camvid", "data_root": "/absent"}]}]}, "unknown backbone 'refrence'"),
])
def test_bad_grid_lists_fail_with_one_line(data, message):
    from ssl_bench.sweep import grids_from_mapping

    with pytest.raises(UserError, match=message):
        grids_from_mapping(data, "f.yaml")


def test_sweep_command_runs_a_file_of_grids_and_refuses_grid_flags_with_it(tmp_path):
    from typer.testing import CliRunner

    from ssl_bench.cli import app

    path = tmp_path / "grids.yaml"
    path.write_text(yaml.safe_dump({"grids": [
        {"backbones": ["reference"], "tasks": ["kmeans"], "datasets": [TINY]},
        {"optional": True, "backbones": ["reference"], "tasks": ["kmeans"],
         "datasets": [{"name": "camvid", "data_root": str(tmp_path / "absent")}]}]}))
    store = ["--store", str(tmp_path / "s.sqlite"), "--cache", str(tmp_path / "c")]
    result = CliRunner().invoke(app, ["sweep", str(path), "--plan", *store])
    assert result.exit_code == 0, result.output
    assert "grid 2 (camvid) skipped:" in result.output and "cells: 1 in the grid" in result.output
    flags = CliRunner().invoke(app, ["sweep", str(path), "--seed", "1", "--plan", *store])
    assert "holds several grids, and grid flags replace the axes of one grid" in str(flags.exception)


def test_a_task_of_k_equal_c_only_skips_its_other_k_cells_of_a_grid(runner):
    """A grid crosses every task with every K: a class-naming clusterer's K = 2C cells are skipped, with the
    reason, and the other tasks' cells are planned (``ssl-bench run`` refuses such a K in one line)."""
    grid = grid_from_mapping({"backbones": [{"name": "dino-vits16", "weights": "random"}],
                              "tasks": ["kmeans", "acseg-labelled-knn"],
                              "datasets": [{"name": "synthetic", "options": {"n": 2}}], "k": ["C", "2C"]})
    plan = make_plan(grid, runner)
    assert sorted((c.config.task, c.run.config["k"]) for c in plan.cells) == \
        [("acseg-labelled-knn", 5), ("kmeans", 5), ("kmeans", 10)]
    assert plan.skipped == {"acseg-labelled-knn names the dataset's classes: K = C only": 1}
