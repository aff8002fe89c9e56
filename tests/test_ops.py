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
