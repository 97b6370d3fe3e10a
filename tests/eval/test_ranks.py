"""Features from many ranks (cellrep.eval.ranks): 2 CPU processes (gloo) give the one-process features,
a killed run re-embeds only the rows no part holds, and parts of another embedding are refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellrep.errors import CellrepError
from cellrep.eval.features import block_names, extract_block_features
from cellrep.eval.pipeline import across_ranks, prepare
from cellrep.eval.ranks import PARTS, _merge, features_across_ranks

ONE_CPU_RANK = ("trainer=cpu", "trainer.enable_model_summary=false")


def one_process(cfg):
    prep = prepare(cfg)
    return prep, extract_block_features(prep.backbone, prep.datamodule.eval_dataloader("all"), None, progress=False)


def assert_same(a, b):
    assert np.array_equal(a.rows, b.rows) and a.features.keys() == b.features.keys()
    for name in a.features:  # other batch boundaries: equal up to float32 kernel rounding
        np.testing.assert_allclose(a.features[name], b.features[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_two_process_features_equal_one_process(eval_cfg, checkpoint, tmp_path, shared_data_dir):
    prep, reference = one_process(eval_cfg("probe", f"ckpt_path={checkpoint}"))
    env = {**os.environ, "CELLREP_ROOT": str(tmp_path)}
    args = [f"ckpt_path={checkpoint}", f"paths.data_dir={shared_data_dir}", "progress=false", "loader.num_workers=0"]
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    out = subprocess.run(
        [sys.executable, "-m", "cellrep.cli.probe", *args, *ddp, "run_name=ddp", "probe.epochs=3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "outputs" / "probe" / "runs" / "ddp"
    assert (run / "probe.json").is_file() and "best block:" in out.stdout
    parts = run / PARTS
    assert len(list(parts.glob("rows-*.npz"))) >= 2  # both ranks wrote
    merged = _merge(parts, block_names(prep.backbone), np.arange(len(prep.datamodule.index)))
    assert_same(merged, reference)


def test_a_killed_embedding_resumes_from_its_parts(eval_cfg, checkpoint, tmp_path):
    cfg = eval_cfg("probe", f"ckpt_path={checkpoint}", *ONE_CPU_RANK, "loader.batch_size=32")
    prep, reference = one_process(cfg)
    run = tmp_path / "embed"
    across_ranks(prep, cfg, run)
    first = features_across_ranks(prep.backbone, prep.datamodule, None, prep.trainer, run, prep.source, False)
    assert_same(first, reference)

    parts = sorted((run / PARTS).glob("rows-*.npz"))
    lost = parts[1:3]  # as if killed before these batches were written
    kept = {p: p.stat().st_mtime_ns for p in parts if p not in lost}
    for p in lost:
        p.unlink()
    again = features_across_ranks(prep.backbone, prep.datamodule, None, prep.trainer, run, prep.source, False)
    assert_same(again, reference)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished parts are not redone
    assert len(list((run / PARTS).glob("rows-*.npz"))) == len(parts)

    with pytest.raises(CellrepError, match="another embedding"):  # other blocks into the same directory
        features_across_ranks(prep.backbone, prep.datamodule, [0], prep.trainer, run, prep.source, False)


def test_parts_that_do_not_cover_the_sites_are_an_error(tmp_path):
    parts = Path(tmp_path)
    np.savez(parts / "rows-0-2-3.npz", rows=np.array([0, 1, 2]), b=np.zeros((3, 2), np.float32))
    np.savez(parts / "rows-2-3-2.npz", rows=np.array([2, 3]), b=np.zeros((2, 2), np.float32))
    with pytest.raises(CellrepError, match="1 missing, 0 unexpected, 1 embedded twice"):
        _merge(parts, ["b"], np.arange(5))
