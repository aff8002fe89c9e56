"""The protocol's extraction precision (issue 22.4): fp32 by default and then absent from every record (earlier
runs keep their hashes); bf16 / fp16 autocast the backbone's forward pass, cache their features apart, share
the labels, and are named in the run's configuration and the report."""

import numpy as np
import pytest

from ssl_bench.data.protocol import Protocol
from ssl_bench.errors import UserError


def test_fp32_is_not_recorded_so_earlier_hashes_stay():
    assert "precision" not in Protocol().as_dict() and "precision" not in Protocol().input_dict()
    low = Protocol(precision="bf16")
    assert low.as_dict()["precision"] == "bf16" and low.input_dict()["precision"] == "bf16"
    assert low.for_labels().input_dict() == Protocol().input_dict()  # labels do not depend on it


def test_an_unknown_precision_is_one_line():
    with pytest.raises(UserError, match="unknown precision rule 'fp8' -- choose one of: fp32, bf16, fp16"):
        Protocol(precision="fp8")


def test_autocast_runs_the_forward_pass_in_the_precision():
    import torch

    layer = torch.nn.Linear(4, 4)
    x = torch.ones(2, 4)
    with Protocol().autocast("cpu"):
        assert layer(x).dtype == torch.float32
    with Protocol(precision="bf16").autocast("cpu"):
        assert layer(x).dtype == torch.bfloat16


@pytest.mark.slow
def test_a_bf16_run_is_its_own_cell_and_column(tmp_path):
    from typer.testing import CliRunner

    from ssl_bench.cli import app
    from ssl_bench.store import ResultStore

    store, cache = tmp_path / "s.sqlite", tmp_path / "cache"
    for precision in ("fp32", "bf16"):
        result = CliRunner().invoke(app, ["run", "--backbone", "dino-vits16", "--weights", "random", "--task", "kmeans",
                                          "--dataset", "synthetic", "-o", "n=2", "--precision", precision,
                                          "--store", str(store), "--cache", str(cache)])
        assert result.exit_code == 0, result.output
    rows = ResultStore(store).query()
    assert sorted(r["config"]["protocol"].get("precision", "fp32") for r in rows) == ["bf16", "fp32"]
    assert len(list(cache.glob("dino-vits16/*/*"))) == 2 and len(list(cache.glob("_labels/*/*"))) == 1
    assert abs(rows[0]["miou"] - rows[1]["miou"]) < 5  # random-weight features: nearly the same clusters
    report = CliRunner().invoke(app, ["report", "--store", str(store)], env={"COLUMNS": "300"})
    assert "precision=bf16" in report.output
    runs = CliRunner().invoke(app, ["runs", "--store", str(store)], env={"COLUMNS": "300"})
    assert runs.output.count("synthetic:val [n=2] [bf16]") == 1 and runs.output.count("synthetic:val [n=2] ") == 2


def test_segment_crops_go_through_the_backbone_in_the_runs_precision():
    # DatUS^2 / COMUS crop embeddings are backbone passes too: a bf16 run's crops run in bf16, as its features
    import torch

    from ssl_bench.stages.embeddings import CropEmbedding, RegionImage

    layer = torch.nn.Linear(3, 2)
    dtypes = []
    model = type("M", (), {"spec": type("S", (), {"embed_dim": 2})(),
                           "normalize": staticmethod(lambda x: torch.from_numpy(x).float()),
                           "embed": staticmethod(lambda x: dtypes.append(layer(x.mean((1, 2))).dtype) or
                                                 layer(x.mean((1, 2))))})()
    segments = np.zeros((4, 4), np.int64)
    image = np.full((16, 16, 3), 100, np.uint8)
    ctx = type("C", (), {"backbone": model, "protocol": Protocol(precision="bf16")})()
    model.spec.input_size = 8
    CropEmbedding.from_context(ctx).embed([RegionImage(segments, image)])
    CropEmbedding(model, 8).embed([RegionImage(segments, image)])  # outside a run: float32
    assert dtypes == [torch.bfloat16, torch.float32]
