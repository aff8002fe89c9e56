"""Five-crop views of a dataset: each image becomes its four corner crops and its centre crop.

STEGO and HP train on such views of the training images (their ``crop_type: five``, ``crop_ratio: 0.5``):
a crop is ``ratio`` of the image's height and width, cut as torchvision's ``five_crop`` cuts it (corners
flush with the edges, the centre crop's offsets rounded as ``center_crop`` rounds them), in the order
top-left, top-right, bottom-left, bottom-right, centre. The label is cut the same way, so every view is
an ordinary image / ground-truth pair and the evaluation protocol then applies to it as to any image.

Any reader takes it as a dataset option (``-o crops=five``, ``-o crop_ratio=0.5``); a task reads a view of a
split with ``ctx.features(kind, split, options={"crops": "five"})``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ssl_bench.data.base import SegDataset
from ssl_bench.errors import UserError

CROPS = ("none", "five")
CORNERS = ("tl", "tr", "bl", "br", "center")


def five_crop_boxes(width: int, height: int, ratio: float) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of the five crops of a ``width`` x ``height`` image, torchvision's order."""
    cw, ch = int(width * ratio), int(height * ratio)
    if cw < 1 or ch < 1:
        raise UserError(f"crop_ratio={ratio} leaves no pixel of a {width}x{height} image -- use a ratio in (0, 1]")
    left, top = int(round((width - cw) / 2.0)), int(round((height - ch) / 2.0))
    corners = [(0, 0), (width - cw, 0), (0, height - ch), (width - cw, height - ch), (left, top)]
    return [(x, y, x + cw, y + ch) for x, y in corners]


class FiveCrops(SegDataset):
    """The five crops of every image of ``base``: view ``5 i + j`` is crop ``CORNERS[j]`` of image ``i``."""

    def __init__(self, base: SegDataset, ratio: float = 0.5):
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
            raise UserError(f"dataset option crop_ratio={ratio!r} must be a number in (0, 1] -- e.g. -o crop_ratio=0.5")
        self.base, self.ratio = base, float(ratio)
        self.name, self.title, self.split = base.name, base.title, base.split
        self.splits, self.default_split, self.default_root = base.splits, base.default_split, base.default_root
        self.num_classes, self.class_names = base.num_classes, base.class_names
        self.palette = getattr(base, "palette", None)
        self.root = getattr(base, "root", None)
        self.image_options = (*base.image_options, "crops", "crop_ratio")  # other images: other features
        self._options = {**base.options, "crops": "five", "crop_ratio": self.ratio}
        self.limit_cuts = getattr(base, "limit_cuts", True)

    @property
    def identity(self) -> dict:
        return self.base.identity

    @property
    def samples(self) -> list:
        """The files the views are cut from (the label cache stamps their labels), one per image, not per view."""
        return getattr(self.base, "samples", [])

    @property
    def ids(self) -> list[str]:
        return [f"{image_id}@{corner}" for image_id in self.base.ids for corner in CORNERS]

    def __len__(self) -> int:
        return len(CORNERS) * len(self.base)

    def _box(self, i: int) -> tuple[int, tuple[int, int, int, int]]:
        image, corner = divmod(i, len(CORNERS))
        return image, five_crop_boxes(*self.base.image_size(image), self.ratio)[corner]

    def load_image(self, i: int) -> Image.Image:
        image, box = self._box(i)
        return self.base.load_image(image).crop(box)

    def load_label(self, i: int) -> np.ndarray:
        image, (left, top, right, bottom) = self._box(i)
        return self.base.load_label(image)[top:bottom, left:right].copy()

    def image_size(self, i: int) -> tuple[int, int]:
        _, (left, top, right, bottom) = self._box(i)
        return right - left, bottom - top

    @property
    def source_indices(self) -> np.ndarray:
        """The image of ``base`` each view was cut from."""
        return np.repeat(np.arange(len(self.base)), len(CORNERS))


def with_crops(dataset: SegDataset, crops, ratio) -> SegDataset:
    """``dataset`` itself (crops=none) or its five-crop view; a bad value is one line."""
    if crops not in CROPS:
        raise UserError(f"dataset option crops={crops!r} is not one of {', '.join(CROPS)} -- e.g. -o crops=five")
    if crops == "none":
        if ratio is not None:
            raise UserError("dataset option crop_ratio needs crops=five -- e.g. -o crops=five -o crop_ratio=0.5")
        return dataset
    return FiveCrops(dataset, 0.5 if ratio is None else ratio)
