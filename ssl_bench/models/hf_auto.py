"""Hugging Face transformers image models named ``hf:REPO``, run by transformers itself (ViT, DINOv2 with or without
registers, ViT-MAE, I-JEPA, CLIP's and SigLIP's vision towers, ...).

Everything is found from the model: the patch grid from the config, the prefix tokens (CLS, registers) from the
sequence length, keys / queries / values from forward hooks on the last layer's projections (heads
concatenated), ``attn`` from the last layer's attention probabilities (the model is built with eager attention
so that transformers returns them), ``layerN`` from the hidden states. Two models need a word:
CLIP's ``last_hidden_state`` is taken before its ``post_layernorm``, which is applied here to every token (as
open_clip's ``ln_post``); ViT-MAE masks 75% of the patches at random in its forward, so its mask ratio is set to
0 and its shuffling noise fixed to the identity order. A model without a CLS token (SigLIP) gives its own pooled
vector as ``cls`` and no ``attn``.

Weights: the file the search found (``models/weights.py``, read without unpickling code) is handed to
transformers' ``from_pretrained`` as a state dict, so its renames of older checkpoints apply.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import UserError
from ..registry import BackboneSpec
from .base import Backbone, is_layer_kind

UNNORMED_OUTPUT = {"clip_vision_model": "post_layernorm"}  # model_type -> the final norm its forward leaves out
PROJECTIONS = {"query": ("q_proj", "query"), "key": ("k_proj", "key"), "value": ("v_proj", "value")}


def _encoder_layers(model: torch.nn.Module, depth: int) -> torch.nn.ModuleList:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth:
            return module
    raise UserError(f"cannot find the {depth} encoder layers of {type(model).__name__} -- hf: takes ViT-like models")


def _projections(layer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The last layer's q / k / v projection modules, by their usual names across transformers releases."""
    found = {}
    for name, module in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        for kind, names in PROJECTIONS.items():
            if leaf in names and isinstance(module, torch.nn.Linear):
                found.setdefault(kind, module)
    return found if len(found) == 3 else {}


class HFBackbone(Backbone):
    def __init__(self, spec: BackboneSpec, model: torch.nn.Module):
        super().__init__(spec)
        self.model = model.eval()
        config = model.config
        self._layers = _encoder_layers(model, config.num_hidden_layers)
        self._projections = _projections(self._layers[-1])
        self._forward_args = set(inspect.signature(model.forward).parameters)
        modules = dict(model.named_modules())
        norm = UNNORMED_OUTPUT.get(config.model_type)  # found wherever this transformers release nests it
        self._final_norm = next((m for n, m in modules.items() if norm and n.rsplit(".", 1)[-1] == norm), None)
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".layer" not in n}
        self.has_cls_token = bool(names & {"cls_token", "class_embedding"})

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def refused_kinds(self) -> dict[str, str]:
        refused = {}
        if not self._projections:
            refused.update({k: "its attention has no separate q/k/v projections to hook" for k in PROJECTIONS})
        if not self.has_cls_token:
            refused["attn"] = "it has no CLS token to attend from"
        return refused

    def _extract(self, images: torch.Tensor, kinds: set[str]) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        hooks = [module.register_forward_hook(lambda m, i, out, kind=kind: captured.__setitem__(kind, out))
                 for kind, module in self._projections.items() if kind in kinds]
        b, _, height, width = images.shape
        h, w = height // self.patch_size, width // self.patch_size
        kwargs = {"output_attentions": "attn" in kinds, "output_hidden_states": any(map(is_layer_kind, kinds))}
        if "interpolate_pos_encoding" in self._forward_args:
            kwargs["interpolate_pos_encoding"] = True
        if "noise" in self._forward_args:  # ViT-MAE: keep every patch, in order (its mask ratio is 0 here)
            kwargs["noise"] = torch.arange(h * w, device=images.device, dtype=images.dtype).expand(b, -1)
        try:
            output = self.model(pixel_values=images, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        tokens = output.last_hidden_state
        if self._final_norm is not None:
            tokens = self._final_norm(tokens)
        prefix = tokens.shape[1] - h * w  # CLS and registers
        if prefix < 0:
            raise RuntimeError(f"{self.spec.name}: {tokens.shape[1]} tokens for a {h}x{w} patch grid")
        out: dict[str, torch.Tensor] = {}
        if "patch" in kinds:
            out["patch"] = tokens[:, prefix:].reshape(b, h, w, -1)
        if "cls" in kinds:
            pooled = getattr(output, "pooler_output", None)
            out["cls"] = tokens[:, 0] if self.has_cls_token else (pooled if pooled is not None else
                                                                   tokens[:, prefix:].mean(1))
        for kind in filter(is_layer_kind, kinds):  # hidden_states[0] is the embedding output
            out[kind] = output.hidden_states[int(kind[5:]) + 1][:, prefix:].reshape(b, h, w, -1)
        for kind in PROJECTIONS:
            if kind in kinds:
                out[kind] = captured[kind][:, prefix:].reshape(b, h, w, -1)
        if "attn" in kinds:
            out["attn"] = output.attentions[-1][:, :, 0, prefix:].reshape(b, -1, h, w)
        return out


def build(spec: BackboneSpec, state: dict | None) -> HFBackbone:
    from .hub import hf_config, hf_model_class, quiet_transformers

    config = hf_config(spec.hf)
    if hasattr(config, "mask_ratio"):  # ViT-MAE: no random masking when extracting features
        config.mask_ratio = 0.0
    cls = hf_model_class(config)
    with quiet_transformers():
        if state is None:
            model = cls._from_config(config, attn_implementation="eager")
        else:
            model, info = cls.from_pretrained(None, config=config, state_dict=state, attn_implementation="eager",
                                              output_loading_info=True)
            missing = [k for k in info["missing_keys"] if not k.startswith(("pooler.", "head."))]
            if missing:
                raise UserError(f"checkpoint does not fit {spec.name}: {len(missing)} weights missing (e.g. "
                                f"{missing[:3]}) -- is it the right file for this model?")
    return HFBackbone(spec, model)
