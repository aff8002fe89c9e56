"""A synthetic dataset that needs no files: textured regions with exact labels.

Each image is a Voronoi partition (5-9 cells) whose cells get one of 5 classes. Classes come in
colour pairs told apart only by texture (calm vs wavy water, smooth sand vs brick), plus a grainy
green; every pixel also gets Gaussian noise and each image a brightness shift. So a single pixel
value does not decide the class, while per-patch colour mean + texture statistics do: a colour /
texture reference backbone can solve it, a method that ignores texture cannot fully.

Fully deterministic per (seed, split, index); splits use disjoint random streams.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from PIL import Image

from ssl_bench.data.base import SegDataset
from ssl_bench.errors import UserError
from ssl_bench.resources import require_memory

CLASS_NAMES = ["calm water", "waves", "grass", "sand", "brick"]
MEAN_COLOURS = np.array([[60, 100, 170], [60, 100, 170], [70, 140, 60], [190, 170, 120], [190, 170, 120]], dtype=np.float32)
TEXTURE_AMPLITUDE = 45.0  # stripes / checker / grain strength, well above the pixel noise
PIXEL_NOISE = 10.0
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
RENDER_BYTES_PER_PIXEL = 180  # peak of ``render`` (measured: 160-170 bytes per pixel with 9 cells)
ID_BYTES = 64  # an image id string and its place in the list


class SyntheticDataset(SegDataset):
    name = "synthetic"
    title = "Synthetic textures"
    default_root = "nothing (generated in memory; --data-root is ignored)"
    splits: ClassVar[tuple[str, ...]] = tuple(SPLIT_CODES)
    default_split = "val"
    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)
    palette = MEAN_COLOURS.astype(np.uint8)
    image_options = ("size", "seed")  # n is in the ids
    count_options = ("n",)  # how many images: n=12 is a subset of n=24 (reports show the largest by default)

    def __init__(self, root=None, split: str = "val", n: int = 24, size: int = 192, seed: int = 0):
        self._check_split(split)
        if n < 1 or size < 16:
            raise UserError(f"synthetic dataset needs n >= 1 and size >= 16, got n={n}, size={size} -- e.g. n=24 size=192")
        require_memory(RENDER_BYTES_PER_PIXEL * size * size, f"synthetic size={size} (one {size}x{size} image)",
                       "use a smaller size, e.g. size=192")
        require_memory(ID_BYTES * n, f"synthetic n={n} (its list of image ids)", "use fewer images, e.g. n=24")
        self.root, self.split = None, split
        self.n, self.size, self.seed = int(n), int(size), int(seed)
        self._last: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def ids(self) -> list[str]:
        return [f"{self.split}_{i:04d}" for i in range(self.n)]

    def __len__(self) -> int:
        return self.n

    def load_image(self, i: int) -> Image.Image:
        return Image.fromarray(self._render(i)[0], "RGB")

    def load_label(self, i: int) -> np.ndarray:
        return self._render(i)[1].copy()

    def image_size(self, i: int) -> tuple[int, int]:
        self._index_ok(i)
        return self.size, self.size

    def _index_ok(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise IndexError(f"image {i} out of range for {self.n} synthetic images")

    def _render(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (S, S, 3), label int64 (S, S)); the last one is cached since callers
        usually ask for the image and then the label of the same index."""
        self._index_ok(i)
        if self._last is not None and self._last[0] == i:
            return self._last[1], self._last[2]
        image, label = render(np.random.default_rng([self.seed, SPLIT_CODES[self.split], i]), self.size)
        self._last = (i, image, label)
        return image, label


def render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its exact label map, drawn from ``rng``."""
    k = int(rng.integers(5, 10))
    points = rng.uniform(0, size, (k, 2))
    cell_class = rng.integers(0, len(CLASS_NAMES), k)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dist = (yy[None] - points[:, 0, None, None]) ** 2 + (xx[None] - points[:, 1, None, None]) ** 2
    cell = dist.argmin(0)
    label = cell_class[cell].astype(np.int64)

    # Per-class texture field (one value per pixel, added to all channels).
    period = rng.uniform(5.0, 8.0)
    stripes = TEXTURE_AMPLITUDE * np.sin(2 * np.pi * yy / period + rng.uniform(0, 2 * np.pi))
    checker = TEXTURE_AMPLITUDE * (2.0 * (((xx // 4) + (yy // 4)) % 2) - 1.0)
    grain = rng.normal(0.0, TEXTURE_AMPLITUDE, (size, size)).astype(np.float32)
    texture = np.select([label == 1, label == 2, label == 4], [stripes, grain, checker], 0.0)

    cell_jitter = rng.uniform(-8, 8, (k, 3)).astype(np.float32)  # regions of one class vary a little
    image = MEAN_COLOURS[label] + cell_jitter[cell] + texture[..., None]
    image += rng.normal(0.0, PIXEL_NOISE, image.shape).astype(np.float32) + rng.uniform(-12, 12)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label
