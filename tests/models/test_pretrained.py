"""Published encoders from local files: each layout written with random weights, read back, and checked
against a forward pass of the same weights that does not go through cellrep's mapping."""

from __future__ import annotations

import cellrep  # noqa: F401

# isort: split
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer

from cellrep.data.loading.transforms import normalize
from cellrep.errors import CellrepError
from cellrep.eval.features import pooled_block_features
from cellrep.models.pretrained import init_backbone, load_published_encoder


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    torch.manual_seed(0)


def _randomized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor random (biases, LayerScale and norms included), so a misrouted one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "gamma"))
            p.copy_(torch.randn_like(p) * 0.1 + 1.0 if scale else torch.randn_like(p) * 0.05)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


# -- timm ----------------------------------------------------------------------------------------


def test_timm_resnet18_safetensors_matches_timm(tmp_path):
    source = timm.create_model("resnet18", pretrained=False).eval()  # 1000-class head, as published
    save_file(source.state_dict(), tmp_path / "resnet18.safetensors")
    backbone, meta = load_published_encoder(tmp_path / "resnet18.safetensors", "resnet18", in_chans=3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = source.forward_head(source.forward_features(x), pre_logits=True)
        assert torch.allclose(backbone(x), want, atol=1e-5)
        fresh = timm.create_model("resnet18", num_classes=0).eval()
        assert not torch.allclose(fresh(x), want, atol=1e-3)  # the comparison can fail
    assert meta["format"] == "timm" and meta["model"]["name"] == "resnet18" and meta["in_chans"] == 3
    assert any("fc.weight" in n for n in meta["notes"])  # the ImageNet head is dropped, and said so


def test_timm_vit_torch_state_dict_matches_and_partial_file_names_keys(tmp_path):
    source = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    backbone, _ = load_published_encoder(tmp_path / "vit.pth", "vit_small_patch16_224", 3, img_size=224)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(backbone(x), source.forward_head(source.forward_features(x), pre_logits=True), atol=1e-5)
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.11.")}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(CellrepError, match=r"(?s)missing from the checkpoint: blocks\.11\.attn"):
        load_published_encoder(tmp_path / "partial.safetensors", "vit_small_patch16_224", 3, img_size=224)
    with pytest.raises(CellrepError, match=r"(?s)unexpected in the checkpoint: .*blocks\.0\.attn"):
        load_published_encoder(tmp_path / "vit.pth", "resnet18", 3)  # the wrong architecture named


def test_first_conv_channels_need_an_explicit_adaptation(tmp_path):
    source = timm.create_model("resnet18", pretrained=False).eval()
    save_file(source.state_dict(), tmp_path / "rgb.safetensors")
    with pytest.raises(CellrepError, match=r"(?s)conv1.weight\) takes 3 channels; the data has 5.*encoder_channels="):
        load_published_encoder(tmp_path / "rgb.safetensors", "resnet18", in_chans=5)
    with pytest.raises(CellrepError, match="bare weights.*\n  fix: name it: encoder_model="):
        load_published_encoder(tmp_path / "rgb.safetensors", None, in_chans=3)
    gray3 = torch.rand(1, 1, 32, 32).expand(1, 3, -1, -1)
    mean, _ = load_published_encoder(tmp_path / "rgb.safetensors", "resnet18", 5, channels="mean")
    repeat, _ = load_published_encoder(tmp_path / "rgb.safetensors", "resnet18", 5, channels="repeat")
    w = source.conv1.weight
    with torch.no_grad():
        # mean: a grey image in any channel count meets the source's response to a grey RGB image
        gray5 = gray3[:, :1].expand(1, 5, -1, -1)
        assert torch.allclose(mean.conv1(gray5), source.conv1(gray3), atol=1e-5)
        # repeat: timm's adapt_input_conv, RGB filters tiled over the channels and scaled by 3/5
        tiled = torch.cat([w, w], dim=1)[:, :5] * 3 / 5
        assert torch.allclose(repeat.conv1.weight, tiled, atol=1e-6)


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}, "why": CellrepError("x")}, tmp_path / "evil.pth")
    with pytest.raises(CellrepError, match="(?s)not a readable weights file.*could run code"):
        load_published_encoder(tmp_path / "evil.pth", "resnet18", 3)


# -- DINOv2 --------------------------------------------------------------------------------------


def _dinov2_layout(model: VisionTransformer, registers: bool) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov2's keys for the weights of a timm dinov2 model (the inverse of timm's conversion)."""
    state = _randomized(model)
    out = {"mask_token": torch.randn(1, model.embed_dim), **state}
    if registers:  # dinov2 keeps the class token's position in pos_embed and calls registers register_tokens
        p0 = torch.randn(1, 1, model.embed_dim) * 0.05
        out["register_tokens"] = out.pop("reg_token")
        out["pos_embed"] = torch.cat([p0, state["pos_embed"]], dim=1)
        out["cls_token"] = state["cls_token"] - p0
    return out


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_dinov2_layout_matches_timm_vit(tmp_path, name):
    source = timm.create_model(name, pretrained=False, img_size=112, num_classes=0).eval()
    layout = _dinov2_layout(source, registers="reg4" in name)
    assert "blocks.0.ls1.gamma" in layout and "patch_embed.proj.weight" in layout
    torch.save(layout, tmp_path / "dinov2.pth")
    backbone, meta = load_published_encoder(tmp_path / "dinov2.pth", name, 3, img_size=112)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(backbone(x), source(x), atol=1e-4)
    assert meta["format"] == "dinov2"


def test_dinov2_518_px_table_is_resampled_for_the_crop(tmp_path):
    source = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)  # 518 px, 37×37
    torch.save(_dinov2_layout(source, registers=False), tmp_path / "dinov2.pth")
    backbone, meta = load_published_encoder(tmp_path / "dinov2.pth", "vit_small_patch14_dinov2", 3, img_size=56)
    assert backbone.pos_embed.shape == (1, 1 + 16, 384)
    assert any("pos_embed resampled (1, 1370, 384)" in n for n in meta["notes"])
    with pytest.raises(CellrepError, match="encoder_model=vit_small_patch14_dinov2"):
        load_published_encoder(tmp_path / "dinov2.pth", None, 3)


# -- OpenPhenom ----------------------------------------------------------------------------------

D, DEPTH, SLOTS = 384, 2, 11


def _their_pos_table(grid: int, dim: int) -> torch.Tensor:
    """maes_microscopy's sin-cos table, written out here: [sin h | cos h | sin w | cos w]."""
    h, w = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4).float() / (dim // 4))
    hh, ww = torch.outer(h.flatten(), omega), torch.outer(w.flatten(), omega)
    return torch.cat([hh.sin(), hh.cos(), ww.sin(), ww.cos()], dim=1)


def _write_openphenom(root) -> dict[str, torch.Tensor]:
    """A release directory: the MAE's keys as maes_microscopy's MAEModel.state_dict() names them."""
    vit = VisionTransformer(  # its vit_small_patch16_256 with the channel-agnostic single-channel stem
        img_size=256, patch_size=16, in_chans=1, embed_dim=D, depth=DEPTH, num_heads=6, num_classes=0,
        global_pool="avg", fc_norm=None, class_token=True, init_values=1e-4,
        block_fn=ParallelScalingBlock, qkv_bias=False, qk_norm=True,
    )  # fmt: skip
    enc = _randomized(vit)
    assert "norm.weight" not in enc and "fc_norm.weight" in enc and "blocks.0.mlp_bias" in enc
    enc["pos_embed"] = torch.cat([torch.zeros(1, D), _their_pos_table(16, D).repeat(SLOTS, 1)])[None]
    state = {f"encoder.vit_backbone.{k}": v for k, v in enc.items()}
    state.update({"decoder.mask_token": torch.zeros(1, 1, 256), "encoder_decoder_proj.weight": torch.randn(256, D)})
    root.mkdir()
    save_file(state, root / "model.safetensors")
    vit_cfg = {"_target_": "vit.vit_small_patch16_256", "global_pool": "avg"}
    encoder = {"_target_": "mae_modules.MAEEncoder", "channel_agnostic": True, "max_in_chans": SLOTS}
    config = {"architectures": ["MAEModel"], "model_type": "MAE", "encoder": {**encoder, "vit_backbone": vit_cfg}}
    (root / "config.json").write_text(json.dumps(config))
    return enc


def _their_predict(enc: dict[str, torch.Tensor], pixels: torch.Tensor, fixed_bias: bool = False) -> torch.Tensor:
    """OpenPhenom's predict(), written out: /255 + InstanceNorm, one conv per channel, blocks as timm 0.9.7
    ran them (the in-projection bias is cat(zeros(3D), mlp_bias)), mean of the last block's patch tokens."""
    x = F.instance_norm(pixels.float() / 255.0, eps=1e-5)
    B, C = x.shape[:2]
    tokens = torch.stack([F.conv2d(x[:, c : c + 1], enc["patch_embed.proj.weight"], enc["patch_embed.proj.bias"],
                                   stride=16) for c in range(C)], dim=2)  # fmt: skip
    tokens = tokens.flatten(2).transpose(1, 2)
    t = torch.cat([enc["cls_token"].expand(B, -1, -1), tokens], dim=1) + enc["pos_embed"][:, : 1 + tokens.shape[1]]
    heads, hd = 6, D // 6
    for i in range(DEPTH):
        g = lambda n: enc[f"blocks.{i}.{n}"]  # noqa: E731
        y = F.layer_norm(t, (D,), g("in_norm.weight"), g("in_norm.bias"), eps=1e-6)
        mlp_bias = g("mlp_bias")
        bias = torch.cat([mlp_bias, torch.zeros(3 * D)]) if fixed_bias else torch.cat([torch.zeros(3 * D), mlp_bias])
        y = F.linear(y, g("in_proj.weight"), bias)
        m, q, k, v = torch.split(y, [4 * D, D, D, D], dim=-1)
        split = lambda z: z.view(B, -1, heads, hd)  # noqa: E731
        q = F.layer_norm(split(q), (hd,), g("q_norm.weight"), g("q_norm.bias"), eps=1e-6).transpose(1, 2)
        k = F.layer_norm(split(k), (hd,), g("k_norm.weight"), g("k_norm.bias"), eps=1e-6).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, split(v).transpose(1, 2)).transpose(1, 2).reshape(B, -1, D)
        out = F.linear(a, g("attn_out_proj.weight"), g("attn_out_proj.bias"))
        out = out + F.linear(F.gelu(m), g("mlp_out_proj.weight"), g("mlp_out_proj.bias"))
        t = t + g("ls.gamma") * out
    return t[:, 1:].mean(dim=1)


def test_openphenom_release_matches_its_own_forward(tmp_path):
    enc = _write_openphenom(tmp_path / "openphenom")
    backbone, meta = load_published_encoder(tmp_path / "openphenom", None, in_chans=3, img_size=256)
    assert meta["format"] == "openphenom" and meta["normalization"] == "self"
    assert meta["model"]["kwargs"]["block"] == "parallel" and meta["model"]["kwargs"]["max_channels"] == SLOTS
    pixels = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    with torch.no_grad():
        want = _their_predict(enc, pixels)
        ours = pooled_block_features(backbone, normalize(pixels, "self"))[-1][:, :D]  # [mean patch tokens, cls]
        scale = want.abs().max()
        assert torch.allclose(ours, want, atol=1e-3 * scale)
        # controls: the bias routing of today's timm, and no per-image normalization, both differ
        assert not torch.allclose(ours, _their_predict(enc, pixels, fixed_bias=True), atol=1e-2 * scale)
        raw = pooled_block_features(backbone, pixels.float())[-1][:, :D]
        assert not torch.allclose(raw, want, atol=1e-2 * scale)


def test_openphenom_partial_or_altered_release_is_refused(tmp_path):
    _write_openphenom(tmp_path / "op")
    from safetensors.torch import load_file

    state = load_file(tmp_path / "op" / "model.safetensors")
    for name, change in {
        "missing": lambda s: s.pop("encoder.vit_backbone.blocks.1.attn_out_proj.weight"),
        "pos": lambda s: s.__setitem__("encoder.vit_backbone.pos_embed", torch.randn(1, 1 + SLOTS * 256, D)),
        "stray": lambda s: s.__setitem__("head.weight", torch.ones(1)),
    }.items():
        altered = dict(state)
        change(altered)
        (tmp_path / name).mkdir()
        save_file(altered, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text((tmp_path / "op" / "config.json").read_text())
    with pytest.raises(CellrepError, match=r"(?s)missing from the checkpoint: blocks\.1\.attn_out_proj\.weight"):
        load_published_encoder(tmp_path / "missing", None, 3)
    with pytest.raises(CellrepError, match="position embedding .* is not the fixed per-channel sin-cos table"):
        load_published_encoder(tmp_path / "pos", None, 3)
    with pytest.raises(CellrepError, match="not the OpenPhenom layout: unexpected keys: head.weight"):
        load_published_encoder(tmp_path / "stray", None, 3)
    with pytest.raises(CellrepError, match="trained for at most 11"):
        load_published_encoder(tmp_path / "op", None, 12)


def test_init_from_openphenom_and_timm(tmp_path):
    """task.init_from: the fine-tuned backbone starts from the published weights; its new head stays fresh."""
    enc = _write_openphenom(tmp_path / "op")
    _, meta = load_published_encoder(tmp_path / "op", None, 3)
    target = timm.create_model("ca_vit_small_patch16", num_classes=7, **meta["model"]["kwargs"])
    assert init_backbone(target, tmp_path / "op", "ca_vit_small_patch16", 3) == ["head.bias", "head.weight"]
    assert torch.equal(target.blocks[1].ls.gamma, enc["blocks.1.ls.gamma"])
    with pytest.raises(CellrepError, match="(?s)channel-agnostic OpenPhenom encoder.*model.kwargs="):
        init_backbone(timm.create_model("resnet18", num_classes=7), tmp_path / "op", "resnet18", 3)
    source = timm.create_model("resnet18", pretrained=False)
    save_file(source.state_dict(), tmp_path / "r18.safetensors")
    target = timm.create_model("resnet18", num_classes=7, in_chans=4)
    assert init_backbone(target, tmp_path / "r18.safetensors", "resnet18", 4, channels="mean") == [
        "fc.bias",
        "fc.weight",
    ]
    assert torch.equal(target.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


# -- end to end ----------------------------------------------------------------------------------

TINY_DATA = (
    "data.num_workers=0",
    "data.batch_size=32",
    "data.crop_size=32",
    "data.synthetic.experiments_per_cell_type=3",
    "data.synthetic.plates_per_experiment=1",
    "data.synthetic.sites_per_well=1",
    "data.synthetic.image_size=48",
    "data.synthetic.num_modules=6",
    "data.synthetic.genes_per_module=4",
    "data.synthetic.num_compounds=2",
    "data.synthetic.control_wells_per_plate=4",
    "data.synthetic.crispr_control_wells_per_plate=0",
    "data.synthetic.positive_controls=0",
    "data.synthetic.gene_perturbation_type=siRNA",
    "data.synthetic.gene_groups=1",
    "data.synthetic.rotate_groups=false",
    "data.synthetic.slot_drift=6.0",
)


def test_probe_with_a_timm_resnet18_safetensors(make_cfg, tmp_path):
    from cellrep.cli.probe import probe

    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "resnet18.safetensors")
    cfg = make_cfg(
        f"encoder={tmp_path}/resnet18.safetensors",
        "encoder_model=resnet18",
        "encoder_channels=repeat",  # an RGB file, a screen of other channels
        "progress=false",
        "loader.num_workers=0",
        "probe.epochs=3",
        *TINY_DATA,
        config_name="probe",
    )
    metrics = probe(cfg)
    record = json.loads((tmp_path / "run" / "probe.json").read_text())
    assert metrics["model"] == "resnet18" and metrics["num_blocks"] == 5 == len(record["blocks"])
    assert all(math.isfinite(b["test_acc"]) for b in record["blocks"])


def test_config_settings_are_checked_before_any_work(make_cfg, tmp_path):
    from cellrep.config import to_schema
    from cellrep.eval.runtime import validate_config

    with pytest.raises(CellrepError, match="ckpt_path and encoder are both set"):
        validate_config(make_cfg("ckpt_path=/x.ckpt", "encoder=/y", config_name="probe"))
    with pytest.raises(CellrepError, match="unknown encoder_channels 'tile'"):
        validate_config(make_cfg("encoder=/y", "encoder_channels=tile", config_name="probe"))
    validate_config(make_cfg("encoder=/y", config_name="eval"))  # an encoder alone is something to embed with
    with pytest.raises(CellrepError, match="exactly one of ckpt_path=..., encoder=..."):
        validate_config(make_cfg("encoder=/y", "embeddings=/z.parquet", config_name="eval"))
    _write_openphenom(tmp_path / "op")
    assert to_schema(make_cfg(f"task.init_from={tmp_path}/op"))["task"].init_from  # a release directory
    with pytest.raises(CellrepError, match="unknown task.init_channels 'tile'"):
        to_schema(make_cfg(f"task.init_from={tmp_path}/op", "task.init_channels=tile"))
