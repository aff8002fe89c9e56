"""Every registered backbone builds; every family's released checkpoint layout loads (issue 5).

Layout tests write a small random checkpoint in exactly the released layout (wrappers, prefixes,
extra heads, dtype), load it through the real resolver and builder, and compare the features with
the same weights held by the model directly. Tiny variants (depth 2, ResNet-18 instead of -50)
keep them fast where the key layout is the same.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ssl_bench import registry
from ssl_bench.errors import UserError
from ssl_bench.models import build_backbone, resolve

BIG = 60  # M parameters: entries above this are only checked in the slow run (the default run stays short)


def _entries() -> list:
    """A list, not a generator: pytest deprecates parametrizing with an iterator (a warning on every run)."""
    return [pytest.param(name, marks=[pytest.mark.slow] if spec.params_m > BIG else [], id=name)
            for name, spec in registry.backbones().items()]


@pytest.mark.parametrize("name", _entries())
def test_every_entry_builds_with_random_weights(name):
    """Built on the meta device (no memory, no init cost): the real builder, parameter count, and the
    shape of every feature kind the model says it gives, on a 2 x 1 patch-grid input."""
    spec = registry.backbone(name)
    with torch.device("meta"):
        bb = build_backbone(spec, resolve(spec, "random", 0), 0)
        params = sum(p.numel() for p in bb.parameters()) / 1e6
        p = spec.patch_size
        kinds = bb.supported_kinds() | ({"layer0"} if bb.num_layers else set())
        out = bb.extract(torch.empty(1, 3, 2 * p, p), kinds)
    assert params == pytest.approx(spec.params_m, abs=0.01)
    assert out["patch"].shape == (1, 2, 1, spec.embed_dim) and out["cls"].shape == (1, spec.embed_dim)
    if "key" in out:
        assert out["key"].shape == (1, 2, 1, spec.embed_dim)
    if "attn" in out:
        assert out["attn"].shape == (1, spec.heads, 2, 1)
    if "layer0" in out:
        assert out["layer0"].shape[:3] == (1, 2, 1)


def test_every_entry_states_what_the_list_shows():
    for spec in registry.backbones().values():
        assert spec.licence and spec.pretraining_data and spec.family and spec.params_m >= 0, spec.name
        assert len(spec.mean) == len(spec.std) == 3, spec.name
        learned = spec.family != "reference"
        assert not learned or spec.url or spec.timm or spec.hf or spec.file, f"{spec.name}: no source"
        assert spec.sha256 is None or len(spec.sha256) == 64, spec.name


def tiny(name, **options):
    """The registry entry with a smaller architecture of the same key layout."""
    spec = registry.backbone(name)
    return dataclasses.replace(spec, options={**spec.options, **options})


def random_model(spec, seed=0):
    return build_backbone(spec, resolve(spec, "random", seed), seed)


def load(spec, tmp_path, checkpoint, filename="checkpoint.pth"):
    path = tmp_path / filename
    torch.save(checkpoint, path)
    return build_backbone(spec, resolve(spec, str(path)))


def assert_same_features(loaded, reference, x, kinds):
    expected = reference.extract(x, kinds)
    got = loaded.extract(x, kinds)
    for kind in kinds:
        torch.testing.assert_close(got[kind], expected[kind], rtol=1e-4, atol=1e-4)


def _zeros_like(state):
    return {k: torch.zeros_like(v) for k, v in state.items()}


# --- iBOT, Mugs (DINO-style ViTs) ----------------------------------------------------------------

@pytest.mark.parametrize("release", ["checkpoint_teacher", "full_checkpoint"])
def test_ibot_release_layouts(tmp_path, release):
    spec = tiny("ibot-vits16", depth=2)
    reference = random_model(spec)
    state = reference.model.state_dict()
    head = {"head.mlp.0.weight": torch.randn(8, 384), "head.last_layer.weight_g": torch.ones(16, 1),
            "head.last_layer2.weight_v": torch.randn(16, 8)}
    if release == "checkpoint_teacher":  # backbone (t) files: {'state_dict': backbone + iBOT head}
        checkpoint = {"state_dict": {**state, **head}}
    else:  # full checkpoint: teacher and student, DDP + MultiCropWrapper prefixes, optimiser state
        checkpoint = {"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, **head},
                      "student": {f"module.backbone.{k}": v for k, v in _zeros_like(state).items()}
                      | {"module.backbone.masked_embed": torch.zeros(1, 384)},
                      "optimizer": {"state": {}}, "epoch": 800}
    loaded = load(spec, tmp_path, checkpoint, "ibot_vits16_checkpoint_teacher.pth")
    assert_same_features(loaded, reference, torch.randn(1, 3, 48, 32), {"patch", "cls", "key", "attn"})


def test_mugs_backbone_file_drops_relation_blocks(tmp_path):
    spec = tiny("mugs-vits16", depth=2)
    reference = random_model(spec)
    state = reference.model.state_dict()
    relation = {f"relation_blocks.0.{k[len('blocks.0.'):]}": torch.randn_like(v)
                for k, v in state.items() if k.startswith("blocks.0.")}
    loaded = load(spec, tmp_path, {"state_dict": {**state, **relation}}, "vit_small_backbone_800ep.pth")
    assert_same_features(loaded, reference, torch.randn(1, 3, 32, 48), {"patch", "cls", "value"})


# --- MoCo -----------------------------------------------------------------------------------------

def test_mocov3_vit_layout_and_twelve_heads(tmp_path):
    spec = tiny("mocov3-vits16", depth=2)
    reference = random_model(spec)
    assert reference.model.blocks[0].attn.num_heads == 12  # MoCo v3's ViT-S (vits.py), not DeiT-S's 6
    state = reference.model.state_dict()
    checkpoint = {"epoch": 300, "arch": "vit_small", "optimizer": {"state": {}}, "state_dict": {
        **{f"module.base_encoder.{k}": v for k, v in state.items()},
        "module.base_encoder.head.0.weight": torch.randn(16, 384),
        **{f"module.momentum_encoder.{k}": v for k, v in _zeros_like(state).items()},
        "module.predictor.0.weight": torch.randn(16, 16)}}
    loaded = load(spec, tmp_path, checkpoint, "vit-s-300ep.pth.tar")
    x = torch.randn(1, 3, 32, 32)
    assert_same_features(loaded, reference, x, {"patch", "cls", "key"})
    assert loaded.extract(x, {"attn"})["attn"].shape[1] == 12


def _torchvision_resnet(arch, state, **kwargs):
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None, **kwargs)
    model.fc = torch.nn.Identity()
    model.load_state_dict(state)
    return model.eval()


def _resnet_layer4(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def _randomise_bn(model):
    """BatchNorm statistics away from 0/1 so a loader that dropped them would show."""
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_(0, 0.1)
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 1.5)


@pytest.mark.slow
@pytest.mark.parametrize("name, arch", [("mocov2-resnet50", "resnet18"), ("moco-resnet18", "resnet18")])
def test_moco_resnet_training_state_layout(tmp_path, name, arch):
    """{'state_dict': {'module.encoder_q.*' (with the MLP head fc.0/fc.2), 'module.encoder_k.*', queue}}."""
    spec = dataclasses.replace(registry.backbone(name), arch=arch, embed_dim=512)
    ours = random_model(spec)
    _randomise_bn(ours.model)
    state = ours.model.state_dict()
    checkpoint = {"epoch": 800, "arch": arch, "optimizer": {"state": {}}, "state_dict": {
        **{f"module.encoder_q.{k}": v for k, v in state.items()},
        "module.encoder_q.fc.0.weight": torch.randn(16, 512), "module.encoder_q.fc.2.weight": torch.randn(8, 16),
        **{f"module.encoder_k.{k}": v for k, v in _zeros_like(state).items()},
        "module.queue": torch.randn(8, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}}
    loaded = load(spec, tmp_path, checkpoint, "moco_v2_800ep_pretrain.pth.tar")
    direct = _torchvision_resnet(arch, state)
    x = torch.randn(2, 3, 64, 96)
    out = loaded.extract(x, {"patch", "cls", "layer1"})
    with torch.no_grad():
        torch.testing.assert_close(out["cls"], direct(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out["patch"], _resnet_layer4(direct, x).permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    assert out["patch"].shape == (2, 2, 3, 512) and out["layer1"].shape == (2, 2, 3, 128)


@pytest.mark.slow
def test_dino_resnet50_plain_torchvision_file_with_dilation(tmp_path):
    """DINO's ResNet-50 file is a plain torchvision state dict (no fc); -os8 dilates layer3/4."""
    spec = registry.backbone("dino-resnet50-os8")
    ours = random_model(spec)
    _randomise_bn(ours.model)
    state = {k: v for k, v in ours.model.state_dict().items() if not k.endswith("num_batches_tracked")}
    loaded = load(spec, tmp_path, state, "dino_resnet50_pretrain.pth")
    direct = _torchvision_resnet("resnet50", ours.model.state_dict(), replace_stride_with_dilation=[False, True, True])
    x = torch.randn(1, 3, 64, 32)
    out = loaded.extract(x, {"patch", "cls"})
    assert out["patch"].shape == (1, 8, 4, 2048)  # output stride 8
    with torch.no_grad():
        torch.testing.assert_close(out["patch"], _resnet_layer4(direct, x).permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out["cls"], direct(x), rtol=1e-4, atol=1e-4)


def test_cnn_refuses_attention_kinds_and_bad_dilation():
    bb = random_model(registry.backbone("moco-resnet18"))
    with pytest.raises(UserError, match="cannot give 'key' features \\(it has no attention\\)"):
        bb.extract(torch.zeros(1, 3, 32, 32), {"key"})
    with pytest.raises(UserError, match="layers 0..3"):
        bb.extract(torch.zeros(1, 3, 32, 32), {"layer4"})
    spec = registry.backbone("moco-resnet18")
    with pytest.raises(UserError, match="basic blocks"):
        random_model(dataclasses.replace(spec, patch_size=16, options={"dilation": [False, False, True]}))
    with pytest.raises(UserError, match="output stride 16"):
        random_model(dataclasses.replace(registry.backbone("dino-resnet50"), options={"dilation": [False, False, True]}))


# --- Unicom ---------------------------------------------------------------------------------------

def _unicom_forward(state, x, heads, patch):
    """Unicom's ViT written out from its paper code's definition (not through timm): patch conv +
    position embedding (no CLS token), pre-norm blocks with bias-free qkv, ReLU6 MLP, LayerNorm 1e-5."""
    s = {k: v.float() for k, v in state.items()}
    t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = t + s["pos_embed"]
    b, n, d = t.shape
    depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (d,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-5)
        q, k, v = (h @ s[p + "attn.qkv.weight"].T).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        t = t + a @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
        h = F.layer_norm(t, (d,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-5)
        h = F.relu6(h @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"])
        t = t + h @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]
    return F.layer_norm(t, (d,), s["norm.weight"], s["norm.bias"], eps=1e-5)


@pytest.mark.slow
def test_unicom_fp16_release_matches_its_architecture(tmp_path):
    spec = dataclasses.replace(tiny("unicom-vitb32", depth=2), sha256=None)  # the real file's sha is checked
    source = random_model(spec).model.state_dict()
    with torch.no_grad():  # norms and biases away from their trivial init, stored in FP16 as released
        state = {k: (v + 0.05 * torch.randn_like(v)).half() for k, v in source.items()}
    n, d = state["pos_embed"].shape[1:]
    state |= {"feature.0.weight": torch.randn(d, n * d).half(), "feature.1.weight": torch.ones(d).half(),
              "feature.1.running_mean": torch.zeros(d).half(), "feature.2.weight": torch.randn(d, d).half()}
    assert not any(k in state for k in ("cls_token", "blocks.0.attn.qkv.bias"))  # the release has neither
    loaded = load(spec, tmp_path, state, "FP16-ViT-B-32.pt")
    x = torch.randn(2, 3, 224, 224)  # Unicom's own code runs at its training size only
    out = loaded.extract(x, {"patch", "cls", "key"})
    with torch.no_grad():
        tokens = _unicom_forward(state, x, spec.heads, 32)
    torch.testing.assert_close(out["patch"].flatten(1, 2), tokens, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out["cls"], tokens.mean(1), rtol=1e-3, atol=1e-3)
    with pytest.raises(UserError, match="no CLS token"):
        loaded.extract(x, {"attn"})


def test_unicom_uses_clip_normalisation():
    spec = registry.backbone("unicom-vitl14-336")
    assert spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and spec.input_size == 336


# --- DINOv3 ---------------------------------------------------------------------------------------

def _official_dinov3_vit(state):
    """timm's DINOv3 ViT names -> the released (facebookresearch/dinov3) names."""
    out = {}
    for k, v in state.items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if k.endswith("attn.q_bias"):
            prefix = k[: -len("q_bias")]
            out[prefix + "qkv.bias"] = torch.cat([v, torch.zeros_like(v), state[k.replace("q_bias", "v_bias")]])
            out[prefix + "qkv.bias_mask"] = torch.cat([torch.ones_like(v), torch.zeros_like(v), torch.ones_like(v)])
            continue
        if k.endswith(("attn.v_bias", "attn.k_bias")):
            continue
        out[k] = v
    out["mask_token"] = torch.zeros(1, out["cls_token"].shape[-1])
    out["rope_embed.periods"] = torch.ones(16)
    return out


def test_dinov3_vit_official_layout(tmp_path):
    spec = tiny("dinov3-vits16", depth=2)
    reference = random_model(spec)
    with torch.no_grad():
        for block in reference.model.blocks:  # released biases are not zero
            block.attn.q_bias.normal_(0, 0.1)
            block.attn.v_bias.normal_(0, 0.1)
    loaded = load(spec, tmp_path, _official_dinov3_vit(reference.model.state_dict()),
                  "dinov3_vits16_pretrain_lvd1689m.pth")
    x = torch.randn(1, 3, 48, 64)
    assert_same_features(loaded, reference, x, {"patch", "cls", "key", "query", "layer1"})
    with pytest.raises(UserError, match="rotary"):
        loaded.extract(x, {"attn"})


def test_dinov3_vit_keys_include_the_released_biases():
    bb = random_model(tiny("dinov3-vits16", depth=1))
    attn = bb.model.blocks[-1].attn
    with torch.no_grad():
        attn.q_bias.fill_(1.0)
    x = torch.randn(1, 3, 32, 32)
    tokens = {}
    hook = attn.register_forward_pre_hook(lambda m, args: tokens.setdefault("in", args[0]))
    out = bb.extract(x, {"query"})
    hook.remove()
    expected = tokens["in"] @ attn.qkv.weight[:384].T + 1.0
    torch.testing.assert_close(out["query"].flatten(1, 2), expected[:, 5:], rtol=1e-4, atol=1e-4)


def test_dinov3_found_in_timm_cache(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    spec = tiny("dinov3-vits16", depth=2)
    reference = random_model(spec, seed=3)
    snapshot = tmp_path / "hub" / f"models--timm--{spec.timm}" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.model.state_dict().items()}, snapshot / "model.safetensors")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("SSL_BENCH_WEIGHTS", raising=False)
    source = resolve(spec, None)
    assert source.origin == "timm cache"
    assert_same_features(build_backbone(spec, source), reference, torch.randn(1, 3, 32, 32), {"patch", "cls"})


def _official_convnext(state):
    """timm ConvNeXt names -> the released (facebookresearch ConvNeXt / DINOv3) names."""
    import re

    out = {}
    for k, v in state.items():
        k = k.replace("stem.", "downsample_layers.0.")
        k = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv").replace("head.norm", "norm")
        out[k] = v
    return out


def test_dinov3_convnext_official_layout(tmp_path):
    spec = tiny("dinov3-convnext-tiny", depths=(1, 1, 1, 1))
    reference = random_model(spec)
    with torch.no_grad():
        reference.model.head.norm.weight.normal_(1, 0.2)
    loaded = load(spec, tmp_path, _official_convnext(reference.model.state_dict()),
                  "dinov3_convnext_tiny_pretrain_lvd1689m.pth")
    x = torch.randn(1, 3, 64, 96)
    assert_same_features(loaded, reference, x, {"patch", "cls", "layer2"})
    with torch.no_grad():  # cls is timm's own pooled feature; patch the same norm per position
        torch.testing.assert_close(loaded.extract(x, {"cls"})["cls"], reference.model(x), rtol=1e-4, atol=1e-4)


# --- the harness on a stride-32 grid ------------------------------------------------------------

def test_feature_cache_and_protocol_on_a_stride_32_grid(tmp_path):
    from ssl_bench.data import open_dataset
    from ssl_bench.data.protocol import Protocol
    from ssl_bench.features import FeatureCache

    spec = registry.backbone("moco-resnet18")
    bb = random_model(spec)
    ds = open_dataset("synthetic", None, None, n=2, size=200)  # 200 px: the protocol resizes to 320
    protocol = Protocol().for_patch_size(spec.patch_size)
    assert protocol.resize == 320
    stores = FeatureCache(tmp_path).ensure(bb, "random:0", ds, protocol, ["patch", "cls", "layer2"], workers=0)
    assert stores["patch"].grid(0) == (10, 10) and stores["patch"][0].shape == (10, 10, 512)
    assert stores["layer2"][0].shape == (10, 10, 256) and stores["cls"][0].shape == (512,)


# --- ssl-bench list backbones ------------------------------------------------------------------

def test_list_backbones_fits_80_columns_and_shows_local_weights(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ssl_bench.cli import app

    monkeypatch.setenv("SSL_BENCH_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "80")
    (tmp_path / "vit-s-300ep.pth.tar").write_bytes(b"not read by list")
    result = CliRunner().invoke(app, ["list", "backbones"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80
    rows = {line.split()[0]: line.split() for line in lines if line.split()}
    assert set(registry.backbones()) <= set(rows)
    assert rows["mocov3-vits16"][-1] == "local" and rows["mocov3-vitb16"][-2:] == ["not", "found"]
    assert rows["dinov3-vits16"][5] == "DINOv3" and rows["mocov2-resnet50"][5] == "CC-BY-NC-4.0"
    wide = CliRunner().invoke(app, ["list", "backbones", "--wide"], env={"COLUMNS": "400"})
    assert "LAION-400M" in wide.output and "CLIP" in wide.output and "f9d5696a9b58dbbb" in wide.output


def test_backbone_throughput_benchmark_rounds_sizes_to_the_grid():
    from ssl_bench.bench import backbone_throughput

    result = backbone_throughput(backbones="moco-resnet18", sizes=(40,), images=1, batch=1, repeats=1)
    (row,) = result["rows"]
    assert (row["input"], row["grid"]) == (64, 2) and row["images_per_s"] > 0
