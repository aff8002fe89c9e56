"""A few predictions kept per run, for the qualitative panels of ``ssl-bench report``.

The runner keeps ``SAMPLES_PER_RUN`` headline predictions spread evenly over the split (the first
images of a video dataset such as CamVid are near-identical frames), maps their cluster ids to classes
with the run's own matching (``metrics[...]["cluster_to_class"]``, so colours match the ground truth)
and writes them next to the store::

    <store folder>/samples/<config_hash>.npz      indices, view (its key), predictions (int16, -1 = unlabelled)
    <store folder>/samples/view-<key>.npz         indices, images (uint8 RGB), labels (int16, -1 = ignore),
                                                  palette (uint8 C x 3), class_names (the dataset's, as opened)

Images and ground truth depend only on the data, the protocol and the patch multiple of its crop, so
every run on the same images shares one ``view-`` file. Each file is an ``integrity.save_value`` value (plain
arrays and a JSON skeleton with a checksum, written atomically): a report never unpickles anything from a
store folder someone sent, and a damaged file costs its panel, with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.protocol import SCORING_FIELDS
from .integrity import Damaged, load_value, save_value
from .store import config_hash

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


def save(store_path: str | Path, config_hash: str, config: dict, multiple: int, indices: list[int],
         images: list[np.ndarray], labels: list[np.ndarray], predictions: list[np.ndarray],
         cluster_to_class: list[int], palette: np.ndarray | None, class_names: list[str]) -> Path:
    """Write a run's samples (``predictions`` in cluster ids) and, once, the images they show."""
    folder = samples_dir(store_path)
    key = view_key(config, indices, multiple)
    view = folder / f"view-{key}.npz"
    indices = [int(i) for i in indices]
    if not view.exists():
        save_value(view, {"indices": indices, "images": [np.asarray(a, np.uint8) for a in images],
                          "labels": [np.asarray(a).astype(np.int16) for a in labels],
                          "class_names": [str(n) for n in class_names],
                          "palette": np.asarray(palette if palette is not None else np.zeros((0, 3)), dtype=np.uint8)})
    path = folder / f"{config_hash}.npz"
    save_value(path, {"indices": indices, "view": key,
                      "predictions": [map_clusters(p, cluster_to_class) for p in predictions]})
    return path


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
    except (Damaged, OSError) as err:  # a damaged or foreign file costs its panel only
        warnings.warn(f"samples of run {config_hash} in {path} are unreadable ({err}); rerun with --force")
        return None


def _read(folder: Path, path: Path) -> RunSamples | None:
    run = load_value(path)
    if not (isinstance(run, dict) and isinstance(run.get("view"), str) and run["view"].isalnum()):
        raise Damaged(f"{path} is not a run's samples")
    view_path = folder / f"view-{run['view']}.npz"
    if not view_path.exists():
        return None
    view = load_value(view_path)
    try:
        kept = RunSamples([int(i) for i in run["indices"]], list(view["images"]), list(view["labels"]),
                          list(run["predictions"]), view["palette"], [str(n) for n in view["class_names"]])
    except (KeyError, TypeError, ValueError):
        raise Damaged(f"{path} or {view_path} is not a run's samples") from None
    _check_shapes(kept, path)
    return kept


def _check_shapes(kept: RunSamples, path: Path) -> None:
    """What the panels draw: one (H, W, 3) uint8 image, (H, W) int16 label and prediction per index."""
    n = len(kept.indices)
    if not (len(kept.images) == len(kept.labels) == len(kept.predictions) == n and isinstance(kept.palette, np.ndarray)
            and kept.palette.dtype == np.uint8 and kept.palette.ndim == 2 and kept.palette.shape[1] == 3):
        raise Damaged(f"{path}: its samples do not fit together")
    for image, label, pred in zip(kept.images, kept.labels, kept.predictions):
        if not all(isinstance(a, np.ndarray) for a in (image, label, pred)) or image.dtype != np.uint8 \
                or image.ndim != 3 or image.shape[2] != 3 or label.dtype != np.int16 or pred.dtype != np.int16:
            raise Damaged(f"{path}: its samples are not images and label maps")
        if label.shape != image.shape[:2]:
            raise Damaged(f"{path}: a label is not the size of its image")
        if pred.shape != label.shape:
            raise Damaged("its images are another crop (kept before views were told apart by patch size)")
