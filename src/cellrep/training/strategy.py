"""The Lightning strategy object for ``trainer.strategy``.

``fsdp`` (``trainer=fsdp``) becomes an ``FSDPStrategy`` that shards each
transformer block (timm ``Block``: ViT, CA-ViT, the MAE decoder) or residual
block (timm ResNet ``Bottleneck``/``BasicBlock``) as its own unit, so only one
block's full parameters are gathered at a time: without a wrap policy FSDP
treats the whole model as one unit and every rank gathers all of it (no memory
saved in forward, which is what ViT-G/8 needs). State dicts stay ``full``
(rank-0, one ``last.ckpt`` that resumes at any world size). Every other
strategy name passes through to Lightning unchanged.
"""

from __future__ import annotations

import logging

import torch.nn as nn
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.vision_transformer import Block

log = logging.getLogger(__name__)

WRAPPED_BLOCKS = (Block, Bottleneck, BasicBlock)


def trainer_strategy(name: str, model: nn.Module):
    """``name`` as Lightning takes it, or, for ``fsdp``, an FSDPStrategy wrapping ``model``'s blocks."""
    if name != "fsdp":
        return name
    from lightning.pytorch.strategies import FSDPStrategy

    blocks = {type(m) for m in model.modules() if isinstance(m, WRAPPED_BLOCKS)}
    if not blocks:
        log.warning(
            "FSDP: %s has none of the known block types (%s); the whole model is one FSDP unit",
            type(model).__name__,
            ", ".join(c.__name__ for c in WRAPPED_BLOCKS),
        )
    log.info("FSDP: one unit per %s", ", ".join(sorted(c.__name__ for c in blocks)) or "model")
    return FSDPStrategy(auto_wrap_policy=blocks or None, state_dict_type="full")
