"""Feeding a cell-type context vector to a backbone (docs/FEWSHOT.md; vectors from :mod:`cellrep.knowledge.context`).

* **ViTs** (timm ``VisionTransformer`` and the CA-ViT), for every task: the
  vector is projected to the embedding width and inserted as one extra token
  right after the prefix (class/register) tokens, so every block can attend to
  it (:func:`insert_context_token`). It gets no position embedding, and it is
  dropped again after the blocks (:func:`drop_context_token`), so ``avg``
  pooling still averages patch tokens only, an MAE decoder reconstructs
  patches only, and DINO's heads see the usual tokens. Supervised runs and
  DINO's crops go through :func:`context_tokens`; MAE inserts the token among
  the visible tokens of its encoder (:mod:`cellrep.models.mae`), so it is never
  masked.
* **Everything else** (CNNs, ``task=supervised`` only): FiLM on the pooled features,
  ``h ← h ⊙ (1 + γ(c)) + β(c)``, with ``γ, β`` one linear map of the vector,
  initialized to zero so training starts from the unconditioned network.

The backbone itself is untouched (same state-dict keys), so ``task.init_from``
and the evaluation tools load its weights as before; the projection lives in
this separate module (under ``context.``, or ``teacher.context.`` for DINO's
EMA teacher), which evaluation loads with the encoder to embed as it was trained
(:func:`cellrep.models.checkpoint.load_context`, :mod:`cellrep.eval.features`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cellrep.errors import CellrepError
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


def encoder_context(task: nn.Module) -> CellTypeContext | None:
    """The context that goes with a task's ``probe_backbone()`` (what evaluation and the probes embed
    with): the task's ``probe_context()`` when its encoder is not its trained module (DINO's teacher),
    else its ``context``; None for a run without one."""
    method = getattr(task, "probe_context", None)
    return method() if callable(method) else getattr(task, "context", None)


def token_context(table: torch.Tensor | None, backbone: nn.Module, task: str) -> CellTypeContext | None:
    """The context of a self-supervised task (``task=mae``, ``task=dino``): a token, so a ViT only."""
    if table is None:
        return None
    if not takes_context_token(backbone):
        raise CellrepError(
            f"task={task} takes the cell-type context as a token, and {type(backbone).__name__} has no token sequence",
            fix="use a ViT or CA-ViT (model=vit_s16, ca_vit_s16, ...), or drop model.context_path "
            "(a CNN takes the context by FiLM with task=supervised only)",
        )
    return CellTypeContext(table, backbone.num_features, "token")


def insert_context_token(tokens: torch.Tensor, token: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """``B×N×D`` tokens with the B×D context ``token`` inserted right after the prefix tokens."""
    return torch.cat([tokens[:, :num_prefix_tokens], token.to(tokens.dtype)[:, None], tokens[:, num_prefix_tokens:]], 1)


def drop_context_token(tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The inverse of :func:`insert_context_token`: the backbone's usual token sequence."""
    return torch.cat([tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens + 1 :]], dim=1)


def context_tokens(
    backbone: nn.Module,
    images: torch.Tensor,
    context: CellTypeContext | None = None,
    cell_type_ids: torch.Tensor | None = None,
    channel_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """What the ViT's ``forward_features`` returns (tokens after the final norm, prefix first), with the
    context token among them in every block and dropped from the output; without a (token) context,
    ``forward_features`` itself."""
    if context is None or context.mode == "film":
        return (
            backbone.forward_features(images) if channel_ids is None else backbone.forward_features(images, channel_ids)
        )
    n = backbone.num_prefix_tokens
    x = insert_context_token(vit_tokens(backbone, images, channel_ids), context(cell_type_ids), n)
    x = backbone.norm(run_blocks(backbone.blocks, x, backbone.grad_checkpointing))
    return drop_context_token(x, n)


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
    tokens = context_tokens(backbone, images, context, cell_type_ids, channel_ids)
    return backbone.forward_head(tokens, pre_logits=True)


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
