"""Checkpoints that a kill can never leave half-written, and a last.ckpt that keeps up.

:class:`AtomicCheckpointIO` writes every checkpoint to a temp file in the
destination directory, fsyncs it and ``os.replace``-s it over the target: a
reader (or a resumed run) sees the previous checkpoint or the new one, never
a torn file. The temp file lives beside the target so the rename never
crosses filesystems (Lightning's own atomic save had regressions there).

:class:`LastCheckpoint` keeps ``last.ckpt`` fresh for resuming: every
``every_n_train_steps`` optimizer steps, after each validation and when
training ends. It never saves on an exception, so a NaN loss or a crash leaves
the last good checkpoint in place. On SLURM it also saves on the timeout
warning (SIGUSR2, see ``conf/hydra/launcher/slurm.yaml``): the signal is noted,
all ranks agree at the next step boundary, ``last.ckpt`` is written, and then
the handler that was there before (submitit's: requeue and exit) runs.

It also puts the training loader back at the checkpoint's position: Lightning
restores a stateful loader's position only if the loader was not built before
the checkpoint was read, and a task that asks for
``trainer.estimated_stepping_batches`` in ``configure_optimizers`` builds it
early (lightning issue 20550), so the resumed epoch would start over.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from cellrep.io import atomic_open


def atomic_torch_save(obj: Any, path: Path | str) -> Path:
    with atomic_open(path) as f:
        torch.save(obj, f)
    return Path(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are temp file + fsync + os.replace (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):  # remote filesystems: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every N steps, after validation and at the end of training (no top-k, no monitor)."""

    def __init__(self, dirpath: str, every_n_train_steps: int = 500, **kwargs: Any):
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            monitor=None,
            every_n_train_steps=every_n_train_steps,
            save_on_exception=False,
            **kwargs,
        )

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"

    def _save_last_now(self, trainer: L.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        loops = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_states = loops.get("combined_loader")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        states, self._loader_states = getattr(self, "_loader_states", None), None
        loader = trainer.train_dataloader
        if states and hasattr(loader, "load_state_dict"):  # before the first epoch's iterator is made
            loader.load_state_dict(states[0])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._signal, self._previous = None, None
        if "SLURM_JOB_ID" not in os.environ or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGUSR2)
        if callable(previous):  # submitit's requeue handler: run it after the checkpoint is written
            self._previous = previous
            signal.signal(signal.SIGUSR2, lambda signum, frame: setattr(self, "_signal", (signum, frame)))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if getattr(self, "_previous", None) is None:
            return
        if trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False):
            self._last_global_step_saved = -1  # save even if this step was just saved
            self._save_last_now(trainer)
            signal.signal(signal.SIGUSR2, self._previous)
            signum, frame = self._signal or (signal.SIGUSR2, None)
            self._previous(signum, frame)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last_now(trainer)
