"""Temp files of interrupted checkpoint saves are removed when a run (re)starts; a live writer's never."""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import os
import pickle
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from cellrep.training.callbacks.atomic_checkpoint import (
    STALE_AFTER_S,
    AtomicCheckpointIO,
    LastCheckpoint,
    atomic_torch_save,
    remove_stale_temp_files,
)


def left_behind(path, age_s: float = 2 * STALE_AFTER_S, size: int = 1000):
    """A temp file as a killed writer leaves it: partly written, closed (its lock gone with it), ``age_s`` old."""
    path.write_bytes(b"\0" * size)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_only_stale_checkpoint_temp_files_are_removed(tmp_path):
    stale = [left_behind(tmp_path / ".last.ckpt.k3j_x9ab.tmp"), left_behind(tmp_path / ".best.ckpt.0a1b2c3d.tmp")]
    kept = [
        left_behind(tmp_path / ".last.ckpt.fresh123.tmp", age_s=1),  # could be a writer between mkstemp and lock
        left_behind(tmp_path / ".metrics.json.abcdefgh.tmp"),  # another writer's kind of file
        left_behind(tmp_path / "last.ckpt"),
        left_behind(tmp_path / "notes.tmp"),
    ]
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_a_live_writers_temp_file_is_never_removed(tmp_path):
    target, seen = tmp_path / "last.ckpt", {}

    class CleanUpMidWrite:  # pickled inside torch.save, while the writer holds its temp file
        def __reduce__(self):
            (tmp,) = tmp_path.glob(".last.ckpt.*.tmp")
            then = time.time() - 10 * STALE_AFTER_S  # as quiet as a dead writer's file
            os.utime(tmp, (then, then))
            seen["removed"] = remove_stale_temp_files(tmp_path)
            seen["still_there"] = tmp.exists()
            return (int, (7,))

    atomic_torch_save({"step": 3, "x": CleanUpMidWrite()}, target)
    assert seen == {"removed": [], "still_there": True}
    assert torch.load(target, weights_only=False) == {"step": 3, "x": 7}  # and the save completed
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_restarted_run_removes_what_a_killed_save_left(tmp_path, one_torch_thread):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    stale = left_behind(ckpts / ".last.ckpt.zz9_4xyq.tmp", size=1_000_000)
    seen_at_start = {}

    class AtTrainStart(L.Callback):  # the run's first step: the leftover is already gone
        def on_train_start(self, trainer, pl_module):
            seen_at_start["stale"] = stale.exists()

    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AtTrainStart(), LastCheckpoint(dirpath=str(ckpts), every_n_train_steps=1)],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(BoringModel())
    assert seen_at_start == {"stale": False}
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 2


class _Payload:  # a pickled object in a checkpoint: what weights_only=True refuses to build
    pass


def test_loads_refuse_pickled_objects_unless_asked(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": _Payload()}, path)
    safe = tmp_path / "safe.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hparams": {"lr": 0.1}}, safe)
    io = AtomicCheckpointIO()
    assert io.load_checkpoint(safe)["hparams"] == {"lr": 0.1}
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        io.load_checkpoint(path)
    assert isinstance(io.load_checkpoint(path, weights_only=False)["extra"], _Payload)
