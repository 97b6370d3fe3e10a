"""trainer=fsdp without a GPU: FSDP2 on CPU (gloo) through the console script, 2 processes. A run that
dies mid-training and is re-run with the same command ends with the weights of an uninterrupted run,
and its checkpoint is a full state dict that evaluation reads like any other."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from test_ddp_train import run_cli

from cellrep.models.checkpoint import load_backbone

FSDP = ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true")
SMALL_VIT = (
    "debug=tiny",
    "model=vit_s16",
    "+model.kwargs.embed_dim=48",
    "+model.kwargs.depth=2",
    "+model.kwargs.num_heads=2",
    "logger=csv",
    "trainer.max_epochs=3",  # 2 optimizer steps per epoch at 2 × 32 sites
    "callbacks.last_checkpoint.every_n_train_steps=2",
    "test=false",
)
CRASH_AT = 3  # mid-epoch, one step after a last.ckpt


class CrashAt(L.Callback):
    """Every rank dies (no cleanup, like a preempted node) when training reaches ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os._exit(3)


def last_weights(tmp_path: Path, run_name: str) -> dict[str, torch.Tensor]:
    ckpt = tmp_path / "outputs" / "supervised" / "runs" / run_name / "checkpoints" / "last.ckpt"
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_fsdp_run_killed_then_rerun_equals_an_uninterrupted_run(tmp_path, shared_data_dir):
    run_cli(tmp_path, shared_data_dir, *FSDP, *SMALL_VIT, "run_name=whole")
    crash = ("+callbacks.crash._target_=test_fsdp_train.CrashAt", f"+callbacks.crash.step={CRASH_AT}")
    run_cli(tmp_path, shared_data_dir, *FSDP, *SMALL_VIT, "run_name=cut", *crash, expect_rc=3)
    at_crash = last_weights(tmp_path, "cut")
    run_cli(tmp_path, shared_data_dir, *FSDP, *SMALL_VIT, "run_name=cut")  # the same command again

    whole, resumed = last_weights(tmp_path, "whole"), last_weights(tmp_path, "cut")
    assert whole.keys() == resumed.keys() and any(k.startswith("backbone.blocks.1.") for k in whole)
    assert all(type(v) is torch.Tensor for v in whole.values())  # gathered, not DTensor shards
    assert not all(torch.equal(whole[k], at_crash[k]) for k in whole)  # the rerun trained on
    mismatched = [k for k in whole if not torch.allclose(whole[k], resumed[k], rtol=0, atol=1e-6)]
    assert not mismatched, mismatched

    backbone, meta = load_backbone(tmp_path / "outputs" / "supervised" / "runs" / "cut" / "checkpoints" / "last.ckpt")
    assert meta["model"]["name"] == "vit_small_patch16_224" and len(backbone.blocks) == 2
