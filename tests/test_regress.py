"""ssl-bench regress: any sweep file as a suite, baselines keyed by readable cell names with tolerances per metric
and per cell, new / gone cells, weights identified by content, JUnit and Markdown for CI, exit status 0 / 1 / 2,
and ssl-bench's own suite on the same mechanism."""

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from ssl_bench import regress, registry
from ssl_bench.errors import UserError
from ssl_bench.regress import Baselines, Tolerance, outputs

ROOT = Path(__file__).resolve().parents[1]
USER_SUITE = {"backbones": ["reference"], "tasks": ["kmeans"],
              "datasets": [{"name": "synthetic", "options": {"n": 6, "size": 64}}], "k": ["C", "2C"], "seeds": [0],
              "protocol": {"resize": 64}}
K5 = "reference/kmeans/synthetic:val[n=6,size=64] K=5 seed=0 resize=64"
K10 = "reference/kmeans/synthetic:val[n=6,size=64] K=10 seed=0 resize=64"


@pytest.fixture
def user_suite(tmp_path):
    """A user's suite file (an ordinary sweep file) and where its baselines go."""
    suite = tmp_path / "ci" / "suite.yaml"
    suite.parent.mkdir()
    suite.write_text(yaml.safe_dump(USER_SUITE))
    return suite, tmp_path / "ci" / "baselines.json"


def write_suite(path: Path, **changes) -> None:
    path.write_text(yaml.safe_dump({**USER_SUITE, **changes}))


def junit_cases(text: str) -> dict[tuple[str, str], ET.Element]:
    """(cell, metric) -> the testcase element of a JUnit report."""
    return {(case.get("classname"), case.get("name")): case for case in ET.fromstring(text).iter("testcase")}


def edit_baselines(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---- a user's suite, end to end on the synthetic set ---------------------------------------------------

def test_a_user_suite_passes_against_the_baselines_its_update_wrote(user_suite):
    suite, baselines = user_suite
    with pytest.raises(UserError, match="no baselines at .* create them with `ssl-bench regress --update`"):
        regress.check(suite, baselines)  # never written silently
    report, written = regress.update(suite, baselines)
    assert report.cells("new") == [K10, K5] and report.exit_status == 1  # what --update accepted: two new cells
    cells = json.loads(baselines.read_text())["cells"]
    assert set(cells) == {K5, K10}
    assert cells[K5]["config"] == {"backbone": "reference", "task": "kmeans", "dataset": "synthetic", "split": "val",
                                   "options": {"n": 6, "size": 64}, "k": 5, "seed": 0, "protocol": {"resize": 64}}
    assert set(cells[K5]["metrics"]) == {"miou", "acc", "f1"} and "weights" not in cells[K5]  # nothing to load

    report = regress.check(suite, baselines)
    assert report.exit_status == 0 and report.verdict() == "all 6 metrics within tolerance"
    cases = junit_cases(outputs.junit(report))
    assert len(cases) == 6 and not any(len(case) for case in cases.values())  # 6 passing cases
    assert "### ssl-bench regress: passed" in outputs.markdown(report, "ssl-bench regress --update")


def test_a_changed_parameter_fails_exactly_the_junit_cases_it_moved(user_suite, monkeypatch):
    suite, baselines = user_suite
    write_suite(suite, tasks=["kmeans", {"name": "kmeans", "params": {"iterations": 50}}], k=["C"])
    regress.update(suite, baselines)
    monkeypatch.setitem(registry.task("kmeans").params, "iterations", 2)  # a change to the method's default
    report = regress.check(suite, baselines)
    assert report.exit_status == 1
    drifted = {(check.cell, check.metric): check for check in report.with_status("drift")}
    assert set(drifted) == {(K5, "miou"), (K5, "acc"), (K5, "f1")}  # the cell that pins iterations=50 holds
    assert {c.status for c in report.checks if c.cell == K5.replace("kmeans", "kmeans(iterations=50)")} == {"ok"}
    cases = junit_cases(outputs.junit(report))
    for key, case in cases.items():
        failure = case.find("failure")
        if key not in drifted:
            assert failure is None, key
            continue
        check = drifted[key]
        assert failure.get("type") == "drift"
        assert failure.get("message") == (f"{check.metric} {check.now:.2f}, baseline {check.baseline:.2f}: "
                                          f"{check.delta:+.2f} (beyond tolerance +-0.5)")
    root = ET.fromstring(outputs.junit(report))
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("6", "3", "0")
    summary = outputs.markdown(report, "ssl-bench regress --suite ci/suite.yaml --update")
    assert summary.startswith("### ssl-bench regress: DRIFT") and "**3 of 6 metrics drifted**" in summary
    assert f"| `{K5}` | miou |" in summary.split("<details>")[0]  # the failures first, the rest folded away
    assert "`ssl-bench regress --suite ci/suite.yaml --update`" in summary


def test_new_and_gone_cells_are_listed_and_update_adds_and_drops_them(user_suite):
    suite, baselines = user_suite
    regress.update(suite, baselines)
    edit_baselines(baselines, lambda d: d["cells"][K5].update(tolerance={"miou": {"relative": 0.1}}))
    write_suite(suite, k=["C", "3C"])  # K = 2C leaves the suite, K = 3C joins it
    k15 = "reference/kmeans/synthetic:val[n=6,size=64] K=15 seed=0 resize=64"
    report = regress.check(suite, baselines)
    assert report.exit_status == 1 and report.cells("new") == [k15] and report.cells("gone") == [K10]
    assert report.verdict() == "1 new cell, 1 gone cell"
    cases = junit_cases(outputs.junit(report))
    assert cases[(k15, "miou")].find("failure").get("type") == "new"
    assert "no baseline -- `--update` adds it" in cases[(k15, "acc")].find("failure").get("message")
    assert cases[(K10, "f1")].find("failure").get("type") == "gone"
    assert cases[(K5, "miou")].find("failure") is None
    assert "new cell" in outputs.text(report) and "GONE" in outputs.text(report)

    regress.update(suite, baselines)
    cells = json.loads(baselines.read_text())["cells"]
    assert set(cells) == {K5, k15}  # K10 dropped, K15 added
    assert cells[K5]["tolerance"] == {"miou": {"relative": 0.1}}  # a cell's own tolerance survives an update
    assert regress.check(suite, baselines).exit_status == 0


def test_must_not_drop_passes_a_rise_and_fails_a_drop_on_a_real_run(user_suite):
    suite, baselines = user_suite
    write_suite(suite, k=["C"])
    regress.update(suite, baselines)
    measured = json.loads(baselines.read_text())["cells"][K5]["metrics"]["miou"]

    def baseline_miou(value, tolerance):
        edit_baselines(baselines, lambda d: d["cells"][K5].update(metrics={**d["cells"][K5]["metrics"], "miou": value},
                                                                   tolerance={"miou": tolerance}))
        return {c.metric: c for c in regress.check(suite, baselines).checks if c.cell == K5}["miou"]

    one_sided = {"absolute": 0.5, "fail_on": "drop"}
    assert baseline_miou(measured - 3, one_sided).status == "ok"  # 3 points better: passes
    assert baseline_miou(measured - 3, {"absolute": 0.5}).status == "drift"  # two-sided: the same rise fails
    drop = baseline_miou(measured + 3, one_sided)  # 3 points worse: fails
    assert drop.status == "drift" and drop.tolerance.text() == "drop <= 0.5" and "-3.00" in drop.message()
    assert baseline_miou(measured + 0.4, one_sided).status == "ok"  # a fall within the tolerance


# ---- tolerances and the baselines file -----------------------------------------------------------------

@pytest.mark.parametrize("written, baseline, now, passes, text", [
    (0.5, 60.0, 60.5, True, "+-0.5"),
    (0.5, 60.0, 59.4, False, "+-0.5"),
    ({"absolute": 1}, 60.0, 61.0, True, "+-1"),
    ({"relative": 0.02}, 50.0, 51.0, True, "+-2%"),  # 2% of 50 = 1 point
    ({"relative": 0.02}, 50.0, 48.99, False, "+-2%"),
    ({"relative": 0.02, "fail_on": "drop"}, 50.0, 90.0, True, "drop <= 2%"),
    ({"absolute": 0, "fail_on": "drop"}, 50.0, 49.99, False, "drop <= 0"),
])
def test_tolerances_absolute_relative_and_one_sided(written, baseline, now, passes, text):
    tolerance = Tolerance.parse(written, "here")
    assert tolerance.passes(baseline, now) is passes and tolerance.text() == text


def test_a_cell_tolerance_replaces_the_file_tolerance_for_its_metrics_only(tmp_path):
    baselines = Baselines(tmp_path / "b.json", {"miou": {"relative": 0.01}},
                          {"a": {"config": {}, "metrics": {}, "tolerance": {"acc": {"absolute": 3}}}})
    assert baselines.tolerance_for("a", "acc") == Tolerance(3.0)
    assert baselines.tolerance_for("a", "miou") == Tolerance(0.01, relative=True)
    assert baselines.tolerance_for("b", "f1") == Tolerance(0.5)  # the default: 0.5 points either way


@pytest.mark.parametrize("text, message", [
    ('{"cells": {', "is not valid JSON"),
    ("[1, 2]", "not an ssl-bench baselines file"),
    ('{"cells": {"a": {"config": {}, "metrics": {"miou": "x"}}}}', "cell a is not"),
    ('{"cells": {"a": {"metrics": {"miou": 1}}}}', "cell a is not"),
    ('{"tolerance": {"miou": "1%"}, "cells": {}}', 'tolerance of miou: "1%" is not a tolerance -- write 0.5'),
    ('{"cells": {"a": {"config": {}, "metrics": {}, "tolerance": {"f1": {"absolute": 1, "relative": 0.1}}}}}',
     "cell a: tolerance of f1"),
    ('{"cells": {"a": {"config": {}, "metrics": {}, "weights": "abc"}}}', 'weights must be {"sha256"'),
    ('{"cases": {"a": {"miou": 1}}, "tolerance": {}}', "in the first baselines format"),
])
def test_a_broken_baselines_file_fails_before_the_suite(tmp_path, text, message):
    (tmp_path / "b.json").write_text(text)
    with pytest.raises(UserError, match=message):
        regress.read_baselines(tmp_path / "b.json")


def test_baselines_are_written_one_line_per_field_and_read_back(tmp_path):
    baselines = Baselines(tmp_path / "b.json", {"miou": 0.5}, {
        "x": {"config": {"backbone": "reference", "k": 5}, "metrics": {"miou": 1.25, "acc": 2.0, "f1": 3.0},
              "weights": {"sha256": "ab" * 32}}})
    regress.write_baselines(baselines)
    text = (tmp_path / "b.json").read_text()
    assert '      "metrics": {"miou": 1.25, "acc": 2.0, "f1": 3.0},\n' in text  # a changed number: a one-line diff
    back = regress.read_baselines(tmp_path / "b.json")
    assert back.cells == baselines.cells and back.tolerance == {"miou": 0.5}


def test_cell_names_say_weights_params_options_and_protocol():
    entry = {"backbone": "dino-vits16", "weights": "random", "weights_seed": 3, "task": "kmeans",
             "params": {"iterations": 5}, "dataset": "camvid", "split": "val", "options": {"limit": 8}, "k": 11,
             "seed": 1, "protocol": {"resize": 448, "crop": "none"}}
    assert regress.cell_name(entry) == \
        "dino-vits16(random:3)/kmeans(iterations=5)/camvid:val[limit=8] K=11 seed=1 resize=448 crop=none"
    assert regress.cell_name({"backbone": "dino-vits16", "weights": "ckpt/last.pth", "task": "kmeans",
                              "dataset": "suim", "split": "test", "k": 6, "seed": 0}) == \
        "dino-vits16(ckpt/last.pth)/kmeans/suim:test K=6 seed=0"


# ---- weights identified by content -------------------------------------------------------------------

def _checkpoint(path: Path, seed: int) -> None:
    """A random moco-resnet18 in the MoCo v2 release layout (the registry's checkpoint rules read it)."""
    import torch

    from ssl_bench.models import build_backbone, resolve

    spec = registry.backbone("moco-resnet18")
    model = build_backbone(spec, resolve(spec, "random", seed), seed)
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in model.model.state_dict().items()}}, path)


@pytest.mark.slow
def test_weights_this_path_whatever_it_holds_or_exactly_this_file(tmp_path):
    latest, pinned = tmp_path / "latest.pth", tmp_path / "pinned.pth"
    _checkpoint(latest, seed=0)
    _checkpoint(pinned, seed=1)
    suite, baselines = tmp_path / "suite.yaml", tmp_path / "baselines.json"
    write_suite(suite, backbones=[{"name": "moco-resnet18", "weights": str(latest)},
                                  {"name": "moco-resnet18", "weights": str(pinned), "weights_match": "exact"}],
                datasets=[{"name": "synthetic", "options": {"n": 4, "size": 64}}], k=["C"])
    regress.update(suite, baselines)
    name = {w: f"moco-resnet18({w})/kmeans/synthetic:val[n=4,size=64] K=5 seed=0 resize=64" for w in (latest, pinned)}
    cells = json.loads(baselines.read_text())["cells"]
    assert cells[name[pinned]]["weights"]["sha256"] == registry_sha(pinned)  # the digest of the file's content
    assert regress.check(suite, baselines).exit_status == 0

    _checkpoint(latest, seed=2)  # the next training run overwrites its checkpoint
    _checkpoint(pinned, seed=3)  # someone replaced the pinned file
    computed = []
    report = regress.check(suite, baselines, on_cell=lambda cell, status: computed.append(cell))
    assert computed == [name[latest]]  # the cell on other weights than its pinned file is not computed
    refused = [c for c in report.checks if c.cell == name[pinned]]
    assert [c.status for c in refused] == ["weights"] * 3 and report.exit_status == 1
    assert "the baselines were measured on exactly" in refused[0].message()
    assert all(c.status in ("ok", "drift") for c in report.checks if c.cell == name[latest])  # compared anyway
    assert any(f"weights {latest} changed since the baselines" in note for note in report.notes)
    assert junit_cases(outputs.junit(report))[(name[pinned], "miou")].find("failure").get("type") == "weights"

    regress.update(suite, baselines)  # accepting the new files is explicit
    assert json.loads(baselines.read_text())["cells"][name[pinned]]["weights"]["sha256"] == registry_sha(pinned)
    assert regress.check(suite, baselines).exit_status == 0


def test_a_cells_name_keeps_the_weights_path_as_the_suite_writes_it_in_any_checkout(tmp_path, runner):
    """A baseline made in one checkout holds in another (a CI runner's): the name is the file's text, not the
    absolute path the run loads (read against the suite's own folder)."""
    from ssl_bench.sweep import make_plan

    names = []
    for checkout in ("mine", "ci-runner"):
        (tmp_path / checkout / "checkpoints").mkdir(parents=True)
        _checkpoint(tmp_path / checkout / "checkpoints" / "latest.pth", seed=0)
        suite = tmp_path / checkout / "ci" / "suite.yaml"
        suite.parent.mkdir()
        write_suite(suite, backbones=[{"name": "moco-resnet18", "weights": "../checkpoints/latest.pth"}], k=["C"])
        read = regress.read_suite(suite)
        [cell] = make_plan(read.grids, runner).cells
        assert cell.run.weights.path == tmp_path / checkout / "checkpoints" / "latest.pth"  # the file it loads
        entry = regress.cell_entry(cell, read.written)
        assert entry["weights"] == "../checkpoints/latest.pth"
        names.append(regress.cell_name(entry))
    assert names[0] == names[1] == "moco-resnet18(../checkpoints/latest.pth)/kmeans/synthetic:val[n=6,size=64] K=5 " \
                                   "seed=0 resize=64"


def registry_sha(path: Path) -> str:
    from ssl_bench.models.weights import sha256_of

    return sha256_of(path)


# ---- the command line: exit status and CI files ------------------------------------------------------

def test_cli_drift_exits_1_with_table_junit_and_markdown_and_never_touches_the_users_store(user_suite, tmp_path,
                                                                                            monkeypatch):
    from typer.testing import CliRunner

    from ssl_bench.cli import app

    suite, baselines = user_suite
    regress.update(suite, baselines)
    edit_baselines(baselines, lambda d: d["cells"][K5]["metrics"].update(miou=d["cells"][K5]["metrics"]["miou"] - 3))
    users = {"SSL_BENCH_STORE": str(tmp_path / "user.sqlite"), "SSL_BENCH_CACHE": str(tmp_path / "user-cache")}
    for key, value in users.items():
        monkeypatch.setenv(key, value)
    junit, summary = tmp_path / "out" / "regress.xml", tmp_path / "out" / "regress.md"
    result = CliRunner().invoke(app, ["regress", "--suite", str(suite), "--junit", str(junit), "--markdown",
                                      str(summary), "--only", "K=5"])
    assert result.exit_code == 1, result.output
    drift_line = next(line for line in result.stdout.splitlines() if "DRIFT" in line)
    assert K5 in drift_line and "miou" in drift_line and "+3.00" in drift_line and "+-0.5" in drift_line
    assert "regress: 1 of 3 metrics drifted (1 cell," in result.stdout  # --only K=5: K10 neither run nor gone
    assert f"ssl-bench regress --suite {suite} --only K=5 --update" in result.stdout  # baselines beside the suite
    failure = junit_cases(junit.read_text())[(K5, "miou")].find("failure")
    assert failure is not None and "+3.00 (beyond tolerance +-0.5)" in failure.get("message")
    assert "### ssl-bench regress: DRIFT" in summary.read_text()
    assert not any(Path(p).exists() for p in users.values())  # the suite never touches the user's store or cache


def test_cli_could_not_run_exits_2_and_says_why_in_the_ci_files(tmp_path, monkeypatch, capsys):
    from ssl_bench.cli import main

    suite = tmp_path / "suite.yaml"
    write_suite(suite, datasets=[{"name": "camvid", "data_root": str(tmp_path / "no-camvid")}])  # not optional
    (tmp_path / "baselines.json").write_text('{"cells": {}}')
    junit, summary = tmp_path / "r.xml", tmp_path / "r.md"
    monkeypatch.setattr(sys, "argv", ["ssl-bench", "regress", "--suite", str(suite), "--junit", str(junit),
                                      "--markdown", str(summary)])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    error = ET.fromstring(junit.read_text()).find("testsuite/testcase/error")
    assert error is not None and "no-camvid" in error.get("message")
    assert summary.read_text().startswith("### ssl-bench regress: could not run")
    assert "error:" in capsys.readouterr().err


def test_a_cell_that_fails_makes_the_run_could_not_run(user_suite, monkeypatch):
    suite, baselines = user_suite
    regress.update(suite, baselines)

    def broken(ctx):
        raise RuntimeError("kaputt")

    monkeypatch.setattr("ssl_bench.methods.kmeans.run", broken)  # the task's entrypoint
    report = regress.check(suite, baselines)
    assert report.exit_status == 2 and report.verdict().startswith("2 cells could not run")
    error = junit_cases(outputs.junit(report))[(K5, "miou")].find("error")
    assert error is not None and "could not run: RuntimeError: kaputt" in error.get("message")
    regress.update(suite, baselines)  # nothing is written from a run that could not run
    assert json.loads(baselines.read_text())["cells"][K5]["metrics"]["miou"] > 0


def test_update_and_reports_are_separate_runs(user_suite):
    from typer.testing import CliRunner

    from ssl_bench.cli import app

    suite, _ = user_suite
    result = CliRunner().invoke(app, ["regress", "--suite", str(suite), "--update", "--junit", "r.xml"])
    assert "--update rewrites the baselines; --junit/--markdown report a comparison" in str(result.exception)


# ---- ssl-bench's own suite: the same mechanism ---------------------------------------------------------

def test_the_project_suite_is_a_suite_file_whose_cells_are_the_committed_baselines(runner):
    from ssl_bench.sweep import make_plan

    suite = regress.read_suite(regress.PROJECT_SUITE, regress.suite_environment(regress.PROJECT_SUITE))
    committed = regress.read_baselines(regress.default_baselines(regress.PROJECT_SUITE))
    assert regress.default_baselines(regress.PROJECT_SUITE) == ROOT / "results" / "regress" / "baselines.json"
    plan = make_plan(suite.grids, runner)
    names = {regress.cell_name(regress.cell_entry(cell)) for cell in plan.cells}
    if suite.skipped:  # no CamVid here: its cells are the committed ones this plan cannot have
        assert all("camvid" in name for name in set(committed.cells) - names)
    else:
        assert names == set(committed.cells)
    assert "dino-vits16(random)/primaps-em-fast(ema_every=1,epochs=10)/synthetic:val[n=12] K=5 seed=0" in names
    assert ".ci/run" and "ssl-bench regress\n" in (ROOT / ".ci" / "run").read_text()  # CI runs this suite


def test_project_real_data_cells_are_skipped_not_gone_without_the_shared_data(tmp_path, monkeypatch):
    from ssl_bench.regress.suite import SuiteRun

    monkeypatch.setenv("SSL_BENCH_SHARED_DATA", str(tmp_path / "nowhere"))
    suite = regress.read_suite(regress.PROJECT_SUITE, regress.suite_environment(regress.PROJECT_SUITE))
    assert len(suite.grids) == 3 and len(suite.skipped) == 3  # camvid, and voc2012 twice (the scoring rules)
    assert "(camvid) skipped:" in suite.skipped[0].reason and "nowhere/camvid absent" in suite.skipped[0].reason
    assert all("nowhere/voc2012 absent" in grid.reason for grid in suite.skipped[1:])
    committed = regress.read_baselines(regress.default_baselines(regress.PROJECT_SUITE))
    report = regress.compare(committed, SuiteRun({}, {}, {}, {}, suite.skipped, [], 0.0), regress.PROJECT_SUITE)
    real = {check.status for check in report.checks if "camvid" in check.cell or "voc2012" in check.cell}
    assert real == {"skipped"} and len(report.cells("skipped")) == 5  # not gone: the grids exist, their data not here
    assert all("camvid" not in name and "voc2012" not in name for name in report.cells("gone"))


def test_the_project_suite_reads_the_shared_data_beside_the_checkout_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv("SSL_BENCH_SHARED_DATA", raising=False)
    env = regress.suite_environment(regress.PROJECT_SUITE)
    assert env["SSL_BENCH_SHARED_DATA"].endswith("shared/data")
    user_suite = tmp_path / "suite.yaml"
    assert "SSL_BENCH_SHARED_DATA" not in regress.suite_environment(user_suite)  # a user's suite: the plain environment


# ---- the README's CI example -------------------------------------------------------------------------

def test_readme_workflow_is_the_committed_example_and_calls_real_options():
    import inspect

    from ssl_bench.cli import regress as command

    workflow = (ROOT / "examples" / "ci" / "ssl-bench-regress.yml").read_text()
    assert workflow.strip() in (ROOT / "README.md").read_text()  # the README shows the whole file
    steps = yaml.safe_load(workflow)["jobs"]["regress"]["steps"]
    line = next(step["run"] for step in steps if "ssl-bench regress" in step.get("run", ""))
    flags = {word for word in line.split() if word.startswith("--")}
    known = {f"--{name.replace('_', '-')}" for name in inspect.signature(command).parameters}
    assert {"--suite", "--baselines", "--junit", "--markdown"} <= flags <= known
    assert "examples/ci/ssl-bench-suite.yaml" in (ROOT / "README.md").read_text()


def test_example_suite_is_a_suite_and_names_its_cells(tmp_path, monkeypatch):
    example = ROOT / "examples" / "ci" / "ssl-bench-suite.yaml"
    monkeypatch.chdir(tmp_path)
    suite = regress.read_suite(example, {"DATA": str(tmp_path)})
    assert suite.grids and any(choice.weights_match == "exact" for grid in suite.grids for choice in grid.backbones)


def test_the_example_suite_finds_the_checkpoints_where_the_example_workflow_puts_them(tmp_path):
    """The workflow fetches into checkpoints/ and weights/ at the repository root and runs the suite from ci/:
    the suite's paths are read against its own folder."""
    from ssl_bench.sweep import read_grid_file

    suite = tmp_path / "ci" / "ssl-bench-suite.yaml"
    suite.parent.mkdir()
    suite.write_text((ROOT / "examples" / "ci" / "ssl-bench-suite.yaml").read_text())
    resolved: list = []
    read_grid_file(suite, "suite file", resolved)
    loaded = {Path(absolute).relative_to(tmp_path).as_posix() for _, absolute in resolved}
    assert loaded == {"checkpoints/latest.pth", "weights/dino_deitsmall16_pretrain.pth"}
    workflow = (ROOT / "examples" / "ci" / "ssl-bench-regress.yml").read_text()
    assert "checkpoints/latest.pth" in workflow and "--suite ci/ssl-bench-suite.yaml" in workflow
