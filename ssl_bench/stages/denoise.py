"""The de-noising network: a DeepLabV3 trained from scratch on pseudo masks, then run on every image.

DatUS^2 de-noises its initial pseudo masks this way; COMUS self-trains the same kind of network on its
pseudo masks (and again on its own predictions). Pure functions: ``train_denoiser(images, masks, ...)`` ->
model, ``predict_denoiser(model, images)`` -> label maps; unlabelled mask pixels (-1) are ignored.
The de-noising network is described in the DatUS^2 paper only; its training settings are ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

from .. import ops
from ..errors import UserError
from ..registry import check_like_default
from ..resources import require_memory

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

@dataclass(frozen=True)
class DenoiserConfig:
    """DeepLabV3 trained from scratch (weights=None, weights_backbone=None).

    The defaults are the "cpu" preset: small enough to train on ~100 images in about a minute on
    2 CPU cores. "gpu" is the full-size network (torchvision deeplabv3_resnet50, as the paper
    names); the paper gives no training settings, so epochs, batch and learning rate are ours.

    arch: resnet18 (layers 1-3, output stride 16, 256 channels: BasicBlock cannot dilate) |
    mobilenet_v3_large (torchvision deeplabv3_mobilenet_v3_large) | resnet50.
    """

    arch: str = "resnet18"
    input_size: int = 128  # images and masks are resized to a square of this side for training
    epochs: int = 8  # passes over the usable masks
    batch_size: int = 8
    optimizer: str = "adam"  # adam | sgd (momentum 0.9); poly learning-rate decay either way
    lr: float = 1e-3
    weight_decay: float = 1e-4
    single_class_threshold: float = 0.95  # drop masks whose largest class covers more
    predict_batch_size: int = 16
    cache_mb: int = 1024  # keep resized training images in memory up to this size

    @classmethod
    def from_params(cls, params: str | dict | None) -> DenoiserConfig:
        """A preset name ("cpu", "gpu") or a dict of fields, optionally on top of {"preset": NAME}."""
        if not isinstance(params, (str, dict, type(None))):
            raise UserError(f"denoiser={params!r} -- use a preset (cpu, gpu) or a mapping, e.g. "
                            f"-p 'denoiser={{preset: cpu, epochs: 5}}'")
        params = {"preset": params} if isinstance(params, str) else dict(params or {})
        preset = params.pop("preset", "cpu")
        if preset not in DENOISER_PRESETS:
            raise UserError(f"unknown denoiser preset {preset!r} -- use one of {sorted(DENOISER_PRESETS)}")
        unknown = set(params) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(
                f"unknown denoiser params {sorted(unknown)} -- use {[f.name for f in fields(cls)]}"
            )
        for key, value in params.items():  # the preset's field types: 2.5 epochs or "abc" fail here
            check_like_default("denoiser field", key, value, getattr(DENOISER_PRESETS[preset], key), "")
        config = replace(DENOISER_PRESETS[preset], **params)
        if config.arch not in DENOISER_ARCHS:
            raise UserError(f"denoiser arch {config.arch!r} -- use one of {', '.join(DENOISER_ARCHS)}")
        if config.optimizer not in ("adam", "sgd"):
            raise UserError(f"denoiser optimizer {config.optimizer!r} -- use adam or sgd")
        if config.batch_size < 2:  # BatchNorm in the ASPP pooling branch needs two samples
            raise UserError(f"denoiser batch_size {config.batch_size} -- use 2 or more")
        if config.input_size < 16 or config.predict_batch_size < 1:
            raise UserError(f"denoiser input_size {config.input_size} / predict_batch_size {config.predict_batch_size} "
                            f"-- use a side of 16 or more and a batch of 1 or more")
        batch = max(config.batch_size, config.predict_batch_size)  # the stem's 64 channels at half size, float32
        require_memory(batch * config.input_size ** 2 * (3 * 4 + 64 * 4 // 4),
                       f"denoiser input_size={config.input_size} with batches of {batch}",
                       "use a smaller input_size or batch_size (preset cpu: 128 and 8)")
        return config



DENOISER_ARCHS = ("resnet18", "mobilenet_v3_large", "resnet50")
DENOISER_PRESETS = {
    "cpu": DenoiserConfig(),
    "gpu": DenoiserConfig(arch="resnet50", input_size=320, epochs=50, batch_size=16,
                          optimizer="sgd", lr=0.01),
}


def build_denoiser(num_classes: int, arch: str = "resnet18"):
    """Untrained torchvision DeepLabV3 with ``num_classes`` outputs (no pretrained weights)."""
    import torch.nn as nn
    from torchvision.models import resnet18
    from torchvision.models.segmentation import (
        deeplabv3_mobilenet_v3_large,
        deeplabv3_resnet50,
    )
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

    if arch == "resnet50":
        return deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes)
    if arch == "mobilenet_v3_large":
        return deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=num_classes
        )
    if arch != "resnet18":
        raise ValueError(f"unknown denoiser arch {arch!r}")

    class _Trunk(nn.Module):  # DeepLabV3 wants a backbone returning {"out": features}
        def __init__(self):
            super().__init__()
            r = resnet18(weights=None)
            self.body = nn.Sequential(
                r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3
            )

        def forward(self, x):
            return {"out": self.body(x)}

    # atrous rates (6, 12, 18): the DeepLabV3 setting for output stride 16
    return DeepLabV3(_Trunk(), DeepLabHead(256, num_classes, atrous_rates=(6, 12, 18)))


def usable_masks(masks: Iterable[np.ndarray], threshold: float = 0.95) -> np.ndarray:
    """Boolean per mask: has labelled pixels and its largest class covers <= threshold of them.

    Near-single-class masks teach the network little but "predict the majority class".
    """
    keep = []
    for m in masks:
        counts = np.bincount(m[m >= 0].ravel().astype(np.int64))
        keep.append(counts.sum() > 0 and counts.max() <= threshold * counts.sum())
    return np.array(keep, dtype=bool)


def _to_input(images: Sequence[np.ndarray], size: int):
    """uint8 images (H, W, 3), any sizes -> normalised float tensor (B, 3, size, size)."""
    import torch
    import torch.nn.functional as F

    batch = [
        F.interpolate(
            torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255.0,
            size=(size, size), mode="bilinear", align_corners=False, antialias=True,
        )
        for im in images
    ]
    x = torch.cat(batch)
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def epoch_batches(
    items: np.ndarray, batch_size: int, epochs: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffled full batches, epoch after epoch (the last partial batch of an epoch is dropped;
    fewer items than a batch are drawn with replacement, so every step sees ``batch_size``)."""
    per_epoch = max(1, len(items) // batch_size)
    out = []
    for _ in range(epochs):
        order = rng.permutation(items) if len(items) >= batch_size else rng.choice(items, batch_size)
        out.extend(order[: per_epoch * batch_size].reshape(per_epoch, batch_size))
    return out


def train_denoiser(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    num_classes: int,
    config: DenoiserConfig = DenoiserConfig(),
    seed: int = 0,
    device="cpu",
    progress: Callable[[Iterable], Iterable] | None = None,
):
    """Train DeepLabV3 on pseudo masks (any resolution, -1 ignored); returns (model, n_used).

    ``images`` may be a lazy sequence (len + getitem) so large datasets need not sit in memory.
    Global torch RNG state is restored afterwards (fork_rng), so the call is reproducible and pure.
    """
    import torch
    import torch.nn.functional as F

    keep = np.flatnonzero(usable_masks(masks, config.single_class_threshold))
    if keep.size == 0:
        raise UserError(
            "no pseudo mask passes the de-noising filter -- raise denoiser.single_class_threshold"
        )
    device = torch.device(device)
    size = config.input_size
    rng = np.random.default_rng(seed)
    use_cache = len(keep) * 3 * size * size * 4 <= config.cache_mb * 2**20
    cache: dict[int, tuple] = {}

    def sample(i: int):
        if i in cache:
            return cache[i]
        x = _to_input([images[i]], size)[0]
        y = torch.from_numpy(ops.upsample_labels(masks[i], (size, size)))
        if use_cache:
            cache[i] = (x, y)
        return x, y

    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = build_denoiser(num_classes, config.arch).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        if config.optimizer == "sgd":
            opt = torch.optim.SGD(
                params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay
            )
        elif config.optimizer == "adam":
            opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {config.optimizer!r}")
        batches = epoch_batches(keep, config.batch_size, config.epochs, rng)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (1 - s / len(batches)) ** 0.9  # poly decay, as in DeepLab
        )
        for idx in progress(batches) if progress else batches:
            xs, ys = zip(*(sample(int(i)) for i in idx))
            x, y = torch.stack(xs), torch.stack(ys)
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)  # horizontal flip augmentation
            x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
            logits = model(x.to(device))["out"]
            loss = F.cross_entropy(logits, y.to(device), ignore_index=-1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval(), int(keep.size)


def predict_denoiser(
    model, images: Iterable[np.ndarray], config: DenoiserConfig = DenoiserConfig(), device="cpu"
) -> Iterator[np.ndarray]:
    """Label map int64 (H, W) per image at its own resolution (logits upsampled, then argmax)."""
    import torch
    import torch.nn.functional as F

    device = torch.device(device)

    def flush(batch):
        with torch.inference_mode():
            logits = model(_to_input(batch, config.input_size).to(device))["out"]
            for im, lg in zip(batch, logits):
                up = F.interpolate(lg[None], size=im.shape[:2], mode="bilinear", align_corners=False)
                yield up[0].argmax(0).cpu().numpy().astype(np.int64)

    batch: list[np.ndarray] = []
    for im in images:
        batch.append(im)
        if len(batch) == config.predict_batch_size:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


