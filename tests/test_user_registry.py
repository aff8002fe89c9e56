"""Registry entries of the user's own (issue 19): folders (--registry, $SSL_BENCH_REGISTRY) and the entry points
of an installed package; a name clashing with a built-in entry is one error naming both files."""

import sys
import textwrap

import pytest
from typer.testing import CliRunner

from ssl_bench import registry
from ssl_bench.cli import app
from ssl_bench.errors import UserError

BACKBONE = """\
family: mine
builder: ssl_bench.models.vit:build
pretraining_data: my photos
licence: MIT
models:
  - {name: NAME, arch: vit_small_patch16_224, patch_size: 16, embed_dim: 32, heads: 2, params_m: 0.04,
     options: {depth: 1, embed_dim: 32, num_heads: 2}, file: NAME.pth}
"""
TASK = """\
name: NAME
title: my k-means
entrypoint: ssl_bench.methods.kmeans:run
features: [patch]
params: {crf: false, crf_alpha: 2.0, fit_split: null, max_fit_patches: 200000, iterations: 5}
"""
STAGE = """\
name: NAME
kind: clusterer
title: my k-means clusterer
entrypoint: ssl_bench.stages.clusterers.kmeans:KMeans
params: {}
"""


@pytest.fixture(autouse=True)
def fresh_registries(monkeypatch):
    monkeypatch.delenv(registry.REGISTRY_ENV, raising=False)
    registry.refresh()
    yield
    registry.refresh()


@pytest.fixture
def own(tmp_path):
    """A user registry folder: the built-in layout (backbones/, tasks/, stages/<kind>s/) and a flat file."""
    folder = tmp_path / "my-registry"
    for sub, text, name in (("backbones", BACKBONE, "my-vit"), ("tasks", TASK, "my-kmeans"),
                            ("stages/clusterers", STAGE, "my-clusterer")):
        (folder / sub).mkdir(parents=True)
        (folder / sub / f"{name}.yaml").write_text(text.replace("NAME", name))
    (folder / "flat-task.yaml").write_text(TASK.replace("NAME", "my-flat-kmeans"))  # a file at the top: by content
    return folder


def test_folder_entries_register_with_their_source(own, monkeypatch):
    monkeypatch.setenv(registry.REGISTRY_ENV, str(own))
    spec = registry.backbone("my-vit")
    assert spec.family == "mine" and spec.source == str(own / "backbones" / "my-vit.yaml")
    assert registry.task("my-kmeans").source == str(own / "tasks" / "my-kmeans.yaml")
    assert registry.task("my-flat-kmeans").params["iterations"] == 5
    assert registry.stage_spec("clusterer", "my-clusterer").source.endswith("my-clusterer.yaml")
    assert "dino-vits16" in registry.backbones()  # the built-in entries stay
    monkeypatch.delenv(registry.REGISTRY_ENV)
    assert "my-vit" not in registry.backbones()  # read per set of folders: gone with the variable


@pytest.fixture
def wide(monkeypatch):
    """The CLI's consoles 300 columns wide, whatever width they were made with earlier in the session."""
    from ssl_bench import cli

    for console in (cli.out, cli.console):
        monkeypatch.setattr(console, "width", 300)


def test_list_shows_user_entries_with_their_file(own, tmp_path, monkeypatch, wide):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(registry.REGISTRY_ENV, "")
    result = CliRunner().invoke(app, ["list", "backbones", "--registry", str(own)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    line = next(row for row in result.output.splitlines() if row.startswith("my-vit"))
    assert "my-registry/backbones/my-vit.yaml" in line
    assert "built-in" in next(row for row in result.output.splitlines() if row.startswith("dino-vits16"))
    tasks = CliRunner().invoke(app, ["list", "tasks", "--registry", str(own)], env={"COLUMNS": "300"})
    assert "my-registry/flat-task.yaml" in tasks.output
    monkeypatch.delenv(registry.REGISTRY_ENV)  # --registry put the folder there, for what the command starts
    plain = CliRunner().invoke(app, ["list", "backbones"], env={"COLUMNS": "300"})
    assert "source" not in plain.output.splitlines()[0]  # no user entries: the usual columns


def test_a_clash_with_a_built_in_entry_names_both_files(own, monkeypatch):
    (own / "backbones" / "clash.yaml").write_text(BACKBONE.replace("NAME", "dino-vits16"))
    monkeypatch.setenv(registry.REGISTRY_ENV, str(own))
    with pytest.raises(UserError) as err:
        registry.backbones()
    message = str(err.value)
    assert "dino-vits16" in message and "backbones/dino.yaml" in message and str(own / "backbones" / "clash.yaml") in message
    (own / "tasks" / "clash.yaml").write_text(TASK.replace("NAME", "kmeans"))
    with pytest.raises(UserError, match=r"'kmeans' is registered twice, by .*tasks/kmeans.yaml and by .*clash.yaml"):
        registry.tasks()


def test_a_missing_registry_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.REGISTRY_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="is not a folder"):
        registry.backbones()
    monkeypatch.delenv(registry.REGISTRY_ENV)
    result = CliRunner().invoke(app, ["list", "tasks", "--registry", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and "is not a folder" in str(result.exception)


def test_a_task_file_lacking_a_parameter_its_entrypoint_reads_is_one_line(own, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    short = TASK.replace("NAME", "my-short-kmeans").replace(", max_fit_patches: 200000", "")
    (own / "tasks" / "short.yaml").write_text(short)
    result = CliRunner().invoke(app, ["run", "--task", "my-short-kmeans", "--registry", str(own), "-o", "n=2",
                                      "--k", "2", "--store", str(tmp_path / "r.sqlite"), "--cache", str(tmp_path / "c")])
    assert isinstance(result.exception, UserError), result.output  # not a KeyError traceback
    assert str(result.exception) == (f"task 'my-short-kmeans' has no parameter 'max_fit_patches', which its entrypoint "
                                     f"ssl_bench.methods.kmeans:run reads -- add max_fit_patches: VALUE under params: "
                                     f"in {own / 'tasks' / 'short.yaml'}")


def test_a_task_whose_module_cannot_be_imported_fails_before_any_extraction(own, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (own / "tasks" / "mine.yaml").write_text(TASK.replace("NAME", "my-method").replace("ssl_bench.methods.kmeans",
                                                                                     "my_method_module"))
    cache = tmp_path / "c"
    result = CliRunner().invoke(app, ["run", "--task", "my-method", "--registry", str(own), "-o", "n=2", "--k", "2",
                                      "--store", str(tmp_path / "r.sqlite"), "--cache", str(cache)])
    assert isinstance(result.exception, UserError), result.output
    assert "entrypoint 'my_method_module:run' cannot be imported" in str(result.exception)
    assert "add the folder holding it to PYTHONPATH" in str(result.exception)
    assert not any(cache.rglob("*.npy"))  # refused before the features were extracted


def install_plugin(site, name="ssl_bench_plugin_demo"):
    """What ``pip install`` of a separate package leaves behind: its module and a dist-info with entry points."""
    package = site / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(f'''
        from ssl_bench.methods import kmeans

        BACKBONES = {{"family": "demo", "builder": "ssl_bench.models.vit:build", "pretraining_data": "demo data",
                     "licence": "MIT", "models": [{{"name": "demo-vit", "arch": "vit_small_patch16_224",
                     "patch_size": 16, "embed_dim": 32, "heads": 2, "params_m": 0.04,
                     "options": {{"depth": 1, "embed_dim": 32, "num_heads": 2}}}}]}}

        def tasks():  # an entry point may also be a function returning the entries
            return [{{"name": "demo-kmeans", "title": "the demo package's k-means",
                      "entrypoint": "{name}:run", "features": ["patch"],
                     "params": {{"crf": False, "crf_alpha": 2.0, "fit_split": None, "max_fit_patches": 200000,
                                 "iterations": 5}}}}]

        STAGES = {{"name": "demo-clusterer", "kind": "clusterer", "title": "demo",
                  "entrypoint": "ssl_bench.stages.clusterers.kmeans:KMeans", "params": {{}}}}

        def run(ctx):
            return kmeans.run(ctx)
        '''))
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ssl_bench.backbones]\ndemo = {name}:BACKBONES\n\n"
                                           f"[ssl_bench.tasks]\ndemo = {name}:tasks\n\n"
                                           f"[ssl_bench.stages]\ndemo = {name}:STAGES\n")
    return name


def test_an_installed_package_registers_models_tasks_and_stages(tmp_path, monkeypatch, runner, wide):
    site = tmp_path / "site-packages"
    name = install_plugin(site)
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    spec = registry.backbone("demo-vit")
    assert spec.family == "demo" and f"entry point 'demo' ({name}:BACKBONES, package {name})" in spec.source
    assert registry.task("demo-kmeans").entrypoint == f"{name}:run"
    assert registry.stage_spec("clusterer", "demo-clusterer").title == "demo"
    from ssl_bench.runner import RunConfig

    outcome = runner.run(RunConfig(backbone="demo-vit", task="demo-kmeans", dataset="synthetic", weights="random",
                                   dataset_options=(("limit", 2),)))
    assert outcome.computed and outcome.record["backbone"] == "demo-vit" and outcome.record["random_weights"]
    result = CliRunner().invoke(app, ["list", "backbones"], env={"COLUMNS": "300"})
    assert f"{name}:BACKBONES" in next(row for row in result.output.splitlines() if row.startswith("demo-vit"))


def test_a_broken_plugin_is_one_line_naming_it(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    name = install_plugin(site, "ssl_bench_plugin_broken")
    (site / name / "__init__.py").write_text("raise ImportError('missing dependency torchgeo')\n")
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    with pytest.raises(UserError, match=rf"entry point 'demo' \({name}:BACKBONES.*cannot be loaded .*torchgeo"):
        registry.backbones()
    sys.modules.pop(name, None)


def test_a_task_file_with_a_missing_or_unknown_key_names_them(own, monkeypatch):
    (own / "tasks" / "bad.yaml").write_text("name: bad\nfeatures: [patch]\nparams: {}\nfoo: 1\n")
    monkeypatch.setenv(registry.REGISTRY_ENV, str(own))
    with pytest.raises(UserError) as err:
        registry.tasks()
    message = str(err.value)
    assert "bad.yaml: bad task entry: unknown key(s) foo; missing key(s) title, entrypoint -- keys: name," in message
    assert "__init__" not in message and "source" not in message.split("keys:")[1]


@pytest.mark.parametrize("extra, message", [
    ("uses_labels: {nope: [x]}\n", "uses_labels maps parameters of the task"),
    ("renamed: {old_iters: nope}\n", "renamed: old_iters -> nope names no parameter of the task"),
    ("slow_on_cpu: {when: {nope: 1}, why: w, instead: i}\n", "slow_on_cpu needs when"),
])
def test_declarative_task_keys_that_name_no_parameter_are_one_line(own, monkeypatch, extra, message):
    (own / "tasks" / "mine.yaml").write_text(TASK.replace("NAME", "my-declared") + extra)
    monkeypatch.setenv(registry.REGISTRY_ENV, str(own))
    with pytest.raises(UserError, match=message):
        registry.tasks()
    (own / "tasks" / "mine.yaml").write_text(TASK.replace("NAME", "my-declared")
                                             + "renamed: {iters: iterations}\nuses_labels: {crf: [true]}\n")
    registry.refresh()
    spec = registry.tasks()["my-declared"]
    assert spec.reads_ground_truth({"crf": True}) and not spec.reads_ground_truth({"crf": False})
    with pytest.raises(UserError, match=r"iters is now iterations"):
        spec.resolve_params({"iters": 3})
