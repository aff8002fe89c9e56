"""Feature extraction and the official checkpoint layouts of DINO / DINOv2 (issue 2)."""

import dataclasses

import pytest
import torch

from ssl_bench import registry
from ssl_bench.errors import UserError
from ssl_bench.models import build_backbone, resolve
from ssl_bench.models.weights import unwrap_state_dict


def random_backbone(name):
    spec = registry.backbone(name)
    return build_backbone(spec, resolve(spec, "random", 0), 0)


def test_keys_match_manual_qkv_computation():
    bb = random_backbone("dino-vits16")
    x = torch.randn(2, 3, 64, 48)
    out = bb.extract(x, {"patch", "key", "query", "value", "cls", "attn", "layer5"})
    vit = bb.model
    tokens = vit.patch_embed(x)
    tokens = vit._pos_embed(tokens)
    for blk in vit.blocks[:-1]:
        tokens = blk(tokens)
    last = vit.blocks[-1]
    qkv = last.norm1(tokens) @ last.attn.qkv.weight.T + last.attn.qkv.bias  # (B, N, 3*D)
    dim = vit.embed_dim
    keys = qkv[:, 1:, dim:2 * dim].reshape(2, 4, 3, dim)
    torch.testing.assert_close(out["key"], keys, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["query"], qkv[:, 1:, :dim].reshape(2, 4, 3, dim), rtol=1e-4, atol=1e-4)
    assert out["patch"].shape == (2, 4, 3, 384) and out["cls"].shape == (2, 384)
    assert out["attn"].shape == (2, 6, 4, 3)
    # CLS attention over patches + CLS sums to one; patches alone a bit less
    assert (out["attn"].sum((2, 3)) <= 1 + 1e-5).all()
    assert out["layer5"].shape == (2, 4, 3, 384)


def test_random_weights_are_seeded_and_leave_global_rng_alone():
    spec = registry.backbone("dino-vits16")
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_backbone(spec, resolve(spec, "random", 7), 7)
    assert torch.rand(1) == expected_next
    b = build_backbone(spec, resolve(spec, "random", 7), 7)
    c = build_backbone(spec, resolve(spec, "random", 8), 8)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a.embed(x), b.embed(x)) and not torch.equal(a.embed(x), c.embed(x))


@pytest.mark.parametrize("name", ["dino-vits16", "dino-vitb8", "dinov2-vits14", "dinov2-vits14-reg", "reference"])
def test_parameter_count_matches_registry(name):
    spec = registry.backbone(name)
    bb = random_backbone(name)
    params = sum(p.numel() for p in bb.parameters()) / 1e6
    assert params == pytest.approx(spec.params_m, abs=0.01)


def _official_dino_layout(state, wrap):
    if wrap == "plain":
        return state
    if wrap == "teacher":  # *_full_checkpoint.pth of DINO: teacher/student with DDP + MultiCropWrapper prefixes
        return {"teacher": {f"backbone.{k}": v for k, v in state.items()} | {"head.mlp.0.weight": torch.zeros(2, 2)},
                "student": {f"module.backbone.{k}": torch.zeros_like(v) for k, v in state.items()}, "epoch": 100}
    if wrap == "state_dict-module":
        return {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    raise ValueError(wrap)


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["plain", "teacher", "state_dict-module"])
def test_dino_checkpoint_layouts_load_like_timm(tmp_path, wrap):
    spec = registry.backbone("dino-vits16")
    reference = random_backbone("dino-vits16")
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(_official_dino_layout(reference.model.state_dict(), wrap), path)
    loaded = build_backbone(spec, resolve(spec, str(path)))
    x = torch.randn(1, 3, 48, 48)
    for kind, tensor in reference.extract(x, {"patch", "key", "cls"}).items():
        torch.testing.assert_close(loaded.extract(x, {kind})[kind], tensor)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dinov2-vits14", "dinov2-vits14-reg"])
def test_dinov2_official_hub_layout(tmp_path, name):
    spec = registry.backbone(name)
    reference = random_backbone(name)
    state = dict(reference.model.state_dict())
    if "reg_token" in state:  # official torch.hub layout: the CLS position is part of pos_embed
        state["register_tokens"] = state.pop("reg_token")
        cls_pos = torch.randn(1, 1, spec.embed_dim)
        state["cls_token"] = state["cls_token"] - cls_pos
        state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], 1)
    state["mask_token"] = torch.zeros(1, spec.embed_dim)
    path = tmp_path / "dinov2.pth"
    torch.save(state, path)
    loaded = build_backbone(spec, resolve(spec, str(path)))
    x = torch.randn(1, 3, 56, 42)
    torch.testing.assert_close(loaded.extract(x, {"patch"})["patch"], reference.extract(x, {"patch"})["patch"])


def test_wrong_checkpoint_is_one_clear_error(tmp_path):
    spec = registry.backbone("dino-vits16")
    path = tmp_path / "other.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(UserError, match="does not fit dino-vits16"):
        build_backbone(spec, resolve(spec, str(path)))
    torch.save([1, 2, 3], path)  # not a state dict: one line, not a recursion through the lazy backbone
    with pytest.raises(UserError, match="holds a list, not a state dict"):
        build_backbone(spec, resolve(spec, str(path)))
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(UserError, match="cannot read checkpoint .*text.safetensors.*safetensors file"):
        build_backbone(spec, resolve(spec, str(tmp_path / "text.safetensors")))


def test_missing_weights_offline_names_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_BENCH_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=r"dino_deitsmall8_pretrain\.pth.*SSL_BENCH_WEIGHTS.*--weights random"):
        resolve(registry.backbone("dino-vits8"), None)


def test_weights_found_in_local_folder_and_sha_checked(tmp_path, monkeypatch):
    spec = registry.backbone("dino-vits16")
    monkeypatch.setenv("SSL_BENCH_WEIGHTS", str(tmp_path))
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(random_backbone("dino-vits16").model.state_dict(), path)
    source = resolve(spec, None)
    assert source.origin == "$SSL_BENCH_WEIGHTS" and len(source.identity) == 64
    bad = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(UserError, match="sha256"):
        resolve(bad, None)


def test_resnet_like_backbone_refuses_attention_kinds():
    bb = random_backbone("reference")
    with pytest.raises(UserError, match="no attention"):
        bb.extract(torch.zeros(1, 3, 16, 16), {"key"})


def test_unwrap_strips_nested_prefixes():
    state = {"module.backbone.blocks.0.w": torch.zeros(1), "module.backbone.norm.w": torch.zeros(1)}
    assert set(unwrap_state_dict({"model": state})) == {"blocks.0.w", "norm.w"}


def _hf_model(name):
    """A transformers model of the same architecture with random weights, in eval mode."""
    import transformers as tf

    spec = registry.backbone(name)
    common = dict(hidden_size=spec.embed_dim, num_hidden_layers=12, num_attention_heads=spec.heads,
                  intermediate_size=4 * spec.embed_dim, patch_size=spec.patch_size, layer_norm_eps=1e-6)
    if name.startswith("dinov2") and name.endswith("-reg"):
        model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(image_size=518, num_register_tokens=4, **common))
    elif name.startswith("dinov2"):
        model = tf.Dinov2Model(tf.Dinov2Config(image_size=518, **common))
    else:
        model = tf.ViTModel(tf.ViTConfig(image_size=224, qkv_bias=True, **common), add_pooling_layer=False)
    return spec, model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("dino-vits16", 224), ("dinov2-vits14", 518), ("dinov2-vits14-reg", 518)])
def test_hugging_face_cache_layout_matches_transformers(tmp_path, monkeypatch, name, size):
    from safetensors.torch import save_file

    spec, hf = _hf_model(name)
    with torch.no_grad():
        for p in hf.parameters():  # layer scales and norms away from their trivial init
            p.add_(torch.randn_like(p) * 0.02)
    snapshot = tmp_path / "hub" / f"models--{spec.hf.replace('/', '--')}" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, snapshot / "model.safetensors")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("SSL_BENCH_WEIGHTS", raising=False)
    source = resolve(spec, None)
    assert source.origin == "Hugging Face cache"
    ours = build_backbone(spec, source)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        hidden = hf(pixel_values=x).last_hidden_state
    out = ours.extract(x, {"patch", "cls"})
    prefix = hidden.shape[1] - out["patch"].shape[1] * out["patch"].shape[2]
    torch.testing.assert_close(out["cls"], hidden[:, 0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out["patch"].flatten(1, 2), hidden[:, prefix:], rtol=1e-3, atol=1e-3)
