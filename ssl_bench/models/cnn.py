"""Convolutional backbones (ResNets of torchvision, ConvNeXts of timm) as dense feature extractors.

``patch`` is the last stage's feature map (one vector per output-stride cell, as a ViT gives one
per patch; ConvNeXt: after its final LayerNorm, as DINOv3's normalised patch tokens) and ``cls`` the
pooled vector the network was trained with (ResNet: global average; ConvNeXt: average, then norm).
``layerN`` is stage N (0..3) average-pooled onto the same grid, so every kind shares one grid.
A CNN has no attention, so ``key``/``query``/``value``/``attn`` are refused by ``Backbone``.

Output stride: 32 by default. ResNets with bottleneck blocks can trade the stride of their last
stages for dilation (torchvision's ``replace_stride_with_dilation``), giving a finer grid at the same
weights: registry ``options: {dilation: [false, true, true]}`` with ``patch_size: 8``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..registry import BackboneSpec
from .base import Backbone, is_layer_kind
from .weights import load_into


class CNNBackbone(Backbone):
    """``stem`` then four ``stages``; ``pool`` maps the last feature map (B, C, h, w) to (B, C) and
    ``dense_norm`` normalises it per position (identity for ResNets)."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, parts: "CNNParts"):
        super().__init__(spec)
        self.model = model  # owns the parameters under their checkpoint names
        self._parts = parts  # views into model (a plain tuple, so nothing is registered twice)

    @property
    def num_layers(self) -> int:
        return len(self._parts.stages)

    def _extract(self, images: torch.Tensor, kinds: set[str]) -> dict[str, torch.Tensor]:
        x = self._parts.stem(images)
        maps = []
        for stage in self._parts.stages:
            x = stage(x)
            maps.append(x)
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        out: dict[str, torch.Tensor] = {}
        if "patch" in kinds:
            out["patch"] = self._parts.dense_norm(x).permute(0, 2, 3, 1)
        if "cls" in kinds:
            out["cls"] = self._parts.pool(x)
        for kind in filter(is_layer_kind, kinds):
            stage_map = maps[int(kind[5:])]
            if stage_map.shape[-2:] != (h, w):  # earlier stages are finer: average onto the output grid
                stage_map = F.adaptive_avg_pool2d(stage_map, (h, w))
            out[kind] = stage_map.permute(0, 2, 3, 1)
        return out


class CNNParts(NamedTuple):
    stem: Callable
    stages: list
    pool: Callable
    dense_norm: Callable


def _output_stride(dilation: list[bool]) -> int:
    return 32 // 2 ** sum(bool(d) for d in dilation)


def _torchvision_resnet(spec: BackboneSpec) -> tuple[nn.Module, CNNParts]:
    import torchvision

    dilation = list(spec.options.get("dilation", [False, False, False]))
    if len(dilation) != 3:
        raise UserError(f"{spec.name}: options.dilation needs 3 booleans (layer2..layer4) -- fix backbones/*.yaml")
    if _output_stride(dilation) != spec.patch_size:
        raise UserError(f"{spec.name}: dilation {dilation} gives output stride {_output_stride(dilation)}, the "
                        f"registry says patch_size {spec.patch_size} -- make them agree in backbones/*.yaml")
    if any(dilation) and spec.arch in ("resnet18", "resnet34"):
        raise UserError(f"{spec.name}: {spec.arch} (basic blocks) cannot be dilated in torchvision -- "
                        "use output stride 32 (no dilation) or a bottleneck ResNet")
    kwargs = {"replace_stride_with_dilation": dilation} if any(dilation) else {}
    model = getattr(torchvision.models, spec.arch)(weights=None, **kwargs)
    model.fc = nn.Identity()  # the classifier / projection head is not part of the feature extractor
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    return model, CNNParts(stem, stages, lambda x: x.mean((2, 3)), lambda x: x)


def _timm_convnext(spec: BackboneSpec) -> tuple[nn.Module, CNNParts]:
    arch = spec.timm.split(".")[0] if spec.timm else spec.arch
    model = timm.create_model(arch, pretrained=False, num_classes=0, **spec.options)
    # timm's head pools then normalises (DINOv3's pooled feature); the same LayerNorm applied per
    # position gives DINOv3's normalised patch tokens. norm_pre is the identity for these models.
    return model, CNNParts(model.stem, list(model.stages), lambda x: model.forward_head(model.norm_pre(x)),
                           lambda x: model.head.norm(model.norm_pre(x)))


# Buffers official checkpoints may leave out (BatchNorm's counter does not change the forward pass).
_NOT_LEARNED = ("num_batches_tracked",)


def build(spec: BackboneSpec, state: dict | None) -> CNNBackbone:
    if spec.arch.startswith("resnet"):
        model, parts = _torchvision_resnet(spec)
    elif spec.arch.startswith("convnext"):
        model, parts = _timm_convnext(spec)
    else:
        raise UserError(f"{spec.name}: CNN architecture '{spec.arch}' is not supported -- use a torchvision "
                        "resnet* or a timm convnext_*")
    if state is not None:
        if spec.arch.startswith("convnext"):  # official DINOv3 ConvNeXt names -> timm's
            from timm.models.convnext import checkpoint_filter_fn

            state = checkpoint_filter_fn(state, model)
        load_into(model, state, spec.name, ignore=[k for k in model.state_dict() if k.endswith(_NOT_LEARNED)])
    return CNNBackbone(spec, model, parts)


class TimmFeatureMapBackbone(Backbone):
    """Any other timm network whose ``forward_features`` is a feature map (``timm:NAME`` of a ResNet, ConvNeXt,
    EfficientNet, Swin ...): ``patch`` is that map, ``cls`` the vector its head pools (without the classifier),
    ``layerN`` the N-th of timm's feature levels (``feature_info``: the stem first, then each stage) average-pooled
    onto the same grid, where timm offers ``forward_intermediates``."""

    def __init__(self, spec: BackboneSpec, model: nn.Module):
        super().__init__(spec)
        self.model = model.eval()
        info = getattr(model, "feature_info", None)
        self._stages = len(info) if isinstance(info, list) and hasattr(model, "forward_intermediates") else 0

    @property
    def num_layers(self) -> int:
        return self._stages

    def _channels_first(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[1] == self.spec.embed_dim or x.shape[-1] != self.spec.embed_dim else x.permute(0, 3, 1, 2)

    def _extract(self, images: torch.Tensor, kinds: set[str]) -> dict[str, torch.Tensor]:
        x = self.model.forward_features(images)
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        fmap = self._channels_first(x)  # (B, C, h, w) whatever timm's output format
        out: dict[str, torch.Tensor] = {}
        if "patch" in kinds:
            out["patch"] = fmap.permute(0, 2, 3, 1)
        if "cls" in kinds:
            out["cls"] = self.model.forward_head(x, pre_logits=True)
        layers = sorted(int(k[5:]) for k in kinds if is_layer_kind(k))
        if layers:
            maps = self.model.forward_intermediates(images, indices=self._stages, intermediates_only=True)
            for n in layers:  # timm returns intermediates channels first (NCHW)
                stage_map = maps[n]
                if stage_map.shape[-2:] != (h, w):
                    stage_map = F.adaptive_avg_pool2d(stage_map, (h, w))
                out[f"layer{n}"] = stage_map.permute(0, 2, 3, 1)
        if out.get("patch") is not None and out["patch"].shape[1:3] != (h, w):
            raise UserError(f"{self.spec.name} gives a {tuple(out['patch'].shape[1:3])} map for a {h}x{w} grid of "
                            f"stride {self.patch_size} -- its output stride is not what timm's feature_info says")
        return out


def build_timm(spec: BackboneSpec, state: dict | None) -> TimmFeatureMapBackbone:
    """A timm network named ``timm:NAME`` that is not a ViT (see models/hub.py)."""
    model = timm.create_model(spec.timm or spec.arch, pretrained=False, num_classes=0, **spec.options)
    if state is not None:
        module = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
        if hasattr(module, "checkpoint_filter_fn"):  # the model's own converter of released layouts
            state = module.checkpoint_filter_fn(state, model)
        load_into(model, state, spec.name, ignore=[k for k in model.state_dict() if k.endswith(_NOT_LEARNED)])
    return TimmFeatureMapBackbone(spec, model)
