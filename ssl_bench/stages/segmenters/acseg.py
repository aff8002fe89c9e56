"""ACSeg's Adaptive Concept Generator (the "Dynamic Clustering Network", shared paper 001, Sec. 3): a learned
image-level segmenter. ``k`` learnable prototypes are updated by the image's patch embeddings into concepts; each
pixel goes to its most similar concept, so an image has as many regions as concepts it uses (adaptive).

- ``ConceptGenerator``: the prototypes and ``stages`` update stages. A stage is the dynamic-update block
  (prototypes attend to the patch embeddings, Eqs. 1-2), an FFN, the self-update block (prototypes attend to
  each other, Eqs. 3-4), an FFN; each of the four is residual and followed by a LayerNorm (Sec. 3.1).
- ``assignment``: cosine similarity of patches and concepts (Eq. 5); ``segment`` upsamples it bilinearly to the
  image's (label) resolution and takes the argmax (Eq. 6 and Sec. 4.1.2).
- ``modularity_loss``: the affinity max(0, cos) of the patch embeddings (Eq. 8), the soft co-assignment
  delta(i, j) = max_c S+_ic S+_jc (Eq. 9), minus the modularity of Eq. 7 with that delta (Eq. 10).
- ``train_generator``: AdamW on the split's cached patch features (no backbone in the loop), seeded, on the
  run's device; ``AdaptiveConceptGenerator`` is the segmenter stage ``acseg`` (stages/segmenters/acseg.yaml)
  whose ``fit`` trains it and returns its weights as a dict of arrays (kept by the engine's reuse).

Where the paper is the spec, and where we chose (the authors' code is not public: github.com/lkhl/ACSeg was
announced but never released, see lkhl/tiny-transformers issue 4; a third-party re-implementation,
github.com/Sooo66/ACSeg, was read for comparison only):

- paper: 5 prototypes, 6 stages, AdamW lr 1e-4 weight decay 0.01, batch 32, 2500 iterations, last-layer patch
  tokens as pixel embeddings, no augmentation, bilinear upsampling of the soft assignment before the argmax.
- chose: one attention head (Eqs. 1 and 3 are single-head, scaled by sqrt(d)) and no biases in W_q, W_k, W_v,
  W_o (the equations have none); the FFN is Linear(d, 4d), ReLU, Linear(4d, d) (the paper follows the
  transformer of its ref. [39]; width not stated); post-norm LayerNorm after each residual block; prototypes
  drawn from N(0, 1) ("randomly initialised"); the patch embeddings enter the attention as cached (no extra
  normalisation). A "stage" is one dynamic plus one self update (the paper's "6 prototype updating stages";
  the re-implementation reads it the same way).
- chose: the loss of a batch is the mean of its images' losses (the paper gives the loss of one image); every
  pair (i, j) counts, i = j included, as Eq. 7 sums over all pairs of the fully connected graph; images of one
  batch with different patch grids are padded and the padding masked out of attention and loss.
- chose: the generator is seeded by the run's seed unless ``train_seed`` fixes it: the paper's Table 1 reports
  10 k-means runs of one trained generator, so its recipe sweeps the run's seed with ``train_seed: 0`` (each
  seed's run trains the same generator again, bit for bit on one device, as kept values are per seed).
- chose: batches walk through a seeded permutation of the split, epoch after epoch (the paper says nothing of
  sampling); ``epochs`` instead of ``iterations`` gives the semester project's schedule (paper 003: 400 epochs).
- chose: a region is every pixel of one concept (the paper's regions are the clusters, not their connected
  parts); region sizes in the segment statistics are in patches, as for the other segmenters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from ...ops import upsample_argmax
from ..regions import split_into_segments

RESOLUTIONS = ("label", "patch")  # where the soft assignment is turned into labels
PAPER = {"prototypes": 5, "stages": 6, "iterations": 2500, "epochs": None, "batch_size": 32, "lr": 1e-4,
         "weight_decay": 0.01}  # Sec. 4.1.2, what a run's stats compare its training with


# ---------------------------------------------------------------- the network


class _Update(nn.Module):
    """One residual attention block (dynamic update: queries are the prototypes, keys and values the patch
    embeddings; self update: all three are the prototypes), then LayerNorm; then the FFN, residual, LayerNorm."""

    def __init__(self, dim: int, heads: int, ffn_ratio: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)  # W_q, W_k, W_v; W_o
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_ratio * dim), nn.ReLU(), nn.Linear(ffn_ratio * dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, c: torch.Tensor, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        c = self.norm(c + prototype_attention(self.attention, c, x, padding))
        return self.ffn_norm(c + self.ffn(c))


def prototype_attention(attention: nn.MultiheadAttention, c: torch.Tensor, x: torch.Tensor,
                        padding: torch.Tensor | None = None) -> torch.Tensor:
    """``attention(c, x, x)`` of a bias-free nn.MultiheadAttention, computed with the projections moved onto the
    few prototypes: per head, (c W_q^T) (x W_k^T)^T = ((c W_q^T) W_k) x^T and A (x W_v^T) = (A x) W_v^T. The
    same numbers (up to rounding) for k prototypes and n patches at O(k n d) instead of O(n d^2): ~d / k times
    fewer operations on the patches (Eqs. 1-4 as written; tested against the module). ``c`` (B, k, d),
    ``x`` (B, n, d), ``padding`` (B, n) True where x is padding."""
    b, k, d = c.shape
    heads = attention.num_heads
    head_dim = d // heads
    _, w_k, w_v = attention.in_proj_weight.view(3, heads, head_dim, d).unbind(0)  # (heads, head_dim, d) each
    q = (c @ attention.in_proj_weight[:d].T).view(b, k, heads, head_dim).transpose(1, 2)  # (B, heads, k, hd)
    scores = (q @ w_k) @ x.transpose(1, 2)[:, None] / math.sqrt(head_dim)  # (B, heads, k, n)
    if padding is not None:
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    pooled = scores.softmax(-1) @ x[:, None]  # (B, heads, k, d): attention-weighted patch embeddings
    values = pooled @ w_v.transpose(1, 2)  # (B, heads, k, head_dim)
    return attention.out_proj(values.transpose(1, 2).reshape(b, k, d))


class ConceptGenerator(nn.Module):
    """Learnable prototypes (k, d) turned into an image's concepts by ``stages`` dynamic + self updates."""

    def __init__(self, dim: int, prototypes: int = 5, stages: int = 6, heads: int = 1, ffn_ratio: int = 4):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(prototypes, dim))
        self.dynamic = nn.ModuleList(_Update(dim, heads, ffn_ratio) for _ in range(stages))
        self.self_update = nn.ModuleList(_Update(dim, heads, ffn_ratio) for _ in range(stages))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Concepts (B, k, d) of patch embeddings ``x`` (B, n, d); ``valid`` (B, n) marks real patches."""
        padding = None if valid is None else ~valid
        c = self.prototypes.expand(x.shape[0], -1, -1)
        for dynamic, self_update in zip(self.dynamic, self.self_update):
            c = dynamic(c, x, padding)
            c = self_update(c, c)
        return c


def assignment(x: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Soft assignment S (B, n, k): cosine similarity of each patch embedding with each concept (Eq. 5)."""
    return F.normalize(x, dim=-1) @ F.normalize(concepts, dim=-1).transpose(-2, -1)


# ---------------------------------------------------------------- the modularity loss


def feature_affinity(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """A (B, n, n) = max(0, cos(x_i, x_j)) (Eq. 8); rows and columns of padding patches are 0."""
    unit = F.normalize(x, dim=-1)
    if valid is not None:
        unit = unit * valid[..., None]
    return (unit @ unit.transpose(-2, -1)).clamp_min(0)


def soft_co_assignment(s: torch.Tensor) -> torch.Tensor:
    """delta (B, n, n) = max_c max(0, S_ic) max(0, S_jc) (Eq. 9): 1 for two patches fully in one concept."""
    positive = s.clamp_min(0)
    return (positive[:, :, None, :] * positive[:, None, :, :]).amax(-1)


def modularity(affinity: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Newman-Girvan modularity (Eq. 7) of a weighted graph (B, n, n) for co-assignments ``delta`` (B, n, n):
    (1 / 2m) sum_ij (A_ij - k_i k_j / 2m) delta_ij, with k_i the degree and 2m the sum of all weights."""
    return (modularity_weights(affinity) * delta).sum((-2, -1))


def modularity_weights(affinity: torch.Tensor) -> torch.Tensor:
    """(A_ij - k_i k_j / 2m) / 2m (B, n, n): the modularity of Eq. 7 is the sum of these times delta_ij."""
    degree = affinity.sum(-1)
    two_m = degree.sum(-1).clamp_min(1e-12)[:, None, None]
    return (affinity - degree[:, :, None] * degree[:, None, :] / two_m) / two_m


class _WeightedCoAssignment(torch.autograd.Function):
    """sum_ij W_ij max_c P_ic P_jc (B,) for P (B, n, k) >= 0 and a constant symmetric W (B, n, n), without the
    (B, n, n, k) products autograd would keep: the forward keeps the running maximum and the winning concept
    (uint8) of each pair, the backward gives P_ic the gradient 2 sum_j W_ij [c wins (i, j)] P_jc, one product per
    concept. The same value and gradient as ``soft_co_assignment`` through autograd (tested), except that a
    tie between concepts (equal products, in practice two zeros) sends the gradient to the first, not split."""

    @staticmethod
    def forward(ctx, positive: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros_like(weights)
        winner = torch.zeros(weights.shape, dtype=torch.uint8, device=weights.device)
        for c in range(positive.shape[-1]):
            product = positive[:, :, c, None] * positive[:, None, :, c]
            better = product > delta
            delta = torch.where(better, product, delta)
            winner.masked_fill_(better, c)
        ctx.save_for_backward(positive, weights, winner)
        return (weights * delta).sum((-2, -1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        positive, weights, winner = ctx.saved_tensors
        scaled = weights * (2 * grad)[:, None, None]
        out = torch.empty_like(positive)
        for c in range(positive.shape[-1]):
            out[:, :, c] = ((scaled * (winner == c)) @ positive[:, :, c, None])[..., 0]
        return out, None


def modularity_loss(x: torch.Tensor, concepts: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 10 averaged over a batch: minus the modularity of the affinity graph of ``x`` (B, n, d) under the
    soft co-assignment to ``concepts`` (B, k, d); ``modularity(feature_affinity, soft_co_assignment)`` computed
    in (B, n, n) memory (the features are fixed: only delta carries a gradient)."""
    with torch.no_grad():
        weights = modularity_weights(feature_affinity(x, valid))
    positive = assignment(x, concepts).clamp_min(0)
    return -_WeightedCoAssignment.apply(positive, weights).mean()


# ---------------------------------------------------------------- training


def _padded(grids: Sequence[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch grids (h, w, d) of one batch as (B, n_max, d) float32 on ``device`` and the (B, n_max) real-patch mask."""
    flat = [torch.as_tensor(np.asarray(g, dtype=np.float32).reshape(-1, g.shape[-1])) for g in grids]
    n = max(len(f) for f in flat)
    x = torch.zeros(len(flat), n, flat[0].shape[1])
    valid = torch.zeros(len(flat), n, dtype=torch.bool)
    for i, f in enumerate(flat):
        x[i, :len(f)], valid[i, :len(f)] = f, True
    return x.to(device), valid.to(device)


def train_generator(grids: Sequence[np.ndarray], prototypes: int = 5, stages: int = 6, heads: int = 1,
                    ffn_ratio: int = 4, iterations: int = 2500, batch_size: int = 32, lr: float = 1e-4,
                    weight_decay: float = 0.01, seed: int = 0, device="cpu",
                    progress=lambda it, **_: it) -> tuple[ConceptGenerator, dict]:
    """A concept generator trained by the modularity loss on the patch grids of a split (each (h, w, d)).
    Returns the model (eval mode) and its training record (losses, time, device)."""
    dim = grids[0].shape[-1]
    if dim % heads:
        raise UserError(f"heads={heads} must divide the feature dimension {dim} -- e.g. -p segmenter.heads=1")
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, the caller's generator untouched
        torch.manual_seed(seed)
        model = ConceptGenerator(dim, prototypes, stages, heads, ffn_ratio)
    model = model.to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    order, at = rng.permutation(len(grids)), 0
    losses = []
    t0 = time.perf_counter()
    for _ in progress(range(iterations), desc="acseg concept generator", total=iterations, unit="steps"):
        if at + min(batch_size, len(grids)) > len(order):  # next epoch: a new permutation
            order, at = rng.permutation(len(grids)), 0
        batch = order[at:at + batch_size]
        at += len(batch)
        x, valid = _padded([grids[i] for i in batch], device)
        loss = modularity_loss(x, model(x, valid), valid)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 10):]
    record = {"iterations": iterations, "batch_size": int(min(batch_size, len(grids))), "images": len(grids),
              "device": str(device), "seconds": seconds, "first_loss": losses[0], "final_loss": float(np.mean(tail))}
    return model.eval(), record


# ---------------------------------------------------------------- the segmenter stage


class AdaptiveConceptGenerator:
    """The segmenter stage ``acseg``: ``fit`` trains the concept generator on a split's cached features, ``load``
    takes trained weights back, ``segment`` gives one image's regions (one per concept it uses)."""

    marks_background = False

    def __init__(self, feature: str = "patch", prototypes: int = 5, stages: int = 6, heads: int = 1,
                 ffn_ratio: int = 4, iterations: int = 2500, epochs: int | None = None, batch_size: int = 32,
                 lr: float = 1e-4, weight_decay: float = 0.01, resolution: str = "label",
                 train_seed: int | None = None, seed: int = 0, device="cpu", progress=lambda it, **_: it):
        self.feature, self.prototypes, self.stages, self.heads, self.ffn_ratio = (feature, prototypes, stages,
                                                                                  heads, ffn_ratio)
        self.iterations, self.epochs, self.batch_size, self.lr, self.weight_decay = (iterations, epochs, batch_size,
                                                                                     lr, weight_decay)
        # the run's seed, unless ``train_seed`` fixes the training (Table 1: one generator, k-means reseeded)
        self.seed = seed if train_seed is None else train_seed
        self.resolution, self.device, self.progress = resolution, torch.device(device), progress
        self.model: ConceptGenerator | None = None

    @classmethod
    def from_context(cls, ctx, **params):
        return cls(**params, seed=ctx.seed, device=ctx.device, progress=ctx.progress)

    @property
    def uses_image(self) -> bool:  # only for its size: the soft assignment is upsampled to it
        return self.resolution == "label"

    def fit(self, features: dict) -> dict:
        """Train on the split's grids; returns {"state": the weights as arrays, "stats": the training record}."""
        grids = features[self.feature]
        iterations = self.iterations
        if self.epochs is not None:
            iterations = self.epochs * math.ceil(len(grids) / min(self.batch_size, len(grids)))
        self.model, record = train_generator(
            grids, self.prototypes, self.stages, self.heads, self.ffn_ratio, iterations, self.batch_size, self.lr,
            self.weight_decay, self.seed, self.device, self.progress)
        record["seed"] = self.seed
        mine = {"prototypes": self.prototypes, "stages": self.stages, "iterations": self.iterations,
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "weight_decay": self.weight_decay}
        record["configuration"] = "paper" if mine == PAPER else "not the paper's: " + ", ".join(
            f"{key}={mine[key]} (paper {PAPER[key]})" for key in PAPER if mine[key] != PAPER[key])
        return {"state": {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}, "stats": record}

    def load(self, fitted: dict) -> None:
        """The generator with the weights ``fit`` returned (e.g. read back from the engine's reuse cache)."""
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in fitted["state"].items()}
        prototypes, dim = state["prototypes"].shape
        model = ConceptGenerator(dim, prototypes, self.stages, self.heads, self.ffn_ratio)
        model.load_state_dict(state)
        self.model = model.to(self.device).eval()

    def scores(self, grid: np.ndarray) -> np.ndarray:
        """The soft assignment of one image's patches (h, w, d) to its concepts, as (k, h, w)."""
        if self.model is None:
            raise RuntimeError("the concept generator is not trained: call fit (or load) first")
        h, w, d = grid.shape
        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(grid, dtype=np.float32).reshape(1, h * w, d), device=self.device)
            s = assignment(x, self.model(x))[0]
        return s.T.reshape(-1, h, w).float().cpu().numpy()

    def segment(self, features: dict, image: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        scores = self.scores(features[self.feature])
        h, w = scores.shape[1:]
        groups = upsample_argmax(scores, image.shape[:2]) if self.uses_image else scores.argmax(0)
        segment_map, info = split_into_segments(groups, tau=0, connected=False)
        patch_area = (h * w) / groups.size  # sizes in patches, comparable with the other segmenters
        info["valid_sizes"] = [s * patch_area for s in info["valid_sizes"]]
        info["concepts"] = info.pop("n_groups")
        return segment_map, info


def check_params(p: dict) -> None:
    examples = {"prototypes": 5, "stages": 6, "heads": 1, "ffn_ratio": 4, "iterations": 2500, "batch_size": 32}
    for key, example in examples.items():
        if p[key] < 1:
            raise UserError(f"{key}={p[key]} must be 1 or more -- e.g. -p segmenter.{key}={example}")
    if p["epochs"] is not None and (not isinstance(p["epochs"], int) or isinstance(p["epochs"], bool)
                                    or p["epochs"] < 1):
        raise UserError(f"epochs={p['epochs']!r} -- use null (train for `iterations`) or a whole number >= 1 "
                        f"(-p segmenter.epochs=400)")
    if not p["lr"] > 0 or p["weight_decay"] < 0:
        raise UserError(f"lr={p['lr']}, weight_decay={p['weight_decay']} -- lr must be above 0 and weight decay "
                        f"0 or more (-p segmenter.lr=1e-4)")
    if p["train_seed"] is not None and (not isinstance(p["train_seed"], int) or isinstance(p["train_seed"], bool)):
        raise UserError(f"train_seed={p['train_seed']!r} -- use null (the run's seed) or a whole number "
                        f"(-p segmenter.train_seed=0)")
    if p["resolution"] not in RESOLUTIONS:
        raise UserError(f"resolution={p['resolution']!r} -- use label (the paper: the soft assignment upsampled "
                        f"bilinearly before the argmax) or patch (-p segmenter.resolution=label)")
