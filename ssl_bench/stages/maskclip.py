"""Language-guided region classes: MaskCLIP's dense text classification with an open_clip model, and the region
embedding ``maskclip`` that counts its pixel classes in each region (ACSeg, shared paper 001, Sec. 4.5: a
region takes the mode of MaskCLIP's pixel classes inside it; the ``argmax`` clusterer reads the mode off).

MaskCLIP (Zhou, Loy, Dai, ECCV 2022; read from github.com/chongzhou96/MaskCLIP, its ViT backbone and
MaskClipHead): in the last block of CLIP's image ViT each patch token skips the query-key attention, so it goes
through the value projection and the output projection (the "value embedding"), the residual, the block's MLP
(residual), the final LayerNorm and the image projection: a per-patch embedding in the joint image-text space.
A patch's class is the class name whose text embedding is most cosine-similar. Text embeddings are MaskCLIP's
prompt engineering: each name in every template, encoded, L2-normalised, averaged, normalised again
(``templates: maskclip`` = open_clip's 80 OpenAI ImageNet templates plus MaskCLIP's 5 scene templates;
``imagenet``: the 80; ``single``: "a photo of a {}."). The image is the protocol image stretched to the CLIP
model's input (MaskCLIP's 224 x 224 setting); its class scores are upsampled bilinearly to the image before the
argmax. Without a ``background_text`` the dataset's background class is not a prompt (MaskCLIP's VOC setting
"w/o background"; ACSeg finds background with its foreground filter instead). Only ViT CLIPs have the last
attention block the trick needs; MaskCLIP's ResNet route is not implemented.

Weights are named as open_clip names them (model ``ViT-B-16``, pretrained tag ``openai``; `python -c "import
open_clip; print(open_clip.list_pretrained())"`). Nothing is downloaded: the file is looked for in
``$SSL_BENCH_WEIGHTS`` (``MODEL-TAG.safetensors`` / ``.bin`` / ``.pt``), then the Hugging Face cache (the tag's
``hf_hub`` repository) and open_clip's own download cache (``~/.cache/clip``). A run with random weights gets a
seeded random CLIP (and every output of that run already says random weights).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models.weights import RANDOM, WeightsSource, file_identity
from ..ops import upsample_argmax
from .embeddings import RegionImage
from .regions import class_counts

SCENE_TEMPLATES = ("there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
                   "this is the {} in the scene.", "this is one {} in the scene.")
TEMPLATE_SETS = ("maskclip", "imagenet", "single")


def prompt_templates(name: str) -> tuple[str, ...]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    imagenet = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
    return {"maskclip": imagenet + SCENE_TEMPLATES, "imagenet": imagenet, "single": ("a photo of a {}.",)}[name]


# ---------------------------------------------------------------- weights


def _candidates(model: str, pretrained: str) -> list[tuple[str, Path]]:
    """Local files that would hold open_clip's ``model`` / ``pretrained`` weights, in the order they are tried."""
    import open_clip

    out = []
    local = os.environ.get("SSL_BENCH_WEIGHTS")
    if local:
        out += [("$SSL_BENCH_WEIGHTS", Path(local) / f"{model}-{pretrained}{ext}")
                for ext in (".safetensors", ".bin", ".pt")]
    cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    if cfg.get("hf_hub"):
        repo, name = _hub_parts(cfg["hf_hub"])
        hub = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
        snapshots = hub / f"models--{repo.replace('/', '--')}" / "snapshots"
        for file in ([name] if name else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
            out += [("Hugging Face cache", p) for p in sorted(snapshots.glob(f"*/{file}"))]
    if cfg.get("url"):
        out.append(("open_clip cache", Path.home() / ".cache" / "clip" / cfg["url"].rsplit("/", 1)[-1]))
    return out


def _hub_parts(hf_hub: str) -> tuple[str, str]:
    """open_clip's ``org/repo/`` or ``org/repo/file`` -> (repo id, file name or '')."""
    org, repo, *rest = hf_hub.split("/")
    return f"{org}/{repo}", "/".join(rest)


def clip_weights(model: str, pretrained: str, random: bool, seed: int = 0) -> WeightsSource:
    """Where the weights of open_clip ``model`` / ``pretrained`` come from: random (a random run), or the first
    local file found; none found is one line saying where to put it."""
    if random:
        return WeightsSource(None, f"random:{seed}", RANDOM)
    for origin, path in _candidates(model, pretrained):
        if path.is_file():
            return WeightsSource(path, file_identity(path), origin)
    local = os.environ.get("SSL_BENCH_WEIGHTS")
    where = f"$SSL_BENCH_WEIGHTS ({local})" if local else "a folder named by $SSL_BENCH_WEIGHTS"
    raise UserError(f"no weights for CLIP {model} ({pretrained}): put {model}-{pretrained}.safetensors (or .bin, "
                    f"open_clip's release file) in {where}, or run with --weights random for a smoke run")


def build_clip(model: str, pretrained: str, source: WeightsSource, seed: int = 0, device="cpu"):
    """The open_clip model with ``source``'s weights (random ones drawn from ``seed``), frozen, on ``device``."""
    import open_clip

    from ..models.hub import quiet_open_clip  # open_clip's "random weights" warning: we load them after

    cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    with torch.random.fork_rng(devices=[]), quiet_open_clip():
        torch.manual_seed(seed)
        clip = open_clip.create_model(model, force_quick_gelu=bool(cfg.get("quick_gelu", False)))
    if source.path is not None:
        try:
            open_clip.load_checkpoint(clip, str(source.path))
        except Exception as err:  # noqa: BLE001 -- any unreadable or mismatched file gets the same advice
            reason = (str(err).strip().splitlines() or [""])[0][:120]
            raise UserError(f"cannot load CLIP weights {source.path} into {model} ({type(err).__name__}: {reason}) "
                            f"-- is it open_clip's file for {model} ({pretrained})?") from None
    return clip.eval().requires_grad_(False).to(device)


# ---------------------------------------------------------------- MaskCLIP


def _check_vit(clip) -> None:
    from open_clip.transformer import VisionTransformer

    visual = getattr(clip, "visual", None)
    block = visual.transformer.resblocks[-1] if isinstance(visual, VisionTransformer) else None
    if block is None or not isinstance(getattr(block, "attn", None), torch.nn.MultiheadAttention) \
            or getattr(visual, "attn_pool", None) is not None:
        raise UserError(f"MaskCLIP's value embedding needs a plain CLIP ViT image tower, got "
                        f"{type(visual).__name__} -- use a ViT model, e.g. -p embed.model=ViT-B-16")


def dense_embeddings(clip, images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's per-patch embeddings (B, g_h, g_w, D), L2-normalised, of normalised images (B, 3, H, W)."""
    _check_vit(clip)
    visual = clip.visual
    x = visual.conv1(images)
    b, width, gh, gw = x.shape
    x = x.reshape(b, width, gh * gw).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(b, 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", False)
    x = x if batch_first else x.transpose(0, 1)
    for block in blocks[:-1]:
        x = block(x)
    x = x if batch_first else x.transpose(0, 1)
    last = blocks[-1]
    width = x.shape[-1]
    value = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * width:], None if last.attn.in_proj_bias is None
                     else last.attn.in_proj_bias[2 * width:])
    x = x + last.ls_1(last.attn.out_proj(value))  # attention replaced by each token's own value
    x = x + last.ls_2(last.mlp(last.ln_2(x)))
    tokens = visual.ln_post(x[:, 1:])
    if visual.proj is not None:
        tokens = tokens @ visual.proj
    return F.normalize(tokens, dim=-1).reshape(b, gh, gw, -1)


def text_embeddings(clip, tokenizer, names: list[str], templates: Iterable[str], batch_size: int = 256) -> torch.Tensor:
    """(C, D): per class name, the normalised mean of its normalised prompt embeddings."""
    templates = list(templates)
    device = next(clip.parameters()).device
    out = []
    with torch.inference_mode():
        for name in names:
            prompts = [t.format(name) for t in templates]
            parts = [clip.encode_text(tokenizer(prompts[i:i + batch_size]).to(device))
                     for i in range(0, len(prompts), batch_size)]
            out.append(F.normalize(F.normalize(torch.cat(parts), dim=-1).mean(0), dim=0))
    return torch.stack(out)


class MaskClip:
    """An open_clip ViT with the class names' text embeddings: ``classes(image)`` gives each pixel's class."""

    def __init__(self, clip, text: torch.Tensor, mean, std):
        self.clip, self.text = clip, text
        self.device = text.device
        self.size = tuple(clip.visual.image_size) if isinstance(clip.visual.image_size, (tuple, list)) \
            else (clip.visual.image_size,) * 2
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def scores(self, images: list[np.ndarray]) -> np.ndarray:
        """Cosine scores (B, C, g, g) of each patch with each class, for uint8 images (H, W, 3) of any size."""
        with torch.inference_mode():  # each image stretched to the model's input (MaskCLIP: mmseg's bilinear)
            x = torch.cat([F.interpolate(torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float()
                                         .to(self.device), size=self.size, mode="bilinear", align_corners=False,
                                         antialias=True) for im in images]) / 255.0
            dense = dense_embeddings(self.clip, (x - self.mean) / self.std)
            return (dense @ self.text.T).permute(0, 3, 1, 2).float().cpu().numpy()

    def classes(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Per image, the class index (into the text classes) of each pixel: scores upsampled, then argmax."""
        return [upsample_argmax(s, im.shape[:2]) for s, im in zip(self.scores(images), images)]


class MaskClipVotes:
    """The region embedding ``maskclip``: per valid region, the pixel count of each dataset class in MaskCLIP's
    dense classification (classes that are not prompts, e.g. background, get no votes)."""

    uses_image = True
    reads: tuple[str, ...] = ()

    def __init__(self, maskclip: MaskClip, class_ids: list[int], num_classes: int, batch_size: int = 16):
        self.maskclip, self.class_ids, self.num_classes = maskclip, np.asarray(class_ids), num_classes
        self.batch_size = batch_size

    @staticmethod
    def prompt_classes(dataset, background_text: bool) -> tuple[list[int], list[str]]:
        """Dataset class ids that are prompts, and their names (the reader's ``prompt_names`` where it has them)."""
        names = list(getattr(dataset, "prompt_names", None) or dataset.class_names)
        background = getattr(dataset, "background_class", None)
        ids = [c for c in range(len(names)) if background_text or c != background]
        return ids, [names[c] for c in ids]

    @classmethod
    def from_context(cls, ctx, model: str, pretrained: str, templates: str, background_text: bool,
                     batch_size: int) -> "MaskClipVotes":
        import open_clip

        source = clip_weights(model, pretrained, ctx.random_weights, ctx.weights_seed)
        clip = build_clip(model, pretrained, source, ctx.weights_seed, ctx.device)
        _check_vit(clip)
        ids, names = cls.prompt_classes(ctx.dataset, background_text)
        text = text_embeddings(clip, open_clip.get_tokenizer(model), names, prompt_templates(templates))
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        preprocess = open_clip.get_model_preprocess_cfg(clip)  # the tag's normalisation (CLIP's by default)
        maskclip = MaskClip(clip, text, preprocess.get("mean", OPENAI_DATASET_MEAN),
                            preprocess.get("std", OPENAI_DATASET_STD))
        return cls(maskclip, ids, ctx.dataset.num_classes, batch_size)

    @staticmethod
    def identity(ctx, model: str, pretrained: str, **_) -> dict:
        """The CLIP weights the votes depend on (the class names come with the dataset, which the cache keys)."""
        return {"clip": {"model": model, "pretrained": pretrained,
                         "weights": clip_weights(model, pretrained, ctx.random_weights, ctx.weights_seed).identity}}

    def embed(self, regions: Iterable[RegionImage]) -> np.ndarray:
        out, pending = [], []

        def flush():
            for region, classes in zip(pending, self.maskclip.classes([r.image for r in pending])):
                out.append(class_counts(region.segments, self.class_ids[classes], self.num_classes).astype(np.float32))
            pending.clear()

        for region in regions:
            pending.append(region)
            if len(pending) >= self.batch_size:
                flush()
        if pending:
            flush()
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)


def check_params(p: dict) -> None:
    import open_clip

    if p["model"] not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower().startswith(str(p["model"]).lower()[:5])][:5]
        raise UserError(f"model={p['model']!r} is not an open_clip model -- e.g. -p embed.model=ViT-B-16"
                        f"{' (close: ' + ', '.join(close) + ')' if close else ''}")
    tags = open_clip.list_pretrained_tags_by_model(p["model"])
    if p["pretrained"] not in tags:
        raise UserError(f"pretrained={p['pretrained']!r} is not an open_clip tag of {p['model']} -- known: "
                        f"{', '.join(tags) or 'none'} (-p embed.pretrained=openai)")
    if p["templates"] not in TEMPLATE_SETS:
        raise UserError(f"templates={p['templates']!r} -- use one of {', '.join(TEMPLATE_SETS)} "
                        f"(-p embed.templates=maskclip)")
    if p["batch_size"] < 1:
        raise UserError(f"batch_size={p['batch_size']} -- use 1 or more (-p embed.batch_size=16)")
