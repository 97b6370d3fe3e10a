"""Sharding in parts (cellrep.data.shards.parts): parts as separate processes merge into exactly what one
process writes; a killed part resumes without rewriting its finished shards; an early merge names the
unfinished parts."""

from __future__ import annotations

import cellrep  # noqa: F401

# isort: split
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from omegaconf import OmegaConf

from cellrep.config import to_schema
from cellrep.data.loading.datamodule import CellDataModule
from cellrep.data.shards.parts import marker_path, merge_parts, part_of_shards, write_part
from cellrep.data.shards.prepare import ensure_shards
from cellrep.data.shards.writer import INDEX, MANIFEST, load_manifest, plan_shards, read_index, write_shards
from cellrep.errors import CellrepError

SPLIT = {"name": "random", "test_fraction": 0.2, "val_fraction": 0.2, "holdout": None, "shots": 0, "seed": 0}


def _run_part(tmp_path, data_dir, shards, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "CELLREP_ROOT"}
    args = ["+debug=tiny", f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", f"data.shards_dir={shards}"]
    return subprocess.Popen(
        [sys.executable, "-m", "cellrep.cli.shard", *args, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env | {"OMP_NUM_THREADS": "1"},
    )


def test_two_part_processes_merge_into_the_one_process_shards(make_cfg, shared_data_dir, tmp_path):
    cfg = make_cfg("+debug=tiny", f"data.shards_dir={tmp_path}/one", config_name="shard")
    one = ensure_shards(cfg.data, progress=False).shards_dir  # also generates the screen the parts read
    parts = tmp_path / "parts"
    procs = [_run_part(tmp_path, shared_data_dir, parts, "data.shard_parts=2", f"data.shard_part={i}") for i in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert any("waiting for parts" in o for o in outputs) or all("sites of" in o for o in outputs), outputs
    assert any("sites of 'rxrx1'" in o for o in outputs), outputs  # the last part merged

    mine = [json.loads(marker_path(parts, i, 2).read_text())["shards"] for i in (0, 1)]
    assert mine[0] and mine[1] and not set(mine[0]) & set(mine[1])  # both parts wrote shards, none twice
    assert json.loads((parts / MANIFEST).read_text()) == json.loads((one / MANIFEST).read_text())
    pd.testing.assert_frame_equal(read_index(parts), read_index(one))
    for name in mine[0] + mine[1]:
        assert (parts / name).read_bytes() == (one / name).read_bytes()

    dm = CellDataModule.from_config(parts, cfg.data, OmegaConf.create(SPLIT), seed=0)
    dm.prepare()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[0] == cfg.data.batch_size and batch["image"].shape[1] == len(
        cfg.data.synthetic.channel_names
    )

    # a merge by hand once all are done is idempotent: the same bytes again
    before = (parts / INDEX).read_bytes(), (parts / MANIFEST).read_bytes()
    (parts / MANIFEST).unlink()
    merged = _run_part(tmp_path, shared_data_dir, parts, "data.shard_parts=2", "data.shard_merge=true")
    assert merged.wait(timeout=300) == 0, merged.communicate()[0]
    assert ((parts / INDEX).read_bytes(), (parts / MANIFEST).read_bytes()) == before


def test_a_killed_part_resumes_without_rewriting_its_finished_shards(make_source, tmp_path):
    source = make_source(experiments_per_type=2, plates=2)  # 8 plates of 12 sites
    first = write_part(source, tmp_path, 0, 2, samples_per_shard=5, progress=False)
    assert first["manifest"] is None and first["unfinished"] == [1]
    names = json.loads(marker_path(tmp_path, 0, 2).read_text())["shards"]
    # the kill: the last shard of the part never got its sidecar, nor the part its marker
    killed = names[-1]
    (tmp_path / (killed[: -len(".tar")] + ".stats.json")).unlink()
    marker_path(tmp_path, 0, 2).unlink()
    kept = {n: (tmp_path / n).stat() for n in names[:-1]}

    source.loads = 0
    again = write_part(source, tmp_path, 0, 2, samples_per_shard=5, progress=False)
    assert again["unfinished"] == [1] and marker_path(tmp_path, 0, 2).exists()
    for n, st in kept.items():
        now = (tmp_path / n).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), n
    plan = plan_shards(source.metadata, 5)
    assert source.loads == 1 + len(next(s for s in plan if s["name"] == killed)["site_ids"])  # shape probe + it

    last = write_part(source, tmp_path, 1, 2, samples_per_shard=5, progress=False)
    assert last["unfinished"] == [] and last["manifest"] == load_manifest(tmp_path)
    one = write_shards(source, tmp_path / "one", samples_per_shard=5, progress=False)
    assert last["manifest"] == one  # exact per-plate control statistics included
    pd.testing.assert_frame_equal(read_index(tmp_path), read_index(tmp_path / "one"))


def test_a_merge_before_every_part_finished_names_the_missing_parts(make_source, tmp_path):
    source = make_source()  # 6 plates
    write_part(source, tmp_path, 1, 3, samples_per_shard=5, progress=False)
    with pytest.raises(CellrepError, match=r"parts \[0, 2\] of 3 are not finished") as err:
        merge_parts(source, tmp_path, 3, samples_per_shard=5)
    assert "data.shard_part=<i>" in err.value.fix
    assert not (tmp_path / MANIFEST).exists() and not (tmp_path / INDEX).exists()


@pytest.mark.parametrize("parts", [1, 2, 4, 7])
def test_parts_take_whole_plates_and_shard_names_do_not_depend_on_the_part_count(make_source, parts):
    plan = plan_shards(make_source(plates=2).metadata, 5)
    of = part_of_shards(plan, parts)
    assert set(of) == {s["name"] for s in plan} and set(of.values()) <= set(range(parts))
    plates = {}
    for s in plan:
        assert plates.setdefault((s["experiment"], s["plate"]), of[s["name"]]) == of[s["name"]]
    assert len(set(of.values())) == min(parts, len(plates))


def test_part_settings_are_checked_and_training_refuses_them(make_cfg):
    for bad, match in (
        (["data.shard_parts=2", "data.shard_part=2"], "is not a part of"),
        (["data.shard_parts=0"], "data.shard_parts=0 is below 1"),
        (["data.shard_parts=2", "data.shard_part=0", "data.shard_merge=true"], "writes no part"),
    ):
        with pytest.raises(CellrepError, match=match):
            to_schema(make_cfg("+debug=tiny", *bad, config_name="shard"))
    cfg = make_cfg("debug=tiny", "data.shard_parts=2", "data.shard_part=0")
    with pytest.raises(CellrepError, match="only cellrep-shard"):
        ensure_shards(cfg.data, progress=False)


def test_the_slurm_launcher_composes_for_cellrep_shard(tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    overrides = [f"paths.root_dir={tmp_path}", "hydra/launcher=slurm"]
    with initialize_config_module(config_module="cellrep.conf", version_base="1.3"):
        cfg = compose(
            "shard", overrides=[*overrides, "data.shard_parts=4", "data.shard_part=3"], return_hydra_config=True
        )
    launcher = {k: OmegaConf.select(cfg, f"hydra.launcher.{k}") for k in ("nodes", "tasks_per_node", "gpus_per_node")}
    assert launcher == {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": None}  # one CPU task per part
    assert launcher["nodes"] is not None and cfg.data.shard_part == 3
