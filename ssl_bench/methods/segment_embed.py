"""Stage 1 of the composed method (``segment_cluster.py``): per split, the segment maps (the segmenter's, then
an optional region filter's) and the region embeddings, each kept by ``ctx.reuse`` so that the cells of a sweep
that differ only in K, the clusterer or the embedding compute them once; a learned segmenter is trained once on
the fit split and its weights kept the same way.
"""

from __future__ import annotations

import numpy as np

from ..registry import load_entrypoint
from ..registry import slot_params
from ..stages import build
from ..stages.embeddings import RegionImage
from ..stages.regions import majority_labels


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


SEGMENT_SLOTS = ("segmenter", "filter")  # the stages whose output is the segment maps (a filter is optional)


def segment_split(segmenter, region_filter, images, features: dict, n: int, progress=lambda it: it) -> dict:
    """Segment maps and per-image infos of ``n`` images: the segmenter's, then the region filter's (None: no
    filter), which marks some regions background.

    ``images[i]`` is image i at protocol resolution (read only when the segmenter uses images) and ``features``
    maps each cached kind a stage reads to a sequence of (h, w, d) grids (``ssl_bench.stages``). With a filter,
    ``segmenter_infos`` keeps the segmenter's own infos (its segment statistics)."""
    maps, infos, own = [], [], []
    by_index = getattr(segmenter, "uses_index", False)  # e.g. masks read from files named after the image
    for i in progress(range(n)):
        image = images[i] if getattr(segmenter, "uses_image", False) else None
        seg_features = {kind: features[kind][i] for kind in segmenter.reads}
        segments, info = (segmenter.segment(seg_features, image, index=i) if by_index
                          else segmenter.segment(seg_features, image))
        if region_filter is not None:
            own.append(info)
            segments, info = region_filter.filter(segments, info, {k: features[k][i] for k in region_filter.reads})
        maps.append(_compact(segments))  # many images: keep them small
        infos.append(info)
    return {"segments": maps, "infos": infos, **({"segmenter_infos": own} if region_filter is not None else {})}


def embed_split(embedder, segments, images, features: dict, progress=lambda it: it) -> np.ndarray:
    """Region embeddings (N, d) of a split's segment maps (the valid segments of each image, in order); the
    embedding stage may batch regions across images."""
    def regions():
        for i, segment_map in enumerate(progress(segments)):
            yield RegionImage(segment_map, images[i] if embedder.uses_image else None,
                              {kind: features[kind][i] for kind in embedder.reads})

    return embedder.embed(regions())


def _compact(segments: np.ndarray) -> np.ndarray:
    """A segment map in int8 when its ids fit (maps at image resolution are large), else int16."""
    small = segments.size == 0 or (segments.min() >= -128 and segments.max() < 128)
    return segments.astype(np.int8 if small else np.int16)


def _stage(ctx, slot: str):
    """The stage in ``slot`` built for this run, with the cached kinds it reads (``reads``)."""
    spec, params = ctx.stages[slot], slot_params(ctx.params, slot)
    stage = build(spec, params, ctx)
    stage.reads = spec.features_for(params)
    return stage


def _is_learned(spec) -> bool:
    return hasattr(load_entrypoint(spec.entrypoint), "fit")


def fitted_segmenter(ctx, fit_split: str):
    """The run's segmenter; a learned one (with ``fit``) is trained once on the fit split's features and its
    weights (a dict of arrays) kept by ``reuse``, so every split it segments, and every cell that shares it (other
    K, embeddings, clusterers), uses the same training."""
    segmenter = _stage(ctx, "segmenter")
    if hasattr(segmenter, "fit"):
        identity = {"segmenter": {"stage": ctx.params["segmenter"], **slot_params(ctx.params, "segmenter")}}

        def train():
            with ctx.timed("segmenter training"):
                return segmenter.fit({kind: ctx.features(kind, split=fit_split) for kind in segmenter.reads})

        fitted = ctx.reuse("segmenter-fit", identity, train, split=fit_split, slots=("segmenter",))
        segmenter.load(fitted)
        segmenter.fit_stats = fitted.get("stats")
    return segmenter


def regions_of_split(ctx, split: str, fit_split: str, segmenter) -> dict:
    """Segments (kept per segmenter and filter) and region embeddings (kept per segmenter, filter and embedding)
    of one split: the cells that differ only in K or in the clusterer reuse both, those that differ in the
    embedding reuse the segments. ``segmenter()`` builds the fitted segmenter when segments must be computed."""
    p, specs = ctx.params, ctx.stages
    n = len(ctx.dataset_for(split))
    images = LazyImages(ctx, split, n)
    progress = lambda desc: lambda it: ctx.progress(it, desc=f"{p['segmenter']} {desc} [{split}]", total=n,  # noqa: E731
                                                    unit="images")
    identity = {slot: {"stage": p[slot], **slot_params(p, slot)} for slot in SEGMENT_SLOTS if slot in specs}
    segmenter_class = load_entrypoint(specs["segmenter"].entrypoint)
    if hasattr(segmenter_class, "identity"):  # what its maps depend on beyond the parameters (files, weights)
        identity["segmenter"].update(segmenter_class.identity(ctx, **slot_params(p, "segmenter")))
    if _is_learned(specs["segmenter"]):
        identity["segmenter"]["fitted_on"] = fit_split

    def segments():
        region_filter = _stage(ctx, "filter") if "filter" in specs else None
        seg = segmenter()
        if hasattr(seg, "prepare"):  # a segmenter that reads per-image files learns the split's images
            seg.prepare(ctx, split)
        kinds = set(seg.reads) | set(region_filter.reads if region_filter else ())
        features = {kind: ctx.features(kind, split=split) for kind in kinds}
        with ctx.timed("segment"):  # the filter's time included
            data = segment_split(seg, region_filter, images, features, n, progress("segments"))
        data["sizes"] = [ctx.label_size(i, split) for i in range(n)]
        data["segmenter_fit"] = getattr(seg, "fit_stats", None)
        return data

    data = ctx.reuse(f"segments-{split}", identity, segments, split=split, slots=SEGMENT_SLOTS)
    embed_class = load_entrypoint(specs["embed"].entrypoint)
    identity = {**identity, "embed": {"stage": p["embed"], **slot_params(p, "embed"),
                                      **embed_class.identity(ctx, **slot_params(p, "embed"))}}

    def embeddings():
        embedder = _stage(ctx, "embed")
        features = {kind: ctx.features(kind, split=split) for kind in embedder.reads}
        with ctx.timed("embed"):
            return {"features": embed_split(embedder, data["segments"], images, features, progress("regions"))}

    vectors = ctx.reuse(f"regions-{split}", identity, embeddings, split=split, slots=(*SEGMENT_SLOTS, "embed"))
    return {**data, **vectors, "identity": identity, "images": images}


def region_classes(ctx, split: str, data: dict) -> np.ndarray:
    """Ground-truth class of every valid region of a split (the class with most of its labelled pixels; -1 none):
    what a labelled classifier learns from. Reads the split's ground truth."""
    c = ctx.dataset.num_classes
    return np.concatenate([majority_labels(seg, ctx.label(i, split), c) for i, seg in enumerate(data["segments"])]
                          or [np.zeros(0, np.int64)])
