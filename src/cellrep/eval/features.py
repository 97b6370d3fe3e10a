"""Pooled features of every block from ONE backbone pass (docs/benchmarks.md, "Per-block linear probing").

Probing N blocks must cost one forward pass per image, not N: timm's
``forward_intermediates`` returns every block's output (every stage for a
CNN) from a single pass, and each is pooled right away so only a vector per
block and image is kept. Pooling follows ViTally Consistent: for a
transformer block the mean of the patch tokens concatenated with the class
token; for a CNN stage the spatial mean.

**Cell-type context** (docs/FEWSHOT.md): a model trained with one is embedded with it
(:class:`SiteContext`). A ViT's context token joins the tokens right after the prefix
tokens, as in training (:mod:`cellrep.models.context`), runs through every block, and is
dropped from each block's output before the pooling above, so the features keep their
size and meaning. FiLM (a CNN) conditions the pooled features the classifier reads, after
the last stage: no block output is FiLM'd in training, so block features are not either.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from cellrep.errors import CellrepError
from cellrep.models.context import CellTypeContext, drop_context_token, insert_context_token
from cellrep.models.vit_tokens import block_outputs, vit_tokens


def block_names(backbone: nn.Module) -> list[str]:
    """Names of the probe-able blocks, in depth order (timm ``feature_info`` module names)."""
    info = getattr(backbone, "feature_info", None)
    if not hasattr(backbone, "forward_intermediates") or not info:
        raise CellrepError(
            f"backbone {type(backbone).__name__} does not expose per-block features",
            fix="use a timm model with forward_intermediates (ViTs, ResNets, ConvNeXts, ...)",
        )
    return [str(entry["module"]) if isinstance(entry, dict) else str(i) for i, entry in enumerate(info)]


def resolve_block(backbone: nn.Module, block: int | str) -> int:
    """A block given as an index (negative counts from the end) or a name → its index."""
    names = block_names(backbone)
    if isinstance(block, str) and block in names:
        return names.index(block)
    try:
        k = int(block)
    except (TypeError, ValueError):
        raise CellrepError(
            f"unknown block {block!r}", fix=f"use an index 0..{len(names) - 1}, 'best', or one of {names}"
        ) from None
    if not -len(names) <= k < len(names):
        raise CellrepError(
            f"block {k} is out of range: the backbone has {len(names)} blocks",
            fix=f"use 0..{len(names) - 1} (or -1 for the last)",
        )
    return k % len(names)


def _has_tokens(backbone: nn.Module) -> bool:
    return "return_prefix_tokens" in inspect.signature(backbone.forward_intermediates).parameters


@dataclass(frozen=True)
class SiteContext:
    """A model's cell-type context and the row of its table for each site (DataModule index row)."""

    module: CellTypeContext
    row_of_site: torch.Tensor  # (sites,) long: the table row of each index row's cell type

    @property
    def conditions_blocks(self) -> bool:
        """Whether block features take it: the token does, FiLM acts after the last block (module docstring)."""
        return self.module.mode == "token"

    def cell_types(self, rows, device) -> torch.Tensor:
        return self.row_of_site.to(device)[torch.as_tensor(rows, device=device).long()]


def _pool_tokens(backbone: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Patch-token mean ⊕ class token of one block's output (prefix tokens first)."""
    n = backbone.num_prefix_tokens
    parts = [tokens[:, n:].mean(dim=1)]
    if getattr(backbone, "cls_token", None) is not None and n > 0:
        parts.append(tokens[:, 0])
    return torch.cat(parts, dim=1)


def _context_block_features(
    backbone: nn.Module, images: torch.Tensor, indices: list[int] | None, token: torch.Tensor
) -> list[torch.Tensor]:
    """Like ``forward_intermediates`` (no final norm), with the context ``token`` in every block."""
    n = backbone.num_prefix_tokens
    x = insert_context_token(vit_tokens(backbone, images), token, n)
    wanted = range(len(backbone.blocks)) if indices is None else sorted(indices)
    pooled, last = [], max(wanted)
    for k, out in enumerate(block_outputs(backbone.blocks, x)):
        if k in wanted:
            pooled.append(_pool_tokens(backbone, drop_context_token(out, n)))
        if k == last:  # stop early: the deeper blocks are not wanted
            break
    return pooled


def pooled_block_features(
    backbone: nn.Module,
    images: torch.Tensor,
    indices: list[int] | None = None,
    context: CellTypeContext | None = None,
    cell_type_ids: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """One forward pass → per requested block a (B, D_b) pooled feature (see module docstring).

    ``context`` (with the images' ``cell_type_ids``): a token context joins every block; FiLM is ignored.
    """
    if context is not None and context.mode == "token":
        return _context_block_features(backbone, images, indices, context(cell_type_ids))
    stop = indices is not None
    if _has_tokens(backbone):
        outs = backbone.forward_intermediates(
            images,
            indices=indices,
            return_prefix_tokens=True,
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
            stop_early=stop,
        )
        has_cls = getattr(backbone, "cls_token", None) is not None
        pooled = []
        for tokens, prefix in outs:
            parts = [tokens.mean(dim=1)]
            if has_cls and prefix is not None and prefix.shape[1] > 0:
                parts.append(prefix[:, 0])
            pooled.append(torch.cat(parts, dim=1))
        return pooled
    outs = backbone.forward_intermediates(images, indices=indices, intermediates_only=True, stop_early=stop)
    return [o.float().mean(dim=(2, 3)) if o.ndim == 4 else o.float().flatten(1) for o in outs]


@dataclass
class BlockFeatures:
    """Per-site features: ``rows`` are rows of the DataModule index; ``features[name]`` is (N, D)."""

    rows: np.ndarray
    features: dict[str, np.ndarray]


@torch.inference_mode()
def extract_block_features(
    backbone: nn.Module,
    loader,
    blocks: list[int] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    context: SiteContext | None = None,
) -> BlockFeatures:
    """Run ``backbone`` once over ``loader`` (batches of ``{"image", "index"}``), pooling each block.

    A loader with a ``finish_batch`` (every CellDataModule loader) has each batch finished on ``device``
    (uint8 → normalized float32); any other loader must yield float images.

    ``blocks=None`` records every block; otherwise only those indices (and the
    pass stops after the deepest one). Rows come back sorted. ``context``: the model's cell-type
    context, picked per site by the batch's ``index`` (module docstring).
    """
    names = block_names(backbone)
    wanted = list(range(len(names))) if blocks is None else sorted({int(b) for b in blocks})
    backbone = backbone.eval().to(device)
    # a Linear map (no train/eval difference): a training task's module is moved, never switched to eval
    module = context.module.to(device) if context is not None and context.conditions_blocks else None
    # CellDataModule loaders hand out uint8 crops; their finish_batch normalizes on the device, exactly
    # as Lightning's on_after_batch_transfer does in training (cellrep.data.loading.datamodule)
    finish = getattr(loader, "finish_batch", None)
    rows, chunks = [], [[] for _ in wanted]
    for batch in tqdm(
        loader,
        desc=f"features ({len(wanted)} blocks, one pass)",
        disable=not progress,
        total=len(loader) if hasattr(loader, "__len__") else None,
    ):
        images = batch["image"].to(device)
        if finish is not None:
            images = finish({**batch, "image": images})["image"]
        elif not images.is_floating_point():
            raise CellrepError(
                f"the loader yields {images.dtype} images and has no finish_batch to normalize them",
                fix="pass a CellDataModule loader (dm.eval_dataloader(...)), or normalized float "
                "batches (dm.finish_batch(batch))",
            )
        ids = None if module is None else context.cell_types(batch["index"], images.device)
        feats = pooled_block_features(backbone, images, None if blocks is None else wanted, module, ids)
        for store, f in zip(chunks, feats):
            store.append(f.float().cpu().numpy())
        rows.append(np.asarray(batch["index"]))
    if not rows:
        raise CellrepError("the data loader yielded no images to embed", fix="check the split and the shards")
    rows = np.concatenate(rows)
    order = np.argsort(rows, kind="stable")
    features = {}
    for k, chunk in zip(wanted, chunks):  # one block at a time, its batches freed once joined: ~1× peak, not 2×
        features[names[k]] = np.concatenate(chunk)[order]
        chunk.clear()
    return BlockFeatures(rows[order], features)
