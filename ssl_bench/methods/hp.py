"""HP: Hidden Positives for unsupervised semantic segmentation.

Seong, Lee, Kim, Kim, Choi, Lee. Leveraging Hidden Positives for Unsupervised Semantic Segmentation. CVPR 2023
(code github.com/hynnsk/HP; this is an independent implementation, and the code and its option files are the
specification followed here, the paper not being in ../shared).

HP trains STEGO's segmentation head (``heads.SegmentationHead``) with a supervised-contrastive loss whose
positives are *hidden positives* found among all patches of the batch:

- **task-agnostic** (``hidden_positives`` on the frozen backbone features): patch j is a positive of anchor i
  when their cosine exceeds i's *reference point* -- i's largest cosine to a memory bank of random patches of
  other training views -- or j's (the relation is made symmetric);
- **task-specific**, the same on the codes of an EMA copy of the head against a bank of EMA codes that is renewed
  every ``renew_interval`` steps; their weight ``lmbd`` grows linearly from 0 (after ``warmup`` steps) to 1.

The contrastive term (``contrastive_loss``) takes each anchor's positives (task-agnostic + lmbd * task-specific)
against a denominator of its task-agnostic positives and a random ``rho`` share of the other patches, on the
normalised output of a linear projection of the code, at temperature ``tau`` (scaled by tau / 0.07 as the
code's SupConLoss), anchors weighted by their share of positives. **Gradient propagation to local hidden
positives** adds the same term on each patch's *local* code (``local_codes``): the mean of its 3x3 neighbours'
codes weighted by the backbone's attention between them (last block, heads averaged, each row clipped to its
10-90% quantiles, softmaxed, times sigma = 28, entries below the row mean dropped), so the gradient of an
anchor reaches its neighbours. A consistency term (weight ``alpha``) pulls the projected codes of a
photometrically augmented view (a backbone pass) towards the originals. Then the probes of ``heads``.

Parameters: task ``hp`` is the Cityscapes option file (json/server/cityscapes.json), variants ``hp-cocostuff``
and ``hp-potsdam`` the others (published with DINO ViT-S/8, and ViT-B/8 on Potsdam). Training views are the
five crops of the fit split at 224 pixels, as in those files.

Not as the code does, on purpose (besides ``heads``' list): the attention comes from the cached last-block keys
and queries of the patches, so the CLS token's share of each softmax row is missing (a per-row scale that the
later clip-softmax-threshold barely sees: the threshold is the row mean, the weights are ~ sigma / N either
way); the random denominator mask is drawn per anchor view (the code draws one and reuses it for every view of
the batch); the memory banks hold min(pool_size, views) patches (the code leaves the rest of the bank at zero);
the photometric augmentation jitters the image before normalisation (the code jitters the normalised tensor,
which torchvision then clamps to [0, 1]); float32 throughout (the code uses mixed precision).
``local_weights: uniform`` (not the paper's) gives every neighbour sigma / N, for backbones without attention.
"""

from __future__ import annotations

from dataclasses import replace

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..errors import UserError
from . import heads
from .heads import SegmentationHead, seeded

BASE_TEMPERATURE = 0.07  # SupConLoss's default base temperature: the loss is scaled by tau / 0.07


# ----------------------------------------------------------------------------------------------------------
# Hidden positives, local codes, the contrastive loss
# ----------------------------------------------------------------------------------------------------------


def reference_points(x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Each row's reference point: its largest cosine to the memory bank. x (N, d), bank (P, d), both unit rows."""
    return (x @ bank.T).max(1).values


def hidden_positives(x_rows: torch.Tensor, x_all: torch.Tensor, ref_rows: torch.Tensor, ref_all: torch.Tensor,
                     rows: torch.Tensor) -> torch.Tensor:
    """(R, N) bool: patch j is a hidden positive of anchor i (global index ``rows[i]``) when cos(x_i, x_j) exceeds
    the reference point of i or of j; never i itself. x_* unit rows, ref_* their reference points."""
    sim = x_rows @ x_all.T
    mask = (sim > ref_rows[:, None]) | (sim > ref_all[None, :])
    mask[torch.arange(len(rows), device=mask.device), rows] = False
    return mask


def neighbourhood(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the h*w positions, its 9 neighbours' flat indices (3x3, itself included; (N, 9)) and which of
    them lie inside the map (N, 9) bool (the code's index_mask / divide_num)."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dy, dx = torch.meshgrid(torch.arange(-1, 2), torch.arange(-1, 2), indexing="ij")
    ny, nx = ys.reshape(-1, 1) + dy.reshape(1, -1), xs.reshape(-1, 1) + dx.reshape(1, -1)
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    return (ny.clamp(0, h - 1) * w + nx.clamp(0, w - 1)), inside


def attention_weights(query: torch.Tensor, key: torch.Tensor, heads_count: int, sigma: float = 28.0,
                      grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Local weights (B, N, 9) of the 3x3 neighbours from last-block attention: query / key (B, N, heads * dh)
    of the patches; softmax(q k^T / sqrt(dh)) per head, averaged over heads, each row clipped to its 10% and 90%
    quantiles, softmaxed, times ``sigma``, entries below the row mean set to 0; then the 9 neighbours' entries,
    0 outside the map. ``grid`` (h, w): the patch grid (default: square)."""
    b, n, dim = query.shape
    h, w = grid or (int(round(n ** 0.5)),) * 2
    dh = dim // heads_count
    q = query.reshape(b, n, heads_count, dh).transpose(1, 2)
    k = key.reshape(b, n, heads_count, dh).transpose(1, 2)
    attn = ((q @ k.transpose(-2, -1)) * dh ** -0.5).softmax(-1).mean(1)  # (B, N, N)
    high, low = torch.quantile(attn, 0.9, dim=2, keepdim=True), torch.quantile(attn, 0.1, dim=2, keepdim=True)
    attn = torch.max(torch.min(attn, high), low).softmax(-1) * sigma
    attn = torch.where(attn < attn.mean(2, keepdim=True), torch.zeros((), device=attn.device), attn)
    index, inside = neighbourhood(h, w)
    local = torch.gather(attn, 2, index.to(attn.device)[None].expand(b, -1, -1))
    return local * inside.to(attn.device)


def uniform_weights(b: int, grid: tuple[int, int], sigma: float = 28.0) -> torch.Tensor:
    """``local_weights: uniform``: every neighbour inside the map weighs sigma / N (the mean attention weight)."""
    _, inside = neighbourhood(*grid)
    return (inside.float() * sigma / (grid[0] * grid[1]))[None].expand(b, -1, -1).contiguous()


def local_codes(code: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each position's local code (B, dim, h, w): sum over its 3x3 neighbours j inside the map of weight_ij *
    code_j (``weights`` (B, N, 9) in ``neighbourhood``'s order), divided by how many neighbours it has inside the
    map. Gradient flows to every neighbour's code. (The neighbours are unfolded with zero padding, whose backward
    is one fold, not the scatter of gathered copies.)"""
    b, dim, h, w = code.shape
    _, inside = neighbourhood(h, w)
    inside = inside.to(code.device)
    neighbours = F.unfold(code, 3, padding=1).reshape(b, dim, 9, h * w)  # (ky, kx) order = neighbourhood's
    summed = (neighbours * (weights * inside).transpose(1, 2)[:, None]).sum(2)
    return (summed / inside.sum(1)).reshape(b, dim, h, w)


def anchor_term(anchors: torch.Tensor, codes: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, tau: float,
                scale: float, gradient: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HP's term for A anchors (unit codes (A, c)) against all N patches (``codes`` (N, c)): the mean over anchors of
    - scale * share_i / count_i * sum_j weight_ij log p_ij, with p_ij = exp(l_ij) / sum_k keep_ik exp(l_ik),
    l = anchors codes^T / tau, count_i = sum_j weight_ij and share_i = count_i / mean count (the code's reweighting).
    ``gradient``: also d term / d l (A, N), written out: scale * share_i / (count_i A) (count_i p_ij keep_ij -
    weight_ij), so a caller can back-propagate it with two products instead of autograd's graph of (A, N) tensors."""
    count = weight.sum(1)
    coef = scale * count.mean().reciprocal()  # scale * share_i / count_i: share_i / count_i = 1 / mean count
    logits = anchors @ codes.T / tau
    logits = logits - logits.max(1, keepdim=True).values.detach()  # shift-free: p and the term do not change
    kept = torch.exp(logits) * keep
    total = kept.sum(1)
    term = (coef * (count * torch.log(total) - (weight * logits).sum(1))).mean()
    if not gradient:
        return term, None
    with torch.no_grad():
        grad = kept.mul_((count / total)[:, None]).sub_(weight).mul_(coef / len(anchors))
    return term, grad


def contrastive_loss(z: torch.Tensor, z_local: torch.Tensor | None, feats: torch.Tensor, codes_ema: torch.Tensor,
                     ref_feats: torch.Tensor, ref_ema: torch.Tensor, lmbd: float, tau: float, rho: float,
                     per_view: int, gen: torch.Generator, backward: bool = False) -> torch.Tensor:
    """HP's loss over a batch of N = views * per_view patches. z, z_local: unit projected codes (N, c); feats:
    unit backbone features (N, d) and codes_ema unit EMA codes (N, c'), with their reference points. Anchors
    are taken one view at a time (the code's mini-iterations); anchors without a task-agnostic positive are
    skipped. Each anchor's positives weigh 1 (task-agnostic) + lmbd (task-specific); its denominator keeps its
    task-agnostic positives and a random ``rho`` share of the other patches (``anchor_term``). Returns (sum over
    views and over the plain and local terms) / views / 2. ``backward``: the gradient of that loss is also
    propagated to z and z_local (each view's d loss / d logits written out by ``anchor_term`` and turned into
    gradients of the codes at once, then one backward through their graph, which is kept for the caller), and
    the detached loss is returned: the gradient of one backward of the sum, without a graph of every view's
    (per_view, N) matrices nor a backward through the head per view."""
    n = len(z)
    views = n // per_view
    scale = tau / BASE_TEMPERATURE
    norm = max(views, 1) * 2
    codes = [z] if z_local is None else [z, z_local]
    inputs = [c.detach() for c in codes] if backward else codes
    grads = [torch.zeros_like(c) for c in inputs]
    total = z.new_zeros(())
    for v in range(views):
        rows = torch.arange(v * per_view, (v + 1) * per_view, device=z.device)
        with torch.no_grad():
            pos = hidden_positives(feats[rows], feats, ref_feats[rows], ref_feats, rows)
            pos_ema = hidden_positives(codes_ema[rows], codes_ema, ref_ema[rows], ref_ema, rows)
            keep = pos | (torch.rand(pos.shape, generator=gen, device=z.device) < rho)
            keep[torch.arange(per_view, device=z.device), rows] = False
            anchors = pos.any(1)
            if not anchors.any():
                continue
            anchor_rows = rows[anchors]
            weight = pos[anchors].to(z.dtype) + lmbd * pos_ema[anchors].to(z.dtype)
            keep = keep[anchors].to(z.dtype)
        for codes_v, grad in zip(inputs, grads):
            term, grad_logits = anchor_term(codes_v[anchor_rows], codes_v, weight, keep, tau, scale, backward)
            if backward:  # l = a c^T / tau: d/da = G c / tau, d/dc = G^T a / tau
                with torch.no_grad():
                    grad.index_add_(0, anchor_rows, grad_logits @ codes_v, alpha=1 / (tau * norm))
                    grad.addmm_(grad_logits.T, codes_v[anchor_rows], alpha=1 / (tau * norm))
                term = term.detach()
            total = total + term
    if backward:
        torch.autograd.backward(codes, grads, retain_graph=True)
    return total / norm


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def schedule(p: dict, device) -> dict:
    """Paper: ``epochs`` over the views in batches of ``batch_size`` (last partial batch dropped, as the code's
    loader); cpu: ``cpu_steps`` batches of ``cpu_batch_size``, warm-up scaled by the share of the paper's steps."""
    return heads.resolve_schedule(p, device, paper={"epochs": p["epochs"], "batch_size": p["batch_size"]},
                                  cpu={"steps": p["cpu_steps"], "batch_size": p["cpu_batch_size"]})


def _bank(features, ema: nn.Module | None, size: int, batch_size: int, gen: torch.Generator, device,
          dropout: bool) -> torch.Tensor:
    """A memory bank: one random patch of each of ``size`` views in shuffled order, of the backbone features
    (``ema`` None) or of the EMA head's codes, dropped out as the code's pass in training mode; unit rows."""
    order = torch.randperm(len(features), generator=gen).tolist()[:size]
    rows = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        with torch.no_grad():
            x = heads.as_batch(features, idx, device)
            x = x if ema is None else ema.train()(x)  # the EMA head drops channels of its input, as the code's
            x = F.dropout2d(x, 0.1, training=dropout).flatten(2)  # (B, c, N)
            pick = torch.randint(0, x.shape[2], (len(idx),), generator=gen).to(device)
            rows.append(x[torch.arange(len(idx), device=device), :, pick])
    return F.normalize(torch.cat(rows).float(), dim=1)


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    """(step, index in its epoch, views) for ``steps`` batches of epochs of shuffled views, the last partial
    batch of an epoch dropped (the code's training loader)."""
    per_epoch, step = n // batch_size, 0
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(per_epoch):
            if step == steps:
                return
            yield step, i, order[i * batch_size:(i + 1) * batch_size]
            step += 1


def train_head(features, local_weights, augmented, p: dict, plan: dict, seed: int, device, progress=None
               ) -> tuple[SegmentationHead, dict]:
    """The HP head trained on views ``features[i]`` (h, w, C). ``local_weights(idx)`` -> (B, N, 9) weights of the
    local hidden positives (None: no local term); ``augmented(idx)`` -> the (B, h, w, C) features of
    photometrically augmented views, a tensor or a list of arrays (None: no consistency term)."""
    gen = torch.Generator().manual_seed(seed)
    device_gen = torch.Generator(device=device).manual_seed(seed)  # the large random denominator masks
    n, d = len(features), np.shape(features[0])[-1]
    per_view = int(np.prod(np.shape(features[0])[:2]))
    batch_size = min(plan["batch_size"], n)
    paper_steps = p["epochs"] * (n // min(p["batch_size"], n))
    steps = paper_steps if plan["name"] == "paper" else plan["steps"]
    warmup = p["warmup"] * steps / max(paper_steps, 1)  # the paper's warm-up, as a share of its steps
    history: dict[str, list[float]] = {"loss": [], "contrastive": [], "consistency": [], "lmbd": []}
    with seeded(seed, device):
        head = SegmentationHead(d, p["dim"], True).to(device)
        ema = copy.deepcopy(head).requires_grad_(False)
        project = nn.Linear(p["dim"], p["dim"]).to(device)
        opt = torch.optim.AdamW(head.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
        opt_project = torch.optim.Adam(project.parameters(), lr=p["lr"])
        bank_feats = _bank(features, None, p["pool_size"], batch_size, gen, device, p["dropout"])
        bank_ema = _bank(features, ema, p["pool_size"], batch_size, gen, device, p["dropout"])
        for step, i, idx in heads._wrap(progress, _batches(n, batch_size, steps, gen), steps, "HP head"):
            if i % p["renew_interval"] == 0 and i != 0:
                bank_ema = _bank(features, ema, p["pool_size"], batch_size, gen, device, p["dropout"])
            lmbd = 0.0 if step <= warmup else (step - warmup) / max(steps - warmup, 1)
            out = _step(head, ema, project, (opt, opt_project), features, idx, local_weights, augmented,
                        (bank_feats, bank_ema), lmbd, p, device_gen, per_view)
            for key, value in {**out, "lmbd": lmbd}.items():
                history[key].append(value)
    return head.eval(), history


def _step(head, ema, project, optimizers, features, idx, local_weights, augmented, banks, lmbd, p, gen,
          per_view) -> dict:
    device = next(head.parameters()).device
    feats = heads.as_batch(features, idx, device)
    head.train()
    code = head(feats)
    with torch.no_grad():
        dropped = head.dropout(feats) if p["dropout"] else feats
        unit_feats = F.normalize(dropped.flatten(2).transpose(1, 2).reshape(-1, feats.shape[1]), dim=1)
        code_ema = ema.train()(feats)
        code_ema = head.dropout(code_ema) if p["dropout"] else code_ema
        unit_ema = F.normalize(code_ema.flatten(2).transpose(1, 2).reshape(-1, code.shape[1]), dim=1)
        # the code's EMA update runs inside its forward pass: the teacher follows the weights before this step
        for t, s in zip(ema.parameters(), head.parameters()):
            t.mul_(p["ema_momentum"]).add_(s.detach(), alpha=1 - p["ema_momentum"])

    def projected(c):
        return F.normalize(project(c.flatten(2).transpose(1, 2).reshape(-1, c.shape[1])), dim=1)

    z = projected(code)
    z_local = projected(local_codes(code, local_weights(idx).to(device))) if local_weights is not None else None
    for opt in optimizers:
        opt.zero_grad()
    # backward view by view inside (the loss is a sum over the batch's views): the gradient of the whole loss
    contrastive = float(contrastive_loss(z, z_local, unit_feats, unit_ema, reference_points(unit_feats, banks[0]),
                                         reference_points(unit_ema, banks[1]), lmbd, p["tau"], p["rho"], per_view,
                                         gen, backward=True))
    consistency = 0.0
    if augmented is not None and p["alpha"] > 0:
        z_aug = projected(head(heads.as_batch(augmented(idx), range(len(idx)), device)))
        term = F.pairwise_distance(z, z_aug).mean()
        (p["alpha"] * term).backward()
        consistency = float(term.detach())
    nn.utils.clip_grad_norm_(head.parameters(), p["grad_norm"])
    for opt in optimizers:
        opt.step()
    return {"loss": contrastive + p["alpha"] * consistency, "contrastive": contrastive, "consistency": consistency}


# ----------------------------------------------------------------------------------------------------------
# Task adapter
# ----------------------------------------------------------------------------------------------------------

HEAD_KEYS = ("train_crops", "crop_ratio", "train_resize", "dim", "dropout", "lr", "weight_decay", "grad_norm",
             "epochs", "batch_size", "tau", "alpha", "rho", "pool_size", "renew_interval", "ema_momentum", "warmup",
             "local_weights", "attention_sigma", "augment", "schedule", "cpu_steps", "cpu_batch_size", "linear_lr",
             "cluster_lr")
LOCAL_WEIGHTS = ("attention", "uniform", "none")
AUGMENTS = ("image", "none")


def check_params(p: dict) -> None:
    """One line per bad parameter, before any work (the registry checks types against the defaults)."""
    heads.check_head_params("hp", p, whole={"dim": 1, "epochs": 1, "batch_size": 1, "pool_size": 1, "renew_interval": 1,
                                            "warmup": 0},
                            positive=("lr", "tau", "linear_lr", "cluster_lr", "grad_norm", "attention_sigma"),
                            non_negative=("alpha", "weight_decay"), unit=("rho", "ema_momentum"),
                            choices={"local_weights": LOCAL_WEIGHTS, "augment": AUGMENTS})


def _local_weights(ctx, p: dict, split: str, view: dict, feats):
    """``idx -> (B, N, 9)`` local weights of the training views (attention: from the cached keys and queries,
    computed once for every view), or None without the local term."""
    if p["local_weights"] == "none":
        return None
    grid = tuple(np.shape(feats[0])[:2])
    if p["local_weights"] == "uniform":
        return lambda idx: uniform_weights(len(idx), grid, p["attention_sigma"])
    spec = registry.backbone(ctx.backbone_identity()["backbone"])
    if not spec.has_attention:
        raise UserError(f"hp: local_weights=attention needs a backbone with attention, and {spec.name} has none -- "
                        f"use a ViT, or -p local_weights=uniform (not the paper's setting)")
    stores = ctx.features_of(["query", "key"], split, **view)
    weights = np.empty((len(feats), grid[0] * grid[1], 9), dtype=np.float32)
    for start in ctx.progress(range(0, len(feats), 16), desc="HP attention weights", total=-(-len(feats) // 16)):
        idx = range(start, min(start + 16, len(feats)))
        q = torch.from_numpy(np.stack([np.asarray(stores["query"][i], dtype=np.float32) for i in idx]))
        k = torch.from_numpy(np.stack([np.asarray(stores["key"][i], dtype=np.float32) for i in idx]))
        b = len(idx)
        weights[start:start + b] = attention_weights(q.reshape(b, -1, q.shape[-1]).to(ctx.device),
                                                     k.reshape(b, -1, k.shape[-1]).to(ctx.device), spec.heads,
                                                     p["attention_sigma"], grid).cpu().numpy()
    # kept in CPU memory, like the training features: 28 KB per view at 28 x 28 (7 GB for COCO-Stuff's five-crop
    # views), where a step sends its batch's rows (~2 MB) to the device with its features
    return lambda idx: torch.from_numpy(weights[list(idx)])


def photometric_views(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """HP's photometric augmentation of uint8 images (H, W, 3), computed where they lie -> (B, H, W, 3) uint8:
    colour jitter (0.3, 0.3, 0.3, 0.1), greyscale with p 0.2, a 5 x 5 Gaussian blur with p 0.5, each image
    drawing its own parameters from torch's CPU generator."""
    import torchvision.transforms as T

    jitter = T.Compose([T.ColorJitter(brightness=.3, contrast=.3, saturation=.3, hue=.1), T.RandomGrayscale(.2),
                        T.RandomApply([T.GaussianBlur((5, 5))])])
    batch = torch.stack([jitter(im.permute(2, 0, 1).float() / 255) for im in images]).permute(0, 2, 3, 1) * 255
    return batch.round().byte()


def _augmented(ctx, p: dict, split: str, view: dict):
    """``idx -> (B, h, w, d)`` features of HP's photometric augmentation of the training views (a backbone pass
    each), on the run's device: the views are jittered there and their features stay there (torchvision draws
    each transform's parameters from torch's CPU generator)."""
    if p["augment"] == "none" or p["alpha"] == 0:
        return None
    backbone = ctx.backbone

    def features(idx):
        x = backbone.normalize(photometric_views([torch.tensor(ctx.image(i, split, **view), device=ctx.device)
                                                  for i in idx]))
        with torch.inference_mode(), ctx.protocol.autocast(x.device):  # as the cached features were made
            out = backbone.extract(x, {"patch"})["patch"]
        return out.float().clone()  # a clone outside inference mode: a trainable input

    return features


def trained_head(ctx, p: dict, owner=None) -> heads.TrainedHead:
    """The HP head of these parameters and its probes (cluster probe for K = ctx.k), trained once per (backbone,
    dataset, fit split, seed, device, parameters) and kept (``ctx.reuse``)."""
    plan = schedule(p, ctx.device)
    split, view, identity = heads.head_setting(ctx, p, HEAD_KEYS, plan)

    def fit_head():
        feats = ctx.features("patch", split, **view)
        with seeded(ctx.seed, ctx.device):  # the augmentation draws from torch's generator
            head, history = train_head(feats, _local_weights(ctx, p, split, view, feats),
                                       _augmented(ctx, p, split, view), p, plan, ctx.seed, ctx.device, ctx.progress)
        steps, batch = len(history["loss"]), min(plan["batch_size"], len(feats))
        linear, linear_losses = heads.train_linear_probe(head, feats, ctx.labels(split, **view),
                                                         ctx.dataset.num_classes, steps, batch, p["linear_lr"],
                                                         ctx.seed, ctx.device, ctx.progress)
        return {"head": heads.arrays_of(head), "linear": linear, "views": len(feats), "steps": steps,
                "batch_size": batch, "history": history, "linear_losses": linear_losses}

    model, kept = heads.kept_head(ctx, "hp", identity, split, view, fit_head,
                                  lambda kept: (kept["steps"], kept["batch_size"]), p["cluster_lr"], owner)
    schedule_ran = {**plan, "steps": kept["steps"], "batch_size": kept["batch_size"]}
    return replace(model, stats={"schedule": schedule_ran, **model.stats})


def run(ctx):
    """Task adapter (parameters: tasks/hp.yaml)."""
    return heads.run_head_task(ctx, trained_head)


def trained_projection(ctx, spec: registry.TaskSpec, params: dict) -> heads.TrainedHead:
    """The head a run of ``spec`` (hp or a variant) with ``params`` trains, for another task to read."""
    return trained_head(ctx, params, owner=(spec, params))


def benchmark(images: int = 8, steps: int = 2, batch: int = 8, threads: int | None = 1) -> dict:
    """HP head training (tasks/hp.yaml's defaults; local hidden positives with uniform weights, which cost as
    much as attention ones once computed; no augmented view, which adds a backbone pass per view) per step and
    per CamVid epoch on CPU, and peak memory; see ``heads.benchmark_training``."""
    p = {**registry.task("hp").params, "augment": "none"}

    def train(views, n_steps, batch_size):
        grid = tuple(views[0].shape[:2])
        plan = {"name": "cpu", "device": "cpu", "steps": n_steps, "batch_size": batch_size}
        train_head(views, lambda idx: uniform_weights(len(idx), grid, p["attention_sigma"]), None, p, plan, 0, "cpu")

    return heads.benchmark_training("hp", train, "dino-vits8", images, steps, batch, threads, drop_last=True)
