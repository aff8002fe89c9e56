"""PriMaPs-EM: proposals, pseudo labels, EM training, paper variants and the task adapter."""

from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ssl_bench import registry
from ssl_bench.data.protocol import Protocol
from ssl_bench.methods import primaps as pm
from ssl_bench.methods import primaps_em as em

DEFAULTS = registry.task("primaps-em").params  # the paper's setting, as the task file declares it

# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _tiny_tensors_one_thread(one_thread):
    """Every test here works on tiny tensors (see conftest's one_thread)."""


def two_halves(h=10, w=10, d=8, noise=0.05, seed=0):
    """Left half along e0, right half along e1 (orthogonal), small noise."""
    rng = np.random.default_rng(seed)
    f = np.zeros((h, w, d), np.float32)
    f[:, : w // 2, 0] = 1.0
    f[:, w // 2:, 1] = 1.0
    return f + noise * rng.standard_normal(f.shape).astype(np.float32)


def synthetic_set(n_images=32, k=4, d=16, grid=8, noise=0.3, seed=0):
    """Images made of 2-3 rectangular class regions; features = orthogonal class mean + shared offset +
    isotropic noise (noisy enough that single patches are often misclassified)."""
    rng = np.random.default_rng(seed)
    means = np.eye(k, d) + 0.3 * rng.standard_normal(d) / np.sqrt(d)
    feats, labels = [], []
    for _ in range(n_images):
        a, b, c = rng.choice(k, 3, replace=False)
        lab = np.full((grid, grid), a, np.int64)
        lab[:, rng.integers(2, grid - 2):] = b
        if rng.random() < 0.5:
            r, s = rng.integers(0, grid // 2, 2)
            lab[r:r + grid // 2, s:s + grid // 2] = c
        feats.append((means[lab] + noise * rng.standard_normal((grid, grid, d))).astype(np.float32))
        labels.append(lab)
    return feats, labels


def hungarian_accuracy(preds, labels, k):
    conf = np.zeros((k, k), np.int64)
    for p, t in zip(preds, labels):
        np.add.at(conf, (p.ravel(), t.ravel()), 1)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    return conf[rows, cols].sum() / conf.sum()


# ---------------------------------------------------------------------------------------------- proposals


def test_two_clusters_give_two_proposals_covering_them():
    # the |cosine| anchor: the signed one of the paper can land on an assigned patch once one tight cluster is
    # left (test_primaps_proposals pins that behaviour of the reference code)
    ids = pm.principal_mask_proposals(two_halves(), anchor="abs")
    left, right = np.unique(ids[:, :5]), np.unique(ids[:, 5:])
    assert len(left) == 1 and len(right) == 1 and left[0] != right[0]
    assert left[0] >= 0 and right[0] >= 0 and ids.dtype == np.int64


@pytest.mark.parametrize("coverage", [0.5, 0.95])
def test_coverage_stopping_rule(coverage):
    feats = np.random.default_rng(1).standard_normal((16, 16, 12)).astype(np.float32)
    soft = pm.proposal_soft_masks(feats, coverage=coverage)
    assigned = (soft > 0).any(0)
    assert assigned.mean() >= coverage  # ignore fraction <= 1 - coverage
    assert (soft[:-1] > 0).any(0).mean() < coverage  # ...and it stopped as soon as that was reached
    assert (soft > 0).sum(0).max() == 1  # masks are disjoint
    ids = pm.principal_mask_proposals(feats, coverage=coverage)
    assert np.array_equal(ids >= 0, assigned)


def test_higher_psi_gives_smaller_first_mask():
    # a smooth 1-d feature manifold: similarity to the anchor decays gradually with distance
    theta = np.linspace(0, np.pi, 20)
    feats = np.stack([np.cos(theta), np.sin(theta)], -1)[None].repeat(6, 0).astype(np.float32)
    sizes = [(pm.proposal_soft_masks(feats, psi=psi)[0] > 0).sum() for psi in (0.2, 0.5, 0.8)]
    assert sizes[0] > sizes[1] > sizes[2] > 0


def test_psi_extremes():
    # three distinct feature values on a 6x6 grid, all with positive cosine to each other
    feats = np.zeros((6, 6, 3), np.float32)
    feats[:, :2] = (1.0, 0.1, 0.0)
    feats[:, 2:4] = (0.6, 0.8, 0.0)
    feats[:, 4:] = (0.1, 0.0, 1.0)
    # psi = 1: only exact copies of the anchor (similarity = the maximum) form a mask -> one mask per value
    ids = pm.principal_mask_proposals(feats, psi=1.0)
    assert ids.max() + 1 == 3 and all(len(np.unique(ids[:, c:c + 2])) == 1 for c in (0, 2, 4))
    # tiny psi: every position with positive similarity to the anchor joins the first mask
    assert np.all(pm.principal_mask_proposals(feats, psi=0.01) == 0)


def test_nn_anchor_versus_principal_direction():
    # features m + a*u with a strong common offset m: v1 = u is far from every feature
    h, w = 8, 8
    feats = np.zeros((h, w, 4), np.float32)
    feats[..., 0] = 3.0
    feats[:, : w // 2, 1], feats[:, w // 2:, 1] = 1.0, -1.0
    anchored = pm.principal_mask_proposals(feats, nn_anchor=True)
    direct = pm.principal_mask_proposals(feats, nn_anchor=False)
    # anchor = a real feature: its cosine 0.8 to the other half passes psi -> one mask for all
    assert np.all(anchored == 0)
    # direction itself: cosines +-0.32, only one half passes its first threshold
    first = direct == 0
    assert first.sum() == h * w // 2 and (np.all(first[:, :4]) or np.all(first[:, 4:]))


def test_non_iterative_runs_out_of_directions():
    # four clusters on the axes of a 2-d feature space, the x-axis ones 4x larger (so PC1 = x, PC2 = y):
    # fixed principal directions of the whole image can only give 2 masks, recomputing finds all 4
    angles = np.repeat([0.0, np.pi, np.pi / 2, 3 * np.pi / 2], [20, 20, 5, 5])
    feats = np.stack([np.cos(angles), np.sin(angles)], -1).reshape(5, 10, 2).astype(np.float32)
    iterative = pm.principal_mask_proposals(feats, psi=0.95, iterative=True)
    fixed = pm.principal_mask_proposals(feats, psi=0.95, iterative=False)
    assert (iterative >= 0).mean() >= 0.95 and iterative.max() + 1 == 4
    assert fixed.max() + 1 == 2 and np.array_equal(fixed == 0, iterative == 0)  # same first component
    first, second = feats[fixed == 0], feats[fixed == 1]
    assert len(first) == 20 and np.allclose(np.abs(first[:, 0]), 1)  # PC1: one x-axis cluster
    assert len(second) == 5 and np.allclose(np.abs(second[:, 1]), 1)  # PC2: a y-axis cluster


def test_degenerate_features_terminate():
    const = np.ones((6, 7, 5), np.float32)
    assert np.all(pm.principal_mask_proposals(const) == 0)
    assert np.all(pm.principal_mask_proposals(np.zeros((6, 7, 5), np.float32)) == -1)
    noise = np.random.default_rng(0).standard_normal((12, 12, 8)).astype(np.float32)
    assert pm.principal_mask_proposals(noise, max_masks=3).max() <= 2


def test_proposals_to_image_upsamples_and_keeps_background_ignored():
    soft = pm.proposal_soft_masks(two_halves(), coverage=0.95)
    ids = pm.proposals_to_image(soft, (40, 40), crf=False)
    assert ids.shape == (40, 40)
    assert len(np.unique(ids[:, :16])) == 1 and len(np.unique(ids[:, 24:])) == 1
    assert ids[0, 0] != ids[0, -1]
    # a single mask covering only the top-left quarter: the rest becomes background (-1)
    quarter = np.zeros((1, 10, 10), np.float32)
    quarter[0, :5, :5] = 1.0
    ids = pm.proposals_to_image(quarter, (20, 20), crf=False)
    assert np.all(ids[:8, :8] == 0) and np.all(ids[12:, :] == -1)
    assert np.all(pm.proposals_to_image(np.zeros((0, 4, 4), np.float32), (8, 8), crf=False) == -1)


def test_proposals_to_image_with_crf_follows_image_edges():
    pytest.importorskip("pydensecrf", reason="dense CRF needs pydensecrf (pip install pydensecrf2)")
    # masks split at patch column 5 (pixel 20) but the image edge is at pixel 24: CRF moves the boundary
    soft = np.zeros((2, 10, 10), np.float32)
    soft[0, :, :5], soft[1, :, 5:] = 1.0, 1.0
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, :24] = (220, 30, 30)
    image[:, 24:] = (30, 30, 220)
    image.setflags(write=False)  # as np.asarray(PIL image) from ctx.image
    plain = pm.proposals_to_image(soft, (40, 40), crf=False)
    refined = pm.proposals_to_image(soft, (40, 40), image, crf=True)
    assert (plain[:, 20:24] == 1).all()
    assert (refined[:, 20:24] == 0).mean() > 0.9 and (refined[:, 26:] == 1).all()


def test_resize_label_map_majority():
    lab = np.full((8, 8), 2)
    lab[:, :1] = -1
    small = em.resize_label_map(lab, (2, 2))
    assert np.array_equal(small, np.full((2, 2), 2))  # ignore is a minority in every cell
    lab[:, :7] = -1
    assert np.array_equal(em.resize_label_map(lab, (2, 2)), np.full((2, 2), -1))


# ---------------------------------------------------------------------------------------------- pseudo labels & EM


def test_majority_per_proposal():
    votes = torch.tensor([[0, 0, 1, 2], [1, 1, 1, -1]])
    props = torch.tensor([[0, 0, 0, -1], [1, 1, 2, 2]])
    out = em.majority_per_proposal(votes, props)
    assert out.tolist() == [[0, 0, 0, -1], [1, 1, 1, 1]]


def test_oracle_pseudo_labels():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, -1, -1]])
    aligned = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, -1, -1]])
    assert np.array_equal(em.oracle_pseudo_labels(aligned, gt), gt)  # perfect when masks align with GT
    merged = np.array([[0, 0, 0, 1], [0, 0, 0, 1], [-1, -1, 1, 1]])
    out = em.oracle_pseudo_labels(merged, gt)
    assert out.tolist() == [[0, 0, 0, 1], [0, 0, 0, 1], [-1, -1, 1, 1]]


def test_focal_loss_weights_unconfident_classes():
    logits = torch.tensor([[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [0.0, 0.0]])
    target = torch.tensor([0, 0, 0, 1])
    loss = em.focal_loss(logits, target, gamma=2.0)
    chi = logits.softmax(1).mean(0)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    w = (1 - chi) ** 2
    assert torch.isclose(loss, (ce * w[target]).mean())
    assert w[1] > w[0]


def test_em_step_fits_student_to_proposal_majority():
    # the teacher sees a corrupted view (30% of positions look like the next class) and is right on ~70%
    # of each proposal; the student sees the clean view and must learn the proposal-level majority labels
    rng = np.random.default_rng(0)
    d, k = 6, 3
    protos = np.eye(k, d, dtype=np.float32)
    truth = np.repeat(np.arange(k), 4)[None].repeat(6, 0)  # (6, 12): three column blocks = proposals
    clean = protos[truth] + 0.05 * rng.standard_normal((6, 12, d)).astype(np.float32)
    corrupted = clean.copy()
    flip = rng.random(truth.shape) < 0.3
    corrupted[flip] = protos[(truth[flip] + 1) % k]
    teacher = em.PrototypeHead(protos, cosine=False).requires_grad_(False)
    assert 0.6 < (em._scores(teacher, corrupted).argmax(0) == truth).mean() < 0.8
    student = em.PrototypeHead(rng.standard_normal((k, d)), cosine=False)
    opt = torch.optim.Adam(student.parameters(), lr=0.1)
    for _ in range(60):
        out = em.em_step(student, teacher, opt, [corrupted], [truth], student_features=[clean])
    assert out["pseudo_fraction"] == 1.0
    assert (em._scores(student, clean).argmax(0) == truth).all()


def test_ema_decay_follows_reference_warmup():
    # first two updates copy the student, then 1 - 1/n until the decay (0.98 at n = 50)
    assert [em.ema_decay_at(n, 0.98) for n in (1, 2, 3, 4)] == [0.0, 0.0, pytest.approx(2 / 3), 0.75]
    assert em.ema_decay_at(50, 0.98) == pytest.approx(0.98) and em.ema_decay_at(500, 0.98) == 0.98


def test_prototype_head_lives_where_its_prototypes_do():
    # the EM student is built from the trained init head's prototypes: a gain left on the CPU broke GPU training
    head = em.PrototypeHead(torch.zeros(3, 4, device="meta"), cosine=False)
    assert {name: p.device.type for name, p in head.named_parameters()} == {"v": "meta", "g": "meta"}


def test_ema_update():
    a = em.PrototypeHead(np.zeros((2, 3)), cosine=False)
    b = em.PrototypeHead(np.ones((2, 3)), cosine=False)
    em.ema_update(a, b, 0.75)
    assert torch.allclose(a.v, torch.full((2, 3), 0.25))


def test_primaps_em_recovers_classes_on_synthetic_features():
    k = 4
    feats, labels = synthetic_set(k=k, seed=2)
    proposals = [pm.principal_mask_proposals(f) for f in feats]
    settings = dict(pretrain_epochs=2, batch_size=8, ema_every=2)
    init = em.PrimapsEM(k, epochs=0, **settings).fit(feats, proposals, seed=0)  # Eq. 9 pre-training only
    model = em.PrimapsEM(k, epochs=6, **settings).fit(feats, proposals, seed=0)
    assert model.predict_scores(feats[0]).shape == (k, 8, 8)
    acc_init = hungarian_accuracy([init.predict_scores(f).argmax(0) for f in feats], labels, k)
    acc = hungarian_accuracy([model.predict_scores(f).argmax(0) for f in feats], labels, k)
    assert acc > 0.85, acc  # chance (largest class) is ~0.3
    assert acc > acc_init + 0.01, (acc_init, acc)  # proposal-level pseudo labels beat the noisy patches
    assert model.steps == 6 * 4 and not torch.equal(model.theta_t.v, model.theta_s.v)  # EMA teacher lags
    again = em.PrimapsEM(k, epochs=6, **settings).fit(feats, proposals, seed=0)
    assert np.allclose(again.predict_scores(feats[0]), model.predict_scores(feats[0]))  # seeded


def test_primaps_em_ablation_switches_and_augmentation_hook():
    k = 4
    feats, labels = synthetic_set(n_images=16, k=k, seed=3)
    proposals = [pm.principal_mask_proposals(f) for f in feats]
    seen = []

    def augmented(idx, rng):
        seen.append(list(idx))
        return [feats[i] * rng.uniform(0.9, 1.1) for i in idx]

    no_ema = em.PrimapsEM(k, epochs=2, batch_size=8, ema=False, augment=False).fit(feats, proposals, seed=1)
    assert no_ema.theta_t is no_ema.theta_s
    hooked = em.PrimapsEM(k, epochs=2, batch_size=8, augmented_features=augmented).fit(feats, proposals, seed=1)
    assert len(seen) == hooked.steps == 4 and all(len(b) == 8 for b in seen)
    capped = em.PrimapsEM(k, epochs=5, max_steps=3, batch_size=8).fit(feats, proposals, seed=1)
    assert capped.steps == 3


def test_em_too_short_to_update_the_teacher_says_so_before_training():
    """The teacher predicts and is updated every ema_every steps: fewer steps leave the PriMaPs baseline."""
    import warnings

    k = 4
    feats, _ = synthetic_set(n_images=16, k=k, seed=3)
    proposals = [pm.principal_mask_proposals(f) for f in feats]
    with pytest.warns(UserWarning, match=r"4 EM step\(s\), fewer than ema_every=10: the teacher, which predicts"):
        short = em.PrimapsEM(k, epochs=2, batch_size=8).fit(feats, proposals, seed=1)
    assert short.teacher_updates == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 10 steps: one update, nothing to say
        assert em.PrimapsEM(k, epochs=5, batch_size=8).fit(feats, proposals, seed=1).teacher_updates == 1


def test_baseline_and_linear_probe():
    k = 4
    feats, labels = synthetic_set(k=k, noise=0.15, seed=5)
    base = em.PrototypeBaseline(k, epochs=3, batch_size=8).fit(feats, seed=0)
    scores = base.predict_scores(feats[0])
    assert scores.shape == (k, 8, 8) and np.abs(scores).max() <= 1.0 + 1e-5  # cosine similarities
    assert hungarian_accuracy([base.predict_scores(f).argmax(0) for f in feats], labels, k) > 0.6
    # supervised probe, labels given on a 2x finer grid than the features (logits get upsampled)
    fine = [np.kron(lab, np.ones((2, 2), np.int64)) for lab in labels]
    probe = em.LinearProbe(k, epochs=10, batch_size=8, lr=0.05).fit(feats, fine, seed=0)
    acc = np.mean([(probe.predict_scores(f).argmax(0) == lab).mean() for f, lab in zip(feats, labels)])
    assert acc > 0.95  # no matching needed: the probe predicts class ids


def test_pca_prototypes_are_principal_directions():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 50, 5)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1])
    protos = em.pca_prototypes(list(x[:, :, None, :]), k=2)
    assert np.allclose(np.abs(protos), np.eye(5)[:2], atol=0.1)


def test_augmentations():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(5, 6, 7)
    out = em.feature_space_augment(f, gen)
    assert out.shape == f.shape and not torch.allclose(out, f)
    image = np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8)
    aug = em.photometric_augment(image, np.random.default_rng(0))
    assert aug.shape == image.shape and aug.dtype == np.uint8 and not np.array_equal(aug, image)


# ---------------------------------------------------------------------------------------------- adapter


@dataclass
class _Prediction:
    index: int
    labels: np.ndarray
    stream: str = "final"
    split: str | None = None


@dataclass
class _TaskResult:
    predictions: object
    stats: dict = field(default_factory=dict)


class _Store(list):
    def grid(self, i):
        return self[i].shape[:2]


class _Ctx:
    """Just enough of TaskContext: 8x8 patch grids of 4-pixel patches -> 32x32 images."""

    def __init__(self, params, k=4):
        feats, labels = synthetic_set(n_images=12, k=k, seed=7)
        self.store, self.labels = _Store(feats), labels
        self.k, self.seed, self.split, self.params = k, 0, "val", {**DEFAULTS, **params}
        self.dataset = types.SimpleNamespace(num_classes=k)
        self.protocol = Protocol()  # the default scoring rules
        self.device = torch.device("cpu")  # where the heads train
        palette = np.random.default_rng(0).integers(0, 255, (k, 3))
        self.images = [palette[np.kron(lab, np.ones((4, 4), np.int64))].astype(np.uint8) for lab in labels]
        for image in self.images:
            image.setflags(write=False)  # ctx.image returns np.asarray of a PIL image: read-only
        self.label_calls = 0

    def features(self, kind, split=None):
        assert kind == "patch"
        return self.store

    def image(self, i, split=None):
        return self.images[i]

    def label_size(self, i, split=None):
        return self.images[i].shape[:2]

    def label(self, i, split=None):
        self.label_calls += 1
        return np.kron(self.labels[i], np.ones((4, 4), np.int64))

    def progress(self, iterable, **_):  # the runner's default progress takes keywords only
        return iterable

    def timed(self, stage):
        return contextlib.nullcontext()

    def timed_stream(self, stage, items):
        return items


@pytest.fixture
def runner_module(monkeypatch):
    """Use the real ssl_bench.runner when it exists, else a stand-in with the spec's names."""
    try:
        from ssl_bench.runner import Prediction, TaskResult  # noqa: F401
    except ImportError:
        fake = types.ModuleType("ssl_bench.runner")
        fake.Prediction, fake.TaskResult = _Prediction, _TaskResult
        monkeypatch.setitem(sys.modules, "ssl_bench.runner", fake)


@pytest.mark.parametrize("mode", ["em", "baseline", "linear-probe", "oracle"])
def test_run_adapter_modes(runner_module, mode):
    params = dict(mode=mode, proposal_crf=False, crf=False, epochs=3, pretrain_epochs=2, batch_size=4,
                  baseline_epochs=3, augment="none")
    ctx = _Ctx(params)
    result = ctx_run = pm.run(ctx)
    preds = list(ctx_run.predictions)
    assert [p.index for p in preds] == list(range(12)) and {p.stream for p in preds} == {"final"}
    assert all(p.labels.shape == (32, 32) and p.labels.dtype == np.int64 for p in preds)
    gt = [np.kron(lab, np.ones((4, 4), np.int64)) for lab in ctx.labels]
    acc = hungarian_accuracy([np.maximum(p.labels, 0) for p in preds], gt, ctx.k)
    assert acc > 0.6, (mode, acc)
    # labels are read only by the supervised / oracle variants
    assert (ctx.label_calls > 0) == (mode in ("linear-probe", "oracle"))
    assert result.stats["mode"] == mode
    if mode == "em":
        assert result.stats["steps"] == 9 and 0 < result.stats["proposal_pixel_fraction"] <= 1
    if mode in ("linear-probe", "oracle"):  # class ids: also scored without cluster matching
        ids = result.stats["class_id_scores"]
        direct = 100 * np.mean([(p.labels == g).mean() for p, g in zip(preds, gt)])
        assert ids["all"]["acc"] == pytest.approx(direct) and ids["labelled"]["acc"] >= ids["all"]["acc"]


def test_run_adapter_crf_streams(runner_module):
    pytest.importorskip("pydensecrf", reason="dense CRF needs pydensecrf (pip install pydensecrf2)")
    ctx = _Ctx(dict(mode="em", proposal_crf=True, crf=True, epochs=1, pretrain_epochs=1, batch_size=4,
                    augment="none"))
    preds = list(pm.run(ctx).predictions)
    assert {p.stream for p in preds} == {"final", "nocrf"} and len(preds) == 24


def test_the_proposals_stream_from_worker_processes_equal_one_at_a_time(runner_module, monkeypatch):
    pytest.importorskip("pydensecrf", reason="dense CRF needs pydensecrf (pip install pydensecrf2)")
    ctx = _Ctx(dict(mode="em", proposal_crf=True, crf=False))
    streams = {}
    for workers in ("1", "2"):
        monkeypatch.setenv("SSL_BENCH_CRF_WORKERS", workers)
        streams[workers] = list(pm.stream_image_proposals(ctx, ctx.store, "val", ctx.params, start_up_s=0))
    assert [i for i, _ in streams["2"]] == list(range(12))
    assert all(np.array_equal(a, b) and a.shape == (32, 32) for (_, a), (_, b) in zip(streams["1"], streams["2"]))
    assert len({int(ids.max()) for _, ids in streams["1"]}) > 1  # proposals, not one constant map


class _FakeBackbone:
    """Patch features = mean colour of each 4x4 patch, so augmented images give comparable features."""

    def __init__(self, d):
        self.d, self.calls, self.images = d, 0, 0

    def normalize(self, images):
        return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0

    def extract(self, x, kinds):
        assert set(kinds) == {"patch"}
        self.calls += 1
        self.images += len(x)
        pooled = torch.nn.functional.avg_pool2d(x, 4).permute(0, 2, 3, 1)  # (B, 8, 8, 3)
        return {"patch": pooled.repeat(1, 1, 1, self.d // 3 + 1)[..., : self.d]}


def test_run_adapter_image_augmentation_uses_backbone(runner_module):
    ctx = _Ctx(dict(mode="em", proposal_crf=False, crf=False, epochs=1, pretrain_epochs=1, batch_size=4,
                    augment="image"))
    ctx.backbone = _FakeBackbone(d=16)
    result = pm.run(ctx)
    assert ctx.backbone.images == 12 and ctx.backbone.calls == 3  # 3 steps of 4 images, one pass per step
    assert result.stats["augmentation"] == "image" and result.stats["substitutions"] == []
    assert len(list(result.predictions)) == 12


def test_student_views_are_augmented_on_the_runs_device_and_stay_there(runner_module):
    """torch's meta device stands in for a GPU: every image the backbone sees, and every feature map the student
    gets, lies on the run's device (the augmentation ran there, nothing went back to the CPU)."""
    ctx = _Ctx(dict(augment="image"))
    ctx.device = torch.device("meta")
    seen = []
    fake = _FakeBackbone(d=16)
    ctx.backbone = types.SimpleNamespace(normalize=lambda x: seen.append(x) or fake.normalize(x), extract=fake.extract)
    fit = types.SimpleNamespace(grid=lambda i: (8, 8))
    views = pm._image_augmenter(ctx, fit, "val")(list(range(4)), np.random.default_rng(0))
    assert seen and all(isinstance(x, torch.Tensor) and x.device.type == "meta" for x in seen)
    assert len(views) == 4 and all(v.device.type == "meta" and v.shape == (8, 8, 16) for v in views)


def test_task_file_registers_valid_variants():
    variants = {name: spec for name, spec in registry.tasks().items() if spec.entrypoint == "ssl_bench.methods.primaps:run"}
    assert {"primaps-em", "primaps-baseline", "primaps-linear-probe", "primaps-oracle"} <= set(variants)
    for spec in variants.values():
        pm.check_params(spec.params)  # every registered variant passes the task's own checks
        assert spec.params["mode"] in pm.MODES


@pytest.mark.parametrize("params, message", [
    (dict(mode="kmeans"), "unknown mode 'kmeans'"),
    (dict(psi=1.5), "psi=1.5 is invalid -- use a number in \\(0, 1\\]"),
    (dict(coverage=0), "coverage=0 is invalid"),
    (dict(epochs=-1), "epochs=-1 is invalid"),
    (dict(batch_size=2.5), "batch_size=2.5 is invalid -- use an integer"),
    (dict(augment="feature"), "augment='feature' is invalid -- use image | feature-standin | none"),
    (dict(train_resolution="full"), "train_resolution='full' is invalid"),
    (dict(ema="yes"), "ema='yes' is invalid -- use true or false"),
    (dict(max_masks=0), "max_masks=0 is invalid"),
])
def test_run_rejects_bad_parameters_in_one_line(runner_module, params, message):
    from ssl_bench.errors import UserError

    with pytest.raises(UserError, match=message) as err:
        pm.check_params({**DEFAULTS, **params})
    assert "\n" not in str(err.value)


def test_speed_substitutes_are_recorded(runner_module):
    fast = dict(mode="em", proposal_crf=False, crf=False, epochs=1, pretrain_epochs=1, batch_size=4,
                augment="feature-standin", train_resolution="patch")
    stats = pm.run(_Ctx(fast)).stats
    assert [s.split(":")[0] for s in stats["substitutions"]] == ["augment=feature-standin", "train_resolution=patch"]
    assert stats["augmentation"] == "feature-standin" and stats["train_resolution"] == "patch"
    assert pm.substitutions(DEFAULTS) == []  # the defaults are the paper's setting
