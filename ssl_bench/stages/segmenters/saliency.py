"""Saliency segmenters: one foreground mask per image, whose object is the image's one proposal (COMUS, Step 1).

COMUS (Zadaianchuk et al., ICLR 2023, Algorithm 1) thresholds a saliency detector's map at ``theta`` and takes
the salient region of each image as one object proposal; the box of that region is cropped and embedded.
Its detector (DeepUSPS + BASNet) is one of four pluggable sources here, each a segmenter stage with the same
interface (``stages/segmenters/saliency-*.yaml``):

- ``saliency-attention``: the CLS attention of the backbone's last block (mean over heads), thresholded to
  keep the most attended patches holding ``theta`` of the attention mass (DINO's rule, 0.6 in its paper).
- ``saliency-ncut``: TokenCut's normalised cut of the patch graph (L2-normalised last-block keys, edge 1 where
  their cosine exceeds ``tau``, else ``eps``): the second smallest generalised eigenvector of (D - W) y =
  lambda D y split at its mean; the side holding the most attended patch (``seed_from: attn``) is foreground.
  TokenCut picks the side of the eigenvector's largest magnitude instead (``seed_from: null``).
- ``saliency-files``: one PNG per image from any detector (``dir``/<image id>.png, at the image's size): masks
  with two values (0 and another) are binary; others are scaled to [0, 1] by their bit depth and thresholded.
- ``saliency-basnet``: BASNet (``basnet.py``) with the released weights COMUS used.

The segment map holds 0 on the salient region when it covers more than ``min_area`` pixels (of the protocol
image), ``BACKGROUND`` elsewhere; an image without such a region is background throughout, so it has no
proposal (COMUS's code: its pseudo mask is all background and it is not trained on). Maps keep the resolution
of their source (the patch grid for attention and ncut, the protocol image for files and BASNet); the engine
brings every map to the image.

Where the paper is silent we follow the authors' code (github.com/zadaianchuk/comus, ``datasets/pascal_voc.py``):
the whole thresholded mask is one proposal however many pieces it has (its box spans them all), masks of at
most 400 pixels are dropped (we measure them on the protocol image, the authors on the original). Ours: the
attention is averaged over heads (DINO thresholds each head on its own); the files source thresholds masks at
their own size, then brings them to the protocol image as labels are (nearest).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...ops import l2_normalize
from ..regions import BACKGROUND


def mass_foreground(attention: np.ndarray, mass: float) -> np.ndarray:
    """Boolean map of the most attended cells that together hold ``mass`` of the attention: a cell is kept when
    the cells ranked above it hold less than ``mass`` (DINO's rule: ascending cumulative share > 1 - mass)."""
    a = np.asarray(attention, dtype=np.float64).ravel()
    total = a.sum()
    keep = np.zeros(a.size, dtype=bool)
    if total <= 0:
        return keep.reshape(np.shape(attention))
    order = np.argsort(-a, kind="stable")
    above = np.cumsum(a[order]) - a[order]
    keep[order] = above / total < mass
    return keep.reshape(np.shape(attention))


def ncut_foreground(keys: np.ndarray, seed: int | None = None, tau: float = 0.2, eps: float = 1e-5,
                    theta: float | None = None) -> np.ndarray:
    """TokenCut's foreground of one image: boolean (h, w) from its keys (h, w, d).

    The second smallest eigenvector of the normalised cut of the binarised cosine graph, oriented so that the
    ``seed`` patch (flat index; None: the entry of largest magnitude, TokenCut's rule) is on the positive side,
    scaled to [0, 1]; foreground where it exceeds its mean (TokenCut's split), or ``theta`` when given."""
    from .dsm import laplacian_eigenvectors

    h, w, d = keys.shape
    f = l2_normalize(keys.reshape(h * w, d).astype(np.float32))
    graph = (f @ f.T > tau).astype(np.float32)
    graph[graph == 0] = eps  # TokenCut: a weak edge everywhere keeps the graph connected
    _, vectors = laplacian_eigenvectors(graph, 2)
    v = vectors[1].astype(np.float64)
    seed = int(np.abs(v).argmax()) if seed is None else seed
    if v[seed] < v.mean():
        v = -v
    span = v.max() - v.min()
    s = (v - v.min()) / span if span > 0 else np.zeros_like(v)
    return (s > (s.mean() if theta is None else theta)).reshape(h, w)


def read_saliency_file(path: Path, size: tuple[int, int], theta: float, image_id: str) -> np.ndarray:
    """Boolean saliency of one image from its PNG, at the image's own size ``size`` = (width, height).

    A missing file, one that is not an image, or one of another size is one line naming the file and the fix."""
    from PIL import Image

    if not path.is_file():
        raise UserError(f"no saliency mask for image {image_id}: {path} is missing -- put one PNG per image in "
                        f"{path.parent}, named after the image ({image_id}.png)")
    try:
        with Image.open(path) as im:
            mode, found = im.mode, im.size
            mask = np.asarray(im.convert("L") if mode in ("RGB", "RGBA", "LA") else im)
    except Exception as err:  # noqa: BLE001 -- any unreadable file gets the same advice
        raise UserError(f"cannot read saliency mask {path} ({type(err).__name__}) -- save it as a PNG") from None
    if found != tuple(size):
        raise UserError(f"saliency mask {path} is {found[0]}x{found[1]}, image {image_id} is {size[0]}x{size[1]} "
                        f"-- save each mask at its image's size")
    if mask.ndim != 2:
        raise UserError(f"saliency mask {path} has {mask.shape[-1]} channels -- save a single-channel PNG")
    values = np.unique(mask)
    if values.size <= 2 and values[0] == 0:  # binary (0/1, 0/255, palette indices): nonzero is salient
        return mask != 0
    depth = float(np.iinfo(mask.dtype).max) if mask.dtype.kind in "ui" else 1.0
    return mask.astype(np.float64) / depth > theta


def proposal_segments(foreground: np.ndarray, min_area: float, pixels_per_cell: float,
                      patch_area: float) -> tuple[np.ndarray, dict]:
    """The segment map of one image's saliency (see the module docstring) and its info for the segment table:
    the proposal's size counted in patches, whatever the map's resolution."""
    foreground = np.asarray(foreground, dtype=bool)
    area = float(foreground.sum()) * pixels_per_cell
    valid = bool(area > min_area)
    segment_map = np.full(foreground.shape, BACKGROUND, dtype=np.int8)
    if valid:
        segment_map[foreground] = 0
    info = {"n_segments": int(foreground.any()), "n_valid": int(valid),
            "valid_sizes": [area / patch_area] if valid else [], "foreground_fraction": float(foreground.mean())}
    return segment_map, info


class Saliency:
    """What every saliency source shares: ``foreground(features, image, index)`` -> boolean map, then
    ``proposal_segments``. ``map_on_grid``: the source's map is the patch grid (else the protocol image)."""

    marks_background = True
    uses_image = False
    map_on_grid = True

    def __init__(self, theta: float | None, min_area: float = 400, patch_size: int = 16):
        self.theta, self.min_area, self.patch_size = theta, min_area, patch_size

    @classmethod
    def from_context(cls, ctx, **params):
        return cls(**params, patch_size=ctx.patch_size)

    def segment(self, features: dict, image: np.ndarray | None = None, index: int | None = None):
        foreground = self.foreground(features, image, index)
        patch_area = float(self.patch_size ** 2)
        return proposal_segments(foreground, self.min_area, patch_area if self.map_on_grid else 1.0, patch_area)

    def foreground(self, features: dict, image, index) -> np.ndarray:
        raise NotImplementedError


def _mean_attention(attention: np.ndarray) -> np.ndarray:
    """The CLS attention (heads, h, w) of the cache, averaged over heads."""
    return np.asarray(attention, dtype=np.float32).mean(0)


class AttentionSaliency(Saliency):
    """The segmenter stage ``saliency-attention``: ``theta`` is the attention mass kept."""

    def __init__(self, theta: float = 0.6, min_area: float = 400, patch_size: int = 16):
        super().__init__(theta, min_area, patch_size)

    def foreground(self, features: dict, image, index) -> np.ndarray:
        return mass_foreground(_mean_attention(features["attn"]), self.theta)


class NcutSaliency(Saliency):
    """The segmenter stage ``saliency-ncut``."""

    def __init__(self, theta: float | None = None, min_area: float = 400, feature: str = "key", tau: float = 0.2,
                 eps: float = 1e-5, seed_from: str | None = "attn", patch_size: int = 16):
        super().__init__(theta, min_area, patch_size)
        self.feature, self.tau, self.eps, self.seed_from = feature, tau, eps, seed_from

    def foreground(self, features: dict, image, index) -> np.ndarray:
        seed = int(_mean_attention(features["attn"]).argmax()) if self.seed_from == "attn" else None
        return ncut_foreground(features[self.feature], seed, self.tau, self.eps, self.theta)


class FilesSaliency(Saliency):
    """The segmenter stage ``saliency-files``: ``dir``/<image id>.png for every image of the split."""

    map_on_grid = False
    uses_index = True

    def __init__(self, dir: str | None = None, theta: float = 0.5, min_area: float = 400, patch_size: int = 16):
        super().__init__(theta, min_area, patch_size)
        self.folder = Path(_mask_folder(dir))
        self.dataset = self.protocol = None

    @staticmethod
    def identity(ctx, dir: str | None = None, **_) -> dict:
        """The masks' folder listing (names, sizes, times): a mask replaced in place is noticed."""
        listing = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(_mask_folder(dir))
                         if e.name.lower().endswith(".png"))
        return {"masks": hashlib.sha256(repr(listing).encode()).hexdigest()[:16]}

    def prepare(self, ctx, split: str) -> None:
        self.dataset, self.protocol = ctx.dataset_for(split), ctx.protocol

    def foreground(self, features: dict, image, index) -> np.ndarray:
        image_id = self.dataset.ids[index]
        mask = read_saliency_file(self.folder / f"{image_id}.png", self.dataset.image_size(index), self.theta,
                                  image_id)
        return self.protocol.apply_label(mask.astype(np.int64), self.patch_size) > 0


def _mask_folder(folder: str | None) -> Path:
    if not folder:
        raise UserError("saliency-files needs the folder of saliency masks -- -p segmenter.dir=FOLDER "
                        "(one PNG per image, named after it)")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"saliency mask folder {path} not found -- -p segmenter.dir=FOLDER")
    return path


def check_params(p: dict) -> None:
    theta = p.get("theta")
    if theta is not None and not 0 <= theta <= 1:
        raise UserError(f"theta={theta!r} -- use a threshold 0 <= theta <= 1 (-p segmenter.theta=0.5)")
    if "dir" in p:
        _mask_folder(p["dir"])
    if p.get("seed_from", "attn") not in ("attn", None):
        raise UserError(f"seed_from={p['seed_from']!r} -- use attn (the most attended patch is foreground) or "
                        f"null (TokenCut's largest eigenvector entry)")
    if p["min_area"] < 0:
        raise UserError(f"min_area={p['min_area']!r} -- use 0 or more pixels (-p segmenter.min_area=400)")
    if "tau" in p and not -1 <= p["tau"] < 1:
        raise UserError(f"tau={p['tau']!r} -- a cosine threshold in [-1, 1) (-p segmenter.tau=0.2)")
    if "eps" in p and not 0 < p["eps"] < 1:
        raise UserError(f"eps={p['eps']!r} -- a small positive edge weight (-p segmenter.eps=1e-5)")
