"""Recursion's OpenPhenom release (recursionpharma/maes_microscopy: a channel-agnostic MAE ViT-S/16),
mapped onto cellrep's CA-ViT (docs/encoders.md)."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

from cellrep.errors import CellrepError
from cellrep.models.checkpoint import _named
from cellrep.models.pretrained.files import Request, Source
from cellrep.models.vit import sincos_pos_embed

_OP = "encoder.vit_backbone."
# the MAE's other parts: the reconstruction decoder, not part of the encoder
_OP_OTHER = ("decoder.", "encoder_decoder_proj.", "decoder_pred.")
_CA_VIT_NAMES = {
    (16, 384, 12, 6): "ca_vit_small_patch16",
    (16, 768, 12, 12): "ca_vit_base_patch16",
    (16, 1024, 24, 16): "ca_vit_large_patch16",
    (8, 1024, 24, 16): "ca_vit_large_patch8",
}
OPENPHENOM_CROP = 256  # its position table covers a 16×16 grid of 16-px patches per channel


def is_openphenom(src: Source) -> bool:
    return f"{_OP}patch_embed.proj.weight" in src.state


def _openphenom_shape(src: Source) -> tuple[int, int, int, int, int]:
    """(patch, width, depth, heads, channel slots) read from the weights themselves."""
    s = src.state
    enc = (src.config or {}).get("encoder") or {}
    if src.config is not None and not enc.get("channel_agnostic", False):
        raise CellrepError(
            f"{src.path}: config.json describes a MAE encoder that is not channel-agnostic",
            fix="only the channel-agnostic release (encoder.channel_agnostic: true) maps onto cellrep's CA-ViT",
        )
    proj = s[f"{_OP}patch_embed.proj.weight"]
    if proj.shape[1] != 1:
        raise CellrepError(f"{src.path}: its patch embedding takes {proj.shape[1]} channels, not one per channel")
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = 1 + max(int(m.group(1)) for k in s if (m := re.match(rf"{re.escape(_OP)}blocks\.(\d+)\.", k)))
    qn = s.get(f"{_OP}blocks.0.q_norm.weight")
    heads = width // int(qn.shape[0]) if qn is not None else 6
    grid = OPENPHENOM_CROP // patch
    slots = (int(s[f"{_OP}pos_embed"].shape[1]) - 1) // (grid * grid)
    return patch, width, depth, heads, int(enc.get("max_in_chans", slots))


def openphenom_model(src: Source, req: Request) -> dict:
    patch, width, depth, heads, slots = _openphenom_shape(src)
    if req.in_chans > slots:
        raise CellrepError(
            f"{req.setting}: the data has {req.in_chans} channels; {src.path} was trained for at most {slots}",
            fix=f"evaluate on at most {slots} channels (data.channel_names=[...])",
        )
    if "blocks.0.in_proj.weight" not in {k[len(_OP) :] for k in src.state if k.startswith(_OP)}:
        raise CellrepError(
            f"{src.path}: its blocks are not timm ParallelScalingBlocks (no blocks.0.in_proj.weight)",
            fix="only the released OpenPhenom layout (vit_small_patch16_256: parallel blocks, qk-norm) is mapped",
        )
    kwargs: dict[str, Any] = {
        "patch_size": patch,
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "max_channels": slots,
        "global_pool": "avg",  # config.json: vit_small_patch16_256(global_pool="avg")
        "block": "parallel",
        "qk_norm": f"{_OP}blocks.0.q_norm.weight" in src.state,
        "init_values": 1e-4 if f"{_OP}blocks.0.ls.gamma" in src.state else None,
        "final_norm": f"{_OP}norm.weight" in src.state,
        "pos_layout": "hw",
    }
    name = _CA_VIT_NAMES.get((patch, width, depth, heads), "ca_vit_small_patch16")
    if req.img_size is not None and req.img_size != OPENPHENOM_CROP:
        src.notes.append(
            f"crop {req.img_size} px: OpenPhenom was trained on {OPENPHENOM_CROP}-px crops (the CA-ViT computes "
            "the same sin-cos positions for any grid; the release's own code would misplace them)"
        )
    return {"name": name, "img_size": None, "kwargs": kwargs}


def _hw_sincos(grid: int, width: int) -> torch.Tensor:
    pos = sincos_pos_embed((grid, grid), width)
    sin_h, sin_w, cos_h, cos_w = pos.chunk(4, dim=-1)
    return torch.cat([sin_h, cos_h, sin_w, cos_w], dim=-1)


def openphenom_weights(src: Source, model: nn.Module, req: Request) -> dict[str, torch.Tensor]:
    """The release's encoder in CA-ViT keys. What differs from a CA-ViT, and how it is represented:

    * channels: OpenPhenom adds the SAME position embedding to every channel and has no channel
      embedding, so ``channel_embed`` is all zeros (tokens are channel-major in both);
    * positions: its fixed table is sin-cos with quarters [sin h|cos h|sin w|cos w]
      (``pos_layout=hw``); the file's table is checked against it, not loaded;
    * blocks: timm ``ParallelScalingBlock`` with qk-norm and LayerScale (``block=parallel``).
      The release was trained with timm 0.9.7, whose block added ``cat(zeros(3·D), mlp_bias)``
      to the fused [mlp|q|k|v] in-projection (timm issue #2653, fixed since): that exact vector
      becomes ``in_proj.bias``, so the forward is the trained one;
    * end: ``global_pool="avg"`` makes timm's final ``norm`` an Identity and the untrained
      ``fc_norm`` is never applied by the release's ``predict`` (mean of the patch tokens of
      the last block): ``final_norm=False``, ``fc_norm`` dropped.
    """
    s = src.state
    if not getattr(model, "channel_agnostic", False):
        raise CellrepError(
            f"{req.setting}: {src.path} is a channel-agnostic OpenPhenom encoder; the model is {type(model).__name__}",
            fix="train a CA-ViT of its shape: "
            f"model.name=ca_vit_small_patch16 model.kwargs={openphenom_model(src, req)['kwargs']}",
        )
    unknown = sorted(k for k in s if not k.startswith(_OP) and not k.startswith(_OP_OTHER))
    if unknown:
        raise CellrepError(
            f"{req.setting}: {src.path} is not the OpenPhenom layout: {_named('unexpected keys', unknown)}",
            fix="pass the release directory as published (config.json + model.safetensors)",
        )
    enc = {k[len(_OP) :]: v for k, v in s.items() if k.startswith(_OP)}
    width = int(enc["cls_token"].shape[-1])
    grid = OPENPHENOM_CROP // int(model.patch_size)
    table = torch.cat([torch.zeros(1, width), _hw_sincos(grid, width).repeat(model.max_channels, 1)])[None]
    pos = enc.pop("pos_embed", None)
    if pos is None or pos.shape != table.shape or not torch.allclose(pos.float(), table, atol=1e-4):
        raise CellrepError(
            f"{req.setting}: the position embedding of {src.path} is not the fixed per-channel sin-cos table "
            f"{tuple(table.shape)} of the OpenPhenom release; a CA-ViT computes its positions and cannot hold "
            "a learned or different table",
            fix="use the release's weights as published",
        )
    out: dict[str, torch.Tensor] = {"channel_embed": torch.zeros(model.max_channels, width)}
    dropped = [k for k in ("fc_norm.weight", "fc_norm.bias") if k in enc]
    for k, v in enc.items():
        if k in dropped:
            continue
        k = {"patch_embed.proj.weight": "patch_embed.weight", "patch_embed.proj.bias": "patch_embed.bias"}.get(k, k)
        m = re.fullmatch(r"blocks\.(\d+)\.mlp_bias", k)
        if m:  # the bias timm 0.9.7 applied to [mlp|q|k|v] (see above)
            k, v = f"blocks.{m.group(1)}.in_proj.bias", torch.cat([torch.zeros(3 * width, dtype=v.dtype), v])
        out[k] = v
    other = sum(k.startswith(_OP_OTHER) for k in s)
    src.notes.append(
        f"OpenPhenom: channel_embed zero (none in the release), fc_norm unused, {other} decoder tensors left out"
    )
    return out
