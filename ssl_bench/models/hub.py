"""Backbones named without a registry entry: ``timm:NAME``, ``hf:REPO`` and ``open_clip:ARCH/TAG``.

Each function here turns the part after the prefix into a ``BackboneSpec`` read from the model itself (patch
size, embedding size, heads, parameter count, normalisation, pre-training resolution), built on the meta
device so that describing a model costs no memory and no weights. The weights are then found like a registry
entry's (``models/weights.py``): in the local timm / Hugging Face / open_clip caches, never downloaded, and the
same one line names the file and where to put it when they are absent.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import UserError
from ..registry import BackboneSpec

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _file_stem(text: str) -> str:
    """A file name stem for a hub name (the file a user may put in $SSL_BENCH_WEIGHTS)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "--", text).strip("-")


def _params_m(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)


def _unknown(what: str, name: str, known: list[str], example: str) -> UserError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {example}"
    return UserError(f"{what} '{name}' is not known -- {hint}")


# ---- timm ---------------------------------------------------------------------------------------------

def is_vit_like(model: torch.nn.Module) -> bool:
    """A transformer ``ViTBackbone`` can read: patch embedding, a list of blocks whose last attention projects q, k, v
    (fused or apart), and timm's ``forward_features`` / prefix-token bookkeeping."""
    blocks = getattr(model, "blocks", None)
    attention = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    projects = attention is not None and (getattr(attention, "qkv", None) is not None
                                          or getattr(attention, "q_proj", None) is not None)
    return projects and hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def timm_spec(name: str) -> BackboneSpec:
    """``timm:vit_small_patch16_224.augreg_in21k``: any timm model with a pretrained tag (the default tag when none
    is given). ViTs give every feature kind; models whose features are a map (ConvNeXt, ResNet, ...) give
    ``patch``, ``cls`` and ``layerN``."""
    import timm
    from timm.models import get_pretrained_cfg

    arch, _, tag = name.partition(".")
    if not arch:
        raise UserError("timm: needs a model name -- e.g. --backbone timm:vit_small_patch14_dinov2.lvd142m")
    if arch not in timm.list_models():
        raise _unknown(f"timm (version {timm.__version__}) model", arch, timm.list_models(),
                       "timm:vit_small_patch16_224.augreg_in21k")
    tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
    if tag and tag not in tags:
        raise UserError(f"timm model {arch} has no pretrained tag '{tag}' -- its tags: {', '.join(tags) or 'none'}")
    tag = tag or (tags[0] if tags else "")
    full = f"{arch}.{tag}" if tag else arch
    cfg = get_pretrained_cfg(full)
    cfg = cfg.to_dict() if cfg is not None else {}
    with torch.device("meta"):
        model = timm.create_model(full, pretrained=False, num_classes=0)
    common = dict(name=f"timm:{full}", family="timm", arch=arch, params_m=_params_m(model),
                  pretraining_data=f"timm tag {tag}" if tag else "none (no pretrained tag)",
                  licence=cfg.get("license") or "see the timm model card",
                  input_size=int((cfg.get("input_size") or (3, 224, 224))[-1]),
                  mean=tuple(cfg.get("mean") or (0.485, 0.456, 0.406)), std=tuple(cfg.get("std") or (0.229, 0.224, 0.225)),
                  timm=full, file=f"{_file_stem(full)}.safetensors", paper=f"timm model card {full}", **_timm_sources(full, cfg))
    if is_vit_like(model):
        try:
            with torch.device("meta"):
                timm.create_model(full, pretrained=False, num_classes=0, dynamic_img_size=True)
        except TypeError:
            raise UserError(f"timm model {arch} only takes its training size (it has no dynamic_img_size), and the "
                            f"protocol's images are not that size -- choose another ViT") from None
        patch = model.patch_embed.patch_size
        return BackboneSpec(builder="ssl_bench.models.vit:build", patch_size=int(patch[0] if isinstance(patch, tuple) else patch),
                            embed_dim=int(model.embed_dim), heads=int(model.blocks[-1].attn.num_heads), **common)
    info = getattr(model, "feature_info", None)
    stride = info[-1]["reduction"] if isinstance(info, list) and info else getattr(info, "reduction", lambda: [0])()[-1]
    if not stride:
        raise UserError(f"timm model {arch} is neither a ViT nor a network with a feature map (no feature_info) -- "
                        f"ssl-bench cannot take dense features from it")
    return BackboneSpec(builder="ssl_bench.models.cnn:build_timm", patch_size=int(stride),
                        embed_dim=int(model.num_features), **common)


def _timm_sources(full: str, cfg: dict) -> dict:
    """Where timm would download the weights from, so the search can look where that download would have put them."""
    hub = (cfg.get("hf_hub_id") or "").rstrip("/")
    url = cfg.get("url") or None
    files = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else ()
    return {"hf": hub if hub and hub != f"timm/{full}" else None,
            "url": url if url and not url.endswith(".npz") else None,  # JAX .npz archives are not read
            "files": files}


# ---- Hugging Face transformers -------------------------------------------------------------------------

def hf_home() -> Path:
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))


def hf_snapshot_dirs(repo: str) -> list[Path]:
    """The local folders of ``repo``: the folder itself when ``repo`` is one (a ``save_pretrained`` output),
    else its snapshots in the Hugging Face cache (newest first)."""
    if Path(repo).expanduser().is_dir():
        return [Path(repo).expanduser().resolve()]
    snapshots = hf_home() / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots"
    return sorted(snapshots.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True) if snapshots.is_dir() else []


@contextmanager
def quiet_transformers():
    """transformers without its progress bars and 'weights not used' chatter (ssl-bench reports what matters)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def hf_config(repo: str):
    """The model's config from a local folder or the Hugging Face cache (the architecture: needed even for
    random weights); a vision-language config gives its vision tower's."""
    with quiet_transformers():
        from transformers import AutoConfig

        config = None
        for folder in hf_snapshot_dirs(repo):
            if (folder / "config.json").is_file():
                try:
                    config = AutoConfig.from_pretrained(folder, local_files_only=True)
                except (OSError, ValueError, KeyError) as err:
                    raise UserError(f"hf:{repo}: cannot read {folder / 'config.json'} ({err}) -- is it a "
                                    f"transformers model folder?") from None
                break
    if config is None:
        where = repo if Path(repo).expanduser().is_dir() else f"{hf_home() / 'hub'}/models--{repo.replace('/', '--')}"
        raise UserError(f"hf:{repo}: no config.json in {where} (nothing is downloaded; the architecture comes from "
                        f"it, even for --weights random) -- copy the model's folder into the Hugging Face cache, or "
                        f"give hf:/path/to/a/saved/model")
    return getattr(config, "vision_config", None) or config


def hf_model_class(config):
    from transformers import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        raise UserError(f"transformers has no vision model for config {type(config).__name__} -- hf: takes ViT-like "
                        f"image models (ViT, DINOv2, ViT-MAE, CLIP, SigLIP, ...)") from None


def _hf_normalisation(repo: str, config) -> tuple[tuple, tuple]:
    import json

    for folder in hf_snapshot_dirs(repo):
        path = folder / "preprocessor_config.json"
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("image_mean") and data.get("image_std"):
                return tuple(data["image_mean"]), tuple(data["image_std"])
    if config.model_type.startswith("clip"):
        return CLIP_MEAN, CLIP_STD
    if config.model_type.startswith("siglip"):
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def hf_spec(repo: str) -> BackboneSpec:
    """``hf:facebook/dinov2-small`` (or ``hf:/path/to/folder``): a transformers ViT-like image model (DINOv2, ViT,
    ViT-MAE, I-JEPA, CLIP's or SigLIP's vision tower, ...), run by transformers itself."""
    if not repo:
        raise UserError("hf: needs a model id -- e.g. --backbone hf:facebook/dinov2-small")
    config = hf_config(repo)
    for key in ("patch_size", "hidden_size", "num_attention_heads"):
        if not isinstance(getattr(config, key, None), int):
            raise UserError(f"hf:{repo} ({config.model_type}) has no {key} in its config -- hf: takes ViT-like image "
                            f"models with one patch size")
    cls = hf_model_class(config)
    with torch.device("meta"), quiet_transformers():
        params = _params_m(cls(config))
    mean, std = _hf_normalisation(repo, config)
    local = Path(repo).expanduser().is_dir()
    size = getattr(config, "image_size", 224)
    return BackboneSpec(name=f"hf:{repo}", family="hf", builder="ssl_bench.models.hf_auto:build", arch=config.model_type,
                        patch_size=config.patch_size, embed_dim=config.hidden_size, heads=config.num_attention_heads,
                        params_m=params, pretraining_data=f"see the model card of {repo}", licence="see the model card",
                        input_size=int(size[0] if isinstance(size, (list, tuple)) else size), mean=mean, std=std,
                        hf=str(Path(repo).expanduser().resolve()) if local else repo,
                        file=f"{_file_stem(repo)}.safetensors", paper=f"Hugging Face {repo}")


# ---- open_clip ----------------------------------------------------------------------------------------

@contextmanager
def quiet_open_clip():
    """open_clip warns through the root logger that a model built without weights has random weights: ssl-bench
    loads them itself (or says 'random weights' in every output)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def open_clip_spec(name: str) -> BackboneSpec:
    """``open_clip:ViT-B-16/openai``, ``open_clip:ViT-B-16/laion2b_s34b_b88k``: the image tower of an open_clip
    model (its own ViT). Without ``/TAG`` only ``--weights PATH`` or ``--weights random`` apply."""
    import open_clip

    arch, _, tag = name.partition("/")
    if not arch:
        raise UserError("open_clip: needs ARCH/TAG -- e.g. --backbone open_clip:ViT-B-16/laion2b_s34b_b88k")
    models = open_clip.list_models()
    if arch not in models:
        raise _unknown(f"open_clip (version {open_clip.__version__}) model", arch, models, "open_clip:ViT-B-16/openai")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag and tag not in tags:
        raise UserError(f"open_clip model {arch} has no pretrained tag '{tag}' -- its tags: {', '.join(tags) or 'none'}")
    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    vision_cfg = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
    if vision_cfg.get("timm_model_name"):
        raise UserError(f"open_clip model {arch} is timm's {vision_cfg['timm_model_name']} inside open_clip -- use "
                        f"--backbone timm:{vision_cfg['timm_model_name']} (timm's tags hold the same weights)")
    with torch.device("meta"):
        visual = open_clip_visual(arch, bool(cfg.get("quick_gelu")), "meta")
    from .openclip import refusal

    why = refusal(visual)
    if why:
        raise UserError(f"open_clip model {arch}: {why} -- ssl-bench reads open_clip's ViT towers")
    hub = (cfg.get("hf_hub") or "").rstrip("/")
    url = cfg.get("url") or None
    full = f"{arch}/{tag}" if tag else arch
    return BackboneSpec(name=f"open_clip:{full}", family="open_clip", builder="ssl_bench.models.openclip:build",
                        arch=arch, patch_size=int(visual.patch_size[0]), embed_dim=int(visual.class_embedding.shape[-1]),
                        heads=int(visual.transformer.resblocks[-1].attn.num_heads), params_m=_params_m(visual),
                        pretraining_data=f"open_clip tag {tag}" if tag else "none (no pretrained tag)",
                        licence="see the open_clip model card", input_size=int(visual.image_size[0]),
                        mean=tuple(cfg.get("mean") or CLIP_MEAN), std=tuple(cfg.get("std") or CLIP_STD),
                        hf=hub or None, url=url if url and "openaipublic" not in url else None,  # OpenAI's are TorchScript
                        files=("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
                        file=f"{_file_stem(full)}.safetensors", paper=f"open_clip {full}",
                        options={"quick_gelu": True} if cfg.get("quick_gelu") else {})


def open_clip_visual(arch: str, quick_gelu: bool, device: str = "cpu") -> torch.nn.Module:
    """The image tower of open_clip model ``arch`` with random weights (the text tower is not built)."""
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    config = open_clip.get_model_config(arch)
    with quiet_open_clip():
        visual = _build_vision_tower(config["embed_dim"], CLIPVisionCfg(**config["vision_cfg"]), quick_gelu=quick_gelu)
    return visual if device == "meta" else visual.to(device)
