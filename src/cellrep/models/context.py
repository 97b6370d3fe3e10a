"""Feeding a cell-type context vector to a backbone (docs/FEWSHOT.md; vectors from :mod:`cellrep.knowledge.context`).

* **ViTs** (timm ``VisionTransformer`` and the CA-ViT): the vector is projected
  to the embedding width and inserted as one extra token right after the
  prefix (class/register) tokens, so every block can attend to it. It gets no
  position embedding, and it is dropped again before pooling, so ``avg``
  pooling still averages patch tokens only.
* **Everything else** (CNNs): FiLM on the pooled features,
  ``h ← h ⊙ (1 + γ(c)) + β(c)``, with ``γ, β`` one linear map of the vector,
  initialized to zero so training starts from the unconditioned network.

The backbone itself is untouched (same state-dict keys), so ``task.init_from``
and the evaluation tools load its weights as before; the projection lives in
this separate module.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cellrep.models.ca_vit import ChannelAgnosticViT
from cellrep.models.vit_tokens import run_blocks, vit_tokens


def takes_context_token(backbone: nn.Module) -> bool:
    """True for the ViTs whose token sequence we can extend (timm ViT, CA-ViT)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(backbone, (VisionTransformer, ChannelAgnosticViT))


class CellTypeContext(nn.Module):
    """A fixed table of context vectors (one row per cell type) and its learned projection."""

    def __init__(self, table: torch.Tensor, embed_dim: int, mode: str):
        super().__init__()
        if mode not in ("token", "film"):
            raise ValueError(f"unknown context mode {mode!r}")
        self.mode = mode
        # not persistent: a checkpoint may be tested on a table that also describes a new cell type
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32), persistent=False)
        k = self.table.shape[1]
        self.proj = nn.Linear(k, embed_dim if mode == "token" else 2 * embed_dim)
        if mode == "film":
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            nn.init.trunc_normal_(self.proj.weight, std=0.02)
            nn.init.zeros_(self.proj.bias)

    def forward(self, cell_type_ids: torch.Tensor) -> torch.Tensor:
        """B×D tokens (mode ``token``) or B×2D FiLM parameters (mode ``film``)."""
        return self.proj(self.table[cell_type_ids])

    def film(self, features: torch.Tensor, cell_type_ids: torch.Tensor) -> torch.Tensor:
        gamma, beta = self(cell_type_ids).to(features.dtype).chunk(2, dim=1)
        return features * (1 + gamma) + beta


def pooled_features(
    backbone: nn.Module,
    images: torch.Tensor,
    context: CellTypeContext | None = None,
    cell_type_ids: torch.Tensor | None = None,
    channel_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The backbone's pre-logit features (B×D), conditioned on the cell types' context when given.

    ``channel_ids`` (CA-ViT only): the channel slots of the images' channels (a sampled subset).

    For FiLM the returned features are the unconditioned encoder output; apply
    :meth:`CellTypeContext.film` before the classifier (see :func:`classify`).
    """
    if context is None or context.mode == "film":
        tokens = (
            backbone.forward_features(images) if channel_ids is None else backbone.forward_features(images, channel_ids)
        )
        return backbone.forward_head(tokens, pre_logits=True)
    x = vit_tokens(backbone, images, channel_ids)
    n = backbone.num_prefix_tokens
    token = context(cell_type_ids).to(x.dtype)[:, None]
    x = torch.cat([x[:, :n], token, x[:, n:]], dim=1)
    x = backbone.norm(run_blocks(backbone.blocks, x, backbone.grad_checkpointing))
    x = torch.cat([x[:, :n], x[:, n + 1 :]], dim=1)  # pooling sees the usual tokens
    return backbone.forward_head(x, pre_logits=True)


def classify(
    backbone: nn.Module,
    features: torch.Tensor,
    context: CellTypeContext | None = None,
    cell_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits from pooled features through the backbone's own classifier (after FiLM, for CNNs)."""
    if context is not None and context.mode == "film":
        features = context.film(features, cell_type_ids)
    return backbone.get_classifier()(features)
