"""The main job end to end on the synthetic screen, and the bad inputs that must stop it early."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cellrep.cli.train import train
from cellrep.errors import CellrepError

TINY = ("debug=tiny", "logger=csv")


@pytest.mark.slow
def test_tiny_run_learns_above_chance_on_held_out_experiments(make_cfg, tmp_path):
    cfg = make_cfg(*TINY, "trainer.max_epochs=10", "data.synthetic.sites_per_well=2")
    train(cfg)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    chance = 1 / metrics["num_classes"]
    assert metrics["split"] == "batch"
    assert metrics["test/acc"] > 2.5 * chance, metrics  # measured 0.13 = 3.6x chance (27 classes)
    assert {"test/acc/HUVEC", "test/acc/RPE"} <= set(metrics)
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert Path(metrics["best_checkpoint"]).name == "best.ckpt"
    version = json.loads((run / "version.json").read_text())
    assert "git_commit" in version
    assert (run / "csv" / "metrics.csv").exists()


@pytest.mark.parametrize("model", ["resnet18", "resnet50", "vit_s16"])
def test_fast_dev_run_per_model_config(make_cfg, tmp_path, model):
    cfg = make_cfg("debug=tiny", "trainer.fast_dev_run=true", f"model={model}", "logger=csv")
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["model"] == cfg.model.name  # the architecture the config names was built and trained
    assert math.isfinite(metrics["val/loss"]) and {"test/acc", "test/acc_top5"} <= set(metrics)
    assert metrics["params/trainable"] == metrics["params/total"] > 0


@pytest.mark.parametrize("logger,expected", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_loggers_write_their_files(make_cfg, tmp_path, logger, expected):
    cfg = make_cfg("debug=tiny", "trainer.fast_dev_run=true", f"logger={logger}")
    train(cfg)
    written = list((tmp_path / "run").rglob("*"))
    assert any(expected in str(p.relative_to(tmp_path / "run")) for p in written if p.is_file()), written


def test_a_finished_run_directory_is_never_overwritten(make_cfg, tmp_path):
    cfg = make_cfg("debug=tiny", "trainer.fast_dev_run=true")
    train(cfg)
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    with pytest.raises(CellrepError, match="already holds a finished run"):
        train(cfg)
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before


def test_missing_data_root_stops_before_training(make_cfg, tmp_path):
    cfg = make_cfg("data=rxrx1", f"data.root={tmp_path}/nowhere")
    with pytest.raises(CellrepError, match="(?s)nowhere.*data.root"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_model_stops_before_data_is_read(make_cfg, tmp_path):
    cfg = make_cfg("model.name=resnet5o", f"paths.data_dir={tmp_path}/data")
    with pytest.raises(CellrepError, match="unknown model"):
        train(cfg)
    assert not (tmp_path / "data").exists()


def test_split_leaving_test_empty_stops_before_training(make_cfg, tmp_path):
    cfg = make_cfg("debug=tiny", "split=cell_type", "split.holdout=HepG2")
    with pytest.raises(CellrepError, match="(?s)holdout=HepG2 is not a cell type.*HUVEC"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_console_script_runs_from_any_directory(tmp_path, shared_data_dir):
    env = {**os.environ, "CELLREP_ROOT": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "cellrep.cli.train",
        "debug=tiny",
        "trainer.fast_dev_run=true",
        f"paths.data_dir={shared_data_dir}",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "supervised").glob("*/*/metrics.json"))
    assert len(runs) == 1
    assert "outputs:" in out.stdout


def test_user_errors_print_one_message_and_exit_2(tmp_path):
    cmd = [sys.executable, "-m", "cellrep.cli.train", "model.name=resnet5o"]
    out = subprocess.run(
        cmd,
        cwd=tmp_path,
        env={**os.environ, "CELLREP_ROOT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert "cellrep: error: unknown model 'resnet5o'" in out.stderr
    assert "Traceback" not in out.stderr
