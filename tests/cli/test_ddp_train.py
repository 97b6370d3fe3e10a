"""DDP on CPU (gloo) through the console script: 2 processes, equal batches, identical weights,
and under -m exactly one run directory per sweep point (no nested multirun from DDP re-launching)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

HERE = Path(__file__).resolve().parent
DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true")
TINY = ("debug=tiny", "model.name=test_resnet", "logger=csv", "trainer.max_epochs=1")


class RankDump(L.Callback):
    """Each rank writes what it trained on and its final weights to <dirpath>/rank<r>.pt."""

    def __init__(self, dirpath: str):
        self.dirpath, self.batches, self.indices = Path(dirpath), 0, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        self.indices += batch["index"].tolist()

    def on_train_end(self, trainer, pl_module):
        params = {k: v.detach().cpu().clone() for k, v in pl_module.named_parameters()}
        torch.save(
            {
                "world": trainer.world_size,
                "batches": self.batches,
                "indices": self.indices,
                "params": params,
                "pid": os.getpid(),
            },
            self.dirpath / f"rank{trainer.global_rank}.pt",
        )


def run_cli(tmp_path: Path, data_dir: Path, *args: str, timeout: int = 420, expect_rc: int = 0) -> None:
    env = {
        **os.environ,
        "CELLREP_ROOT": str(tmp_path),
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [
        sys.executable,
        "-m",
        "cellrep.cli.train",
        *args,
        f"paths.data_dir={data_dir}",
        "+callbacks.rank_dump._target_=test_ddp_train.RankDump",
        "+callbacks.rank_dump.dirpath=${paths.output_dir}",
    ]
    log = tmp_path / "ddp.log"
    with open(log, "w") as out:  # a file, not a pipe: a hung rank 1 cannot hold it open past the timeout
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # both ranks live in the session started here
            rc = "timeout"
    assert rc == expect_rc, f"rc={rc}\n" + log.read_text()[-8000:]


def assert_ranks_agree(run_dir: Path) -> None:
    dumps = [torch.load(run_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [d["world"] for d in dumps] == [2, 2]
    assert dumps[0]["pid"] != dumps[1]["pid"]
    assert dumps[0]["batches"] == dumps[1]["batches"] > 0
    a, b = (d["params"] for d in dumps)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert len(dumps[0]["indices"]) == len(dumps[1]["indices"])


@pytest.mark.slow
def test_two_process_ddp_run_has_equal_batches_and_identical_weights(tmp_path, shared_data_dir):
    run_cli(tmp_path, shared_data_dir, *DDP, *TINY)
    runs = [p.parent for p in (tmp_path / "outputs").rglob("metrics.json")]
    assert len(runs) == 1, runs
    assert_ranks_agree(runs[0])
    assert sorted(p.name for p in (tmp_path / "outputs" / "supervised").glob("*/*")) == [runs[0].name]


@pytest.mark.slow
def test_multirun_with_ddp_writes_one_directory_per_point(tmp_path, shared_data_dir):
    run_cli(tmp_path, shared_data_dir, "-m", "seed=0,1", *DDP, *TINY, "test=false", "run_name=ddp_sweep")
    sweep = tmp_path / "outputs" / "supervised" / "multirun" / "runs" / "ddp_sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for point in ("0", "1"):
        assert (sweep / point / "metrics.json").exists()
        assert_ranks_agree(sweep / point)
    # nothing else anywhere: no nested multirun, no stray single-run dirs from rank 1
    assert (
        sorted(p.relative_to(tmp_path / "outputs").parts[:2] for p in (tmp_path / "outputs").rglob("metrics.json"))
        == [("supervised", "multirun")] * 2
    )
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs" / "supervised" / "runs").exists()
