"""Segmentation heads trained on cached backbone features, and their probes: what STEGO and HP share.

Both methods (STEGO, Hamilton et al. ICLR 2022, github.com/mhamilton723/STEGO; HP, Seong et al. CVPR 2023,
github.com/hynnsk/HP, which builds on STEGO's code) train a *segmentation head* on a frozen backbone: a
projection of every patch feature ``f`` to a code ``z = W1 drop(f) + W3 relu(W2 drop(f))`` (1x1 convolutions,
channel dropout p = 0.1 on each branch's input while training), then read classes off the code with

- a **cluster probe**: K unit-norm centres, trained with minibatch cosine k-means (each patch's loss is minus
  its cosine to the nearest centre; Adam, lr 5e-3), K = the run's K; the unsupervised prediction;
- a **linear probe**: a 1x1 convolution to the C classes, trained with cross-entropy on the fit split's ground
  truth (logits upsampled bilinearly to label resolution); the *supervised* upper bound of the code.

Evaluation, as both codes: the code is upsampled bilinearly to label resolution and normalised before the
cosine to the centres; with ``crf`` the cluster probabilities softmax(2 cos) and the linear probabilities
softmax(logits) go through the dense CRF shared by STEGO, HP and PriMaPs (``ssl_bench/crf.py``). Streams:
``final`` (cluster probe, CRF-refined when crf), ``nocrf``, ``linear``, ``linear-nocrf``.

Choices where the reference codes are not followed, on purpose:
- The probes train *after* the head, on the final head's codes (eval mode, no dropout), for as many steps and
  with the batch size of the head; the references train them at the same time on the moving codes. So the head,
  which does not depend on K, is trained once for every K of a sweep (``ctx.reuse``); only the cluster probe is K's.
- No checkpoint is picked by validation scores: both references keep the checkpoint with the best validation
  mIoU (labels of the evaluated split); we evaluate the last step.
- One view per image at evaluation (the cache holds one): STEGO's evaluation script averages the codes of an
  image and its horizontal flip.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..crf import CRFPool, check_available as check_crf_available, crf_argmax
from ..errors import UserError
from ..ops import as_float32
from ..registry import is_number, is_whole

SCHEDULES = ("auto", "paper", "cpu")


def source_digest() -> str:
    """Digest of this module's source: part of every cached head's identity, so a change here retires them."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Modules and their weights as arrays (what ``ctx.reuse`` keeps)
# ---------------------------------------------------------------------------------------------------------


class SegmentationHead(nn.Module):
    """STEGO's head: a linear and (``nonlinear``) a two-layer ReLU projection of (B, C, h, w) features, summed."""

    def __init__(self, in_dim: int, dim: int, nonlinear: bool = True, dropout: float = 0.1):
        super().__init__()
        self.linear = nn.Conv2d(in_dim, dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, dim, 1)) \
            if nonlinear else None
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        code = self.linear(self.dropout(features))  # each branch draws its own dropout mask, as the reference
        if self.nonlinear is not None:
            code = code + self.nonlinear(self.dropout(features))
        return code


class ClusterProbe(nn.Module):
    """K centres (random normal start, as STEGO's ``ClusterLookup``) scored by cosine against codes."""

    def __init__(self, dim: int, k: int, generator: torch.Generator):
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(k, dim, generator=generator))

    def cosine(self, code: torch.Tensor) -> torch.Tensor:
        """(B, dim, h, w) -> (B, K, h, w)."""
        return torch.einsum("bchw,kc->bkhw", F.normalize(code, dim=1), F.normalize(self.clusters, dim=1))

    def loss(self, code: torch.Tensor) -> torch.Tensor:
        """Minibatch cosine k-means: minus the mean cosine of each patch to its nearest centre."""
        return -self.cosine(code).max(1).values.mean()


def arrays_of(module: nn.Module) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy().copy() for name, t in module.state_dict().items()}


def load_arrays(module: nn.Module, arrays: dict, device: torch.device | str = "cpu") -> nn.Module:
    module.load_state_dict({name: torch.from_numpy(np.asarray(a)) for name, a in arrays.items()})
    return module.to(device)


def head_from_arrays(arrays: dict, device: torch.device | str = "cpu") -> SegmentationHead:
    in_dim, dim = arrays["linear.weight"].shape[1], arrays["linear.weight"].shape[0]
    head = SegmentationHead(in_dim, dim, nonlinear="nonlinear.0.weight" in arrays)
    return load_arrays(head, arrays, device).eval()


# ---------------------------------------------------------------------------------------------------------
# Training data: views of the fit split, their neighbours, batches
# ---------------------------------------------------------------------------------------------------------


def as_batch(features: Sequence, idx: Sequence[int], device) -> torch.Tensor:
    """Features (h, w, C) of views ``idx`` as one (B, C, h, w) float32 tensor on ``device``: cached arrays, or
    tensors on any device (a training loop's augmented views, made where it runs). The maps travel in their own
    dtype (the cache's float16: half the bytes) and are converted and transposed on ``device`` in one copy, so a
    GPU training step leaves the CPU only the stacking (``ssl-bench bench gpu``: training batches). The
    conversion is exact: every device gets the same numbers."""
    maps = [features[int(i)] for i in idx]
    on_devices = all(isinstance(m, torch.Tensor) for m in maps)
    maps = maps if on_devices else [np.asarray(m) for m in maps]
    if len({tuple(m.shape) for m in maps}) > 1:
        raise UserError("a segmentation head trains on equally sized views, but this split's training views differ "
                        f"in size ({sorted({tuple(m.shape[:2]) for m in maps})}) -- keep the protocol's centre crop "
                        "(--crop center)")
    stacked = torch.stack([m.to(device) for m in maps]) if on_devices else torch.from_numpy(np.stack(maps)).to(device)
    batch = torch.empty(stacked.permute(0, 3, 1, 2).shape, dtype=torch.float32, device=stacked.device)
    return batch.copy_(stacked.permute(0, 3, 1, 2))


def global_features(features: Sequence) -> np.ndarray:
    """One unit vector per view: the mean of its patch features, normalised (STEGO's kNN features)."""
    means = np.stack([as_float32(features[i]).reshape(-1, np.shape(features[i])[-1]).mean(0)
                      for i in range(len(features))])
    return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(global_feats: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """(n, k') indices of each view's k' = min(k, n - 1) most cosine-similar other views, nearest first (a view
    is never its own neighbour; a split of one view is its own). STEGO takes the top 30 by cosine and draws the
    positive among ranks 1..7, rank 0 being the view itself."""
    n = len(global_feats)
    if n == 1:
        return np.zeros((1, 1), dtype=np.int64)
    k = min(k, n - 1)
    x = torch.from_numpy(np.ascontiguousarray(global_feats, dtype=np.float32))
    out = []
    for start in range(0, n, chunk):
        sims = x[start:start + chunk] @ x.T
        rows = torch.arange(start, min(start + chunk, n))
        sims[torch.arange(len(rows)), rows] = -float("inf")  # not itself, even when a duplicate ties with it
        out.append(torch.topk(sims, k, dim=1).indices)
    return torch.cat(out).numpy().astype(np.int64)


def shuffled_batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[list[int]]:
    """``steps`` batches from epochs of shuffled views (a DataLoader with shuffle=True, drop_last=False)."""
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, batch_size):
            if done == steps:
                return
            yield order[start:start + batch_size]
            done += 1


@contextlib.contextmanager
def seeded(seed: int, device="cpu"):
    """Torch's global generators (CPU, and ``device``'s when a GPU) seeded with ``seed`` inside, restored after:
    weight starts and dropout masks follow the run's seed and leave everything else's randomness alone."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def check_head_params(method: str, p: dict, whole: dict[str, int], positive: tuple = (), non_negative: tuple = (),
                      unit: tuple = (), choices: dict | None = None) -> None:
    """One line for the first bad parameter of a head method, before any work: ``whole`` {key: least value},
    numbers > 0, >= 0, in [0, 1]; ``choices`` {key: allowed values}. Every head method also checks its training
    views (train_crops, crop_ratio) and schedule here."""
    def bad(key, want):
        raise UserError(f"{method}: parameter {key}={p[key]!r} is invalid -- use {want} (-p {key}=...)")

    for key, least in {"train_resize": 1, "cpu_steps": 1, "cpu_batch_size": 1, **whole}.items():
        if not (is_whole(p[key]) and p[key] >= least):
            bad(key, f"a whole number >= {least}")
    for keys, test, want in ((positive, lambda v: v > 0, "a number > 0"), (non_negative, lambda v: v >= 0, "a number >= 0"),
                             (unit, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                             (("crop_ratio",), lambda v: 0 < v <= 1, "a number in (0, 1]")):
        for key in keys:
            if not (is_number(p[key]) and test(p[key])):
                bad(key, want)
    for key, allowed in {"train_crops": ("five", "none"), "schedule": SCHEDULES, **(choices or {})}.items():
        if p[key] not in allowed:
            bad(key, " | ".join(allowed))


def training_view(p: dict) -> dict:
    """Keyword arguments of ``ctx.features`` etc. for a head's training views of the fit split: five crops or the
    images themselves, at ``train_resize``."""
    options = {"crops": "five", "crop_ratio": p["crop_ratio"]} if p["train_crops"] == "five" else None
    return {"options": options, "resize": p["train_resize"]}


def resolve_schedule(p: dict, device: torch.device, paper: dict, cpu: dict) -> dict:
    """The training schedule a run uses: ``schedule: auto`` is the paper's on a GPU and the small CPU one
    otherwise (the run's stats record which); ``paper`` / ``cpu`` choose one whatever the device."""
    name = p["schedule"]
    if name == "auto":
        name = "paper" if torch.device(device).type == "cuda" else "cpu"
    return {"name": name, "device": str(device), **(paper if name == "paper" else cpu)}


# ---------------------------------------------------------------------------------------------------------
# Probes on a trained head
# ---------------------------------------------------------------------------------------------------------


def _codes(head: nn.Module, features: Sequence, idx, device) -> torch.Tensor:
    with torch.no_grad():
        return head(as_batch(features, idx, device))


def train_linear_probe(head: nn.Module, features: Sequence, labels: Sequence, num_classes: int, steps: int,
                       batch_size: int, lr: float, seed: int, device, progress: Callable | None = None
                       ) -> tuple[dict, list[float]]:
    """Linear probe on the frozen head's codes: cross-entropy on labels (-1 and ids >= C ignored) at label
    resolution, logits upsampled bilinearly; Adam. Returns its weights as arrays and the losses."""
    gen = torch.Generator().manual_seed(seed)
    with seeded(seed, device):  # torch's default start of a 1x1 convolution, drawn from the run's seed
        probe = nn.Conv2d(head.linear.out_channels, num_classes, 1).to(device)
    head.eval()
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    losses = []
    batches = shuffled_batches(len(features), batch_size, steps, gen)
    for idx in _wrap(progress, batches, steps, "linear probe"):
        target = torch.from_numpy(np.stack([np.asarray(labels[i]) for i in idx]).astype(np.int64)).to(device)
        target = torch.where((target >= 0) & (target < num_classes), target, torch.full_like(target, -1))
        logits = F.interpolate(probe(_codes(head, features, idx, device)), size=target.shape[-2:], mode="bilinear",
                               align_corners=False)
        if not (target >= 0).any():
            continue
        loss = F.cross_entropy(logits, target, ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return arrays_of(probe), losses


def train_cluster_probe(head: nn.Module, features: Sequence, k: int, steps: int, batch_size: int, lr: float,
                        seed: int, device, progress: Callable | None = None) -> tuple[np.ndarray, list[float]]:
    """Cluster probe on the frozen head's codes (``ClusterProbe.loss``, Adam). Returns the centres (K, dim)."""
    gen = torch.Generator().manual_seed(seed)
    probe = ClusterProbe(head.linear.out_channels, k, gen).to(device)
    head.eval()
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    losses = []
    for idx in _wrap(progress, shuffled_batches(len(features), batch_size, steps, gen), steps, "cluster probe"):
        loss = probe.loss(_codes(head, features, idx, device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return probe.clusters.detach().cpu().numpy().copy(), losses


def _wrap(progress: Callable | None, items, total: int, desc: str):
    return items if progress is None else progress(items, desc=desc, total=total)


# ---------------------------------------------------------------------------------------------------------
# Kept heads: trained once per (features, seed, device, parameters), probes per K
# ---------------------------------------------------------------------------------------------------------


def head_setting(ctx, p: dict, keys: tuple, plan: dict) -> tuple[str, dict, dict]:
    """(fit split, training view, identity) of a head of parameters ``p`` trained under schedule ``plan``: the
    identity names the parameters ``keys``, the schedule that ran, the view, this module's code and the classes."""
    view = training_view(p)
    identity = {"head": {key: p[key] for key in keys}, "schedule": plan["name"], "view": view,
                "code": source_digest(), "num_classes": ctx.dataset.num_classes}
    return p["fit_split"] or ctx.split, view, identity


def kept_head(ctx, name: str, identity: dict, split: str, view: dict, fit_head: Callable[[], dict],
              cluster_schedule: Callable[[dict], tuple[int, int]], cluster_lr: float, owner=None
              ) -> tuple["TrainedHead", dict]:
    """A method's head and linear probe (``fit_head()`` -> {"head", "linear": weights as arrays, "views",
    "history": {"loss": [...], ...}, "linear_losses"}), kept by ``ctx.reuse`` under ``identity``, and its cluster
    probe for K = ctx.k (kept per K), trained for ``cluster_schedule(kept)`` = (steps, batch size) on the training
    views ``view`` of ``split``. ``owner``: (the registered task whose head it is, its parameters) when another
    task asks for it (``feature_source.trained_projection``). Everything kept is plain arrays, lists and numbers.
    Returns the trained head (its stats: losses, views) and what ``fit_head`` returned."""
    with ctx.timed("training"):  # a head kept from an earlier run: the time to read it
        kept = ctx.reuse(f"{name}-head", identity, fit_head, split=split, owner=owner)
    head = head_from_arrays(kept["head"], ctx.device)
    steps, batch_size = cluster_schedule(kept)

    def fit_clusters():
        feats = ctx.features("patch", split, **view)
        centres, losses = train_cluster_probe(head, feats, ctx.k, steps, batch_size, cluster_lr, ctx.seed, ctx.device,
                                              ctx.progress)
        return {"clusters": centres, "losses": losses}

    with ctx.timed("cluster probe"):
        clusters = ctx.reuse(f"{name}-clusters", {**identity, "k": ctx.k}, fit_clusters, split=split, owner=owner)
    linear = load_arrays(nn.Conv2d(head.linear.out_channels, ctx.dataset.num_classes, 1), kept["linear"], ctx.device)
    history = kept["history"]
    stats = {"fit_split": split, "training_views": kept["views"], "final_loss": last(history["loss"]),
             "final_terms": {key: last(v) for key, v in history.items() if key != "loss"},
             "linear_probe_final_loss": last(kept["linear_losses"]), "cluster_probe_final_loss": last(clusters["losses"])}
    return TrainedHead(head, np.asarray(clusters["clusters"]), linear.eval(), ctx.device, stats), kept


def last(values) -> float | None:
    return float(values[-1]) if len(values) else None


def run_head_task(ctx, trained_head: Callable) -> object:
    """The ``run(ctx)`` of a head method: ``trained_head(ctx, params)`` -> its predictions and stats."""
    from ..runner import TaskResult

    check_crf_available(ctx.params)  # before the training, not after it
    model = trained_head(ctx, ctx.params)
    stats = dict(model.stats)
    return TaskResult(predictions=head_predictions(model, ctx, ctx.params["crf"], stats), stats=stats)


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainedHead:
    """A trained head and its probes, ready to label images."""

    head: SegmentationHead
    clusters: np.ndarray  # (K, dim) cluster-probe centres
    linear: nn.Conv2d | None  # linear probe (None: not trained)
    device: torch.device | str = "cpu"
    stats: dict = field(default_factory=dict)

    def code(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(1, dim, h, w) code of one image's features (h, w, C; an array, or a tensor on any device), eval mode."""
        self.head.eval()
        with torch.no_grad():
            return self.head(as_batch([features], [0], self.device))

    def code_map(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The code as an (h, w, dim) tensor on the head's device (a training loop's input: no trip to the CPU)."""
        return self.code(features)[0].permute(1, 2, 0)

    def project(self, features: np.ndarray) -> np.ndarray:
        """The code as an (h, w, dim) array: the features another method reads (PriMaPs-EM's features_from)."""
        return self.code_map(features).cpu().numpy()

    def scores(self, features: np.ndarray, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Cluster cosines (K, H, W) and linear logits (C, H, W) of the code upsampled to ``size``."""
        with torch.no_grad():
            code = F.interpolate(self.code(features), size=tuple(size), mode="bilinear", align_corners=False)
            centres = torch.from_numpy(self.clusters).to(code.device)
            out = {"cluster": torch.einsum("bchw,kc->bkhw", F.normalize(code, dim=1),
                                           F.normalize(centres, dim=1))[0]}
            if self.linear is not None:
                out["linear"] = self.linear(code)[0]
        return out

    def predict(self, features: np.ndarray, size: tuple[int, int], image: np.ndarray | None) -> dict[str, np.ndarray]:
        """Label maps per stream; with ``image`` the headline streams are CRF-refined (the ``*nocrf`` kept)."""
        out = {}
        for name, raw_name, raw, probs in self.crf_inputs(features, size, image is not None):
            if probs is None:
                out[name] = raw
                continue
            out[raw_name] = raw
            out[name] = crf_argmax(np.asarray(image), probs)
        return out

    def crf_inputs(self, features: np.ndarray, size: tuple[int, int], crf: bool):
        """Per probe: (stream, its un-refined stream, the argmax labels, the CRF's probabilities or None)."""
        scores = self.scores(features, size)
        for probe, name, raw_name, alpha in (("cluster", "final", "nocrf", 2.0),
                                             ("linear", "linear", "linear-nocrf", 1.0)):
            if probe in scores:
                s = scores[probe]
                raw = s.argmax(0).cpu().numpy().astype(np.int64)
                yield name, raw_name, raw, torch.softmax(alpha * s, dim=0).cpu().numpy() if crf else None


def head_predictions(model: TrainedHead, ctx, crf: bool, stats: dict):
    """The runner's Prediction stream of a trained head on the evaluated split, with the linear stream also
    scored as class ids (``stats["class_id_scores"]["linear"]``, no cluster-to-class matching)."""
    from ..runner import Prediction

    feats = ctx.features("patch")

    def stream():
        if not crf:
            for i in range(len(feats)):
                with ctx.timed("predict"):
                    by_stream = model.predict(feats[i], ctx.label_size(i), None)
                for name, labels in by_stream.items():
                    yield Prediction(index=i, labels=labels, stream=name)
            return
        pending: deque = deque()  # what each CRF job refines, in the order the pool returns them

        def jobs():  # pulled by the pool as it streams: timed as "predict", the waits for labels as "crf"
            for i in range(len(feats)):
                with ctx.timed("predict"):
                    image = ctx.image(i)
                    inputs = list(model.crf_inputs(feats[i], ctx.label_size(i), True))
                for name, raw_name, raw, probs in inputs:
                    pending.append((i, name, raw_name, raw))
                    yield image, probs

        for refined in ctx.timed_stream("crf", CRFPool().map(crf_argmax, jobs())):  # images (and probes) in parallel
            i, name, raw_name, raw = pending.popleft()
            yield Prediction(index=i, labels=raw, stream=raw_name)
            yield Prediction(index=i, labels=refined, stream=name)

    return with_class_id_scores(stream(), ctx, stats, streams=("linear", "linear-nocrf"))


def with_class_id_scores(predictions, ctx, stats: dict, streams: tuple[str, ...]):
    """Pass predictions through; the named streams are also scored as class ids, without the runner's
    cluster-to-class matching (a probe predicts classes already: matching could only flatter it).
    ``stats["class_id_scores"][stream]``: "all" counts unlabelled pixels wrong, "labelled" does not."""
    from ..metrics import StreamingConfusion, _scores

    c = ctx.dataset.num_classes
    confusions = {name: StreamingConfusion(c, c) for name in streams}
    for pred in predictions:
        if pred.stream in confusions and pred.split in (None, ctx.split):
            confusions[pred.stream].update(pred.labels, ctx.label(pred.index))
        yield pred
    scores = stats.setdefault("class_id_scores", {})  # the runner reads stats once every prediction is consumed
    for name, conf in confusions.items():
        if conf.counts.sum() or conf.unlabelled.sum():
            wrong = conf.counts[c:].sum(0)  # ids beyond the classes: wrong
            scores[name] = {"all": _scores(conf.counts[:c], conf.unlabelled + wrong),
                            "labelled": _scores(conf.counts[:c], wrong)}


# ---------------------------------------------------------------------------------------------------------
# Benchmark (`ssl-bench bench stego`, `ssl-bench bench hp`)
# ---------------------------------------------------------------------------------------------------------


def benchmark_training(name: str, train: Callable[[list, int, int], object], backbone: str, images: int, steps: int,
                       batch: int, threads: int | None, resize: int = 224, drop_last: bool = False) -> dict:
    """Head training time per step and per epoch of the CamVid training views, and peak memory, on the five-crop
    training views (grid of a ``resize``-pixel view) of ``images`` real CamVid images (random-weight ``backbone`` features, as
    the head reads them from the cache). ``train(views, steps, batch)`` trains a head. An epoch is extrapolated
    from the measured steps: ceil(5 x CamVid train images / batch) steps (floor with ``drop_last``, as HP's loader;
    367 images when the data is absent).
    Peak memory: the process's peak resident set (CPU; the rise during training is the head's share) and, on a
    GPU, torch's peak allocation."""
    import resource
    import time

    from ..data import open_dataset
    from ..data.protocol import Protocol
    from ..data.shared import shared_data_dir
    from ..features import benchmark_inputs

    before_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        # whole images at `resize` (centre crop): the same grid as their five-crop views at `resize`
        _, feats, source = benchmark_inputs(backbone, images, protocol=Protocol(resize=resize))
        views = [feats[i % len(feats)]["patch"] for i in range(max(len(feats), batch))]  # full batches
        camvid = shared_data_dir() / "camvid" if shared_data_dir() else None
        train_images = len(open_dataset("camvid", camvid, "train")) if camvid and camvid.is_dir() else 367
        per_epoch = 5 * train_images // batch if drop_last else -(-5 * train_images // batch)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        train(views, 1, batch)  # warm-up: imports, allocator (its peak counts: the same batches)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        train(views, steps, batch)
        per_step = (time.perf_counter() - t0) / steps
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out = {"method": name, "features": source, "view_grid": list(views[0].shape), "views": len(views),
               "batch": batch, "steps": steps, "torch_threads": torch.get_num_threads(), "s_per_step": per_step,
               "camvid_train_views": 5 * train_images, "steps_per_epoch": per_epoch,
               "s_per_epoch_camvid_train": per_step * per_epoch, "peak_rss_mb": rss_after,
               "peak_rss_rise_mb": rss_after - rss_before}
        if torch.cuda.is_available():
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        return out
    finally:
        torch.set_num_threads(before_threads)
