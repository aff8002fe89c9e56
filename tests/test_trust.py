"""Trust boundaries: nothing ssl-bench reads back from a cache, a store or a results folder can run code."""

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

import ssl_bench
from ssl_bench import registry, samples
from ssl_bench.errors import UserError
from ssl_bench.runner import RunConfig, TaskContext

PACKAGE = Path(ssl_bench.__file__).resolve().parent


class RunsCode:
    """Unpickling this makes the folder ``marker``: proof that a reader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path: Path, marker: Path) -> None:
    """A file under ``path``'s name that runs code when unpickled: a bare pickle (.pkl and anything np.load would
    unpickle) or an .npz / .npy of an object array holding the same."""
    evil = RunsCode(marker)
    if path.suffix == ".npz":
        with open(path, "wb") as f:
            np.savez(f, **{name: np.array([evil], dtype=object)
                           for name in ("__skeleton__", "__crc32__", "a0", "indices", "view", "image", "prediction")})
    elif path.suffix == ".npy":
        np.save(path, np.array([evil], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))


def test_a_planted_pickle_in_any_file_ssl_bench_reads_back_runs_nothing(runner, tmp_path):
    from ssl_bench import report
    from ssl_bench.data.protocol import Protocol

    marker = tmp_path / "code-ran"
    cfg = RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=(("n", 3),),
                    protocol=Protocol(resize=64))
    record = runner.run(cfg).record
    run = runner.resolve(cfg)
    ctx = TaskContext(runner, run, lambda it, **_: it)
    ctx.reuse("probe", {"a": 1}, lambda: {"x": np.arange(3)})
    planted = []
    for folder in (runner.cache.root, runner.store.path.parent / "samples"):
        for path in folder.rglob("*"):
            if path.suffix in (".npz", ".npy", ".pkl", ".json", ".crc32"):
                plant(path, marker)
                planted.append(path.suffix)
                if path.suffix == ".npz":  # the name an earlier ssl-bench read with pickle.load
                    plant(path.with_suffix(".pkl"), marker)
    assert {".npz", ".npy", ".json"} <= set(planted)
    with pytest.warns(UserWarning):  # each damaged file: a warning, then recomputed (or, for panels, left out)
        assert ctx.reuse("probe", {"a": 1}, lambda: {"x": np.arange(4)})["x"].tolist() == [0, 1, 2, 3]
        assert samples.load(runner.store.path, record["config_hash"]) is None
        report.html_report(runner.store.query(), runner.store.path)
        again = runner.run(cfg, force=True).record
    assert again["miou"] == record["miou"]  # the damaged cache was extracted and decoded again
    checkpoint = tmp_path / "evil.pth"
    plant(checkpoint, marker)
    with pytest.raises(UserError, match="cannot read checkpoint"):
        runner.run(RunConfig(backbone="dino-vits16", weights=str(checkpoint), task="kmeans", dataset="synthetic"))
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"backbones: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    from ssl_bench.sweep import load_grid

    with pytest.raises(UserError, match="not valid YAML"):
        load_grid(sweep_file)
    assert not marker.exists()


UNSAFE = {
    "pickle.load": re.compile(r"\b(c?pickle|dill|joblib)\.loads?\("),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?!.*weights_only\s*=\s*True)"),
    "yaml.load without a safe loader": re.compile(
        r"yaml\.(unsafe_load|full_load|load\((?!.*Loader\s*=\s*(yaml\.)?(C?SafeLoader|_UniqueKeyLoader)))"),
}


def test_no_reader_in_the_package_can_unpickle():
    found = [f"{path.relative_to(PACKAGE.parent)}:{n}: {what}"
             for path in sorted(PACKAGE.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             for what, pattern in UNSAFE.items() if pattern.search(line)]
    assert not found, "\n".join(found)
    assert issubclass(registry._UniqueKeyLoader, yaml.SafeLoader)
    assert UNSAFE["torch.load without weights_only=True"].search("torch.load(path, map_location='cpu')")
    assert not UNSAFE["torch.load without weights_only=True"].search("torch.load(p, map_location='cpu', weights_only=True)")
