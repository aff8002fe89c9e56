"""``--save-predictions DIR``: every image's headline prediction of a run, as files a user opens.

One folder per run, ``DIR/<backbone>_<task>_<dataset>-<split>_K<k>_seed<s>-<run hash>/``:

    <image id>.png            indexed (palette) PNG at protocol resolution: class ids after the run's matching
                              where the dataset has ground truth, else cluster ids; 255 = unlabelled (16-bit grey
                              PNG, 65535 = unlabelled, when there are more than 255 ids)
    overlay/<image id>.jpg    the image with the prediction's colours over it
    run.json                  what the ids mean (classes or clusters, names, colours), the run hash; written last,
                              so a folder without it is incomplete (``--save-predictions`` again completes it)

The ids equal the run's stored prediction (``samples.map_clusters`` of the cluster ids). Predictions stream in
before the matching is known, so the PNGs are written with cluster ids first and relabelled once it is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .data.base import display_palette
from .samples import map_clusters
from .store import write_atomically

UNLABELLED_8, UNLABELLED_16 = 255, 65535
OVERLAY_ALPHA = 0.5


def run_folder(root: str | Path, config: dict, config_hash: str) -> Path:
    label = f"{config['backbone']}_{config['task']}_{config['dataset']}-{config['split']}_K{config['k']}_seed{config['seed']}"
    return Path(root) / f"{re.sub(r'[^A-Za-z0-9_.=-]+', '-', label).strip('-')}-{config_hash}"


def is_complete(folder: Path) -> bool:
    return (folder / "run.json").is_file()


def _file_id(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", image_id)


def _write_png(path: Path, ids: np.ndarray, palette: np.ndarray) -> None:
    if ids.max(initial=-1) < UNLABELLED_8:
        image = Image.fromarray(np.where(ids < 0, UNLABELLED_8, ids).astype(np.uint8), mode="P")
        colours = np.zeros((256, 3), dtype=np.uint8)
        colours[:len(palette)] = palette[:256]
        image.putpalette(colours.ravel().tolist())
    else:
        image = Image.fromarray(np.where(ids < 0, UNLABELLED_16, ids).astype(np.uint16))
    write_atomically(path, lambda f: image.save(f, format="PNG"))


def read_ids(path: Path) -> np.ndarray:
    """The ids of a written PNG, -1 = unlabelled (what tests and users compare with the stored prediction)."""
    with Image.open(path) as image:
        raw = np.asarray(image).astype(np.int64)
        unlabelled = UNLABELLED_8 if image.mode == "P" else UNLABELLED_16
    return np.where(raw == unlabelled, -1, raw)


class PredictionWriter:
    """Writes one run's predictions as they stream in; ``finish`` relabels them and writes overlays and run.json."""

    def __init__(self, folder: Path, ids: list[str], k: int):
        self.folder, self.ids, self.k = folder, ids, k
        self.written: list[int] = []
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.json").unlink(missing_ok=True)  # incomplete until finished

    def path(self, index: int) -> Path:
        return self.folder / f"{_file_id(self.ids[index])}.png"

    def add(self, index: int, clusters: np.ndarray) -> None:
        _write_png(self.path(index), clusters, display_palette(None, max(self.k, 1)))
        self.written.append(index)

    def finish(self, config: dict, config_hash: str, image: Callable[[int], np.ndarray],
               cluster_to_class: list[int] | None, palette, class_names: list[str]) -> None:
        """``cluster_to_class``: the run's matching (None without ground truth: cluster ids stay)."""
        if cluster_to_class is None:
            colours, names, meaning = display_palette(None, max(self.k, 1)), [f"cluster {i}" for i in range(self.k)], "clusters"
        else:
            colours, names, meaning = display_palette(palette, len(class_names)), list(class_names), "classes"
        (self.folder / "overlay").mkdir(exist_ok=True)
        for index in self.written:
            ids = read_ids(self.path(index))
            if cluster_to_class is not None:
                ids = map_clusters(ids, cluster_to_class).astype(np.int64)
            _write_png(self.path(index), ids, colours)
            self._overlay(index, image(index), ids, colours)
        info = {"run": config_hash, "ids": meaning, "names": names, "colours": colours.tolist(),
                "unlabelled": UNLABELLED_8 if max(len(names), 1) < UNLABELLED_8 else UNLABELLED_16,
                "images": len(self.written), "backbone": config["backbone"], "task": config["task"],
                "dataset": config["dataset"], "split": config["split"], "k": config["k"], "seed": config["seed"],
                "random_weights": config.get("random_weights", False),
                "resolution": "protocol (config.protocol): the resized and cropped image the run saw"}
        write_atomically(self.folder / "run.json", lambda f: f.write(json.dumps(info, indent=1).encode()))

    def _overlay(self, index: int, image: np.ndarray, ids: np.ndarray, colours: np.ndarray) -> None:
        painted = image.astype(np.float32)
        known = ids >= 0
        lookup = np.concatenate([colours, np.zeros((1, 3), np.uint8)])[np.where(known, np.minimum(ids, len(colours)), len(colours))]
        painted[known] = (1 - OVERLAY_ALPHA) * painted[known] + OVERLAY_ALPHA * lookup[known]
        out = Image.fromarray(np.clip(painted, 0, 255).astype(np.uint8))
        write_atomically(self.folder / "overlay" / f"{_file_id(self.ids[index])}.jpg",
                         lambda f: out.save(f, format="JPEG", quality=90))
