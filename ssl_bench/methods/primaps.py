"""PriMaPs-EM: principal mask proposals + stochastic EM fitting of class prototypes.

Hahn, Araslanov, Schaub-Meyer, Roth, "Boosting Unsupervised Semantic Segmentation with Principal Mask
Proposals", TMLR 2024 (reference code: github.com/visinf/primaps; this is an independent implementation).

Pipeline on cached patch features (h, w, d):
1. ``proposal_soft_masks`` / ``principal_mask_proposals`` (``primaps_proposals.py``, with the choices it
   follows from the reference code): per image, repeatedly take the first principal component of the
   not-yet-assigned features, anchor it to its nearest feature, and cut the mask of features similar to the
   anchor, until ``coverage`` of the positions is assigned.
2. ``proposals_to_image`` (same module): median-filter the soft masks, add a background channel, upsample
   bilinearly to the image and refine with the dense CRF -> proposal ids at image resolution (-1 = unassigned).
3. ``PrimapsEM``: prototypes initialised by PCA, pre-trained with the cosine batch k-means loss (Eq. 9),
   then EM: the EMA teacher labels each proposal with its majority class (E), the student is fitted to
   those pseudo labels with a confidence-weighted focal loss (M). Inference uses the teacher (+ CRF).

Rows of the paper's tables on the same features: ``PrototypeBaseline`` (Eq. 9 only), ``LinearProbe``
(supervised upper bound) and ``oracle_pseudo_labels`` (each proposal gets its best ground-truth class).

Faithful by default; two speed substitutes exist, are named, and are stored in the run's config (and
listed in ``stats["substitutions"]``) whenever they are used (variant ``primaps-em-fast`` uses both):
- ``train_resolution: patch`` trains on the patch grid (proposals majority-resampled to it) instead of the
  image resolution of the reference.
- ``augment: feature-standin`` replaces the photometric augmentation of the student's *images* (which
  needs a backbone pass per image and step) by ``feature_space_augment``, a heuristic on the features.
  The default ``augment: image`` is the paper's: blur / jitter / greyscale on the image, then the backbone.

Deliberate differences from the reference code:
- Logits, not features, are upsampled bilinearly. For the linear heads of EM and the probe that is exactly
  equivalent (interpolation and a 1x1 linear layer commute); for the baseline's cosine head it is not
  (the reference normalises upsampled features), a small difference at region borders only.
- The runner matches clusters to classes (Hungarian) for every task; the oracle and the linear probe
  predict class ids already, so their runs also store unmatched scores in ``stats["class_id_scores"]``.
- With ``ema=False`` (Table 4 ablation) the teacher *is* the student (pseudo labels from the current
  student, plain stochastic EM); the reference code's "no EMA update" setting would instead freeze the
  teacher at its initialisation.
- Training sees the protocol's centre crop of each image (no random resized crops / flips of the
  reference's data loader); test-time flip averaging is not applied (the cache holds one view).
"""

from __future__ import annotations

import copy
import os
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import with_class_id_scores
from ..ops import upsample_argmax
from .feature_source import ProjectedFeatures, parse_features_from, trained_projection
from ..registry import is_number, is_whole
from .primaps_proposals import (ANCHORS, PRINCIPAL, _t, principal_mask_proposals, proposal_soft_masks,  # noqa: F401
                                proposals_to_image)


# ----------------------------------------------------------------------------------------------------------
# 1. Principal mask proposals (primaps_proposals.py)
# ----------------------------------------------------------------------------------------------------------


def resize_label_map(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Majority-vote resampling of an id map (-1 counts as its own value) to ``size``; (h, w) int64.

    Area voting keeps thin regions better than nearest sampling when going from image to patch grid.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape == tuple(size):
        return labels.copy()
    t = torch.from_numpy(labels + 1)
    onehot = F.one_hot(t, int(t.max()) + 1).permute(2, 0, 1).float()[None]
    if size[0] <= labels.shape[0] and size[1] <= labels.shape[1]:
        votes = F.adaptive_avg_pool2d(onehot, size)
    else:
        votes = F.interpolate(onehot, size=size, mode="nearest")
    return (votes[0].argmax(0) - 1).numpy().astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# 2. Heads, losses, one EM step
# ----------------------------------------------------------------------------------------------------------


class PrototypeHead(nn.Module):
    """K class prototypes scored against features (N, d) -> logits (N, K).

    ``cosine=True``: cos(f, theta_k), the clustering layer of Eq. 9 (weight-normed, magnitude fixed to 1).
    ``cosine=False``: g_k <f, theta_k / |theta_k|> on raw features with a learnable g, the weight-normed 1x1
    segmentation head of the reference code; its argmax equals the cosine argmax while all g_k are equal.
    """

    def __init__(self, prototypes: torch.Tensor | np.ndarray, cosine: bool):
        super().__init__()
        v = _t(prototypes)
        self.cosine = cosine
        self.v = nn.Parameter(v)
        self.g = nn.Parameter(torch.ones(len(v)), requires_grad=not cosine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.v, dim=1)
        if self.cosine:
            return F.normalize(x, dim=1) @ w.T
        return (x @ w.T) * self.g

    def prototypes(self) -> np.ndarray:
        return F.normalize(self.v.detach(), dim=1).cpu().numpy().copy()


def _on(head: nn.Module, array, dtype=torch.float32) -> torch.Tensor:
    """An array as a tensor on ``head``'s device (training runs on the run's device; arrays stay on the CPU)."""
    return _t(array, dtype).to(next(head.parameters()).device)


def _grid_logits(head: nn.Module, feats: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits (K, H, W) of one image's features (h, w, d), bilinearly upsampled to ``size``."""
    h, w, d = feats.shape
    logits = head(feats.reshape(-1, d)).T.reshape(-1, h, w)
    if size is not None and tuple(size) != (h, w):
        logits = F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return logits


def majority_per_proposal(votes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
    """Each proposal takes the most frequent valid vote inside it; -1 where no proposal / no valid vote.

    votes, proposals: int64 tensors of equal shape (-1 = no vote / no proposal). Ties go to the lower id.
    """
    out = torch.full_like(proposals, -1)
    valid = (proposals >= 0) & (votes >= 0)
    if not valid.any():
        return out
    n_prop, n_cls = int(proposals.max()) + 1, int(votes.max()) + 1
    counts = torch.bincount(proposals[valid] * n_cls + votes[valid], minlength=n_prop * n_cls)
    counts = counts.reshape(n_prop, n_cls)
    best = torch.where(counts.sum(1) > 0, counts.argmax(1), torch.full((n_prop,), -1, device=counts.device))
    inside = proposals >= 0
    out[inside] = best[proposals[inside]]
    return out


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Cross-entropy weighted per class by (1 - chi_k)^gamma, chi_k = mean softmax confidence of class k.

    logits (N, K), target (N,) with -1 = ignore. As in the reference, chi is averaged over all pixels of
    the batch and the loss over all pixels (ignored ones contribute 0): rare, unconfident classes weigh more.
    """
    chi = logits.detach().softmax(1).mean(0)
    weight = (1.0 - chi) ** gamma
    return F.cross_entropy(logits, target, weight=weight, ignore_index=-1, reduction="none").mean()


def em_step(theta_s: nn.Module, theta_t: nn.Module, optimizer: torch.optim.Optimizer, features: Sequence,
            proposals: Sequence, student_features: Sequence | None = None, focal_gamma: float = 2.0) -> dict:
    """One stochastic EM step on a batch of images.

    E: the teacher theta_t predicts every pixel of the proposal grid; each proposal gets its majority
    class. M: one optimiser step of the student theta_s on those pseudo labels (focal loss), fed with
    ``student_features`` (augmented views; default: the same features). The EMA update is the caller's.
    features / student_features: (h, w, d) per image; proposals: (H, W) int64 per image, -1 = none.
    """
    feats = [_on(theta_s, f) for f in features]  # on the heads' device (the run's)
    props = [_on(theta_s, p, torch.int64) for p in proposals]
    s_feats = feats if student_features is None else [_on(theta_s, f) for f in student_features]
    with torch.no_grad():
        pseudo = [majority_per_proposal(_grid_logits(theta_t, f, p.shape).argmax(0), p)
                  for f, p in zip(feats, props)]
    logits = torch.cat([_grid_logits(theta_s, f, p.shape).flatten(1).T for f, p in zip(s_feats, props)])
    target = torch.cat([p.flatten() for p in pseudo])
    loss = focal_loss(logits, target, focal_gamma)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": float(loss.detach()), "pseudo_fraction": float((target >= 0).float().mean())}


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s, 1.0 - decay)


def ema_decay_at(update: int, decay: float) -> float:
    """Decay of the n-th EMA update (1-based), the warm-up of the reference EMA (ema-pytorch, inverse decay,
    power 1): the first two updates copy the student, then 1 - 1/n, capped at ``decay``."""
    return 0.0 if update <= 2 else min(decay, 1.0 - 1.0 / update)


def feature_space_augment(feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Heuristic stand-in for photometric augmentation when no backbone pass is available.

    NOT the paper's augmentation: blur -> a random 3x3 Gaussian blur of the feature map; colour jitter /
    greyscale -> a per-channel gain N(1, 0.1) and Gaussian noise at 10% of each channel's spread.
    """
    h, w, d = feats.shape
    x = feats.permute(2, 0, 1)[None]
    if float(torch.rand((), generator=gen)) < 0.5 and min(h, w) > 1:
        sigma = 0.1 + 0.9 * float(torch.rand((), generator=gen))
        k1 = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * sigma**2))
        k2 = (k1[:, None] * k1[None]) / (k1.sum() ** 2)
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2.expand(d, 1, 3, 3).contiguous(), groups=d)
    x = x[0].permute(1, 2, 0)
    gain = 1.0 + 0.1 * torch.randn(d, generator=gen)
    spread = x.reshape(-1, d).std(0) if h * w > 1 else torch.zeros(d)
    return x * gain + 0.1 * spread * torch.randn(x.shape, generator=gen)


def photometric_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The reference student augmentation on a uint8 image (H, W, 3): Gaussian blur (sigma U[0.1, 2],
    kernel 21) always, then with prob. 0.5 colour jitter (p=0.3, strength 0.1) else greyscale (p=0.1)."""
    import torchvision.transforms.functional as TF

    x = _t(image).permute(2, 0, 1) / 255.0
    x = TF.gaussian_blur(x, kernel_size=21, sigma=float(rng.uniform(0.1, 2.0)))
    if rng.random() < 0.5:
        if rng.random() < 0.3:
            # ColorJitter(0.1, 0.1, 0.1, 0.1) with factors from ``rng``, applied in a random order
            ops = [(TF.adjust_brightness, rng.uniform(0.9, 1.1)), (TF.adjust_contrast, rng.uniform(0.9, 1.1)),
                   (TF.adjust_saturation, rng.uniform(0.9, 1.1)), (TF.adjust_hue, rng.uniform(-0.1, 0.1))]
            for i in rng.permutation(4):
                op, factor = ops[i]
                x = op(x, float(factor))
    elif rng.random() < 0.1:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------------------------------------
# 3. Estimators
# ----------------------------------------------------------------------------------------------------------


def pca_prototypes(features: Sequence, k: int, max_images: int = 2975, seed: int = 0) -> np.ndarray:
    """First k principal components (k, d) of the patch features of up to ``max_images`` images.

    The covariance is accumulated image by image (float64), so any number of images fits in memory.
    Signs follow the largest-|entry|-positive convention (the reference leaves them to randomised SVD).
    """
    n = len(features)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, max_images, replace=False)) if n > max_images else np.arange(n)
    total, sxx, count = None, None, 0
    for i in chosen:
        x = np.asarray(features[int(i)], dtype=np.float64).reshape(-1, np.shape(features[int(i)])[-1])
        total = x.sum(0) if total is None else total + x.sum(0)
        sxx = x.T @ x if sxx is None else sxx + x.T @ x
        count += len(x)
    mean = total / count
    _, vecs = np.linalg.eigh(sxx / count - np.outer(mean, mean))
    comps = vecs[:, ::-1].T[:k]
    if len(comps) < k:  # more classes than feature dimensions: fill with random directions
        comps = np.concatenate([comps, rng.standard_normal((k - len(comps), comps.shape[1]))])
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])
    return (comps * signs[:, None]).astype(np.float32)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled batches; the last incomplete batch is dropped (as the reference) unless it is the only one."""
    order = torch.randperm(n, generator=gen).tolist()
    cut = (n // batch_size) * batch_size if n >= batch_size else n
    return [order[i:i + batch_size] for i in range(0, cut, batch_size)]


def _flat(head: nn.Module, features: Sequence, idx: Sequence[int]) -> torch.Tensor:
    return torch.cat([_on(head, features[i]).flatten(0, -2) for i in idx])


def _scores(head: nn.Module, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _grid_logits(head, _on(head, features)).cpu().numpy()


def kmeans_pretrain(head: PrototypeHead, features: Sequence, epochs: int, batch_size: int, lr: float,
                    gen: torch.Generator, progress: Callable | None = None) -> list[float]:
    """Cosine batch k-means (Eq. 9): maximise each feature's cosine to its closest prototype, with Adam."""
    opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _, idx in _epoch_batches(progress, epochs, len(features), batch_size, gen,
                                 f"PriMaPs k-means ({epochs} epochs)"):
        loss = -head(_flat(head, features, idx)).max(1).values.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _epoch_batches(progress: Callable | None, epochs: int, n: int, batch_size: int, gen: torch.Generator,
                   desc: str, max_steps: int | None = None):
    """(epoch, batch indices) of every epoch in turn, under one bar over the whole training, so its time left
    is the stage's, not one epoch's. Each epoch's batches are drawn from ``gen`` as that epoch starts, exactly
    as a loop per epoch draws them; ``max_steps`` stops after that many batches."""
    per_epoch = len(_batches(n, batch_size, torch.Generator()))  # the count only (a throw-away generator)
    total = epochs * per_epoch if max_steps is None else min(epochs * per_epoch, max_steps)

    def every_batch():
        step = 0
        for epoch in range(epochs):
            for idx in _batches(n, batch_size, gen):
                if max_steps is not None and step >= max_steps:
                    return
                step += 1
                yield epoch, idx

    return every_batch() if progress is None else progress(every_batch(), desc=desc, total=total, unit="batches")


class PrototypeBaseline:
    """The paper's baseline: PCA-initialised cosine prototypes trained with Eq. 9 only."""

    def __init__(self, k: int, epochs: int = 2, batch_size: int = 32, lr: float = 5e-3, pca_images: int = 2975,
                 progress: Callable | None = None, device: str | torch.device = "cpu"):
        self.k, self.epochs, self.batch_size, self.lr = k, epochs, batch_size, lr
        self.pca_images, self.progress, self.device = pca_images, progress, device

    def fit(self, features: Sequence, seed: int = 0) -> "PrototypeBaseline":
        gen = torch.Generator().manual_seed(seed)  # the batch order on the CPU: the same on every device
        self.head = PrototypeHead(pca_prototypes(features, self.k, self.pca_images, seed), cosine=True).to(self.device)
        self.losses = kmeans_pretrain(self.head, features, self.epochs, self.batch_size, self.lr, gen,
                                      self.progress)
        return self

    def predict_scores(self, features: np.ndarray) -> np.ndarray:
        """Cosine similarity to each prototype, (K, h, w)."""
        return _scores(self.head, features)


class LinearProbe:
    """Supervised upper bound: a linear layer trained with cross-entropy on ground-truth labels (-1 ignore)
    given on any grid (logits are upsampled bilinearly to it), Adam, as the reference linear probe."""

    def __init__(self, k: int, epochs: int = 2, batch_size: int = 32, lr: float = 5e-3,
                 progress: Callable | None = None, device: str | torch.device = "cpu"):
        self.k, self.epochs, self.batch_size, self.lr, self.progress = k, epochs, batch_size, lr, progress
        self.device = device

    def fit(self, features: Sequence, labels: Sequence, seed: int = 0) -> "LinearProbe":
        gen = torch.Generator().manual_seed(seed)
        d = np.shape(features[0])[-1]
        # convex problem: a zero start is as good as any and leaves the global RNG alone (no default init)
        self.head = torch.nn.utils.skip_init(nn.Linear, d, self.k)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.head.to(self.device)
        opt = torch.optim.Adam(self.head.parameters(), lr=self.lr)
        self.losses = []
        for _, idx in _epoch_batches(self.progress, self.epochs, len(features), self.batch_size, gen,
                                     f"linear probe ({self.epochs} epochs)"):
            labs = [_on(self.head, labels[i], torch.int64) for i in idx]
            logits = torch.cat([_grid_logits(self.head, _on(self.head, features[i]), lab.shape).flatten(1).T
                                for i, lab in zip(idx, labs)])
            target = torch.cat([lab.flatten() for lab in labs])
            target = torch.where(target < self.k, target, torch.full_like(target, -1))
            loss = F.cross_entropy(logits, target, ignore_index=-1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.losses.append(float(loss.detach()))
        return self

    def predict_scores(self, features: np.ndarray) -> np.ndarray:
        return _scores(self.head, features)


class PrimapsEM:
    """PriMaPs-EM prototype fitting on cached features.

    fit(features, proposals): features[i] (h, w, d); proposals[i] (H, W) int64 ids on the training grid
    (-1 = none; any grid, teacher/student logits are upsampled to it). ``augmented_features(batch_indices,
    rng) -> list of (h, w, d)`` gives features of photometrically augmented images for the student; when
    None and ``augment`` is on, ``feature_space_augment`` is used instead (a heuristic, see its docstring).
    """

    def __init__(self, k: int, pretrain_epochs: int = 2, epochs: int = 50, max_steps: int | None = None,
                 batch_size: int = 32, lr: float = 5e-3, ema: bool = True, ema_every: int = 10,
                 ema_decay: float = 0.98, augment: bool = True, focal_gamma: float = 2.0, pca_images: int = 2975,
                 augmented_features: Callable | None = None, progress: Callable | None = None,
                 device: str | torch.device = "cpu"):
        self.k, self.pretrain_epochs, self.epochs, self.max_steps = k, pretrain_epochs, epochs, max_steps
        self.batch_size, self.lr, self.ema, self.ema_every, self.ema_decay = batch_size, lr, ema, ema_every, ema_decay
        self.augment, self.focal_gamma, self.pca_images = augment, focal_gamma, pca_images
        self.augmented_features, self.progress, self.device = augmented_features, progress, device

    def fit(self, features: Sequence, proposals: Sequence, seed: int = 0,
            init_prototypes: np.ndarray | None = None) -> "PrimapsEM":
        """``init_prototypes`` (K, d): start from these (a trained head's cluster centres, as the reference code
        on top of STEGO / HP) instead of PCA and the Eq. 9 pre-training."""
        if len(features) != len(proposals):
            raise ValueError(f"{len(features)} feature maps but {len(proposals)} proposal maps")
        gen = torch.Generator().manual_seed(seed)  # batch order and feature augmentation on the CPU: the same
        rng = np.random.default_rng(seed)  # draws on every device; the heads train on ``device``
        if init_prototypes is None:
            init = PrototypeHead(pca_prototypes(features, self.k, self.pca_images, seed), cosine=True).to(self.device)
            self.pretrain_losses = kmeans_pretrain(init, features, self.pretrain_epochs, self.batch_size, self.lr,
                                                   gen, self.progress)
        else:
            init, self.pretrain_losses = PrototypeHead(init_prototypes, cosine=True).to(self.device), []
        self.initial_prototypes = init.prototypes()
        self.theta_s = PrototypeHead(init.v.detach(), cosine=False)
        # Without EMA the pseudo labels come from the current student itself.
        self.theta_t = copy.deepcopy(self.theta_s).requires_grad_(False) if self.ema else self.theta_s
        opt = torch.optim.Adam(self.theta_s.parameters(), lr=self.lr)
        self.history: dict[str, list[float]] = {"loss": [], "pseudo_fraction": []}
        step, updates = 0, 0
        for _, idx in _epoch_batches(self.progress, self.epochs, len(features), self.batch_size, gen,
                                     f"PriMaPs-EM ({self.epochs} epochs)", self.max_steps):
            feats = [features[i] for i in idx]
            student = self._student_views(idx, feats, gen, rng)
            out = em_step(self.theta_s, self.theta_t, opt, feats, [proposals[i] for i in idx], student,
                          self.focal_gamma)
            step += 1
            for key in self.history:
                self.history[key].append(out[key])
            if self.ema and step % self.ema_every == 0:
                updates += 1
                ema_update(self.theta_t, self.theta_s, ema_decay_at(updates, self.ema_decay))
        self.steps = step
        return self

    def _student_views(self, idx, feats, gen, rng):
        if not self.augment:
            return None
        if self.augmented_features is not None:
            return self.augmented_features(list(idx), rng)
        return [feature_space_augment(_t(f), gen) for f in feats]

    def predict_scores(self, features: np.ndarray, head: str = "teacher") -> np.ndarray:
        """Logits (K, h, w) of the teacher theta_T (default) or the student theta_S."""
        return _scores(self.theta_t if head == "teacher" else self.theta_s, features)


def oracle_pseudo_labels(proposals: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Paper Table 5 oracle: every proposal takes its majority ground-truth class (ignore pixels do not vote);
    pixels outside every proposal stay -1. proposals and gt: (H, W) int64 of the same shape."""
    if np.shape(proposals) != np.shape(gt):
        raise ValueError(f"proposals {np.shape(proposals)} and labels {np.shape(gt)} differ in shape")
    return majority_per_proposal(_t(gt, torch.int64), _t(proposals, torch.int64)).numpy()


# ----------------------------------------------------------------------------------------------------------
# 4. Task adapter
# ----------------------------------------------------------------------------------------------------------

MODES = ("em", "baseline", "linear-probe", "oracle")
AUGMENTS = ("image", "feature-standin", "none")
# What a speed substitute changes, for the record of every run that uses one (see the module docstring).
SUBSTITUTES = {
    ("augment", "feature-standin"): "student augmentation in feature space, not photometric on the image",
    ("train_resolution", "patch"): "pseudo labels and EM loss on the patch grid, not at image resolution",
}


def check_params(p: dict) -> None:
    """Reject a bad parameter with one line naming it and the fix (before any training)."""
    from ..errors import UserError

    def bad(key, want):
        raise UserError(f"primaps: parameter {key}={p[key]!r} is invalid -- use {want} (-p {key}=...)")

    def number(key, lo, hi, lo_open=False, integer=False, optional=False):
        v = p[key]
        if v is None and optional:
            return
        kind = "an integer" if integer else "a number"
        ok = is_number(v) and (not integer or is_whole(v))  # 2.0 epochs would fail later, inside range()
        if not ok or v < lo or v > hi or (lo_open and v == lo):
            bad(key, f"{kind} in {'(' if lo_open else '['}{lo}, {hi}]" + (" or null" if optional else ""))

    if p["mode"] not in MODES:
        raise UserError(f"primaps: unknown mode {p['mode']!r} -- use one of {', '.join(MODES)}")
    parse_features_from(p["features_from"], "primaps")
    if p["augment"] is False:
        p["augment"] = "none"
    if p["augment"] not in AUGMENTS:
        bad("augment", " | ".join(AUGMENTS))
    for key, allowed in (("anchor", ANCHORS), ("principal", PRINCIPAL)):
        if p[key] not in allowed:
            bad(key, " | ".join(allowed))
    for key in ("psi", "coverage"):
        number(key, 0, 1, lo_open=True)
    number("ema_decay", 0, 1)
    for key in ("lr", "mask_gain"):
        number(key, 0, float("inf"), lo_open=True)
    number("focal_gamma", 0, float("inf"))
    for key in ("batch_size", "ema_every", "pca_images"):
        number(key, 1, float("inf"), integer=True)
    for key in ("pretrain_epochs", "epochs"):
        number(key, 0, float("inf"), integer=True)
    for key in ("baseline_epochs", "probe_epochs", "max_steps"):
        number(key, 0, float("inf"), integer=True, optional=True)
    number("max_masks", 1, float("inf"), integer=True, optional=True)
    for key in ("nn_anchor", "iterative", "proposal_crf", "ema", "crf"):
        if not isinstance(p[key], bool):
            bad(key, "true or false")
    res = p["train_resolution"]
    if res not in ("patch", "image") and not (is_whole(res) and res >= 1):
        bad("train_resolution", "image | patch | an integer factor >= 1 of the patch grid")


def substitutions(p: dict) -> list[str]:
    """The speed substitutes in effect for this mode (empty when the run is the paper's setting)."""
    if p["mode"] != "em":
        return []
    return [f"{key}={p[key]}: {what}" for (key, value), what in SUBSTITUTES.items() if p[key] == value]


def _train_grid(resolution, grid: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int]:
    if resolution == "patch":
        return tuple(grid)
    if resolution == "image":
        return tuple(image_size)
    return (grid[0] * int(resolution), grid[1] * int(resolution))


def image_proposals(features: np.ndarray, size: tuple[int, int], image: np.ndarray | None, p: dict,
                    seed: int = 0) -> np.ndarray:
    """Full PriMaPs proposal pipeline for one image: ids (H, W) at label resolution, -1 = none."""
    soft = proposal_soft_masks(features, p["psi"], p["coverage"], p["nn_anchor"], p["iterative"],
                               p["max_masks"], p["anchor"], p["principal"], seed)
    return proposals_to_image(soft, size, image, crf=p["proposal_crf"], gain=p["mask_gain"])


def _worker_image_proposals(features, size, image, p: dict, seed: int) -> np.ndarray:
    """``image_proposals`` as a ``CRFPool`` job. In a worker process torch and BLAS keep one thread: the workers
    are the parallelism (one per thread of the run), and more threads would only contend with each other."""
    from ..crf import in_worker

    if in_worker() and torch.get_num_threads() > 1:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(1)
        threadpool_limits(1)  # BLAS too (kept for the worker's life): its spinning threads cost more than they give
    return image_proposals(features, size, image, p, seed)


def stream_image_proposals(ctx, features, split: str, p: dict, labels: bool = False, probe: int = 4,
                           start_up_s: float = 8.0) -> Iterator:
    """(index, proposal ids) of every image of ``split``, in order: ``image_proposals``, the first ``probe``
    images in this process, the rest in parallel worker processes (``CRFPool``, as many as the run's threads:
    streaming, the same ids as one process makes) where the probe's pace (images 2 to ``probe``) says they would
    take more than 3x a worker's start-up here (spawn, torch, the compiled kernels: 5-8 s to a first result on
    2 cores), the break-even of two workers with a margin; else in this process too. ``labels``: ids at the size
    of the ground truth (the oracle), else of ``label_size``."""
    import time

    from ..crf import CRFPool, default_workers

    def job(i):
        size = ctx.label(i, split).shape if labels else tuple(ctx.label_size(i, split))
        return np.asarray(features[i]), size, ctx.image(i, split) if p["proposal_crf"] else None, p, ctx.seed

    n, first = len(features), min(probe, len(features))
    t0 = time.perf_counter()
    for i in range(first):
        if i == 1:  # the pace leaves out the first image, which pays this process's one-time loads
            t0 = time.perf_counter()
        yield i, image_proposals(*job(i))
    pace = (time.perf_counter() - t0) / max(first - 1, 1)
    workers = default_workers() if (n - first) * pace > 3 * start_up_s else 1
    stream = CRFPool(workers).map(_worker_image_proposals, (job(i) for i in range(first, n)))
    yield from enumerate(stream, start=first)


def run(ctx):
    """Task adapter (parameters: tasks/primaps-em.yaml). mode: em | baseline | linear-probe | oracle."""
    from ..runner import Prediction, TaskResult

    p = ctx.params  # resolved and checked by the registry (check_params is the task file's validate hook)
    mode = p["mode"]
    evaluated = ctx.features("patch")
    stats: dict = {"mode": mode, "substitutions": substitutions(p)}

    if mode == "oracle":  # pseudo-label quality with ground truth (paper Table 5): uses labels by design
        def oracle():
            coverage = []
            # the runner shows progress while it consumes predictions
            for i, ids in stream_image_proposals(ctx, evaluated, ctx.split, p, labels=True):
                gt = ctx.label(i)
                coverage.append(float((ids >= 0).mean()))
                stats["proposal_pixel_fraction"] = float(np.mean(coverage))  # filled while streaming
                yield Prediction(index=i, labels=oracle_pseudo_labels(ids, gt))
        return TaskResult(predictions=with_class_id_scores(oracle(), ctx, stats), stats=stats)

    fit_split = p["fit_split"] or ctx.split
    stats["fit_split"] = fit_split  # == the evaluated split: fitted transductively (the paper fits on train)
    fit = ctx.features("patch", split=fit_split)  # the backbone's: its proposals, and (no features_from) the model's
    n = len(fit)
    head = trained_projection(ctx, p["features_from"], fit_split)
    if head is not None:  # the model reads the head's projected features; the proposals still the backbone's
        fit_input, evaluated_input = ProjectedFeatures(fit, head.project), ProjectedFeatures(evaluated, head.project)
        stats["features_from"] = {"head": p["features_from"], **head.stats}
    else:
        fit_input, evaluated_input = fit, evaluated
    if mode == "baseline":
        epochs = p["baseline_epochs"] if p["baseline_epochs"] is not None else p["pretrain_epochs"]
        model = PrototypeBaseline(ctx.k, epochs, p["batch_size"], p["lr"], p["pca_images"], ctx.progress, ctx.device)
        with ctx.timed("training"):
            model.fit(fit_input, ctx.seed)
        stats["final_loss"] = model.losses[-1] if model.losses else None
    elif mode == "linear-probe":  # supervised upper bound: ground truth of the fit split
        labels = []
        for i in ctx.progress(range(n), desc="linear probe labels", total=n, unit="images"):
            gt = ctx.label(i, fit_split)
            labels.append(resize_label_map(gt, _train_grid(p["train_resolution"], fit.grid(i), gt.shape)))
        epochs = p["probe_epochs"] if p["probe_epochs"] is not None else p["epochs"]
        with ctx.timed("training"):
            model = LinearProbe(ctx.k, epochs, p["batch_size"], p["lr"], ctx.progress, ctx.device).fit(fit_input, labels,
                                                                                                       ctx.seed)
        stats["final_loss"] = model.losses[-1] if model.losses else None
    else:
        proposals, counts, covered = [], [], []
        with ctx.timed("proposals"):  # the stream's wall time: the images run in parallel
            for i, ids in ctx.progress(stream_image_proposals(ctx, fit, fit_split, p), desc="PriMaPs proposals",
                                       total=n, unit="images"):
                counts.append(int(ids.max()) + 1)
                covered.append(float((ids >= 0).mean()))
                grid = _train_grid(p["train_resolution"], fit.grid(i), ids.shape)
                proposals.append(resize_label_map(ids, grid).astype(np.int16))  # int16: memory of many images
        stats.update(proposals_per_image=float(np.mean(counts)), proposal_pixel_fraction=float(np.mean(covered)))
        augmented = _image_augmenter(ctx, fit, fit_split) if p["augment"] == "image" else None
        if augmented is not None and head is not None:
            augmented = _projected_views(augmented, head.project)
        model = PrimapsEM(ctx.k, p["pretrain_epochs"], p["epochs"], p["max_steps"], p["batch_size"], p["lr"],
                          p["ema"], p["ema_every"], p["ema_decay"], p["augment"] != "none",
                          p["focal_gamma"], p["pca_images"], augmented, ctx.progress, ctx.device)
        with ctx.timed("training"):
            model.fit(fit_input, proposals, ctx.seed, None if head is None else head.clusters)
        hist = model.history
        stats.update(steps=model.steps, final_loss=hist["loss"][-1] if hist["loss"] else None,
                     pseudo_fraction=float(np.mean(hist["pseudo_fraction"])) if hist["loss"] else None,
                     augmentation=p["augment"], train_resolution=p["train_resolution"])

    def predictions():
        if not p["crf"]:
            for i in range(len(evaluated)):  # the runner shows progress while it consumes predictions
                yield Prediction(index=i, labels=upsample_argmax(model.predict_scores(evaluated_input[i]),
                                                                 ctx.label_size(i)), stream="final")
            return
        from ..crf import CRFPool, refine_scores

        jobs = ((ctx.image(i), model.predict_scores(evaluated_input[i]), ctx.label_size(i))
                for i in range(len(evaluated)))
        for i, (plain, refined) in enumerate(CRFPool().map(refine_scores, jobs)):  # images in parallel, in order
            yield Prediction(index=i, labels=plain, stream="nocrf")
            yield Prediction(index=i, labels=refined, stream="final")

    if mode == "linear-probe":
        return TaskResult(predictions=with_class_id_scores(predictions(), ctx, stats), stats=stats)
    return TaskResult(predictions=predictions(), stats=stats)


def _projected_views(augmented: Callable, project: Callable) -> Callable:
    return lambda idx, rng: [project(f) for f in augmented(idx, rng)]


def _image_augmenter(ctx, fit, split, chunk: int = 8) -> Callable:
    """Student features from backbone passes on photometrically augmented images (the paper's setting)."""
    backbone = ctx.backbone

    def augmented_features(idx, rng):
        images = [photometric_augment(ctx.image(i, split), rng) for i in idx]
        feats: list = [None] * len(idx)
        by_shape: dict = {}  # images of a split may differ in size: one forward pass per shape and chunk
        for j, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(j)
        for members in by_shape.values():
            for start in range(0, len(members), chunk):
                part = members[start:start + chunk]
                x = backbone.normalize(np.stack([images[j] for j in part]))
                with torch.inference_mode(), ctx.protocol.autocast(x.device):  # as the cached features were made
                    out = backbone.extract(x, {"patch"})
                for j, f in zip(part, out["patch"].float().cpu().numpy()):
                    feats[j] = f
        for f, i in zip(feats, idx):
            if f.shape[:2] != tuple(fit.grid(i)):
                raise ValueError(f"augmented features {f.shape[:2]} do not match the cached grid {fit.grid(i)}")
        return feats

    return augmented_features


def benchmark(images: int = 6, k: int = 27, batch: int = 32, steps: int = 3, augmented: int = 4,
              threads: int | None = 1, workers: int | None = None, seed: int = 0) -> dict:
    """Pseudo-label generation per image (with and without CRF) and EM step time on CPU, on ViT-S/8-sized
    feature maps (40 x 40 x 384: dino-vits8 at 320 pixels, random weights, real CamVid images).

    EM step = teacher pseudo labels + student focal-loss step on a batch, at image resolution (the paper's
    setting) and on the patch grid (speed substitute); the student's photometric augmentation adds one
    backbone pass per image, measured separately (``augmented_view_s_per_image``). ``threads``: torch
    intra-op threads while measuring (1 by default: on a shared, loaded machine more threads mostly spin;
    None keeps torch's setting). The pseudo labels with CRF are also made as a run makes them (``stream_*``: the
    maps four times over, in this process and streamed through ``workers`` processes, ``CRFPool``; default: one
    per core; started inside the timing, and started and past their first job) and compared."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _measure(images, k, batch, steps, augmented, workers or os.cpu_count() or 1, seed)
    finally:
        torch.set_num_threads(before)


def _measure(images: int, k: int, batch: int, steps: int, augmented: int, workers: int, seed: int) -> dict:
    import time

    from .. import registry
    from ..crf import CRFPool
    from ..features import benchmark_inputs
    from ..models import build_backbone, resolve

    imgs, feats, source = benchmark_inputs("dino-vits8", images)
    maps = [f["patch"] for f in feats]
    p = {"psi": 0.4, "coverage": 0.95, "nn_anchor": True, "iterative": True, "max_masks": None, "mask_gain": 10.0,
         "anchor": "signed", "principal": "exact"}
    out: dict = {"features": source, "feature_map": list(maps[0].shape), "image": list(imgs[0].shape[:2]),
                 "images": len(maps), "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    soft = [proposal_soft_masks(f) for f in maps]
    out["proposal_masks_s_per_image"] = (time.perf_counter() - t0) / len(maps)
    proposals = []
    for crf in (False, True):
        t0 = time.perf_counter()
        proposals = [image_proposals(f, im.shape[:2], im, {**p, "proposal_crf": crf}) for f, im in zip(maps, imgs)]
        out[f"pseudo_label_s_per_image_{'crf' if crf else 'nocrf'}"] = (time.perf_counter() - t0) / len(maps)
    # the stage as a run streams it (the maps 4 times over: a worker's start-up is paid once per stream)
    jobs = [(f, im.shape[:2], im, {**p, "proposal_crf": True}, 0) for f, im in zip(maps, imgs)] * 4
    t0 = time.perf_counter()
    serial = [image_proposals(*job) for job in jobs]
    serial_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pooled = list(CRFPool(workers).map(_worker_image_proposals, jobs))
    pooled_s = time.perf_counter() - t0
    with CRFPool(workers) as pool:  # started, and each worker past its first job, before the clock
        list(pool.map(_worker_image_proposals, jobs[:workers]))
        t0 = time.perf_counter()
        warm = list(pool.map(_worker_image_proposals, jobs))
        warm_s = time.perf_counter() - t0
    out.update(stream_images=len(jobs), stream_s_per_image_in_process=serial_s / len(jobs),
               stream_s_per_image_workers=pooled_s / len(jobs), stream_workers=workers,
               stream_speedup=serial_s / pooled_s, stream_speedup_started_workers=serial_s / warm_s,
               stream_identical=all(np.array_equal(a, b) and np.array_equal(a, c)
                                    for a, b, c in zip(serial, pooled, warm))
               and all(np.array_equal(a, b) for a, b in zip(serial, proposals * 4)))
    out["proposals_per_image"] = float(np.mean([len(s) for s in soft]))
    out["proposal_pixel_fraction"] = float(np.mean([(q >= 0).mean() for q in proposals]))

    gen = torch.Generator().manual_seed(seed)
    idx = [int(i) for i in torch.randint(len(maps), (batch,), generator=gen)]
    out.update(em_batch=batch, k=k)
    for resolution in ("image", "patch"):
        theta_t = PrototypeHead(pca_prototypes(maps, k, seed=seed), cosine=False).requires_grad_(False)
        theta_s = copy.deepcopy(theta_t).requires_grad_(True)
        optimizer = torch.optim.Adam(theta_s.parameters(), lr=5e-3)
        props = [q if resolution == "image" else resize_label_map(q, f.shape[:2]) for q, f in zip(proposals, maps)]
        batch_feats, batch_props = [maps[i] for i in idx], [props[i] for i in idx]
        em_step(theta_s, theta_t, optimizer, batch_feats, batch_props)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            em_step(theta_s, theta_t, optimizer, batch_feats, batch_props)
        out[f"em_step_s_{resolution}_resolution"] = (time.perf_counter() - t0) / steps

    spec = registry.backbone("dino-vits8")
    model = build_backbone(spec, resolve(spec, "random"), seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i in range(augmented):
        view = photometric_augment(imgs[i % len(imgs)], rng)
        with torch.inference_mode():
            model.extract(model.normalize(view[None]), {"patch"})
    out["augmented_view_s_per_image"] = (time.perf_counter() - t0) / augmented
    out["em_step_s_paper_setting"] = out["em_step_s_image_resolution"] + batch * out["augmented_view_s_per_image"]
    return out
