"""Per-block probes while training (training/callbacks/block_probes.py): real fits on the tiny screen."""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cellrep.cli.train import train
from cellrep.data.loading.datamodule import CellDataModule
from cellrep.data.shards.prepare import ensure_shards
from cellrep.errors import CellrepError
from cellrep.eval.features import extract_block_features
from cellrep.eval.probe import train_probes
from cellrep.training.callbacks.block_probes import BlockProbes, probe_backbone
from cellrep.training.tasks import build_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_MAE = (  # as tests/training/test_mae.py: ViT-S/16's architecture at 2 blocks of width 64
    "debug=tiny",
    "task=mae",
    "model=vit_s16",
    "+model.kwargs.embed_dim=64",
    "+model.kwargs.depth=2",
    "+model.kwargs.num_heads=4",
    "+model.kwargs.patch_size=8",
    "task.decoder_dim=64",
    "task.decoder_depth=2",
    "task.decoder_heads=4",
    "trainer.enable_progress_bar=false",
)


def test_mae_run_logs_per_block_accuracy_to_csv_and_tensorboard(make_cfg, tmp_path):
    cfg = make_cfg(*TINY_MAE, "logger=[csv,tensorboard]", "task.probe_every_n_epochs=1", "test=false")
    train(cfg)
    run = tmp_path / "run"
    log = pd.read_csv(run / "csv" / "metrics.csv")
    blocks = [f"probe/blocks.{i}/acc" for i in range(2)]
    for column in [*blocks, "probe/best_acc", "probe/best_block_index", "probe/seconds"]:
        values = log[column].dropna()
        assert len(values) == 2, column  # every epoch of two
        assert values.between(0, 1e6).all()
    accs = log[blocks].dropna().to_numpy()
    assert ((accs >= 0) & (accs <= 1)).all()

    events = next((run / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert set(blocks) <= set(acc.Tags()["scalars"])
    assert [round(e.value, 6) for e in acc.Scalars(blocks[1])] == [round(v, 6) for v in log[blocks[1]].dropna()]
    images = acc.Images("probe/blocks")
    assert len(images) == 2 and images[-1].width > 100 and images[-1].height > 100
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["probe/best_block"] in {"blocks.0", "blocks.1"}


@pytest.fixture
def tiny_supervised(make_cfg):
    cfg = make_cfg("debug=tiny", "model=test_resnet")
    dm = CellDataModule.from_config(ensure_shards(cfg.data).shards_dir, cfg.data, cfg.split, cfg.seed)
    L.seed_everything(0)
    return build_task(cfg, dm), dm


def fit(task, dm, callback, root, **trainer):
    settings = {"max_epochs": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False}
    settings["default_root_dir"] = str(root)  # no logger: the curve goes to <default_root_dir>/block_probes.png
    settings.update(enable_progress_bar=False, enable_model_summary=False, **trainer)
    L.Trainer(callbacks=[callback], **settings).fit(task, datamodule=dm)


def test_probes_of_a_trained_model_beat_shuffled_labels(tiny_supervised, tmp_path):
    """Planted control: the same features with the labels shuffled must fall to chance, so the callback's
    accuracy measures features aligned with their sites' labels, not a pipeline that scores anything."""
    task, dm = tiny_supervised
    callback = BlockProbes(every_n_epochs=1)
    fit(task, dm, callback, tmp_path)
    assert callback.written == [tmp_path / "block_probes.png"]  # no image logger: a PNG instead
    last = callback.history[callback.history["epoch"] == 1]
    assert len(last) == 5 and last["best"].sum() == 1  # test_resnet: stem + 4 stages
    real, chance = float(last["test_acc"].mean()), float(last["chance"].iloc[0])

    feats = extract_block_features(task.probe_backbone(), callback._loader, None, "cpu", progress=False)
    sites = dm.index.iloc[feats.rows]
    assert len(sites) == len(callback.rows) and set(sites["split"]) == {"train", "val", "test"}
    rng = np.random.default_rng(0)
    shuffled = []
    for _ in range(3):
        labels = rng.permutation(sites["label"].to_numpy())
        result = train_probes(
            feats.features, labels, sites["split"].to_numpy(), dm.num_classes, callback.settings, progress=False
        )
        shuffled.append(float(result.table["test_acc"].mean()))
    assert real > 2 * chance and real > 2 * max(shuffled), (real, chance, shuffled)

    # the probe pass leaves training as it was: RNG state, and each module's train/eval mode
    task.train()
    task.backbone.layer1.eval()  # a module a task keeps in eval mode stays there
    before = torch.get_rng_state()
    table, best = callback._probe(task.trainer, task)
    assert torch.equal(torch.get_rng_state(), before)
    assert task.backbone.training and task.backbone.layer2.training and not task.backbone.layer1.training
    assert best in set(table["block"])

    # the curve is checkpoint state (a resumed run continues it) that weights_only loading accepts
    buffer = io.BytesIO()
    torch.save(callback.state_dict(), buffer)
    restored = BlockProbes(every_n_epochs=1)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    pd.testing.assert_frame_equal(restored.history, callback.history)
    assert restored.summary == callback.summary and callback.summary["probe/epoch"] == 1


def test_off_and_fast_dev_run_skip_cleanly(tiny_supervised, tmp_path):
    task, dm = tiny_supervised
    for callback, extra in [(BlockProbes(every_n_epochs=1), {"fast_dev_run": True}), (BlockProbes(0), {})]:
        fit(task, dm, callback, tmp_path, **extra)
        assert callback.history.empty and callback.summary == {} and callback.rows is None
    assert not (tmp_path / "block_probes.png").exists()


def test_bad_settings_are_refused_and_a_task_without_probe_backbone_trains_without_probes(caplog):
    with pytest.raises(CellrepError, match="every_n_epochs"):
        BlockProbes(every_n_epochs=-1)
    with pytest.raises(CellrepError, match="lrs"):
        BlockProbes(every_n_epochs=1, lrs=[])
    with pytest.raises(CellrepError, match="probe_backbone"):
        probe_backbone(L.LightningModule())
    callback = BlockProbes(every_n_epochs=1)
    with caplog.at_level(logging.WARNING):
        callback.on_fit_start(SimpleNamespace(fast_dev_run=0), L.LightningModule())
    assert callback._loader is None and "block probes off" in caplog.text and "probe_every_n_epochs=0" in caplog.text
