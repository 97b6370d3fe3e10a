"""hydra/launcher=slurm composes, and the sbatch script submitit would submit holds what a
DDP job needs: one task per GPU, the timeout signal, the requeue (no cluster needed)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf
from submitit.slurm.slurm import SlurmExecutor


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch):
    monkeypatch.setattr(SlurmExecutor, "affinity", lambda *args: 1)  # it looks for srun otherwise


def slurm_script(tmp_path, *overrides: str) -> tuple[str, SlurmExecutor]:
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="cellrep.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"paths.root_dir={tmp_path}", "hydra/launcher=slurm", *overrides],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("SlurmLauncher")
    # resolve against the whole config (trainer.*), then map the fields as SlurmLauncher.launch does
    params = {k: OmegaConf.select(cfg, f"hydra.launcher.{k}") for k in launcher if k not in ("_target_", "name")}
    params = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in params.items()}
    executor = SlurmExecutor(folder=tmp_path / "submitit", max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    renamed = {"timeout_min": "time", "mem_gb": "mem", "tasks_per_node": "ntasks_per_node"}
    executor.update_parameters(
        job_name="cellrep",
        **{renamed.get(k, k): v for k, v in params.items() if v is not None and (k in base or k in launcher)},
    )
    return executor._make_submission_file_text("python -u -m submitit.core._submit", "uid"), executor


def test_slurm_launcher_script_has_one_task_per_gpu_signal_and_requeue(tmp_path):
    text, executor = slurm_script(
        tmp_path,
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=600",
    )
    for directive in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=600",
        "#SBATCH --signal=USR2@300",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --open-mode=append",
    ):
        assert directive in text, (directive, text)
    assert "srun" in text and "export NCCL_ASYNC_ERROR_HANDLING=1" in text
    assert executor.max_num_timeout == 20


def test_slurm_launcher_defaults_follow_the_trainer(tmp_path):
    text, _ = slurm_script(tmp_path)  # trainer=default: one device on one node
    assert "#SBATCH --nodes=1" in text and "#SBATCH --ntasks-per-node=1" in text
