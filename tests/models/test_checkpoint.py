"""Reading cellrep checkpoints: safely (no pickled code runs), and the encoder exactly (keys and shapes checked).

One reader serves ``task.init_from`` (an encoder into a fresh supervised backbone), evaluation (the
backbone rebuilt from the checkpoint's hyper-parameters) and the de novo protocol (its best checkpoint).
A whole supervised file as cellrep-train writes it goes through it in tests/eval/test_probe_cli.py.
"""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import os
import pickle

import pytest
import torch

from cellrep.cli.train import train
from cellrep.config import to_schema
from cellrep.errors import CellrepError
from cellrep.eval.features import pooled_block_features
from cellrep.models.checkpoint import ENCODER_PREFIXES, classifier_keys, load_backbone, load_encoder, read_checkpoint
from cellrep.training.tasks.mae import MAETask
from cellrep.training.tasks.supervised import SupervisedTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


OPT = {"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.95]}
SCHED = {"warmup_fraction": 0.1, "min_lr_ratio": 0.01}
TINY = {"embed_dim": 64, "depth": 2, "num_heads": 4}


def model_cfg(name="vit_small_patch16_224", **kwargs):
    return {"name": name, "img_size": 32, "kwargs": {**TINY, **kwargs}}


def save(task, path, **extra):
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": {**dict(task.hparams), **extra}}, path)
    return path


def supervised(name="vit_small_patch16_224", in_chans=6, **kwargs):
    return SupervisedTask(
        model=model_cfg(name, **kwargs), in_chans=in_chans, num_classes=9, optimizer=OPT, scheduler=SCHED
    )


def mae_task(name="vit_small_patch16_224", in_chans=6, **kwargs):
    return MAETask(model_cfg(name, **kwargs), in_chans, OPT, SCHED, decoder_dim=32, decoder_depth=1, decoder_heads=4)


def test_the_prefix_table_is_where_each_task_keeps_its_encoder():
    sup, mae = supervised(), mae_task()
    for name, module in (("supervised", sup), ("mae", mae)):
        assert any(k.startswith(ENCODER_PREFIXES[name]) for k in module.state_dict()), name
    assert not any(k.startswith(ENCODER_PREFIXES["supervised"]) for k in mae.state_dict())


# ------------------------------------------------------------------ safety
class Payload:
    """Unpickling this writes a marker file: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_checkpoint_holding_a_pickled_payload_is_refused_and_the_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    ckpt = save(supervised(), tmp_path / "evil.ckpt", trojan=Payload(marker))
    torch.load(ckpt, map_location="cpu", weights_only=False)  # the payload is live: a plain unpickle runs it
    assert marker.read_text() == "ran"
    marker.unlink()

    for read in (read_checkpoint, load_backbone, lambda p: load_encoder(supervised().backbone, p)):
        with pytest.raises(CellrepError) as err:
            read(ckpt)
        assert not marker.exists()
        message = str(err.value)
        assert "evil.ckpt is not a readable cellrep checkpoint" in message and "could run code" in message
        assert "fix: set " in message and "written by cellrep-train" in message
        assert "weights_only=False" not in message  # torch's own advice (run it anyway) is not passed on
        assert err.value.__cause__ is None and err.value.__suppress_context__  # one error, no traceback chain


def test_a_bare_pickle_with_os_system_is_refused_too(tmp_path):
    marker = tmp_path / "shell-ran"

    class Shell:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {}, "x": Shell()}))
    with pytest.raises(CellrepError, match="(?s)not a readable cellrep checkpoint.*fix: "):
        load_backbone(path)
    assert not marker.exists()


def test_files_that_are_not_checkpoints_get_one_clear_error(tmp_path):
    with pytest.raises(CellrepError, match="does not exist.*\n  fix: set ckpt_path to"):
        load_backbone(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CellrepError, match="task.init_from: .*junk.ckpt is not a readable cellrep checkpoint"):
        load_encoder(supervised().backbone, tmp_path / "junk.ckpt")
    torch.save([torch.zeros(1)], tmp_path / "list.ckpt")
    with pytest.raises(CellrepError, match="no state_dict"):
        read_checkpoint(tmp_path / "list.ckpt")


# ------------------------------------------------------------------ evaluation: the backbone from its hparams
def test_mae_checkpoint_gives_its_encoder(tmp_path):
    task = MAETask(
        model={"name": "vit_small_patch16_224", "img_size": 32},
        in_chans=3,
        optimizer=OPT,
        scheduler=SCHED,
        decoder_depth=1,
        decoder_dim=64,
        decoder_heads=4,
    )
    backbone, meta = load_backbone(save(task, tmp_path / "mae.ckpt"))
    assert meta["in_chans"] == 3 and meta["model"]["name"] == "vit_small_patch16_224"
    assert torch.equal(backbone.blocks[3].mlp.fc1.weight, task.mae.encoder.blocks[3].mlp.fc1.weight)
    assert [f.shape for f in pooled_block_features(backbone, torch.randn(2, 3, 32, 32))] == [(2, 768)] * 12
    assert not backbone.training


def test_a_supervised_checkpoint_gives_its_whole_backbone_head_included(tmp_path):
    task = supervised()
    backbone, meta = load_backbone(save(task, tmp_path / "sup.ckpt"))
    assert meta["num_classes"] == 9
    x = torch.randn(2, 6, 32, 32)
    torch.testing.assert_close(backbone(x), task.eval().backbone(x), rtol=0, atol=0)


def test_weights_that_disagree_with_their_hyperparameters_are_named(tmp_path):
    ckpt = save(supervised(depth=3), tmp_path / "edited.ckpt", model=model_cfg())  # hparams say depth 2
    with pytest.raises(
        CellrepError,
        match=r"(?s)do not fit the vit_small_patch16_224.*unexpected in the checkpoint: "
        r"blocks\.2\.attn.*fix: the checkpoint and its hyper-parameters disagree",
    ):
        load_backbone(ckpt)
    torch.save({"state_dict": supervised().state_dict(), "hyper_parameters": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(CellrepError, match="hyper_parameters lack 'model'"):
        load_backbone(tmp_path / "bare.ckpt")


# ------------------------------------------------------------------ task.init_from: an encoder into a backbone
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "ca_vit_small_patch16"])
def test_mae_encoder_loads_into_the_supervised_backbone_exactly(tmp_path, name):
    torch.manual_seed(0)
    mae = mae_task(name)
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
    mae = mae_task("ca_vit_small_patch16")
    task = supervised("ca_vit_small_patch16", in_chans=5)
    load_encoder(task.backbone, save(mae, tmp_path / "mae.ckpt"))
    assert task(torch.randn(2, 5, 32, 32)).shape == (2, 9)


def test_a_supervised_checkpoint_also_works_and_its_head_is_dropped(tmp_path):
    source = supervised()
    target = SupervisedTask(model=model_cfg(), in_chans=6, num_classes=4, optimizer=OPT, scheduler=SCHED)
    assert load_encoder(target.backbone, save(source, tmp_path / "sup.ckpt")) == ["head.bias", "head.weight"]
    torch.testing.assert_close(target.backbone.blocks[1].mlp.fc2.weight, source.backbone.blocks[1].mlp.fc2.weight)


def test_a_wider_encoder_is_refused_naming_the_mismatched_keys(tmp_path):
    mae = mae_task(embed_dim=128)
    named = r"(?s)shape mismatch.*blocks\.0\.attn\.proj\.bias \(128,\)≠\(64,\).*\(and 22 more\).*model.name="
    with pytest.raises(CellrepError, match=named):
        load_encoder(supervised().backbone, save(mae, tmp_path / "wide.ckpt"))


def test_a_deeper_or_shallower_encoder_is_refused_naming_missing_and_unexpected_keys(tmp_path):
    deeper = mae_task(depth=3)
    with pytest.raises(CellrepError, match=r"(?s)unexpected in the checkpoint: blocks\.2\.attn"):
        load_encoder(supervised().backbone, save(deeper, tmp_path / "deep.ckpt"))
    with pytest.raises(CellrepError, match=r"(?s)missing from the checkpoint: blocks\.2\.attn"):
        load_encoder(supervised(depth=3).backbone, save(supervised(), tmp_path / "shallow.ckpt"))


def test_a_checkpoint_without_an_encoder_is_refused(tmp_path):
    torch.save({"state_dict": {"decoder.w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(CellrepError, match="holds no encoder weights.*decoder.w"):
        load_encoder(supervised().backbone, tmp_path / "other.ckpt")


def test_a_missing_checkpoint_fails_when_the_config_is_composed(make_cfg, tmp_path):
    with pytest.raises(CellrepError, match="no checkpoint at"):
        to_schema(make_cfg(f"task.init_from={tmp_path}/nowhere.ckpt"))


def plain(value) -> bool:
    """Only what torch.load(weights_only=True) accepts without a safe-globals list: the tasks save nothing else."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


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
    ckpt_read = read_checkpoint(ckpt)  # Lightning's whole file (loops, callbacks, optimizer) loads safely
    assert ckpt_read.hparams["decoder_dim"] == 32 and plain(ckpt_read.hparams)
    backbone, meta = load_backbone(ckpt)  # and evaluates: the encoder, exactly
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, ckpt_read.state_dict[f"mae.encoder.{name}"]), name
    assert meta["in_chans"] == 6 and not backbone.training
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
