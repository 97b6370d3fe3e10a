"""The ViT ladder's rungs that timm lacks, and the fixed sin-cos position embedding.

timm has ViT-S/16, B/16 and L/16 but no ViT-L/8 or ViT-G/8, the two encoders of
the microscopy MAE papers (Kraus et al. 2024; "ViTally Consistent", 2024).
They are registered here as ordinary timm models, so every place that takes a
timm name (``model.name``, :func:`cellrep.models.backbone.build_backbone`,
``timm.create_model``) takes them too, and the architecture lives in timm's
well-tested ``VisionTransformer``:

* ``vit_large_patch8_256``: ViT-L/8 (1024 dim, 24 blocks), ~304 M parameters;
* ``vit_gigantic_patch8_256``: ViT-G/8 (1664 dim, 48 blocks, MLP 8192),
  ~1.84 B parameters at 256 px.

The ``_256`` says the default input size (the papers' crop); ``img_size`` overrides it.
"""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed
from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer

from cellrep.errors import CellrepError


def _untrained_cfg(**kwargs) -> dict:
    # No hub weights: microscopy encoders come from cellrep checkpoints (task.init_from).
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (6, 256, 256),
        "fixed_input_size": True,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "mean": (0.0,),
        "std": (1.0,),
        **kwargs,
    }


# timm reads ``default_cfgs`` of the module that registers a model; it must exist before the decorators run.
default_cfgs = generate_default_cfgs(
    {
        "vit_large_patch8_256": _untrained_cfg(),
        "vit_gigantic_patch8_256": _untrained_cfg(),
    }
)


def _create(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    if pretrained:
        raise CellrepError(
            f"{variant} has no published weights in timm",
            fix="pretrain it with task=mae, then fine-tune with task.init_from=<checkpoint>",
        )
    return build_model_with_cfg(VisionTransformer, variant, pretrained=False, **kwargs)


@register_model
def vit_large_patch8_256(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-L/8: the encoder of the first large microscopy MAE (Phenom-1 scale)."""
    args = dict(patch_size=8, embed_dim=1024, depth=24, num_heads=16, img_size=256)
    return _create("vit_large_patch8_256", pretrained, **dict(args, **kwargs))


@register_model
def vit_gigantic_patch8_256(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-G/8 (ViT-bigG widths of Zhai et al. 2022 at patch 8): the 1.9 B-parameter microscopy MAE encoder."""
    args = dict(patch_size=8, embed_dim=1664, depth=48, num_heads=16, mlp_ratio=64 / 13, img_size=256)
    return _create("vit_gigantic_patch8_256", pretrained, **dict(args, **kwargs))


def sincos_pos_embed(grid: tuple[int, int], dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, ``(h·w) × dim`` in row-major token order.

    Fixed rather than learned because MAE encoders see a random quarter of the
    tokens per step; a learned table would train each position only that often
    (He et al. 2022 use the same fixed embedding).
    """
    if dim % 4:
        raise CellrepError(
            f"embedding width {dim} is not divisible by 4, as a 2-D sin-cos position embedding needs",
            fix="use an embed_dim / decoder_dim that is a multiple of 4",
        )
    return build_sincos2d_pos_embed(list(grid), dim=dim, device=device, dtype=dtype)


def fix_pos_embed_to_sincos(vit: VisionTransformer) -> None:
    """Overwrite a timm ViT's learned position table with the fixed sin-cos one and freeze it.

    Prefix tokens (class, registers) get a zero position, as in MAE. The tensor
    keeps its name and shape, so the encoder's state dict loads unchanged into a
    supervised ViT, where the embedding becomes trainable again.
    """
    pos = vit.pos_embed
    if pos is None or vit.dynamic_img_size:
        raise CellrepError(
            "MAE needs a ViT with a fixed-size absolute position embedding",
            fix="use a model/ config of the ViT ladder (vit_s16 ... vit_g8) or a ca_vit_* model",
        )
    grid = tuple(vit.patch_embed.grid_size)
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    with torch.no_grad():
        if pos.device.type != "meta":
            table = sincos_pos_embed(grid, pos.shape[-1], device=pos.device, dtype=pos.dtype)
            pos[:, :prefix].zero_()
            pos[:, prefix:].copy_(table)
    pos.requires_grad_(False)


def patch_size_of(model: nn.Module) -> int:
    """The square patch size of a timm ViT or a CA-ViT."""
    size = getattr(model, "patch_size", None)
    if size is None and hasattr(model, "patch_embed"):
        size = model.patch_embed.patch_size
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise CellrepError(f"non-square patches {tuple(size)} are not supported", fix="use square patches")
        size = size[0]
    if not isinstance(size, int):
        raise CellrepError(
            f"{type(model).__name__} is not a patch-based ViT",
            fix="MAE and DINO need a ViT: model=vit_s16, vit_b16, vit_l16, vit_l8, vit_g8 or ca_vit_*",
        )
    return size
