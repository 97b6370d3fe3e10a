"""Supervised perturbation classification (the RxRx1 paper's baseline task)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics

from cellrep.errors import CellrepError
from cellrep.models.backbone import build_backbone
from cellrep.tasks.optim import configure_optimizers


class NonFiniteLossError(CellrepError):
    pass


class SupervisedTask(L.LightningModule):
    """Softmax cross-entropy over perturbation classes on a timm backbone.

    Batches are dicts with ``image`` (B×C×H×W float), ``label`` (B int64) and
    ``index`` (B int64, rows of the DataModule's index). ``group_of_index``
    maps an index row to a group id (cell type) so test accuracy is also
    reported per group.
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
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["group_of_index"])
        model_kwargs = dict(model.get("kwargs") or {})
        self.backbone = build_backbone(
            model["name"], in_chans=in_chans, num_classes=num_classes,
            img_size=model.get("img_size"), drop_path_rate=model.get("drop_path_rate", 0.0), **model_kwargs,
        )
        top_k = min(5, num_classes)
        metrics = lambda k: torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=k)  # noqa: E731
        self.val_acc, self.val_acc_top5 = metrics(1), metrics(top_k)
        self.test_acc, self.test_acc_top5 = metrics(1), metrics(top_k)
        self.group_names = list(group_names or [])
        self.test_acc_by_group = nn.ModuleList(metrics(1) for _ in self.group_names)
        if group_of_index is None:
            group_of_index = torch.zeros(0, dtype=torch.long)
        self.register_buffer("group_of_index", group_of_index.long(), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.hparams.label_smoothing)
        return loss, logits

    def training_step(self, batch, batch_idx):
        loss, _ = self._loss(batch)
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
        self.log("test/acc", self.test_acc, batch_size=n)
        self.log("test/acc_top5", self.test_acc_top5, batch_size=n)
        if len(self.group_names):
            groups = self.group_of_index[batch["index"]]
            for gid, (name, metric) in enumerate(zip(self.group_names, self.test_acc_by_group)):
                mask = groups == gid
                if mask.any():
                    metric(logits[mask], labels[mask])
                    self.log(f"test/acc/{name}", metric, batch_size=int(mask.sum()))

    def configure_optimizers(self):
        return configure_optimizers(self, self.hparams.optimizer, self.hparams.scheduler)
