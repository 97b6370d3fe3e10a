"""Fine-tuning from a pretrained encoder: exact key checks, and the whole MAE → supervised path."""

from __future__ import annotations

import pytest
import torch

from cellrep.cli.train import train
from cellrep.config import to_schema
from cellrep.errors import CellrepError
from cellrep.training.init_from import classifier_keys, load_encoder
from cellrep.training.tasks.mae import MAETask
from cellrep.training.tasks.supervised import SupervisedTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


OPT = {"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.95]}
SCHED = {"warmup_fraction": 0.1, "min_lr_ratio": 0.01}
TINY = {"embed_dim": 64, "depth": 2, "num_heads": 4}


def model_cfg(name="vit_small_patch16_224", **kwargs):
    return {"name": name, "img_size": 32, "kwargs": {**TINY, **kwargs}}


def save(task, path):
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return path


def supervised(name="vit_small_patch16_224", in_chans=6, **kwargs):
    return SupervisedTask(
        model=model_cfg(name, **kwargs), in_chans=in_chans, num_classes=9, optimizer=OPT, scheduler=SCHED
    )


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "ca_vit_small_patch16"])
def test_mae_encoder_loads_into_the_supervised_backbone_exactly(tmp_path, name):
    torch.manual_seed(0)
    mae = MAETask(model_cfg(name), 6, OPT, SCHED, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    ckpt = save(mae, tmp_path / "mae.ckpt")
    torch.manual_seed(1)
    task = supervised(name)
    head_before = task.backbone.head.weight.clone()
    fresh = load_encoder(task.backbone, ckpt)
    assert fresh == ["head.bias", "head.weight"] == sorted(classifier_keys(task.backbone))
    encoder = mae.mae.encoder.state_dict()
    for key, value in task.backbone.state_dict().items():
        if key.startswith("head."):
            continue
        torch.testing.assert_close(value, encoder[key], rtol=0, atol=0, msg=key)
    assert torch.equal(task.backbone.head.weight, head_before)
    assert task.backbone.pos_embed.requires_grad if hasattr(task.backbone, "pos_embed") else True


def test_a_ca_vit_encoder_fine_tunes_on_another_channel_count(tmp_path):
    mae = MAETask(model_cfg("ca_vit_small_patch16"), 6, OPT, SCHED, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    task = supervised("ca_vit_small_patch16", in_chans=5)
    load_encoder(task.backbone, save(mae, tmp_path / "mae.ckpt"))
    assert task(torch.randn(2, 5, 32, 32)).shape == (2, 9)


def test_a_supervised_checkpoint_also_works_and_its_head_is_dropped(tmp_path):
    source = supervised()
    target = SupervisedTask(model=model_cfg(), in_chans=6, num_classes=4, optimizer=OPT, scheduler=SCHED)
    assert load_encoder(target.backbone, save(source, tmp_path / "sup.ckpt")) == ["head.bias", "head.weight"]


def test_a_wider_encoder_is_refused_naming_the_mismatched_keys(tmp_path):
    mae = MAETask(model_cfg(embed_dim=128), 6, OPT, SCHED, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    named = r"(?s)shape mismatch.*blocks\.0\.attn\.proj\.bias \(128,\)≠\(64,\).*\(and 22 more\).*model.name="
    with pytest.raises(CellrepError, match=named):
        load_encoder(supervised().backbone, save(mae, tmp_path / "wide.ckpt"))


def test_a_deeper_or_shallower_encoder_is_refused_naming_missing_and_unexpected_keys(tmp_path):
    deeper = MAETask(model_cfg(depth=3), 6, OPT, SCHED, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    with pytest.raises(CellrepError, match=r"(?s)unexpected in the checkpoint: blocks\.2\.attn"):
        load_encoder(supervised().backbone, save(deeper, tmp_path / "deep.ckpt"))
    with pytest.raises(CellrepError, match=r"(?s)missing from the checkpoint: blocks\.2\.attn"):
        load_encoder(supervised(depth=3).backbone, save(supervised(), tmp_path / "shallow.ckpt"))


def test_a_checkpoint_without_an_encoder_is_refused(tmp_path):
    torch.save({"state_dict": {"decoder.w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(CellrepError, match="holds no encoder weights.*decoder.w"):
        load_encoder(supervised().backbone, tmp_path / "other.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CellrepError, match="cannot read"):
        load_encoder(supervised().backbone, tmp_path / "junk.ckpt")


def test_a_missing_checkpoint_fails_when_the_config_is_composed(make_cfg, tmp_path):
    with pytest.raises(CellrepError, match="no checkpoint at"):
        to_schema(make_cfg(f"task.init_from={tmp_path}/nowhere.ckpt"))


@pytest.mark.slow
def test_pretrain_then_fine_tune_through_the_entry_point(make_cfg, tmp_path):
    tiny = [
        "debug=tiny",
        "logger=csv",
        "model=vit_s16",
        "+model.kwargs.embed_dim=64",
        "+model.kwargs.depth=2",
        "+model.kwargs.num_heads=4",
        "trainer.enable_progress_bar=false",
    ]
    train(
        make_cfg(
            *tiny,
            "task=mae",
            "task.decoder_dim=32",
            "task.decoder_depth=1",
            "task.decoder_heads=4",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "test=false",
            f"paths.output_dir={tmp_path}/mae",
        )
    )
    ckpt = tmp_path / "mae" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    train(
        make_cfg(
            *tiny,
            "task=supervised",
            f"task.init_from={ckpt}",
            "trainer.fast_dev_run=true",
            f"paths.output_dir={tmp_path}/finetune",
        )
    )
    with pytest.raises(CellrepError, match="does not fit"):
        train(
            make_cfg(
                *tiny[:-4],
                "+model.kwargs.embed_dim=32",
                "+model.kwargs.depth=2",
                "+model.kwargs.num_heads=4",
                "trainer.enable_progress_bar=false",
                "task=supervised",
                f"task.init_from={ckpt}",
                "trainer.fast_dev_run=true",
                f"paths.output_dir={tmp_path}/wrong",
            )
        )
