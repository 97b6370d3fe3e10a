"""Build any timm backbone by name for ``in_chans`` microscopy channels.

Nothing is downloaded: models are always built with random weights
(``pretrained=False``); pretrained encoders come from cellrep checkpoints.
"""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import difflib
from typing import Any

import timm
import torch.nn as nn

from cellrep.errors import CellrepError


def check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise CellrepError(
        f"unknown model '{name}'",
        fix=f"{hint}use a timm model name (python -c \"import timm; print(timm.list_models('vit*'))\") "
        "or a config from model/ (model=resnet50, model=vit_s16, ...)",
    )


def accepts_img_size(name: str) -> bool:
    """ViT-like models fix their input size at construction; CNNs do not."""
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    return bool(cfg is not None and cfg.fixed_input_size)


def build_backbone(
    name: str,
    in_chans: int,
    num_classes: int = 0,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """A timm model taking ``in_chans`` channels; ``num_classes=0`` gives pooled features."""
    check_model_name(name)
    if img_size is not None and accepts_img_size(name):
        kwargs["img_size"] = img_size
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise CellrepError(
            f"model '{name}' rejected its arguments: {exc}", fix="remove the offending key from model.kwargs"
        ) from None
