"""A generic folder of images and index masks, for datasets without a dedicated reader.

Layout under ``root``::

    classes.txt          one class name per line; line k names id k
    images/<stem>.jpg|png|...   masks/<stem>.png   (grey or palette PNG of class ids)

or the same with one subfolder per split (``images/val/``, ``masks/val/``). A flat folder is a
single set served as split ``val``. The ``ignore`` value (default 255) maps to -1; any other id
outside ``classes.txt`` is an error rather than a silently dropped pixel.
"""

from __future__ import annotations

import numpy as np

from ssl_bench.data.base import Sample, SegDataset, bitwise_palette, pair_by_stem, read_lines, require_dir
from ssl_bench.errors import UserError


class FolderDataset(SegDataset):
    name = "folder"
    title = "Folder dataset"
    default_root = "a folder with classes.txt, images/ and masks/ (optionally split into images/<split>/ ...)"
    splits = ("train", "val", "test")
    default_split = "val"
    num_classes = 0  # read from classes.txt

    def __init__(self, root, split: str, ignore: int = 255):
        self.ignore = int(ignore)
        super().__init__(root, split)

    @property
    def identity(self) -> dict:
        # Two folders may hold the same file names and other pixels: a generic folder is its location.
        return {"root": str(self.root.resolve())}

    def _index(self) -> list[Sample]:
        classes = self.root / "classes.txt"
        if not classes.is_file():
            raise UserError(f"folder dataset at {self.root} has no classes.txt -- write one class name per line "
                            f"(line k names mask id k)")
        self.class_names = read_lines(classes, "folder dataset class list")
        if not self.class_names:
            raise UserError(f"{classes} is empty -- write one class name per line")
        self.num_classes = len(self.class_names)
        self.palette = bitwise_palette(self.num_classes)
        hint = f"pass --data-root pointing at {self.default_root}"
        images = require_dir(self.root / "images", "folder dataset images", hint)
        masks = require_dir(self.root / "masks", "folder dataset masks", f"{hint} (images without masks: --dataset "
                            f"images --data-root {images} segments them without metrics)")
        if (images / self.split).is_dir():
            images, masks = images / self.split, require_dir(masks / self.split, "folder dataset masks", hint)
        elif any((images / s).is_dir() for s in self.splits) or self.split != self.default_split:
            raise UserError(f"folder dataset at {self.root} has no split {self.split!r} (expected {images / self.split}) "
                            f"-- a flat images/ folder is served as --split {self.default_split}")
        return pair_by_stem(images, masks, f"folder dataset {self.root}")

    def load_label(self, i: int) -> np.ndarray:
        raw = self._read(self.samples[i].label, np.asarray)  # its errors name the file already
        try:
            return self.decode_label(raw)
        except UserError as err:  # name the offending file: the decoder only sees pixels
            raise UserError(f"{self.samples[i].label}: {err}") from None

    def decode_label(self, raw: np.ndarray) -> np.ndarray:
        if raw.ndim != 2:
            raise UserError(f"folder dataset masks must be single-channel class-id PNGs, got shape {raw.shape} -- "
                            f"save masks as grey or palette PNGs")
        label = raw.astype(np.int64)
        void = label == self.ignore
        bad = ~void & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            raise UserError(f"folder dataset mask value {int(label[bad][0])} is not a class id (0..{self.num_classes - 1}) "
                            f"nor the ignore value {self.ignore} -- fix the mask or pass ignore=<value>")
        label[void] = -1
        return label
