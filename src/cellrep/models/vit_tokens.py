"""The one token path of cellrep's ViTs: images → tokens, and tokens through the blocks.

The supervised context path (:mod:`cellrep.models.context`), the MAE encoder and
decoder (:mod:`cellrep.models.mae`) and the CA-ViT (:mod:`cellrep.models.ca_vit`)
all take their tokens from :func:`vit_tokens` and run blocks with
:func:`run_blocks` / :func:`block_outputs`, so they cannot drift apart, or away
from timm.

For a timm ``VisionTransformer``, :func:`vit_tokens` keeps the order of its
``forward_features``: ``patch_embed`` → ``_pos_embed`` (position embedding,
class/register tokens, ``pos_drop``) → ``patch_drop`` → ``norm_pre``. A CA-ViT's
:meth:`~cellrep.models.ca_vit.ChannelAgnosticViT.embed` is its whole stem: it
has no dropout or pre-norm between the embedding and the blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from cellrep.errors import CellrepError


def vit_tokens(
    vit: nn.Module, images: torch.Tensor, channel_ids: Optional[torch.Tensor] = None, drop_patches: bool = True
) -> torch.Tensor:
    """``B×C×H×W`` images → the tokens the first block sees, prefix (class/register) tokens first.

    ``drop_patches=False`` skips timm's patch dropout: MAE hides its own random
    tokens, and dropping more here would break the token order its decoder restores.
    ``channel_ids`` (CA-ViT only) maps input channels onto channel-embedding slots.
    """
    if getattr(vit, "channel_agnostic", False):
        return vit.embed(images, channel_ids)
    if channel_ids is not None:
        raise CellrepError(
            f"channel_ids was given to a {type(vit).__name__}, which embeds all channels together",
            fix="use a ca_vit_* model to pick channel slots, or leave channel_ids out",
        )
    x = vit._pos_embed(vit.patch_embed(images))
    if drop_patches:
        x = vit.patch_drop(x)
    return vit.norm_pre(x)


def block_outputs(
    blocks: Iterable[nn.Module], x: torch.Tensor, grad_checkpointing: bool = False
) -> Iterator[torch.Tensor]:
    """The tokens after each block in turn, for per-block features from one pass."""
    for blk in blocks:
        # checkpointing trades one extra forward per block for not storing its activations, which
        # only a pass that can be backpropagated would store
        x = checkpoint(blk, x, use_reentrant=False) if grad_checkpointing and torch.is_grad_enabled() else blk(x)
        yield x


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
    """The tokens after the last block."""
    for x in block_outputs(blocks, x, grad_checkpointing):  # only the last one is wanted
        pass
    return x
