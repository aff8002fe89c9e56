import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_bench.ops import upsample_argmax


@pytest.mark.parametrize("k", [1, 2, 11, 27])
def test_upsample_argmax_equals_argmax_of_upsampled_scores(k):
    scores = np.random.default_rng(k).standard_normal((k, 7, 9)).astype(np.float32)
    up = F.interpolate(torch.from_numpy(scores)[None], size=(50, 61), mode="bilinear", align_corners=False)[0]
    assert (upsample_argmax(scores, (50, 61)) == up.argmax(0).numpy()).all()


def test_ties_go_to_the_first_class_like_argmax():
    scores = np.zeros((3, 4, 4), np.float32)
    scores[2, :2] = 1.0  # class 2 wins the top rows only
    labels = upsample_argmax(scores, (8, 8))
    assert labels.dtype == np.int64 and (labels[-1] == 0).all() and (labels[0] == 2).all()


def test_reused_upsampler_follows_changing_sizes_and_k():
    from ssl_bench.ops import UpsampleArgmax

    upsample, rng = UpsampleArgmax(), np.random.default_rng(0)
    for k, grid, size in [(5, (4, 6), (32, 48)), (5, (4, 6), (32, 48)), (9, (6, 4), (48, 30)), (5, (3, 3), (9, 9))]:
        scores = rng.standard_normal((k, *grid)).astype(np.float32)
        up = F.interpolate(torch.from_numpy(scores)[None], size=size, mode="bilinear", align_corners=False)[0]
        labels = upsample(scores, size)
        assert labels.shape == size and (labels == up.argmax(0).numpy()).all()


def test_l2_normalize_copies_unless_told_and_keeps_zero_rows():
    from ssl_bench.ops import l2_normalize

    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    y = l2_normalize(x)
    assert np.allclose(y, [[0.6, 0.8], [0.0, 0.0]]) and x[0, 0] == 3.0
    assert l2_normalize(x, copy=False) is x and np.allclose(x, y)
    assert l2_normalize(np.ones((2, 3, 4), np.float16)).dtype == np.float32
