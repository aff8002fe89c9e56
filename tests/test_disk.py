"""A full disk and read-only folders, for real: each case runs ``ssl-bench`` in a user and mount namespace
(``unshare -rm``) holding a small tmpfs or a read-only bind mount, so no root and no loop device is needed.
Skipped where the kernel does not allow unprivileged namespaces."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ssl_bench
from ssl_bench.data.protocol import Protocol
from ssl_bench.runner import RunConfig

ROOT = Path(ssl_bench.__file__).resolve().parents[1]  # the checkout whose code this test imported
SMALL_RUN = ["--backbone", "reference", "--task", "kmeans", "--dataset", "synthetic"]


@pytest.fixture(scope="module")
def sandbox():
    """``sandbox(script)``: run a shell script as root of a new user + mount namespace; ``ssl_bench`` in it is
    ``python -m ssl_bench`` of this checkout. Returns (exit status of the script, its stdout + stderr)."""
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && mount --bind $d $d && mount -o remount,bind,ro $d"
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "sh", "-c", probe],
                                                         capture_output=True).returncode != 0:
        pytest.skip("needs unprivileged user namespaces (unshare -rm) to mount a small or read-only file system")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def run(script: str) -> tuple[int, str]:
        prelude = f"ssl_bench() {{ {shlex.quote(sys.executable)} -m ssl_bench \"$@\" 2>&1; }}\n"
        proc = subprocess.run(["unshare", "-rm", "sh", "-c", prelude + script], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=600)
        return proc.returncode, proc.stdout + proc.stderr

    return run


def _args(*args) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def tmpfs(folder: Path, size: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(folder))}\n"


def read_only(folder: Path) -> str:
    q = shlex.quote(str(folder))
    return f"mount --bind {q} {q} && mount -o remount,bind,ro {q}\n"


@pytest.mark.slow
def test_a_full_cache_disk_is_one_line_and_leaves_no_temporary_file(sandbox, tmp_path):
    cache, store = tmp_path / "small", tmp_path / "results.sqlite"
    script = tmpfs(cache, "256k") + "\n".join([
        # features (12 images x 1600 patches x 8 dims, float16) do not fit: refused when the space is reserved
        f"ssl_bench run {_args(*SMALL_RUN, '-o', 'n=12', '--cache', cache, '--store', store)}; echo rc=$?",
        f"find {_args(cache)} -name '*.npy' -o -name '*tmp*'; echo listed",
        # features (40 x 64 patches) fit, the labels (40 x 64 x 64 int16) do not
        f"ssl_bench run {_args(*SMALL_RUN, '-o', 'n=40', '--resize', 64, '--cache', cache, '--store', store)}; "
        f"echo rc=$?",
        f"find {_args(cache)} -name 'labels*'; echo listed"])
    status, out = sandbox(script)
    assert status == 0 and "Traceback" not in out, out[-3000:]
    first, second = out.split("listed")[:2]
    assert first.count("rc=2") == 1 and "no space left on the disk of" in first and "MiB needed for patch.npy" in first, out
    assert ".npy" not in first.split("rc=2")[1]  # nothing half-made is left in the cache
    assert second.count("rc=2") == 1 and "for the labels of synthetic/val" in second, out
    assert "labels" not in second.split("rc=2")[1]


@pytest.mark.slow
def test_a_full_store_disk_fails_the_cells_and_the_sweep_goes_on(sandbox, tmp_path):
    folder, cache = tmp_path / "store", tmp_path / "cache"
    store = folder / "results.sqlite"
    script = tmpfs(folder, "512k") + "\n".join([
        # another process holds the store open (its -wal and -shm files exist), then the disk fills up
        _args(sys.executable, "-c", "import sqlite3, sys, time; from ssl_bench.store import ResultStore; "
              "db = ResultStore(sys.argv[1])._connect(); db.execute('SELECT 1 FROM runs').fetchall(); "
              "print('open', flush=True); time.sleep(600)", store) + " > " + _args(folder.parent / "held") + " 2>&1 &",
        "holder=$!",
        f"while ! grep -q open {_args(folder.parent / 'held')} 2>/dev/null; do sleep 0.2; done",
        f"dd if=/dev/zero of={_args(folder / 'filler')} bs=4k 2>/dev/null; true",
        f"ssl_bench sweep {_args(*SMALL_RUN, '-o', 'n=4', '--resize', 64, '--k', 'C', '--k', '2C', '--store', store, '--cache', cache)}"
        f"; echo rc=$?", "kill $holder"])
    status, out = sandbox(script)
    assert status == 0 and "Traceback" not in out, out[-3000:]
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2 and all("cannot write run" in line and "full" in line for line in failed), out
    assert "rc=1" in out


@pytest.mark.slow
def test_read_only_stores_and_caches(sandbox, tmp_path):
    from ssl_bench.features import FeatureCache
    from ssl_bench.runner import Runner
    from ssl_bench.store import ResultStore

    store, cache = tmp_path / "store" / "results.sqlite", tmp_path / "cache"
    cfg = RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=(("n", 3),),
                    protocol=Protocol(resize=64))
    Runner(ResultStore(store), FeatureCache(cache), "cpu").run(cfg)
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    page = tmp_path / "out" / "report.html"
    entry = next(cache.rglob("meta.json")).parent
    damaged = tmp_path / "damaged"
    shutil.copytree(cache, damaged)
    (damaged / entry.relative_to(cache) / "patch.npy").write_bytes(b"")
    run = f"ssl_bench run {_args(*SMALL_RUN, '-o', 'n=3', '--resize', 64, '--force', '--store', tmp_path / 'other.sqlite')}"
    status, out = sandbox(read_only(store.parent) + read_only(cache) + read_only(empty) + read_only(damaged) + "\n".join([
        f"ssl_bench report {_args('--store', store, '--html', page)}; echo rc=$?",  # a report writes nothing there
        f"{run} --cache {_args(cache)}; echo rc=$?",  # a complete entry is read where it cannot be written
        f"{run} --cache {_args(empty)}; echo rc=$?",
        f"{run} --cache {_args(damaged)}; echo rc=$?"]))
    assert status == 0 and "Traceback" not in out, out[-3000:]
    assert out.count("rc=0") == 2 and page.stat().st_size > 10_000, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 2, out
    assert "is not writable" in lines[0] and "pass --cache" in lines[0]
    assert f"{damaged / entry.relative_to(cache)} is damaged" in lines[1] and "delete that folder" in lines[1]
