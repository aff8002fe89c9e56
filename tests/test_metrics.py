import warnings

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


# ---- the protocol's scoring rules (absent classes, over-clustering), each on hand-made counts ------------------

def test_a_class_absent_but_predicted_scores_zero_and_lowers_miou():
    # class 2 has no ground-truth pixel; Hungarian gives it cluster 2, which holds one pixel of class 1
    target, pred = [0, 0, 1, 1, 1], [0, 0, 1, 1, 2]
    common = scores(pred, target, 3)  # default: zero-if-predicted, the rule of STEGO, PriMaPs and mmsegmentation
    # class 0: IoU 1; class 1: tp 2, fn 1 -> 2/3; class 2: tp 0, fp 1 -> 0
    assert common["per_class_iou"] == pytest.approx([100, 200 / 3, 0])
    assert common["miou"] == pytest.approx((100 + 200 / 3 + 0) / 3)
    assert common["f1"] == pytest.approx((100 + 80 + 0) / 3)  # class 1: 2*2 / (2*2 + 0 + 1)
    old = StreamingConfusion(3, 3)
    old.update(np.asarray(pred), np.asarray(target))
    ignored = old.compute(3, absent_classes="ignore")  # the former ssl-bench rule, kept as a named option
    assert ignored["per_class_iou"] == pytest.approx([100, 200 / 3, None])
    assert ignored["miou"] == pytest.approx((100 + 200 / 3) / 2)
    assert ignored["acc"] == common["acc"] == pytest.approx(80)  # accuracy does not depend on the rule


def test_a_class_neither_present_nor_predicted_is_left_out():
    m = scores([0, 0, 1, 1], [0, 0, 1, 1], 3)  # cluster 2 is empty and class 2 absent: an empty union
    assert m["per_class_iou"] == [100, 100, None] and m["miou"] == pytest.approx(100) and m["f1"] == pytest.approx(100)


# clusters x classes: majority sends every cluster to class 0, so class 1 is never predicted
OVERCLUSTERED = np.array([[5, 0], [4, 1], [3, 2]])


def test_four_overclustering_policies_give_four_hand_computed_answers():
    none = np.zeros(2, dtype=np.int64)
    majority = evaluate_counts(OVERCLUSTERED, none, 3, "majority")
    # class 0 predicted for all 15 pixels: IoU 12/15; class 1: IoU 0
    assert majority["cluster_to_class"] == [0, 0, 0]
    assert majority["miou"] == pytest.approx((80 + 0) / 2) and majority["acc"] == pytest.approx(80)

    primaps = evaluate_counts(OVERCLUSTERED, none, 3, "hungarian-majority")
    # Hungarian on the transpose: class 0 -> cluster 0 (5), class 1 -> cluster 2 (2); cluster 1 by majority -> 0.
    # class 0: tp 9, fp 1, fn 3 -> 9/13; class 1: tp 2, fp 3, fn 1 -> 2/6
    assert primaps["cluster_to_class"] == [0, 0, 1] and primaps["matching"] == "hungarian-majority"
    assert primaps["miou"] == pytest.approx((900 / 13 + 200 / 6) / 2) and primaps["acc"] == pytest.approx(1100 / 15)

    datus = evaluate_counts(OVERCLUSTERED, none, 3, "hungarian")
    # one to one: class 0 -> cluster 0, class 1 -> cluster 2; cluster 1's 5 pixels count wrong.
    # class 0: tp 5, fn 7 -> 5/12; class 1: tp 2, fp 3, fn 1 -> 2/6
    assert datus["cluster_to_class"] == [0, -1, 1] and datus["matching"] == "hungarian"
    assert datus["miou"] == pytest.approx((500 / 12 + 200 / 6) / 2) and datus["acc"] == pytest.approx(700 / 15)

    with pytest.warns(UserWarning, match="ignored 5 of 15 labelled pixels"):
        stego = evaluate_counts(OVERCLUSTERED, none, 3, "stego-drop")
    # cluster 2 (id >= C) dropped; clusters 0, 1 matched one to one: class 0: tp 5, fn 4 -> 5/9; class 1: tp 1, fp 4 -> 1/5
    assert stego["cluster_to_class"] == [0, 1, -2] and stego["ignored_pixels"] == 5 and stego["pixels"] == 10
    assert stego["miou"] == pytest.approx((500 / 9 + 20) / 2) and stego["acc"] == pytest.approx(60)


def test_policies_agree_when_k_equals_c():
    counts = np.array([[1, 6], [7, 2]])
    results = {p: evaluate_counts(counts, np.zeros(2, dtype=np.int64), 2, p) for p in
               ("majority", "hungarian", "hungarian-majority", "stego-drop")}
    assert {r["matching"] for r in results.values()} == {"hungarian"}
    assert len({r["miou"] for r in results.values()}) == 1


def _reference_miou(stats: np.ndarray, drop_beyond_classes: bool) -> tuple[float, float]:
    """mIoU and accuracy as the STEGO / PriMaPs metric code computes them for K > C (our numpy reading of their
    UnsupervisedMetrics.compute): Hungarian on the transposed counts, then PriMaPs adds every other cluster to its
    majority class, STEGO (whose update() never counts ids >= C) pools them into one extra row that is never right;
    IoU = tp / (tp + fp + fn), NaN where that is 0/0, averaged over the rest."""
    from scipy.optimize import linear_sum_assignment

    stats = stats.copy()
    c = stats.shape[1]
    if drop_beyond_classes:
        stats[c:] = 0
    _, assigned = linear_sum_assignment(stats.T, maximize=True)
    histogram = stats[assigned].astype(float)
    rest = sorted(set(range(len(stats))) - set(assigned))
    if drop_beyond_classes:
        histogram = np.pad(np.vstack([histogram, stats[rest].sum(0)]), ((0, 0), (0, 1)))
    else:
        for cluster in rest:
            histogram[stats[cluster].argmax()] += stats[cluster]
    tp = np.diag(histogram)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (histogram.sum(0) + histogram.sum(1) - tp)
    return float(np.nanmean(iou) * 100), float(tp.sum() / histogram.sum() * 100)


@pytest.mark.parametrize("policy", ["hungarian-majority", "stego-drop"])
def test_overclustering_equals_the_reference_metric_code_on_random_counts(policy):
    rng = np.random.default_rng(3)
    compared = 0
    for _ in range(200):
        c = int(rng.integers(2, 6))
        k = c + int(rng.integers(1, 5))
        stats = rng.integers(0, 4, (k, c)) * rng.integers(0, 2, (k, c))  # zeros: absent and empty classes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stego-drop warns about the pixels it drops
            ours = evaluate_counts(stats, np.zeros(c, dtype=np.int64), k, policy)
        if policy == "stego-drop" and -1 in ours["cluster_to_class"]:
            continue  # STEGO also averages a zero IoU for pixels left without a class (ties only; see metrics.py)
        if ours["pixels"] == 0:
            continue
        miou, acc = _reference_miou(stats, policy == "stego-drop")
        assert ours["miou"] == pytest.approx(miou) and ours["acc"] == pytest.approx(acc)
        compared += 1
    assert compared > 100


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown overclustering rule 'hungarian-first'"):
        match_clusters(OVERCLUSTERED, 3, "hungarian-first")
