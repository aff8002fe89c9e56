"""An in-memory model (a network being trained) as a ``Backbone``: what ``ssl_bench.evaluate`` accepts.

Three forms, tried in order:

1. an ssl-bench ``Backbone`` (e.g. ``build_backbone(...)``): used as it is;
2. a timm ViT (``timm.create_model(..., dynamic_img_size=True)``, or any model shaped like one: ``patch_embed``,
   ``blocks`` whose last attention projects q, k, v, ``forward_features``, ``num_prefix_tokens``): every feature
   kind, through the same hooks as registry ViTs;
3. the adapter protocol, for anything else: the module has ``patch_size`` (int) and
   ``extract_features(images) -> dict``, where ``images`` is a normalised float batch (B, 3, H, W) with H and W
   multiples of the patch size, and the dict holds ``patch`` (B, h, w, D) or (B, h*w, D) and any of ``cls``
   (B, D), ``key`` / ``query`` / ``value`` (like ``patch``), ``attn`` (B, heads, h, w), ``layerN`` (like
   ``patch``). What it gives is probed once, with one forward pass at the model's input size; a task that
   reads a kind it does not give is refused in one line before any extraction.

A model's identity (the feature-cache key and the stored ``weights``) is a digest of its class, its source
code and every tensor of its state dict: one changed weight is another model, never served cached features.
"""

from __future__ import annotations

import hashlib
import inspect

import torch

from ..errors import UserError
from ..registry import BackboneSpec
from .base import Backbone, is_layer_kind

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ADAPTER_HINT = ("give a timm ViT, or a module with patch_size and extract_features(images) -> {'patch': (B, h, w, D), "
                "...} (README: Benchmark your own backbone)")


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's class, its source code (where Python has it) and every state-dict tensor's name,
    dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    cls = type(model)
    digest.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    try:
        digest.update(inspect.getsource(cls).encode())
    except (OSError, TypeError):  # defined in a notebook cell or C: its name and weights still count
        pass
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _device(model: torch.nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def live_spec(name: str, model: torch.nn.Module, patch_size: int, embed_dim: int, heads: int, input_size: int,
              mean, std) -> BackboneSpec:
    params = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    return BackboneSpec(name=name, family="in-memory", builder="", arch=type(model).__name__, patch_size=int(patch_size),
                        embed_dim=int(embed_dim), params_m=params, pretraining_data="your training run",
                        licence="yours", heads=int(heads), input_size=int(input_size), mean=tuple(mean), std=tuple(std))


class AdapterBackbone(Backbone):
    """A module of the adapter protocol (see the module docstring)."""

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module, kinds: set[str], layers: int):
        super().__init__(spec)
        self.model = model
        self._kinds, self._layers = kinds, layers

    @property
    def num_layers(self) -> int:
        return self._layers

    def supported_kinds(self) -> set[str]:
        return set(self._kinds)

    def refused_kinds(self) -> dict[str, str]:
        return {kind: "its extract_features does not return it" for kind in ("patch", "cls", "key", "query", "value",
                                                                              "attn") if kind not in self._kinds}

    def _extract(self, images: torch.Tensor, kinds: set[str]) -> dict[str, torch.Tensor]:
        given = _as_grids(self.model.extract_features(images), images, self.patch_size, self.spec.name)
        return {kind: given[kind] for kind in kinds}


def _as_grids(given, images: torch.Tensor, patch: int, name: str) -> dict[str, torch.Tensor]:
    """The adapter's output with token lists (B, h*w, D) as grids (B, h, w, D); any other shape is one line."""
    if not isinstance(given, dict) or "patch" not in given:
        raise UserError(f"{name}: extract_features must return a dict with at least 'patch' -- {ADAPTER_HINT}")
    b, _, height, width = images.shape
    h, w = height // patch, width // patch
    out = {}
    for kind, t in given.items():
        if not torch.is_tensor(t):
            raise UserError(f"{name}: extract_features gave {type(t).__name__} for '{kind}', not a tensor")
        if kind == "cls":
            wanted = t.dim() == 2 and t.shape[0] == b
        elif kind == "attn":
            wanted = t.dim() == 4 and t.shape[0] == b and tuple(t.shape[2:]) == (h, w)
        else:
            if t.dim() == 3 and t.shape[1] == h * w:
                t = t.reshape(b, h, w, -1)
            wanted = t.dim() == 4 and tuple(t.shape[:3]) == (b, h, w)
        if not wanted:
            raise UserError(f"{name}: extract_features gave '{kind}' of shape {tuple(t.shape)} for {b} images of "
                            f"{height}x{width} (patch {patch}: a {h}x{w} grid) -- patch/key/query/value are (B, h, w, D) "
                            f"or (B, h*w, D), cls (B, D), attn (B, heads, h, w)")
        out[kind] = t
    return out


def live_backbone(model: torch.nn.Module, name: str, patch_size: int | None = None, mean=None, std=None,
                  input_size: int | None = None) -> Backbone:
    """``model`` as a Backbone labelled ``name`` (see the module docstring for the forms it may take)."""
    from .hub import is_vit_like
    from .vit import ViTBackbone

    if isinstance(model, Backbone):
        return model
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"ssl_bench.evaluate takes a torch.nn.Module, got {type(model).__name__} -- {ADAPTER_HINT}")
    default_mean, default_std = IMAGENET
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = tuple(mean or cfg.get("mean") or default_mean), tuple(std or cfg.get("std") or default_std)
    if is_vit_like(model) and hasattr(model, "forward_features") and not hasattr(model, "extract_features"):
        patch = patch_size or model.patch_embed.patch_size
        patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        if not getattr(model, "dynamic_img_size", False):
            raise UserError(f"{name}: this timm ViT takes only its training size -- create it with "
                            f"timm.create_model(..., dynamic_img_size=True) (same weights)")
        size = input_size or int((cfg.get("input_size") or (3, 224, 224))[-1])
        spec = live_spec(name, model, patch, model.embed_dim, model.blocks[-1].attn.num_heads, size, mean, std)
        return ViTBackbone(spec, model)
    if not hasattr(model, "extract_features"):
        raise UserError(f"{name}: {type(model).__name__} is not a timm ViT and has no extract_features -- {ADAPTER_HINT}")
    patch = patch_size or getattr(model, "patch_size", None)
    if not isinstance(patch, int) or patch < 1:
        raise UserError(f"{name}: {type(model).__name__} needs patch_size (an int), as an attribute or "
                        f"ssl_bench.evaluate(..., patch_size=16) -- {ADAPTER_HINT}")
    size = input_size or max(patch, 224 // patch * patch)
    probe = torch.zeros(1, 3, size, size, device=_device(model))
    with torch.inference_mode():
        given = _as_grids(model.extract_features(probe), probe, patch, name)
    kinds = {k for k in given if not is_layer_kind(k)}
    layers = [int(k[5:]) for k in given if is_layer_kind(k)]
    heads = given["attn"].shape[1] if "attn" in given else (1 if kinds & {"key", "query", "value"} else 0)
    spec = live_spec(name, model, patch, given["patch"].shape[-1], heads, size, mean, std)
    return AdapterBackbone(spec, model, kinds, max(layers) + 1 if layers and sorted(layers) == list(range(len(layers)))
                           else 0)


__all__ = ["AdapterBackbone", "live_backbone", "model_digest"]
