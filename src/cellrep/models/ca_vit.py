"""Channel-agnostic ViT (CA-ViT): one set of weights for any number of channels.

Microscopy sources disagree on channels (RxRx1 has 6, JUMP 5, some in-house
screens 3 or 11). A CA-ViT tokenizes every channel separately with one shared
single-channel patch embedding, so a site of C channels on an h×w patch grid
becomes C·h·w tokens. Each token gets

* the fixed 2-D sin-cos embedding of its grid position (the same for every
  channel, so nothing about position has to be learned per channel), and
* a learned embedding of its channel slot (``channel_embed[c]``, up to
  ``max_channels`` slots), so attention can tell stains apart.

Inputs may have any size divisible by the patch: the position table is built
from the grid of each batch. The interface mirrors timm's ``VisionTransformer``
(``forward_features``, ``forward_head``, ``forward_intermediates``,
``set_grad_checkpointing``, ``reset_classifier``) and the models are registered
with timm (``ca_vit_small_patch16`` etc.), so training, probing and MAE code
need not care which of the two they hold.
"""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
from functools import partial
from typing import Optional, Union

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, register_model
from timm.models._features import feature_take_indices
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import Block, ParallelScalingBlock

from cellrep.errors import CellrepError
from cellrep.models.vit import sincos_pos_embed
from cellrep.models.vit_tokens import block_outputs, run_blocks, vit_tokens

_BLOCKS = {"standard": Block, "parallel": ParallelScalingBlock}


class ChannelAgnosticViT(nn.Module):
    """ViT over per-channel patch tokens; accepts 1 to ``max_channels`` channels with the same weights."""

    channel_agnostic = True
    num_prefix_tokens = 1  # the class token

    def __init__(
        self,
        patch_size: int = 16,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        max_channels: int = 16,
        drop_path_rate: float = 0.0,
        in_chans: Optional[int] = None,
        img_size: Optional[int] = None,
        # the structure of published CA-MAE encoders (OpenPhenom: cellrep.models.pretrained); defaults: cellrep's own
        block: str = "standard",  # "parallel": timm's ParallelScalingBlock (attention and MLP from one in-projection)
        qk_norm: bool = False,  # LayerNorm of queries and keys per head
        init_values: Optional[float] = None,  # LayerScale of each block's residual branch (None: none)
        final_norm: bool = True,  # false: no LayerNorm after the last block (OpenPhenom's encoder applies none)
        pos_layout: str = "timm",  # sin-cos quarters: "timm" [sin h|sin w|cos h|cos w], "hw" [sin h|cos h|sin w|cos w]
    ):
        # in_chans / img_size are accepted (timm passes them) and not needed: any count and size work.
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise CellrepError(f"unknown global_pool '{global_pool}' for a CA-ViT", fix="use 'token' or 'avg'")
        if block not in _BLOCKS or pos_layout not in ("timm", "hw"):
            raise CellrepError(
                f"unknown CA-ViT block '{block}' or pos_layout '{pos_layout}'",
                fix=f"use block one of {list(_BLOCKS)} and pos_layout 'timm' or 'hw'",
            )
        self.pos_layout = pos_layout
        self.patch_size, self.embed_dim, self.num_features = patch_size, embed_dim, embed_dim
        self.max_channels, self.global_pool, self.num_classes = max_channels, global_pool, num_classes
        self.grad_checkpointing = False
        # slots of the input channels when a call passes no channel_ids: evaluation on another screen's
        # channels or a subset (set by cellrep.eval.channels); not saved, None: slot c for channel c
        self.input_channel_ids: Optional[torch.Tensor] = None
        self.patch_embed = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.channel_embed = nn.Parameter(torch.zeros(max_channels, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # stochastic depth, linear in depth
        self.blocks = nn.Sequential(
            *[
                _BLOCKS[block](
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    # a parallel block's one in-projection bias covers MLP and q/k/v alike
                    qkv_bias=True,
                    qk_norm=qk_norm,
                    init_values=init_values,
                    drop_path=rate,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),
                )
                for rate in rates
            ]
        )
        # per-block features, listed as timm's VisionTransformer does (cellrep.eval.features probes them)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if final_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.channel_embed, std=0.02)
        trunc_normal_(self.cls_token, std=1e-6)
        # a patch embedding initialized like a linear layer (MAE does the same)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.embed_dim, -1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- tokens -----------------------------------------------------------------------------------
    def channel_slots(self, num_channels: int, channel_ids: Optional[torch.Tensor], device) -> torch.Tensor:
        """The channel-embedding slot of each input channel (default: ``input_channel_ids``, else slot c
        for channel c)."""
        if channel_ids is None:
            channel_ids = self.input_channel_ids
        if channel_ids is None:
            if num_channels > self.max_channels:
                raise CellrepError(
                    f"the input has {num_channels} channels; this CA-ViT has {self.max_channels} channel slots",
                    fix="build it with model.kwargs.max_channels=<at least C>",
                )
            return torch.arange(num_channels, device=device)
        if channel_ids.numel() != num_channels:
            raise CellrepError(f"channel_ids names {channel_ids.numel()} channels, the input has {num_channels}")
        return channel_ids.to(device)

    def embed(self, x: torch.Tensor, channel_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``B×C×H×W`` → ``B × (1 + C·h·w) × D`` tokens (class token first, then channel-major)."""
        B, C, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise CellrepError(
                f"input {H}×{W} is not divisible by the patch size {p}",
                fix="use a data.crop_size that is a multiple of the patch size",
            )
        tokens = self.patch_embed(x.reshape(B * C, 1, H, W))  # one shared embedding for every channel
        h, w = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2).reshape(B, C, h * w, self.embed_dim)
        pos = sincos_pos_embed((h, w), self.embed_dim, device=x.device, dtype=tokens.dtype)
        if self.pos_layout == "hw":  # the same table with its quarters in maes_microscopy's order
            sin_h, sin_w, cos_h, cos_w = pos.chunk(4, dim=-1)
            pos = torch.cat([sin_h, cos_h, sin_w, cos_w], dim=-1)
        chan = self.channel_embed[self.channel_slots(C, channel_ids, x.device)].to(tokens.dtype)
        tokens = tokens + pos[None, None] + chan[None, :, None]
        cls = self.cls_token.to(tokens.dtype).expand(B, -1, -1)
        return torch.cat([cls, tokens.reshape(B, C * h * w, self.embed_dim)], dim=1)

    # -- timm interface ---------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, channel_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = vit_tokens(self, x, channel_ids)
        return self.norm(run_blocks(self.blocks, x, self.grad_checkpointing))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens :].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, channel_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, channel_ids))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NLC",
        intermediates_only: bool = False,
        channel_ids: Optional[torch.Tensor] = None,
    ):
        """timm's contract: the tokens after each chosen block (all blocks when ``indices`` is None).

        Returns ``B × C·h·w × D`` patch tokens per block (``(tokens, class token)``
        pairs with ``return_prefix_tokens``); with ``intermediates_only=False``
        also the final normed tokens first. Only ``NLC``: C·h·w tokens have no
        single spatial grid.
        """
        if output_fmt != "NLC":
            raise CellrepError(
                f"a CA-ViT returns intermediates as NLC only (asked for {output_fmt})", fix="pass output_fmt='NLC'"
            )
        take, last = feature_take_indices(len(self.blocks), indices)
        x = vit_tokens(self, x, channel_ids)
        blocks = self.blocks[: last + 1] if stop_early else self.blocks
        intermediates = []
        for i, x in enumerate(block_outputs(blocks, x, self.grad_checkpointing)):
            if i in take:
                y = self.norm(x) if norm else x
                tokens, prefix = y[:, self.num_prefix_tokens :], y[:, : self.num_prefix_tokens]
                intermediates.append((tokens, prefix) if return_prefix_tokens else tokens)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "channel_embed"}


default_cfgs = generate_default_cfgs(
    {
        name: {
            "url": "",
            "num_classes": 0,
            "input_size": (6, 256, 256),
            "fixed_input_size": False,
            "first_conv": "patch_embed",
            "classifier": "head",
            "mean": (0.0,),
            "std": (1.0,),
        }
        for name in ("ca_vit_small_patch16", "ca_vit_base_patch16", "ca_vit_large_patch16", "ca_vit_large_patch8")
    }
)


def _create(variant: str, pretrained: bool, **kwargs) -> ChannelAgnosticViT:
    if pretrained:
        raise CellrepError(
            f"{variant} has no published weights",
            fix="pretrain it with task=mae, then fine-tune with task.init_from=<checkpoint>",
        )
    return build_model_with_cfg(ChannelAgnosticViT, variant, pretrained=False, **kwargs)


@register_model
def ca_vit_small_patch16(pretrained: bool = False, **kwargs) -> ChannelAgnosticViT:
    return _create(
        "ca_vit_small_patch16", pretrained, **dict(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs)
    )


@register_model
def ca_vit_base_patch16(pretrained: bool = False, **kwargs) -> ChannelAgnosticViT:
    return _create(
        "ca_vit_base_patch16", pretrained, **dict(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs)
    )


@register_model
def ca_vit_large_patch16(pretrained: bool = False, **kwargs) -> ChannelAgnosticViT:
    return _create(
        "ca_vit_large_patch16",
        pretrained,
        **dict(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), **kwargs),
    )


@register_model
def ca_vit_large_patch8(pretrained: bool = False, **kwargs) -> ChannelAgnosticViT:
    return _create(
        "ca_vit_large_patch8", pretrained, **dict(dict(patch_size=8, embed_dim=1024, depth=24, num_heads=16), **kwargs)
    )
