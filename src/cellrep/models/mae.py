"""Masked autoencoder (He et al. 2022) around a timm ViT or a CA-ViT encoder.

The encoder is the very backbone a supervised run builds (``num_classes=0``),
so its state dict loads into one unchanged (:mod:`cellrep.models.checkpoint`).
Per sample, a random ``mask_ratio`` of the patch tokens is dropped *before* the
encoder, which therefore runs on the visible quarter only (that is where MAE's
speed comes from); a light decoder fills the sequence with a learned mask token,
adds fixed sin-cos positions, and predicts the pixels of every token.

Tokens and pixels line up through :meth:`MaskedAutoencoder.patchify`:

* timm ViT: a token is a p×p patch of all C channels → ``p·p·C`` pixels;
* CA-ViT: a token is a p×p patch of one channel → ``p·p`` pixels, tokens
  ordered channel-major, and masking runs over all channel-tokens.

Nothing assumes 3 channels.

A cell-type context token (:mod:`cellrep.models.context`), when given, joins the
*visible* tokens right after the prefix tokens, so it is never masked, and is
dropped from the encoder output before the decoder: ``latent`` and the
decoder's input hold the prefix and visible patch tokens only, and the decoder
reconstructs patches only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from cellrep.errors import CellrepError
from cellrep.models.context import drop_context_token, insert_context_token
from cellrep.models.vit import fix_pos_embed_to_sincos, patch_size_of, sincos_pos_embed
from cellrep.models.vit_tokens import run_blocks, vit_tokens


@dataclass
class MAEOutput:
    pred: torch.Tensor  # B×L×K predicted pixels of every token (in the loss's target space)
    mask: torch.Tensor  # B×L, 1 where the token was hidden from the encoder
    latent: Optional[torch.Tensor] = None  # B×(prefix+visible)×D encoder output (graph losses pool it)


def random_masking(num_tokens: int, keep: int, batch: int, device, generator: Optional[torch.Generator] = None):
    """Per sample, a random subset of ``keep`` token positions; returns (ids_keep B×keep, ids_restore B×L)."""
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    return ids_shuffle[:, :keep], ids_shuffle.argsort(dim=1)


class MAEDecoder(nn.Module):
    """Transformer decoder over the full token sequence: visible latents + mask tokens → pixels per token."""

    def __init__(
        self,
        encoder_dim: int,
        pixels_per_token: int,
        dim: int = 512,
        depth: int = 8,
        heads: int = 16,
        num_prefix_tokens: int = 1,
        max_channels: Optional[int] = None,
    ):
        super().__init__()
        self.dim, self.num_prefix_tokens = dim, num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # CA-ViT: tokens of different channels share a grid position, so the decoder needs to know the channel too
        self.channel_embed = nn.Parameter(torch.zeros(max_channels, dim)) if max_channels else None
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, pixels_per_token)
        trunc_normal_(self.mask_token, std=0.02)
        if self.channel_embed is not None:
            trunc_normal_(self.channel_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def positions(
        self, grid: tuple[int, int], channels: int, device, dtype, channel_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        pos = sincos_pos_embed(grid, self.dim, device=device, dtype=dtype)
        if self.channel_embed is None:
            return pos
        slots = channel_ids.to(device) if channel_ids is not None else torch.arange(channels, device=device)
        chan = self.channel_embed[slots].to(dtype)
        return (pos[None] + chan[:, None]).reshape(channels * pos.shape[0], self.dim)

    def forward(
        self,
        latent: torch.Tensor,
        ids_restore: torch.Tensor,
        grid: tuple[int, int],
        channels: int,
        grad_checkpointing: bool = False,
        channel_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        x = self.embed(latent)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        B, L = ids_restore.shape
        tokens = torch.cat([visible, self.mask_token.to(x.dtype).expand(B, L - visible.shape[1], -1)], dim=1)
        tokens = tokens.gather(1, ids_restore[..., None].expand(-1, -1, self.dim))  # back to token order
        tokens = tokens + self.positions(grid, channels, x.device, x.dtype, channel_ids)
        x = run_blocks(self.blocks, torch.cat([prefix, tokens], dim=1), grad_checkpointing)
        return self.pred(self.norm(x))[:, self.num_prefix_tokens :]


class MaskedAutoencoder(nn.Module):
    """Encoder (timm ViT or CA-ViT, built elsewhere) + :class:`MAEDecoder`."""

    def __init__(
        self,
        encoder: nn.Module,
        in_chans: int,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.encoder, self.in_chans, self.grad_checkpointing = encoder, in_chans, grad_checkpointing
        self.patch_size = patch_size_of(encoder)
        self.channel_agnostic = bool(getattr(encoder, "channel_agnostic", False))
        self.num_prefix_tokens = encoder.num_prefix_tokens
        if not self.channel_agnostic:
            fix_pos_embed_to_sincos(encoder)
        p = self.patch_size
        self.decoder = MAEDecoder(
            encoder.embed_dim,
            p * p if self.channel_agnostic else p * p * in_chans,
            decoder_dim,
            decoder_depth,
            decoder_heads,
            self.num_prefix_tokens,
            encoder.max_channels if self.channel_agnostic else None,
        )

    # -- pixels <-> tokens ----------------------------------------------------------------------
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``B×C×H×W`` → ``B×L×K`` pixels in the encoder's token order."""
        B, C, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise CellrepError(
                f"MAE input {H}×{W} is not divisible by the patch size {p}",
                fix="use a data.crop_size that is a multiple of the patch size",
            )
        x = images.reshape(B, C, H // p, p, W // p, p)
        if self.channel_agnostic:  # token (c, i, j) holds channel c of patch (i, j)
            return x.permute(0, 1, 2, 4, 3, 5).reshape(B, C * (H // p) * (W // p), p * p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, patches: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        B, C, H, W = shape
        p, h, w = self.patch_size, H // self.patch_size, W // self.patch_size
        if self.channel_agnostic:
            return patches.reshape(B, C, h, w, p, p).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H, W)
        return patches.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)

    # -- encoder ---------------------------------------------------------------------------------
    def encode(
        self,
        images: torch.Tensor,
        mask_ratio: float,
        generator: Optional[torch.Generator] = None,
        channel_ids: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
    ):
        """Encode a random ``1 - mask_ratio`` of the tokens; returns (latent, ids_restore, mask).

        ``channel_ids`` (CA-ViT): the channel slots of the input's channels (a sampled subset).
        ``context``: B×D cell-type context tokens (module docstring), absent from ``latent``."""
        tokens = vit_tokens(
            self.encoder, images, channel_ids, drop_patches=False
        )  # the masking below is MAE's patch dropout
        prefix, patches = tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens :]
        B, L, D = patches.shape
        keep = max(1, int(round(L * (1 - mask_ratio))))
        ids_keep, ids_restore = random_masking(L, keep, B, images.device, generator)
        visible = patches.gather(1, ids_keep[..., None].expand(-1, -1, D))
        x = torch.cat([prefix, visible], dim=1)
        if context is not None:
            x = insert_context_token(x, context, self.num_prefix_tokens)
        x = self.encoder.norm(run_blocks(self.encoder.blocks, x, self.grad_checkpointing))
        if context is not None:
            x = drop_context_token(x, self.num_prefix_tokens)
        mask = torch.ones(B, L, device=images.device, dtype=images.dtype)
        mask[:, :keep] = 0
        return x, ids_restore, mask.gather(1, ids_restore)

    def forward(
        self,
        images: torch.Tensor,
        mask_ratio: float = 0.75,
        generator: Optional[torch.Generator] = None,
        channel_ids: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
    ) -> MAEOutput:
        latent, ids_restore, mask = self.encode(images, mask_ratio, generator, channel_ids, context)
        _, C, H, W = images.shape
        grid = (H // self.patch_size, W // self.patch_size)
        chans = C if self.channel_agnostic else 1
        pred = self.decoder(latent, ids_restore, grid, chans, self.grad_checkpointing, channel_ids)
        return MAEOutput(pred=pred, mask=mask, latent=latent)
