"""Faults of a shared cluster: corrupt shards, a NaN loss, a kill while a checkpoint is written."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from cellrep.cli.train import train
from cellrep.data.loading.datamodule import CellDataModule
from cellrep.data.shards.prepare import ensure_shards
from cellrep.errors import CellrepError
from cellrep.training.callbacks.atomic_checkpoint import AtomicCheckpointIO
from cellrep.training.tasks.base import NonFiniteLossError


class TinyNet(L.LightningModule):
    def __init__(self, in_chans: int, num_classes: int):
        super().__init__()
        self.head = torch.nn.Linear(in_chans, num_classes)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.head(batch["image"].mean((2, 3))), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def corrupt_copy(make_cfg, tmp_path):
    """The debug=tiny shards with one shard truncated and one sample garbled in every other shard."""
    cfg = make_cfg("debug=tiny")
    shards = tmp_path / "shards"
    shutil.copytree(ensure_shards(cfg.data).shards_dir, shards)
    tars = sorted(shards.glob("*.tar"))
    for tar in tars[1:]:  # garble the bytes of the first .npy member, keeping its size (offsets stay valid)
        with tarfile.open(tar) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith(".npy"))
        with open(tar, "r+b") as f:
            f.seek(member.offset_data)
            f.write(os.urandom(member.size))
    tars[0].write_bytes(tars[0].read_bytes()[: tars[0].stat().st_size // 2])  # truncated mid-member
    return cfg, shards


def fit_one_epoch(dm):
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(TinyNet(dm.in_chans, dm.num_classes), datamodule=dm)
    return trainer


def test_truncated_shard_and_garbled_sample_are_skipped_counted_then_an_error(make_cfg, tmp_path, caplog):
    cfg, shards = corrupt_copy(make_cfg, tmp_path)
    dm = CellDataModule.from_config(shards, cfg.data, cfg.split, cfg.seed)
    dm.max_corrupt = 1000
    with caplog.at_level(logging.WARNING, logger="cellrep.data.loading.datamodule"):
        trainer = fit_one_epoch(dm)
    assert trainer.global_step == len(dm.train_dataloader())  # the epoch completed despite the damage
    skipped = [r.getMessage() for r in caplog.records if "skipped unreadable shard data" in r.getMessage()]
    assert skipped, "nothing was counted"
    assert any("ReadError" in m for m in skipped), skipped  # the truncated shard
    assert any("ValueError" in m for m in skipped), skipped  # a garbled sample

    dm = CellDataModule.from_config(shards, cfg.data, cfg.split, cfg.seed)
    dm.max_corrupt = 0  # above the threshold: one clear error naming the fix
    with pytest.raises(CellrepError, match="(?s)unreadable.*cellrep-shard"):
        fit_one_epoch(dm)


class InjectNaN(L.Callback):
    """Poisons the batch of one step so its loss is NaN."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            batch["image"].fill_(float("nan"))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg(
        "debug=tiny",
        "model.name=test_resnet",
        "data.batch_size=16",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "test=false",
    )
    with open_dict(cfg):
        cfg.callbacks.inject_nan = {"_target_": f"{__name__}.InjectNaN", "at_step": 5}
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is kept"):
        train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "metrics.json").exists()


SAVER = """
import sys, torch
from cellrep.training.callbacks.atomic_checkpoint import AtomicCheckpointIO
io, i = AtomicCheckpointIO(), 0
while True:
    i += 1
    io.save_checkpoint({"step": i, "w": torch.full((8_000_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
"""


def test_kill_during_checkpoint_save_never_leaves_a_corrupt_last_ckpt(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete save
        time.sleep(0.37)  # land somewhere inside a later 32 MB write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = torch.load(target, weights_only=False)
    assert torch.equal(ckpt["w"], torch.full((8_000_000,), float(ckpt["step"])))


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "x": Unpicklable()}, target)
    assert torch.load(target, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


class RaiseTimeoutWarning(L.Callback):
    """SLURM's warning before the time limit (``--signal=USR2@<s>``), raised in this process at a step."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGUSR2)


class Requeued(Exception):
    pass


def test_slurm_timeout_warning_saves_last_ckpt_then_runs_the_requeue_handler(make_cfg, tmp_path, monkeypatch):
    last, seen = tmp_path / "run" / "checkpoints" / "last.ckpt", {}

    def requeue(signum, frame):  # where submitit's handler requeues the job and exits
        seen["signal"] = signum
        seen["step"] = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
        raise Requeued

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = make_cfg(
        "debug=tiny",
        "model.name=test_resnet",
        "data.batch_size=16",
        "test=false",
        "callbacks.last_checkpoint.every_n_train_steps=1000",
    )  # saved only because of the signal
    with open_dict(cfg):
        cfg.callbacks.timeout_warning = {"_target_": f"{__name__}.RaiseTimeoutWarning", "at_step": 3}
    before = signal.signal(signal.SIGUSR2, requeue)
    try:
        with pytest.raises(Requeued):
            train(cfg)
    finally:
        signal.signal(signal.SIGUSR2, before)
    # the step in flight when the warning came finished, was checkpointed, then the handler ran
    assert seen == {"signal": signal.SIGUSR2, "step": 4}
