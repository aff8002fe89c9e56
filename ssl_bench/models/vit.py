"""Vision Transformers through timm: DINO, DINOv2 (with and without registers) and kin.

One forward pass gives every feature kind: forward hooks catch the last block's qkv projection
(keys, queries, values, CLS attention) and any intermediate block, so nothing is computed twice.
"""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from ..registry import BackboneSpec
from .base import Backbone, is_layer_kind
from .hf import hf_to_official, is_hf_layout
from .weights import load_into


class ViTBackbone(Backbone):
    def __init__(self, spec: BackboneSpec, model: torch.nn.Module):
        super().__init__(spec)
        self.model = model.eval()

    @property
    def num_layers(self) -> int:
        return len(self.model.blocks)

    def _extract(self, images: torch.Tensor, kinds: set[str]) -> dict[str, torch.Tensor]:
        model = self.model
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        attention = model.blocks[-1].attn
        if kinds & {"key", "query", "value", "attn"}:
            hooks.append(attention.qkv.register_forward_hook(lambda m, i, out: captured.__setitem__("qkv", out)))
        for kind in filter(is_layer_kind, kinds):
            hooks.append(model.blocks[int(kind[5:])].register_forward_hook(
                lambda m, i, out, kind=kind: captured.__setitem__(kind, out)))
        try:
            tokens = model.forward_features(images)  # after the final norm
        finally:
            for hook in hooks:
                hook.remove()
        b, _, height, width = images.shape
        h, w = height // self.patch_size, width // self.patch_size
        prefix = model.num_prefix_tokens  # CLS + registers
        out: dict[str, torch.Tensor] = {}
        if "patch" in kinds:
            out["patch"] = tokens[:, prefix:].reshape(b, h, w, -1)
        if "cls" in kinds:
            out["cls"] = tokens[:, 0]
        for kind in filter(is_layer_kind, kinds):
            out[kind] = captured[kind][:, prefix:].reshape(b, h, w, -1)
        if "qkv" in captured:
            n = tokens.shape[1]
            qkv = captured["qkv"].reshape(b, n, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
            q, k = attention.q_norm(q), attention.k_norm(k)
            for name, t in (("query", q), ("key", k), ("value", v)):
                if name in kinds:  # heads concatenated, as DatUS^2 and Deep Spectral Methods use them
                    out[name] = t[:, :, prefix:].permute(0, 2, 1, 3).reshape(b, h, w, -1)
            if "attn" in kinds:
                logits = (q[:, :, :1] * attention.scale) @ k.transpose(-2, -1)  # CLS query only
                out["attn"] = logits.softmax(-1)[:, :, 0, prefix:].reshape(b, -1, h, w)
        return out


def create(spec: BackboneSpec) -> torch.nn.Module:
    """The timm architecture of ``spec`` with no pretrained weights and a dynamic input size."""
    arch = spec.timm.split(".")[0] if spec.timm else spec.arch
    return timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, **spec.options)


def build(spec: BackboneSpec, state: dict | None) -> ViTBackbone:
    model = create(spec)
    if state is not None:
        if is_hf_layout(state):  # Hugging Face cache: transformers names -> official names
            state = hf_to_official(state)
        # timm's filter converts the official DINO/DINOv2 layouts (patchify, layer scale, registers,
        # position-embedding size) into timm's own.
        state = checkpoint_filter_fn(state, model)
        load_into(model, state, spec.name)
    return ViTBackbone(spec, model)
