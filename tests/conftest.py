import os
from pathlib import Path

import pytest


def shared_data() -> Path:
    return Path(os.environ.get("SSL_BENCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_dataset():
    """Path of a dataset folder in ../shared/data, or a skip naming what is missing."""

    def get(name: str) -> Path:
        path = shared_data() / name
        if not path.is_dir():
            pytest.skip(f"real data {path} absent (set SSL_BENCH_SHARED_DATA to the shared data folder)")
        return path

    return get


@pytest.fixture
def one_thread():
    """Small tensors: extra intra-op threads only add overhead (and stall badly on a busy 2-core machine)."""
    import torch

    from ssl_bench.ops import set_threads

    before = torch.get_num_threads()
    set_threads(1)
    yield
    set_threads(before)  # torch, OpenMP, BLAS and numba: a benchmark run under this fixture sets them all


@pytest.fixture
def runner(tmp_path):
    from ssl_bench.features import FeatureCache
    from ssl_bench.runner import Runner
    from ssl_bench.store import ResultStore

    return Runner(ResultStore(tmp_path / "results.sqlite"), FeatureCache(tmp_path / "cache"), "cpu")
