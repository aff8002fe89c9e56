"""Region embeddings: one vector per valid segment of every image, for the dataset-level clusterer.

- ``CropEmbedding`` (stages ``crop-cls``, ``crop-cnn``): the segment's box cropped from the image, pixels
  outside the segment filled (DatUS^2, ACSeg) or kept (Deep Spectral Methods), resized to the embedding
  backbone's input, embedded by its ``embed`` (CLS of a ViT, pooled feature of a CNN).
- ``MaskedAttentionEmbedding`` (stage ``masked-attention-cls``): the unmasked box through a ViT whose last
  block lets CLS attend to the segment's patches only (the semester project's Table 1 variant).
- ``NormalizedMaskCrop`` (stage ``masked-crop-cls``): ACSeg's crops: the box stretched to the input, then the
  pixels outside the segment zeroed after normalisation.
- ``MeanPatchEmbedding`` (stage ``mean-patch``): the mean of the segment's cached patch features; no second
  forward pass.

Reading of DatUS^2's code for the crops: the patch-aligned box of the segment on the 224-px image, patches of
other segments set to 0 (black); the ViT then sees Resize(256)+CenterCrop(224) of it (``fit="authors"``). We
crop the evaluation-protocol image (shorter side 320) with the segment map upsampled to it, and default to
stretching the box to the input size, so thin segments are not cut off. Deep Spectral Methods crops the box
of the segment's mask after 2 erosions and 5 dilations (on the patch grid) from the unmasked image and feeds
it at its own size; we resize it like the other crops (``mask=false, erode=2, dilate=5``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from ..registry import is_whole
from ..resources import PIXEL_BYTES, require_memory
from .regions import upsample_nearest

CROP_FITS = ("stretch", "authors")


@dataclass
class RegionImage:
    """One image as a segmenter left it: what an embedding needs to describe its valid segments."""

    segments: np.ndarray  # (h, w) segment map on the patch grid (regions.py)
    image: np.ndarray | None = None  # (H, W, 3) uint8 at protocol resolution, when the embedding uses images
    features: dict = field(default_factory=dict)  # cached kind -> (h, w, d), those the embedding reads

    @property
    def n_valid(self) -> int:
        return int(self.segments.max()) + 1 if self.segments.size and self.segments.max() >= 0 else 0


def segment_crop(
    image: np.ndarray,
    segment_map: np.ndarray,
    segment_id: int | None = None,
    fill: int | Sequence[int] | None = 0,
    size: int = 224,
    fit: str = "stretch",
) -> np.ndarray:
    """Crop of one segment: uint8 (size, size, 3).

    ``segment_map`` is at image resolution; with ``segment_id=None`` it is a boolean mask.
    Pixels of the box outside the segment get ``fill`` (the authors use 0, black; None keeps them).
    ``fit="stretch"`` resizes the box to size x size; ``fit="authors"`` resizes its short side to
    size*256/224 and centre-crops, as the DatUS^2 authors' feature extractor does.
    """
    from PIL import Image

    mask = segment_map if segment_id is None else segment_map == segment_id
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise ValueError("segment is empty")
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    crop = image[box].copy()
    if fill is not None:
        crop[~mask[box]] = fill
    pil = Image.fromarray(crop)
    if fit == "stretch":
        return np.asarray(pil.resize((size, size), Image.BICUBIC))
    if fit != "authors":
        raise ValueError(f"unknown crop fit {fit!r}; expected one of {CROP_FITS}")
    short = round(size * 256 / 224)
    scale = short / min(pil.size)
    new_w, new_h = max(size, round(pil.size[0] * scale)), max(size, round(pil.size[1] * scale))
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(pil.crop((left, top, left + size, top + size)))


def erode_dilate(mask: np.ndarray, erode: int = 0, dilate: int = 0) -> np.ndarray:
    """``erode`` binary erosions then ``dilate`` dilations of a boolean mask (cross-shaped 3x3 element); an
    erosion that would empty the mask is skipped (as Deep Spectral Methods does)."""
    from scipy import ndimage

    for _ in range(erode):
        smaller = ndimage.binary_erosion(mask)
        if smaller.any():
            mask = smaller
    if dilate:
        mask = ndimage.binary_dilation(mask, iterations=dilate)
    return mask


class CropEmbedding:
    """Crops of every valid segment through a backbone's ``embed``, batched across images."""

    uses_image = True
    reads: tuple[str, ...] = ()
    protocol = None  # the run's (``from_context``): crops go through the backbone in its precision, as features do

    def __init__(self, model, size: int, fill: int = 0, mask: bool = True, fit: str = "stretch", erode: int = 0,
                 dilate: int = 0, batch_size: int = 64):
        self.model, self.size, self.fill, self.mask, self.fit = model, size, fill, mask, fit
        self.erode, self.dilate, self.batch_size = erode, dilate, batch_size

    @classmethod
    def from_context(cls, ctx, backbone: str | None = None, size: int | None = None, **params):
        """The run's own backbone (CLS of its ViT), or the registered ``backbone`` (e.g. a CNN's pooled feature)."""
        model = ctx.build_backbone(backbone) if backbone else ctx.backbone
        embedder = cls(model, int(size or model.spec.input_size), **params)
        embedder.protocol = getattr(ctx, "protocol", None)  # a stand-in context (tests, benchmarks) may lack one
        return embedder

    def _precision(self, device):
        """The run's autocast (bf16 / fp16 protocols) around a forward pass; none outside a run."""
        import contextlib

        return self.protocol.autocast(device) if self.protocol is not None else contextlib.nullcontext()

    @staticmethod
    def identity(ctx, backbone: str | None = None, **_) -> dict:
        """What the embeddings depend on beyond the parameters: the embedding model and its weights."""
        return {"crop_model": ctx.backbone_identity(backbone)}

    def crops(self, region: RegionImage) -> list[np.ndarray]:
        """The crop of each valid segment of one image, in segment order."""
        image = region.image
        full = upsample_nearest(region.segments, image.shape[:2])
        out = []
        for s in range(region.n_valid):
            if self.erode or self.dilate:  # the mask is shaped on the patch grid, then brought to the image
                grid = erode_dilate(region.segments == s, self.erode, self.dilate)
                mask = upsample_nearest(grid, image.shape[:2])
            else:
                mask = full == s
            out.append(segment_crop(image, mask, None, self.fill if self.mask else None, self.size, self.fit))
        return out

    def embed(self, regions: Iterable[RegionImage]) -> np.ndarray:
        feats, pending = [], []
        for region in regions:
            for crop in self.crops(region):
                pending.append(crop)
                if len(pending) >= self.batch_size:
                    feats.append(self._forward(pending))
                    pending = []
        if pending:
            feats.append(self._forward(pending))
        if not feats:
            return np.zeros((0, self.model.spec.embed_dim), np.float32)
        return np.concatenate(feats)

    def _forward(self, crops: list[np.ndarray]) -> np.ndarray:
        import torch

        x = self.model.normalize(np.stack(crops))
        with torch.inference_mode(), self._precision(x.device):
            return self.model.embed(x).float().cpu().numpy()


class MaskedAttentionEmbedding(CropEmbedding):
    """The semester project's "masked attention for DINO CLS" (paper 003, Sec. 4.1.1, Table 1): the segment's
    box cropped from the unmasked image and stretched to the ViT's input, and in the ViT's last block the CLS
    token attends only to itself, the register tokens and the patches the segment covers (at least half of
    the patch; at least the patch it covers most). Its output CLS is the embedding."""

    def __init__(self, model, size: int, batch_size: int = 64):
        if not hasattr(getattr(model, "model", None), "blocks"):
            raise UserError(f"embed=masked-attention-cls needs a ViT; {model.spec.name} has no attention blocks -- "
                            f"use embed=crop-cls")
        super().__init__(model, size, mask=False, batch_size=batch_size)  # the box stretched to the input

    def crops(self, region: RegionImage) -> list[tuple[np.ndarray, np.ndarray]]:
        """(crop, patch mask) of each valid segment: the crop is unmasked, the mask says where CLS may look."""
        image = region.image
        full = upsample_nearest(region.segments, image.shape[:2])
        grid = self.size // self.model.patch_size
        out = []
        for s, crop in enumerate(super().crops(region)):
            inside = (full == s).astype(np.float32)
            rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
            box = inside[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            cover = _area_fractions(box, grid)
            patches = cover >= 0.5
            patches.flat[cover.argmax()] = True
            out.append((crop, patches))
        return out

    def _forward(self, items: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        import torch

        crops, masks = zip(*items)
        vit = self.model.model
        prefix = vit.num_prefix_tokens
        patches = torch.from_numpy(np.stack(masks).reshape(len(masks), -1))
        n = prefix + patches.shape[1]
        allowed = torch.ones(len(masks), 1, n, n, dtype=torch.bool)
        allowed[:, 0, 0, prefix:] = patches  # the CLS query's row; every other token attends as usual

        def with_mask(module, args, kwargs):
            return args, {**kwargs, "attn_mask": allowed.to(args[0].device)}

        hook = vit.blocks[-1].register_forward_pre_hook(with_mask, with_kwargs=True)
        try:
            x = self.model.normalize(np.stack(crops))
            with torch.inference_mode(), self._precision(x.device):
                tokens = vit.forward_features(x)
        finally:
            hook.remove()
        return tokens[:, 0].float().cpu().numpy()


class NormalizedMaskCrop(CropEmbedding):
    """ACSeg's region embedding (shared paper 001, Sec. 4.1.2): the segment's box cropped from the image and
    stretched to the backbone's input, normalised, and only then the pixels outside the segment set to 0 (the
    dataset mean, after normalisation), so the masked area carries no colour of its own. The box's mask is
    resized with nearest neighbours, like the crop's pixels are with bicubic."""

    def __init__(self, model, size: int, batch_size: int = 64):
        super().__init__(model, size, mask=False, batch_size=batch_size)

    def crops(self, region: RegionImage) -> list[tuple[np.ndarray, np.ndarray]]:
        """(unmasked crop, its mask at the crop's size) of each valid segment."""
        from PIL import Image

        full = upsample_nearest(region.segments, region.image.shape[:2])
        out = []
        for s, crop in enumerate(super().crops(region)):
            inside = full == s
            rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
            box = Image.fromarray(inside[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.uint8))
            out.append((crop, np.asarray(box.resize((self.size, self.size), Image.NEAREST), dtype=bool)))
        return out

    def _forward(self, items: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        import torch

        crops, masks = zip(*items)
        with torch.inference_mode():
            x = self.model.normalize(np.stack(crops))
            x = x * torch.from_numpy(np.stack(masks)).to(x.device)[:, None]
            with self._precision(x.device):
                return self.model.embed(x).float().cpu().numpy()


def _area_fractions(mask: np.ndarray, grid: int) -> np.ndarray:
    """The fraction of each cell of a grid x grid split of ``mask`` (any size, stretched) that it covers."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(F.interpolate(t, size=(grid * 8, grid * 8), mode="nearest"), grid)[0, 0].numpy()


def check_crop_params(p: dict) -> None:
    if p["fit"] not in CROP_FITS:
        raise UserError(f"fit={p['fit']!r} -- use one of {', '.join(CROP_FITS)} (-p embed.fit=stretch)")
    if p["size"] is not None and (not is_whole(p["size"]) or p["size"] < 16):
        raise UserError(f"size={p['size']!r} -- use null (the embedding backbone's own size) or a side >= 16 "
                        f"(-p embed.size=224)")
    if not 0 <= p["fill"] <= 255:
        raise UserError(f"fill={p['fill']!r} -- use a pixel value 0-255 (-p embed.fill=0)")
    if p["batch_size"] < 1:
        raise UserError(f"batch_size={p['batch_size']!r} -- use 1 or more (-p embed.batch_size=64)")
    side = p["size"] or 224
    require_memory(p["batch_size"] * side * side * PIXEL_BYTES, f"embed.size={side} with embed.batch_size={p['batch_size']}",
                   "use a smaller embed.size or embed.batch_size (-p embed.batch_size=64)")


class MeanPatchEmbedding:
    """The mean cached feature of each valid segment's patches (weighted by the pixels of the segment in each
    patch when the segment map is finer than the grid): a region embedding without a second forward."""

    uses_image = False

    def __init__(self, feature: str = "patch"):
        self.reads = (feature,)

    @staticmethod
    def identity(ctx, **_) -> dict:
        return {}

    def embed(self, regions: Iterable[RegionImage]) -> np.ndarray:
        out = []
        for region in regions:
            grid = region.features[self.reads[0]]
            h, w = grid.shape[:2]
            flat = grid.reshape(-1, grid.shape[-1]).astype(np.float64)
            # each entry of the segment map and the patch it lies in (the map may be finer than the patch grid)
            cells = upsample_nearest(np.arange(h * w).reshape(h, w), region.segments.shape).ravel()
            ids = region.segments.ravel().astype(np.int64)  # int16 maps: the products below need room
            inside = ids >= 0
            members = np.bincount(ids[inside] * (h * w) + cells[inside], minlength=region.n_valid * h * w)
            members = members.reshape(region.n_valid, h * w).astype(np.float64)  # (segments, patches) weights
            sums = members @ flat
            out.append((sums / np.maximum(members.sum(1, keepdims=True), 1)).astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)
