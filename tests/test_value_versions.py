"""Value versions: a change of numbers that only runs of some values see (Louvain restarts > 1, reduced-precision
crop embeddings and HP views) makes those runs new runs, while runs of the untouched values keep their hashes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ssl_bench import registry, versions
from ssl_bench.data.protocol import Protocol
from ssl_bench.errors import UserError
from ssl_bench.runner import RunConfig, TaskContext

SMALL = (("n", 8),)


def resolve(runner, task, params=(), precision="fp32"):
    return runner.resolve(RunConfig(backbone="reference", task=task, dataset="synthetic", dataset_options=SMALL,
                                    params=params, protocol=Protocol(precision=precision)))


def test_runs_of_the_untouched_values_record_nothing_and_keep_their_hashes(runner):
    for task in ("datus2", "comus", "hp", "kmeans"):
        run = resolve(runner, task)
        assert "value_versions" not in run.config, task  # so every hash stored before value versions stays
        assert versions.is_current_version(run.config)
    assert "value_versions" not in resolve(runner, "kmeans", precision="bf16").config  # k-means has none


def test_a_run_of_a_changed_value_records_its_version_and_is_a_new_run(runner):
    run = resolve(runner, "datus2", (("segmenter.restarts", 3),))
    assert run.config["value_versions"] == {"segmenter.restarts": 2}
    bf16 = resolve(runner, "datus2", precision="bf16")
    assert bf16.config["value_versions"] == {"embed.protocol.precision": 2}
    assert resolve(runner, "hp", precision="fp16").config["value_versions"] == {"protocol.precision": 2}

    stored_before = {key: v for key, v in run.config.items() if key != "value_versions"}  # as a run of v1 stored it
    assert versions.is_current_version(run.config) and not versions.is_current_version(stored_before)
    assert versions.task_label(stored_before).endswith("not current]")
    from ssl_bench.runner import run_hash

    assert run_hash(stored_before) != run.config_hash  # so it is not reused


def test_a_kept_intermediate_of_a_changed_value_is_computed_again(runner, monkeypatch):
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(3)}

    def reuse(params):
        run = resolve(runner, "datus2", params)
        return TaskContext(runner, run, lambda it, **_: it).reuse("segments", {"a": 1}, compute, slots=("segmenter",))

    reuse((("segmenter.restarts", 3),))
    reuse(())
    assert len(calls) == 2
    louvain = registry.stages("segmenter")["louvain"]
    later = dataclasses.replace(louvain, value_versions={"restarts": {"version": 3, "except": 1}})
    segmenters = {**registry.stages("segmenter"), "louvain": later}
    real = registry.stages
    monkeypatch.setattr(registry, "stages", lambda kind: segmenters if kind == "segmenter" else real(kind))
    reuse((("segmenter.restarts", 3),))  # restarts 3 changed again: computed again
    reuse(())  # the default did not: kept
    assert len(calls) == 3


def test_a_head_another_task_reads_is_the_one_its_own_run_keeps(runner):
    """PriMaPs-EM with features_from=hp asks for HP's head as its owner; under bf16 both must key it alike."""
    seen = {}

    def keep(ctx, owner):
        ctx.reuse("hp-head", {"a": 1}, lambda: seen.setdefault(len(seen), {"x": np.arange(2)}), owner=owner)

    hp = resolve(runner, "hp", precision="bf16")
    keep(TaskContext(runner, hp, lambda it, **_: it), None)
    other = resolve(runner, "primaps-em", precision="bf16")
    keep(TaskContext(runner, other, lambda it, **_: it), (registry.task("hp"), hp.config["params"]))
    assert len(seen) == 1


@pytest.mark.parametrize("entry, message", [
    ({"restart": {"version": 2, "except": 1}}, "names 'restart', neither a parameter"),
    ({5: {"version": 2, "except": 1}}, "names 5, neither a parameter"),
    ({"protocol.precison": {"version": 2, "except": "fp32"}}, "neither a parameter .* nor protocol.FIELD"),
    ({"restarts": {"version": 1, "except": 1}}, r"needs version \(2 or more\), except"),
    ({"restarts": {"version": 2}}, r"needs version \(2 or more\), except"),
    ({"restarts": 2}, r"needs version \(2 or more\), except"),
    ({"restarts": {"version": 2, "except": 1, "when": {"backnd": "x"}}}, r"may have when"),
    ({"restarts": {"version": 2, "except": "1"}}, r"restarts: except='1' must be a whole number"),
    ({"backend": {"version": 2, "except": 1}}, r"backend: except=1 must be text"),
    ({"protocol.precision": {"version": 2, "except": "FP32"}}, r"except='FP32' is no value of the protocol"),
])
def test_a_bad_value_version_is_one_line_naming_the_file(entry, message):
    """A mistyped ``except`` would make every run a new version, the defaults' included: refused at start-up."""
    document = {"name": "x", "title": "x", "entrypoint": "m:C", "params": {"restarts": 1, "backend": "a"},
                "value_versions": entry}
    with pytest.raises(UserError, match=f"x.yaml: value_versions.*{message}|x.yaml: .*{message}"):
        registry.stages_in([("x.yaml", document)], "segmenter")


def test_a_value_version_limited_by_when_leaves_the_other_runs_alone(runner):
    assert resolve(runner, "datus2", (("segmenter.backend", "igraph"), ("segmenter.restarts", 3))
                   ).config.get("value_versions") is None  # igraph's restarts were seeded already


def test_a_run_reading_another_tasks_head_carries_that_tasks_versions(runner, monkeypatch):
    read = resolve(runner, "primaps-em", (("features_from", "hp"),), precision="bf16")
    assert read.config["value_versions"] == {"features_from.protocol.precision": 2}
    assert "value_versions" not in resolve(runner, "primaps-em", (("features_from", "hp"),)).config
    assert "value_versions" not in resolve(runner, "primaps-em", (("features_from", "stego"),), precision="bf16").config
    tasks = dict(registry.tasks())
    tasks["stego"] = dataclasses.replace(tasks["stego"], version=2)  # a new version of the head it reads
    monkeypatch.setattr(registry, "tasks", lambda: tasks)
    again = resolve(runner, "primaps-em", (("features_from", {"task": "stego", "params": {"dim": 16}}),))
    assert again.config["value_versions"] == {"features_from.version": 2}


def test_a_label_names_what_is_older():
    params = registry.task("datus2").resolve_params({"segmenter.restarts": 3})
    stored = {"task": "datus2", "params": params, "task_version": registry.task("datus2").version,
              "stage_versions": {"segmenter": 2}}  # stored before restarts had a value version
    assert versions.task_label(stored) == "datus2 (segmenter.restarts=3) [segmenter.restarts v1, not current]"
    assert versions.task_label({**stored, "value_versions": {"segmenter.restarts": 2}}) == \
        "datus2 (segmenter.restarts=3)"
    assert versions.task_label({**stored, "stage_versions": {}}).endswith("[segmenter v1, not current]")


def test_the_hashes_before_every_combination_of_changes_are_known(runner):
    from ssl_bench.runner import earlier_version_hashes, run_hash

    run = resolve(runner, "datus2", (("segmenter.restarts", 3),), precision="bf16")
    assert len(run.config["value_versions"]) == 2
    before_both = {key: v for key, v in run.config.items() if key != "value_versions"}
    earlier = earlier_version_hashes(run.config)
    assert run_hash(before_both) in earlier and run.config_hash not in earlier
    assert len(earlier) == 2 * 2 * run.config["task_version"] - 1
