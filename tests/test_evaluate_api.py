"""``ssl_bench.evaluate``: a model held in memory (a training loop's) is benchmarked like a CLI run, stored under
the caller's name and step, and never served the features cached for other weights."""

import numpy as np
import pytest
import torch

import ssl_bench
from ssl_bench.errors import UserError
from ssl_bench.store import ResultStore

SMALL = {"n": 4, "size": 64}  # four 64x64 synthetic images: one extraction batch


class PatchEmbedder(torch.nn.Module):
    """The adapter protocol at its smallest: a strided convolution whose output is the patch grid."""

    patch_size = 8

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 16, kernel_size=8, stride=8)
        self.calls = 0  # forward passes over real images (not the one probe of what it returns, on zeros)

    def extract_features(self, images):
        self.calls += int(bool(images.any()))
        grid = self.embed(images).permute(0, 2, 3, 1)  # (B, h, w, D)
        return {"patch": grid, "cls": grid.mean((1, 2))}


@pytest.fixture
def paths(tmp_path):
    return {"store": tmp_path / "results.sqlite", "cache": tmp_path / "cache"}


def _cached_patches(cache, name):
    """The patch rows of every cache entry of backbone ``name``, by entry folder."""
    return {p.parent: np.load(p) for p in sorted((cache / name).glob("*/*/patch.npy"))}


def test_a_changed_weight_is_evaluated_again_never_served_cached_features(paths, one_thread):
    torch.manual_seed(0)
    model = PatchEmbedder()
    kept = dict(name="tiny", options=SMALL, keep_features=True, **paths)
    first = ssl_bench.evaluate(model, "kmeans", "synthetic", k=3, **kept)
    calls = model.calls
    assert calls >= 1

    again = ssl_bench.evaluate(model, "kmeans", "synthetic", k=3, **kept)
    assert model.calls == calls and again["config_hash"] == first["config_hash"]  # same weights: cached, stored

    with torch.no_grad():
        model.embed.weight[0, 0, 0, 0] += 1.0  # one weight, one training step
    changed = ssl_bench.evaluate(model, "kmeans", "synthetic", k=3, **kept)
    assert model.calls > calls, "the changed model was not run: it was served the features of the old weights"
    assert changed["weights"] != first["weights"] and changed["config_hash"] != first["config_hash"]
    entries = _cached_patches(paths["cache"], "tiny")
    assert len(entries) == 2
    one, other = entries.values()  # the two weights' features, each its own entry
    assert one.shape == other.shape and not np.array_equal(one, other)
    assert len(ResultStore(paths["store"]).query()) == 2  # both models' rows kept


def test_rows_are_labelled_with_the_callers_name_and_step(paths, one_thread):
    torch.manual_seed(0)
    model = PatchEmbedder()
    row = ssl_bench.evaluate(model, "kmeans", "synthetic", k=3, name="my-net", step=1000, options=SMALL, **paths)
    assert row["backbone"] == "my-net@1000"
    assert row["config"]["model"] == {"name": "my-net", "step": 1000, "class": "PatchEmbedder", "params_m": 0.0}
    assert row["weights"].startswith("state:") and not row["random_weights"]
    assert row["miou"] is not None and 0 <= row["miou"] <= 100
    stored = ResultStore(paths["store"]).get(row["config_hash"])
    assert stored["backbone"] == "my-net@1000" and stored["miou"] == row["miou"]
    assert not list(paths["cache"].glob("my-net@1000/*/*/patch.npy"))  # keep_features off: a loop never fills the disk
    assert model.training  # handed back in the mode it came in
    from ssl_bench.report import text_report

    line = next(r for r in text_report([stored], "markdown", "leaderboard", k=3).splitlines() if "my-net@1000" in r)
    assert "in memory (PatchEmbedder)" in line and "your training run" in line  # not '?': no registry entry to ask


def test_a_timm_vit_is_evaluated_with_every_feature_kind(paths, one_thread):
    timm = pytest.importorskip("timm")
    from ssl_bench.models.live import live_backbone

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, embed_dim=48,
                            num_heads=3, dynamic_img_size=True)
    assert {"patch", "cls", "key", "attn"} <= live_backbone(vit, "vit").supported_kinds()
    row = ssl_bench.evaluate(vit, "kmeans", "synthetic", k=3, name="vit", step=0, options=SMALL, **paths)
    assert row["backbone"] == "vit@0" and row["miou"] is not None
    fixed = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1, embed_dim=48,
                              num_heads=3)
    with pytest.raises(UserError, match="dynamic_img_size=True"):
        ssl_bench.evaluate(fixed, "kmeans", "synthetic", k=3, options=SMALL, **paths)


@pytest.mark.parametrize("model, kwargs, message", [
    (torch.nn.Linear(3, 3), {}, "is not a timm ViT and has no extract_features"),
    (PatchEmbedder(), {"name": "a/b"}, "give a short label"),
    (PatchEmbedder(), {"step": -1}, "must be a whole number"),
    ("not a module", {}, "takes a torch.nn.Module"),
])
def test_what_it_cannot_evaluate_is_one_line(paths, model, kwargs, message):
    with pytest.raises(UserError, match=message):
        ssl_bench.evaluate(model, "kmeans", "synthetic", k=3, options=SMALL, **kwargs, **paths)


def test_a_task_reading_a_kind_the_adapter_lacks_is_refused_before_extraction(paths):
    model = PatchEmbedder()
    with pytest.raises(UserError, match="key"):  # Louvain segments on the last block's keys
        ssl_bench.evaluate(model, "segment-cluster", "synthetic", k=3, options=SMALL, **paths)
    assert model.calls == 0  # the probe only


def test_a_training_loop_can_evaluate_in_bf16_as_the_cli_does(paths, one_thread):
    torch.manual_seed(0)
    model = PatchEmbedder()
    fp32 = ssl_bench.evaluate(model, "kmeans", "synthetic", k=3, name="net", options=SMALL, **paths)
    bf16 = ssl_bench.evaluate(model, "kmeans", "synthetic", k=3, name="net", options=SMALL, precision="bf16", **paths)
    assert bf16["config"]["protocol"]["precision"] == "bf16" and fp32["config_hash"] != bf16["config_hash"]
    with pytest.raises(UserError, match="unknown precision rule 'fp8'"):
        ssl_bench.evaluate(model, "kmeans", "synthetic", k=3, name="net", options=SMALL, precision="fp8", **paths)
