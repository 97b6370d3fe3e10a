"""SimCLR contrastive pretraining (``task=simclr``, Chen et al. 2020): two views of a site attract, all others repel.

Each batch image becomes two views, made on the device: a random resized crop at the input size
with random flips (:func:`cellrep.training.tasks.dino_views.random_resized_crops`, DINO's global
crops) and a per-channel intensity jitter, the microscopy stand-in for colour jitter (a stain's
brightness varies between wells and plates; without it the two views of a site could be matched
by their channel intensities alone). Both views go through the backbone to its pooled features
(:func:`cellrep.models.context.pooled_features`, as the supervised task) and a projector MLP; the
loss is NT-Xent over the 2N views (:mod:`cellrep.training.tasks.simclr_loss`), with every rank's
views as negatives under DDP / FSDP. Labels are ignored, except by the optional graph prior.

**The encoder** is the backbone, under ``backbone.`` in checkpoints, as in a supervised run: so
``cellrep-probe``, ``cellrep-eval``, ``task.init_from`` and the per-block probes read it unchanged;
the projector is thrown away after pretraining, as in SimCLR.

**Cell-type context** (``model.context_path``): exactly as the supervised task conditions its
classifier, a ViT gets the context token in its sequence and a CNN FiLM on its pooled features,
here before the projector.

**Graph prior** (``task.graph_loss``): on the encoder's pooled embedding of a site, the mean of its
two views' pooled features (before FiLM, as in the supervised task), added with ``graph_weight``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info

from cellrep.knowledge.graph_loss import graph_loss, register_graph
from cellrep.models.backbone import build_backbone
from cellrep.models.context import CellTypeContext, pooled_features, takes_context_token
from cellrep.training.tasks.base import NonFiniteLossError, Task
from cellrep.training.tasks.dino_loss import spread
from cellrep.training.tasks.dino_views import random_resized_crops
from cellrep.training.tasks.simclr_loss import Projector, nt_xent


def intensity_jitter(
    images: torch.Tensor, strength: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Per image and channel ``x ← a·x + b`` with ``a`` uniform in [1−s, 1+s] and ``b`` in [−s, s]
    (``s = strength``, in units of the normalized image: one standard deviation of the plate's pixels)."""
    if strength <= 0:
        return images
    shape = (images.shape[0], images.shape[1], 1, 1)
    scale = 1 + strength * (2 * torch.rand(shape, device=images.device, generator=generator) - 1)
    shift = strength * (2 * torch.rand(shape, device=images.device, generator=generator) - 1)
    return (images.float() * scale + shift).to(images.dtype)


class SimCLRTask(Task):
    """NT-Xent between two augmented views of each site, on any timm backbone (module docstring).

    ``group_of_index`` maps a batch's ``index`` rows to cell-type ids, ``context_table`` holds one
    context vector per cell type (``build_task`` passes both when ``model.context_path`` is set).
    """

    def __init__(
        self,
        model: dict[str, Any],
        in_chans: int,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        projector_hidden_dim: int = 2048,
        projector_dim: int = 128,
        temperature: float = 0.1,
        crops_scale: tuple[float, float] = (0.32, 1.0),
        intensity_jitter: float = 0.2,
        group_of_index: Optional[torch.Tensor] = None,
        context_table: Optional[torch.Tensor] = None,
        graph_loss: str = "none",
        graph_weight: float = 0.0,
        graph_temperature: float = 0.1,
        graph_weights: Optional[torch.Tensor] = None,
        graph_present: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["group_of_index", "context_table", "graph_weights", "graph_present"])
        register_graph(self, graph_loss, graph_weights, graph_present)
        self.backbone = build_backbone(
            model["name"],
            in_chans=in_chans,
            num_classes=0,
            img_size=model.get("img_size"),
            drop_path_rate=model.get("drop_path_rate", 0.0),
            **dict(model.get("kwargs") or {}),
        )
        self.projector = Projector(self.backbone.num_features, projector_hidden_dim, projector_dim)
        self.register_groups(group_of_index)
        self.context = None
        if context_table is not None:
            mode = "token" if takes_context_token(self.backbone) else "film"
            self.context = CellTypeContext(context_table, self.backbone.num_features, mode)

    def views(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``B×C×H×W`` → ``2B×C×H×W``: view 1 of every image, then view 2 (module docstring)."""
        h, size = self.hparams, images.shape[-1]
        crops = (random_resized_crops(images, size, tuple(h.crops_scale), generator) for _ in range(2))
        return torch.cat([intensity_jitter(crop, h.intensity_jitter, generator) for crop in crops])

    def forward(
        self,
        images: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        labels: Optional[torch.Tensor] = None,
        index: Optional[torch.Tensor] = None,
        channel_ids: Optional[torch.Tensor] = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(losses, collapse metrics) of one batch; ``generator`` fixes the views (validation), ``labels``
        turn the graph prior on, ``index`` picks each site's cell-type context, ``channel_ids`` are the
        channel slots of a channel-sampled batch (data.channel_sampling, CA-ViT)."""
        h, b = self.hparams, images.shape[0]
        cell_types = self.cell_types_at(index, self.context)
        cell_types = None if cell_types is None else cell_types.repeat(2)  # both views of each site
        pooled = pooled_features(self.backbone, self.views(images, generator), self.context, cell_types, channel_ids)
        conditioned = (
            pooled if cell_types is None or self.context.mode != "film" else self.context.film(pooled, cell_types)
        )
        z = self.projector(conditioned)
        contrast = nt_xent(z[:b], z[b:], h.temperature)
        out = {"loss": contrast["loss"], "nt_xent": contrast["loss"]}
        if labels is not None and h.graph_loss != "none":
            site = pooled.view(2, b, -1).mean(dim=0)  # the encoder's embedding of the site, both views
            out["graph"] = graph_loss(
                h.graph_loss, site, labels, self.graph_weights, self.graph_present, h.graph_temperature
            )
            out["loss"] = out["loss"] + h.graph_weight * out["graph"]
        metrics = {"positive_acc": contrast["accuracy"], "backbone_std": spread(pooled), "projection_std": spread(z)}
        return out, metrics

    def on_fit_start(self) -> None:
        h = self.hparams
        size = getattr(self.trainer.datamodule, "crop_size", None)
        params = sum(p.numel() for p in self.backbone.parameters())
        if size:
            rank_zero_info(
                f"SimCLR: {h.in_chans} channels, 2 views {size}px (crop area {h.crops_scale[0]:g}–{h.crops_scale[1]:g}, "
                f"intensity jitter {h.intensity_jitter:g}); backbone {params / 1e6:.1f}M parameters, projector "
                f"{self.backbone.num_features}→{h.projector_hidden_dim}→{h.projector_dim}; temperature {h.temperature:g}"
            )

    def _batch(self, batch: dict[str, torch.Tensor], generator: Optional[torch.Generator] = None, labels=None):
        return self(batch["image"], generator, labels, batch.get("index"), batch.get("channel_ids"))

    def training_step(self, batch, batch_idx):
        out, metrics = self._batch(batch, labels=batch.get("label"))
        if not torch.isfinite(out["loss"]):
            raise NonFiniteLossError(
                f"SimCLR loss became {out['loss'].item()} at step {self.global_step}; the last good checkpoint is kept",
                fix="lower task.optimizer.base_lr, set trainer.gradient_clip_val=1.0, or use precision=32-true",
            )
        n = batch["image"].shape[0]
        self._log("train", out, n)
        self.log("train/positive_acc", metrics.pop("positive_acc"), batch_size=n)
        for name, value in metrics.items():
            self.log(f"collapse/{name}", value, batch_size=n)
        return out["loss"]

    def _fixed_views(self, batch_idx: int, device) -> torch.Generator:
        # the same views every evaluation, so val/loss moves only because the model does
        return torch.Generator(device=device).manual_seed(batch_idx)

    def validation_step(self, batch, batch_idx):
        out, metrics = self._batch(batch, self._fixed_views(batch_idx, batch["image"].device))
        renamed = {k if k == "positive_acc" else f"collapse_{k}": v for k, v in metrics.items()}
        self._log("val", {**out, **renamed}, batch["image"].shape[0])

    def test_step(self, batch, batch_idx):
        out, _ = self._batch(batch, self._fixed_views(batch_idx, batch["image"].device))
        self._log("test", out, batch["image"].shape[0])

    def _log(self, stage: str, values: dict[str, torch.Tensor], n: int) -> None:
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "loss", sync_dist=stage != "train", batch_size=n)

    def probe_backbone(self) -> nn.Module:
        """The encoder (``callbacks.block_probes.BlockProbes`` probes its blocks)."""
        return self.backbone
