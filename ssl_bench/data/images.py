"""A folder of images without ground truth: your own photos, segmented by any method.

Every image under ``root`` (sub-folders included, sorted by path; the id is the path without its suffix) is
one sample of the single split ``all``. There are no classes, so K is always given (``--k 8``), methods run
as anywhere else, and a run stores what its predictions look like (``stats["predictions"]``: the share of the
pixels and images each cluster takes, clusters per image; plus a method's own segment statistics) instead of
metrics; ``--save-predictions DIR`` writes every image's cluster ids and a colour overlay.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ssl_bench.data.base import IMAGE_EXTS, Sample, SegDataset
from ssl_bench.errors import UserError


class ImageFolder(SegDataset):
    name = "images"
    title = "Image folder (no ground truth)"
    default_root = "any folder of images (.jpg, .png, ...; sub-folders included)"
    splits = ("all",)
    default_split = "all"
    num_classes = 0
    class_names: list[str] = []
    palette = np.zeros((0, 3), dtype=np.uint8)
    has_labels = False

    @property
    def identity(self) -> dict:
        # Two folders may hold the same file names and other pixels: an image folder is its location.
        return {"root": str(self.root.resolve())}

    def _index(self) -> list[Sample]:
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        ids = [p.relative_to(self.root).with_suffix("").as_posix() for p in files]
        twice = sorted(i for i, n in Counter(ids).items() if n > 1)
        if twice:  # one id, two files: their predictions would overwrite each other
            raise UserError(f"{self.title}: several images named {twice[0]}.* in {self.root} -- keep one file per name")
        return [Sample(i, p, None) for i, p in zip(ids, files)]

    def load_label(self, i: int) -> np.ndarray:
        raise UserError(f"{self.title} at {self.root} has no ground truth -- use a dataset with masks for metrics")
