"""Segment, embed, cluster: the composed method behind ``segment-cluster``, ``datus2``, ``dsm``, ``acseg`` and
``comus``.

1. Per image, the ``segmenter`` stage splits the image into regions (``stages/regions.py``), and an optional
   ``filter`` stage calls some of them background (ACSeg's foreground detection); the ``embed`` stage gives
   each remaining region a vector. None of this depends on K: the segments are kept (``ctx.reuse``, beside the
   cached features) for every cell with the same segmenter and filter, the embeddings for every cell with the
   same embedding too (``segment_embed.py``). A learned segmenter (one with ``fit``, ACSeg's concept generator)
   is trained once on the fit split's features and its weights kept the same way.
2. The ``clusterer`` stage groups the regions of the fit split into K clusters (K - 1 when background is
   marked: background is the K-th); a held-out split takes ``predict``. A clusterer that names the dataset's
   classes (``names_classes``: the labelled k-NN probe, the argmax of MaskCLIP votes) gives class ids, K = C,
   and paints background with the dataset's background class; one that ``uses_labels`` is fitted on the fit
   split's regions with their ground-truth classes (a LABELLED probe, said in the run's stats). Painting the
   labels back gives the ``initial`` pseudo masks: adjacent regions of one cluster merge, noise stays unlabelled.
3. Optionally (``filter_percent``) the regions of each cluster farthest from its centre (the clusterer's
   ``uncertainty_``) are left unlabelled: stream ``filtered`` (COMUS's Step 4).
4. Optionally Deep Spectral Methods' ``crf`` on the masks (stream ``crf``), then the de-noising network
   trained on the masks of the images that kept a clustered region and run on every image (stream
   ``denoised``), ``denoise_iterations`` - 1 times more on its own predictions (``denoised-2`` ...; COMUS's
   iterative self-training). ``final`` is the last of these. ``streams`` renames them (COMUS: proposals,
   pseudo, self-trained).

``run(ctx)`` is the thin adapter the task files name; the stages are plain estimators (``ssl_bench.stages``).
"""

from __future__ import annotations

import functools
from dataclasses import asdict

import numpy as np

from ..crf import check_available as check_crf_available
from ..errors import UserError
from ..metrics import with_class_id_scores
from ..registry import load_entrypoint
from ..registry import slot_params
from ..stages import build
from ..stages.clusterers import filter_uncertain
from ..stages.denoise import DenoiserConfig, predict_denoiser, self_train, setting_of, train_denoiser
from ..stages.regions import BACKGROUND, NOISE, paint_split, summarize_segments, upsample_nearest
from .segment_embed import fitted_segmenter, region_classes, regions_of_split

STREAMS = ("initial", "filtered", "crf", "denoised")  # the engine's streams, in order; ``streams`` renames them
# Steps a task file turns on by declaring their parameter (absent: these values, so the configurations, hence the
# stored results, of the task files that predate them stay as they were).
OPTIONAL_PARAMS = {"filter_percent": 0.0, "denoise_iterations": 1, "streams": {}}


def weights_needed(params: dict) -> list[str]:
    """Weights a run with these (resolved) parameters reads besides its backbone and stages: the de-noiser's
    encoder (COMUS's DINO ResNet-50), which ``reproduce --plan`` lists with the backbones."""
    if not params.get("denoise"):
        return []
    encoder = DenoiserConfig.from_params(params.get("denoiser")).encoder
    return [encoder] if encoder else []


def optional(p: dict, key: str):
    return p.get(key, OPTIONAL_PARAMS[key])


def check_params(p: dict) -> None:
    """One-line errors for the composed task's own parameters (stages check theirs)."""
    DenoiserConfig.from_params(p["denoiser"])
    if not 0 <= optional(p, "filter_percent") < 100:
        raise UserError(f"filter_percent={p['filter_percent']!r} -- drop 0 <= p < 100 % of each cluster "
                        f"(-p filter_percent=20)")
    if optional(p, "denoise_iterations") < 1:
        raise UserError(f"denoise_iterations={p['denoise_iterations']!r} -- train the de-noiser 1 or more times "
                        f"(-p denoise=false for none)")
    names = optional(p, "streams")
    ok = isinstance(names, dict) and set(names) <= set(STREAMS) and all(
        isinstance(v, str) and v and "@" not in v and v != "final" and v not in STREAMS for v in names.values())
    if not ok or len(set(names.values())) < len(names):
        raise UserError(f"streams={names!r} -- rename some of {', '.join(STREAMS)} to distinct new names "
                        f"(not final, no '@'), e.g. {{initial: proposals}}")


def run(ctx):
    """The composed method on ctx.split (parameters: tasks/segment-cluster.yaml and the named instances).

    Streams: ``initial`` (clustered regions), ``filtered``, ``crf`` and ``denoised`` (``denoised-2`` ...) when
    enabled, on the run's split and on ``fit_split`` when that is another split (``filtered`` on the fit split
    only); ``final`` on the run's split is the last of them. Noise regions stay unlabelled (-1)."""
    from ..runner import Prediction, TaskResult

    p = ctx.params
    check_crf_available(p)  # before segmenting, clustering and self-training, not after them
    config = DenoiserConfig.from_params(p["denoiser"])
    name = {**{s: s for s in STREAMS}, **optional(p, "streams")}
    fit_split = p["fit_split"] or ctx.split
    splits = [fit_split] + ([ctx.split] if ctx.split != fit_split else [])
    segmenter = functools.cache(lambda: fitted_segmenter(ctx, fit_split))
    data = {s: regions_of_split(ctx, s, fit_split, segmenter) for s in splits}

    background = any((seg == BACKGROUND).any() for d in data.values() for seg in d["segments"])
    clusterer_class = load_entrypoint(ctx.stages["clusterer"].entrypoint)
    names_classes = getattr(clusterer_class, "names_classes", False)
    if names_classes:  # labels are the dataset's classes; background regions get its background class
        clusters, painted_background = _named_classes(ctx)
    else:
        clusters = ctx.k - 1 if background else ctx.k  # the segmenter's background is the K-th cluster
        painted_background = clusters if background else NOISE
        regions = len(data[fit_split]["features"])
        if clusters < 1 or regions < clusters:
            raise UserError(f"K={ctx.k} clusters need at least {clusters} valid segments"
                            f"{' besides background' if background else ''}, split {fit_split!r} has {regions} -- "
                            f"lower --k, use more images, or let the segmenter keep more segments")
    clusterer = build(ctx.stages["clusterer"], slot_params(p, "clusterer"), ctx, k=clusters, seed=ctx.seed)
    with ctx.timed("cluster"):
        if getattr(clusterer, "uses_labels", False):  # a labelled probe: the fit split's regions carry ground truth
            clusterer.fit(data[fit_split]["features"], region_classes(ctx, fit_split, data[fit_split]))
        else:
            clusterer.fit(data[fit_split]["features"])
    for s, d in data.items():
        with ctx.timed("cluster"):
            d["labels"] = clusterer.labels_ if s == fit_split else clusterer.predict(d["features"])
        d["masks"] = paint_split(d["segments"], d["infos"], d["labels"], background=painted_background)
    fit = data[fit_split]
    kept = _filter(clusterer, p, fit)
    if kept is not None:
        fit["filtered"] = paint_split(fit["segments"], fit["infos"], np.where(kept, fit["labels"], NOISE),
                                      background=painted_background)

    stats = _stats(data, ctx.split, fit_split, clusters, background)
    if getattr(clusterer, "fit_stats_", None):  # a trained clusterer's record: steps, when it stopped, paper or not
        stats["clusterer_fit"] = clusterer.fit_stats_
    if kept is not None:
        stats.update(filter_percent=optional(p, "filter_percent"), filtered_regions=int((~kept).sum()))
    if p["crf"]:
        from ..crf import CRFPool, label_crf

        with CRFPool() as pool:  # one set of workers for every split
            for d in data.values():  # at label resolution: the CRF sees the image's edges; images in parallel
                masks = d.get("filtered", d["masks"])
                jobs = ((d["images"][i], upsample_nearest(m, size), ctx.k) for i, (m, size) in enumerate(
                    ctx.progress(list(zip(masks, d["sizes"])), desc="crf", total=len(masks), unit="images")))
                with ctx.timed("crf"):
                    d["crf"] = [labels.astype(np.int16) for labels in pool.map(label_crf, jobs)]
    models = _self_train(ctx, config, fit, kept, stats) if p["denoise"] else []

    def predictions():
        for s in splits:
            d = data[s]
            out_split = None if s == ctx.split else s
            denoised = [predict_denoiser(model, d["images"], config, ctx.device) for model in models]
            for i, (mask, size) in enumerate(zip(d["masks"], d["sizes"])):
                final = upsample_nearest(mask, size)
                yield Prediction(i, final, stream=name["initial"], split=out_split)
                if "filtered" in d:
                    final = upsample_nearest(d["filtered"][i], size)
                    yield Prediction(i, final, stream=name["filtered"], split=out_split)
                if "crf" in d:
                    final = d["crf"][i].astype(np.int64)
                    yield Prediction(i, final, stream=name["crf"], split=out_split)
                for iteration, stream in enumerate(denoised, 1):
                    final = next(stream)
                    yield Prediction(i, final, stream=name["denoised"] + (f"-{iteration}" if iteration > 1 else ""),
                                     split=out_split)
                if out_split is None:
                    yield Prediction(i, final, stream="final")

    if getattr(clusterer, "uses_labels", False):
        stats["labelled_probe"] = (f"LABELLED: regions classified from the ground-truth classes of split "
                                   f"{fit_split!r}'s regions" + (" (leave-one-out)" if fit_split == ctx.split else ""))
    if names_classes:  # scored as class ids too, without the runner's cluster-to-class matching
        return TaskResult(predictions=with_class_id_scores(predictions(), ctx, stats), stats=stats)
    return TaskResult(predictions=predictions(), stats=stats)


def _named_classes(ctx) -> tuple[int, int]:
    """(classes, background label) of a clusterer that names the dataset's classes: K must be C."""
    c = ctx.dataset.num_classes
    if ctx.k != c:
        raise UserError(f"clusterer={ctx.params['clusterer']} names the dataset's {c} classes: K must be {c}, got "
                        f"{ctx.k} -- drop --k (K = C)")
    background = getattr(ctx.dataset, "background_class", None)
    return c, NOISE if background is None else background
def _filter(clusterer, p: dict, fit: dict) -> np.ndarray | None:
    """Which clustered regions of the fit split to keep, or None without filtering."""
    if not optional(p, "filter_percent"):
        return None
    if getattr(clusterer, "uncertainty_", None) is None:
        raise UserError(f"clusterer {p['clusterer']!r} gives no distance to its clusters to filter by -- use "
                        f"-p filter_percent=0, or a clusterer that does (spectral, kmeans)")
    return filter_uncertain(fit["labels"], clusterer.uncertainty_, optional(p, "filter_percent"))


def _self_train(ctx, config: DenoiserConfig, fit: dict, kept: np.ndarray | None, stats: dict) -> list:
    """The de-noiser's rounds on the fit split: the first trained on the pseudo masks of the images that kept a
    clustered region (an image whose regions were all filtered, or that has none, teaches nothing of them)."""
    p = ctx.params
    masks = fit["crf"] if p["crf"] else fit.get("filtered", fit["masks"])
    bounds = np.cumsum([0] + [info["n_valid"] for info in fit["infos"]])
    kept = np.ones(bounds[-1], dtype=bool) if kept is None else kept
    train_on = [i for i in range(len(masks)) if kept[bounds[i]:bounds[i + 1]].any()]
    if not train_on:
        raise UserError("no image kept a clustered region to train the de-noiser on -- lower filter_percent")
    encoder = None
    if config.encoder:  # the de-noiser's encoder starts from this backbone (random when the run's weights are)
        encoder = ctx.build_backbone(config.encoder).model.state_dict()
        stats["denoiser_encoder"] = ctx.backbone_identity(config.encoder)
    iterations = optional(p, "denoise_iterations")
    with ctx.timed("de-noiser training"):
        rounds = self_train(  # K outputs: the clusters, and background when there is one
            fit["images"], masks, train_on, ctx.k, config, iterations, seed=ctx.seed, device=ctx.device,
            progress=lambda r: lambda it: ctx.progress(it, desc=f"{p['segmenter']} de-noiser training"
                                                       + (f" (round {r}/{iterations})" if iterations > 1 else ""),
                                                       total=len(it), unit="batches"),
            encoder_state=encoder)
    used = [n for _, n in rounds]
    preset = config.describe()
    stats.update(denoiser=asdict(config), denoiser_preset=preset, denoiser_setting=setting_of(preset),
                 denoiser_iterations=iterations, denoiser_train_masks=used[0],
                 denoiser_dropped_masks=len(masks) - used[0])
    if iterations > 1:
        stats["denoiser_train_masks_per_iteration"] = used
    return [model for model, _ in rounds]


def _stats(data: dict, split: str, fit_split: str, clusters: int, background: bool) -> dict:
    infos = data[split]["infos"]
    stats = {
        "segments": summarize_segments(data[split].get("segmenter_infos", infos)),  # the segmenter's own regions
        "clustered_segments": int(len(data[fit_split]["features"])),
        "clusters": clusters,
        "background_cluster": background,
    }
    if infos and "n_communities" in infos[0]:  # Louvain: communities before the split into connected parts
        stats["communities_per_image"] = sum(i["n_communities"] for i in infos) / len(infos)
    model = data[split]["identity"]["embed"].get("crop_model")
    if model:
        stats["crop_backbone"] = model["backbone"]
    if "segmenter_infos" in data[split]:  # a region filter ran: what it kept
        stats["segments_after_filter"] = summarize_segments(infos)
    if data[fit_split].get("segmenter_fit"):
        stats["segmenter_fit"] = data[fit_split]["segmenter_fit"]
    if fit_split != split:
        stats["fit_split"] = fit_split
        stats["segments@" + fit_split] = summarize_segments(data[fit_split].get("segmenter_infos",
                                                                                data[fit_split]["infos"]))
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
