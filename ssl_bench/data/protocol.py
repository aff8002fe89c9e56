"""The evaluation input protocol: how an original image / label becomes the network input / target.

Benchmark protocol (STEGO, HP, PriMaPs): resize the shorter side to 320 (nearest for labels),
centre-crop a 320 x 320 square, evaluate at that resolution. 320 is a multiple of the /8 and /16
patch sizes; for /14 backbones (DINOv2) the same papers' code uses 322 = 23 * 14 so the patch grid
covers the crop exactly (``Protocol.for_patch_size``).

Every geometric step here is exact and shared by image and label, so a prediction on the patch grid
upsampled to (H, W) lines up with the target pixel for pixel:

1. resize so the shorter side is ``resize`` (longer side ``int(resize * long / short)``, as
   torchvision's ``Resize(int)``);
2. ``crop="center"``: centre-crop a ``resize x resize`` square; ``crop="none"``: keep the aspect;
3. centre-crop each side down to a multiple of ``multiple`` (the patch size), so the patch grid is
   exact (a no-op for the benchmark sizes). Crop offsets round like torchvision's ``CenterCrop``.

Two scoring rules complete the protocol (``metrics.py`` says what each value does): ``overclustering``, how
K > C clusters are matched to classes, and ``absent_classes``, how a class without ground-truth pixels
counts. They change the numbers, not the inputs, so they are part of a run's configuration and hash but
not of the feature and label caches' keys (``input_dict``). Rows stored before they existed were scored
with ``LEGACY_SCORING``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ssl_bench.errors import UserError
from ssl_bench.metrics import ABSENT_CLASSES, OVERCLUSTERING
from ssl_bench.resources import require_memory

DEFAULT_RESIZE = 320
LARGE_RESIZE_PIXELS = 50_000_000  # resized images past this many pixels are checked against the memory
CROPS = ("center", "none")
# Extraction precision: fp32, or a torch.autocast of the backbone's forward pass in bfloat16 / float16 (the
# cache stores float16 rows either way). Recorded only when not fp32, so earlier runs keep their hashes.
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
_PIL_INTERP = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class Protocol:
    resize: int = DEFAULT_RESIZE
    crop: str = "center"  # "center" | "none"
    image_interp: str = "bilinear"
    label_interp: str = "nearest"  # the only choice: class ids cannot be interpolated
    overclustering: str = "majority"  # K > C: majority | hungarian (DatUS^2) | hungarian-majority | stego-drop
    absent_classes: str = "zero-if-predicted"  # a class absent from the ground truth: zero-if-predicted | ignore
    precision: str = "fp32"  # the backbone's forward pass: fp32 | bf16 | fp16 (autocast)

    def __post_init__(self):
        if not isinstance(self.resize, int) or self.resize < 1:
            raise UserError(f"protocol resize must be a positive integer, got {self.resize!r} -- e.g. --resize 320")
        if self.crop not in CROPS:
            raise UserError(f"unknown protocol crop {self.crop!r} -- choose one of: {', '.join(CROPS)}")
        if self.image_interp not in _PIL_INTERP:
            raise UserError(f"unknown image interpolation {self.image_interp!r} -- choose one of: {', '.join(_PIL_INTERP)}")
        if self.label_interp != "nearest":
            raise UserError(f"label interpolation {self.label_interp!r} is not supported -- labels are resized with 'nearest'")
        for name, allowed in (("overclustering", OVERCLUSTERING), ("absent_classes", ABSENT_CLASSES),
                              ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"unknown {name} rule {getattr(self, name)!r} -- choose one of: {', '.join(allowed)}")

    def as_dict(self) -> dict:
        """The protocol as runs record it (precision only where it is not fp32: earlier hashes stay valid)."""
        fields = dataclasses.asdict(self)
        if self.precision == "fp32":
            del fields["precision"]
        return fields

    def input_dict(self) -> dict:
        """The fields that shape images and features: what cached features depend on."""
        return {key: value for key, value in self.as_dict().items() if key not in SCORING_FIELDS}

    def for_labels(self) -> "Protocol":
        """The protocol as the label cache keys it: labels do not depend on the extraction's precision."""
        return dataclasses.replace(self, precision="fp32")

    def autocast(self, device) -> contextlib.AbstractContextManager:
        """The context of a backbone's forward pass: autocast to the protocol's precision (none for fp32)."""
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))

    @property
    def scoring(self) -> dict:
        """The scoring rules, as ``metrics.evaluate_counts`` takes them."""
        return {key: getattr(self, key) for key in SCORING_FIELDS}

    def for_patch_size(self, patch: int) -> "Protocol":
        """The benchmark protocol for a backbone of patch size ``patch``.

        The default 320 is rounded up to a multiple of the patch (320 for /8 and /16, 322 for /14,
        as HP and PriMaPs do for DINOv2); an explicitly chosen resize is kept as given.
        """
        if self.resize != DEFAULT_RESIZE or self.resize % patch == 0:
            return self
        return dataclasses.replace(self, resize=-(-self.resize // patch) * patch)

    # --- geometry ---------------------------------------------------------------------------------
    def _plan(self, w: int, h: int, multiple: int) -> tuple[int, int, int, int, int, int]:
        """(resized_w, resized_h, left, top, out_w, out_h) for an input of size w x h."""
        if w < 1 or h < 1 or multiple < 1:
            raise ValueError(f"bad size {w}x{h} or multiple {multiple}")
        if w <= h:
            rw, rh = self.resize, int(self.resize * h / w)
        else:
            rw, rh = int(self.resize * w / h), self.resize
        if rw * rh > LARGE_RESIZE_PIXELS:  # e.g. a damaged header saying 1 x 60000: 320 x 19,200,000 pixels
            require_memory(2 * 3 * rw * rh, f"an image of {w}x{h} pixels, resized to {rw}x{rh} for the protocol",
                           "the file is damaged or not an image of this dataset; replace or remove it")
        ow, oh = (min(rw, self.resize), min(rh, self.resize)) if self.crop == "center" else (rw, rh)
        ow, oh = ow - ow % multiple, oh - oh % multiple
        if ow == 0 or oh == 0:
            raise UserError(f"protocol resize {self.resize} is smaller than the patch size {multiple} -- raise --resize")
        left, top = int(round((rw - ow) / 2.0)), int(round((rh - oh) / 2.0))
        return rw, rh, left, top, ow, oh

    def output_size(self, w: int, h: int, multiple: int) -> tuple[int, int]:
        """(H, W) of the protocol output for an original image of width ``w`` and height ``h``."""
        *_, ow, oh = self._plan(w, h, multiple)
        return oh, ow

    def apply_image(self, image: Image.Image, multiple: int) -> np.ndarray:
        """PIL image -> uint8 (H, W, 3) at protocol resolution."""
        rw, rh, left, top, ow, oh = self._plan(*image.size, multiple)
        image = image.convert("RGB")
        if (rw, rh) != image.size:
            image = image.resize((rw, rh), _PIL_INTERP[self.image_interp])
        return np.asarray(image.crop((left, top, left + ow, top + oh)), dtype=np.uint8)

    def apply_label(self, label: np.ndarray, multiple: int) -> np.ndarray:
        """int64 (h, w) label -> int64 (H, W) at protocol resolution; nearest, so ids (and -1) survive.

        Nearest samples the source pixel under each output pixel centre (half-pixel convention, like
        PIL and torch ``nearest-exact``), computed only for the pixels the crop keeps.
        """
        h, w = label.shape
        rw, rh, left, top, ow, oh = self._plan(w, h, multiple)
        rows = _nearest_index(rh, h)[top:top + oh]
        cols = _nearest_index(rw, w)[left:left + ow]
        return np.ascontiguousarray(label[rows[:, None], cols[None, :]], dtype=np.int64)


SCORING_FIELDS = ("overclustering", "absent_classes")
LEGACY_SCORING = {"overclustering": "majority", "absent_classes": "ignore"}  # rows stored before the two rules


def stored_protocol(protocol: dict | None) -> dict:
    """A stored run's protocol with the scoring rules it was scored by (rows older than the rules lack them)."""
    return {**LEGACY_SCORING, **(protocol or {})}


def _nearest_index(out_len: int, in_len: int) -> np.ndarray:
    idx = np.floor((np.arange(out_len) + 0.5) * (in_len / out_len)).astype(np.int64)
    return np.minimum(idx, in_len - 1)
