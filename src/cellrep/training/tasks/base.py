"""What every task shares: the hooks that are the same for all of them, and the map from a batch's
``index`` rows to cell-type ids that a context-conditioned encoder needs."""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
import torch.nn as nn

from cellrep.errors import CellrepError
from cellrep.training.optim import configure_optimizers
from cellrep.training.strategy import shard_blocks


class NonFiniteLossError(CellrepError):
    """A loss came out NaN or inf: training stops instead of writing a broken checkpoint."""


def record_channel_names(task: L.LightningModule) -> None:
    """Checkpoints record the training data's channel names, so evaluation can map another screen's
    channels onto a channel-agnostic model's channel slots by name (cellrep.eval.channels)."""
    names = getattr(getattr(task, "_trainer", None) and task.trainer.datamodule, "channel_names", None)
    if names:
        task.hparams["channel_names"] = [str(n) for n in names]


class Task(L.LightningModule):
    """Base of the task modules: subclasses keep ``hparams.optimizer`` / ``hparams.scheduler`` and
    call :meth:`register_groups`; :meth:`probe_backbone` names the encoder that evaluation reads."""

    def register_groups(self, group_of_index: Optional[torch.Tensor]) -> None:
        """``group_of_index[i]``: the cell-type id of index row i (a buffer: it follows the device,
        not saved, since the data module rebuilds it)."""
        if group_of_index is None:
            group_of_index = torch.zeros(0, dtype=torch.long)
        self.register_buffer("group_of_index", group_of_index.long(), persistent=False)

    def cell_types_at(self, index: Optional[torch.Tensor], context: Optional[nn.Module]) -> Optional[torch.Tensor]:
        """The cell-type id of each sample at ``index``; None for a task without a ``context``."""
        if context is None:
            return None
        if index is None:
            raise CellrepError(
                f"this {type(self).__name__} takes a cell-type context (model.context_path), and the batch has "
                "no index",
                fix="pass index=batch['index'] (every CellDataModule batch has one)",
            )
        return self.group_of_index[index]

    def probe_backbone(self) -> nn.Module:
        """The timm-style encoder whose blocks ``callbacks.block_probes.BlockProbes`` probes."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        record_channel_names(self)

    def configure_model(self):
        shard_blocks(self)  # trainer=fsdp only

    def configure_optimizers(self):
        return configure_optimizers(self, self.hparams.optimizer, self.hparams.scheduler)
