"""STEGO and HP segmentation heads: the correspondence loss, hidden positives, five crops, trained heads, the
task adapters and PriMaPs-EM on a head's features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ssl_bench import registry
from ssl_bench.data.crops import five_crop_boxes
from ssl_bench.errors import UserError
from ssl_bench.methods import heads, hp, stego

STEGO = registry.task("stego").params


@pytest.fixture(autouse=True)
def _tiny_tensors_one_thread(one_thread):
    """Every test here works on tiny tensors (see conftest's one_thread)."""


# ---------------------------------------------------------------------------------------------- STEGO's loss


def _direct_term(f1, f2, c1, c2, shift, pointwise):
    """-mean (F' - b) max(S, 0), every entry written out (float64, loops over points). F' centres each point of
    x over y's points and keeps the overall mean of the batch (the reference code's pointwise option)."""
    b, _, h, w = f1.shape
    fd = torch.zeros(b, h, w, h, w, dtype=torch.float64)
    sd = torch.zeros(b, h, w, h, w, dtype=torch.float64)
    for n in range(b):
        for y in range(h):
            for x in range(w):
                for i in range(h):
                    for j in range(w):
                        fd[n, y, x, i, j] = torch.cosine_similarity(f1[n, :, y, x], f2[n, :, i, j], dim=0)
                        sd[n, y, x, i, j] = torch.cosine_similarity(c1[n, :, y, x], c2[n, :, i, j], dim=0)
    if pointwise:
        fd = fd - fd.mean(dim=(3, 4), keepdim=True) + fd.mean()
    return (-(fd - shift) * sd.clamp(min=0)).mean()


def _identity_coords(b, s):
    """Points at exactly the s x s patch centres, so sampling returns the maps themselves."""
    lin = torch.linspace(-1, 1, s, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(lin, lin, indexing="ij"), -1)  # [a, c] = (lin[a], lin[c]) = (x, y)
    return grid[None].expand(b, -1, -1, -1)


def test_correspondence_loss_matches_direct_dense_computation_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    b, c, dim, s = 2, 5, 3, 3
    feats, feats_pos = (torch.randn(b, c, s, s, generator=gen, dtype=torch.float64) for _ in range(2))
    code, code_pos = (torch.randn(b, dim, s, s, generator=gen, dtype=torch.float64, requires_grad=True)
                      for _ in range(2))
    coords = _identity_coords(b, s)
    assert torch.allclose(stego.sample_points(feats, coords), feats)  # the sampling returns every patch
    p = {**STEGO, "feature_samples": s, "neg_samples": 1}
    for pointwise in (True, False):
        p["pointwise"] = pointwise
        gen_loss = torch.Generator().manual_seed(1)
        loss, terms = stego.correspondence_loss(feats, feats_pos, code, code_pos, {**p}, gen_loss, (coords, coords))
        perm = stego.derangement(b, torch.Generator().manual_seed(1))  # the same draw as inside the loss
        assert (perm != torch.arange(b)).all()
        direct = (p["self_weight"] * _direct_term(feats, feats, code, code, p["self_shift"], pointwise)
                  + p["knn_weight"] * _direct_term(feats, feats_pos, code, code_pos, p["knn_shift"], pointwise)
                  + p["rand_weight"] * _direct_term(feats, feats[perm], code, code[perm], p["rand_shift"], pointwise))
        assert loss.item() == pytest.approx(direct.item(), rel=1e-9, abs=1e-12)
        grads = torch.autograd.grad(loss, (code, code_pos))
        direct_grads = torch.autograd.grad(direct, (code, code_pos))
        for g, d in zip(grads, direct_grads):
            assert torch.allclose(g, d, atol=1e-10) and d.abs().sum() > 0


def test_shift_moves_each_term_by_shift_times_mean_clamped_code_correspondence():
    """L(b) = -mean (F - b) max(S, 0): dL/db = mean max(S, 0) >= 0, so a larger shift pushes more pairs apart."""
    gen = torch.Generator().manual_seed(2)
    f1, f2 = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    c1, c2 = torch.randn(2, 3, 3, 3, generator=gen), torch.randn(2, 3, 3, 3, generator=gen)
    low, cd = stego.correspondence_term(f1, f2, c1, c2, shift=0.1)
    high, _ = stego.correspondence_term(f1, f2, c1, c2, shift=0.4)
    moved = float(high.mean() - low.mean())
    assert moved == pytest.approx(0.3 * float(cd.clamp(min=0).mean()), rel=1e-5) and moved > 0
    # The gradient on the code flips where F - b changes sign: pairs below the shift are pushed apart.
    c1g = c1.clone().requires_grad_(True)
    fd = stego.feature_correspondence(f1, f2)
    b = float(fd.median())
    loss, _ = stego.correspondence_term(f1, f2, c1g, c2, shift=b)
    loss.mean().backward()
    assert c1g.grad.abs().sum() > 0
    # In the full loss each term's shift enters with its weight: d loss / d b_self = lambda_self * mean max(S,0).
    p = {**STEGO, "feature_samples": 3, "neg_samples": 0}
    coords = (_identity_coords(2, 3).float(),) * 2
    base, _ = stego.correspondence_loss(f1, f2, c1, c2, p, torch.Generator(), coords)
    shifted, _ = stego.correspondence_loss(f1, f2, c1, c2, {**p, "self_shift": p["self_shift"] + 0.5},
                                           torch.Generator(), coords)
    self_cd = stego.correspondence_term(f1, f1, c1, c1, 0.0)[1].clamp(min=0).mean()
    assert float(shifted - base) == pytest.approx(0.5 * p["self_weight"] * float(self_cd), rel=1e-5)


def test_derangement_pairs_every_view_with_another():
    for n in (2, 3, 7):
        for seed in range(20):
            perm = stego.derangement(n, torch.Generator().manual_seed(seed))
            assert (perm != torch.arange(n)).all() and ((perm >= 0) & (perm < n)).all()


def test_nearest_neighbours_exclude_the_view_itself():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    nn_ = heads.nearest_neighbours(x, 7)
    assert nn_.shape == (4, 3) and nn_[:, 0].tolist() == [1, 0, 3, 2]
    assert heads.nearest_neighbours(x[:1], 7).tolist() == [[0]]


# ---------------------------------------------------------------------------------------------- HP


def test_hidden_positives_on_hand_made_features():
    """Anchor 0's reference point (its best match in the bank) is 0.8: patches closer than that are positives,
    and so is a patch whose own reference point it beats (the relation is symmetric); never the anchor itself."""
    def unit(deg):
        return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]

    x = torch.tensor([unit(0), unit(20), unit(50), unit(105), unit(60)], dtype=torch.float32)
    bank = torch.tensor([unit(-36.87), unit(180)], dtype=torch.float32)  # cos(36.87 deg) = 0.8
    ref = hp.reference_points(x, bank)
    # by hand: cos(36.87) = .8, cos(56.87) = .546, cos(86.87) = .055, cos(75) = .259, cos(96.87) = -.12
    assert ref.tolist() == pytest.approx([0.8, 0.546, 0.055, 0.259, -0.12], abs=2e-3)
    rows = torch.arange(len(x))
    pos = hp.hidden_positives(x, x, ref, ref, rows)
    # anchor 0: 20 deg (cos .94 > .8) yes; 50 deg (cos .64 < .8, but > its own reference .055) yes;
    # 105 deg (cos -.26, below both) no; 60 deg (cos .5 > its reference -.12) yes; itself never
    assert pos[0].tolist() == [False, True, True, False, True]
    # anchor 3 (105 deg, reference .259): 50 (cos .57) and 60 (cos .71) yes; 20 deg (cos .087) no
    assert pos[3].tolist() == [False, False, True, False, True]
    assert torch.equal(pos, pos.T) and not pos.diagonal().any()  # symmetric
    # A bank patch next to every feature makes the reference points high: only near-duplicates stay positives.
    close_bank = x.clone()
    pos_close = hp.hidden_positives(x, x, hp.reference_points(x, close_bank), hp.reference_points(x, close_bank),
                                    rows)
    assert not pos_close.any()


def test_local_codes_average_attention_weighted_neighbours_with_gradient():
    code = torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3).requires_grad_(True)
    weights = hp.uniform_weights(1, (3, 3), sigma=9.0)  # every neighbour inside weighs 1
    local = hp.local_codes(code, weights)
    # centre: mean of all 9; corner (0, 0): mean of its 4 neighbours inside the map
    assert local[0, 0, 1, 1].item() == pytest.approx(4.0)
    assert local[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 3 + 4) / 4)
    local[0, 0, 0, 0].backward()
    assert code.grad[0, 0].nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]  # gradient to the neighbours


def test_local_codes_match_a_direct_sum_over_neighbours_values_and_gradients():
    """On a non-square map with random weights: each position's weighted sum over its neighbours inside the map
    (a loop over offsets), divided by their count; gradients alike (float64)."""
    gen = torch.Generator().manual_seed(4)
    h, w = 3, 5
    code = torch.randn(2, 4, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    _, inside = hp.neighbourhood(h, w)
    weights = torch.rand(2, h * w, 9, generator=gen, dtype=torch.float64) * inside
    direct = torch.zeros(2, 4, h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            n, count = y * w + x, 0
            for k, (dy, dx) in enumerate((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    direct[:, :, y, x] = direct[:, :, y, x] + weights[:, n, k, None] * code[:, :, y + dy, x + dx]
                    count += 1
            direct[:, :, y, x] = direct[:, :, y, x] / count
    local = hp.local_codes(code, weights)
    assert torch.allclose(local, direct, atol=1e-12)
    target = torch.randn(2, 4, h, w, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((local * target).sum(), code)
    (direct_grad,) = torch.autograd.grad((direct * target).sum(), code)
    assert torch.allclose(grad, direct_grad, atol=1e-12)


def test_attention_weights_keep_only_above_mean_neighbours():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, 8, generator=gen), torch.randn(2, 16, 8, generator=gen)
    w = hp.attention_weights(q, k, heads_count=2, sigma=28.0, grid=(4, 4))
    assert w.shape == (2, 16, 9) and (w >= 0).all()
    _, inside = hp.neighbourhood(4, 4)
    assert (w[:, ~inside] == 0).all()  # no weight outside the map


def test_contrastive_loss_prefers_codes_that_group_hidden_positives():
    """The same hidden positives (from features with two groups): codes that agree with them score lower."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 8)
    feats = F_normalize(np.eye(2)[labels] + 0.05 * rng.standard_normal((16, 2)))
    bank = F_normalize(np.array([[1.0, 1.0]]))  # reference 0.71: the other group is never a positive
    ref = hp.reference_points(feats, bank)
    good = F_normalize(np.eye(3)[labels] + 0.05 * rng.standard_normal((16, 3)))
    bad = F_normalize(rng.standard_normal((16, 3)))
    args = (feats, feats, ref, ref, 0.0, 0.6, 1.0, 8)
    loss_good = hp.contrastive_loss(good, None, *args, torch.Generator().manual_seed(0))
    loss_bad = hp.contrastive_loss(bad, None, *args, torch.Generator().manual_seed(0))
    assert float(loss_good) < float(loss_bad)


def _direct_hp_loss(z, z_local, feats, codes_ema, ref_feats, ref_ema, lmbd, tau, rho, per_view, gen):
    """HP's loss written out anchor by anchor (float64 loops): for anchor i of view v, positives P_i (cosine of the
    features above i's or j's reference point, j != i), EMA positives Q_i alike, weights w_ij = [j in P_i] +
    lmbd [j in Q_i], denominator D_i = P_i and the patches whose uniform draw (one (per_view, N) draw per view from
    ``gen``, in view order) is below rho, never i; the term -scale share_i / count_i sum_j w_ij log(exp(l_ij) /
    sum_{k in D_i} exp(l_ik)), l = z_i . z_j / tau, count_i = sum_j w_ij, share_i = count_i / mean count over
    the view's anchors; mean over anchors with a positive, summed over views and the plain and local codes."""
    n, scale = len(z), tau / hp.BASE_TEMPERATURE
    views = n // per_view
    total = z.new_zeros(())
    for v in range(views):
        draw = torch.rand((per_view, n), generator=gen)
        anchors = []
        for r in range(per_view):
            i = v * per_view + r
            cos_f = [float(feats[i] @ feats[j]) for j in range(n)]
            cos_e = [float(codes_ema[i] @ codes_ema[j]) for j in range(n)]
            pos = [j != i and (cos_f[j] > ref_feats[i] or cos_f[j] > ref_feats[j]) for j in range(n)]
            pos_e = [j != i and (cos_e[j] > ref_ema[i] or cos_e[j] > ref_ema[j]) for j in range(n)]
            if any(pos):
                w = [float(pos[j]) + lmbd * float(pos_e[j]) for j in range(n)]
                denom = [j for j in range(n) if j != i and (pos[j] or draw[r, j] < rho)]
                anchors.append((i, w, denom))
        if not anchors:
            continue
        mean_count = sum(sum(w) for _, w, _ in anchors) / len(anchors)
        for codes in (z, z_local):
            terms = []
            for i, w, denom in anchors:
                logits = codes[i] @ codes.T / tau
                log_norm = torch.logsumexp(logits[denom], 0)
                count = sum(w)
                terms.append(-scale * (count / mean_count) / count
                             * sum(w[j] * (logits[j] - log_norm) for j in range(n) if w[j]))
            total = total + torch.stack(terms).mean()
    return total / (views * 2)


def test_contrastive_loss_and_its_written_out_gradient_match_a_direct_computation():
    """The loss against ``_direct_hp_loss`` (values and autograd gradients, float64), and ``backward=True``'s
    written-out gradient (what training uses) against both."""
    gen = torch.Generator().manual_seed(3)
    n, per_view, c = 12, 4, 5
    leaf = torch.randn(n, c, generator=gen, dtype=torch.float64, requires_grad=True)
    mix = torch.randn(c, c, generator=gen, dtype=torch.float64)
    feats = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    feats[0], feats[1:, 0] = torch.tensor([1.0, 0, 0]), -feats[1:, 0].abs()  # patch 0: no hidden positive
    feats = F_normalize(feats)
    codes_ema = F_normalize(torch.randn(n, 4, generator=gen, dtype=torch.float64))
    bank = F_normalize(torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0.3, 0.5, -0.2]], dtype=torch.float64))
    bank_ema = F_normalize(torch.randn(3, 4, generator=gen, dtype=torch.float64))
    ref_f, ref_e = hp.reference_points(feats, bank), hp.reference_points(codes_ema, bank_ema)
    args = (feats, codes_ema, ref_f, ref_e, 0.4, 0.6, 0.3, per_view)

    def codes():
        return F_normalize(leaf), F_normalize(torch.tanh(leaf @ mix))  # two codes sharing one graph

    direct = _direct_hp_loss(*codes(), *args, torch.Generator().manual_seed(7))
    (direct_grad,) = torch.autograd.grad(direct, leaf)
    plain = hp.contrastive_loss(*codes(), *args, torch.Generator().manual_seed(7))
    (plain_grad,) = torch.autograd.grad(plain, leaf)
    written = hp.contrastive_loss(*codes(), *args, torch.Generator().manual_seed(7), backward=True)
    assert not written.requires_grad and direct_grad.abs().sum() > 0
    assert plain.item() == pytest.approx(direct.item(), rel=1e-10) and written.item() == pytest.approx(direct.item(), rel=1e-10)
    assert torch.allclose(plain_grad, direct_grad, rtol=1e-9, atol=1e-12)
    assert torch.allclose(leaf.grad, direct_grad, rtol=1e-9, atol=1e-12)
    # patch 0 has no task-agnostic positive and is skipped as an anchor, the others count
    pos = hp.hidden_positives(feats, feats, ref_f, ref_f, torch.arange(n)).any(1)
    assert not pos[0] and pos[1:].any()


def F_normalize(a):
    a = torch.as_tensor(a, dtype=None if isinstance(a, torch.Tensor) else torch.float32)
    return torch.nn.functional.normalize(a, dim=1)


# ---------------------------------------------------------------------------------------------- five crops


def test_five_crop_boxes_follow_torchvision_order_and_rounding():
    assert five_crop_boxes(10, 8, 0.5) == [(0, 0, 5, 4), (5, 0, 10, 4), (0, 4, 5, 8), (5, 4, 10, 8), (2, 2, 7, 6)]
    with pytest.raises(UserError, match="crop_ratio"):
        five_crop_boxes(1, 1, 0.5)


def test_five_crops_as_dataset_option(tmp_path):
    from ssl_bench.data import open_dataset

    base = open_dataset("synthetic", None, None, n=2)
    crops = open_dataset("synthetic", None, None, n=2, crops="five")
    assert len(crops) == 10 and crops.ids[5] == f"{base.ids[1]}@tl"
    w, h = base.image_size(0)
    assert crops.image_size(4) == (w // 2, h // 2)
    label = base.load_label(1)
    assert np.array_equal(crops.load_label(7), label[h - h // 2:, : w // 2])  # image 1, bottom-left
    with pytest.raises(UserError, match="crops='six'"):
        open_dataset("synthetic", None, None, crops="six")
    with pytest.raises(UserError, match="crop_ratio needs crops=five"):
        open_dataset("synthetic", None, None, crop_ratio=0.3)


# ---------------------------------------------------------------------------------------------- trained heads


def _synthetic_features(n=12):
    """Reference-backbone features (8 x 8 grid, 8 channels) and labels at protocol resolution of ``n`` images of
    the synthetic dataset (5 classes told apart by colour and texture)."""
    from ssl_bench.data import open_dataset
    from ssl_bench.data.protocol import Protocol
    from ssl_bench.models import build_backbone, resolve

    spec = registry.backbone("reference")
    backbone = build_backbone(spec, resolve(spec, "random"), 0)
    ds = open_dataset("synthetic", None, None, n=n, size=96)
    protocol = Protocol(resize=64, crop="center")
    images = np.stack([protocol.apply_image(ds.load_image(i), spec.patch_size) for i in range(n)])
    labels = [protocol.apply_label(ds.load_label(i), spec.patch_size) for i in range(n)]
    feats = backbone.extract(backbone.normalize(images), {"patch"})["patch"].float().numpy()
    return list(feats), labels, ds.num_classes


def _probe_accuracy(head, feats, labels, k, seed=0):
    """Pixel accuracy of the head's cluster probe (K = k, trained on its codes) after Hungarian matching."""
    centres, _ = heads.train_cluster_probe(head, feats, k, 60, 8, 0.01, seed, "cpu")
    model = heads.TrainedHead(head, centres, None)
    conf = np.zeros((k, k))
    for f, lab in zip(feats, labels):
        np.add.at(conf, (model.scores(f, lab.shape)["cluster"].argmax(0).numpy().ravel(), lab.ravel()), 1)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    return conf[rows, cols].sum() / conf.sum()


def _chance(labels, k):
    """The accuracy a prediction that ignores the image reaches: one cluster everywhere, matched to the largest
    class (its pixel share)."""
    counts = np.bincount(np.concatenate([lab.ravel() for lab in labels]), minlength=k)
    return counts.max() / counts.sum()


def _assert_training_helps(train, feats, labels, k):
    """The head after ``train(steps)`` against the same seed's untrained head (0 steps): the cluster probe's
    accuracy must rise by a quarter of the way from chance to perfect."""
    chance = _chance(labels, k)
    before = _probe_accuracy(train(0), feats, labels, k)
    after = _probe_accuracy(train(None), feats, labels, k)
    assert after - before > (1 - chance) / 4, (chance, before, after)


def test_trained_stego_head_beats_its_untrained_self_on_the_synthetic_set_by_a_margin_from_chance(one_thread):
    feats, labels, k = _synthetic_features()
    neighbours = heads.nearest_neighbours(heads.global_features(feats), 7)
    p = {**STEGO, "dim": 8, "feature_samples": 8, "neg_samples": 2, "lr": 0.01}  # the paper's shifts and weights

    def train(steps):
        return stego.train_head(feats, neighbours, p, 50 if steps is None else steps, 8, 0, "cpu")[0]

    _assert_training_helps(train, feats, labels, k)


def test_trained_hp_head_beats_its_untrained_self_on_the_synthetic_set_by_a_margin_from_chance(one_thread):
    feats, labels, k = _synthetic_features()
    grid = feats[0].shape[:2]
    p = {**registry.task("hp").params, "dim": 8, "augment": "none", "local_weights": "uniform", "pool_size": 64,
         "lr": 0.01}  # the rest as the Cityscapes option file (no attention in the reference backbone)

    def train(steps):
        plan = {"name": "cpu", "device": "cpu", "steps": 60 if steps is None else steps, "batch_size": 4}
        return hp.train_head(feats, lambda idx: hp.uniform_weights(len(idx), grid, p["attention_sigma"]), None, p,
                             plan, 0, "cpu")[0]

    _assert_training_helps(train, feats, labels, k)


def test_head_weights_round_trip_as_plain_arrays():
    head = heads.SegmentationHead(6, 3)
    arrays = heads.arrays_of(head)
    assert all(type(a) is np.ndarray for a in arrays.values())
    again = heads.head_from_arrays(arrays)
    x = np.random.default_rng(0).standard_normal((4, 4, 6)).astype(np.float32)
    one = heads.TrainedHead(head.eval(), np.eye(2, 3), None).project(x)
    assert np.allclose(one, heads.TrainedHead(again, np.eye(2, 3), None).project(x))


# ---------------------------------------------------------------------------------------------- task files


def test_task_files_register_valid_variants_with_a_projection():
    names = {"stego", "stego-cocostuff", "stego-cityscapes", "stego-potsdam", "hp", "hp-cocostuff", "hp-potsdam"}
    specs = registry.tasks()
    assert names <= set(specs)
    for name in names:
        spec = specs[name]
        assert spec.projection
        (stego if name.startswith("stego") else hp).check_params(dict(spec.params))


@pytest.mark.parametrize("task, params, message", [
    ("stego", {"neighbours": 0}, "neighbours=0 is invalid"),
    ("stego", {"train_crops": "ten"}, "train_crops='ten' is invalid -- use five | none"),
    ("hp", {"rho": 1.5}, r"rho=1.5 is invalid -- use a number in \[0, 1\]"),
    ("hp", {"local_weights": "gauss"}, "local_weights='gauss' is invalid"),
])
def test_bad_parameters_are_one_line(task, params, message):
    module = stego if task == "stego" else hp
    with pytest.raises(UserError, match=message) as err:
        module.check_params({**registry.task(task).params, **params})
    assert "\n" not in str(err.value)


def test_features_from_names_a_task_that_trains_a_head():
    from ssl_bench.methods.feature_source import parse_features_from

    assert parse_features_from(None, "primaps") is None
    assert parse_features_from("hp-potsdam", "primaps") == ("hp-potsdam", {})
    assert parse_features_from({"task": "stego", "params": {"cpu_steps": 3}}, "primaps") == ("stego", {"cpu_steps": 3})
    with pytest.raises(UserError, match="features_from=kmeans trains no feature projection"):
        parse_features_from("kmeans", "primaps")
    with pytest.raises(UserError, match="sets no fit_split"):
        parse_features_from({"task": "stego", "params": {"fit_split": "train"}}, "primaps")


# ---------------------------------------------------------------------------------------------- end to end

SMALL = (("n", 6),)
TINY_STEGO = {"cpu_steps": 3, "cpu_batch_size": 4, "train_resize": 64, "dim": 4, "crf": False}
TINY_HP = {"cpu_steps": 3, "cpu_batch_size": 4, "train_resize": 64, "dim": 8, "crf": False, "augment": "none",
           "local_weights": "uniform", "pool_size": 8}


def _plain(value) -> bool:
    """What ctx.reuse may keep: nested dicts / lists of JSON scalars and numpy arrays, nothing pickled."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, np.ndarray))


@pytest.mark.slow
@pytest.mark.parametrize("task, params", [("stego", TINY_STEGO), ("hp", TINY_HP)])
def test_head_task_runs_end_to_end_and_keeps_plain_arrays(runner, task, params, monkeypatch):
    from ssl_bench.runner import RunConfig, TaskContext

    kept = {}
    real_reuse = TaskContext.reuse

    def spy(self, name, identity, compute, *args, **kwargs):
        value = real_reuse(self, name, identity, compute, *args, **kwargs)
        kept[name] = value
        return value

    monkeypatch.setattr(TaskContext, "reuse", spy)
    cfg = RunConfig(backbone="reference", task=task, dataset="synthetic", dataset_options=SMALL, params=tuple(sorted(params.items())))
    record = runner.run(cfg).record
    assert record["miou"] >= 0
    stats = record["stats"]
    assert stats["schedule"]["name"] == "cpu" and stats["schedule"]["device"] == "cpu"
    assert stats["training_views"] == 30  # five crops of six images
    assert set(stats["class_id_scores"]) == {"linear"}
    assert set(stats["stage_seconds"]) == {"training", "cluster probe", "predict"}  # where the time goes (no crf here)
    assert kept and all(_plain(v) for v in kept.values()), {k: type(v) for k, v in kept.items()}
    # a second K reuses the head (trained once) and trains only its cluster probe
    kept.clear()
    runner.run(RunConfig(backbone="reference", task=task, dataset="synthetic", dataset_options=SMALL, params=tuple(sorted(params.items())),
                         k=3))
    assert len(kept) == 2


@pytest.mark.slow
def test_primaps_em_on_stego_features_reuses_the_stego_cells_head(runner, monkeypatch):
    from ssl_bench.runner import RunConfig

    trainings = []
    real_train = stego.train_head
    monkeypatch.setattr(stego, "train_head", lambda *a, **kw: trainings.append(1) or real_train(*a, **kw))
    head = runner.run(RunConfig(backbone="reference", task="stego", dataset="synthetic", dataset_options=SMALL,
                                params=tuple(sorted(TINY_STEGO.items())))).record
    features_from = {"task": "stego", "params": TINY_STEGO}
    params = {"features_from": features_from, "epochs": 1, "pretrain_epochs": 1, "batch_size": 4, "crf": False,
              "proposal_crf": False, "augment": "none"}
    record = runner.run(RunConfig(backbone="reference", task="primaps-em", dataset="synthetic",
                                  dataset_options=SMALL, params=tuple(sorted(params.items())))).record
    assert len(trainings) == 1  # the head of the stego cell, read by the PriMaPs-EM cell
    assert record["stats"]["features_from"]["head"] == features_from
    assert record["stats"]["features_from"]["training_views"] == 30
    # EM starts from the head's cluster probe (the reference code's initialisation on top of STEGO / HP): with no
    # teacher update yet (1 step < ema_every) the prediction is the STEGO cell's
    assert record["stats"]["steps"] < registry.task("primaps-em").params["ema_every"]
    assert record["miou"] == pytest.approx(head["miou"], abs=2.0)  # scores upsampled, not codes: border pixels


@pytest.mark.slow
def test_primaps_table1_sweep_file_reports_the_papers_row_structure(tmp_path):
    """examples/primaps-table1-heads.yaml, reduced (the reference backbone on 4 synthetic images, a few steps),
    swept and reported with --rows as a user would: Table 1's six rows, unsupervised and linear-probe columns,
    every cell filled."""
    import yaml
    from typer.testing import CliRunner

    from ssl_bench.cli import app

    sweep = yaml.safe_load(open("examples/primaps-table1-heads.yaml"))
    tiny = {"stego": TINY_STEGO, "hp": TINY_HP}
    quick = {"epochs": 1, "pretrain_epochs": 1, "batch_size": 4, "crf": False, "proposal_crf": False, "augment": "none"}
    for entry in sweep["tasks"]:
        params = entry["params"]
        if entry["name"] in tiny:
            entry["params"] = {**params, **tiny[entry["name"]]}
        elif "features_from" in params:
            head = params["features_from"]
            entry["params"] = {**params, **quick, "features_from": {**head, "params": {**head["params"], **tiny[head["task"]]}}}
        elif entry["name"] == "primaps-em":
            entry["params"] = {**params, **quick}
    sweep.update(backbones=["reference"], datasets=[{"name": "synthetic", "options": {"n": 4}}])
    path = tmp_path / "table1.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    where = ["--store", str(tmp_path / "runs.sqlite")]
    done = CliRunner().invoke(app, ["sweep", str(path), *where, "--cache", str(tmp_path / "cache")])
    assert done.exit_code == 0, done.output
    result = CliRunner().invoke(app, ["report", "--rows", str(path), *where])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("| synthetic")]
    header = next(line for line in result.output.splitlines() if line.startswith("| Dataset"))
    assert [h.strip() for h in header.strip("|").split("|")][3:] == [
        "Row", "Unsupervised Acc", "Unsupervised mIoU", "Supervised linear probe Acc", "Supervised linear probe mIoU"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert [c[3] for c in cells] == ["Baseline", "+ PriMaPs-EM", "+ STEGO", "+ STEGO + PriMaPs-EM", "+ HP",
                                     "+ HP + PriMaPs-EM"]
    assert all(float(v) >= 0 for c in cells for v in c[4:])  # every cell stored and scored
    # a "+ PriMaPs-EM" row repeats the linear probe of the features it starts from, as the paper's table
    assert cells[3][6:] == cells[2][6:] and cells[1][6:] == cells[0][6:]


@pytest.mark.parametrize("table, message", [
    ({"columns": {"U": "final"}, "rows": [{"label": "a", "cells": {"V": 0}}]}, "names column group 'V'"),
    ({"columns": {"U": "final"}, "rows": [{"label": "a", "cells": {"U": 7}}]}, r"not a task entry \(0 to 0\)"),
    ({"columns": {"U": "final"}, "rows": [{"label": "a"}]}, "row 0 needs a label and cells"),
    ({"columns": {"U": "final"}, "metrics": ["iou"], "rows": []}, "metrics must be a list of acc, miou, f1"),
])
def test_bad_table_sections_are_one_line(tmp_path, table, message):
    import yaml

    from ssl_bench.report.rows import rows_table

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"backbones": ["reference"], "datasets": [{"name": "synthetic", "options": {"n": 2}}],
                                    "tasks": ["kmeans"], "table": table}))
    with pytest.raises(UserError, match=message) as err:
        rows_table(path, runner=None)
    assert "\n" not in str(err.value)


def test_hp_consistency_views_are_jittered_on_the_runs_device_and_train_from_there():
    """torch's meta device stands in for a GPU: the backbone sees views made there and the features stay there;
    a training step takes such a tensor as its augmented views (the consistency term)."""
    import types

    from ssl_bench.data.protocol import Protocol

    seen = []

    def extract(x, kinds):
        return {"patch": torch.nn.functional.avg_pool2d(x, 8).permute(0, 2, 3, 1).repeat(1, 1, 1, 2)}

    backbone = types.SimpleNamespace(normalize=lambda x: seen.append(x) or x.permute(0, 3, 1, 2).float() / 255,
                                     extract=extract)
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    ctx = types.SimpleNamespace(device=torch.device("meta"), backbone=backbone, protocol=Protocol(),
                                image=lambda i, split, **view: images[i])
    p = {**registry.task("hp").params, "augment": "image", "alpha": 0.5}
    views = hp._augmented(ctx, p, "val", {})([0, 2])
    assert [x.device.type for x in seen] == ["meta"] and views.device.type == "meta" and views.shape == (2, 4, 4, 6)

    ctx.device = torch.device("cpu")
    feats = [f for f in hp._augmented(ctx, p, "val", {})(range(4)).numpy()]  # (4, 4, 6) views of the CPU
    plan = {"name": "cpu", "device": "cpu", "steps": 2, "batch_size": 2}
    p = {**p, "dim": 4, "local_weights": "none", "pool_size": 4, "dropout": False}
    _, history = hp.train_head(feats, None, hp._augmented(ctx, p, "val", {}), p, plan, 0, "cpu")
    assert len(history["consistency"]) == 2 and all(c > 0 for c in history["consistency"])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_a_training_batch_is_the_cached_maps_exactly_converted_on_the_device(dtype):
    maps = [np.random.default_rng(i).standard_normal((5, 4, 6)).astype(dtype) for i in range(3)]
    batch = heads.as_batch(maps, [2, 0], "cpu")
    expected = np.stack([maps[2], maps[0]]).astype(np.float32).transpose(0, 3, 1, 2)
    assert batch.dtype == torch.float32 and batch.is_contiguous() and np.array_equal(batch.numpy(), expected)
    on_meta = heads.as_batch(maps, [2, 0], "meta")  # a stand-in for a GPU: converted there
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.float32 and on_meta.shape == (2, 6, 5, 4)
