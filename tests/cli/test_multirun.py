"""Hydra multiruns through the real entry point (in-process, basic launcher): one run directory
per point, a fresh wandb run per job, and an Optuna sweep."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import cellrep.cli.train

FAST = ("debug=tiny", "trainer.fast_dev_run=true", "model.name=test_resnet")


def run_main(monkeypatch, tmp_path: Path, data_dir: Path, *args: str) -> None:
    """``cellrep-train <args>`` in this process."""
    monkeypatch.setenv("CELLREP_ROOT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["cellrep-train", *args, f"paths.data_dir={data_dir}"])
    GlobalHydra.instance().clear()
    try:
        cellrep.cli.train.main()
    finally:
        GlobalHydra.instance().clear()


def test_two_point_multirun_writes_exactly_two_run_directories(monkeypatch, tmp_path, shared_data_dir, capsys):
    run_main(monkeypatch, tmp_path, shared_data_dir, "-m", "seed=0,1", *FAST, "logger=wandb")
    # conf/hydra/default.yaml's MultirunSummary: one row per job when the sweep ends
    table = capsys.readouterr().out.split("held-out accuracy per job")[-1].splitlines()[2:]
    assert [row.split()[0] for row in table] == ["seed=0", "seed=1"], table
    task_dir = tmp_path / "outputs" / "supervised"
    runs = sorted(p.parent for p in task_dir.rglob("metrics.json"))
    assert len(runs) == 2 and [p.name for p in runs] == ["0", "1"], runs
    assert runs[0].parent == runs[1].parent and runs[0].parents[2].name == "multirun"
    assert [p.name for p in task_dir.iterdir()] == ["multirun"]  # no single-run dirs besides the sweep
    # wandb: each job its own run (wandb.finish() between jobs), id kept in its run dir
    ids = [(run / "wandb_id.txt").read_text().strip() for run in runs]
    assert ids[0] != ids[1]
    for run, run_id in zip(runs, ids):
        assert list((run / "wandb").glob(f"offline-run-*-{run_id}")), list((run / "wandb").iterdir())
        assert OmegaConf.load(run / "config.yaml").seed == int(run.name)


def test_optuna_sweep_runs_two_trials(monkeypatch, tmp_path, shared_data_dir):
    run_main(
        monkeypatch,
        tmp_path,
        shared_data_dir,
        "-m",
        "hparams_search=supervised_optuna",
        *FAST,
        "logger=csv",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
    )
    sweep = next((tmp_path / "outputs" / "supervised" / "multirun").glob("*/*"))
    trials = sorted(p.parent.name for p in sweep.rglob("metrics.json"))
    assert trials == ["0", "1"]
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert set(results.best_params) == {"task.optimizer.base_lr", "task.optimizer.weight_decay"}
    lrs = {OmegaConf.load(sweep / t / "config.yaml").task.optimizer.base_lr for t in trials}
    assert len(lrs) == 2 and all(1e-4 <= lr <= 1e-2 for lr in lrs)


def test_named_runs_live_in_a_stable_directory(make_cfg):
    cfg = make_cfg("run_name=baseline")
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="cellrep.conf", version_base="1.3"):
        hydra_cfg = compose("train", overrides=["run_name=baseline"], return_hydra_config=True)
    assert str(hydra_cfg.hydra.run.dir).endswith("/supervised/runs/baseline")
    assert str(hydra_cfg.hydra.sweep.dir).endswith("/supervised/multirun/runs/baseline")
    assert cfg.resume == "auto"
