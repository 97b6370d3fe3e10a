"""timm-style checks for every ViT config of the ladder (ViT-S/16 … ViT-G/8, CA-ViT-*).

Full widths are built on the meta device (architecture and parameter count,
no memory); everything that runs numbers uses the same architecture at a tiny
width (64 dim, 3 blocks), as timm's own tests do for large models.
"""

from importlib import resources

import pytest
import torch
from omegaconf import OmegaConf

from cellrep.models.backbone import build_backbone
from cellrep.models.vit import patch_size_of
from cellrep.models.vit_tokens import run_blocks, vit_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CONF = resources.files("cellrep") / "conf" / "model"
VIT_CONFIGS = sorted(p.name for p in CONF.iterdir() if p.name.endswith(".yaml") and "vit" in p.name)
TINY = dict(embed_dim=64, depth=3, num_heads=4)


def model_name(config: str) -> str:
    return OmegaConf.load(CONF / config).name


def tiny(config: str, in_chans: int = 6, num_classes: int = 7, img_size: int = 32):
    torch.manual_seed(0)
    return build_backbone(model_name(config), in_chans=in_chans, num_classes=num_classes, img_size=img_size, **TINY)


def test_the_ladder_is_all_there():
    assert {
        "vit_s16.yaml",
        "vit_b16.yaml",
        "vit_l16.yaml",
        "vit_l8.yaml",
        "vit_g8.yaml",
        "ca_vit_s16.yaml",
        "ca_vit_b16.yaml",
        "ca_vit_l16.yaml",
        "ca_vit_l8.yaml",
    } <= set(VIT_CONFIGS)


@pytest.mark.parametrize("config", VIT_CONFIGS)
def test_output_shape_finite_and_gradient_on_every_parameter(config):
    model = tiny(config)
    out = model(torch.randn(2, 6, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("config", VIT_CONFIGS)
def test_one_intermediate_per_block_for_probing(config):
    """The contract the per-block probe relies on: one B×L×D token tensor per block, class token on request."""
    model = tiny(config, num_classes=0).eval()
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        blocks = model.forward_intermediates(x, indices=None, output_fmt="NLC", intermediates_only=True)
        with_cls = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
        final, last_two = model.forward_intermediates(x, indices=2, output_fmt="NLC", norm=True)
    tokens = (32 // patch_size_of(model)) ** 2 * (6 if config.startswith("ca_") else 1)
    assert len(blocks) == TINY["depth"] == len(model.blocks)
    assert all(b.shape == (2, tokens, TINY["embed_dim"]) for b in blocks)
    assert all(cls.shape == (2, 1, TINY["embed_dim"]) for _, cls in with_cls)
    assert len(last_two) == 2 and final.shape[-1] == TINY["embed_dim"]
    torch.testing.assert_close(blocks[-1], with_cls[-1][0])


TIMM_OPTIONS = {  # the options that change timm's token path: prefix tokens, where positions go, pre-norm, dropouts
    "plain": {},
    "registers, no class position": {"reg_tokens": 2, "no_embed_class": True},
    "pre-norm and every dropout": {
        "pre_norm": True,
        "pos_drop_rate": 0.2,
        "patch_drop_rate": 0.3,
        "drop_path_rate": 0.2,
    },
}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("options", sorted(TIMM_OPTIONS))
def test_cellrep_token_path_is_timms_forward_features(options, checkpointing):
    """What the context path and MAE run (vit_tokens, run_blocks) is timm's forward_features bit for bit,
    in training too: the same dropout draws in the same order."""
    torch.manual_seed(0)
    model = build_backbone(
        "vit_small_patch16_224", in_chans=5, num_classes=0, img_size=32, **TINY, **TIMM_OPTIONS[options]
    ).train()
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(2, 5, 32, 32)
    torch.manual_seed(1)
    ours = model.norm(run_blocks(model.blocks, vit_tokens(model, x), model.grad_checkpointing))
    torch.manual_seed(1)
    assert torch.equal(ours, model.forward_features(x))


FULL_WIDTH = {  # config: (embed_dim, depth, patch, parameters at 256 px, 6 channels, no head)
    "vit_s16.yaml": (384, 12, 16, (21e6, 23e6)),
    "vit_b16.yaml": (768, 12, 16, (85e6, 88e6)),
    "vit_l16.yaml": (1024, 24, 16, (300e6, 310e6)),
    "vit_l8.yaml": (1024, 24, 8, (295e6, 310e6)),
    "vit_g8.yaml": (1664, 48, 8, (1.8e9, 2.0e9)),
    "ca_vit_s16.yaml": (384, 12, 16, (21e6, 23e6)),
    "ca_vit_l8.yaml": (1024, 24, 8, (295e6, 310e6)),
}


@pytest.mark.parametrize("config", sorted(FULL_WIDTH))
def test_full_width_architecture_and_parameter_count_on_meta_device(config):
    dim, depth, patch, (low, high) = FULL_WIDTH[config]
    with torch.device("meta"):
        model = build_backbone(model_name(config), in_chans=6, num_classes=0, img_size=256)
    n = sum(p.numel() for p in model.parameters())
    assert (model.embed_dim, len(model.blocks)) == (dim, depth)
    assert patch_size_of(model) == patch
    assert low <= n <= high, f"{config}: {n / 1e6:.1f} M parameters"


def test_attention_uses_fused_scaled_dot_product_attention():
    """timm's Attention calls F.scaled_dot_product_attention (flash kernels on GPU) when fused_attn is on."""
    for config in ("vit_s16.yaml", "ca_vit_s16.yaml"):
        assert all(block.attn.fused_attn for block in tiny(config).blocks)
