"""SUIM underwater imagery (Islam et al. 2020), as evaluated by DatUS^2.

Masks are 24-bit RGB BMPs in a pure-colour code; the 8 SUIM classes are
``4*(R>127) + 2*(G>127) + (B>127)``: BW waterbody, HD divers, PF plants, WR wrecks, RO robots,
RI reefs, FV fish, SR sea-floor. Thresholding (not exact colour matching) absorbs the off-colour
pixels some masks have along region borders.

DatUS^2 evaluates 6 classes: BW, PF and SR merged into one background class. Order and names follow
its code (SonalKumar95/DatUS ``utils/true_annotations.py``): HD, RO, FV, RI, WR, background.
"""

from __future__ import annotations

import numpy as np

from ssl_bench.data.base import Sample, SegDataset, label_lut, pair_by_stem
from ssl_bench.errors import UserError

SUIM8_NAMES = ["waterbody", "human divers", "plants and sea-grass", "wrecks and ruins", "robots",
               "reefs and invertebrates", "fish and vertebrates", "sea-floor and rocks"]
# The colour of each SUIM code is its bits as (R, G, B).
SUIM8_PALETTE = np.array([[255 * (c >> 2 & 1), 255 * (c >> 1 & 1), 255 * (c & 1)] for c in range(8)], dtype=np.uint8)
SUIM6_NAMES = ["human divers", "robots", "fish and vertebrates", "reefs and invertebrates", "wrecks and ruins",
               "background (waterbody, plants, sea-floor)"]
# SUIM code -> DatUS^2 class: BW, PF, SR -> 5; HD 0, RO 1, FV 2, RI 3, WR 4.
SUIM8_TO_6 = {0: 5, 1: 0, 2: 5, 3: 4, 4: 1, 5: 3, 6: 2, 7: 5}
SUIM6_PALETTE = SUIM8_PALETTE[[1, 4, 6, 5, 3, 7]]

# Official release: train_val/{images,masks}, TEST/{images,masks}.
OFFICIAL_DIRS = {"train": "train_val", "test": "TEST"}


class SUIM(SegDataset):
    """Layouts: official ``train_val/`` + ``TEST/`` (``images/*.jpg``, ``masks/*.bmp``), or a flat
    ``images/`` + ``masks/`` folder holding the test images (the shared copy), served as ``test``."""

    name = "suim"
    title = "SUIM"
    default_root = "the SUIM folder (with train_val/ and TEST/, each holding images/ and masks/)"
    splits = ("train", "test")
    default_split = "test"
    num_classes = 6
    class_names = SUIM6_NAMES
    palette = SUIM6_PALETTE

    def __init__(self, root, split: str, classes: int = 6):
        if classes not in (6, 8):
            raise UserError(f"SUIM has 8 classes or the DatUS^2 6-class merge, not {classes} -- pass classes=6 or classes=8")
        self.num_classes = classes
        self.name = "suim" if classes == 6 else "suim8"
        self.class_names = list(SUIM6_NAMES if classes == 6 else SUIM8_NAMES)
        self.palette = SUIM6_PALETTE if classes == 6 else SUIM8_PALETTE
        self._lut = label_lut(SUIM8_TO_6 if classes == 6 else range(8), size=8)
        super().__init__(root, split)

    def _index(self) -> list[Sample]:
        if any((self.root / d).is_dir() for d in OFFICIAL_DIRS.values()):
            base = self.root / OFFICIAL_DIRS[self.split]
            if not base.is_dir():
                raise UserError(f"SUIM split {self.split!r} not found: expected {base} -- "
                                f"pass --data-root pointing at {self.default_root}")
        elif (self.root / "images").is_dir():
            base = self.root
            if self.split != "test":
                raise UserError(f"SUIM at {self.root} is a flat images/ + masks/ folder (the test set) -- use --split test")
        else:
            raise UserError(f"SUIM not found at {self.root}: expected {self.root / 'TEST'} or "
                            f"{self.root / 'images'} -- pass --data-root pointing at {self.default_root}")
        return pair_by_stem(base / "images", base / "masks", self.title, mask_exts=(".bmp", ".png"))

    def decode_label(self, raw: np.ndarray) -> np.ndarray:
        if raw.ndim != 3 or raw.shape[2] < 3:
            raise UserError(f"SUIM masks must be RGB colour-coded BMPs, got shape {raw.shape} -- use the official masks/")
        bits = raw[..., :3] > 127
        code = 4 * bits[..., 0] + 2 * bits[..., 1] + bits[..., 2]
        return self._lut[code]

    def load_label(self, i: int) -> np.ndarray:
        return self.decode_label(self._read(self.samples[i].label, lambda im: np.asarray(im.convert("RGB"))))


class SUIM8(SUIM):
    """SUIM with its 8 original classes."""

    name = "suim8"
    num_classes = 8
    class_names = SUIM8_NAMES
    palette = SUIM8_PALETTE

    def __init__(self, root, split: str, classes: int = 8):
        super().__init__(root, split, classes=classes)
