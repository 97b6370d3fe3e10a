"""MAE pretraining end to end on the synthetic screen, and the task's contracts."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from cellrep.cli.train import train
from cellrep.config import to_schema
from cellrep.training.callbacks.reconstructions import ReconstructionImages, reconstruction_grid
from cellrep.training.tasks.base import NonFiniteLossError
from cellrep.training.tasks.mae import MAETask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ViT-S/16's architecture at a width and depth a 2-core CPU trains in seconds; patch 8 gives 16 tokens at 32 px.
TINY_MAE = (
    "debug=tiny",
    "logger=csv",
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
OPT = {"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.95]}
SCHED = {"warmup_fraction": 0.1, "min_lr_ratio": 0.01}


def tiny_task(model: str = "vit_small_patch16_224", in_chans: int = 6, **kwargs) -> MAETask:
    torch.manual_seed(0)
    return MAETask(
        {"name": model, "img_size": 32, "kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 4}},
        in_chans,
        OPT,
        SCHED,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=4,
        **kwargs,
    )


@pytest.mark.slow
def test_mae_loss_decreases_below_the_trivial_predictor(make_cfg, tmp_path, caplog):
    """40 steps: the masked-patch loss falls from ~1.03 (random decoder) to below 1.0, what predicting
    the patch mean (0 after per-patch normalization) would cost, so the model has learned structure."""
    cfg = make_cfg(
        *TINY_MAE,
        "trainer.max_epochs=-1",
        "trainer.max_steps=40",
        "trainer.log_every_n_steps=1",
        "task.optimizer.base_lr=8e-3",
        "task.reconstructions_every_n_steps=20",
        "test=false",
    )
    with caplog.at_level(logging.INFO):
        train(cfg)
    run = tmp_path / "run"
    log = pd.read_csv(run / "csv" / "metrics.csv")
    losses = log["train/loss"].dropna().to_numpy()
    val = log["val/loss"].dropna().to_numpy()
    assert len(losses) == 40 and np.isfinite(losses).all()
    first, last = losses[:5].mean(), losses[-5:].mean()
    assert last < first - 0.02 and last < 1.0, (first, last)
    assert val[-1] < val[0], val
    assert {"train/mse", "train/fourier", "val/mse"} <= set(log.columns)
    # LR = base_lr × global batch / 256, said at the start
    assert "lr = 0.008 × 32/256 = 0.001" in caplog.text
    # the checkpoint callback follows the task's metric (val/loss, lower is better)
    assert (run / "checkpoints" / "best.ckpt").exists()
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    monitor = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert "val/loss" in str(ckpt["callbacks"]) and monitor["best_model_score"] == pytest.approx(val.min(), rel=1e-5)
    # the CSV logger cannot take images: PNGs in the run dir, three columns (masked | reconstruction | target)
    pngs = sorted((run / "reconstructions").glob("step_*.png"))
    assert [p.name for p in pngs] == ["step_0000020.png", "step_0000040.png"]
    width, height = Image.open(pngs[0]).size
    assert (width, height) == (3 * 32, 4 * 32)


def test_mae_recipe_experiment_composes_and_runs_at_small_scale(make_cfg):
    cfg = make_cfg("experiment=mae_vit_l8", "trainer=cpu", "debug=tiny", "trainer.fast_dev_run=true", *TINY_MAE[2:])
    task = cfg.task
    assert (task.mask_ratio, task.fourier_weight, task.decoder_dim, task.decoder_depth) == (0.75, 0.01, 64, 2)
    assert (task.optimizer.name, task.optimizer.base_lr, task.optimizer.weight_decay) == ("lion", 3e-5, 0.05)
    assert list(task.optimizer.betas) == [0.9, 0.95] and task.scheduler.warmup_fraction == 0.1
    full = make_cfg("experiment=mae_vit_l8")
    assert (full.model.name, full.data.crop_size, full.trainer.precision) == ("vit_large_patch8_256", 256, "bf16-mixed")
    assert full.task.decoder_dim == 512 and full.task.decoder_depth == 8
    to_schema(full)
    train(cfg)


def test_the_channel_agnostic_vit_pretrains_too(make_cfg, tmp_path):
    cfg = make_cfg(*TINY_MAE, "model=ca_vit_s16", "trainer.fast_dev_run=true")
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["model"] == cfg.model.name and "ca_vit" in cfg.model.name
    assert np.isfinite(metrics["val/loss"]) and metrics["params/total"] > 0


def test_non_finite_loss_stops_with_a_clear_message():
    task = tiny_task()
    batch = {
        "image": torch.full((2, 6, 32, 32), float("nan")),
        "label": torch.tensor([0, 1]),
        "index": torch.tensor([0, 1]),
    }
    with pytest.raises(NonFiniteLossError, match="(?s)MAE loss became nan.*last good checkpoint is kept.*base_lr"):
        task.training_step(batch, 0)


@pytest.mark.parametrize("model", ["vit_small_patch16_224", "ca_vit_small_patch16"])
@pytest.mark.parametrize("in_chans", [3, 5, 11])
def test_reconstructions_for_any_channel_count(model, in_chans):
    task = tiny_task(model, in_chans)
    images = torch.randn(2, in_chans, 32, 32)
    out = task.reconstruct(images, generator=torch.Generator().manual_seed(0))
    assert out["reconstruction"].shape == images.shape == out["mask"].shape
    assert out["mask"].float().mean().item() == pytest.approx(0.75)
    torch.testing.assert_close(out["reconstruction"][~out["mask"]], images[~out["mask"]])  # visible pixels kept
    grid = reconstruction_grid(out["target"], out["reconstruction"], out["mask"])
    assert grid.shape == (2 * 32, 3 * 32, 3) and grid.dtype == np.uint8
    assert grid[:, :32].mean() < grid[:, 64:].mean()  # masked input is mostly black


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_reconstructions_go_to_loggers_that_take_images(tmp_path, kind):
    calls = []
    if kind == "tensorboard":
        logger = TensorBoardLogger(save_dir=tmp_path, name="tb", version="")
        logger.experiment.add_image = lambda tag, img, step, dataformats: calls.append((tag, img.shape, step))
    else:
        logger = WandbLogger(save_dir=tmp_path, offline=True)  # the run starts only if .experiment is touched
        logger.log_image = lambda key, images, step, caption: calls.append((key, images[0].shape, step))
    callback = ReconstructionImages(every_n_steps=5)
    trainer = SimpleNamespace(loggers=[logger], default_root_dir=str(tmp_path))
    callback._publish(trainer, np.zeros((64, 96, 3), np.uint8), 5)
    assert calls == [("reconstructions", (64, 96, 3), 5)]
    assert callback.written == []  # no PNG when a logger took the image


def test_compile_flag_compiles_blocks_in_place_keeping_checkpoint_keys():
    plain, compiled = tiny_task(), tiny_task(compile=True)
    assert list(plain.state_dict()) == list(compiled.state_dict())
    assert all(block._compiled_call_impl is not None for block in compiled.mae.encoder.blocks)
    assert all(block._compiled_call_impl is None for block in plain.mae.encoder.blocks)


def test_bad_mae_options_fail_when_the_config_is_composed(make_cfg):
    from cellrep.errors import CellrepError

    with pytest.raises(CellrepError, match="mask_ratio"):
        to_schema(make_cfg("task=mae", "task.mask_ratio=1.0"))
    with pytest.raises(CellrepError, match="decoder_dim"):
        to_schema(make_cfg("task=mae", "task.decoder_dim=100", "task.decoder_heads=16"))
