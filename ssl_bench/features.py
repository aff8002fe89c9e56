"""Feature extraction and the on-disk feature cache.

Features are extracted once per (backbone, weights identity, dataset, split, protocol) and kept as
float16 ``.npy`` memory maps, one file per feature kind, so every method, K and seed reuses them.
Images may differ in size (``crop: none``): every kind is stored as flat rows, image ``i`` owning rows
``offsets[i]:offsets[i+1]``. Progress is committed (atomic rename) after each batch is flushed, so an
interrupted extraction resumes at the first image not yet committed. A file lock makes concurrent
runs wait for one another instead of extracting twice.

Ground truth is cached the same way (``LabelCache``): decoded and resized once per dataset and protocol,
so the K values and seeds of a sweep never decode a label file twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .data.base import SegDataset
from .errors import UserError
from .data.protocol import Protocol
from .ops import as_float32
from .store import file_lock, write_atomically
from .models.base import Backbone


def default_cache_dir() -> Path:
    return Path(os.environ.get("SSL_BENCH_CACHE", Path(".ssl-bench") / "cache"))


def _per_image(kind: str) -> bool:
    return kind == "cls"


class FeatureStore:
    """Read access to one cached feature kind; ``fs[i]`` gives image ``i`` as float32."""

    def __init__(self, kind: str, flat: np.ndarray, offsets: np.ndarray, grids: np.ndarray):
        self.kind, self.flat, self.offsets, self.grids = kind, flat, offsets, grids

    def __len__(self) -> int:
        return len(self.grids)

    def grid(self, i: int) -> tuple[int, int]:
        return int(self.grids[i][0]), int(self.grids[i][1])

    def __getitem__(self, i: int) -> np.ndarray:
        rows = as_float32(self.flat[self.offsets[i]:self.offsets[i + 1]])
        if _per_image(self.kind):
            return rows[0]
        h, w = self.grid(i)
        grid = rows.reshape(h, w, -1)
        return grid.transpose(2, 0, 1).copy() if self.kind == "attn" else grid  # attn: (heads, h, w)


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes the features. Its hash names the cache folder."""

    backbone: str
    weights: str
    dataset: str
    split: str
    ids_sha: str  # the image list itself, so a subset or a changed folder gets its own entry
    protocol: tuple
    options: tuple = ()  # reader options that change the content (e.g. the synthetic set's seed)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:16]


class _ProtocolImages:
    """Dataset images at protocol resolution, stacked per batch as a uint8 tensor (B, H, W, 3)."""

    def __init__(self, dataset: SegDataset, protocol: Protocol, multiple: int):
        self.dataset, self.protocol, self.multiple = dataset, protocol, multiple

    def batch(self, indices: list[int]) -> torch.Tensor:
        images = [self.protocol.apply_image(self.dataset.load_image(i), self.multiple) for i in indices]
        return torch.from_numpy(np.stack(images))  # np.stack copies: PIL-backed arrays are read-only


def _prefetched(load: Callable[[list[int]], torch.Tensor], batches: list[list[int]], threads: int):
    """Yield ``(indices, load(indices))`` in order, decoding up to ``threads`` batches ahead.

    Threads, not processes: PIL decoding and resizing release the GIL, and on a small machine a
    forked loader worker costs start-up time and a copy of every batch for nothing.
    """
    if threads <= 0:
        for indices in batches:
            yield indices, load(indices)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="ssl-bench-decode") as pool:
        pending = deque(pool.submit(load, b) for b in batches[:threads + 1])
        for j, indices in enumerate(batches):
            batch = pending.popleft().result()
            if j + threads + 1 < len(batches):
                pending.append(pool.submit(load, batches[j + threads + 1]))
            yield indices, batch


def _same_size_batches(grids: np.ndarray, start: int, batch_size: int) -> list[list[int]]:
    """Consecutive indices grouped while the grid size stays the same (so they stack)."""
    batches: list[list[int]] = []
    for i in range(start, len(grids)):
        if batches and len(batches[-1]) < batch_size and (grids[batches[-1][0]] == grids[i]).all():
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _layout(dataset: SegDataset, protocol: Protocol, multiple: int, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (h, w) at protocol resolution in units of ``cell`` pixels (the patch for features, 1 for
    labels), and the offsets of each image's rows in a flat array; read from headers, nothing decoded."""
    sizes = [protocol.output_size(*dataset.image_size(i), multiple) for i in range(len(dataset))]
    shapes = np.array([(h // cell, w // cell) for h, w in sizes], dtype=np.int64).reshape(-1, 2)
    return shapes, np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])]).astype(np.int64)


def _write_json_atomic(path: Path, data: dict) -> None:
    write_atomically(path, lambda f: f.write(json.dumps(data).encode()))


class FeatureCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_cache_dir()
        self.labels = LabelCache(self.root / "_labels")  # no backbone is called "_labels"

    def key(self, backbone: str, weights_identity: str, dataset: SegDataset, protocol: Protocol) -> CacheKey:
        image_options = {k: v for k, v in dataset.options.items() if k in dataset.image_options}
        return self._key(backbone, weights_identity, dataset, protocol, {**image_options, **dataset.identity})

    @staticmethod
    def _key(backbone: str, weights_identity: str, dataset: SegDataset, protocol: Protocol, options: dict) -> CacheKey:
        return CacheKey(backbone, weights_identity, dataset.name, dataset.split, dataset.ids_sha,
                        tuple(sorted(protocol.input_dict().items())), tuple(sorted(options.items())))

    def entry_dir(self, key: CacheKey) -> Path:
        return self.root / key.backbone / f"{key.dataset}-{key.split}" / key.digest()

    def missing_kinds(self, key: CacheKey, kinds: Iterable[str], n_images: int) -> list[str]:
        folder = self.entry_dir(key)
        return [k for k in sorted(set(kinds)) if self._done(folder, k) < n_images]

    def images_done(self, key: CacheKey, kinds: Iterable[str]) -> int:
        """Images extracted for every one of ``kinds`` (an interrupted extraction resumes after them)."""
        folder = self.entry_dir(key)
        return min((self._done(folder, k) for k in kinds), default=0)

    @staticmethod
    def _done(folder: Path, kind: str) -> int:
        path = folder / f"{kind}.progress.json"
        return json.loads(path.read_text())["done"] if path.exists() else 0

    def ensure(self, backbone: Backbone, weights_identity: str, dataset: SegDataset, protocol: Protocol,
               kinds: Iterable[str], progress: Callable = lambda it, **_: it, batch_size: int = 8,
               workers: int = 1) -> dict[str, FeatureStore]:
        """Extract whatever of ``kinds`` is not cached yet, then open every kind for reading.

        ``workers`` threads decode the next batches while the model runs (0: decode in line).
        """
        kinds = sorted(set(kinds))
        backbone.check_kinds(kinds)
        key = self.key(backbone.spec.name, weights_identity, dataset, protocol)
        folder = self.entry_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        grids, offsets = self._plan(folder, key, dataset, protocol, backbone.patch_size)
        if self.missing_kinds(key, kinds, len(dataset)):
            with file_lock(folder / ".lock"):  # another process may have finished it meanwhile
                todo = self.missing_kinds(key, kinds, len(dataset))
                if todo:
                    self._extract(folder, backbone, dataset, protocol, todo, grids, offsets,
                                  progress, batch_size, workers)
        return {k: self.open(folder, k, grids, offsets) for k in kinds}

    def _plan(self, folder: Path, key: CacheKey, dataset: SegDataset, protocol: Protocol, patch: int):
        meta_path = folder / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            return np.array(meta["grids"], dtype=np.int64).reshape(-1, 2), np.array(meta["offsets"], dtype=np.int64)
        grids, offsets = _layout(dataset, protocol, patch, cell=patch)
        _write_json_atomic(meta_path, {"key": key.__dict__, "ids": dataset.ids,
                                       "grids": grids.tolist(), "offsets": offsets.tolist()})
        return grids, offsets

    def _extract(self, folder, backbone, dataset, protocol, kinds, grids, offsets, progress, batch_size, workers):
        start = min(self._done(folder, k) for k in kinds)
        batches = _same_size_batches(grids, start, batch_size)
        images = _ProtocolImages(dataset, protocol, backbone.patch_size)
        arrays: dict[str, np.ndarray] = {}
        for indices, batch in progress(_prefetched(images.batch, batches, workers),
                                       desc=f"extract {backbone.spec.name} on {dataset.name}/{dataset.split}",
                                       total=len(batches)):
            feats = backbone.extract(backbone.normalize(batch), kinds)  # normalize moves the batch to the model
            for kind in kinds:
                rows = self._rows(kind, feats[kind]).astype(np.float16)
                if kind not in arrays:
                    fresh = self._done(folder, kind) == 0
                    arrays[kind] = self._open_for_write(folder, kind, rows.shape[1], len(grids), offsets, fresh)
                lo = indices[0] if _per_image(kind) else offsets[indices[0]]
                arrays[kind][lo:lo + len(rows)] = rows
            for kind in kinds:  # commit only what is on disk
                arrays[kind].flush()
                _write_json_atomic(folder / f"{kind}.progress.json", {"done": indices[-1] + 1})

    @staticmethod
    def _rows(kind: str, t: torch.Tensor) -> np.ndarray:
        t = t.float().cpu()
        if kind == "attn":
            t = t.permute(0, 2, 3, 1)  # (B, heads, h, w) -> rows of per-patch head weights
        return t.reshape(-1, t.shape[-1]).numpy() if t.dim() > 2 else t.numpy()

    @staticmethod
    def _open_for_write(folder: Path, kind: str, dim: int, n_images: int, offsets: np.ndarray,
                        fresh: bool) -> np.ndarray:
        path = folder / f"{kind}.npy"
        shape = (n_images if _per_image(kind) else int(offsets[-1]), dim)
        if not fresh:  # resume: committed rows are kept
            array = np.load(path, mmap_mode="r+")
            if array.shape != shape:
                raise RuntimeError(f"cache file {path} has shape {array.shape}, expected {shape}: delete {folder}")
            return array
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)

    @staticmethod
    def open(folder: Path, kind: str, grids: np.ndarray, offsets: np.ndarray) -> FeatureStore:
        flat = np.load(folder / f"{kind}.npy", mmap_mode="c")  # copy-on-write: never written, but torch-viewable
        if _per_image(kind):
            offsets = np.arange(len(grids) + 1)
        return FeatureStore(kind, flat, offsets, grids)


class LabelStore:
    """Ground truth of one split at protocol resolution; ``labels[i]`` is image ``i``'s int64 (H, W) map."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray, shapes: np.ndarray):
        self.flat, self.offsets, self.shapes = flat, offsets, shapes

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> np.ndarray:
        h, w = self.shapes[i]
        return self.flat[self.offsets[i]:self.offsets[i + 1]].reshape(h, w).astype(np.int64)


def _label_file_stamp(dataset: SegDataset) -> str:
    """Hash of every label file's size and modification time: a corrected annotation is decoded again
    (one stat per file, per cell). Generated datasets have no files: their options identify them."""
    stamps = []
    for sample in getattr(dataset, "samples", []):
        if sample.label is not None:
            stat = sample.label.stat()
            stamps.append(f"{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:16] if stamps else ""


class LabelCache:
    """Labels decoded once per (dataset, reader options, protocol, patch multiple) and kept as one int16
    memory map, so the cells of a sweep (every backbone of that patch size, task, K and seed) read them
    instead of decoding and resizing every label file again. Written whole, then published by rename."""

    def __init__(self, root: Path):
        self.root = root

    def ensure(self, dataset: SegDataset, protocol: Protocol, multiple: int,
               progress: Callable = lambda it, **_: it) -> LabelStore:
        key = FeatureCache._key("labels", f"multiple={multiple}", dataset, protocol,
                                {**dataset.options, **dataset.identity, "label_files": _label_file_stamp(dataset)})
        folder = self.root / f"{dataset.name}-{dataset.split}" / key.digest()
        meta = folder / "labels.json"
        if not meta.exists():
            folder.mkdir(parents=True, exist_ok=True)
            with file_lock(folder / ".lock"):  # another process may have written it meanwhile
                if not meta.exists():
                    self._decode(folder, key, dataset, protocol, multiple, progress)
        info = json.loads(meta.read_text())
        return LabelStore(np.load(folder / "labels.npy", mmap_mode="r"), np.array(info["offsets"], dtype=np.int64),
                          np.array(info["shapes"], dtype=np.int64).reshape(-1, 2))

    @staticmethod
    def _decode(folder: Path, key: CacheKey, dataset: SegDataset, protocol: Protocol, multiple: int,
                progress: Callable) -> None:
        shapes, offsets = _layout(dataset, protocol, multiple, cell=1)
        tmp = folder / f"labels.{os.getpid()}.tmp.npy"
        flat = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=(int(offsets[-1]),))
        for i in progress(range(len(dataset)), desc=f"decode labels of {dataset.name}/{dataset.split}",
                          total=len(dataset)):
            raw = dataset.load_label(i)
            width, height = dataset.image_size(i)
            if raw.shape[:2] != (height, width):  # resizing both apart would pair the wrong pixels, silently
                raise UserError(f"{dataset.name}/{dataset.split} {dataset.ids[i]}: the label is {raw.shape[1]}x"
                                f"{raw.shape[0]} but its image is {width}x{height} -- fix or remove that pair")
            label = protocol.apply_label(raw, multiple)
            if label.shape != tuple(shapes[i]):
                raise UserError(f"{dataset.name}/{dataset.split} {dataset.ids[i]}: the label is not the size of "
                                f"its image (gives {label.shape} at protocol resolution, not {tuple(shapes[i])}) "
                                f"-- fix or remove that pair")
            if label.size and (label.min() < -1 or label.max() > np.iinfo(np.int16).max):
                raise UserError(f"{dataset.name}/{dataset.split} {dataset.ids[i]}: class ids outside -1..32767 "
                                f"-- the reader must map raw values to class ids")
            flat[offsets[i]:offsets[i + 1]] = label.ravel()
        flat.flush()
        del flat
        os.replace(tmp, folder / "labels.npy")
        _write_json_atomic(folder / "labels.json", {"key": key.__dict__, "ids": dataset.ids,
                                                    "shapes": shapes.tolist(), "offsets": offsets.tolist()})


def features_of(backbone: Backbone, dataset: SegDataset, protocol: Protocol, kinds: Iterable[str],
                n: int) -> tuple[list[np.ndarray], list[dict[str, np.ndarray]]]:
    """Protocol images and features of the first ``n`` images, uncached (for benchmarks and probes)."""
    protocol = protocol.for_patch_size(backbone.patch_size)
    images = [protocol.apply_image(dataset.load_image(i), backbone.patch_size) for i in range(min(n, len(dataset)))]
    feats = []
    for image in images:
        out = backbone.extract(backbone.normalize(image[None]), set(kinds))
        feats.append({k: v[0].float().cpu().numpy() for k, v in out.items()})
    return images, feats


def benchmark_inputs(backbone: str, n: int, kinds=("patch",), protocol: Protocol = Protocol()):
    """Random-weight ``backbone`` features of ``n`` real CamVid images when ../shared/data is there,
    else of the synthetic dataset (at ``protocol``); returns (images, features, dataset description)."""
    from . import registry
    from .data import open_dataset
    from .data.shared import shared_data_dir
    from .models import build_backbone, resolve

    spec = registry.backbone(backbone)
    model = build_backbone(spec, resolve(spec, "random"), 0)
    camvid = shared_data_dir() / "camvid" if shared_data_dir() else None
    if camvid and camvid.is_dir():
        dataset = open_dataset("camvid", camvid, "val")
    else:
        warnings.warn("no ../shared/data/camvid beside the checkout: measuring the synthetic dataset instead "
                      "(SSL_BENCH_SHARED_DATA=/path/to/data points elsewhere)")
        dataset = open_dataset("synthetic", None, "val")
    images, feats = features_of(model, dataset, protocol, kinds, n)
    return images, feats, f"{dataset.name}/{dataset.split} ({backbone}, random weights)"
