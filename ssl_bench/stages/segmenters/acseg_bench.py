"""``ssl-bench bench acseg``: the concept generator's inference speed against per-image k-means on the same patch
features (the paper's claim, Sec. 4: 149 against 2.4 images/s on its GPU), and its training time per 100 steps."""

from __future__ import annotations

import time

import numpy as np
import torch


def _per_second(count: int, call, repeats: int) -> float:
    """``count`` items / the best of ``repeats`` timings of ``call()``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return count / best


def benchmark(backbone: str = "dino-vits8", images: int = 32, size: int = 224, iterations: int = 100,
              batch_size: int = 32, repeats: int = 2, threads: int = 0, device: str = "") -> dict:
    """ACSeg's concept generator against per-image k-means, inference images/s and training seconds, on the
    patch features of ``images`` CamVid images (random-weight ``backbone``, shorter side ``size``, centre crop:
    28 x 28 patches for a /8 ViT at 224, the paper's setting). Inference, images/s: the generator (the paper's 5
    prototypes and 6 stages) one image at a time, as the segmenter stage runs (soft assignment, argmax on the
    patch grid; and with the bilinear upsampling to the image), and ``batch_size`` images per forward pass; the
    ``image-kmeans`` segmenter (5 segments, 20 cosine Lloyd steps) one image at a time. Training: seconds per 100
    AdamW steps of ``batch_size`` images, measured over ``iterations`` steps. ``device``: "" = cuda when present,
    else cpu; ``threads`` > 0 fixes the CPU threads."""
    from ...data.protocol import Protocol
    from ...features import benchmark_inputs
    from ...ops import set_threads
    from .acseg import AdaptiveConceptGenerator, assignment, train_generator
    from .image_kmeans import ImageKMeans

    if threads:
        set_threads(threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pictures, feats, source = benchmark_inputs(backbone, images, ("patch",), Protocol(resize=size, crop="center"))
    grids = [f["patch"] for f in feats]

    t0 = time.perf_counter()
    model, record = train_generator(grids, iterations=iterations, batch_size=batch_size, device=device)
    train_s = time.perf_counter() - t0
    segmenter = AdaptiveConceptGenerator(resolution="patch", device=device)
    segmenter.model = model
    upsampling = AdaptiveConceptGenerator(resolution="label", device=device)
    upsampling.model = model
    kmeans = ImageKMeans(segments=5, iterations=20)
    batch = torch.as_tensor(np.stack([g.reshape(-1, g.shape[-1]) for g in grids[:batch_size]]), device=device)

    def batched():
        with torch.inference_mode():
            assignment(batch, model(batch)).argmax(-1).cpu()

    for call in (lambda: segmenter.segment({"patch": grids[0]}), batched):  # warm-up (allocator, kernels)
        call()
    h, w = grids[0].shape[:2]
    return {
        "inputs": source, "images": len(grids), "grid": [h, w], "feature_dim": int(grids[0].shape[-1]),
        "device": str(device), "threads": torch.get_num_threads(),
        "inference_images_per_s": {
            "concept_generator_per_image": _per_second(
                len(grids), lambda: [segmenter.segment({"patch": g}) for g in grids], repeats),
            "concept_generator_per_image_upsampled": _per_second(
                len(grids), lambda: [upsampling.segment({"patch": g}, p) for g, p in zip(grids, pictures)], repeats),
            f"concept_generator_batch_{len(batch)}": _per_second(len(batch), batched, repeats),
            "image_kmeans_per_image": _per_second(len(grids), lambda: [kmeans.segment({"patch": g}) for g in grids],
                                                  repeats),
        },
        "paper_claim_images_per_s": {"concept_generator": 149, "per_image_kmeans": 2.4, "note": "paper value, its GPU"},
        "training": {"iterations": iterations, "batch_size": record["batch_size"], "seconds": train_s,
                     "seconds_per_100_iterations": train_s / iterations * 100,
                     "first_loss": record["first_loss"], "final_loss": record["final_loss"]},
    }
