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
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from . import registry
from .data.base import SegDataset
from .errors import UserError
from .data.protocol import Protocol
from .ops import as_float32
from .integrity import (Damaged, NpyWriter, crc32, disk_error, open_npy, open_reserved, read_checked_json, regular_file,
                        write_checked_json)
from .store import file_lock
from .models.base import Backbone


TIMING_FILE = "timing.json"  # seconds and images of an entry's last extraction pass


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
    sizes = [_output_size(dataset, protocol, multiple, i) for i in range(len(dataset))]
    shapes = np.array([(h // cell, w // cell) for h, w in sizes], dtype=np.int64).reshape(-1, 2)
    return shapes, np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])]).astype(np.int64)


def _output_size(dataset: SegDataset, protocol: Protocol, multiple: int, i: int) -> tuple[int, int]:
    try:
        return protocol.output_size(*dataset.image_size(i), multiple)
    except UserError as err:  # the protocol refuses a size: say which image has it
        if dataset.ids[i] in str(err):
            raise
        raise UserError(f"{dataset.name}/{dataset.split} {dataset.ids[i]}: {err}") from None


KIND_FILES = ("{kind}.npy", "{kind}.crc32", "{kind}.progress.json")  # what one feature kind keeps in an entry


class FeatureCache:
    """The feature cache under ``root``: one folder per ``CacheKey``, holding ``meta.json`` (the image list and
    grid layout) and, per kind, the float16 rows (``KIND.npy``), a CRC-32 of each image's rows (``KIND.crc32``)
    and the number of images committed (``KIND.progress.json``). The JSON files carry their own checksum.

    Opening an entry checks it: file sizes against the metadata always, and each committed image's rows
    against its CRC once per process (a sweep's cells share the check). A damaged kind is extracted again
    from its first bad image, with one warning naming the folder; a damaged entry that cannot be rewritten
    (a read-only cache) is one line naming the folder to delete."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_cache_dir()
        existing = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():  # the folder, or one it would be made in, is a file
            raise UserError(f"the feature cache {self.root} cannot be a folder: {existing} is a file -- give a "
                            f"folder (--cache or $SSL_BENCH_CACHE; made if missing)")
        self.labels = LabelCache(self.root / "_labels")  # no backbone is called "_labels"
        self._verified: dict[tuple, int] = {}  # (file signatures) -> images whose rows were checked
        self.opened: set[str] = set()  # entry folders (relative to root) opened since the runner last cleared it

    def key(self, backbone: str, weights_identity: str, dataset: SegDataset, protocol: Protocol) -> CacheKey:
        image_options = {k: v for k, v in dataset.options.items() if k in dataset.image_options}
        return self._key(backbone, weights_identity, dataset, protocol, {**image_options, **dataset.identity})

    @staticmethod
    def _key(backbone: str, weights_identity: str, dataset: SegDataset, protocol: Protocol, options: dict) -> CacheKey:
        return CacheKey(backbone, weights_identity, dataset.name, dataset.split, dataset.ids_sha,
                        tuple(sorted(protocol.input_dict().items())), tuple(sorted(options.items())))

    def entry_dir(self, key: CacheKey) -> Path:
        # hub names (hf:org/model, open_clip:ARCH/TAG) hold ':' and '/': one folder each, named safely
        folder = key.backbone.replace("/", "--").replace(":", "-")
        return self.root / folder / f"{key.dataset}-{key.split}" / key.digest()

    def missing_kinds(self, key: CacheKey, kinds: Iterable[str], n_images: int) -> list[str]:
        folder = self.entry_dir(key)
        return [k for k in sorted(set(kinds)) if self._done(folder, k) < n_images]

    def images_done(self, key: CacheKey, kinds: Iterable[str]) -> int:
        """Images extracted for every one of ``kinds`` (an interrupted extraction resumes after them)."""
        folder = self.entry_dir(key)
        return min((self._done(folder, k) for k in kinds), default=0)

    @staticmethod
    def _progress(folder: Path, kind: str) -> int | None:
        """Images committed for ``kind`` (0 when none); None when its progress file is damaged."""
        try:
            done = read_checked_json(folder / f"{kind}.progress.json")["done"]
        except FileNotFoundError:
            return 0
        except (Damaged, TypeError, KeyError):
            return None
        return done if registry.is_whole(done) and done >= 0 else None

    @classmethod
    def _done(cls, folder: Path, kind: str) -> int:
        return cls._progress(folder, kind) or 0  # damaged: nothing counts as done (checked again when opened)

    def ensure(self, backbone: Backbone, weights_identity: str, dataset: SegDataset, protocol: Protocol,
               kinds: Iterable[str], progress: Callable = lambda it, **_: it, batch_size: int = 8,
               workers: int = 1) -> dict[str, FeatureStore]:
        """Extract whatever of ``kinds`` is not cached yet (or is damaged), then open every kind for reading.

        ``workers`` threads decode the next batches while the model runs (0: decode in line).
        """
        kinds = sorted(set(kinds))
        backbone.check_kinds(kinds)
        key = self.key(backbone.spec.name, weights_identity, dataset, protocol)
        folder = self.entry_dir(key)
        self.opened.add(folder.relative_to(self.root).as_posix())
        what = f"the {', '.join(kinds)} features of {backbone.spec.name} on {dataset.name}/{dataset.split}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            grids, offsets = self._plan(folder, key, dataset, protocol, backbone.patch_size)
            for kind in kinds:
                self._check_kind(folder, kind, grids, offsets)
            if self.missing_kinds(key, kinds, len(dataset)):
                with file_lock(folder / ".lock"):  # another process may have finished it meanwhile
                    todo = self.missing_kinds(key, kinds, len(dataset))
                    if todo:
                        self._extract(folder, backbone, dataset, protocol, todo, grids, offsets,
                                      progress, batch_size, workers)
            return {k: self.open(folder, k, grids, offsets) for k in kinds}
        except OSError as err:
            raise disk_error(err, folder, what, "pass --cache with a writable folder that has room") from None
        except Damaged as err:  # changed under us (checked just before): not ours to repair while it is in use
            raise UserError(f"the feature cache entry {folder} is damaged ({err}) -- delete that folder") from None

    def _plan(self, folder: Path, key: CacheKey, dataset: SegDataset, protocol: Protocol, patch: int):
        """The entry's grids and offsets, from its metadata (checked against the dataset), or written now."""
        meta_path = folder / "meta.json"
        try:
            meta = read_checked_json(meta_path)
            grids = np.array(meta["grids"], dtype=np.int64).reshape(-1, 2)
            offsets = np.array(meta["offsets"], dtype=np.int64)
            if meta["ids"] != dataset.ids or not _layout_is_consistent(grids, offsets):
                raise Damaged(f"{meta_path} describes other images")
            return grids, offsets
        except FileNotFoundError:
            pass
        except (Damaged, TypeError, KeyError, ValueError) as err:
            problem = str(err) if isinstance(err, Damaged) else f"{meta_path} is not as written"
            _refuse_if_read_only(folder, problem)
            with file_lock(folder / ".lock"):
                _warn_damaged(folder, problem, "extracting the whole entry again")
                for name in folder.iterdir():  # every kind was laid out by that metadata
                    if name.suffix in (".npy", ".crc32") or name.name.endswith(".progress.json"):
                        name.unlink()
        grids, offsets = _layout(dataset, protocol, patch, cell=patch)
        write_checked_json(meta_path, {"key": key.__dict__, "ids": dataset.ids,
                                       "grids": grids.tolist(), "offsets": offsets.tolist()})
        return grids, offsets

    def _check_kind(self, folder: Path, kind: str, grids: np.ndarray, offsets: np.ndarray) -> None:
        """Check a kind's committed images; from the first that fails, they are extracted again."""
        good, problem = self._verify(folder, kind, grids, offsets)
        if problem is None:
            return
        _refuse_if_read_only(folder, problem)
        with file_lock(folder / ".lock"):  # another process may be repairing it too
            good, problem = self._verify(folder, kind, grids, offsets)
            if problem is None:
                return
            _warn_damaged(folder, problem, f"extracting {kind} again from image {good}")
            if good == 0:
                for pattern in KIND_FILES:
                    (folder / pattern.format(kind=kind)).unlink(missing_ok=True)
            else:
                write_checked_json(folder / f"{kind}.progress.json", {"done": good})

    def _verify(self, folder: Path, kind: str, grids: np.ndarray, offsets: np.ndarray) -> tuple[int, str | None]:
        """(images that check, what is wrong with the next one or None): sizes against the metadata, then
        each committed image's rows against its CRC (once per file version in this process)."""
        done = self._progress(folder, kind)
        if done is None:
            return 0, f"{kind}.progress.json is not as written"
        if done == 0:
            return 0, None
        if done > len(grids):
            return 0, f"{kind}.progress.json counts {done} of {len(grids)} images"
        data, crc_path = folder / f"{kind}.npy", folder / f"{kind}.crc32"
        try:
            signature = (str(data), _stat_signature(data), _stat_signature(crc_path))
            if self._verified.get(signature, 0) >= done:
                return done, None
            flat = open_npy(data, np.float16, _rows_shape(kind, grids, offsets))
            crcs = np.fromfile(regular_file(crc_path, "cache file"), dtype="<u4")
        except (FileNotFoundError, Damaged, UserError, ValueError, OSError) as err:
            return 0, f"{kind}: {err}"
        starts = np.arange(len(grids) + 1) if _per_image(kind) else offsets
        for i in range(done):
            if i >= len(crcs) or crc32(flat[starts[i]:starts[i + 1]]) != crcs[i]:
                return i, f"the {kind} features of image {i} do not match their checksum"
        self._verified[signature] = done
        return done, None

    def _extract(self, folder, backbone, dataset, protocol, kinds, grids, offsets, progress, batch_size, workers):
        started = time.perf_counter()
        start = min(self._done(folder, k) for k in kinds)
        batches = _same_size_batches(grids, start, batch_size)
        images = _ProtocolImages(dataset, protocol, backbone.patch_size)
        writers: dict[str, _KindWriter] = {}
        try:
            for indices, batch in progress(_prefetched(images.batch, batches, workers),
                                           desc=f"extract {backbone.spec.name} on {dataset.name}/{dataset.split}",
                                           total=len(grids) - start, unit="images", step=lambda item: len(item[0])):
                x = backbone.normalize(batch)  # on the model's device
                with protocol.autocast(x.device):  # the protocol's precision (fp32: no autocast)
                    feats = backbone.extract(x, kinds)
                for kind in kinds:
                    rows = self._rows(kind, feats[kind]).astype(np.float16)
                    if kind not in writers:
                        writers[kind] = _KindWriter(folder, kind, rows.shape[1], grids, offsets,
                                                    fresh=self._done(folder, kind) == 0)
                    writers[kind].write(indices, rows)
                for kind in kinds:  # commit only what is on disk
                    writers[kind].commit(indices[-1] + 1)
                    self._verified[writers[kind].signature()] = indices[-1] + 1  # its rows are what we wrote
        finally:
            for writer in writers.values():
                writer.close()
        # what this pass cost, for the time estimates of later plans (sweep --plan)
        write_checked_json(folder / TIMING_FILE, {"seconds": time.perf_counter() - started,
                                                  "images": len(grids) - start, "kinds": list(kinds)})

    @staticmethod
    def _rows(kind: str, t: torch.Tensor) -> np.ndarray:
        t = t.float().cpu()
        if kind == "attn":
            t = t.permute(0, 2, 3, 1)  # (B, heads, h, w) -> rows of per-patch head weights
        return t.reshape(-1, t.shape[-1]).numpy() if t.dim() > 2 else t.numpy()

    @staticmethod
    def open(folder: Path, kind: str, grids: np.ndarray, offsets: np.ndarray) -> FeatureStore:
        flat = open_npy(folder / f"{kind}.npy", np.float16, _rows_shape(kind, grids, offsets), mode="c")  # copy-on-write:
        # never written, but torch-viewable
        if _per_image(kind):
            offsets = np.arange(len(grids) + 1)
        return FeatureStore(kind, flat, offsets, grids)


def _refuse_if_read_only(folder: Path, problem: str) -> None:
    """A damaged entry that cannot be rewritten here (a read-only cache) is one line naming the folder to delete."""
    if not os.access(folder, os.W_OK):
        raise UserError(f"the cache entry {folder} is damaged ({problem}) and cannot be rewritten here -- delete "
                        f"that folder, or pass --cache with a writable folder")


def _warn_damaged(folder: Path, problem: str, action: str) -> None:
    warnings.warn(f"cache entry {folder} is damaged ({problem}); {action}", stacklevel=5)


def _rows_shape(kind: str, grids: np.ndarray, offsets: np.ndarray) -> tuple[int, None]:
    """The shape ``kind``'s file must have: one row per image (cls) or per patch, of any width."""
    return len(grids) if _per_image(kind) else int(offsets[-1]), None


def _layout_is_consistent(grids: np.ndarray, offsets: np.ndarray) -> bool:
    return (len(offsets) == len(grids) + 1 and offsets[0] == 0 and (grids > 0).all()
            and np.array_equal(np.diff(offsets), grids[:, 0] * grids[:, 1]))


def _stat_signature(path: Path) -> tuple:
    """What changes when a file is rewritten or altered in place (a check is kept per signature)."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class _KindWriter:
    """Writes one kind's rows and their per-image CRCs, and commits the count of images on disk."""

    def __init__(self, folder: Path, kind: str, dim: int, grids: np.ndarray, offsets: np.ndarray, fresh: bool):
        self.folder, self.kind = folder, kind
        self.starts = np.arange(len(grids) + 1) if _per_image(kind) else offsets
        self.rows = NpyWriter(folder / f"{kind}.npy", np.float16, (int(self.starts[-1]), dim), fresh)
        try:
            self.crcs = open_reserved(folder / f"{kind}.crc32", len(grids) * 4, fresh)
        except BaseException:
            self.rows.close()
            raise

    def write(self, indices: list[int], rows: np.ndarray) -> None:
        lo = int(self.starts[indices[0]])
        self.rows.write(lo, rows)
        crcs = [crc32(rows[self.starts[i] - lo:self.starts[i + 1] - lo]) for i in indices]
        os.pwrite(self.crcs, np.asarray(crcs, dtype="<u4").tobytes(), 4 * indices[0])

    def commit(self, done: int) -> None:
        self.rows.sync()
        os.fdatasync(self.crcs)
        write_checked_json(self.folder / f"{self.kind}.progress.json", {"done": done})

    def signature(self) -> tuple:
        data = self.folder / f"{self.kind}.npy"
        return str(data), _stat_signature(data), _stat_signature(self.folder / f"{self.kind}.crc32")

    def close(self) -> None:
        self.rows.close()
        os.close(self.crcs)


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
            try:
                stat = sample.label.stat()
            except FileNotFoundError:
                raise UserError(f"{dataset.title}: missing label file {sample.label} -- the data root is incomplete, "
                                f"or its split list names a file that is not there") from None
            stamps.append(f"{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:16] if stamps else ""


class LabelCache:
    """Labels decoded once per (dataset, reader options, protocol, patch multiple) and kept as one int16
    array, so the cells of a sweep (every backbone of that patch size, task, K and seed) read them instead
    of decoding and resizing every label file again. Written whole, then published by rename; ``labels.json``
    (with its own checksum) holds the layout and a CRC-32 of each image's labels, checked once per process.
    A damaged entry is decoded again, with one warning naming it."""

    def __init__(self, root: Path):
        self.root = root
        self._verified: set[tuple] = set()  # signatures of label files checked in this process
        self.opened: set[str] = set()  # entry folders (relative to the feature cache) opened, as FeatureCache's

    def ensure(self, dataset: SegDataset, protocol: Protocol, multiple: int,
               progress: Callable = lambda it, **_: it) -> LabelStore:
        key = FeatureCache._key("labels", f"multiple={multiple}", dataset, protocol.for_labels(),
                                {**dataset.options, **dataset.identity, "label_files": _label_file_stamp(dataset)})
        folder = self.root / f"{dataset.name}-{dataset.split}" / key.digest()
        self.opened.add(folder.relative_to(self.root.parent).as_posix())
        try:
            labels, problem = self._open(folder, dataset)
            if labels is None:
                if problem:
                    _refuse_if_read_only(folder, problem)
                folder.mkdir(parents=True, exist_ok=True)
                with file_lock(folder / ".lock"):  # another process may have written (or repaired) it meanwhile
                    labels, problem = self._open(folder, dataset)
                    if labels is None:
                        if problem:
                            _warn_damaged(folder, problem, "decoding the labels again")
                            for name in ("labels.json", "labels.npy"):
                                (folder / name).unlink(missing_ok=True)
                        for stale in folder.glob("labels.*.tmp.npy"):  # a decoder killed mid-way (we hold the lock)
                            stale.unlink(missing_ok=True)
                        self._decode(folder, key, dataset, protocol, multiple, progress)
                        labels, _ = self._open(folder, dataset)
        except OSError as err:
            raise disk_error(err, folder, f"the labels of {dataset.name}/{dataset.split}",
                             "pass --cache with a writable folder that has room") from None
        return labels

    def _open(self, folder: Path, dataset: SegDataset) -> tuple[LabelStore | None, str | None]:
        """(the entry, checked: sizes always, CRCs once per file version; None when absent or damaged, and
        then what is wrong with it)."""
        meta, data = folder / "labels.json", folder / "labels.npy"
        try:
            info = read_checked_json(meta)
            shapes = np.array(info["shapes"], dtype=np.int64).reshape(-1, 2)
            offsets = np.array(info["offsets"], dtype=np.int64)
            if info["ids"] != dataset.ids or not _layout_is_consistent(shapes, offsets) \
                    or len(info["crc32"]) != len(shapes):
                raise Damaged(f"{meta} describes other images")
            flat = open_npy(data, np.int16, (int(offsets[-1]),))
            signature = (str(data), _stat_signature(data), _stat_signature(meta))
            if signature not in self._verified:
                bad = next((i for i in range(len(shapes))
                            if crc32(flat[offsets[i]:offsets[i + 1]]) != info["crc32"][i]), None)
                if bad is not None:
                    raise Damaged(f"the labels of image {bad} do not match their checksum")
                self._verified.add(signature)
            return LabelStore(flat, offsets, shapes), None
        except FileNotFoundError:
            return None, None
        except (Damaged, TypeError, KeyError, ValueError) as err:
            return None, str(err) if isinstance(err, Damaged) else f"{meta} is not as written"

    @staticmethod
    def _decode(folder: Path, key: CacheKey, dataset: SegDataset, protocol: Protocol, multiple: int,
                progress: Callable) -> None:
        shapes, offsets = _layout(dataset, protocol, multiple, cell=1)
        tmp = folder / f"labels.{os.getpid()}.tmp.npy"
        crcs = []
        try:
            flat = NpyWriter(tmp, np.int16, (int(offsets[-1]),), fresh=True)
            try:
                for i in progress(range(len(dataset)), desc=f"decode labels of {dataset.name}/{dataset.split}",
                                  total=len(dataset), unit="images"):
                    label = _checked_label(dataset, protocol, multiple, i, tuple(shapes[i])).astype(np.int16).ravel()
                    flat.write(int(offsets[i]), label)
                    crcs.append(crc32(label))
                flat.sync()
            finally:
                flat.close()
            os.replace(tmp, folder / "labels.npy")
        finally:
            tmp.unlink(missing_ok=True)
        write_checked_json(folder / "labels.json", {"key": key.__dict__, "ids": dataset.ids, "crc32": crcs,
                                                    "shapes": shapes.tolist(), "offsets": offsets.tolist()})


def _checked_label(dataset: SegDataset, protocol: Protocol, multiple: int, i: int, shape: tuple) -> np.ndarray:
    """Label ``i`` at protocol resolution, refused in one line when it cannot be paired with its image."""
    raw = dataset.load_label(i)
    width, height = dataset.image_size(i)
    if raw.shape[:2] != (height, width):  # resizing both apart would pair the wrong pixels, silently
        raise UserError(f"{dataset.name}/{dataset.split} {dataset.ids[i]}: the label is {raw.shape[1]}x"
                        f"{raw.shape[0]} but its image is {width}x{height} -- fix or remove that pair")
    label = protocol.apply_label(raw, multiple)
    if label.shape != shape:
        raise UserError(f"{dataset.name}/{dataset.split} {dataset.ids[i]}: the label is not the size of "
                        f"its image (gives {label.shape} at protocol resolution, not {shape}) "
                        f"-- fix or remove that pair")
    if label.size and (label.min() < -1 or label.max() > np.iinfo(np.int16).max):
        raise UserError(f"{dataset.name}/{dataset.split} {dataset.ids[i]}: class ids outside -1..32767 "
                        f"-- the reader must map raw values to class ids")
    return label


def features_of(backbone: Backbone, dataset: SegDataset, protocol: Protocol, kinds: Iterable[str],
                n: int) -> tuple[list[np.ndarray], list[dict[str, np.ndarray]]]:
    """Protocol images and features of the first ``n`` images, uncached (for benchmarks and probes)."""
    protocol = protocol.for_patch_size(backbone.patch_size)
    images = [protocol.apply_image(dataset.load_image(i), backbone.patch_size) for i in range(min(n, len(dataset)))]
    feats = []
    for image in images:
        x = backbone.normalize(image[None])
        with protocol.autocast(x.device):
            out = backbone.extract(x, set(kinds))
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
