"""Loading the encoder of any cellrep task checkpoint for evaluation."""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import torch

from cellrep.eval.checkpoint import load_backbone
from cellrep.eval.features import pooled_block_features

OPT = {"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.95]}
SCHED = {"warmup_fraction": 0.05, "min_lr_ratio": 0.01}


def test_mae_checkpoint_gives_its_encoder(tmp_path):
    from cellrep.training.tasks.mae import MAETask

    task = MAETask(
        model={"name": "vit_small_patch16_224", "img_size": 32},
        in_chans=3,
        optimizer=OPT,
        scheduler=SCHED,
        decoder_depth=1,
        decoder_dim=64,
        decoder_heads=4,
    )
    path = tmp_path / "mae.ckpt"
    torch.save({"hyper_parameters": dict(task.hparams), "state_dict": task.state_dict()}, path)
    backbone, meta = load_backbone(path)
    assert meta["in_chans"] == 3 and meta["model"]["name"] == "vit_small_patch16_224"
    assert torch.equal(backbone.blocks[3].mlp.fc1.weight, task.mae.encoder.blocks[3].mlp.fc1.weight)
    assert [f.shape for f in pooled_block_features(backbone, torch.randn(2, 3, 32, 32))] == [(2, 768)] * 12


def test_supervised_checkpoint_gives_its_backbone(checkpoint):
    backbone, _ = load_backbone(checkpoint)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, state[f"backbone.{name}"]), name
    assert not backbone.training
