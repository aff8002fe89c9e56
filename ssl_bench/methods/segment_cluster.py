"""Segment, embed, cluster: the composed method behind ``segment-cluster``, ``datus2`` and ``dsm``.

1. Per image, the ``segmenter`` stage splits the patch grid into regions (``stages/regions.py``); the
   ``embed`` stage gives each valid region a vector. Neither depends on K, so the cells of a sweep that differ
   only in K compute them once (``ctx.reuse``, kept beside the cached features).
2. The ``clusterer`` stage groups the regions of the fit split into K clusters (K - 1 when the segmenter marks
   background: background is the K-th); a held-out split takes ``predict``. Painting the cluster ids back
   gives the ``initial`` pseudo masks: adjacent regions of one cluster merge, noise stays unlabelled.
3. Optionally Deep Spectral Methods' ``crf`` on the masks (stream ``crf``), then the de-noising network
   trained on the masks and run on every image (stream ``denoised``). ``final`` is the last of these.

``run(ctx)`` is the thin adapter the task files name; the stages are plain estimators (``ssl_bench.stages``).
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from ..errors import UserError
from ..registry import load_entrypoint
from ..stages import build, slot_params
from ..stages.denoise import DenoiserConfig, predict_denoiser, train_denoiser
from ..stages.embeddings import RegionImage
from ..stages.regions import BACKGROUND, NOISE, paint_split, summarize_segments, upsample_nearest

class LazyImages:
    """Sequence view of one split's protocol images (loaded on access)."""

    def __init__(self, ctx, split: str, n: int):
        self.ctx, self.split, self.n = ctx, split, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ctx.image(i, split=self.split)

    def __iter__(self):
        return (self[i] for i in range(self.n))


def segment_and_embed(segmenter, embedder, images, features: dict, n: int, progress=lambda it: it,
                      seconds: dict | None = None) -> dict:
    """Segment maps, per-image infos and region embeddings of ``n`` images.

    ``images[i]`` is image i at protocol resolution (only read when a stage uses images) and ``features`` maps
    each cached kind a stage reads to a sequence of (h, w, d) grids; ``segmenter.segment`` and
    ``embedder.embed`` are the stages (``ssl_bench.stages``). One pass: each image is segmented, then handed to
    the embedding, which may batch regions across images. ``seconds`` (optional) gains each stage's time."""
    seg_kinds = getattr(segmenter, "reads", ())
    embed_kinds = getattr(embedder, "reads", ())
    needs_image = getattr(segmenter, "uses_image", False) or getattr(embedder, "uses_image", False)
    maps, infos = [], []
    segmenting = 0.0

    def regions():
        nonlocal segmenting
        for i in progress(range(n)):
            image = images[i] if needs_image else None
            t0 = time.perf_counter()
            segments, info = segmenter.segment({kind: features[kind][i] for kind in seg_kinds}, image)
            segmenting += time.perf_counter() - t0
            maps.append(segments.astype(np.int16))  # small grids, many images: keep them compact
            infos.append(info)
            yield RegionImage(segments, image, {kind: features[kind][i] for kind in embed_kinds})

    t0 = time.perf_counter()
    vectors = embedder.embed(regions())
    if seconds is not None:  # the embedding pulls the segments: its time less theirs
        seconds["segment"] = seconds.get("segment", 0.0) + segmenting
        seconds["embed"] = seconds.get("embed", 0.0) + time.perf_counter() - t0 - segmenting
    return {"segments": maps, "infos": infos, "features": vectors}


def _regions_of_split(ctx, split: str) -> dict:
    """``segment_and_embed`` of one split, kept for the cells that differ only in K."""
    p, specs = ctx.params, ctx.stages
    embed_class = load_entrypoint(specs["embed"].entrypoint)
    identity = {slot: {"stage": p[slot], **slot_params(p, slot)} for slot in ("segmenter", "embed")}
    identity["embed"].update(embed_class.identity(ctx, **slot_params(p, "embed")))

    def compute():
        segmenter = build(specs["segmenter"], slot_params(p, "segmenter"), ctx)
        segmenter.reads = specs["segmenter"].features_for(slot_params(p, "segmenter"))
        embedder = build(specs["embed"], slot_params(p, "embed"), ctx)
        embedder.reads = specs["embed"].features_for(slot_params(p, "embed"))
        kinds = set(segmenter.reads) | set(embedder.reads)
        features = {kind: ctx.features(kind, split=split) for kind in kinds}
        if hasattr(segmenter, "fit"):  # a learned segmenter sees the split's features first
            with ctx.timed("segmenter training"):
                segmenter.fit({kind: features[kind] for kind in segmenter.reads})
        n = len(ctx.dataset_for(split))
        data = segment_and_embed(segmenter, embedder, LazyImages(ctx, split, n), features, n,
                                 lambda it: ctx.progress(it, desc=f"{ctx.params['segmenter']} segments [{split}]",
                                                         total=n, unit="images"), ctx.stage_seconds)
        data["sizes"] = [ctx.label_size(i, split) for i in range(n)]
        return data

    data = ctx.reuse(f"regions-{split}", identity, compute, split=split)
    return {**data, "identity": identity, "images": LazyImages(ctx, split, len(data["segments"]))}


def check_params(p: dict) -> None:
    """One-line errors for the composed task's own parameters (stages check theirs)."""
    DenoiserConfig.from_params(p["denoiser"])


def run(ctx):
    """The composed method on ctx.split (parameters: tasks/segment-cluster.yaml and the named instances).

    Streams: ``initial`` (clustered regions), ``crf`` and ``denoised`` when enabled, on the run's split and on
    ``fit_split`` when that is another split; ``final`` on the run's split is the last of them. Noise regions
    stay unlabelled (-1)."""
    from ..runner import Prediction, TaskResult

    p = ctx.params
    config = DenoiserConfig.from_params(p["denoiser"])
    fit_split = p["fit_split"] or ctx.split
    splits = [fit_split] + ([ctx.split] if ctx.split != fit_split else [])
    data = {s: _regions_of_split(ctx, s) for s in splits}

    background = any((seg == BACKGROUND).any() for d in data.values() for seg in d["segments"])
    clusters = ctx.k - 1 if background else ctx.k  # the segmenter's background is the K-th cluster
    regions = len(data[fit_split]["features"])
    if clusters < 1 or regions < clusters:
        raise UserError(f"K={ctx.k} clusters need at least {clusters} valid segments"
                        f"{' besides background' if background else ''}, split {fit_split!r} has {regions} -- "
                        f"lower --k, use more images, or let the segmenter keep more segments")
    clusterer = build(ctx.stages["clusterer"], slot_params(p, "clusterer"), ctx, k=clusters, seed=ctx.seed)
    with ctx.timed("cluster"):
        clusterer.fit(data[fit_split]["features"])
    for s, d in data.items():
        with ctx.timed("cluster"):
            labels = clusterer.labels_ if s == fit_split else clusterer.predict(d["features"])
        d["masks"] = paint_split(d["segments"], d["infos"], labels, background=clusters if background else NOISE)

    stats = _stats(data, ctx.split, fit_split, clusters, background)
    if p["crf"]:
        from ..crf import CRFPool, label_crf

        for d in data.values():  # at label resolution: the CRF sees the image's edges; images in parallel
            jobs = ((d["images"][i], upsample_nearest(m, size), ctx.k) for i, (m, size) in enumerate(
                ctx.progress(list(zip(d["masks"], d["sizes"])), desc="crf", total=len(d["masks"]), unit="images")))
            with ctx.timed("crf"):
                d["crf"] = [labels.astype(np.int16) for labels in CRFPool().map(label_crf, jobs)]
    model = None
    if p["denoise"]:
        fit = data[fit_split]
        masks = fit["crf"] if p["crf"] else fit["masks"]
        with ctx.timed("de-noiser training"):
            model, n_used = train_denoiser(  # K outputs: the clusters, and background when there is one
                fit["images"], masks, ctx.k, config, seed=ctx.seed, device=ctx.device,
                progress=lambda it: ctx.progress(it, desc=f"{ctx.params['segmenter']} de-noiser training",
                                                 total=len(it), unit="batches"),
            )
        stats["denoiser"] = asdict(config)  # the resolved preset, for the record
        stats["denoiser_train_masks"] = n_used
        stats["denoiser_dropped_masks"] = len(masks) - n_used

    def predictions():
        for s in splits:
            d = data[s]
            out_split = None if s == ctx.split else s
            denoised = predict_denoiser(model, d["images"], config, ctx.device) if model else None
            for i, (mask, size) in enumerate(zip(d["masks"], d["sizes"])):
                final = upsample_nearest(mask, size)
                yield Prediction(i, final, stream="initial", split=out_split)
                if "crf" in d:
                    final = d["crf"][i].astype(np.int64)
                    yield Prediction(i, final, stream="crf", split=out_split)
                if denoised is not None:
                    final = next(denoised)
                    yield Prediction(i, final, stream="denoised", split=out_split)
                if out_split is None:
                    yield Prediction(i, final, stream="final")

    return TaskResult(predictions=predictions(), stats=stats)


def _stats(data: dict, split: str, fit_split: str, clusters: int, background: bool) -> dict:
    infos = data[split]["infos"]
    stats = {
        "segments": summarize_segments(infos),
        "clustered_segments": int(len(data[fit_split]["features"])),
        "clusters": clusters,
        "background_cluster": background,
    }
    if infos and "n_communities" in infos[0]:  # Louvain: communities before the split into connected parts
        stats["communities_per_image"] = sum(i["n_communities"] for i in infos) / len(infos)
    model = data[split]["identity"]["embed"].get("crop_model")
    if model:
        stats["crop_backbone"] = model["backbone"]
    if fit_split != split:
        stats["fit_split"] = fit_split
        stats["segments@" + fit_split] = summarize_segments(data[fit_split]["infos"])
    return stats


# benchmark (`ssl-bench bench datus2`)


def benchmark(pipeline_images: int = 16, k: int = 11, seed: int = 0) -> dict:
    """The whole DatUS^2 pipeline's s/image on CamVid val with a random dino-vits16 (segment discovery,
    crops, their CLS, k-means; de-noising timed separately); discovery alone is `ssl-bench bench louvain`."""
    import time

    from ..features import benchmark_inputs
    from ..models import build_backbone, resolve
    from ..registry import backbone as backbone_spec
    from ..stages.clusterers.kmeans import KMeans
    from ..stages.denoise import DENOISER_PRESETS
    from ..stages.embeddings import CropEmbedding, segment_crop
    from ..stages.segmenters.louvain import discover_segments

    out: dict = {"discovery": "see `ssl-bench bench louvain` (results/bench/louvain.json)"}
    # The pipeline on real images: keys of a random-weight ViT (same cost as pretrained ones).
    images, feats, source = benchmark_inputs("dino-vits16", pipeline_images, kinds=("key",))
    spec = backbone_spec("dino-vits16")
    vit = build_backbone(spec, resolve(spec, "random"), 0)
    embedder = CropEmbedding(vit, spec.input_size)
    embedder._forward([images[0][: spec.input_size, : spec.input_size]] * 2)  # warm-up
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
            crop_feats.append(embedder._forward(crops))
        t3 = time.perf_counter()
        timings["discovery"] += t1 - t0
        timings["crops"] += t2 - t1
        timings["cls"] += t3 - t2
        seg_maps.append(seg)
        infos.append(info)
    t0 = time.perf_counter()
    labels = KMeans(k, seed).fit(np.concatenate(crop_feats)).labels_
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
