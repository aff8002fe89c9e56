"""Bad input that once escaped as a traceback, a hang or an exhausted memory: each is one ``error:`` line now."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ssl_bench

ROOT = Path(ssl_bench.__file__).resolve().parents[1]


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """``cli(*args)``: ``ssl-bench ARGS`` in this process (store and cache under tmp_path) -> (exit code, output)."""
    from ssl_bench.cli import main

    def run(*args) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["ssl-bench", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # main() installs its own
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    monkeypatch.setenv("SSL_BENCH_STORE", str(tmp_path / "results.sqlite"))
    monkeypatch.setenv("SSL_BENCH_CACHE", str(tmp_path / "cache"))
    return run


def one_error_line(out: str) -> str:
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    return errors[0]


def test_a_checkpoint_of_another_model_size_is_one_line(cli, tmp_path):
    from ssl_bench import registry
    from ssl_bench.models.vit import create

    torch.save(create(registry.backbone("dino-vitb16")).state_dict(), tmp_path / "vitb16.pth")  # a ViT-B file ...
    code, out = cli("run", "--backbone", "dino-vits16", "--weights", tmp_path / "vitb16.pth", "-o", "n=2")  # for ViT-S
    assert code == 2
    assert "does not fit dino-vits16: 150 weights have another shape (e.g. cls_token: (1, 1, 768) in the file, " \
           "(1, 1, 384) in dino-vits16)" in one_error_line(out)


def folder_dataset(root: Path, names=("a", "b")) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("x\ny\n")
    for name in names:
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / f"{name}.png")
    return root


@pytest.mark.slow
def test_a_fifo_in_a_dataset_is_one_line_not_a_hang(tmp_path):
    root = folder_dataset(tmp_path / "data")
    (root / "images" / "b.png").unlink()
    os.mkfifo(root / "images" / "b.png")  # nothing ever writes to it: opening it for reading blocks forever
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SSL_BENCH_STORE": str(tmp_path / "s.sqlite"),
           "SSL_BENCH_CACHE": str(tmp_path / "cache")}
    try:
        proc = subprocess.run([sys.executable, "-m", "ssl_bench", "run", "--dataset", "folder", "--data-root", root],
                              capture_output=True, text=True, env=env, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung on a FIFO in the dataset")
    assert proc.returncode == 2
    assert "b.png is a FIFO, not a regular file" in one_error_line(proc.stderr)


def test_a_device_or_a_text_file_that_is_not_text_is_one_line(tmp_path):
    from ssl_bench.data import open_dataset
    from ssl_bench.errors import UserError

    root = folder_dataset(tmp_path / "data")
    (root / "masks" / "a.png").unlink()
    (root / "masks" / "a.png").symlink_to("/dev/zero")
    dataset = open_dataset("folder", root, "val")
    with pytest.raises(UserError, match="a.png is a device, not a regular file"):
        dataset.load_label(0)
    (root / "classes.txt").write_bytes(b"x\n\xff\xfe\n")
    with pytest.raises(UserError, match="classes.txt is not a UTF-8 text file"):
        open_dataset("folder", root, "val")


def test_a_seed_the_store_cannot_hold_is_refused_before_anything_runs(cli, tmp_path):
    code, out = cli("run", "--seed", 2**63, "-o", "n=2")
    assert code == 2 and "the seed must be 0 to 2^63-1, got 9223372036854775808" in one_error_line(out)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"backbones: [reference]\ntasks: [kmeans]\ndatasets: [{{name: synthetic, options: {{n: 2}}}}]\n"
                     f"seeds: [0, {2**64}]\n")
    code, out = cli("sweep", sweep)
    assert code == 2 and "seeds must be whole numbers from 0 to 2^63-1" in one_error_line(out)
    assert "computed" not in out and not (tmp_path / "cache").exists()  # refused before any work


def alias_bomb(levels: int) -> str:
    """A YAML flow list of a few lines whose aliases stand for more than 10**levels values."""
    items = ["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "[" + ",\n  ".join(items) + "]"


def test_yaml_alias_bombs_and_lists_as_options_are_one_short_line(cli, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("backbones: [reference]\ntasks: [kmeans]\ndatasets: [synthetic]\nseeds: " + alias_bomb(6) + "\n")
    code, out = cli("sweep", sweep)  # over a million seeds, which the error message once spelled out
    line = one_error_line(out)
    assert code == 2 and "expands to more than 100,000 values" in line and len(line) < 400, line[:400]
    code, out = cli("run", "-p", "iterations=" + alias_bomb(6))
    line = one_error_line(out)
    assert code == 2 and "expands to more than 100,000 values" in line and len(line) < 400, line[:400]
    sweep.write_text("backbones: [reference]\ntasks: [kmeans]\ndatasets: [{name: synthetic, options: {n: [1, 2]}}]\n")
    code, out = cli("sweep", sweep)
    assert code == 2 and "option n=[1, 2] must be a single value, not a list" in one_error_line(out)
    code, out = cli("run", "-o", "seed={a: 1}")
    assert code == 2 and "option seed={'a': 1} must be a single value, not a dict" in one_error_line(out)


@pytest.fixture
def machine_of_24_gib(monkeypatch):
    """The checks read this machine's memory: the same refusals on a laptop and on a big GPU node."""
    try:
        from ssl_bench import resources
    except ImportError:  # an ssl-bench without bounds (the test must fail there, not here)
        return
    monkeypatch.setattr(resources, "memory_limit", lambda: 24 * 2**30)


@pytest.mark.parametrize("args, message", [
    (["--resize", 100_000], r"--resize 100000 \(a batch of 8 images of at least 100000x100000 pixels, 156,250,000 "
                            r"patches each\) would need at least [\d,.]+ GiB of memory; this machine has"),
    (["-o", "size=200000"], r"synthetic size=200000 \(one 200000x200000 image\) would need at least [\d,.]+ GiB"),
    (["-o", "n=10000000000000"], r"synthetic n=10000000000000 \(its list of image ids\) would need at least"),
    (["-o", "n=125", "--k", 200_000], r"K=200000 clusters would need at least 298.0 GiB of memory; this machine has "
                                      r"24.0 GiB"),  # 200,000 patches: enough for k-means to take them
    (["--task", "datus2", "--backbone", "dino-vits16", "--weights", "random", "-p", "embed.size=1000000"],
     r"embed.size=1000000 with embed.batch_size=64 would need at least"),
    (["--task", "datus2", "--backbone", "dino-vits16", "--weights", "random", "-p", "denoiser={input_size: 99999}"],
     r"denoiser input_size=99999 with batches of 16 would need at least"),
])
def test_sizes_that_cannot_fit_are_refused_with_the_memory_they_need(cli, machine_of_24_gib, args, message):
    import re

    code, out = cli("run", *(["-o", "n=2"] if "-o" not in args else []), *args)
    assert code == 2 and re.search(message, one_error_line(out)), out[-2000:]


def cli_without(module: str, args: list[str], tmp_path) -> subprocess.CompletedProcess:
    """``ssl-bench ARGS`` in a new process where importing ``module`` fails as a missing package does (an import
    hook), store and cache under tmp_path."""
    code = f"""
import builtins, sys
real = builtins.__import__
def hidden(name, *args, **kwargs):
    if name.split(".")[0] == {module!r}:
        raise ModuleNotFoundError("No module named " + repr(name), name=name)
    return real(name, *args, **kwargs)
builtins.__import__ = hidden
sys.argv = ["ssl-bench", *{args!r}, "--store", {str(tmp_path / 's.sqlite')!r}, "--cache", {str(tmp_path / 'cache')!r}]
from ssl_bench.cli import main
main()
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_a_missing_optional_package_is_one_line_naming_the_extra(tmp_path):
    """open_clip absent: `ssl-bench run --backbone open_clip:...` says which extra."""
    done = cli_without("open_clip", ["run", "--backbone", "open_clip:ViT-B-16/laion2b_s34b_b88k", "--weights", "random",
                                     "--task", "kmeans", "--dataset", "synthetic", "-o", "n=2"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "error: this needs the package open_clip -- pip install ssl-bench[hub]"


def test_a_missing_requirement_is_one_line_naming_what_pip_installs(tmp_path):
    """faiss absent (an install with --no-deps, a machine's own image): one line naming the distribution to
    install (faiss-cpu, not the module's name), not a traceback."""
    done = cli_without("faiss", ["run", "--task", "kmeans", "--dataset", "synthetic", "-o", "n=2"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("error: ssl-bench needs the package faiss-cpu (module faiss), which is not "
                                   "installed -- pip install faiss-cpu (one of ssl-bench's requirements)")


def test_every_requirement_has_its_missing_package_line():
    """Each dependency in pyproject.toml is named by ``REQUIRED_PACKAGES`` (a new one without its import name
    would be a traceback again when missing)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11+")
    import re

    from ssl_bench.cli import REQUIRED_PACKAGES

    pyproject = Path(ssl_bench.__file__).parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("an installed ssl-bench without its pyproject.toml")
    requirements = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}
    assert names <= set(REQUIRED_PACKAGES.values())


def hide_pydensecrf(monkeypatch) -> None:
    """pydensecrf not importable in this process (None in sys.modules: an import raises ImportError)."""
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("task, args, switches", [
    ("primaps-em", [], "-p proposal_crf=false --no-crf"),
    ("primaps-em", ["--no-crf"], "-p proposal_crf=false"),
    ("primaps-baseline", ["--crf"], "--no-crf"),  # no proposals in this mode: only the evaluation's CRF
    ("stego", [], "--no-crf"),
    ("kmeans", ["--crf"], "--no-crf"),
    ("dsm", ["--backbone", "dino-vits16", "--weights", "random"], "--no-crf"),
])
def test_a_crf_the_library_cannot_run_is_refused_before_the_method_works(cli, monkeypatch, task, args, switches):
    """pydensecrf absent: the run stops as its method starts, naming every option that turns off a CRF this run
    would do (PriMaPs-EM's pseudo-label CRF too), not after the training (STEGO: 5,000 steps) or the clustering."""
    from ssl_bench.methods import stego

    def trained_head(*_):
        raise AssertionError("trained before the CRF was found missing")

    hide_pydensecrf(monkeypatch)
    monkeypatch.setattr(stego, "trained_head", trained_head)
    code, out = cli("run", "--task", task, *args, "-o", "n=2")
    assert code == 2 and one_error_line(out) == (f"error: dense CRF needs pydensecrf -- `pip install pydensecrf2`, "
                                                 f"or run with {switches}")


def test_without_a_crf_the_missing_library_stops_nothing(cli, monkeypatch):
    hide_pydensecrf(monkeypatch)
    code, out = cli("run", "--task", "kmeans", "-o", "n=2")  # k-means' default: no CRF
    assert code == 0, out


@pytest.mark.parametrize("args, line", [
    (["run", "--k", "-3"], "K must be at least 1, got -3"),  # was: "is not a number or a multiple of C"
    (["run", "-p", "iterations"], "--param 'iterations' is not key=value -- e.g. --param iterations=VALUE"),
    (["sweep", "--backbone", "reference", "--task", "kmeans", "--plan"], "--dataset missing -- give the datasets"),
    (["sweep", "--backbone", "reference", "--dataset", "synthetic", "--plan"], "--task missing -- give the tasks"),
    (["report", "--weights", "random"], "--weights chooses a --rows table's cells -- add --rows"),
    (["list", "segmenter"], "cannot list 'segmenter' -- choose backbones, tasks, stages (or one kind: segmenters"),
])
def test_what_a_first_user_mistyped_is_one_line_that_points_the_right_way(cli, args, line):
    code, output = cli(*args)
    assert code == 2 and line in output and "Traceback" not in output, output
    assert len([row for row in output.splitlines() if row.startswith("error:")]) == 1


def test_the_stage_list_an_error_points_to_exists_and_an_empty_checkpoint_says_so(cli, tmp_path):
    code, output = cli("run", "--task", "dsm", "-p", "segmenter=foo")
    assert code == 2 and "see `ssl-bench list segmenters`" in output, output
    code, output = cli("list", "segmenters")
    assert code == 0 and "dsm" in output and "louvain" in output and "sinkhorn" not in output  # a clusterer
    (tmp_path / "empty.pth").write_bytes(b"")
    code, output = cli("run", "--backbone", "dino-vits16", "--weights", tmp_path / "empty.pth")
    assert code == 2 and "(EOFError: the file is empty)" in output, output


def test_crf_switch_and_parameter_that_disagree_are_refused(cli):
    code, out = cli("run", "--task", "kmeans", "--crf", "-p", "crf=false", "-o", "n=2")
    assert code == 2 and one_error_line(out) == "error: --crf and -p crf=false disagree -- give one"
    code, out = cli("run", "--task", "kmeans-crf", "--no-crf", "-p", "crf=true", "-o", "n=2")
    assert code == 2 and "--no-crf and -p crf=true disagree" in out


def test_a_cache_that_cannot_be_a_folder_is_one_line_for_run_and_sweep(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for cache in (blocker, blocker / "sub"):  # the folder itself, or one above it, is a file
        code, out = cli("run", "-o", "n=2", "--cache", cache)
        assert code == 2 and one_error_line(out) == (f"error: the feature cache {cache} cannot be a folder: {blocker} "
                                                     f"is a file -- give a folder (--cache or $SSL_BENCH_CACHE; made "
                                                     f"if missing)")
        code, out = cli("sweep", "-b", "reference", "-t", "kmeans", "-d", "synthetic", "-o", "n=2", "--cache", cache)
        assert code == 2 and "is a file -- give a folder" in one_error_line(out)
    from ssl_bench.integrity import disk_error

    # a folder that cannot be made though no file is in the way (a path under /proc)
    err = disk_error(FileNotFoundError(2, "No such file or directory", "/proc/nope"), Path("/proc/nope/x"), "the features",
                     "pass --cache")
    assert str(err) == ("/proc/nope/x cannot be made a folder (No such file or directory: /proc/nope) and the features "
                        "must be written there -- pass --cache")
    from ssl_bench.errors import UserError
    from ssl_bench.sweep import one_line

    assert one_line(UserError("a line -- the fix")) == "a line -- the fix"  # no class name before a user's line
    assert one_line(ValueError("bad")) == "ValueError: bad"


def test_a_k_past_the_patches_is_said_before_the_memory_it_would_take(cli, machine_of_24_gib):
    code, out = cli("run", "-o", "n=4", "--k", "100000")  # 4 images hold far fewer patches than that
    assert code == 2 and "K=100000 clusters need at least 100000 patches" in one_error_line(out)
