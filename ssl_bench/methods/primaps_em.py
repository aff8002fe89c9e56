"""PriMaPs-EM's estimator on patch features: class prototypes fitted by moving-average stochastic EM on the
principal mask proposals, and the paper's comparison rows on the same features (arrays in, labels out; the
task adapter and the proposal stage are in ``primaps.py`` and ``primaps_proposals.py``).

Hahn et al., TMLR 2024, Sec. 3.2 (reference code: github.com/visinf/primaps): prototypes initialised by PCA,
pre-trained with the cosine batch k-means loss (Eq. 9), then EM: the EMA teacher labels each proposal with its
majority class (E), the student is fitted to those pseudo labels with a confidence-weighted focal loss (M).
``PrototypeBaseline`` (Eq. 9 only), ``LinearProbe`` (supervised upper bound) and ``oracle_pseudo_labels``
(each proposal takes its best ground-truth class, Table 5) are the paper's other rows. The choices that differ
from the reference code are listed in ``primaps.py``'s docstring.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .primaps_proposals import _t

# ----------------------------------------------------------------------------------------------------------
# 1. Label maps at another resolution
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
        self.g = nn.Parameter(torch.ones(len(v), device=v.device), requires_grad=not cosine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.v, dim=1)
        if self.cosine:
            return F.normalize(x, dim=1) @ w.T
        return (x @ w.T) * self.g

    def prototypes(self) -> np.ndarray:
        return F.normalize(self.v.detach(), dim=1).cpu().numpy().copy()


def _on(head: nn.Module, array, dtype=torch.float32) -> torch.Tensor:
    """An array as a tensor on ``head``'s device (training runs on the run's device; arrays stay on the CPU).
    To another device it travels in its own dtype (cached float16: half the bytes) and is converted there."""
    device = next(head.parameters()).device
    if device.type == "cpu" or isinstance(array, torch.Tensor):
        return _t(array, dtype).to(device)
    return torch.tensor(np.asarray(array)).to(device).to(dtype)


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


def photometric_augment(image: np.ndarray | torch.Tensor, rng: np.random.Generator) -> np.ndarray | torch.Tensor:
    """The reference student augmentation on a uint8 image (H, W, 3): Gaussian blur (sigma U[0.1, 2],
    kernel 21) always, then with prob. 0.5 colour jitter (p=0.3, strength 0.1) else greyscale (p=0.1).
    An array gives an array; a tensor is augmented where it lies (a training run's device) and gives a tensor
    there. The draws come from ``rng`` either way, so a seed gives the same augmentation on every device."""
    import torchvision.transforms.functional as TF

    x = (image.float() if isinstance(image, torch.Tensor) else _t(image)).permute(2, 0, 1) / 255.0
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
    out = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
    return out if isinstance(image, torch.Tensor) else out.numpy()


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


def planned_steps(epochs: int, n: int, batch_size: int, max_steps: int | None = None) -> int:
    """The batches ``_epoch_batches`` yields: ``epochs`` passes over ``n`` items, capped at ``max_steps``."""
    per_epoch = len(_batches(n, batch_size, torch.Generator()))  # the count only (a throw-away generator)
    return epochs * per_epoch if max_steps is None else min(epochs * per_epoch, max_steps)


def _epoch_batches(progress: Callable | None, epochs: int, n: int, batch_size: int, gen: torch.Generator,
                   desc: str, max_steps: int | None = None):
    """(epoch, batch indices) of every epoch in turn, under one bar over the whole training, so its time left
    is the stage's, not one epoch's. Each epoch's batches are drawn from ``gen`` as that epoch starts, exactly
    as a loop per epoch draws them; ``max_steps`` stops after that many batches."""
    total = planned_steps(epochs, n, batch_size, max_steps)

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
        self.theta_s = PrototypeHead(init.v.detach().clone(), cosine=False).to(self.device)
        # Without EMA the pseudo labels come from the current student itself.
        self.theta_t = copy.deepcopy(self.theta_s).requires_grad_(False) if self.ema else self.theta_s
        opt = torch.optim.Adam(self.theta_s.parameters(), lr=self.lr)
        self.history: dict[str, list[float]] = {"loss": [], "pseudo_fraction": []}
        steps = planned_steps(self.epochs, len(features), self.batch_size, self.max_steps)
        if self.ema and steps < self.ema_every:  # the teacher predicts: unchanged, EM changes nothing
            capped = self.max_steps is not None and steps == self.max_steps
            warnings.warn(f"PriMaPs-EM will run {steps} EM step(s), fewer than ema_every={self.ema_every}: the "
                          f"teacher, which predicts, is never updated, so the result is its initial prototypes -- "
                          + ("raise -p max_steps" if capped else "raise -p epochs, use more images")
                          + ", or lower -p ema_every", stacklevel=2)
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
        self.steps, self.teacher_updates = step, updates
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
