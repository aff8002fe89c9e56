"""``ssl-bench bench comus``: what COMUS's proposals and its clustering cost.

Per image, each saliency source's proposal (segment map) from what the feature cache holds (keys and CLS
attention of a random-weight ViT: the same cost as pretrained), the files source's PNG reading, and BASNet
(random weights, same cost) on the protocol image; beside them, the crop-CLS embedding of each proposal.
Then the spectral clustering of ``proposals`` region embeddings with COMUS's Table 9 settings, and the
filtering of the 20% most uncertain per cluster, with k-means (Table 5's alternative) for comparison.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def _best_of(repeats: int, call) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def _dataset():
    """The VOC samples of ../shared/data (COMUS's dataset), else the synthetic set."""
    from ..data import open_dataset
    from ..data.shared import shared_data_dir

    shared = shared_data_dir()
    if shared is not None and (shared / "voc2012").is_dir():
        return open_dataset("voc2012", shared / "voc2012", "val")
    return open_dataset("synthetic", None, "val")


def benchmark(backbone: str = "dino-vits8", images: int = 8, proposals: int = 10_000, dim: int = 384, k: int = 20,
              filter_percent: float = 20.0, threads: int = 1, repeats: int = 3) -> dict:
    """Seconds per image of each saliency source on ``images`` VOC samples (``backbone`` with random weights, the
    protocol's 320 px; best of ``repeats``), and the spectral clustering + filtering of ``proposals`` proposals
    of ``dim`` dimensions into ``k`` clusters (Table 9: 30 neighbours, k eigenvectors), one thread."""
    from PIL import Image

    from .. import registry
    from ..data.protocol import Protocol
    from ..features import features_of
    from ..models import build_backbone, resolve
    from ..ops import set_threads
    from ..stages.clusterers import filter_uncertain
    from ..stages.clusterers.benchmark import region_embeddings
    from ..stages.clusterers.kmeans import KMeans
    from ..stages.clusterers.spectral import Spectral
    from ..stages.embeddings import CropEmbedding, RegionImage
    from ..stages.segmenters import basnet, saliency

    set_threads(threads)
    spec = registry.backbone(backbone)
    model = build_backbone(spec, resolve(spec, "random"), 0)
    dataset = _dataset()
    protocol = Protocol().for_patch_size(spec.patch_size)
    pictures, feats = features_of(model, dataset, protocol, ("key", "attn"), images)
    n = len(pictures)
    patch = spec.patch_size
    out: dict = {"inputs": f"{dataset.name}/{dataset.split} ({backbone}, random weights)", "images": n,
                 "grid": list(feats[0]["key"].shape[:2]), "image_size": list(pictures[0].shape[:2]), "threads": threads,
                 "s_per_image": {}}

    with tempfile.TemporaryDirectory() as folder:  # masks at the images' own size, as a detector writes them
        for i in range(n):
            w, h = dataset.image_size(i)
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
            Image.fromarray(mask).save(Path(folder) / f"{dataset.ids[i]}.png")
        files = saliency.FilesSaliency(dir=folder, patch_size=patch)
        files.prepare(SimpleNamespace(dataset_for=lambda split: dataset, protocol=protocol), dataset.split)
        sources = {
            "attention": saliency.AttentionSaliency(patch_size=patch),
            "ncut": saliency.NcutSaliency(patch_size=patch),
            "files": files,
            "basnet": basnet.BasnetSaliency(basnet.load_basnet(None), patch_size=patch),
        }
        maps = {}
        for name, source in sources.items():
            source.segment(feats[0], pictures[0], index=0)  # warm-up: imports, first-call set-up

            def segment_all(source=source, name=name):
                maps[name] = [source.segment(f, p, index=i) for i, (f, p) in enumerate(zip(feats, pictures))]

            out["s_per_image"][name] = _best_of(repeats, segment_all) / n
    out["proposals_per_image"] = {name: float(np.mean([info["n_valid"] for _, info in found]))
                                  for name, found in maps.items()}

    embedder = CropEmbedding(model, 256, mask=False)  # COMUS's proposal feature: box, 256 x 256, CLS
    regions = [RegionImage(segments, picture) for (segments, _), picture in zip(maps["files"], pictures)]
    embedder.embed(regions[:1])
    out["crop_cls_s_per_proposal"] = _best_of(repeats, lambda: embedder.embed(regions)) / len(regions)

    x = region_embeddings(proposals, dim, k)
    rows = []
    for name, make in (("spectral", lambda: Spectral(k)), ("kmeans", lambda: KMeans(k, normalize=False, n_init=10))):
        t0 = time.perf_counter()
        fitted = make().fit(x)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        keep = filter_uncertain(fitted.labels_, fitted.uncertainty_, filter_percent)
        filter_s = time.perf_counter() - t0
        rows.append({"clusterer": name, "fit_s": fit_s, "filter_s": filter_s, "total_s": fit_s + filter_s,
                     "kept": int(keep.sum()), "clusters_found": int(len(np.unique(fitted.labels_)))})
    out["clustering"] = {"proposals": proposals, "dim": dim, "k": k, "filter_percent": filter_percent,
                         "inputs": "seeded Gaussian groups around random unit directions (clusterers benchmark)",
                         "rows": rows}
    return out
