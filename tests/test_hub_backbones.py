"""Backbones named without a registry entry (issue 19): ``timm:NAME``, ``hf:REPO``, ``open_clip:ARCH/TAG``.

Specs are read from the model itself; weights only come from the local caches (tests build those caches in
the layout timm / transformers / open_clip write them); features are compared with each library's own forward.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_bench import registry
from ssl_bench.errors import UserError
from ssl_bench.models import build_backbone, resolve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test's own (timm and transformers both read it)."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("SSL_BENCH_WEIGHTS", str(tmp_path / "weights"))
    registry._hub_spec.cache_clear()
    yield home
    registry._hub_spec.cache_clear()


def snapshot(home: Path, repo: str) -> Path:
    folder = home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abcd"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --- timm ------------------------------------------------------------------------------------------------

def test_timm_name_is_read_from_the_model():
    spec = registry.backbone("timm:vit_small_patch16_224.augreg_in21k")
    assert (spec.patch_size, spec.embed_dim, spec.heads, spec.input_size) == (16, 384, 6, 224)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.family == "timm" and spec.params_m == pytest.approx(21.67, abs=0.01)
    default = registry.backbone("timm:vit_small_patch14_dinov2")  # no tag: timm's default one, named in full
    assert default.name == "timm:vit_small_patch14_dinov2.lvd142m" and default.patch_size == 14
    model = build_backbone(spec, resolve(spec, "random"))
    out = model.extract(torch.randn(1, 3, 32, 48), {"patch", "cls", "key", "attn", "layer3"})
    assert out["patch"].shape == (1, 2, 3, 384) and out["attn"].shape == (1, 6, 2, 3) and out["key"].shape[-1] == 384


def test_timm_network_with_a_feature_map():
    spec = registry.backbone("timm:resnet18.a1_in1k")
    assert (spec.patch_size, spec.embed_dim, spec.heads) == (32, 512, 0)
    model = build_backbone(spec, resolve(spec, "random"))
    out = model.extract(torch.randn(1, 3, 64, 96), {"patch", "cls", "layer1"})
    assert out["patch"].shape == (1, 2, 3, 512) and out["cls"].shape == (1, 512) and out["layer1"].shape == (1, 2, 3, 64)  # timm levels: stem first
    with pytest.raises(UserError, match="cannot give 'key'"):
        model.check_kinds({"key"})


@pytest.mark.parametrize("name, message", [("timm:vit_smal_patch16_224", "did you mean vit_small_patch16_224"),
                                           ("timm:vit_small_patch16_224.nope", "its tags: augreg_in1k"),
                                           ("timm:", "needs a model name")])
def test_timm_bad_names_are_one_line(name, message):
    with pytest.raises(UserError, match=message):
        registry.backbone(name)


def test_timm_weights_come_from_the_timm_cache_only(hf_home):
    import timm
    from safetensors.torch import save_file

    name = "vit_tiny_patch16_224.augreg_in21k"
    spec = registry.backbone(f"timm:{name}")
    with pytest.raises(UserError, match=rf"no weights for timm:{name}: put .*timm/{name}.*--weights random"):
        resolve(spec, None)  # nothing cached: one line, nothing downloaded
    reference = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    save_file(reference.state_dict(), str(snapshot(hf_home, f"timm/{name}") / "model.safetensors"))
    source = resolve(spec, None)
    assert source.origin == "timm cache" and not source.is_random
    loaded = build_backbone(spec, source)
    x = torch.randn(1, 3, 32, 48)
    expected = reference.forward_features(x)[:, 1:].reshape(1, 2, 3, -1)
    torch.testing.assert_close(loaded.extract(x, {"patch"})["patch"], expected)


# --- Hugging Face ----------------------------------------------------------------------------------------

def _tiny(cls_config, **extra):
    return cls_config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **extra)


def test_hf_dinov2_from_the_cache_matches_transformers(hf_home):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(_tiny(Dinov2Config, patch_size=14, image_size=28)).eval()
    model.save_pretrained(snapshot(hf_home, "facebook/dinov2-tiny"))
    spec = registry.backbone("hf:facebook/dinov2-tiny")
    assert (spec.patch_size, spec.embed_dim, spec.heads, spec.family) == (14, 32, 2, "hf")
    source = resolve(spec, None)
    assert source.origin == "Hugging Face cache" and source.path.name == "model.safetensors"
    loaded = build_backbone(spec, source)
    x = torch.randn(2, 3, 42, 28)
    got = loaded.extract(x, {"patch", "cls", "key", "attn", "layer0"})
    ref = model(pixel_values=x, output_hidden_states=True, output_attentions=True)
    tokens = ref.last_hidden_state
    torch.testing.assert_close(got["patch"], tokens[:, 1:].reshape(2, 3, 2, 32))
    torch.testing.assert_close(got["cls"], tokens[:, 0])
    torch.testing.assert_close(got["layer0"], ref.hidden_states[1][:, 1:].reshape(2, 3, 2, 32))
    last = model.encoder.layer[-1]  # keys: the last layer's key projection of its normalised input
    keys = last.attention.k_proj(last.norm1(ref.hidden_states[-2]))
    torch.testing.assert_close(got["key"], keys[:, 1:].reshape(2, 3, 2, 32))
    assert got["attn"].shape == (2, 2, 3, 2) and torch.all(got["attn"].sum((2, 3)) < 1)


def test_hf_clip_siglip_and_mae_towers(hf_home):
    from transformers import (CLIPConfig, CLIPModel, SiglipConfig, SiglipModel, ViTMAEConfig,
                              ViTMAEForPreTraining)

    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=16,
                  image_size=32)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text)).eval()
    clip.save_pretrained(snapshot(hf_home, "openai/clip-tiny"))
    siglip = SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).eval()
    siglip.save_pretrained(snapshot(hf_home, "google/siglip-tiny"))
    mae = ViTMAEForPreTraining(ViTMAEConfig(**vision, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                            decoder_num_attention_heads=2, decoder_intermediate_size=32)).eval()
    mae.save_pretrained(snapshot(hf_home, "facebook/vit-mae-tiny"))
    x = torch.randn(1, 3, 48, 32)
    clip_bb = build_backbone(spec := registry.backbone("hf:openai/clip-tiny"), resolve(spec, None))
    assert spec.mean[0] == pytest.approx(0.4815, abs=1e-4)  # CLIP's normalisation
    ref = clip.vision_model(pixel_values=x, interpolate_pos_encoding=True)
    got = clip_bb.extract(x, {"patch", "cls"})  # CLIP: post_layernorm on every token
    torch.testing.assert_close(got["patch"], clip.vision_model.post_layernorm(ref.last_hidden_state)[:, 1:].reshape(1, 3, 2, 32))
    torch.testing.assert_close(got["cls"], ref.pooler_output)
    siglip_bb = build_backbone(spec := registry.backbone("hf:google/siglip-tiny"), resolve(spec, None))
    assert "attn" not in siglip_bb.supported_kinds()  # no CLS token
    ref = siglip.vision_model(pixel_values=x, interpolate_pos_encoding=True)
    got = siglip_bb.extract(x, {"patch", "cls"})
    torch.testing.assert_close(got["patch"], ref.last_hidden_state.reshape(1, 3, 2, 32))
    torch.testing.assert_close(got["cls"], ref.pooler_output)
    mae_bb = build_backbone(spec := registry.backbone("hf:facebook/vit-mae-tiny"), resolve(spec, None))
    first, again = (mae_bb.extract(x, {"patch"})["patch"] for _ in range(2))
    torch.testing.assert_close(first, again)  # no random masking: every patch, in order, every time
    encoder = mae.vit
    encoder.config.mask_ratio = 0.0
    ref = encoder(pixel_values=x, noise=torch.arange(6.0)[None], interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(first, ref[:, 1:].reshape(1, 3, 2, 32))


def test_hf_without_a_cached_config_is_one_line(hf_home):
    with pytest.raises(UserError, match=r"hf:facebook/dinov2-small: no config.json in .*even for --weights random"):
        registry.backbone("hf:facebook/dinov2-small")


# --- open_clip -------------------------------------------------------------------------------------------

def test_open_clip_tower_matches_open_clip_and_names_its_files(hf_home, tmp_path, tiny_open_clip_arch):
    spec = registry.backbone("open_clip:ViT-B-16/openai")
    assert (spec.patch_size, spec.embed_dim, spec.heads, spec.input_size) == (16, 768, 12, 224)
    assert spec.hf == "timm/vit_base_patch16_clip_224.openai" and "open_clip_pytorch_model.bin" in spec.files
    assert spec.options == {"quick_gelu": True} and spec.url is None  # OpenAI's own .pt is TorchScript: not read
    with pytest.raises(UserError, match="no weights for open_clip:ViT-B-16/openai"):
        resolve(spec, None)
    with pytest.raises(UserError, match="its tags: "):
        registry.backbone("open_clip:ViT-B-16/nope")
    with pytest.raises(UserError, match="timm:vit_base_patch16_siglip_224"):
        registry.backbone("open_clip:ViT-B-16-SigLIP/webli")
    tiny = registry.backbone(f"open_clip:{tiny_open_clip_arch}")  # no tag: --weights PATH or random only
    model = build_backbone(tiny, resolve(tiny, "random"))
    visual = model.visual
    visual.output_tokens = True
    x = torch.randn(1, 3, 64, 64)
    pooled, tokens = visual(x)
    got = model.extract(x, {"patch", "cls", "key", "attn"})
    torch.testing.assert_close(got["patch"].reshape(1, 16, -1), tokens)
    torch.testing.assert_close(got["cls"] @ visual.proj, pooled)
    # an open_clip file (the whole model: visual.* beside the text tower) loads its image tower
    state = {f"visual.{k}": v.clone() + 0.01 for k, v in visual.state_dict().items()}
    torch.save({**state, "text_projection": torch.zeros(4, 4), "logit_scale": torch.ones(())}, tmp_path / "clip.pt")
    loaded = build_backbone(tiny, resolve(tiny, str(tmp_path / "clip.pt")))
    assert not torch.allclose(loaded.extract(x, {"patch"})["patch"], got["patch"])
    torch.testing.assert_close(loaded.visual.conv1.weight, visual.conv1.weight + 0.01)
    bigger = model.extract(torch.randn(1, 3, 96, 128), {"patch", "attn"})  # any patch grid: resampled positions
    assert bigger["patch"].shape[1:3] == (6, 8) and bigger["attn"].shape == (1, 2, 6, 8)


@pytest.fixture
def tiny_open_clip_arch(tmp_path):
    """A small ViT added to open_clip's model configs (as a user's own config file would be)."""
    import open_clip

    config = {"embed_dim": 16, "quick_gelu": True,
              "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    path = tmp_path / "ssl-bench-tiny-vit.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return "ssl-bench-tiny-vit"


# --- the runs the issue names: random weights on CamVid, marked ----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["timm:vit_small_patch16_224.augreg_in21k", "hf:facebook/dinov2-small",
                                      "open_clip:ViT-B-16/laion2b_s34b_b88k"])
def test_hub_names_run_on_camvid_with_random_weights(backbone, shared_dataset, tmp_path):
    from transformers import Dinov2Config

    camvid = shared_dataset("camvid")
    env = {"HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    # DINOv2-S's architecture as its config.json says (a cached config: nothing is downloaded, even for random)
    Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                 image_size=518).save_pretrained(snapshot(tmp_path / "hf", "facebook/dinov2-small"))
    store = tmp_path / "results.sqlite"
    done = subprocess.run([sys.executable, "-m", "ssl_bench", "run", "--backbone", backbone, "--weights", "random",
                           "--task", "kmeans", "--dataset", "camvid", "--data-root", str(camvid), "-o", "limit=3",
                           "--store", str(store), "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, env={**__import__("os").environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{backbone} / kmeans / camvid:val [limit=3] K=11" in done.stdout and "RANDOM WEIGHTS" in done.stdout
    from ssl_bench.store import ResultStore

    (row,) = ResultStore(store).query()
    assert row["backbone"] == backbone and row["random_weights"] and row["miou"] > 0
    assert json.loads(json.dumps(row["config"]))["protocol"]["resize"] in (320, 322)
