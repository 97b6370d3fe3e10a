"""Re-running the same command resumes: kill -9 mid-epoch, run the command again, and the run ends
with the weights of an uninterrupted run, having trained on exactly the same batches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from cellrep.cli.resume import attach_wandb_identity, resume_checkpoint
from cellrep.data.shards.prepare import ensure_shards
from cellrep.errors import CellrepError

HERE = Path(__file__).resolve().parent
STEPS_PER_EPOCH, EPOCHS = 8, 2  # 122 training sites of debug=tiny / batch 16


class StepLog(L.Callback):
    """Appends each training step's sample indices to <dirpath>/seen.jsonl (and slows steps down)."""

    def __init__(self, dirpath: str, sleep_s: float = 0.0):
        self.path, self.sleep_s = Path(dirpath) / "seen.jsonl", sleep_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(
                json.dumps({"pid": os.getpid(), "step": trainer.global_step, "index": batch["index"].tolist()}) + "\n"
            )
        time.sleep(self.sleep_s)


def command(run_name: str, data_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cellrep.cli.train",
        "debug=tiny",
        "model.name=test_resnet",
        "logger=csv",
        "data.batch_size=16",
        f"trainer.max_epochs={EPOCHS}",
        "test=false",
        f"run_name={run_name}",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        f"paths.data_dir={data_dir}",
        "+callbacks.step_log._target_=test_resume.StepLog",
        "+callbacks.step_log.dirpath=${paths.output_dir}",
        "+callbacks.step_log.sleep_s=0.15",
    ]


def seen(run_dir: Path) -> list[dict]:
    path = run_dir / "seen.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_kill_9_mid_epoch_then_same_command_equals_uninterrupted_run(tmp_path, shared_data_dir, make_cfg):
    ensure_shards(make_cfg("debug=tiny").data)  # once, before two runs start side by side
    env = {
        **os.environ,
        "CELLREP_ROOT": str(tmp_path),
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    runs = tmp_path / "outputs" / "supervised" / "runs"

    def start(name):
        return subprocess.Popen(
            command(name, shared_data_dir),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    reference, victim = start("reference"), start("crash")
    deadline = time.time() + 400
    while len(seen(runs / "crash")) < STEPS_PER_EPOCH + 3 or not (runs / "crash/checkpoints/last.ckpt").exists():
        assert victim.poll() is None, victim.stdout.read()[-3000:]
        assert time.time() < deadline, "the run never got to the second epoch"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # a real kill -9 in the middle of epoch 2
    victim.wait()
    killed_at = len(seen(runs / "crash"))
    assert not (runs / "crash" / "metrics.json").exists()

    resumed = subprocess.run(
        command("crash", shared_data_dir), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert reference.wait(timeout=400) == 0, reference.stdout.read()[-3000:]

    # the weights after N steps equal the uninterrupted run's
    ref = torch.load(runs / "reference/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    got = torch.load(runs / "crash/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ref["global_step"] == got["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert ref["state_dict"].keys() == got["state_dict"].keys()
    different = [k for k in ref["state_dict"] if not torch.equal(ref["state_dict"][k], got["state_dict"][k])]
    assert not different, different

    # the batches: first run up to its checkpoint + resumed run = the uninterrupted run, step for step
    expected = {r["step"]: r["index"] for r in seen(runs / "reference")}
    assert sorted(expected) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    log = seen(runs / "crash")
    first_pid = log[0]["pid"]
    second = [r for r in log if r["pid"] != first_pid]
    resumed_from = second[0]["step"] - 1
    assert STEPS_PER_EPOCH < resumed_from < killed_at and resumed_from % STEPS_PER_EPOCH, (resumed_from, killed_at)
    committed = [r for r in log if r["pid"] == first_pid and r["step"] <= resumed_from]
    replayed = {r["step"]: r["index"] for r in committed + second}
    assert [r["step"] for r in committed + second] == sorted(expected)  # no step twice, none skipped
    assert replayed == expected  # and each step saw the same samples


def test_resume_rules(tmp_path):
    cfg = OmegaConf.create({"resume": "auto", "ckpt_path": None})
    assert resume_checkpoint(cfg, tmp_path) is None  # nothing to resume: a fresh start
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resume_checkpoint(cfg, tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    assert resume_checkpoint(OmegaConf.create({"resume": "auto", "ckpt_path": "/a.ckpt"}), tmp_path) == "/a.ckpt"
    with pytest.raises(CellrepError, match="resume=never"):
        resume_checkpoint(OmegaConf.create({"resume": "never", "ckpt_path": None}), tmp_path)
    with pytest.raises(CellrepError, match="resume='maybe'"):
        resume_checkpoint(OmegaConf.create({"resume": "maybe", "ckpt_path": None}), tmp_path)


def test_wandb_run_id_is_kept_in_the_run_dir(tmp_path):
    ids = []
    for _ in range(2):  # the first run and its resumption
        cfg = OmegaConf.create({"logger": {"wandb": {"_target_": "x", "project": "p"}}})
        attach_wandb_identity(cfg, tmp_path)
        assert cfg.logger.wandb.resume == "allow"
        ids.append(cfg.logger.wandb.id)
    assert ids[0] == ids[1] == (tmp_path / "wandb_id.txt").read_text().strip()
