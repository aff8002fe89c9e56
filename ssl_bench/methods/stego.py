"""STEGO: a segmentation head distilled from the backbone's feature correspondences.

Hamilton, Zhang, Hariharan, Snavely, Freeman. Unsupervised Semantic Segmentation by Distilling Feature
Correspondences. ICLR 2022 (code github.com/mhamilton723/STEGO; this is an independent implementation, and
the code and its configurations are the specification followed here, the paper not being in ../shared).

For two views x, y the feature correspondence F[h,w,i,j] = cos(f_x[h,w], f_y[i,j]) (frozen backbone) teaches
the code correspondence S[h,w,i,j] = cos(z_x[h,w], z_y[i,j]) of the head (``heads.SegmentationHead``):

    L(x, y, b) = - mean_hwij (F_hwij - b) max(S_hwij, 0)

so pairs whose features agree more than the shift b are pulled together and the others pushed apart. With
``pointwise``, F is first centred per point of x (its mean over y's points removed, the overall mean kept).
The loss sums three pairings of each view x: itself (b_self), a positive y among its 7 nearest neighbours by
global feature (b_knn) and ``neg_samples`` random other views of the batch (b_rand), weighted lambda_self,
lambda_knn, lambda_rand; each view contributes ``feature_samples`` ^2 points drawn uniformly (bilinear
sampling, as the code's grid_sample). Training views are the five crops of the fit split's images at 224
pixels (the code's ``crop_type: five``, ``res: 224``); neighbours come from the mean patch feature of each
view in the cache (the code's precompute_knns). Then the probes of ``heads`` (cluster: K centres trained with
minibatch cosine k-means; linear: the supervised bound), and the CRF at evaluation.

Parameters follow the code's ``train_config.yml`` (task ``stego``) and the configurations stored in the three
released checkpoints, as read by Koenig et al. 2023 (github.com/merantix-momentum/stego-studies): variants
``stego-cocostuff`` and ``stego-cityscapes`` (published with DINO ViT-B/8), ``stego-potsdam`` (ViT-S/8).

Not as the code does, on purpose (besides ``heads``' list): the training views are read from the feature cache
(one pass over the views; the code's data loader recomputes features every step, with the same frozen
backbone); the kNN global features are computed without the featurizer's channel dropout (the code leaves it
active there); the random draws (points, neighbours, negatives) come from the run's seed.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from .. import registry
from . import heads
from .heads import SegmentationHead, seeded


# ----------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------


def sample_points(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples (B, C, S, S) of maps t (B, C, h, w) at coords (B, S, S, 2) in [-1, 1] (x, y), the
    corners being the centres of the corner patches (the code's ``sample``: grid_sample, align_corners=True,
    border padding; its transpose of the two point axes is kept, so the same coords pick the same points)."""
    return F.grid_sample(t, coords.permute(0, 2, 1, 3), padding_mode="border", align_corners=True)


def feature_correspondence(f1: torch.Tensor, f2: torch.Tensor, pointwise: bool = True) -> torch.Tensor:
    """F (B, S, S, S, S): cosine of every point of f1 (B, C, S, S) with every point of f2; ``pointwise``: each
    point of f1 centred over f2's points, then shifted back to the overall mean. No gradient (frozen features)."""
    with torch.no_grad():
        fd = torch.einsum("nchw,ncij->nhwij", F.normalize(f1, dim=1, eps=1e-10), F.normalize(f2, dim=1, eps=1e-10))
        if pointwise:
            overall = fd.mean()
            fd = fd - fd.mean([3, 4], keepdim=True)
            fd = fd - fd.mean() + overall
    return fd


def correspondence_term(f1: torch.Tensor, f2: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, shift: float,
                        pointwise: bool = True, zero_clamp: bool = True, stabilize: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pairing: the loss map -(F - b) * clamp(S) (B, S, S, S, S) and the code correspondence S.
    ``zero_clamp``: S clamped below at 0 (the paper's max(S, 0)); ``stabilize``: also above at 0.8."""
    fd = feature_correspondence(f1, f2, pointwise)
    cd = torch.einsum("nchw,ncij->nhwij", F.normalize(c1, dim=1, eps=1e-10), F.normalize(c2, dim=1, eps=1e-10))
    clamped = cd.clamp(min=0.0 if zero_clamp else None, max=0.8 if stabilize else None)
    return -clamped * (fd - shift), cd


def derangement(n: int, gen: torch.Generator) -> torch.Tensor:
    """The code's ``super_perm``: a random permutation whose fixed points are moved on by one (mod n), so a
    view is paired with another view of the batch (with n = 1, with itself)."""
    perm = torch.randperm(n, generator=gen)
    perm[perm == torch.arange(n)] += 1
    return perm % n


def correspondence_loss(feats: torch.Tensor, feats_pos: torch.Tensor, code: torch.Tensor, code_pos: torch.Tensor,
                        p: dict, gen: torch.Generator, coords: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor, dict]:
    """STEGO's loss for a batch: self, kNN and random-negative terms at ``feature_samples`` ^2 random points.
    feats / code (B, C, h, w) of the views, feats_pos / code_pos of their neighbours. ``coords``: the two point
    sets (B, S, S, 2) in [-1, 1] (default: uniform draws from ``gen``). Returns the loss and its terms."""
    b, s = feats.shape[0], p["feature_samples"]
    if coords is None:
        coords = tuple((torch.rand((b, s, s, 2), generator=gen) * 2 - 1).to(feats.device) for _ in range(2))
    c1, c2 = coords
    f, z = sample_points(feats, c1), sample_points(code, c1)
    f_pos, z_pos = sample_points(feats_pos, c2), sample_points(code_pos, c2)
    opts = dict(pointwise=p["pointwise"], zero_clamp=p["zero_clamp"], stabilize=p["stabilize"])
    self_term = correspondence_term(f, f, z, z, p["self_shift"], **opts)[0].mean()
    knn_term = correspondence_term(f, f_pos, z, z_pos, p["knn_shift"], **opts)[0].mean()
    rand_terms = []
    for _ in range(p["neg_samples"]):
        perm = derangement(b, gen).to(feats.device)
        rand_terms.append(correspondence_term(f, sample_points(feats[perm], c2), z, sample_points(code[perm], c2),
                                              p["rand_shift"], **opts)[0])
    rand_term = torch.cat(rand_terms).mean() if rand_terms else torch.zeros((), device=feats.device)
    loss = p["self_weight"] * self_term + p["knn_weight"] * knn_term + p["rand_weight"] * rand_term
    return loss, {"self": float(self_term.detach()), "knn": float(knn_term.detach()),
                  "rand": float(rand_term.detach())}


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

# The small configuration a CPU run uses with schedule=auto (the run's stats say which ran): everything as the
# paper but the number of steps and the batch size, which come from cpu_steps and cpu_batch_size.
def schedule(p: dict, device) -> dict:
    return heads.resolve_schedule(p, device, paper={"steps": p["steps"], "batch_size": p["batch_size"]},
                                  cpu={"steps": p["cpu_steps"], "batch_size": p["cpu_batch_size"]})


def train_head(features, neighbours: np.ndarray, p: dict, steps: int, batch_size: int, seed: int, device,
               progress=None) -> tuple[SegmentationHead, dict]:
    """The head trained with ``correspondence_loss`` (Adam, lr ``p["lr"]``) on views ``features[i]`` (h, w, C),
    each paired with a neighbour drawn from ``neighbours[i]`` (its nearest ``p["neighbours"]``)."""
    gen = torch.Generator().manual_seed(seed)
    d = np.shape(features[0])[-1]
    history: dict[str, list[float]] = {"loss": [], "self": [], "knn": [], "rand": []}
    with seeded(seed, device):
        head = SegmentationHead(d, p["dim"], p["projection"] == "nonlinear").to(device)
        opt = torch.optim.Adam(head.parameters(), lr=p["lr"])
        batches = heads.shuffled_batches(len(features), batch_size, steps, gen)
        for idx in heads._wrap(progress, batches, steps, "STEGO head"):
            ranks = torch.randint(0, neighbours.shape[1], (len(idx),), generator=gen).numpy()
            pos = [int(neighbours[i, r]) for i, r in zip(idx, ranks)]
            feats, feats_pos = heads.as_batch(features, idx, device), heads.as_batch(features, pos, device)
            head.train()
            code, code_pos = head(feats), head(feats_pos)
            if p["dropout"]:  # the code distils from dropped-out features too
                feats, feats_pos = head.dropout(feats), head.dropout(feats_pos)
            loss, terms = correspondence_loss(feats, feats_pos, code, code_pos, p, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history["loss"].append(float(loss.detach()))
            for key, value in terms.items():
                history[key].append(value)
    return head.eval(), history


# ----------------------------------------------------------------------------------------------------------
# Task adapter
# ----------------------------------------------------------------------------------------------------------

HEAD_KEYS = ("train_crops", "crop_ratio", "train_resize", "dim", "projection", "dropout", "lr", "steps", "batch_size",
             "neighbours", "feature_samples", "neg_samples", "pointwise", "zero_clamp", "stabilize", "self_weight",
             "knn_weight", "rand_weight", "self_shift", "knn_shift", "rand_shift", "schedule", "cpu_steps",
             "cpu_batch_size", "probe_lr")


def check_params(p: dict) -> None:
    """One line per bad parameter, before any work (the registry checks types against the defaults)."""
    heads.check_head_params("stego", p, whole={"dim": 1, "steps": 1, "batch_size": 1, "neighbours": 1,
                                               "feature_samples": 1, "neg_samples": 0},
                            positive=("lr", "probe_lr"), choices={"projection": ("nonlinear", "linear")})


def trained_head(ctx, p: dict, owner=None) -> heads.TrainedHead:
    """The head of these parameters on this run's features, its linear probe and its cluster probe for K = ctx.k,
    trained once per (backbone, dataset, fit split, seed, device, parameters) and kept (``ctx.reuse``; owner: (the
    registered task whose head it is, its parameters) when another task asks, see ``trained_projection``)."""
    plan = schedule(p, ctx.device)
    split, view, identity = heads.head_setting(ctx, p, HEAD_KEYS, plan)

    def fit_head():
        feats = ctx.features("patch", split, **view)
        neighbours = heads.nearest_neighbours(heads.global_features(feats), p["neighbours"])
        head, history = train_head(feats, neighbours, p, plan["steps"], plan["batch_size"], ctx.seed, ctx.device,
                                   ctx.progress)
        labels = ctx.labels(split, **view)
        linear, linear_losses = heads.train_linear_probe(head, feats, labels, ctx.dataset.num_classes, plan["steps"],
                                                         plan["batch_size"], p["probe_lr"], ctx.seed, ctx.device,
                                                         ctx.progress)
        return {"head": heads.arrays_of(head), "linear": linear, "views": len(feats),
                "neighbours": int(neighbours.shape[1]), "history": history, "linear_losses": linear_losses}

    model, kept = heads.kept_head(ctx, "stego", identity, split, view, fit_head,
                                  lambda _: (plan["steps"], plan["batch_size"]), p["probe_lr"], owner)
    return replace(model, stats={"schedule": plan, "neighbours_per_view": kept["neighbours"], **model.stats})


def run(ctx):
    """Task adapter (parameters: tasks/stego.yaml)."""
    return heads.run_head_task(ctx, trained_head)


def trained_projection(ctx, spec: registry.TaskSpec, params: dict) -> heads.TrainedHead:
    """The head a run of ``spec`` (stego or a variant) with ``params`` trains, for another task to read."""
    return trained_head(ctx, params, owner=(spec, params))


def benchmark(images: int = 8, steps: int = 3, batch: int = 8, threads: int | None = 1) -> dict:
    """STEGO head training (the paper's loss and head, defaults of tasks/stego.yaml) per step and per CamVid
    epoch on CPU, and peak memory; see ``heads.benchmark_training``. ``batch``: the CPU configuration's."""
    p = dict(registry.task("stego").params)

    def train(views, n_steps, batch_size):
        neighbours = heads.nearest_neighbours(heads.global_features(views), p["neighbours"])
        train_head(views, neighbours, p, n_steps, batch_size, 0, "cpu")

    return heads.benchmark_training("stego", train, "dino-vits8", images, steps, batch, threads)
