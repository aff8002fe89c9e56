"""A few predictions kept per run, for the qualitative panels of ``ssl-bench report``.

The runner keeps ``SAMPLES_PER_RUN`` headline predictions spread evenly over the split (the first
images of a video dataset such as CamVid are near-identical frames), maps their cluster ids to classes
with the run's own matching (``metrics[...]["cluster_to_class"]``, so colours match the ground truth)
and writes them next to the store::

    <store folder>/samples/<config_hash>.npz      indices (int32), prediction (int16, -1 = unlabelled)
    <store folder>/samples/view-<key>.npz         indices, image (uint8 RGB), label (int16, -1 = ignore),
                                                  palette (uint8 C x 3), class_names (the dataset's, as opened)

Images and ground truth depend only on the data, the protocol and the patch multiple of its crop, so
every run on the same images shares one ``view-`` file. Files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.protocol import SCORING_FIELDS
from .store import config_hash, write_atomically

SAMPLES_PER_RUN = 4


def spread_indices(images: int, count: int = SAMPLES_PER_RUN) -> set[int]:
    """``count`` image indices spread evenly over ``images`` (first and last included)."""
    return {int(i) for i in np.linspace(0, images - 1, min(count, images)).round()} if images > 0 else set()


def samples_dir(store_path: str | Path) -> Path:
    return Path(store_path).parent / "samples"


def view_key(config: dict, indices: list[int], multiple: int) -> str:
    """Identity of the images and labels a run saw: dataset (and a folder's location), split, image ids,
    protocol, the patch multiple its crop rounds to, indices."""
    keys = ("dataset", "dataset_identity", "split", "dataset_options", "ids_sha")
    inputs = {k: v for k, v in (config.get("protocol") or {}).items() if k not in SCORING_FIELDS}  # as cached
    ident = {k: config.get(k) for k in keys} | {"protocol": inputs, "indices": list(map(int, indices)),
                                                  "multiple": int(multiple)}
    return config_hash(ident)


def map_clusters(prediction: np.ndarray, cluster_to_class: list[int]) -> np.ndarray:
    """Cluster ids -> class ids; unlabelled pixels and clusters without a class (or dropped) become -1."""
    mapping = np.maximum(np.asarray(list(cluster_to_class) + [-1], dtype=np.int64), -1)  # last: out-of-range ids
    ids = np.where((prediction >= 0) & (prediction < len(mapping) - 1), prediction, len(mapping) - 1)
    return mapping[ids].astype(np.int16)


def _write_npz(path: Path, **arrays) -> None:
    write_atomically(path, lambda f: np.savez_compressed(f, **arrays))


def save(store_path: str | Path, config_hash: str, config: dict, multiple: int, indices: list[int],
         images: list[np.ndarray], labels: list[np.ndarray], predictions: list[np.ndarray],
         cluster_to_class: list[int], palette: np.ndarray | None, class_names: list[str]) -> Path:
    """Write a run's samples (``predictions`` in cluster ids) and, once, the images they show."""
    folder = samples_dir(store_path)
    key = view_key(config, indices, multiple)
    view = folder / f"view-{key}.npz"
    if not view.exists():
        _write_npz(view, indices=np.asarray(indices, np.int32), image=_stack(images, np.uint8),
                   label=_stack(labels, np.int16), class_names=np.asarray(list(class_names), dtype=str),
                 palette=np.asarray(palette if palette is not None else np.zeros((0, 3)), dtype=np.uint8))
    path = folder / f"{config_hash}.npz"
    _write_npz(path, indices=np.asarray(indices, np.int32), view=np.asarray(key),
               prediction=_stack([map_clusters(p, cluster_to_class) for p in predictions], np.int16))
    return path


def _stack(arrays: list[np.ndarray], dtype) -> np.ndarray:
    """One object array of per-image arrays (images of a split may differ in size)."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = np.asarray(a).astype(dtype)
    return out


@dataclass
class RunSamples:
    indices: list[int]
    images: list[np.ndarray]  # uint8 (H, W, 3)
    labels: list[np.ndarray]  # int16 (H, W), -1 = ignore
    predictions: list[np.ndarray]  # int16 (H, W) class ids, -1 = unlabelled / no class
    palette: np.ndarray  # the dataset's (C, 3) uint8 colours; may be empty (no official palette)
    class_names: list[str]


def stored(store_path: str | Path, config_hash: str) -> bool:
    """Whether the run kept samples (without reading them)."""
    return (samples_dir(store_path) / f"{config_hash}.npz").exists()


def load(store_path: str | Path, config_hash: str) -> RunSamples | None:
    """The stored samples of a run, or None when it has none (older run, or writing them failed)."""
    folder = samples_dir(store_path)
    path = folder / f"{config_hash}.npz"
    if not stored(store_path, config_hash):
        return None
    try:
        return _read(folder, path)
    except Exception as err:  # noqa: BLE001 -- a damaged file (any decoding error) costs its panel only
        warnings.warn(f"samples of run {config_hash} in {path} are unreadable ({err}); rerun with --force")
        return None


def _read(folder: Path, path: Path) -> RunSamples | None:
    with np.load(path, allow_pickle=True) as run:
        view_path = folder / f"view-{run['view'].item()}.npz"
        if not view_path.exists():
            return None
        with np.load(view_path, allow_pickle=True) as view:
            kept = RunSamples([int(i) for i in run["indices"]], list(view["image"]), list(view["label"]),
                              list(run["prediction"]), view["palette"], [str(n) for n in view["class_names"]])
    if any(p.shape != label.shape for p, label in zip(kept.predictions, kept.labels)):
        raise ValueError("its images are another crop (kept before views were told apart by patch size)")
    return kept

