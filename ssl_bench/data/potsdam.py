"""Potsdam-3 (IIC / STEGO / PriMaPs): ISPRS Potsdam merged into 3 classes.

Merge: {impervious surfaces, car} -> roads and cars, {building, clutter} -> buildings and clutter,
{low vegetation, tree} -> vegetation (STEGO ``Potsdam.fine_to_coarse``).

Two layouts under ``root``:

- mmsegmentation (``tools/dataset_converters/potsdam.py``): ``img_dir/{split}/*.png`` and
  ``ann_dir/{split}/*.png``, grey ids 0 boundary (ignored), 1 impervious, 2 building, 3 low
  vegetation, 4 tree, 5 car, 6 clutter; a flat ``img_dir/`` + ``ann_dir/`` is served as ``val``;
- IIC / STEGO: ``imgs/<id>.mat`` (key ``img``, RGB+IR; IR dropped) and ``gt/<id>.mat`` (key ``gt``,
  0 impervious, 1 building, 2 low vegetation, 3 tree, 4 car, 5 clutter, 255 ignore) with split
  lists ``labelled_train.txt`` (train) and ``labelled_test.txt`` (val), read by ``matfile.py`` (MATLAB v5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ssl_bench.data.base import Sample, SegDataset, apply_lut, label_lut, pair_by_stem, read_lines
from ssl_bench.data.matfile import MatError, load_numeric
from ssl_bench.errors import UserError
from ssl_bench.integrity import regular_file
from ssl_bench.resources import memory_limit

ROADS, BUILDINGS, VEGETATION = 0, 1, 2
# IIC fine order: impervious, building, low vegetation, tree, car, clutter.
IIC_TO_3 = {0: ROADS, 1: BUILDINGS, 2: VEGETATION, 3: VEGETATION, 4: ROADS, 5: BUILDINGS}
# mmseg ids are the IIC ids + 1, with 0 = boundary.
MMSEG_TO_3 = {fine + 1: coarse for fine, coarse in IIC_TO_3.items()}
MAT_SPLIT_LISTS = {"train": "labelled_train.txt", "val": "labelled_test.txt"}


class Potsdam3(SegDataset):
    name = "potsdam3"
    title = "Potsdam"
    default_root = "a Potsdam folder in the mmsegmentation layout (img_dir/, ann_dir/) or the IIC/STEGO layout (imgs/, gt/)"
    splits = ("train", "val")
    default_split = "val"
    class_names = ["roads and cars", "buildings and clutter", "vegetation"]
    num_classes = 3
    palette = np.array([[255, 255, 255], [0, 0, 255], [0, 255, 0]], dtype=np.uint8)

    def _index(self) -> list[Sample]:
        if (self.root / "img_dir").is_dir():
            self._mat, self._lut = False, label_lut(MMSEG_TO_3)
            return self._index_mmseg()
        if (self.root / "imgs").is_dir():
            self._mat, self._lut = True, label_lut(IIC_TO_3)
            return self._index_mat()
        raise UserError(f"Potsdam not found at {self.root}: expected {self.root / 'img_dir'} or {self.root / 'imgs'} -- "
                        f"pass --data-root pointing at {self.default_root}")

    def _index_mmseg(self) -> list[Sample]:
        images, labels = self.root / "img_dir", self.root / "ann_dir"
        if (images / self.split).is_dir():
            images, labels = images / self.split, labels / self.split
        elif any((images / s).is_dir() for s in self.splits) or self.split != self.default_split:
            raise UserError(f"Potsdam split {self.split!r} not found: expected {images / self.split} -- "
                            f"use --split {self.default_split} or convert the split with mmsegmentation")
        if not labels.is_dir():
            raise UserError(f"Potsdam labels not found at {labels} -- put the label PNGs beside img_dir/ in ann_dir/")
        return pair_by_stem(images, labels, self.title)

    def _index_mat(self) -> list[Sample]:
        listing = self.root / MAT_SPLIT_LISTS[self.split]
        if not listing.is_file():
            raise UserError(f"Potsdam split list not found at {listing} -- use the IIC/STEGO potsdam folder")
        ids = read_lines(listing, "Potsdam split list")
        return [Sample(i, self.root / "imgs" / f"{i}.mat", self.root / "gt" / f"{i}.mat") for i in ids]

    def _load_mat(self, path: Path, key: str) -> np.ndarray:
        if not path.exists():
            raise UserError(f"Potsdam: missing file {path} -- the data root {self.root} is incomplete")
        regular_file(path, "Potsdam:")  # a FIFO would block the read forever
        try:  # not scipy.io.loadmat: it crashes the process on some damaged files
            array = load_numeric(path, max_bytes=memory_limit() // 4)[key]
        except (MatError, KeyError, OSError) as err:
            raise UserError(f"Potsdam: cannot read '{key}' from {path} ({type(err).__name__}: {str(err)[:120]}) -- the "
                            f"file is damaged or not of the IIC/STEGO layout; replace or remove it") from None
        wanted = 3 if key == "img" else 2  # RGB+IR image, or a label map
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf" or array.ndim != wanted \
                or min(array.shape[:2], default=0) < 1 or (key == "img" and array.shape[2] < 3):
            raise UserError(f"Potsdam: '{key}' in {path} is not {'an RGB(+IR) image' if key == 'img' else 'a label map'}"
                            f" (got {getattr(array, 'dtype', '?')} {getattr(array, 'shape', '?')}) -- the file is "
                            f"damaged or not of the IIC/STEGO layout; replace or remove it")
        return array

    def load_image(self, i: int) -> Image.Image:
        if not self._mat:
            return super().load_image(i)
        img = self._load_mat(self.samples[i].image, "img")[..., :3]  # drop the IR channel, as STEGO does
        return Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8), "RGB")

    def load_label(self, i: int) -> np.ndarray:
        if not self._mat:
            return super().load_label(i)
        return self.decode_label(self._load_mat(self.samples[i].label, "gt"))

    def image_size(self, i: int) -> tuple[int, int]:
        if not self._mat:
            return super().image_size(i)
        h, w = self._load_mat(self.samples[i].image, "img").shape[:2]
        return w, h

    def decode_label(self, raw: np.ndarray) -> np.ndarray:
        return apply_lut(raw, self._lut, self.title)
