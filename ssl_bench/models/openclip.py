"""The image tower of an open_clip model (its own ViT: ``VisionTransformer``) as a dense feature extractor.

open_clip's forward pools; here the tower is run token by token instead: patchify, CLS, the positional
embedding resampled to the image's patch grid (open_clip keeps it at the training grid), ``ln_pre``, the
transformer, ``ln_post`` on every token. ``patch`` and ``cls`` are those tokens before the projection into the
joint image-text space (so both live in one space, the one the attention keys come from); keys, queries and
values are the last block's ``in_proj`` of its normalised input, heads concatenated; ``attn`` is the CLS row of
that block's attention. Weights are the open_clip file's ``visual.`` entries (the text tower is dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from ..registry import BackboneSpec
from .base import Backbone, is_layer_kind
from .weights import load_into


def refusal(visual: torch.nn.Module) -> str | None:
    """Why this tower cannot be read token by token here, if so."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        return f"its image tower is a {type(visual).__name__}, not a ViT"
    if visual.attn_pool is not None or visual.final_ln_after_pool:
        return "its tower pools before the final norm (attentional pooling), so its tokens are not normalised"
    return None


class OpenCLIPBackbone(Backbone):
    def __init__(self, spec: BackboneSpec, visual: torch.nn.Module):
        super().__init__(spec)
        self.visual = visual.eval()

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        visual = self.visual
        x = visual.conv1(images)  # (B, width, h, w)
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = resample_abs_pos_embed(visual.positional_embedding[None], new_size=list(grid), num_prefix_tokens=1)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        return visual.ln_pre(x), grid

    def _extract(self, images: torch.Tensor, kinds: set[str]) -> dict[str, torch.Tensor]:
        transformer = self.visual.transformer
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        batch_first = getattr(transformer, "batch_first", True)

        def keep(name):
            def hook(module, args, out=None):
                value = args[0] if out is None else out
                captured[name] = value if batch_first else value.transpose(0, 1)
            return hook

        attention = transformer.resblocks[-1].attn
        if kinds & {"key", "query", "value", "attn"}:  # the attention's (normalised) input: its q, k, v are redone
            hooks.append(attention.register_forward_pre_hook(keep("attn_in")))
        for kind in filter(is_layer_kind, kinds):
            hooks.append(transformer.resblocks[int(kind[5:])].register_forward_hook(keep(kind)))
        x, (h, w) = self._tokens(images)
        try:
            x = transformer(x if batch_first else x.transpose(0, 1))
        finally:
            for hook in hooks:
                hook.remove()
        x = x if batch_first else x.transpose(0, 1)
        tokens = self.visual.ln_post(x)
        b = tokens.shape[0]
        out: dict[str, torch.Tensor] = {}
        if "patch" in kinds:
            out["patch"] = tokens[:, 1:].reshape(b, h, w, -1)
        if "cls" in kinds:
            out["cls"] = tokens[:, 0]
        for kind in filter(is_layer_kind, kinds):
            out[kind] = captured[kind][:, 1:].reshape(b, h, w, -1)
        if "attn_in" in captured:
            q, k, v = F.linear(captured["attn_in"], attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
            for name, t in (("query", q), ("key", k), ("value", v)):
                if name in kinds:
                    out[name] = t[:, 1:].reshape(b, h, w, -1)
            if "attn" in kinds:
                heads = attention.num_heads
                qh = q[:, :1].reshape(b, 1, heads, -1).transpose(1, 2)  # (B, heads, 1, head_dim): the CLS query
                kh = k.reshape(b, k.shape[1], heads, -1).transpose(1, 2)
                logits = (qh * qh.shape[-1] ** -0.5) @ kh.transpose(-2, -1)
                out["attn"] = logits.softmax(-1)[:, :, 0, 1:].reshape(b, heads, h, w)
        return out


def build(spec: BackboneSpec, state: dict | None) -> OpenCLIPBackbone:
    from .hub import open_clip_visual

    visual = open_clip_visual(spec.arch, bool(spec.options.get("quick_gelu")))
    if state is not None:
        if any(k.startswith("visual.") for k in state):  # a whole CLIP file: the image tower's entries
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        load_into(visual, state, spec.name)
    return OpenCLIPBackbone(spec, visual)
