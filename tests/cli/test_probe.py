"""cellrep-probe: configuration and bad input stop early with one clear message.

The end-to-end run on a trained model (one backbone pass for all blocks) is in
tests/eval/test_probe_cli.py, which shares the session's trained checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cellrep.cli.probe import probe
from cellrep.errors import CellrepError


def test_config_composes_with_schema(make_cfg):
    cfg = make_cfg("ckpt_path=/x.ckpt", config_name="probe")
    assert cfg.task.name == "probe" and list(cfg.probe.lrs) and cfg.use_run_config


def test_missing_checkpoint_argument(make_cfg):
    with pytest.raises(CellrepError, match="ckpt_path is not set"):
        probe(make_cfg(config_name="probe"))


def test_checkpoint_that_does_not_exist(make_cfg, tmp_path):
    with pytest.raises(CellrepError, match="does not exist"):
        probe(make_cfg(f"ckpt_path={tmp_path}/nope.ckpt", config_name="probe"))


def test_file_that_is_not_a_checkpoint(make_cfg, tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CellrepError, match="not a readable cellrep checkpoint"):
        probe(make_cfg(f"ckpt_path={bad}", config_name="probe"))


def test_bad_probe_settings_fail_before_any_work(make_cfg, tmp_path):
    with pytest.raises(CellrepError, match="probe settings out of range"):
        probe(make_cfg(f"ckpt_path={tmp_path}/x.ckpt", "probe.lrs=[-0.1]", config_name="probe"))
    assert not (tmp_path / "run").exists()


def test_console_error_is_one_message(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cellrep.cli.probe", f"ckpt_path={tmp_path}/nope.ckpt"],
        cwd=tmp_path,
        env={**os.environ, "CELLREP_ROOT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cellrep: error: checkpoint" in out.stderr and "Traceback" not in out.stderr
