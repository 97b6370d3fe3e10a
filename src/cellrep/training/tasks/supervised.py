"""Supervised perturbation classification (the RxRx1 paper's baseline task)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics

from cellrep.knowledge.graph_loss import graph_loss, register_graph
from cellrep.models.backbone import build_backbone
from cellrep.models.context import CellTypeContext, classify, pooled_features, takes_context_token
from cellrep.training.tasks.base import NonFiniteLossError, Task


class SupervisedTask(Task):
    """Softmax cross-entropy over perturbation classes on a timm backbone.

    Batches are dicts with ``image`` (B×C×H×W float), ``label`` (B int64) and
    ``index`` (B int64, rows of the DataModule's index). ``group_of_index``
    maps an index row to a group id (cell type) so test accuracy is also
    reported per group.

    Knowledge priors (docs/FEWSHOT.md), both optional: ``graph_loss``
    (``graph_contrastive`` or ``laplacian``, :mod:`cellrep.knowledge.graph_loss`)
    adds ``graph_weight`` × the loss on the pooled backbone features, given
    the perturbation graph ``graph_weights`` (classes × classes) and
    ``graph_present`` (classes); ``context_table`` (one row per group, in
    ``group_names`` order) conditions the backbone on each sample's cell-type
    vector (:mod:`cellrep.models.context`).
    """

    def __init__(
        self,
        model: dict[str, Any],
        in_chans: int,
        num_classes: int,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        label_smoothing: float = 0.0,
        group_names: list[str] | None = None,
        group_of_index: torch.Tensor | None = None,
        graph_loss: str = "none",
        graph_weight: float = 0.0,
        graph_temperature: float = 0.1,
        graph_weights: torch.Tensor | None = None,
        graph_present: torch.Tensor | None = None,
        context_table: torch.Tensor | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["group_of_index", "graph_weights", "graph_present", "context_table"])
        model_kwargs = dict(model.get("kwargs") or {})
        self.backbone = build_backbone(
            model["name"],
            in_chans=in_chans,
            num_classes=num_classes,
            img_size=model.get("img_size"),
            drop_path_rate=model.get("drop_path_rate", 0.0),
            **model_kwargs,
        )
        top_k = min(5, num_classes)
        metrics = lambda k: torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=k)  # noqa: E731
        self.val_acc, self.val_acc_top5 = metrics(1), metrics(top_k)
        self.test_acc, self.test_acc_top5 = metrics(1), metrics(top_k)
        self.test_acc_top10 = metrics(min(10, num_classes))  # the de novo protocol reports top-1/5/10
        self.group_names = list(group_names or [])
        self.test_acc_by_group = nn.ModuleList(metrics(1) for _ in self.group_names)
        self.register_groups(group_of_index)
        self.context = None
        if context_table is not None:
            mode = "token" if takes_context_token(self.backbone) else "film"
            self.context = CellTypeContext(context_table, self.backbone.num_features, mode)
        register_graph(self, graph_loss, graph_weights, graph_present)

    def features_and_logits(
        self, images: torch.Tensor, index: torch.Tensor | None = None, channel_ids: torch.Tensor | None = None
    ):
        """Pooled backbone features (what the graph loss sees) and class logits; ``channel_ids``: the
        channel slots of a channel-sampled batch (data.channel_sampling, CA-ViT)."""
        cell_types = self.cell_types_at(index, self.context)
        features = pooled_features(self.backbone, images, self.context, cell_types, channel_ids)
        return features, classify(self.backbone, features, self.context, cell_types)

    def forward(self, images: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return self.features_and_logits(images, index)[1]

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits, _ = self._losses(batch, with_graph=False)
        return loss, logits

    def _losses(self, batch: dict[str, torch.Tensor], with_graph: bool = True):
        """(cross-entropy, logits, graph loss or None)."""
        features, logits = self.features_and_logits(batch["image"], batch.get("index"), batch.get("channel_ids"))
        loss = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.hparams.label_smoothing)
        extra = None
        if with_graph and self.hparams.graph_loss != "none":
            extra = graph_loss(
                self.hparams.graph_loss,
                features,
                batch["label"],
                self.graph_weights,
                self.graph_present,
                self.hparams.graph_temperature,
            )
        return loss, logits, extra

    def training_step(self, batch, batch_idx):
        ce, _, extra = self._losses(batch)
        loss = ce if extra is None else ce + self.hparams.graph_weight * extra
        if extra is not None:
            n = batch["label"].shape[0]
            self.log("train/ce", ce, batch_size=n)
            self.log("train/graph_loss", extra, batch_size=n)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at step {self.global_step}; the last good checkpoint is kept",
                fix="lower task.optimizer.base_lr, enable trainer.gradient_clip_val, or use precision=32-true",
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["label"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss, logits = self._loss(batch)
        n = batch["label"].shape[0]
        self.val_acc(logits, batch["label"])
        self.val_acc_top5(logits, batch["label"])
        self.log("val/loss", loss, sync_dist=True, batch_size=n)
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=n)
        self.log("val/acc_top5", self.val_acc_top5, batch_size=n)

    def test_step(self, batch, batch_idx):
        _, logits = self._loss(batch)
        labels, n = batch["label"], batch["label"].shape[0]
        self.test_acc(logits, labels)
        self.test_acc_top5(logits, labels)
        self.test_acc_top10(logits, labels)
        self.log("test/acc", self.test_acc, batch_size=n)
        self.log("test/acc_top5", self.test_acc_top5, batch_size=n)
        self.log("test/acc_top10", self.test_acc_top10, batch_size=n)
        if len(self.group_names):
            groups = self.group_of_index[batch["index"]]
            for gid, (name, metric) in enumerate(zip(self.group_names, self.test_acc_by_group)):
                mask = groups == gid
                if mask.any():
                    metric(logits[mask], labels[mask])
                    self.log(f"test/acc/{name}", metric, batch_size=int(mask.sum()))

    def probe_backbone(self) -> nn.Module:
        """The timm module whose blocks ``callbacks.block_probes.BlockProbes`` probes (every task has one)."""
        return self.backbone
