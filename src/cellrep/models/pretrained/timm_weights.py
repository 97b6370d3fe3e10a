"""timm state dicts (with the first-convolution channel adaptation) and DINOv2 checkpoints, which
timm's own ``checkpoint_filter_fn`` converts onto a timm ViT."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.models._manipulate import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from cellrep.errors import CellrepError
from cellrep.models.checkpoint import classifier_keys
from cellrep.models.pretrained.files import Request, Source, need_model

# encoder_channels=...: how a first convolution trained on other channels meets the data's
CHANNEL_ADAPTATIONS = ("repeat", "mean")


def timm_model(src: Source, req: Request) -> dict:
    return {"name": need_model(src, req, "resnet18"), "img_size": req.img_size, "kwargs": {}}


def _first_conv(model: nn.Module) -> Optional[str]:
    name = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    name = name[0] if isinstance(name, (tuple, list)) else name
    return f"{name}.weight" if name else None


def adapt_channels(weight: torch.Tensor, in_chans: int, how: str) -> torch.Tensor:
    """A first-conv weight ``O×I×k×k`` for ``in_chans`` channels.

    ``repeat`` is timm's ``adapt_input_conv``: the source filters tiled over the new channels
    and scaled by ``I / in_chans`` (summed for one channel), so the summed response to inputs
    of similar statistics keeps its size. ``mean``: every channel gets the source filters' sum
    divided by ``in_chans`` (timm's single-channel sum, spread evenly): an image equal in every
    channel gives exactly the source's response to a grey image, and no channel is favoured.
    """
    if how == "repeat":
        return adapt_input_conv(in_chans, weight, base_chans=weight.shape[1])
    summed = adapt_input_conv(1, weight, base_chans=weight.shape[1])
    return (summed.float().repeat(1, in_chans, 1, 1) / in_chans).to(weight.dtype)


def timm_weights(src: Source, model: nn.Module, req: Request) -> dict[str, torch.Tensor]:
    weights = dict(src.state)
    if isinstance(model, VisionTransformer):
        # timm's own loader step: DINOv2 key conversion, position table resampled to this crop's grid
        before = weights.get("pos_embed")
        weights = checkpoint_filter_fn(weights, model)
        after = weights.get("pos_embed")
        if before is not None and after is not None and before.shape != after.shape:
            src.notes.append(f"pos_embed resampled {tuple(before.shape)} → {tuple(after.shape)} for the crop size")
    expected = model.state_dict()
    head = classifier_keys(model) | {k for k in weights if _is_head(model, k) and k not in expected}
    dropped = sorted(k for k in head if k in weights)
    if dropped:  # its classes are not this data's
        src.notes.append(f"classifier dropped: {', '.join(dropped)}")
        weights = {k: v for k, v in weights.items() if k not in head}
    conv = _first_conv(model)
    if conv in weights and conv in expected and weights[conv].ndim == 4:
        have, want = weights[conv].shape[1], expected[conv].shape[1]
        if have != want:
            if req.channels is None:
                raise CellrepError(
                    f"{req.setting}: the first convolution of {src.path} ({conv}) takes {have} channels; "
                    f"the data has {want}",
                    fix="choose an adaptation: encoder_channels=repeat (timm's adapt_input_conv: filters tiled "
                    f"and scaled by {have}/{want}) or encoder_channels=mean (their sum split evenly over the "
                    "channels); for task.init_from: task.init_channels=repeat|mean",
                )
            weights[conv] = adapt_channels(weights[conv], want, req.channels)
            src.notes.append(f"{conv}: {have} → {want} channels ({req.channels})")
    return weights


def _is_head(model: nn.Module, key: str) -> bool:
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (name,) if isinstance(name, str) else tuple(name)
    return any(key.startswith(f"{n}.") for n in names)


def is_timm(src: Source) -> bool:
    return src.config is None


# DINOv2 (facebookresearch/dinov2 keys): the timm architecture is guessed from the width, named by encoder_model
_DINOV2_WIDTHS = {
    384: "vit_small_patch14",
    768: "vit_base_patch14",
    1024: "vit_large_patch14",
    1536: "vit_giant_patch14",
}


def is_dinov2(src: Source) -> bool:
    return src.config is None and "mask_token" in src.state and "blocks.0.ls1.gamma" in src.state


def dinov2_model(src: Source, req: Request) -> dict:
    width = int(src.state["cls_token"].shape[-1]) if "cls_token" in src.state else 0
    regs = int(src.state["register_tokens"].shape[1]) if "register_tokens" in src.state else 0
    guess = f"{_DINOV2_WIDTHS.get(width, 'vit_small_patch14')}{f'_reg{regs}' if regs else ''}_dinov2"
    return {"name": need_model(src, req, guess), "img_size": req.img_size, "kwargs": {}}
