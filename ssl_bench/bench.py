"""Benchmarks behind ``ssl-bench bench NAME``: each returns a JSON-serialisable dict of measurements.

They measure on this machine, with whatever weights are at hand (random by default, which costs the
same as pretrained), and write ``results/bench/NAME.json`` so the figures are committed with the code
that produced them. No benchmark asserts a threshold; the closing notes compare with the targets.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import json
import os
import platform
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import registry
from .data import open_dataset
from .data.protocol import Protocol
from .errors import UserError
from .features import FeatureCache
from .metrics import StreamingConfusion
from .models import build_backbone, resolve


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "load_average_1min_at_start": os.getloadavg()[0]}  # a busy shared machine slows every figure


def _data_root(name: str, root: str | None) -> str | None:
    """``root``, else the dataset's folder in ../shared/data (None for the synthetic set, which needs none)."""
    from .data.shared import shared_data_dir

    if root is not None or name == "synthetic":
        return root
    shared = shared_data_dir()
    if shared is None or not (shared / name).is_dir():
        raise UserError(f"benchmark data {name} not found in ../shared/data -- pass data_root=PATH")
    return str(shared / name)


def extraction(backbone: str = "dino-vits16", dataset: str = "camvid", data_root: str | None = None,
               split: str | None = "val", images: int | None = None, batch: int = 8, repeats: int = 3) -> dict:
    """Harness extraction (decode + protocol + forward + float16 memmap writes) against the bare forward
    pass of the same model on the same, already decoded and normalised, images."""
    spec = registry.backbone(backbone)
    source = resolve(spec, "random")
    model = build_backbone(spec, source, 0)
    ds = open_dataset(dataset, _data_root(dataset, data_root), split, **({"limit": images} if images else {}))
    protocol = Protocol().for_patch_size(spec.patch_size)
    kinds = sorted({"patch", "key", "cls", "attn"} & model.supported_kinds())  # what DatUS^2/kmeans/DSM read
    decoded = [protocol.apply_image(ds.load_image(i), spec.patch_size) for i in range(len(ds))]
    tensors = [model.normalize(np.stack(decoded[i:i + batch])) for i in range(0, len(decoded), batch)]
    model.extract(tensors[0][:1], kinds)  # warm-up: allocator, thread pool

    def bare() -> float:
        t0 = time.perf_counter()
        for x in tensors:
            model.extract(x, kinds)
        return time.perf_counter() - t0

    def harness(workers: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            FeatureCache(tmp).ensure(model, source.identity, ds, protocol, kinds, batch_size=batch, workers=workers)
            return time.perf_counter() - t0

    # Interleaved rounds, best of each: a slow spell of a shared machine then hits every side alike.
    rounds = [(bare(), harness(1), harness(0)) for _ in range(repeats)]  # harness: default (a decode thread), in line
    bare_s, harness_s, inline_s = (min(r[i] for r in rounds) for i in range(3))
    n = len(ds)
    return {"backbone": backbone, "dataset": f"{dataset}/{ds.split}", "images": n, "batch": batch,
            "kinds": kinds, "input": list(decoded[0].shape[:2]),
            "bare_forward_images_per_s": n / bare_s, "harness_images_per_s": n / harness_s,
            "harness_fraction_of_bare": bare_s / harness_s,
            "harness_decoding_in_line_fraction_of_bare": bare_s / inline_s,
            "load_average_1min": os.getloadavg()[0]}


def eval_memory(image_counts: tuple[int, ...] = (50, 200, 800), size: int = 320, num_classes: int = 27,
                k: int = 27) -> dict:
    """Peak Python-heap memory of streaming evaluation as the number of images grows (should stay flat)."""
    rows = []
    rng = np.random.default_rng(0)
    pred = rng.integers(0, k, (size, size))
    target = rng.integers(-1, num_classes, (size, size))
    for n in image_counts:
        gc.collect()
        tracemalloc.start()
        conf = StreamingConfusion(num_classes, k)
        t0 = time.perf_counter()
        for _ in range(n):
            conf.update(pred, target)
        conf.compute(k)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append({"images": n, "peak_mib": peak / 2**20, "seconds": seconds})
    return {"size": size, "num_classes": num_classes, "k": k, "rows": rows}


def k_sweep(backbone: str = "dino-vits16", dataset: str = "camvid", data_root: str | None = None,
            split: str = "val", image_counts: tuple[int, ...] = (25, 50, 101), ks: tuple[str, ...] = ("C", "2C", "3C"),
            threads: int = 1, repeats: int = 2) -> dict:
    """Cost of one more K (k-means cells over cached features and labels, no CRF) against one extraction
    pass, and total sweep time against the number of images (random weights: same cost as pretrained).
    The k-means baseline only: its fit is timed apart, and it is the cell every sweep over K runs.

    Each figure is the best of ``repeats`` runs, extraction and cells alike (a shared machine only ever
    adds time). Decoding the labels is, like the extraction, done once per sweep and reported apart.
    ``fit_s`` times the k-means fit alone (all patches, the task's iterations): the floor of a cell.
    ``threads`` fixes torch, OpenMP, BLAS and numba threads for both sides; one thread by default, so the
    ratio measures work rather than thread contention on a shared machine (OpenMP with 2 threads on a
    loaded 2-core host runs several times slower than with one)."""
    from .methods.kmeans import fit_centroids
    from .ops import as_float32, set_threads
    from .runner import RunConfig, Runner, TaskContext
    from .store import ResultStore
    from .sweep import resolve_k

    root = _data_root(dataset, data_root)
    set_threads(threads)
    rows = []
    for warm_up, n in [(True, 2), *((False, n) for n in image_counts)]:  # warm-up: torch, page cache
        with tempfile.TemporaryDirectory() as tmp:
            base = RunConfig(backbone=backbone, task="kmeans", dataset=dataset, split=split, weights="random",
                             data_root=root, dataset_options=(("limit", n),), params=(("crf", False),))
            extraction_s = []
            for r in range(repeats):  # each repeat in a fresh cache: a real extraction every time
                runner = Runner(ResultStore(Path(tmp) / "s.sqlite"), FeatureCache(Path(tmp) / f"cache{r}"))
                run = runner.resolve(base)
                t0 = time.perf_counter()
                runner.features(run, run.dataset, list(run.features), lambda it, **_: it)
                extraction_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ctx = TaskContext(runner, run, lambda it, **_: it)
            ctx.evaluated_labels
            labels_s = time.perf_counter() - t0
            patches = as_float32(runner.features(run, run.dataset, ["patch"], lambda it, **_: it)["patch"].flat[:])
            cells = []
            for k in ks:
                k_value = resolve_k(k, run.config["num_classes"])
                seconds, fit = [], []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    record = runner.compute(runner.resolve(dataclasses.replace(base, k=k_value))).record
                    seconds.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    fit_centroids(patches, k_value, 0, run.config["params"]["iterations"])
                    fit.append(time.perf_counter() - t0)
                cells.append({"k": k_value, "seconds": min(seconds), "fit_s": min(fit),
                              "stages": {key: round(v, 4) for key, v in record.timings.items()}})
        if warm_up:
            continue
        extraction = min(extraction_s)
        per_k = float(np.mean([c["seconds"] for c in cells]))
        rows.append({"images": run.config["images"], "patches": int(len(patches)), "extraction_s": extraction,
                     "labels_s": labels_s, "cells": cells, "mean_k_cell_s": per_k,
                     "k_cell_fraction_of_extraction": per_k / extraction,
                     "k_cell_fraction_by_k": {c["k"]: c["seconds"] / extraction for c in cells},
                     "fit_fraction_by_k": {c["k"]: c["fit_s"] / extraction for c in cells},
                     "total_s": extraction + labels_s + sum(c["seconds"] for c in cells)})
    return {"backbone": f"{backbone} (random weights)", "dataset": f"{dataset}/{split}", "task": "kmeans (no CRF)",
            "ks": list(ks), "threads": threads, "repeats": repeats, "rows": rows,
            "linear_fit": _linear_fit([r["images"] for r in rows], [r["total_s"] for r in rows]),
            "max_k_cell_fraction_of_extraction": max(r["k_cell_fraction_of_extraction"] for r in rows),
            "load_average_1min": os.getloadavg()[0]}  # the machine may be shared: read the figures with it


def _linear_fit(x: list[float], y: list[float]) -> dict | None:
    """Least-squares line through (x, y) and its R^2; None below 3 points, where any line fits exactly."""
    if len(set(x)) < 3:
        return None
    x_, y_ = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    slope, intercept = np.polyfit(x_, y_, 1)
    residual = ((y_ - (slope * x_ + intercept)) ** 2).sum()
    return {"seconds_per_image": slope, "intercept_s": intercept,
            "r2": 1.0 - residual / max(((y_ - y_.mean()) ** 2).sum(), 1e-12)}


# One small model per family (Unicom's smallest is a ViT-B/32); the S/16 ViTs of DINO, iBOT, Mugs and
# MoCo v3 share an architecture and should agree, which makes the spread a measure of the noise.
THROUGHPUT_BACKBONES = ("dino-vits16", "dino-resnet50", "dinov2-vits14", "dinov2-vits14-reg", "dinov3-vits16",
                        "dinov3-convnext-tiny", "ibot-vits16", "mugs-vits16", "unicom-vitb32", "mocov3-vits16",
                        "mocov2-resnet50", "moco-resnet18")


def _time_calls(call: Callable[[], object], times: int) -> float:
    t0 = time.perf_counter()
    for _ in range(times):
        call()
    return time.perf_counter() - t0


def backbone_throughput(backbones: tuple[str, ...] | str = THROUGHPUT_BACKBONES, sizes: tuple[int, ...] = (224, 320),
                        images: int = 8, batch: int = 4, repeats: int = 2, kinds: tuple[str, ...] = ("patch", "cls")
                        ) -> dict:
    """Backbone extraction throughput on CPU (images/s at 224 and 320/322), one small model per family."""
    from .data.protocol import DEFAULT_RESIZE

    if isinstance(backbones, str):
        backbones = tuple(backbones.split(","))
    load_at_start = list(os.getloadavg())  # the figures scale with how busy the machine was
    rows = []
    for name in backbones:
        spec = registry.backbone(name)
        model = build_backbone(spec, resolve(spec, "random"), 0).to("cpu")
        generator = torch.Generator().manual_seed(0)
        for size in sizes:
            # 320 follows the protocol (322 for /14); other sizes are rounded up to the patch grid
            side = Protocol(resize=DEFAULT_RESIZE).for_patch_size(spec.patch_size).resize if size == DEFAULT_RESIZE \
                else -(-size // spec.patch_size) * spec.patch_size
            x = torch.randn(batch, 3, side, side, generator=generator)
            model.extract(x[:1], kinds)  # warm-up: allocator, thread pool
            extract = functools.partial(model.extract, x, kinds)
            seconds = min(_time_calls(extract, -(-images // batch)) for _ in range(repeats))
            done = -(-images // batch) * batch
            rows.append({"backbone": name, "family": spec.family, "arch": spec.arch, "params_m": spec.params_m,
                         "input": side, "grid": side // spec.patch_size, "images_per_s": round(done / seconds, 2),
                         "load_1min": round(os.getloadavg()[0], 2)})  # other processes' share of the CPU
        del model, extract  # free one model before building the next
        gc.collect()
    return {"device": "cpu", "weights": "random (same cost as pretrained)", "kinds": list(kinds), "batch": batch,
            "images_per_measure": images, "repeats": repeats, "load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg()),
            "rows": rows}


def cache_check(backbone: str = "dino-vits16", dataset: str = "camvid", data_root: str | None = None,
                split: str = "val", images: int = 101, repeats: int = 3) -> dict:
    """Checking a feature-cache entry when it is opened (sizes against its metadata, a CRC-32 per image)
    against extracting it: what a cell pays when it is the first of its process to open the entry
    (``checked_s``), and what a later cell of the same process pays (``memoised_s``)."""
    from .integrity import crc32

    spec = registry.backbone(backbone)
    source = resolve(spec, "random")
    model = build_backbone(spec, source, 0)
    ds = open_dataset(dataset, _data_root(dataset, data_root), split, limit=images)
    protocol = Protocol().for_patch_size(spec.patch_size)
    kinds = sorted({"patch", "key", "cls"} & model.supported_kinds())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        FeatureCache(tmp).ensure(model, source.identity, ds, protocol, kinds, workers=0)
        extraction_s = time.perf_counter() - t0
        checked, memoised = [], []
        for _ in range(repeats):
            cache = FeatureCache(tmp)  # a new process: nothing checked yet
            t0 = time.perf_counter()
            stores = cache.ensure(model, source.identity, ds, protocol, kinds, workers=0)
            checked.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cache.ensure(model, source.identity, ds, protocol, kinds, workers=0)
            memoised.append(time.perf_counter() - t0)
        nbytes = sum(s.flat.nbytes for s in stores.values())
        buffer = np.asarray(stores["patch"].flat)
        t0 = time.perf_counter()
        crc32(buffer)
        crc_gb_s = buffer.nbytes / (time.perf_counter() - t0) / 1e9
    return {"backbone": f"{backbone} (random weights)", "dataset": f"{dataset}/{split}", "images": len(ds),
            "kinds": kinds, "cached_bytes": nbytes, "extraction_s": extraction_s, "checked_s": min(checked),
            "memoised_s": min(memoised), "checked_fraction_of_extraction": min(checked) / extraction_s,
            "checked_gb_per_s": nbytes / min(checked) / 1e9, "crc32_gb_per_s": crc_gb_s,
            "load_average_1min": os.getloadavg()[0]}


BENCHMARKS: dict[str, Callable[..., dict] | str] = {
    "extraction": extraction, "eval-memory": eval_memory, "k-sweep": k_sweep, "backbone-throughput": backbone_throughput,
    "cache-check": cache_check, "crf": "ssl_bench.crf:benchmark",
    "ray-sweep": "ssl_bench.bench_ray:ray_sweep",  # imports Ray only when run
    "gpu": "ssl_bench.bench_gpu:gpu",  # every stage on the CPU and on the device, compared
    # a stage of a task, measured apart from the task's own benchmark (named in its registry file)
    "primaps-proposals": "ssl_bench.methods.primaps_proposals:benchmark",
    "abc-stopping": "ssl_bench.stages.clusterers.benchmark:abc_stopping"}  # ABC's opt-in rule vs its 500 epochs


def available_benchmarks() -> dict[str, str | Callable[..., dict]]:
    """Harness benchmarks plus each task's and stage's own (named by ``benchmark:`` in its registry file). A
    benchmark several stages of one kind share (one comparison of them all) is listed under the kind's folder
    name, e.g. ``clusterers``."""
    found: dict[str, str | Callable[..., dict]] = dict(BENCHMARKS)
    seen = set()
    for spec in registry.tasks().values():
        if spec.benchmark and spec.benchmark not in seen:  # variants share their method's benchmark
            seen.add(spec.benchmark)
            found[spec.name] = spec.benchmark
    for kind, folder in registry.STAGE_KINDS.items():
        named: dict[str, list[str]] = {}
        for spec in registry.stages(kind).values():
            if spec.benchmark and spec.benchmark not in seen:
                named.setdefault(spec.benchmark, []).append(spec.name)
        for function, names in named.items():
            found[folder if len(names) > 1 else names[0]] = function
    return found


def result_file(name: str, tag: str | None = None) -> str:
    return f"{name}-{tag}.json" if tag else f"{name}.json"


def _as_declared(function: Callable, kwargs: dict) -> dict:
    """Arguments checked against the benchmark's signature; where a tuple is expected, ``image_counts=25,50``
    becomes (25, 50) and ``image_counts=101`` (101,) (a string would be iterated character by character)."""
    params = inspect.signature(function).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise UserError(f"unknown argument(s) {', '.join(unknown)} -- this benchmark takes: {', '.join(params)}")
    out = {}
    for key, value in kwargs.items():
        if isinstance(params[key].default, tuple):  # "25,50" (a string to YAML), [25, 50] or 101
            if isinstance(value, str):
                value = tuple(registry.parse_yaml_value(v) for v in value.split(","))
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        default = params[key].default
        numbers = default if isinstance(default, tuple) else (default,)
        given = value if isinstance(value, tuple) else (value,)
        if numbers and all(registry.is_number(d) for d in numbers):  # the default says what kind of number
            example = f"-a {key}={','.join(map(str, numbers))}"
            if not all(registry.is_number(v) for v in given):
                raise UserError(f"benchmark argument {key}={kwargs[key]} is not a number -- e.g. {example}")
            if all(registry.is_whole(d) for d in numbers) and not all(registry.is_whole(v) for v in given):
                raise UserError(f"benchmark argument {key}={kwargs[key]} must be whole numbers -- e.g. {example}")
            if all(d > 0 for d in numbers) and not all(v > 0 for v in given):
                raise UserError(f"benchmark argument {key}={kwargs[key]} must be above 0 -- e.g. {example}")
        out[key] = value
    return out


def run_benchmark(name: str, output_dir: Path | None = Path("results/bench"), tag: str | None = None,
                  **kwargs) -> dict:
    available = available_benchmarks()
    if name not in available:
        raise UserError(f"unknown benchmark '{name}' -- choose one of: {', '.join(available)}")
    function = available[name]
    function = registry.load_entrypoint(function) if isinstance(function, str) else function
    kwargs = _as_declared(function, kwargs)
    result = {"benchmark": name, "arguments": kwargs, "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M"),
              "result": function(**kwargs)}
    if output_dir:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / result_file(name, tag)).write_text(json.dumps(result, indent=2) + "\n")
    return result
