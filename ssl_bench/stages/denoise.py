"""The de-noising network: a DeepLabV3 trained on pseudo masks, then run on every image.

DatUS^2 de-noises its initial pseudo masks this way; COMUS self-trains the same kind of network on its
pseudo masks, then a fresh one on the first one's predictions (``self_train`` iterates). Pure functions:
``train_denoiser(images, masks, ...)`` -> model, ``predict_denoiser(model, images)`` -> label maps; unlabelled
mask pixels (-1) are ignored.

Presets: ``cpu`` / ``gpu`` are DatUS^2's (the paper describes the network only; its training settings are
ours). ``comus-gpu`` / ``comus-coco-gpu`` are COMUS's Table 11 (PASCAL VOC / MS COCO columns) with its code's
choices where the table is silent (github.com/zadaianchuk/comus, ``semseg/self_train.py``,
``thirdparty/segmentation.py``): DeepLabV3 with a ResNet-50 of output stride 8 whose encoder starts from DINO's
ResNet-50 (``encoder: dino-resnet50-os8``), plain Adam (no weight decay, no schedule), cross-entropy on every
pixel, CropResize (albumentations' RandomResizedCrop: an area fraction drawn from ``crop_scale``, an aspect
ratio from 3/4-4/3, up to 10 draws that fit the image, else the whole image at those ratios) and a horizontal
flip. Their trainer runs epochs 0..n inclusive (n = 9, then 4): Table 11's 10 and 5 epochs, as here.
``comus-cpu`` is the same recipe on the small CPU network (from scratch, 8 + 4 epochs, Adam 1e-3, poly decay).
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
    crop_scale: tuple[float, float] | None = None  # CropResize: area fraction range of a random box (COMUS)
    schedule: str = "poly"  # poly (decay to 0 over the steps, DeepLab's) | constant
    encoder: str | None = None  # registered ResNet-50 whose weights start the encoder (resnet50 arch only)
    later_epochs: int | None = None  # epochs of the self-training iterations after the first; null = epochs

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
            check_like_default("denoiser field", key, value, getattr(DenoiserConfig, key), "")
        if params.get("crop_scale") is not None:
            params["crop_scale"] = _crop_scale(params["crop_scale"])
        config = replace(DENOISER_PRESETS[preset], **params)
        if config.arch not in DENOISER_ARCHS:
            raise UserError(f"denoiser arch {config.arch!r} -- use one of {', '.join(DENOISER_ARCHS)}")
        if config.optimizer not in ("adam", "sgd"):
            raise UserError(f"denoiser optimizer {config.optimizer!r} -- use adam or sgd")
        if config.schedule not in SCHEDULES:
            raise UserError(f"denoiser schedule {config.schedule!r} -- use one of {', '.join(SCHEDULES)}")
        if config.batch_size < 2:  # BatchNorm in the ASPP pooling branch needs two samples
            raise UserError(f"denoiser batch_size {config.batch_size} -- use 2 or more")
        if config.later_epochs is not None and (not isinstance(config.later_epochs, int) or config.later_epochs < 1):
            raise UserError(f"denoiser later_epochs {config.later_epochs!r} -- use null (= epochs) or 1 or more")
        if config.encoder is not None:
            _check_encoder(config)
        if config.input_size < 16 or config.predict_batch_size < 1:
            raise UserError(f"denoiser input_size {config.input_size} / predict_batch_size {config.predict_batch_size} "
                            f"-- use a side of 16 or more and a batch of 1 or more")
        batch = max(config.batch_size, config.predict_batch_size)  # the stem's 64 channels at half size, float32
        require_memory(batch * config.input_size ** 2 * (3 * 4 + 64 * 4 // 4),
                       f"denoiser input_size={config.input_size} with batches of {batch}",
                       "use a smaller input_size or batch_size (preset cpu: 128 and 8)")
        return config

    def describe(self) -> str:
        """The preset this configuration is, or the one it was changed from and what changed (for the stats)."""
        for name, preset in DENOISER_PRESETS.items():
            if preset == self:
                return name
        closest = min(DENOISER_PRESETS, key=lambda n: sum(getattr(DENOISER_PRESETS[n], f.name) != getattr(self, f.name)
                                                         for f in fields(self)))
        changed = [f.name for f in fields(self) if getattr(DENOISER_PRESETS[closest], f.name) != getattr(self, f.name)]
        return f"{closest} with {', '.join(changed)} changed"


def _crop_scale(value) -> tuple[float, float]:
    ok = (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float))
          and not isinstance(v, bool) for v in value) and 0 < value[0] <= value[1])
    if not ok:
        raise UserError(f"denoiser crop_scale {value!r} -- use two area fractions 0 < min <= max, e.g. [0.5, 2.0] "
                        f"(above 1: the whole image more often, as albumentations does), or null (no crops)")
    return float(value[0]), float(value[1])


def _check_encoder(config: "DenoiserConfig") -> None:
    from ..registry import backbone

    spec = backbone(config.encoder)  # an unknown name is one line with suggestions
    if config.arch != "resnet50" or spec.arch != "resnet50" or not spec.builder.endswith("cnn:build"):
        raise UserError(f"denoiser encoder {config.encoder!r} ({spec.arch}) cannot start the {config.arch} "
                        f"de-noiser -- use arch resnet50 with a ResNet-50 backbone (e.g. dino-resnet50-os8), or "
                        f"encoder null")



DENOISER_ARCHS = ("resnet18", "mobilenet_v3_large", "resnet50")
SCHEDULES = ("poly", "constant")
_COMUS_VOC = DenoiserConfig(arch="resnet50", encoder="dino-resnet50-os8", input_size=512, crop_scale=(0.5, 2.0),
                            epochs=10, later_epochs=5, batch_size=56, optimizer="adam", lr=6e-5, weight_decay=0.0,
                            schedule="constant", single_class_threshold=1.0)
DENOISER_PRESETS = {
    "cpu": DenoiserConfig(),
    "gpu": DenoiserConfig(arch="resnet50", input_size=320, epochs=50, batch_size=16,
                          optimizer="sgd", lr=0.01),
    "comus-gpu": _COMUS_VOC,  # COMUS Table 11, PASCAL VOC
    "comus-coco-gpu": replace(_COMUS_VOC, input_size=256, crop_scale=(0.2, 1.0), epochs=1),  # Table 11, MS COCO
    "comus-cpu": DenoiserConfig(crop_scale=(0.5, 2.0), later_epochs=4, single_class_threshold=1.0),
}
PAPER_PRESETS = ("comus-gpu", "comus-coco-gpu")  # every setting from a paper (or its authors' code)
SMALL_PRESETS = ("cpu", "comus-cpu")  # sized for a CPU, not a paper's


def setting_of(described: str) -> str:
    """What kind of configuration ran, for a run's stats: ``paper``, ``small (cpu)`` (a CPU preset, changed or
    not) or ``ours`` (a GPU preset whose settings are ours, or a paper preset with changes)."""
    if described in PAPER_PRESETS:
        return "paper"
    return "small (cpu)" if described.split(" with ")[0] in SMALL_PRESETS else "ours"


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


def crop_box(height: int, width: int, scale: tuple[float, float], rng: np.random.Generator,
             ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random box: albumentations' RandomResizedCrop draw (COMUS's CropResize). An area
    fraction from ``scale`` and a log-uniform aspect ratio from ``ratio``, up to ``attempts`` times until the box
    fits the image; else the whole image, cut to the nearest allowed ratio (centred)."""
    area = height * width
    for _ in range(attempts):
        target = rng.uniform(*scale) * area
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    w, h = width, height
    if width / height < ratio[0]:
        h = int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w = int(round(height * ratio[1]))
    return (height - h) // 2, (width - w) // 2, h, w


class _Samples:
    """Training pairs (normalised image (3, s, s), mask (s, s)) of a lazy image sequence, cached in memory up to
    ``cache_mb``. Without ``crop_scale`` each image is resized whole (DatUS^2); with it, a CropResize box of the
    image (at its own resolution, the mask brought to it) is resized, a new box at every draw."""

    def __init__(self, images, masks, config: DenoiserConfig, count: int, rng: np.random.Generator):
        self.images, self.masks, self.size, self.scale, self.rng = images, masks, config.input_size, config.crop_scale, rng
        self.budget, self.cache, self.cached_bytes = config.cache_mb * 2**20, {}, 0
        self.use_cache = self.scale is not None or count * 3 * self.size ** 2 * 4 <= self.budget

    def __call__(self, i: int):
        import torch

        if i not in self.cache:
            item = self._load(i)
            size = sum(t.element_size() * t.nelement() for t in item)
            if self.use_cache and (self.scale is None or self.cached_bytes + size <= self.budget):
                self.cache[i] = item
                self.cached_bytes += size
        else:
            item = self.cache[i]
        if self.scale is None:
            return item
        image, mask = item
        top, left, h, w = crop_box(*mask.shape, self.scale, self.rng)
        from .regions import upsample_nearest

        y = torch.from_numpy(upsample_nearest(mask[top:top + h, left:left + w].numpy(), (self.size, self.size)))
        return _normalized(image[:, top:top + h, left:left + w], self.size), y

    def _load(self, i: int):
        import torch

        image = np.asarray(self.images[i])
        if self.scale is None:
            return _to_input([image], self.size)[0], torch.from_numpy(ops.upsample_labels(self.masks[i], (self.size,) * 2))
        mask = np.asarray(self.masks[i])
        if mask.shape != image.shape[:2]:
            mask = ops.upsample_labels(mask, image.shape[:2])
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), torch.from_numpy(mask.astype(np.int16))


def _normalized(image_uint8, size: int):
    """uint8 (3, h, w) tensor -> normalised float (3, size, size), bilinear."""
    import torch
    import torch.nn.functional as F

    x = F.interpolate(image_uint8[None].float() / 255.0, size=(size, size), mode="bilinear", align_corners=False)[0]
    return (x - torch.tensor(_IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(_IMAGENET_STD).view(3, 1, 1)


def load_encoder(model, state: dict, name: str) -> None:
    """Start the de-noiser's ResNet-50 encoder from a backbone's state dict (torchvision key layout, no fc)."""
    import torch

    from ..models.weights import load_into

    state = {k: torch.as_tensor(v) for k, v in state.items() if not k.startswith("fc.")}
    load_into(model.backbone, state, f"the de-noiser's encoder ({name})", ignore=("num_batches_tracked",))


def train_denoiser(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    num_classes: int,
    config: DenoiserConfig = DenoiserConfig(),
    seed: int = 0,
    device="cpu",
    progress: Callable[[Iterable], Iterable] | None = None,
    epochs: int | None = None,
    encoder_state: dict | None = None,
):
    """Train DeepLabV3 on pseudo masks (any resolution, -1 ignored); returns (model, n_used).

    ``images`` may be a lazy sequence (len + getitem) so large datasets need not sit in memory. ``epochs``
    replaces the configuration's (later self-training iterations); ``encoder_state`` starts the encoder
    (``config.encoder``'s weights). Global torch RNG state is restored afterwards (fork_rng), so the call is
    reproducible and pure.
    """
    import torch
    import torch.nn.functional as F

    keep = np.flatnonzero(usable_masks(masks, config.single_class_threshold))
    if keep.size == 0:
        raise UserError(
            "no pseudo mask passes the de-noising filter -- raise denoiser.single_class_threshold"
        )
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    sample = _Samples(images, masks, config, len(keep), np.random.default_rng([seed, 1]))  # crops: own stream

    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = build_denoiser(num_classes, config.arch)
        if encoder_state is not None:
            load_encoder(model, encoder_state, config.encoder)
        model = model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        if config.optimizer == "sgd":
            opt = torch.optim.SGD(
                params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay
            )
        elif config.optimizer == "adam":
            opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {config.optimizer!r}")
        batches = epoch_batches(keep, config.batch_size, epochs or config.epochs, rng)
        decay = (lambda s: (1 - s / len(batches)) ** 0.9) if config.schedule == "poly" else (lambda s: 1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)  # poly: as in DeepLab; constant: COMUS
        for idx in progress(batches) if progress else batches:
            xs, ys = zip(*(sample(int(i)) for i in idx))
            x, y = torch.stack(xs), torch.stack(ys).long()
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)  # horizontal flip augmentation
            x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
            logits = model(x.to(device))["out"]
            loss = F.cross_entropy(logits, y.to(device), ignore_index=-1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval(), int(keep.size)


def self_train(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    train_on: Sequence[int],
    num_classes: int,
    config: DenoiserConfig,
    iterations: int = 1,
    seed: int = 0,
    device="cpu",
    progress: Callable[[int], Callable[[Iterable], Iterable]] | None = None,
    encoder_state: dict | None = None,
) -> list[tuple[object, int]]:
    """Iterative self-training (COMUS, Algorithm 2): a network trained on the pseudo masks of the images
    ``train_on``, then, ``iterations`` - 1 times, a fresh one (the same start, seed + iteration) trained for
    ``later_epochs`` on the previous network's predictions for every image. Returns (model, masks used) per
    iteration; ``progress(iteration)`` wraps each training loop."""
    subset = [int(i) for i in train_on]
    rounds = []
    model, used = train_denoiser(_Subset(images, subset), [masks[i] for i in subset], num_classes, config, seed,
                                 device, progress(1) if progress else None, encoder_state=encoder_state)
    rounds.append((model, used))
    for iteration in range(2, iterations + 1):
        predicted = [p.astype(np.int16) for p in predict_denoiser(model, images, config, device)]
        model, used = train_denoiser(images, predicted, num_classes, config, seed + iteration - 1, device,
                                     progress(iteration) if progress else None,
                                     epochs=config.later_epochs or config.epochs, encoder_state=encoder_state)
        rounds.append((model, used))
    return rounds


class _Subset:
    """Lazy view of some items of a sequence."""

    def __init__(self, items, indices: list[int]):
        self.items, self.indices = items, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.items[self.indices[i]]


def predict_denoiser(
    model, images: Iterable[np.ndarray], config: DenoiserConfig = DenoiserConfig(), device="cpu"
) -> Iterator[np.ndarray]:
    """Label map int64 (H, W) per image at its own resolution (logits upsampled, then argmax)."""
    import torch
    import torch.nn.functional as F

    device = torch.device(device)

    def flush(batch):
        # the batch's maps are made before any is yielded: a generator suspended inside inference_mode would
        # switch gradients off for its caller (a later training in the same process would fail)
        with torch.inference_mode():
            logits = model(_to_input(batch, config.input_size).to(device))["out"]
            maps = [F.interpolate(lg[None], size=im.shape[:2], mode="bilinear", align_corners=False)[0]
                    .argmax(0).cpu().numpy().astype(np.int64) for im, lg in zip(batch, logits)]
        yield from maps

    batch: list[np.ndarray] = []
    for im in images:
        batch.append(im)
        if len(batch) == config.predict_batch_size:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


