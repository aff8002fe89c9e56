"""Composable stages of the segment-then-cluster methods (DatUS^2, Deep Spectral Methods, ACSeg, COMUS ...).

Each stage is registered by one file in ``stages/<kind>/NAME.yaml`` (parameters, the features it reads)
naming a class here; a composed task (``tasks/segment-cluster.yaml``, ``tasks/datus2.yaml``, ...) picks one
stage per slot. The classes are small estimators with plain arrays in and out:

- **segmenter** (``segmenters/``): ``segment(features, image) -> (segment map, info)`` for one image, where
  ``features`` maps each kind the stage reads to its (h, w, d) grid and the map follows ``regions``
  (ids 0..V-1, -1 noise, -2 background); a map may be finer than the patch grid (ACSeg's is at the image's
  resolution, a saliency mask too). A learned segmenter has ``fit(features) -> fitted`` (``features`` maps each
  kind to the fit split's sequence of grids; ``fitted`` is a dict of arrays and JSON values, its ``stats`` entry
  reported with the run) and ``load(fitted)``: the engine trains it once and keeps ``fitted``. ``uses_image``
  says whether ``segment`` needs the image. Optional, for segmenters that read per-image inputs of their own
  (saliency masks in files): ``uses_index`` (``segment`` also gets ``index=i``, the image's position in the
  split), ``prepare(ctx, split)`` (called once per split before segmenting) and ``identity(ctx, **params)`` (as
  for embeddings: what the maps depend on beyond the parameters, e.g. the files' listing or the detector's
  weights).
- **filter** (``filters.py``, optional slot): ``filter(segment map, info, features) -> (segment map, info)``
  marks some regions background (``regions.mark_background``), e.g. ACSeg's attention foreground detection.
- **embedding** (``embeddings.py``, ``maskclip.py``): ``embed(regions) -> (N, d)`` over an iterable of ``RegionImage`` (one per
  image, in order; N = their valid segments): crops through a backbone, mean patch features, ...
  ``identity(ctx, **params)`` names what the vectors depend on beyond the parameters (the crop model).
- **clusterer** (``clusterers/``): ``fit(x) -> self`` on region embeddings (N, d) with ``labels_``, and
  ``predict(x)`` for regions of a held-out split; ``uncertainty_`` (optional) scores how far each region lies
  from its cluster (COMUS's filtering). ``names_classes``: its labels are the dataset's class ids (K = C);
  ``uses_labels``: ``fit(x, y)`` with each fit region's ground-truth class (a labelled probe).

A class is built by ``build(spec, params, ctx)``: its ``from_context(ctx, **params)`` classmethod when it
needs the run (a backbone to embed crops with, the seed), else ``cls(**params)``.
"""

from __future__ import annotations

from typing import Any

from ..registry import StageSpec, load_entrypoint


def build(spec: StageSpec, params: dict, ctx: Any = None, **extra) -> Any:
    """An instance of the stage ``spec`` with its resolved ``params`` (plus ``extra`` keyword arguments, e.g.
    a clusterer's ``k`` and ``seed``), built from the run's context when the class asks for it."""
    cls = load_entrypoint(spec.entrypoint)
    kwargs = {**params, **extra}
    if ctx is not None and hasattr(cls, "from_context"):
        return cls.from_context(ctx, **kwargs)
    return cls(**kwargs)
