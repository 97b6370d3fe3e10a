"""Masked-autoencoder pretraining (``task=mae``) on any shard set.

Labels in the batch are ignored (except by the optional graph prior): MAE needs
only ``batch["image"]``, and ``batch["index"]`` with a context. The
encoder is the backbone a supervised run would build, kept under
``mae.encoder.`` in checkpoints, which ``task.init_from`` loads for fine-tuning.

With ``model.context_path`` (docs/FEWSHOT.md) every image's cell-type vector,
projected by ``context`` (outside the encoder, so the encoder's keys are
unchanged), is one more visible token of the encoder: never masked, and not
seen by the decoder (:mod:`cellrep.models.mae`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info

from cellrep.knowledge.graph_loss import graph_loss, register_graph
from cellrep.models.backbone import build_backbone
from cellrep.models.context import token_context
from cellrep.models.mae import MaskedAutoencoder
from cellrep.training.callbacks.reconstructions import ReconstructionImages
from cellrep.training.tasks.base import NonFiniteLossError, Task
from cellrep.training.tasks.mae_loss import mae_loss


class MAETask(Task):
    """MAE with per-patch-normalized masked MSE + Fourier-magnitude loss (see :mod:`cellrep.training.tasks.mae_loss`)."""

    def __init__(
        self,
        model: dict[str, Any],
        in_chans: int,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        fourier_weight: float = 0.01,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        grad_checkpointing: bool = False,
        compile: bool = False,
        reconstructions_every_n_steps: int = 500,
        graph_loss: str = "none",
        graph_weight: float = 0.0,
        graph_temperature: float = 0.1,
        graph_weights: Optional[torch.Tensor] = None,
        graph_present: Optional[torch.Tensor] = None,
        group_of_index: Optional[torch.Tensor] = None,
        context_table: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["graph_weights", "graph_present", "group_of_index", "context_table"])
        register_graph(self, graph_loss, graph_weights, graph_present)
        encoder = build_backbone(
            model["name"],
            in_chans=in_chans,
            num_classes=0,
            img_size=model.get("img_size"),
            drop_path_rate=model.get("drop_path_rate", 0.0),
            **dict(model.get("kwargs") or {}),
        )
        self.mae = MaskedAutoencoder(
            encoder, in_chans, decoder_dim, decoder_depth, decoder_heads, grad_checkpointing=grad_checkpointing
        )
        self.context = token_context(context_table, encoder, "mae")
        self.register_groups(group_of_index)
        if compile:
            # Per block, in place: the hot path (attention + MLP) gets fused kernels while masking's
            # data-dependent gathers stay eager, and state-dict keys keep their names (no ``_orig_mod.``).
            for block in [*self.mae.encoder.blocks, *self.mae.decoder.blocks]:
                block.compile()

    def forward(
        self,
        images: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        labels: Optional[torch.Tensor] = None,
        channel_ids: Optional[torch.Tensor] = None,
        index: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """MAE losses; with ``labels`` and a ``graph_loss``, also the graph loss on the pooled encoder
        features (mean of the visible patch tokens), added to ``loss`` with ``graph_weight``.
        ``channel_ids``: the channel slots of a channel-sampled batch (data.channel_sampling, CA-ViT);
        ``index``: the batch's rows of the DataModule index, whose cell types pick the context vectors."""
        out = self.mae(images, self.hparams.mask_ratio, generator, channel_ids, self._context(index))
        losses = mae_loss(
            out.pred,
            self.mae.patchify(images),
            out.mask,
            self.mae.patch_size,
            norm_pix=self.hparams.norm_pix_loss,
            fourier_weight=self.hparams.fourier_weight,
        )
        if labels is not None and self.hparams.graph_loss != "none":
            pooled = out.latent[:, self.mae.num_prefix_tokens :].mean(dim=1)
            losses["graph"] = graph_loss(
                self.hparams.graph_loss,
                pooled,
                labels,
                self.graph_weights,
                self.graph_present,
                self.hparams.graph_temperature,
            )
            losses["loss"] = losses["loss"] + self.hparams.graph_weight * losses["graph"]
        return losses

    def _context(self, index: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """B×D context tokens of the samples at ``index`` (None without a context)."""
        cell_types = self.cell_types_at(index, self.context)
        return None if cell_types is None else self.context(cell_types)

    def on_fit_start(self) -> None:
        enc, dec = (sum(p.numel() for p in m.parameters()) for m in (self.mae.encoder, self.mae.decoder))
        p, chans = self.mae.patch_size, self.hparams.in_chans
        size = getattr(self.trainer.datamodule, "crop_size", None)
        if size:
            tokens = (size // p) ** 2 * (chans if self.mae.channel_agnostic else 1)
            visible = max(1, round(tokens * (1 - self.hparams.mask_ratio)))
            rank_zero_info(
                f"MAE: {chans} channels × {size}px, patch {p} → {tokens} tokens/image, {visible} visible "
                f"(mask {self.hparams.mask_ratio:g}); encoder {enc / 1e6:.1f}M, decoder {dec / 1e6:.1f}M "
                f"parameters; Fourier weight {self.hparams.fourier_weight:g}"
            )

    def training_step(self, batch, batch_idx):
        losses = self(
            batch["image"], labels=batch.get("label"), channel_ids=batch.get("channel_ids"), index=batch.get("index")
        )
        if not torch.isfinite(losses["loss"]):
            raise NonFiniteLossError(
                f"MAE loss became {losses['loss'].item()} at step {self.global_step} "
                f"(mse {losses['mse'].item()}); the last good checkpoint is kept",
                fix="lower task.optimizer.base_lr, set trainer.gradient_clip_val=1.0, or use precision=32-true",
            )
        self._log("train", losses, batch["image"].shape[0])
        return losses["loss"]

    def _fixed_masks(self, batch_idx: int, device) -> torch.Generator:
        # the same masks every evaluation, so val/loss moves only because the model does
        return torch.Generator(device=device).manual_seed(batch_idx)

    def _eval_losses(self, batch, batch_idx) -> dict[str, torch.Tensor]:
        masks = self._fixed_masks(batch_idx, batch["image"].device)
        return self(batch["image"], masks, channel_ids=batch.get("channel_ids"), index=batch.get("index"))

    def validation_step(self, batch, batch_idx):
        self._log("val", self._eval_losses(batch, batch_idx), batch["image"].shape[0])

    def test_step(self, batch, batch_idx):
        self._log("test", self._eval_losses(batch, batch_idx), batch["image"].shape[0])

    def _log(self, stage: str, losses: dict[str, torch.Tensor], n: int) -> None:
        for name, value in losses.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "loss", sync_dist=stage != "train", batch_size=n)

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, generator: Optional[torch.Generator] = None, index: Optional[torch.Tensor] = None
    ) -> dict[str, torch.Tensor]:
        """Images for eyes: ``target``, ``reconstruction`` (visible pixels + predicted masked ones), ``mask``.

        With a context, ``index`` (the batch's rows; the pictures' callback passes them) picks each
        image's token; without ``index`` the encoder runs without it: a picture, not a measurement."""
        context = self._context(index) if index is not None else None
        out = self.mae(images, self.hparams.mask_ratio, generator, context=context)
        patches = self.mae.patchify(images).float()
        pred = out.pred.float()
        if self.hparams.norm_pix_loss:  # predictions are standardized patches: undo with the true patch stats
            std = (patches.var(dim=-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
            pred = pred * std + patches.mean(dim=-1, keepdim=True)
        mask = self.mae.unpatchify(out.mask[..., None].expand_as(patches), images.shape) > 0.5
        recon = torch.where(mask, self.mae.unpatchify(pred, images.shape), images.float())
        return {"target": images.float(), "reconstruction": recon, "mask": mask}

    def configure_callbacks(self):
        n = self.hparams.reconstructions_every_n_steps
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"  # images are drawn while training
        return [ReconstructionImages(every_n_steps=n)] if fitting and n and n > 0 else []

    def probe_backbone(self) -> torch.nn.Module:
        """The encoder, what ``task.init_from`` hands on: ``callbacks.block_probes.BlockProbes`` probes its blocks."""
        return self.mae.encoder
