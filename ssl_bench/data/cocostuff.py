"""COCO-Stuff-27 (IIC / PiCIE / STEGO): the 182 COCO-Stuff fine classes merged into 27 coarse ones.

STEGO layout under ``root``::

    images/{train2017,val2017}/<id>.jpg
    annotations/{train2017,val2017}/<id>.png          (stuffthingmaps: 0..181, 255 = unlabeled)
    curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse_7.txt   (one image id per line)

The curated lists (49,629 train / 2,175 val ids) are the IIC/PiCIE subset STEGO evaluates on;
``image_list`` selects another list in ``curated/`` (STEGO trains on ``Coco164kFull_Stuff_Coarse.txt``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssl_bench.data.base import Sample, SegDataset, apply_lut, bitwise_palette, label_lut, read_lines
from ssl_bench.errors import UserError

CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"

# 12 "things" supercategories, then 15 "stuff" ones (COCO-Stuff hierarchy; STEGO names these without
# the suffix, which makes "food" and "furniture" appear twice).
COARSE_NAMES = [
    "electronic-things", "appliance-things", "food-things", "furniture-things", "indoor-things",
    "kitchen-things", "accessory-things", "animal-things", "outdoor-things", "person-things",
    "sports-things", "vehicle-things",
    "ceiling-stuff", "floor-stuff", "food-stuff", "furniture-stuff", "rawmaterial-stuff", "textile-stuff",
    "wall-stuff", "window-stuff", "building-stuff", "ground-stuff", "plant-stuff", "sky-stuff", "solid-stuff",
    "structural-stuff", "water-stuff",
]

# Fine stuffthingmap id (0 = person ... 90 things incl. the 11 unused COCO ids, 91 = banner ... 181 =
# wood) -> coarse id above. Exactly STEGO's ``Coco.fine_to_coarse`` (src/data.py), itself PiCIE's.
FINE_TO_COARSE = [
     9, 11, 11, 11, 11, 11, 11, 11, 11,  8,  # 0-9
     8,  8,  8,  8,  8,  7,  7,  7,  7,  7,  # 10-19
     7,  7,  7,  7,  7,  6,  6,  6,  6,  6,  # 20-29
     6,  6,  6, 10, 10, 10, 10, 10, 10, 10,  # 30-39
    10, 10, 10,  5,  5,  5,  5,  5,  5,  5,  # 40-49
     5,  2,  2,  2,  2,  2,  2,  2,  2,  2,  # 50-59
     2,  3,  3,  3,  3,  3,  3,  3,  3,  3,  # 60-69
     3,  0,  0,  0,  0,  0,  0,  1,  1,  1,  # 70-79
     1,  1,  1,  4,  4,  4,  4,  4,  4,  4,  # 80-89
     4, 17, 17, 22, 20, 20, 22, 15, 25, 16,  # 90-99
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15,  # 100-109
    21, 15, 25, 13, 13, 13, 13, 13, 22, 26,  # 110-119
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15,  # 120-129
    17, 16, 15, 22, 24, 21, 17, 25, 16, 21,  # 130-139
    17, 22, 16, 21, 21, 25, 21, 26, 21, 24,  # 140-149
    20, 17, 14, 21, 26, 15, 23, 20, 21, 24,  # 150-159
    15, 24, 22, 25, 15, 20, 17, 17, 22, 14,  # 160-169
    18, 18, 18, 18, 18, 18, 18, 26, 26, 19,  # 170-179
    19, 24,  # 180-181
]


def read_curated_list(root: str | Path, split: str, image_list: str = CURATED_LIST) -> list[str]:
    """Image ids of ``root/curated/{split}2017/{image_list}``, in file order."""
    path = Path(root) / "curated" / f"{split}2017" / image_list
    if not path.is_file():
        raise UserError(f"COCO-Stuff image list not found at {path} -- put the IIC/PiCIE curated lists in "
                        f"{Path(root) / 'curated'} (github.com/janghyuncho/PiCIE curated/)")
    return read_lines(path, "COCO-Stuff image list")


class CocoStuff27(SegDataset):
    name = "cocostuff27"
    title = "COCO-Stuff"
    default_root = "a COCO-Stuff root in the STEGO layout (images/, annotations/, curated/)"
    splits = ("train", "val")
    default_split = "val"
    class_names = COARSE_NAMES
    num_classes = 27
    palette = bitwise_palette(28)[1:]  # skip black, kept for unlabelled in visualisations
    _lut = label_lut(FINE_TO_COARSE)  # 255 and anything else -> ignore

    def __init__(self, root, split: str, image_list: str = CURATED_LIST):
        self.image_list = image_list
        super().__init__(root, split)

    def _index(self) -> list[Sample]:
        folder = f"{self.split}2017"
        ids = read_curated_list(self.root, self.split, self.image_list)
        samples = [Sample(i, self.root / "images" / folder / f"{i}.jpg", self.root / "annotations" / folder / f"{i}.png")
                   for i in ids]
        # Check one image now: a root with lists but no images (a common half-finished setup) should
        # fail at open, not an hour into feature extraction.
        if samples and not samples[0].image.is_file():
            raise UserError(f"COCO-Stuff images missing: expected {samples[0].image} -- download COCO 2017 images and "
                            f"stuffthingmaps into {self.root}/images and {self.root}/annotations (STEGO layout)")
        return samples

    def decode_label(self, raw: np.ndarray) -> np.ndarray:
        return apply_lut(raw, self._lut, self.title)
