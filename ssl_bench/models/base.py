"""The one face every backbone shows the harness: ``extract(images, kinds)`` and ``embed(images)``."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..registry import BackboneSpec

# Feature kinds. Grid kinds are (B, h, w, d); "cls" is (B, d); "attn" is (B, heads, h, w).
GRID_KINDS = ("patch", "key", "query", "value")
ATTENTION_KINDS = ("key", "query", "value", "attn")
ALL_KINDS = (*GRID_KINDS, "cls", "attn", "layerN")


def is_layer_kind(kind: str) -> bool:
    return kind.startswith("layer") and kind[5:].isdigit()


class Backbone(nn.Module):
    """A frozen feature extractor. Subclasses implement ``_extract``; this class checks kinds."""

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def num_layers(self) -> int:
        return 0

    def supported_kinds(self) -> set[str]:
        kinds = {"patch", "cls"}
        if self.spec.has_attention:
            kinds |= set(ATTENTION_KINDS)
        return kinds - set(self.refused_kinds())

    def refused_kinds(self) -> dict[str, str]:
        """Kinds this model cannot give although its family could, with the reason (one phrase)."""
        return {}

    def check_kinds(self, kinds) -> None:
        supported = self.supported_kinds()
        for kind in kinds:
            if is_layer_kind(kind):
                if not 0 <= int(kind[5:]) < self.num_layers:
                    raise UserError(f"{self.spec.name} has layers 0..{self.num_layers - 1}, not '{kind}' "
                                    "-- pick an intermediate layer in that range")
            elif kind not in supported:
                why = self.refused_kinds().get(kind) or (
                    "it has no attention" if kind in ATTENTION_KINDS else "it is not a feature kind")
                raise UserError(f"backbone {self.spec.name} cannot give '{kind}' features ({why}) -- "
                                f"it gives {sorted(supported)}; choose a task or backbone that fit")

    def normalize(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> normalised float tensor (B, 3, H, W) on the model's device."""
        x = torch.as_tensor(np.array(images) if isinstance(images, np.ndarray) else images).to(self.mean.device)
        x = x.permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def extract(self, images: torch.Tensor, kinds) -> dict[str, torch.Tensor]:
        kinds = set(kinds)
        self.check_kinds(kinds)
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return self._extract(images, kinds)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Global image embedding (B, d): the CLS token of a ViT, the pooled feature of a CNN."""
        return self._extract(images, {"cls"})["cls"]

    def _extract(self, images: torch.Tensor, kinds: set[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError
