"""DatUS^2: data-driven unsupervised semantic segmentation (Kumar, Sur, Baruah; arXiv 2401.12820).

Pipeline, one function per step (all pure: arrays in, arrays out, explicit seeds):

1. ``discover_segments``: per image, a graph on the patch grid with an edge wherever two
   last-block keys have a positive dot product (paper Eq. 1), Louvain communities on it, every
   community split into 8-connected components on the grid; components with more than ``tau``
   patches are valid segments, the rest noise (-1).
2. ``segment_crop``: the tight box of one segment, other pixels filled, resized to the backbone input.
3. ``cluster_segments``: k-means on the L2-normalised crop embeddings (CLS of a ViT, pooled
   feature of a CNN); painting the cluster ids back gives the initial pseudo masks.
4. ``train_denoiser`` / ``predict_denoiser``: a DeepLabV3 trained from scratch on those masks
   (unlabelled pixels ignored) and run on every image: the de-noised masks.

``run(ctx)`` is the thin adapter for the runner (registered in tasks/datus2.yaml);
``benchmark()`` times segment discovery and the pipeline (``ssl-bench bench datus2``).

Reading of the authors' code (github.com/SonalKumar95/DatUS), followed here unless noted:
- adjacency is binary (``adj = A > 0``), not weighted by A; ``weighted=True`` is offered as an option.
  Their matrix also sets the diagonal (A_ii > 0); we leave self-loops out so every backend and the
  ``modularity`` helper share one convention (a loop only adds a constant to each degree).
- their Louvain is scikit-network's; we use python-louvain (the algorithm the design names) or
  igraph's C multilevel Louvain, which reaches the same modularity (tested) and is much faster.
- grouping uses 8-neighbourhood BFS on the grid, validity is ``len(segment) > 5``.
- crops: the patch-aligned box of the segment on the 224-px image, patches of other segments
  set to 0 (black); the ViT then sees Resize(256)+CenterCrop(224) of it (``fit="authors"``).
  We crop the evaluation-protocol image (shorter side 320) with the segment map upsampled to it,
  and default to stretching the box to the input size, so thin segments are not cut off.
- the CNN ablation (their ``resnet50_mocov2`` features) is ``crop_backbone=mocov2-resnet50``: any
  registered backbone's ``embed`` (pooled feature of a CNN, CLS of a ViT) can embed the crops.
- CLS features are L2-normalised; their full-rank PCA before MiniBatchKMeans is a rotation plus
  centring, which leaves Euclidean k-means unchanged, so it is omitted. They seed k-means at
  random; we use k-means++ seeding (then faiss Lloyd), which avoids merging separable classes.
- their evaluation drops pixels of noise segments (value 255) and uses a fixed cluster-to-class
  map; here noise stays -1 and the runner does the matching.
The de-noising network is described in the paper only; its training settings are ours.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from ssl_bench import ops
from ssl_bench.errors import UserError
from ssl_bench.registry import check_like_default, is_number, is_whole

BACKENDS = ("louvain", "igraph")
CROP_FITS = ("stretch", "authors")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# 1. segment discovery
# ----------------------------------------------------------------------------------------------


def key_adjacency(keys: np.ndarray, weighted: bool = False) -> np.ndarray:
    """Dense symmetric adjacency (n, n) of flattened keys (n, d): edge where k_i . k_j > 0.

    Binary like the authors' code unless ``weighted`` (then the edge weight is the dot product).
    The diagonal is zero (no self-loops, see module docstring).
    """
    k = np.asarray(keys, dtype=np.float64).reshape(-1, np.shape(keys)[-1])
    affinity = k @ k.T
    adjacency = np.where(affinity > 0, affinity if weighted else 1.0, 0.0)
    np.fill_diagonal(adjacency, 0.0)
    return adjacency


def modularity(adjacency: np.ndarray, communities: np.ndarray, resolution: float = 1.0) -> float:
    """Newman modularity of a partition of a symmetric loop-free weighted graph.

    Computed here, not by a backend, so partitions from different backends are scored alike.
    """
    adjacency = np.asarray(adjacency, dtype=np.float64)
    _, comm = np.unique(np.asarray(communities).ravel(), return_inverse=True)
    total = adjacency.sum()
    if total <= 0:
        return 0.0
    onehot = np.zeros((comm.size, comm.max() + 1))
    onehot[np.arange(comm.size), comm] = 1.0
    internal = np.einsum("ic,ij,jc->c", onehot, adjacency, onehot)
    degree = onehot.T @ adjacency.sum(1)
    return float((internal / total - resolution * (degree / total) ** 2).sum())


def detect_communities(
    adjacency: np.ndarray, seed: int = 0, backend: str = "louvain", resolution: float = 1.0
) -> np.ndarray:
    """Modularity communities of a dense adjacency: int64 (n,), ids 0..C-1."""
    n = adjacency.shape[0]
    binary = bool(np.all((adjacency == 0) | (adjacency == 1)))  # no weight attribute: faster
    if backend == "louvain":
        import community as community_louvain
        import networkx as nx

        graph = nx.Graph()
        graph.add_nodes_from(range(n))
        rows, cols = np.nonzero(np.triu(adjacency, 1))
        if binary:
            graph.add_edges_from(zip(rows.tolist(), cols.tolist()))
        else:
            graph.add_weighted_edges_from(zip(rows.tolist(), cols.tolist(), adjacency[rows, cols].tolist()))
        part = community_louvain.best_partition(graph, resolution=resolution, random_state=seed)
        labels = np.array([part[i] for i in range(n)], dtype=np.int64)
    elif backend == "igraph":
        import igraph as ig

        # building from the matrix is ~5x faster than from an edge list (C-side loop)
        if binary:
            graph, w = ig.Graph.Adjacency(adjacency.astype(np.int8), mode="upper", loops=False), None
        else:
            graph = ig.Graph.Weighted_Adjacency(adjacency, mode="upper", loops=False)
            w = "weight"
        # igraph's multilevel shuffles the vertex order with its global RNG: seed it, then restore
        ig.set_random_number_generator(random.Random(seed))
        try:
            labels = np.array(graph.community_multilevel(weights=w, resolution=resolution).membership)
        finally:
            ig.set_random_number_generator(random)
    else:
        raise ValueError(f"unknown community backend {backend!r}; expected one of {BACKENDS}")
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


def split_into_segments(communities: np.ndarray, tau: int = 5) -> tuple[np.ndarray, dict]:
    """Split communities (h, w) into 8-connected grid components; keep those with > tau patches.

    Returns (segment_map int64 (h, w), -1 = noise, valid ids 0..V-1 in raster order of each
    segment's first patch) and counts {n_communities, n_segments, n_valid, valid_sizes}.
    """
    from scipy import ndimage

    communities = np.asarray(communities)
    components = np.zeros(communities.shape, dtype=np.int64)  # 0 = not yet assigned
    offset = 0
    comm_ids = np.unique(communities)
    for c in comm_ids:
        lab, n = ndimage.label(communities == c, structure=np.ones((3, 3), dtype=bool))
        components[lab > 0] = lab[lab > 0] + offset
        offset += n
    ids, first, sizes = np.unique(components.ravel(), return_index=True, return_counts=True)
    valid = sizes > tau
    new_id = np.full(offset + 1, -1, dtype=np.int64)
    order = np.argsort(first[valid], kind="stable")  # raster order: canonical, seed-independent
    new_id[ids[valid][order]] = np.arange(valid.sum())
    info = {
        "n_communities": int(comm_ids.size),
        "n_segments": int(offset),
        "n_valid": int(valid.sum()),
        "valid_sizes": sizes[valid][order].tolist(),
    }
    return new_id[components], info


def discover_segments(
    keys: np.ndarray,
    tau: int = 5,
    seed: int = 0,
    backend: str = "louvain",
    weighted: bool = False,
    resolution: float = 1.0,
) -> tuple[np.ndarray, dict]:
    """Segments of one image from its keys (h, w, d): (segment_map int64 (h, w), stats dict).

    The stats dict holds n_communities, n_segments (J), n_valid and valid_sizes (patches each).
    """
    h, w = keys.shape[:2]
    adjacency = key_adjacency(keys.reshape(h * w, -1), weighted=weighted)
    communities = detect_communities(adjacency, seed=seed, backend=backend, resolution=resolution)
    return split_into_segments(communities.reshape(h, w), tau=tau)


def summarize_segments(infos: Sequence[dict]) -> dict:
    """Dataset segment statistics of paper Table II from per-image ``discover_segments`` stats.

    The schema every segment-producing task shares (``report.tables.SEGMENT_FIELDS``): total and valid segments
    (J summed over images), % valid, segments and valid segments per image, and the mean number
    of patches of a *valid* segment (the ones that get crops and labels).
    """
    n_images = len(infos)
    total = sum(i["n_segments"] for i in infos)
    valid = sum(i["n_valid"] for i in infos)
    sizes = [s for i in infos for s in i["valid_sizes"]]
    return {
        "images": n_images,
        "total": total,
        "valid": valid,
        "valid_percent": 100.0 * valid / total if total else 0.0,
        "per_image": total / n_images if n_images else 0.0,
        "valid_per_image": valid / n_images if n_images else 0.0,
        "patches_per_segment": float(np.mean(sizes)) if sizes else 0.0,
    }


def synthetic_keys(
    h: int, w: int, dim: int = 64, n_regions: int = 4, noise: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Blocky regions with one random key direction each plus Gaussian noise: (keys, regions).

    A shared offset makes most dot products positive, as with real ViT keys, so the graph is
    dense: a realistic load for timing ``discover_segments`` (e.g. 28x28 and 40x40 grids).
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, n_regions, size=(max(1, h // 7), max(1, w // 7)))
    regions = upsample_nearest(coarse, (h, w))
    centres = rng.normal(size=(n_regions, dim)) + 0.3
    keys = centres[regions] + noise * rng.normal(size=(h, w, dim))
    return keys.astype(np.float32), regions


# ----------------------------------------------------------------------------------------------
# 2. segment crops
# ----------------------------------------------------------------------------------------------


def upsample_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (h, w) to (H, W), sampling at pixel centres."""
    h, w = labels.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def segment_crop(
    image: np.ndarray,
    segment_map: np.ndarray,
    segment_id: int | None = None,
    fill: int | Sequence[int] = 0,
    size: int = 224,
    fit: str = "stretch",
) -> np.ndarray:
    """Crop of one segment: uint8 (size, size, 3).

    ``segment_map`` is at image resolution; with ``segment_id=None`` it is a boolean mask.
    Pixels of the box outside the segment get ``fill`` (the authors use 0, black).
    ``fit="stretch"`` resizes the box to size x size; ``fit="authors"`` resizes its short side to
    size*256/224 and centre-crops, as the authors' feature extractor does.
    """
    from PIL import Image

    mask = segment_map if segment_id is None else segment_map == segment_id
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise ValueError("segment is empty")
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    crop = image[box].copy()
    crop[~mask[box]] = fill
    pil = Image.fromarray(crop)
    if fit == "stretch":
        return np.asarray(pil.resize((size, size), Image.BICUBIC))
    if fit != "authors":
        raise ValueError(f"unknown crop fit {fit!r}; expected 'stretch' or 'authors'")
    short = round(size * 256 / 224)
    scale = short / min(pil.size)
    new_w, new_h = max(size, round(pil.size[0] * scale)), max(size, round(pil.size[1] * scale))
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(pil.crop((left, top, left + size, top + size)))


# ----------------------------------------------------------------------------------------------
# 3. segment clustering -> initial pseudo masks
# ----------------------------------------------------------------------------------------------


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: faiss only seeds at random, which often merges well-separated classes."""
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        i = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return np.stack(centres).astype(np.float32)


def cluster_segments(
    features: np.ndarray, k: int, seed: int = 0, iters: int = 50, n_init: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """k-means (faiss Lloyd, k-means++ seeding, seeded) on L2-normalised segment embeddings (N, d).

    Returns (labels int64 (N,), centroids float32 (k', d)), k' = min(k, N); with n_init > 1 the
    run with the lowest objective wins.
    """
    import faiss

    x = np.ascontiguousarray(ops.l2_normalize(features, eps=1e-12))
    k_eff = min(k, x.shape[0])
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        km = faiss.Kmeans(
            x.shape[1], k_eff, niter=iters, seed=int(rng.integers(2**31)), verbose=False,
            min_points_per_centroid=1, max_points_per_centroid=1 << 30,  # no subsampling
        )
        km.train(x, init_centroids=kmeans_pp_init(x, k_eff, rng))
        if best is None or km.obj[-1] < best.obj[-1]:
            best = km
    return nearest_centroid(x, best.centroids), best.centroids.copy()


def nearest_centroid(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cluster id of each L2-normalised embedding (N, d): used to label a held-out split."""
    return ops.nearest_centroid(ops.l2_normalize(features, eps=1e-12), centroids)[0].astype(np.int64)


def paint_segments(segment_map: np.ndarray, segment_labels: np.ndarray) -> np.ndarray:
    """Pseudo mask from a segment map (-1 = noise) and one label per valid segment."""
    # index -1 of the lookup table is the appended -1, so noise stays unlabelled
    lut = np.append(np.asarray(segment_labels, dtype=np.int64), -1)
    return lut[segment_map]


def paint_split(segment_maps: Sequence[np.ndarray], infos: Sequence[dict], labels: np.ndarray) -> list[np.ndarray]:
    """Pseudo masks of a split: ``labels`` holds every image's valid segments in order (``n_valid`` each)."""
    bounds = np.cumsum([0] + [i["n_valid"] for i in infos])
    return [paint_segments(seg, labels[a:b]) for seg, a, b in zip(segment_maps, bounds[:-1], bounds[1:])]


# ----------------------------------------------------------------------------------------------
# 4. de-noising network
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenoiserConfig:
    """DeepLabV3 trained from scratch (weights=None, weights_backbone=None).

    The defaults are the "cpu" preset: small enough to train on ~100 images in about a minute on
    2 CPU cores. "gpu" is the full-size network (torchvision deeplabv3_resnet50, as the paper
    names); the paper gives no training settings, so epochs, batch and learning rate are ours.

    arch: resnet18 (layers 1-3, output stride 16, 256 channels: BasicBlock cannot dilate) |
    mobilenet_v3_large (torchvision deeplabv3_mobilenet_v3_large) | resnet50.
    """

    arch: str = "resnet18"
    input_size: int = 128  # images and masks are resized to a square of this side for training
    epochs: int = 8  # passes over the usable masks
    batch_size: int = 8
    optimizer: str = "adam"  # adam | sgd (momentum 0.9); poly learning-rate decay either way
    lr: float = 1e-3
    weight_decay: float = 1e-4
    single_class_threshold: float = 0.95  # drop masks whose largest class covers more
    predict_batch_size: int = 16
    cache_mb: int = 1024  # keep resized training images in memory up to this size

    @classmethod
    def from_params(cls, params: str | dict | None) -> DenoiserConfig:
        """A preset name ("cpu", "gpu") or a dict of fields, optionally on top of {"preset": NAME}."""
        if not isinstance(params, (str, dict, type(None))):
            raise UserError(f"denoiser={params!r} -- use a preset (cpu, gpu) or a mapping, e.g. "
                            f"-p 'denoiser={{preset: cpu, epochs: 5}}'")
        params = {"preset": params} if isinstance(params, str) else dict(params or {})
        preset = params.pop("preset", "cpu")
        if preset not in DENOISER_PRESETS:
            raise UserError(f"unknown denoiser preset {preset!r} -- use one of {sorted(DENOISER_PRESETS)}")
        unknown = set(params) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(
                f"unknown denoiser params {sorted(unknown)} -- use {[f.name for f in fields(cls)]}"
            )
        for key, value in params.items():  # the preset's field types: 2.5 epochs or "abc" fail here
            check_like_default("denoiser field", key, value, getattr(DENOISER_PRESETS[preset], key), "")
        config = replace(DENOISER_PRESETS[preset], **params)
        if config.arch not in DENOISER_ARCHS:
            raise UserError(f"denoiser arch {config.arch!r} -- use one of {', '.join(DENOISER_ARCHS)}")
        if config.optimizer not in ("adam", "sgd"):
            raise UserError(f"denoiser optimizer {config.optimizer!r} -- use adam or sgd")
        if config.batch_size < 2:  # BatchNorm in the ASPP pooling branch needs two samples
            raise UserError(f"denoiser batch_size {config.batch_size} -- use 2 or more")
        return config



DENOISER_ARCHS = ("resnet18", "mobilenet_v3_large", "resnet50")
DENOISER_PRESETS = {
    "cpu": DenoiserConfig(),
    "gpu": DenoiserConfig(arch="resnet50", input_size=320, epochs=50, batch_size=16,
                          optimizer="sgd", lr=0.01),
}


def build_denoiser(num_classes: int, arch: str = "resnet18"):
    """Untrained torchvision DeepLabV3 with ``num_classes`` outputs (no pretrained weights)."""
    import torch.nn as nn
    from torchvision.models import resnet18
    from torchvision.models.segmentation import (
        deeplabv3_mobilenet_v3_large,
        deeplabv3_resnet50,
    )
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

    if arch == "resnet50":
        return deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes)
    if arch == "mobilenet_v3_large":
        return deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=num_classes
        )
    if arch != "resnet18":
        raise ValueError(f"unknown denoiser arch {arch!r}")

    class _Trunk(nn.Module):  # DeepLabV3 wants a backbone returning {"out": features}
        def __init__(self):
            super().__init__()
            r = resnet18(weights=None)
            self.body = nn.Sequential(
                r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3
            )

        def forward(self, x):
            return {"out": self.body(x)}

    # atrous rates (6, 12, 18): the DeepLabV3 setting for output stride 16
    return DeepLabV3(_Trunk(), DeepLabHead(256, num_classes, atrous_rates=(6, 12, 18)))


def usable_masks(masks: Iterable[np.ndarray], threshold: float = 0.95) -> np.ndarray:
    """Boolean per mask: has labelled pixels and its largest class covers <= threshold of them.

    Near-single-class masks teach the network little but "predict the majority class".
    """
    keep = []
    for m in masks:
        counts = np.bincount(m[m >= 0].ravel().astype(np.int64))
        keep.append(counts.sum() > 0 and counts.max() <= threshold * counts.sum())
    return np.array(keep, dtype=bool)


def _to_input(images: Sequence[np.ndarray], size: int):
    """uint8 images (H, W, 3), any sizes -> normalised float tensor (B, 3, size, size)."""
    import torch
    import torch.nn.functional as F

    batch = [
        F.interpolate(
            torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255.0,
            size=(size, size), mode="bilinear", align_corners=False, antialias=True,
        )
        for im in images
    ]
    x = torch.cat(batch)
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def epoch_batches(
    items: np.ndarray, batch_size: int, epochs: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffled full batches, epoch after epoch (the last partial batch of an epoch is dropped;
    fewer items than a batch are drawn with replacement, so every step sees ``batch_size``)."""
    per_epoch = max(1, len(items) // batch_size)
    out = []
    for _ in range(epochs):
        order = rng.permutation(items) if len(items) >= batch_size else rng.choice(items, batch_size)
        out.extend(order[: per_epoch * batch_size].reshape(per_epoch, batch_size))
    return out


def train_denoiser(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    num_classes: int,
    config: DenoiserConfig = DenoiserConfig(),
    seed: int = 0,
    device="cpu",
    progress: Callable[[Iterable], Iterable] | None = None,
):
    """Train DeepLabV3 on pseudo masks (any resolution, -1 ignored); returns (model, n_used).

    ``images`` may be a lazy sequence (len + getitem) so large datasets need not sit in memory.
    Global torch RNG state is restored afterwards (fork_rng), so the call is reproducible and pure.
    """
    import torch
    import torch.nn.functional as F

    keep = np.flatnonzero(usable_masks(masks, config.single_class_threshold))
    if keep.size == 0:
        raise UserError(
            "no pseudo mask passes the de-noising filter -- raise denoiser.single_class_threshold"
        )
    device = torch.device(device)
    size = config.input_size
    rng = np.random.default_rng(seed)
    use_cache = len(keep) * 3 * size * size * 4 <= config.cache_mb * 2**20
    cache: dict[int, tuple] = {}

    def sample(i: int):
        if i in cache:
            return cache[i]
        x = _to_input([images[i]], size)[0]
        y = torch.from_numpy(ops.upsample_labels(masks[i], (size, size)))
        if use_cache:
            cache[i] = (x, y)
        return x, y

    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = build_denoiser(num_classes, config.arch).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        if config.optimizer == "sgd":
            opt = torch.optim.SGD(
                params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay
            )
        elif config.optimizer == "adam":
            opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {config.optimizer!r}")
        batches = epoch_batches(keep, config.batch_size, config.epochs, rng)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (1 - s / len(batches)) ** 0.9  # poly decay, as in DeepLab
        )
        for idx in progress(batches) if progress else batches:
            xs, ys = zip(*(sample(int(i)) for i in idx))
            x, y = torch.stack(xs), torch.stack(ys)
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)  # horizontal flip augmentation
            x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
            logits = model(x.to(device))["out"]
            loss = F.cross_entropy(logits, y.to(device), ignore_index=-1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval(), int(keep.size)


def predict_denoiser(
    model, images: Iterable[np.ndarray], config: DenoiserConfig = DenoiserConfig(), device="cpu"
) -> Iterator[np.ndarray]:
    """Label map int64 (H, W) per image at its own resolution (logits upsampled, then argmax)."""
    import torch
    import torch.nn.functional as F

    device = torch.device(device)

    def flush(batch):
        with torch.inference_mode():
            logits = model(_to_input(batch, config.input_size).to(device))["out"]
            for im, lg in zip(batch, logits):
                up = F.interpolate(lg[None], size=im.shape[:2], mode="bilinear", align_corners=False)
                yield up[0].argmax(0).cpu().numpy().astype(np.int64)

    batch: list[np.ndarray] = []
    for im in images:
        batch.append(im)
        if len(batch) == config.predict_batch_size:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


# ----------------------------------------------------------------------------------------------
# 5. runner adapter
# ----------------------------------------------------------------------------------------------

class _LazyImages:
    """Sequence view of ctx.image for one split (loaded on access)."""

    def __init__(self, ctx, split: str, n: int):
        self.ctx, self.split, self.n = ctx, split, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ctx.image(i, split=self.split)

    def __iter__(self):
        return (self[i] for i in range(self.n))


def _crop_embedder(ctx, name: str | None):
    """Backbone that embeds the crops: the run's own (CLS of its ViT) or the registered backbone
    ``name`` (the paper's CNN ablation: the pooled feature of a MoCo ResNet)."""
    return ctx.build_backbone(name) if name else ctx.backbone


def _embed(backbone, crops: list[np.ndarray]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return backbone.embed(backbone.normalize(np.stack(crops))).float().cpu().numpy()


# What segments and crop embeddings depend on besides the key features, the seed and the crop model.
SEGMENT_PARAMS = ("tau", "backend", "weighted", "resolution", "crop_fill", "crop_size", "crop_fit", "crop_batch_size")


def _segments_of_split(ctx, split: str, p: dict) -> dict:
    """Segments, crop embeddings and image sizes of every image of one split, plus a view of its images.
    None of it depends on K, so the cells of an over-clustering sweep compute it once (``ctx.reuse``)."""
    identity = {key: p[key] for key in SEGMENT_PARAMS} | {"crop_model": ctx.backbone_identity(p["crop_backbone"])}
    data = ctx.reuse(f"datus2-segments-{split}", identity, lambda: _discover_and_embed(ctx, split, p), split=split)
    return {**data, "images": _LazyImages(ctx, split, len(data["segments"]))}


def _discover_and_embed(ctx, split: str, p: dict) -> dict:
    backbone = _crop_embedder(ctx, p["crop_backbone"])
    crop_size = int(p["crop_size"] or backbone.spec.input_size)
    keys = ctx.features("key", split=split)
    images = _LazyImages(ctx, split, len(keys))
    seg_maps, infos, sizes, feats, pending = [], [], [], [], []

    def flush():
        if pending:
            feats.append(_embed(backbone, pending))
            pending.clear()

    for i in ctx.progress(range(len(keys)), desc=f"datus2 segments [{split}]", total=len(keys)):
        seg, info = discover_segments(
            keys[i], tau=p["tau"], seed=ctx.seed, backend=p["backend"],
            weighted=p["weighted"], resolution=p["resolution"],
        )
        image = images[i]
        seg_full = upsample_nearest(seg, image.shape[:2])
        for s in range(info["n_valid"]):
            pending.append(segment_crop(image, seg_full, s, p["crop_fill"], crop_size, p["crop_fit"]))
            if len(pending) >= p["crop_batch_size"]:
                flush()
        seg_maps.append(seg.astype(np.int16))  # small grids, many images: keep them compact
        infos.append(info)
        sizes.append(image.shape[:2])
    flush()
    dim = feats[0].shape[1] if feats else 1
    return {
        "segments": seg_maps,
        "infos": infos,
        "sizes": sizes,
        "features": np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
    }


def check_params(p: dict) -> None:
    """One-line errors for bad parameters, before any work (the task file's ``validate`` hook)."""
    if p["backend"] not in BACKENDS:
        raise UserError(f"backend={p['backend']!r} -- use one of {', '.join(BACKENDS)}")
    if p["crop_fit"] not in CROP_FITS:
        raise UserError(f"crop_fit={p['crop_fit']!r} -- use one of {', '.join(CROP_FITS)}")
    if not is_whole(p["tau"]) or p["tau"] < 0:
        raise UserError(f"tau={p['tau']!r} -- use a whole number of patches >= 0 (-p tau=5)")
    for key, example in (("kmeans_iters", 50), ("kmeans_n_init", 1), ("crop_batch_size", 64)):
        if not is_whole(p[key]) or p[key] < 1:
            raise UserError(f"{key}={p[key]!r} -- use a whole number >= 1 (-p {key}={example})")
    if p["crop_size"] is not None and (not is_whole(p["crop_size"]) or p["crop_size"] < 16):
        raise UserError(f"crop_size={p['crop_size']!r} -- use null (the crop backbone's own size) or a side >= 16 "
                        f"(-p crop_size=224)")
    if not 0 <= p["crop_fill"] <= 255:
        raise UserError(f"crop_fill={p['crop_fill']!r} -- use a pixel value 0-255 (-p crop_fill=0)")
    if not is_number(p["resolution"]) or p["resolution"] < 0:
        raise UserError(f"resolution={p['resolution']!r} -- use a number >= 0 (-p resolution=1.0)")
    DenoiserConfig.from_params(p["denoiser"])


def run(ctx):
    """DatUS^2 on ctx.split (parameters: tasks/datus2.yaml).

    Streams: "initial" (clustered segments) and, with ``denoise``, "denoised" on the run's split and
    on ``fit_split`` when that is another split; "final" on the run's split is the de-noised masks
    when de-noising runs, else the initial ones. Noise segments stay unlabelled (-1).
    """
    from ssl_bench.runner import Prediction, TaskResult

    p = ctx.params  # resolved and checked by the registry (check_params is the task file's validate hook)
    config = DenoiserConfig.from_params(p["denoiser"])

    fit_split = p["fit_split"] or ctx.split
    splits = [fit_split] + ([ctx.split] if ctx.split != fit_split else [])
    data = {s: _segments_of_split(ctx, s, p) for s in splits}
    segments = len(data[fit_split]["features"])
    if segments < ctx.k:  # fewer clusters than K would be stored, and reported, as K
        raise UserError(f"K={ctx.k} clusters need at least {ctx.k} valid segments, split {fit_split!r} has {segments} "
                        f"-- lower --k, use more images, or lower -p tau (now {p['tau']})")

    # k-means on the fit split; a held-out split takes the nearest centroid, so its cluster ids
    # mean the same as the ones the denoiser was trained on
    fit_labels, centroids = cluster_segments(
        data[fit_split]["features"], ctx.k, seed=ctx.seed,
        iters=p["kmeans_iters"], n_init=p["kmeans_n_init"],
    )
    for s, d in data.items():
        labels = fit_labels if s == fit_split else nearest_centroid(d["features"], centroids)
        d["masks"] = paint_split(d["segments"], d["infos"], labels)

    infos = data[ctx.split]["infos"]
    stats = {
        "segments": summarize_segments(infos),
        "communities_per_image": sum(i["n_communities"] for i in infos) / len(infos),
        "clustered_segments": int(len(data[fit_split]["features"])),
        "clusters": int(len(centroids)),
        "crop_backbone": ctx.backbone_identity(p["crop_backbone"])["backbone"],
    }
    if fit_split != ctx.split:
        stats["fit_split"] = fit_split
        stats["segments@" + fit_split] = summarize_segments(data[fit_split]["infos"])

    model = None
    if p["denoise"]:
        fit = data[fit_split]
        model, n_used = train_denoiser(
            fit["images"], fit["masks"], len(centroids), config, seed=ctx.seed,
            device=ctx.device,
            progress=lambda it: ctx.progress(it, desc="datus2 denoiser steps", total=len(it)),
        )
        stats["denoiser"] = asdict(config)  # the resolved preset, for the record
        stats["denoiser_train_masks"] = n_used
        stats["denoiser_dropped_masks"] = len(fit["masks"]) - n_used

    def predictions():
        for s in splits:
            d = data[s]
            out_split = None if s == ctx.split else s
            denoised = (
                predict_denoiser(model, d["images"], config, ctx.device) if model else None
            )
            for i, (mask, size) in enumerate(zip(d["masks"], d["sizes"])):
                final = upsample_nearest(mask, size)
                yield Prediction(i, final, stream="initial", split=out_split)
                if denoised is not None:
                    final = next(denoised)
                    yield Prediction(i, final, stream="denoised", split=out_split)
                if out_split is None:
                    yield Prediction(i, final, stream="final")

    return TaskResult(predictions=predictions(), stats=stats)


# ----------------------------------------------------------------------------------------------
# 6. benchmark (`ssl-bench bench datus2`)
# ----------------------------------------------------------------------------------------------


def benchmark(
    grids: Sequence[int] = (28, 40), discovery_images: int = 2, key_dim: int = 768,
    pipeline_images: int = 16, k: int = 11, seed: int = 0,
) -> dict:
    """Segment discovery s/image (28x28 and 40x40 grids, python-louvain vs igraph) and the whole
    pipeline's s/image on CamVid val with a random dino-vits16 (de-noising timed separately)."""
    import time

    from ssl_bench import registry
    from ssl_bench.features import benchmark_inputs
    from ssl_bench.models import build_backbone, resolve

    out: dict = {"discovery": []}
    for backend in BACKENDS:  # warm-up: imports and first-call set-up are not per-image costs
        discover_segments(synthetic_keys(7, 7, seed=seed)[0], seed=seed, backend=backend)
    # Discovery on synthetic keys: ViT-B-sized keys whose dot products are mostly positive, as
    # real keys' are, so the graph is as dense as the method meets (28x28: ViT/8 at 224 px).
    for side in grids:
        keys = [synthetic_keys(side, side, dim=key_dim, seed=seed + i)[0] for i in range(discovery_images)]
        for backend in BACKENDS:
            seconds, q, n_segments, density = 0.0, [], [], []
            for kk in keys:  # discover_segments, step by step, to keep the communities for scoring
                t0 = time.perf_counter()
                adjacency = key_adjacency(kk.reshape(side * side, -1))
                communities = detect_communities(adjacency, seed=seed, backend=backend)
                _, info = split_into_segments(communities.reshape(side, side))
                seconds += time.perf_counter() - t0
                q.append(modularity(adjacency, communities))
                n_segments.append(info["n_valid"])
                density.append(adjacency.mean())
            out["discovery"].append({
                "grid": f"{side}x{side}", "backend": backend, "s_per_image": seconds / len(keys),
                "modularity": float(np.mean(q)), "valid_segments_per_image": float(np.mean(n_segments)),
                "edge_density": float(np.mean(density)),
            })

    # The pipeline on real images: keys of a random-weight ViT (same cost as pretrained ones).
    images, feats, source = benchmark_inputs("dino-vits16", pipeline_images, kinds=("key",))
    spec = registry.backbone("dino-vits16")
    vit = build_backbone(spec, resolve(spec, "random"), 0)
    _embed(vit, [images[0][: spec.input_size, : spec.input_size]] * 2)  # warm-up
    timings = {"discovery": 0.0, "crops": 0.0, "cls": 0.0, "kmeans": 0.0}
    seg_maps, crop_feats, infos = [], [], []
    for image, f in zip(images, feats):
        t0 = time.perf_counter()
        seg, info = discover_segments(np.asarray(f["key"]), seed=seed, backend="igraph")
        t1 = time.perf_counter()
        full = upsample_nearest(seg, image.shape[:2])
        crops = [segment_crop(image, full, s, size=spec.input_size) for s in range(info["n_valid"])]
        t2 = time.perf_counter()
        if crops:
            crop_feats.append(_embed(vit, crops))
        t3 = time.perf_counter()
        timings["discovery"] += t1 - t0
        timings["crops"] += t2 - t1
        timings["cls"] += t3 - t2
        seg_maps.append(seg)
        infos.append(info)
    t0 = time.perf_counter()
    labels, _ = cluster_segments(np.concatenate(crop_feats), k, seed=seed)
    timings["kmeans"] = time.perf_counter() - t0
    masks = paint_split(seg_maps, infos, labels)
    n = len(images)
    out["pipeline"] = {
        "inputs": source, "images": n, "grid": list(seg_maps[0].shape), "backend": "igraph",
        "segments": summarize_segments(infos),
        "s_per_image": {**{key: v / n for key, v in timings.items()}, "total": sum(timings.values()) / n},
        "note": "excludes key extraction (the feature cache) and de-noising",
    }

    config = DENOISER_PRESETS["cpu"]
    t0 = time.perf_counter()
    model, used = train_denoiser(images, masks, k, config, seed=seed)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in predict_denoiser(model, images, config):
        pass
    out["denoiser_cpu_preset"] = {
        "config": asdict(config), "train_masks": used,
        "train_s_per_image_epoch": train_s / max(used, 1) / config.epochs,
        "predict_s_per_image": (time.perf_counter() - t0) / n,
    }
    return out
