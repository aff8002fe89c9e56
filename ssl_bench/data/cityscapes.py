"""Cityscapes-27 (IIC / PiCIE / STEGO): the 27 non-void categories, ``labelId - 7`` for ids 7..33."""

from __future__ import annotations

import numpy as np

from ssl_bench.data.base import Sample, SegDataset, apply_lut, label_lut, require_dir
from ssl_bench.errors import UserError

FIRST_NONVOID = 7  # labelIds 0..6 are void (unlabeled, ego vehicle, rectification border, ...)


class Cityscapes27(SegDataset):
    """Official layout: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
    ``gtFine/{split}/{city}/*_gtFine_labelIds.png``."""

    name = "cityscapes27"
    title = "Cityscapes"
    default_root = "the Cityscapes root (with leftImg8bit/ and gtFine/)"
    splits = ("train", "val")
    default_split = "val"
    class_names = ["road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
                   "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
                   "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
                   "motorcycle", "bicycle"]
    num_classes = 27
    # The official Cityscapes colours of labelIds 7..33.
    palette = np.array([[128, 64, 128], [244, 35, 232], [250, 170, 160], [230, 150, 140], [70, 70, 70],
                        [102, 102, 156], [190, 153, 153], [180, 165, 180], [150, 100, 100], [150, 120, 90],
                        [153, 153, 153], [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35],
                        [152, 251, 152], [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70],
                        [0, 60, 100], [0, 0, 90], [0, 0, 110], [0, 80, 100], [0, 0, 230], [119, 11, 32]],
                       dtype=np.uint8)
    _lut = label_lut({FIRST_NONVOID + c: c for c in range(27)})

    def _index(self) -> list[Sample]:
        hint = f"pass --data-root pointing at {self.default_root}"
        if (self.root / "leftImg8bit").is_dir() and not (self.root / "leftImg8bit" / self.split).is_dir():
            hint = f"this root has no {self.split} split -- extract its archives, or use --split " + \
                   " / ".join(p.name for p in sorted((self.root / "leftImg8bit").iterdir()) if p.is_dir())
        images = require_dir(self.root / "leftImg8bit" / self.split, f"{self.title} images", hint)
        labels = require_dir(self.root / "gtFine" / self.split, f"{self.title} gtFine labels", hint)
        samples = []
        for image in sorted(images.glob("*/*_leftImg8bit.png")):
            stem = image.name[: -len("_leftImg8bit.png")]
            label = labels / image.parent.name / f"{stem}_gtFine_labelIds.png"
            if not label.is_file():
                raise UserError(f"{self.title}: missing label {label} -- extract gtFine_trainvaltest.zip into {self.root}")
            samples.append(Sample(stem, image, label))
        return samples

    def decode_label(self, raw: np.ndarray) -> np.ndarray:
        return apply_lut(raw, self._lut, self.title)
