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
3. ``PrimapsEM`` (``primaps_em.py``, the estimator): prototypes initialised by PCA, pre-trained with the
   cosine batch k-means loss (Eq. 9), then EM: the EMA teacher labels each proposal with its majority class
   (E), the student is fitted to those pseudo labels with a confidence-weighted focal loss (M). Inference uses
   the teacher (+ CRF).

Rows of the paper's tables on the same features (``primaps_em.py`` too): ``PrototypeBaseline`` (Eq. 9 only),
``LinearProbe`` (supervised upper bound) and ``oracle_pseudo_labels`` (each proposal gets its best ground-truth
class). This module is the task adapter (modes em, baseline, linear-probe, oracle) and its benchmark.

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
from typing import Callable, Iterator

import numpy as np
import torch

from ..crf import check_available as check_crf_available
from ..metrics import with_class_id_scores
from ..ops import upsample_argmax
from .feature_source import ProjectedFeatures, parse_features_from, trained_projection
from ..registry import is_number, is_whole
from .primaps_em import (LinearProbe, PrimapsEM, PrototypeBaseline, PrototypeHead, em_step, oracle_pseudo_labels,
                         pca_prototypes, photometric_augment, resize_label_map)
from .primaps_proposals import (ANCHORS, PRINCIPAL, principal_mask_proposals, proposal_soft_masks,  # noqa: F401
                                proposals_to_image)


# ----------------------------------------------------------------------------------------------------------
# Task adapter
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
    stream = CRFPool(workers).map(image_proposals, (job(i) for i in range(first, n)))
    yield from enumerate(stream, start=first)


def run(ctx):
    """Task adapter (parameters: tasks/primaps-em.yaml). mode: em | baseline | linear-probe | oracle."""
    from ..runner import Prediction, TaskResult

    p = ctx.params  # resolved and checked by the registry (check_params is the task file's validate hook)
    mode = p["mode"]
    with_proposals = {"proposal_crf": "-p proposal_crf=false"} if mode in ("em", "oracle") else {}
    check_crf_available(p, {**with_proposals, "crf": "--no-crf"})  # before any work, not after the training
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
            augmented = _projected_views(augmented, head)
        model = PrimapsEM(ctx.k, p["pretrain_epochs"], p["epochs"], p["max_steps"], p["batch_size"], p["lr"],
                          p["ema"], p["ema_every"], p["ema_decay"], p["augment"] != "none",
                          p["focal_gamma"], p["pca_images"], augmented, ctx.progress, ctx.device)
        with ctx.timed("training"):
            model.fit(fit_input, proposals, ctx.seed, None if head is None else head.clusters)
        hist = model.history
        stats.update(steps=model.steps, teacher_updates=model.teacher_updates if p["ema"] else None,
                     final_loss=hist["loss"][-1] if hist["loss"] else None,
                     pseudo_fraction=float(np.mean(hist["pseudo_fraction"])) if hist["loss"] else None,
                     augmentation=p["augment"], train_resolution=p["train_resolution"])

    def predictions():
        if not p["crf"]:
            for i in range(len(evaluated)):  # the runner shows progress while it consumes predictions
                with ctx.timed("predict"):
                    labels = upsample_argmax(model.predict_scores(evaluated_input[i]), ctx.label_size(i))
                yield Prediction(index=i, labels=labels, stream="final")
            return
        from ..crf import CRFPool, refine_scores

        # pulled by the pool as it streams: making a job is timed as "predict", the waits for labels as "crf"
        jobs = ctx.timed_stream("predict", ((ctx.image(i), model.predict_scores(evaluated_input[i]),
                                             ctx.label_size(i)) for i in range(len(evaluated))))
        for i, (plain, refined) in enumerate(ctx.timed_stream("crf", CRFPool().map(refine_scores, jobs))):
            yield Prediction(index=i, labels=plain, stream="nocrf")
            yield Prediction(index=i, labels=refined, stream="final")

    if mode == "linear-probe":
        return TaskResult(predictions=with_class_id_scores(predictions(), ctx, stats), stats=stats)
    return TaskResult(predictions=predictions(), stats=stats)


def _projected_views(augmented: Callable, head) -> Callable:
    return lambda idx, rng: [head.code_map(f) for f in augmented(idx, rng)]


def _image_augmenter(ctx, fit, split, chunk: int = 8) -> Callable:
    """Student features from backbone passes on photometrically augmented images (the paper's setting). The
    images are augmented on the run's device and their features stay there: a GPU run moves each decoded image
    there once and nothing back (the draws come from the CPU's ``rng``, the same on every device)."""
    backbone = ctx.backbone

    def augmented_features(idx, rng):
        images = [photometric_augment(torch.tensor(np.asarray(ctx.image(i, split)), device=ctx.device), rng)
                  for i in idx]
        feats: list = [None] * len(idx)
        by_shape: dict = {}  # images of a split may differ in size: one forward pass per shape and chunk
        for j, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape), []).append(j)
        for members in by_shape.values():
            for start in range(0, len(members), chunk):
                part = members[start:start + chunk]
                x = backbone.normalize(torch.stack([images[j] for j in part]))
                with torch.inference_mode(), ctx.protocol.autocast(x.device):  # as the cached features were made
                    out = backbone.extract(x, {"patch"})
                for j, f in zip(part, out["patch"].float().clone()):  # a clone outside inference mode: trainable input
                    feats[j] = f
        for f, i in zip(feats, idx):
            if tuple(f.shape[:2]) != tuple(fit.grid(i)):
                raise ValueError(f"augmented features {tuple(f.shape[:2])} do not match the cached grid {fit.grid(i)}")
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
    pooled = list(CRFPool(workers).map(image_proposals, jobs))
    pooled_s = time.perf_counter() - t0
    with CRFPool(workers) as pool:  # started, and each worker past its first job, before the clock
        list(pool.map(image_proposals, jobs[:workers]))
        t0 = time.perf_counter()
        warm = list(pool.map(image_proposals, jobs))
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
