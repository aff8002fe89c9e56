import numpy as np
import pytest

from ssl_bench.metrics import StreamingConfusion, evaluate_counts, match_clusters


def scores(pred, target, c, k=None):
    conf = StreamingConfusion(c, k or c)
    conf.update(np.asarray(pred), np.asarray(target))
    return conf.compute(k)


def test_hand_computed_two_classes():
    # target: 3 pixels of class 0, 1 of class 1; prediction gets one class-0 pixel wrong.
    target = [0, 0, 0, 1]
    pred = [1, 1, 0, 0]  # cluster 1 mostly class 0 -> Hungarian maps 1->0, 0->1
    m = scores(pred, target, 2)
    assert m["matching"] == "hungarian"
    assert m["cluster_to_class"] == [1, 0]
    # class 0: tp 2, fp 0, fn 1 -> IoU 2/3; class 1: tp 1, fp 1, fn 0 -> IoU 1/2
    assert m["per_class_iou"] == pytest.approx([200 / 3, 50])
    assert m["miou"] == pytest.approx((200 / 3 + 50) / 2)
    assert m["acc"] == pytest.approx(75)
    # F1: class 0: 4/5, class 1: 2/3
    assert m["f1"] == pytest.approx((80 + 200 / 3) / 2)


def test_perfect_prediction_scores_100_and_permutation_invariance():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(40, 40))
    perm = rng.permutation(5)
    m = scores(perm[target], target, 5)
    assert m["miou"] == pytest.approx(100) and m["acc"] == pytest.approx(100) and m["f1"] == pytest.approx(100)
    pred = rng.integers(0, 5, size=(40, 40))
    assert scores(pred, target, 5)["miou"] == pytest.approx(scores(perm[pred], target, 5)["miou"])


def test_ignore_pixels_never_count():
    target = np.array([0, 1, -1, -1, 255])
    pred = np.array([0, 1, 1, 0, 1])
    m = scores(pred, target, 2)
    assert m["pixels"] == 2 and m["acc"] == pytest.approx(100)


def test_majority_vote_when_k_exceeds_classes():
    target = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 1, 1, 2, 2, 3])  # over-clustering: 0,1 -> class 0; 2,3 -> class 1
    m = scores(pred, target, 2, k=4)
    assert m["matching"] == "majority" and m["cluster_to_class"] == [0, 0, 1, 1] and m["miou"] == pytest.approx(100)


def test_unlabelled_pixels_both_views():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, -1, 1, 1])
    m = scores(pred, target, 2)
    assert m["labelled"]["acc"] == pytest.approx(100)
    assert m["acc"] == pytest.approx(75)  # unlabelled counted wrong
    assert m["labelled_fraction"] == pytest.approx(0.75)


def test_streaming_and_merge_equal_one_shot():
    rng = np.random.default_rng(1)
    preds = [rng.integers(0, 4, (10, 10)) for _ in range(6)]
    targets = [rng.integers(-1, 3, (10, 10)) for _ in range(6)]
    one = StreamingConfusion(3, 4)
    a, b = StreamingConfusion(3, 4), StreamingConfusion(3, 4)
    for i, (p, t) in enumerate(zip(preds, targets)):
        one.update(p, t)
        (a if i % 2 else b).update(p, t)
    np.testing.assert_array_equal(one.counts, a.merge(b).counts)
    assert one.compute(4)["miou"] == pytest.approx(a.merge(b).compute(4)["miou"])


def test_fewer_clusters_than_classes_leaves_a_class_unmatched():
    counts = np.array([[5, 1, 0], [0, 4, 3]])
    mapping, policy = match_clusters(counts)
    assert policy == "hungarian" and sorted(mapping.tolist()) == [0, 1]
    m = evaluate_counts(counts, np.zeros(3, dtype=np.int64))
    assert m["per_class_iou"][2] == 0.0
