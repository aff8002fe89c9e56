"""Vision Transformers through timm: DINO, DINOv2 (+ registers), iBOT, Mugs, MoCo v3, Unicom, DINOv3, MAE,
I-JEPA, CLIP, SigLIP, EVA-02, and any timm ViT named ``timm:NAME``.

One forward pass gives every feature kind: forward hooks catch the last block's qkv projection
(keys, queries, values, CLS attention) and any intermediate block, so nothing is computed twice.
Departures from the plain ViT handled here: models without a CLS token (Unicom, I-JEPA, SigLIP) give
the model's own pooled vector as ``cls`` (the mean patch token for average pooling, SigLIP's attention
pool) and no CLS attention; models with rotary position embeddings (DINOv3, EVA-02) give keys/queries
before the rotation (content, not position) and no CLS attention; attentions with separate q/k/v
projections (EVA-02) are read from those; a model whose final norm timm moved behind the pooling
(``fc_norm``, e.g. EVA-02's MIM checkpoints) has it applied to every token, as in pre-training.
"""

from __future__ import annotations

import importlib
from functools import partial

import timm
import torch
import torch.nn.functional as F

from ..registry import BackboneSpec
from .base import Backbone, is_layer_kind
from .hf import hf_siglip_to_timm, hf_to_official, is_hf_layout, is_hf_siglip_layout
from .weights import load_into


class ViTBackbone(Backbone):
    def __init__(self, spec: BackboneSpec, model: torch.nn.Module):
        super().__init__(spec)
        self.model = model.eval()

    @property
    def num_layers(self) -> int:
        return len(self.model.blocks)

    @property
    def has_cls_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    def refused_kinds(self) -> dict[str, str]:
        if not self.has_cls_token:
            return {"attn": "it has no CLS token to attend from"}
        if getattr(self.model, "rope", None) is not None:
            return {"attn": "its attention uses rotary position embeddings, which are not extracted"}
        return {}

    def _final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens after the model's final norm: ``forward_features`` applies it, unless timm moved it behind the
        pooling (``fc_norm`` with ``norm`` the identity), where it is applied here to every token."""
        model = self.model
        fc_norm = getattr(model, "fc_norm", None)
        if isinstance(getattr(model, "norm", None), torch.nn.Identity) and isinstance(fc_norm, torch.nn.LayerNorm):
            return fc_norm(tokens)
        return tokens

    def _pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's own image vector for a model without a CLS token: its pooling head without the classifier
        (the mean patch token for average pooling; SigLIP's attention pool)."""
        model = self.model
        if getattr(model, "global_pool", None) in ("avg", "map") and hasattr(model, "forward_head"):
            return model.forward_head(tokens, pre_logits=True)
        return tokens[:, model.num_prefix_tokens:].mean(1)

    def _extract(self, images: torch.Tensor, kinds: set[str]) -> dict[str, torch.Tensor]:
        model = self.model
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        attention = model.blocks[-1].attn
        if kinds & {"key", "query", "value", "attn"}:  # the fused projection's output, or the input to redo it
            if getattr(attention, "qkv", None) is not None:
                hooks.append(attention.qkv.register_forward_hook(lambda m, i, out: captured.__setitem__("qkv", out)))
            hooks.append(attention.register_forward_pre_hook(lambda m, args: captured.__setitem__("attn_in", args[0])))
        for kind in filter(is_layer_kind, kinds):
            hooks.append(model.blocks[int(kind[5:])].register_forward_hook(
                lambda m, i, out, kind=kind: captured.__setitem__(kind, out)))
        try:
            tokens = model.forward_features(images)  # after the final norm (see _final_norm)
        finally:
            for hook in hooks:
                hook.remove()
        b, _, height, width = images.shape
        h, w = height // self.patch_size, width // self.patch_size
        prefix = model.num_prefix_tokens  # CLS + registers
        out: dict[str, torch.Tensor] = {}
        if "cls" in kinds and not self.has_cls_token:  # its own pooling, before the norm fc_norm models pool after
            out["cls"] = self._pooled(tokens)
        tokens = self._final_norm(tokens)
        if "patch" in kinds:
            out["patch"] = tokens[:, prefix:].reshape(b, h, w, -1)
        if "cls" in kinds and self.has_cls_token:
            out["cls"] = tokens[:, 0]
        for kind in filter(is_layer_kind, kinds):
            out[kind] = captured[kind][:, prefix:].reshape(b, h, w, -1)
        if "attn_in" in captured:
            n = tokens.shape[1]
            qkv = captured.get("qkv")
            if qkv is None:  # the attention bypassed its qkv module (separate q/v biases): redo the projection
                qkv = _qkv_projection(attention, captured["attn_in"])
            qkv = qkv.reshape(b, n, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
            q, k = attention.q_norm(q), attention.k_norm(k)
            for name, t in (("query", q), ("key", k), ("value", v)):
                if name in kinds:  # heads concatenated, as DatUS^2 and Deep Spectral Methods use them
                    out[name] = t[:, :, prefix:].permute(0, 2, 1, 3).reshape(b, h, w, -1)
            if "attn" in kinds:
                logits = (q[:, :, :1] * attention.scale) @ k.transpose(-2, -1)  # CLS query only
                out["attn"] = logits.softmax(-1)[:, :, 0, prefix:].reshape(b, -1, h, w)
        return out


def _qkv_projection(attention: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fused q, k, v projection of ``x``, (B, N, 3 * dim), for attentions that bypass their ``qkv``
    module call (timm's EVA/DINOv3 with separate q/v biases), so no forward hook of it fires, or that
    project q, k and v apart (EVA-02)."""
    if getattr(attention, "qkv", None) is None:
        return torch.cat([attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)], dim=-1)
    out = F.linear(x, attention.qkv.weight, attention.qkv.bias)
    if getattr(attention, "q_bias", None) is not None:
        out = out + torch.cat((attention.q_bias, attention.k_bias, attention.v_bias))
    return out


def create(spec: BackboneSpec) -> torch.nn.Module:
    """The timm architecture of ``spec`` with no pretrained weights and a dynamic input size.

    ``spec.options`` are timm model arguments (e.g. ``num_heads``, ``class_token``), plus
    ``layer_norm_eps`` for models trained with torch's default LayerNorm (timm's ViT uses 1e-6)."""
    arch = spec.timm.split(".")[0] if spec.timm else spec.arch
    options = dict(spec.options)
    if "layer_norm_eps" in options:
        options["norm_layer"] = partial(torch.nn.LayerNorm, eps=options.pop("layer_norm_eps"))
    return timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, **options)


def build(spec: BackboneSpec, state: dict | None) -> ViTBackbone:
    model = create(spec)
    if state is not None:
        if is_hf_layout(state):  # Hugging Face cache: transformers names -> official names
            state = hf_to_official(state)
        elif is_hf_siglip_layout(state):  # google/siglip-*: transformers' SigLIP -> timm's
            state = hf_siglip_to_timm(state)
        # The filter of the model's own timm module converts the official layouts into timm's
        # (DINO/DINOv2: patchify, layer scale, registers, position-embedding size; DINOv3:
        # storage tokens, layer-scale names, the masked key bias).
        timm_module = importlib.import_module(type(model).__module__)
        state = timm_module.checkpoint_filter_fn(state, model)
        load_into(model, state, spec.name, ignore=_NOT_LEARNED)
    return ViTBackbone(spec, model)


# Buffers a checkpoint need not carry: DINOv3's rotary periods are recomputed from the config.
_NOT_LEARNED = ("rope.",)
