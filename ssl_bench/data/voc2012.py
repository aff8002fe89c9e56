"""PASCAL VOC 2012 segmentation: 21 classes (background + 20 objects), palette PNGs, 255 = void."""

from __future__ import annotations

import numpy as np

from ssl_bench.data.base import Sample, SegDataset, apply_lut, bitwise_palette, label_lut, pair_by_stem, read_lines
from ssl_bench.errors import UserError


class VOC2012(SegDataset):
    """Two layouts under ``root``:

    - official: ``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/Segmentation/{train,val}.txt``
      (``root`` may also be the ``VOCdevkit`` folder holding ``VOC2012/``);
    - flat: ``images/`` + ``masks/`` paired by stem, one set served as the ``val`` split
      (the shared samples are VOC val images).
    """

    name = "voc2012"
    title = "PASCAL VOC 2012"
    default_root = "the VOC2012 folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)"
    splits = ("train", "val")
    default_split = "val"
    class_names = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
                   "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
                   "sheep", "sofa", "train", "tvmonitor"]
    num_classes = 21
    background_class = 0
    prompt_names = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                    "cow", "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
                    "train", "tv monitor"]  # the spaced names CLIP reads as words
    palette = bitwise_palette(21)
    _lut = label_lut(range(21))  # 255 void (object borders) -> ignore

    def _index(self) -> list[Sample]:
        root = self.root / "VOC2012" if (self.root / "VOC2012").is_dir() else self.root
        listing = root / "ImageSets" / "Segmentation" / f"{self.split}.txt"
        if listing.is_file():
            ids = read_lines(listing, "VOC split list")
            return [Sample(i, root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
        if (root / "images").is_dir() and (root / "masks").is_dir():
            if self.split != self.default_split:
                raise UserError(f"{self.title} at {root} is a flat images/ + masks/ folder (one set, served as split "
                                f"'{self.default_split}') -- use --split {self.default_split} or the official layout")
            return pair_by_stem(root / "images", root / "masks", self.title)
        raise UserError(f"{self.title} not found at {root}: expected {listing} or images/ + masks/ -- "
                        f"pass --data-root pointing at {self.default_root}")

    def decode_label(self, raw: np.ndarray) -> np.ndarray:
        # Palette PNGs decode to indices; an RGB-converted mask would lose the ids, so reject it.
        return apply_lut(raw, self._lut, self.title)
