"""Hugging Face ``transformers`` checkpoints of ViTs (DINO: ViTModel; DINOv2: Dinov2Model, with
registers too) converted to the official DINO / DINOv2 key layout, which timm's filter then loads.

Both the classic names stored on the hub (``encoder.layer.0.attention.attention.query``) and the
names of recent transformers releases (``layers.0.attention.q_proj``) are understood.
"""

from __future__ import annotations

import re

import torch

TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
       "embeddings.mask_token": "mask_token", "embeddings.register_tokens": "register_tokens",
       "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
       "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
       "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
# Inside a block, longest names first ("attention.output.dense" before "output.dense").
BLOCK = [("attention.output.dense", "attn.proj"), ("attention.o_proj", "attn.proj"),
         ("layernorm_before", "norm1"), ("layernorm_after", "norm2"), ("norm1", "norm1"), ("norm2", "norm2"),
         ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"), ("mlp.fc1", "mlp.fc1"),
         ("mlp.fc2", "mlp.fc2"), ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma")]
QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
       "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
_BLOCK_KEY = re.compile(r"^(?:encoder\.layer|layers|encoder\.layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def is_hf_layout(state: dict) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state)


def _under_prefix(state: dict[str, torch.Tensor], marker: str) -> dict[str, torch.Tensor]:
    """The entries under the prefix that the first key ending in ``marker`` carries, that prefix removed."""
    prefix = next(k for k in state if k.endswith(marker))[: -len(marker)]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def hf_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = _under_prefix(state, "embeddings.patch_embeddings.projection.weight")  # prefix "", "vit.", "dinov2."
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        if key in TOP:
            out[TOP[key]] = value
            continue
        match = _BLOCK_KEY.match(key)
        if not match:
            continue  # pooler and heads are not part of the backbone
        block, name, leaf = int(match[1]), match[2], match[3]
        if name in QKV:  # timm fuses q, k, v into one projection
            qkv.setdefault((block, leaf), {})[QKV[name]] = value
            continue
        if leaf == "lambda1":
            name, leaf = f"{name}.lambda1", ""
        target = next((t for s, t in BLOCK if name == s or f"{name}.{leaf}".startswith(f"{s}.")), None)
        if target is None:
            raise KeyError(f"unknown Hugging Face ViT weight {key}")
        out[f"blocks.{block}.{target}" + (f".{leaf}" if leaf and not target.endswith("gamma") else "")] = value
    for (block, leaf), parts in qkv.items():
        out[f"blocks.{block}.attn.qkv.{leaf}"] = torch.cat([parts[0], parts[1], parts[2]])
    return out


# ---- SigLIP (google/siglip-*: transformers' SiglipModel / SiglipVisionModel) -> timm's SigLIP ViT ----------

_SIGLIP_TOP = {"embeddings.patch_embedding.weight": "patch_embed.proj.weight",
               "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
               "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias",
               "head.probe": "attn_pool.latent", "head.attention.out_proj.weight": "attn_pool.proj.weight",
               "head.attention.out_proj.bias": "attn_pool.proj.bias", "head.layernorm.weight": "attn_pool.norm.weight",
               "head.layernorm.bias": "attn_pool.norm.bias", "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight",
               "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias", "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight",
               "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias"}
_SIGLIP_BLOCK = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_SIGLIP_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def is_hf_siglip_layout(state: dict) -> bool:
    return any(k.endswith("embeddings.patch_embedding.weight") for k in state) and \
        any(k.endswith("head.probe") for k in state)


def hf_siglip_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face SigLIP vision tower (``vision_model.`` of a whole SigLIP file; the text tower is dropped) in
    timm's layout: q, k, v fused, the pooling head's fused in-projection split into timm's q and kv."""
    state = _under_prefix(state, "embeddings.patch_embedding.weight")  # prefix "vision_model." or ""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _SIGLIP_TOP:
            out[_SIGLIP_TOP[key]] = value
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value[None]
        elif key.startswith("head.attention.in_proj_"):
            leaf = key.rsplit("_", 1)[-1]  # weight | bias
            dim = value.shape[0] // 3
            out[f"attn_pool.q.{leaf}"], out[f"attn_pool.kv.{leaf}"] = value[:dim], value[dim:]
        elif match := _SIGLIP_LAYER.match(key):
            block, name, leaf = int(match[1]), match[2], match[3]
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((block, leaf), {})[name[-6]] = value
            elif name in _SIGLIP_BLOCK:
                out[f"blocks.{block}.{_SIGLIP_BLOCK[name]}.{leaf}"] = value
            else:
                raise KeyError(f"unknown Hugging Face SigLIP weight {key}")
    for (block, leaf), parts in qkv.items():
        out[f"blocks.{block}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out
