"""A non-learned backbone: per-patch colour and texture statistics.

It is the floor a self-supervised backbone should beat in a leaderboard, and on the synthetic
dataset (whose classes differ in colour and texture) its features separate the classes, which makes
it the backbone for tests that assert a method works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import BackboneSpec
from .base import Backbone


# Fixed centring and scale of the 8 statistics (rough values for natural RGB images in [0, 1]).
# Without it every statistic is positive, all cosine similarities are near 1, and methods that
# threshold similarities (PriMaPs' psi * max, DatUS^2's A > 0) see a single object per image.
CENTRE = torch.tensor([0.45, 0.45, 0.45, 0.10, 0.10, 0.10, 0.05, 0.05])
SCALE = torch.tensor([0.25, 0.25, 0.25, 0.08, 0.08, 0.08, 0.05, 0.05])


class ReferenceBackbone(Backbone):
    """Per patch: mean and std of R, G, B, and mean |dx|, |dy| of the intensity (8 numbers, centred)."""

    def _extract(self, images: torch.Tensor, kinds: set[str]) -> dict[str, torch.Tensor]:
        p = self.patch_size
        grey = images.mean(1, keepdim=True)
        dx = (grey[..., :, 1:] - grey[..., :, :-1]).abs()
        dy = (grey[..., 1:, :] - grey[..., :-1, :]).abs()
        dx, dy = F.pad(dx, (0, 1)), F.pad(dy, (0, 0, 0, 1))
        mean = F.avg_pool2d(images, p)
        std = (F.avg_pool2d(images * images, p) - mean * mean).clamp_min(0).sqrt()
        texture = F.avg_pool2d(torch.cat([dx, dy], 1), p)
        grid = torch.cat([mean, std, texture], 1).permute(0, 2, 3, 1)  # (B, h, w, 8)
        grid = (grid - CENTRE.to(grid)) / SCALE.to(grid)
        out = {}
        if "patch" in kinds:
            out["patch"] = grid
        if "cls" in kinds:
            out["cls"] = grid.mean((1, 2))
        return out


def build(spec: BackboneSpec, state: dict | None) -> ReferenceBackbone:
    return ReferenceBackbone(spec)
