"""BASNet (Qin et al., CVPR 2019), the saliency detector COMUS uses, as the segmenter stage ``saliency-basnet``.

COMUS's proposals come from a BASNet trained on DeepUSPS's unsupervised saliency masks of MSRA-B, released by
MaskContrast (github.com/wvangansbeke/Unsupervised-Semantic-Segmentation, ``saliency/``; COMUS's README saves
it as ``basnet_unsupervised.pth``). Nothing is downloaded: the file is found in ``$SSL_BENCH_WEIGHTS`` or
given with ``-p segmenter.weights=PATH``; a run with ``--weights random`` gets a seeded random BASNet.

The network is written here from the paper's description, with the module names of the authors' release so
that its checkpoints load unchanged: a ResNet-34 encoder (``encoder1``-``encoder4``, after a stride-1 3x3 input
convolution), two more stages of three basic blocks after 2x2 max pooling (``resb5_*``, ``resb6_*``), a bridge
of three dilated convolutions (``convbg_*``), a decoder of six stages of three convolutions each, every stage
fed its encoder stage (``conv6d_*`` ... ``conv1d_*``), a side output per stage (``outconv*``) and a residual
refinement U-Net on the finest one (``refunet``). Only the refined map is computed: the other side outputs
serve training. Stage 6d's last convolution is normalised by ``bn6d_2``, as in COMUS's copy
(``thirdparty/basnet.py``, the code that loads these weights; BASNet's own repository uses ``bn5d_2`` there).
Checkpoint layouts: a plain state dict (the supervised release) or ``{"net": state dict}`` (the unsupervised
one), ``module.`` prefixes stripped.

As COMUS's code (``comus/saliency.py``, ``datasets/pascal_voc.py``): the image resized to 256 x 256, ImageNet
normalisation, the refined map min-max scaled and thresholded at ``theta`` = 0.5, the mask resized to the image
(nearest). The authors scale over a batch of 40 images at once; we scale each image on its own, so a mask does
not depend on its batch. They resize the original image; we resize the protocol image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import UserError
from ...registry import BackboneSpec
from .saliency import Saliency, check_params as check_saliency_params

WEIGHTS_FILE = "basnet_unsupervised.pth"
WEIGHTS_URL = "https://drive.google.com/file/d/14qsoXU-NE63jKzuGPTJd8DRDnpnP4w6j"
# What the weights lookup of the backbones (models/weights.py) needs to find and identify the file.
SPEC = BackboneSpec(name="basnet-unsupervised", family="basnet", builder="ssl_bench.stages.segmenters.basnet:build",
                    arch="basnet", patch_size=1, embed_dim=1, params_m=87.06, pretraining_data="MSRA-B (DeepUSPS masks)",
                    licence="MIT (BASNet code); weights: MaskContrast release", file=WEIGHTS_FILE, url=WEIGHTS_URL,
                    checkpoint={"wrappers": ["net"]})

# (stage, input channels, channels, output channels, dilation of the 2nd and 3rd convolution), coarsest first
DECODER = (("6d", 1024, 512, 512, 2), ("5d", 1024, 512, 512, 1), ("4d", 1024, 512, 256, 1),
           ("3d", 512, 256, 128, 1), ("2d", 256, 128, 64, 1), ("1d", 128, 64, 64, 1))
SIDE_OUTPUTS = (("b", 512), ("6", 512), ("5", 512), ("4", 256), ("3", 128), ("2", 64), ("1", 64))


def _conv_bn_relu(module, name: str, bn_name: str, cin: int, cout: int, dilation: int = 1) -> None:
    """Registers ``name`` (3x3 convolution with bias) and ``bn_name`` on ``module``, as the release names them."""
    from torch import nn

    setattr(module, name, nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation))
    setattr(module, bn_name, nn.BatchNorm2d(cout))


def _apply(module, name: str, bn_name: str, x):
    return getattr(module, bn_name)(getattr(module, name)(x)).relu()


def build_basnet():
    """An untrained BASNet (random weights; ``torch.manual_seed`` decides them)."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torchvision.models import resnet34
    from torchvision.models.resnet import BasicBlock

    def up(x, like):
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    class RefineUNet(nn.Module):
        """The residual refinement module: a 4-level U-Net of 64 channels whose output is added to its input."""

        def __init__(self):
            super().__init__()
            self.conv0 = nn.Conv2d(1, 64, 3, padding=1)
            for level in range(1, 6):
                _conv_bn_relu(self, f"conv{level}", f"bn{level}", 64, 64)
            for level in range(1, 5):
                _conv_bn_relu(self, f"conv_d{level}", f"bn_d{level}", 128, 64)
            self.conv_d0 = nn.Conv2d(64, 1, 3, padding=1)

        def forward(self, x):
            h = self.conv0(x)
            skips = []
            for level in range(1, 5):
                h = _apply(self, f"conv{level}", f"bn{level}", h)
                skips.append(h)
                h = F.max_pool2d(h, 2, 2, ceil_mode=True)
            h = _apply(self, "conv5", "bn5", h)
            for level in range(4, 0, -1):
                skip = skips[level - 1]
                h = _apply(self, f"conv_d{level}", f"bn_d{level}", torch.cat((up(h, skip), skip), 1))
            return x + self.conv_d0(h)

    class BASNet(nn.Module):
        def __init__(self):
            super().__init__()
            resnet = resnet34(weights=None)
            self.inconv, self.inbn = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64)
            self.encoder1, self.encoder2 = resnet.layer1, resnet.layer2
            self.encoder3, self.encoder4 = resnet.layer3, resnet.layer4
            for stage in (5, 6):
                for block in (1, 2, 3):
                    setattr(self, f"resb{stage}_{block}", BasicBlock(512, 512))
            for part in ("1", "m", "2"):
                _conv_bn_relu(self, f"convbg_{part}", f"bnbg_{part}", 512, 512, dilation=2)
            for stage, cin, mid, cout, dilation in DECODER:
                _conv_bn_relu(self, f"conv{stage}_1", f"bn{stage}_1", cin, mid)
                _conv_bn_relu(self, f"conv{stage}_m", f"bn{stage}_m", mid, mid, dilation)
                _conv_bn_relu(self, f"conv{stage}_2", f"bn{stage}_2", mid, cout, dilation)
            for side, cin in SIDE_OUTPUTS:
                setattr(self, f"outconv{side}", nn.Conv2d(cin, 1, 3, padding=1))
            self.refunet = RefineUNet()

        def forward(self, x):
            """Saliency probability (B, 1, H, W) of the refined output; H, W multiples of 32."""
            h = self.inbn(self.inconv(x)).relu()
            encoded = []
            for stage in (self.encoder1, self.encoder2, self.encoder3, self.encoder4):
                h = stage(h)
                encoded.append(h)
            for stage in (5, 6):
                h = F.max_pool2d(h, 2, 2, ceil_mode=True)
                for block in (1, 2, 3):
                    h = getattr(self, f"resb{stage}_{block}")(h)
                encoded.append(h)
            bridge = encoded[-1]
            for part in ("1", "m", "2"):
                bridge = _apply(self, f"convbg_{part}", f"bnbg_{part}", bridge)
            h = bridge
            for (stage, *_), skip in zip(DECODER, reversed(encoded)):
                h = torch.cat((up(h, skip), skip), 1)
                for part in ("1", "m", "2"):
                    h = _apply(self, f"conv{stage}_{part}", f"bn{stage}_{part}", h)
            return torch.sigmoid(self.refunet(self.outconv1(h)))

    return BASNet()


def load_basnet(path: Path | None, seed: int = 0):
    """BASNet in eval mode: the checkpoint at ``path`` (either release layout), or seeded random weights."""
    import torch

    from ...models.weights import load_into, read_checkpoint, unwrap_state_dict

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_basnet()
    if path is not None:
        state = unwrap_state_dict(read_checkpoint(Path(path)), SPEC.checkpoint)
        counters = [k for k in model.state_dict() if k.endswith("num_batches_tracked")]  # older files lack them
        load_into(model, state, f"BASNet ({path})", ignore=counters)
    return model.eval()


def predict_saliency(model, image: np.ndarray, input_size: int = 256, device="cpu") -> np.ndarray:
    """The refined saliency (input_size, input_size) of one uint8 image, min-max scaled to [0, 1]."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    with torch.inference_mode():
        out = model(((x - mean) / std).to(device))[0, 0].float().cpu().numpy()
    span = out.max() - out.min()
    return (out - out.min()) / span if span > 0 else np.zeros_like(out)


class BasnetSaliency(Saliency):
    """The segmenter stage ``saliency-basnet``."""

    map_on_grid = False
    uses_image = True

    def __init__(self, model, theta: float = 0.5, min_area: float = 400, input_size: int = 256,
                 patch_size: int = 16, device="cpu"):
        super().__init__(theta, min_area, patch_size)
        self.model, self.input_size, self.device = model.to(device), input_size, device

    @classmethod
    def from_context(cls, ctx, weights: str | None = None, **params):
        source = weights_source(ctx, weights)
        model = load_basnet(source.path, seed=ctx.weights_seed)
        return cls(model, **params, patch_size=ctx.patch_size, device=ctx.device)

    @staticmethod
    def identity(ctx, weights: str | None = None, **_) -> dict:
        return {"basnet": weights_source(ctx, weights).identity}

    @staticmethod
    def weights_needed(weights: str | None = None, **_) -> list[BackboneSpec]:
        """The released file (``reproduce --plan`` lists it), unless the run names its own."""
        return [] if weights else [SPEC]

    def foreground(self, features: dict, image, index) -> np.ndarray:
        from ..regions import upsample_nearest

        saliency = predict_saliency(self.model, image, self.input_size, self.device)
        return upsample_nearest(saliency > self.theta, image.shape[:2])


def weights_source(ctx, weights: str | None):
    """Where the BASNet weights come from: ``weights`` if given; random when the run's backbone is; else the
    released file in ``$SSL_BENCH_WEIGHTS`` (or the torch.hub cache); else one line saying where to put it."""
    import os

    from ...models.weights import locate, resolve

    if weights:
        if not Path(weights).expanduser().is_file():
            raise UserError(f"segmenter.weights={weights}: no such file -- give the BASNet checkpoint's path")
        return resolve(SPEC, str(Path(weights).expanduser()))
    if ctx.random_weights:
        return resolve(SPEC, "random", ctx.weights_seed)
    found = locate(SPEC)
    if found is None:
        local = os.environ.get("SSL_BENCH_WEIGHTS")
        where = f"$SSL_BENCH_WEIGHTS ({local})" if local else "a folder named by $SSL_BENCH_WEIGHTS"
        raise UserError(f"no BASNet weights: put {WEIGHTS_FILE} (download: {WEIGHTS_URL}) in {where}, or pass "
                        f"-p segmenter.weights=PATH, or use another saliency source (-p segmenter=saliency-ncut)")
    return resolve(SPEC, str(found[1]))


def check_params(p: dict) -> None:
    check_saliency_params(p)
    if p["input_size"] < 32 or p["input_size"] % 32:
        raise UserError(f"input_size={p['input_size']!r} -- BASNet needs a multiple of 32 (-p segmenter.input_size=256)")
