"""Checkpoints that a kill can never leave half-written, and a last.ckpt that keeps up.

:class:`AtomicCheckpointIO` writes every checkpoint to a temp file in the
destination directory, fsyncs it and ``os.replace``-s it over the target: a
reader (or a resumed run) sees the previous checkpoint or the new one, never
a torn file. The temp file lives beside the target so the rename never
crosses filesystems (Lightning's own atomic save had regressions there).

A kill in the middle of a save leaves that temp file (``.last.ckpt.<random>.tmp``,
as big as a checkpoint) behind. :func:`remove_stale_temp_files` deletes them
when a run starts and when it ends (:class:`LastCheckpoint`), and only those
no writer is busy with: the writer holds an exclusive ``flock`` on its temp
file while it writes (the kernel drops it when the writer dies, even on
``kill -9``), and a file modified in the last minute is left alone too, which
covers the instants between ``mkstemp`` and the lock and between ``close``
and the rename.

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

import errno
import fcntl
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from cellrep.io import atomic_open

log = logging.getLogger(__name__)
# atomic_open's temp files for checkpoints: mkstemp(prefix=".<name>.", suffix=".tmp"), 8 random [a-z0-9_]
STALE_TEMP = re.compile(r"^\..+\.ckpt\.[a-z0-9_]{8}\.tmp$")
STALE_AFTER_S = 60.0  # untouched this long and unlocked: its writer is gone


def atomic_torch_save(obj: Any, path: Path | str) -> Path:
    with atomic_open(path) as f:
        _lock(f.fileno())  # held until atomic_open closes the file: tells remove_stale_temp_files it is live
        torch.save(obj, f)
    return Path(path)


def _lock(fd: int) -> bool | None:
    """An exclusive flock on ``fd`` without waiting: True, False if another holder has it, None if
    the filesystem has no flock (some Lustre and NFS mounts)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        return False if e.errno in (errno.EAGAIN, errno.EACCES) else None
    return True


def remove_stale_temp_files(dirpath: Path | str, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete the checkpoint temp files that killed writers left in ``dirpath``; the paths removed.

    Only names of :data:`STALE_TEMP`'s pattern, untouched for ``stale_after_s`` and not locked by
    a live :func:`atomic_torch_save`; anything else in the directory is left as it is.
    """
    dirpath, removed = Path(dirpath), []
    if not dirpath.is_dir():
        return removed
    for path in sorted(dirpath.iterdir()):
        if not STALE_TEMP.match(path.name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # gone already (its writer renamed it) or not a readable file
            continue
        try:
            info = os.fstat(fd)
            age = time.time() - info.st_mtime
            if age < stale_after_s:
                continue
            locked = _lock(fd)
            # no flock here: a writer gone quiet for ten times the usual wait is taken for dead
            if locked is False or (locked is None and age < 10 * stale_after_s):
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        finally:
            os.close(fd)
        removed.append(path)
        log.info("removed %s (%.0f MB), left by a checkpoint save that was interrupted", path, info.st_size / 1e6)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are temp file + fsync + os.replace (local paths), and whose loads
    (resume, ``trainer.test(ckpt_path=...)``) never unpickle code: ``weights_only=True`` unless asked otherwise."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):  # remote filesystems: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, *args: Any, weights_only: Optional[bool] = None, **kwargs: Any) -> dict[str, Any]:
        return super().load_checkpoint(
            path, *args, weights_only=True if weights_only is None else weights_only, **kwargs
        )


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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":  # a (re)started run: before its first save
            self._remove_stale_temp_files(trainer)

    def _remove_stale_temp_files(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero and self.dirpath and "://" not in str(self.dirpath):
            remove_stale_temp_files(self.dirpath)

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
        self._remove_stale_temp_files(trainer)  # one a restart found too fresh is old by now
