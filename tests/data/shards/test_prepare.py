"""From a data config to shards: concurrent preparation of one cache, and data settings reaching the loader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from cellrep.data.shards.prepare import ensure_shards, screen_lock_path
from cellrep.data.shards.writer import load_manifest
from cellrep.errors import CellrepError

# A tiny screen: generating and sharding it takes about a second, long enough for the two processes to overlap.
TINY = (
    "data.synthetic.experiments_per_cell_type=2",
    "data.synthetic.sites_per_well=1",
    "data.synthetic.image_size=24",
    "data.synthetic.num_compounds=2",
    # the simple layout (one plate holding every gene, one control kind): what this test counts on
    "data.synthetic.plates_per_experiment=1",
    "data.synthetic.num_modules=6",
    "data.synthetic.gene_groups=1",
    "data.synthetic.rotate_groups=false",
    "data.synthetic.control_wells_per_plate=4",
    "data.synthetic.crispr_control_wells_per_plate=0",
    "data.synthetic.positive_controls=0",
    "data.samples_per_shard=8",
)
# Each child imports everything first, says it is ready, then waits for the go file: the two start ensure_shards
# within milliseconds of each other, whatever their import times were.
CHILD = """
import sys, time, pathlib
from cellrep.cli.shard import main
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.002)
sys.argv = ["cellrep-shard", *sys.argv[3:]]
main()
"""


def test_two_processes_preparing_one_screen_generate_it_once_and_both_succeed(tmp_path):
    data_dir, go = tmp_path / "data", tmp_path / "go"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CELLREP_ROOT", None)
    procs = []
    for i in range(2):
        args = [f"paths.root_dir={tmp_path}/job{i}", f"paths.data_dir={data_dir}", *TINY]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, str(tmp_path / f"ready{i}"), str(go), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
        )
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
            p.communicate()[0][-2000:] for p in procs if p.poll() is not None
        ]
        time.sleep(0.01)
    go.touch()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs

    generated = [o for o in outputs if "generating synthetic screen" in o]
    assert len(generated) == 1, outputs  # without the lock both generate (and one may crash)
    waited = next(o for o in outputs if o is not generated[0])
    assert "waiting for another process preparing the synthetic screen" in waited
    assert "using cached synthetic screen" in waited and "shards up to date" in waited
    assert "wrote " in generated[0] and "resuming" not in generated[0]

    screens = [p for p in (data_dir / "synthetic").iterdir() if not p.name.startswith(".")]
    assert len(screens) == 1 and not [p for p in (data_dir / "synthetic").iterdir() if ".tmp-" in p.name]
    manifest = load_manifest(screens[0] / "shards")
    assert all(f"{manifest['num_samples']} sites of 'rxrx1'" in o for o in outputs)
    assert (data_dir / "synthetic" / f".{screens[0].name}.lock").is_file()  # beside the cache, never deleted


def test_the_screen_lock_sits_beside_the_screen_and_prepare_says_where_the_dataset_is(make_cfg, tmp_path):
    cfg = make_cfg(*TINY, f"paths.data_dir={tmp_path}/data", config_name="shard")
    path = screen_lock_path(cfg.data)
    assert path.parent == tmp_path / "data" / "synthetic" and path.name.startswith(".")
    prepared = ensure_shards(cfg.data, progress=False)
    screen = path.parent / path.name[1 : -len(".lock")]
    assert prepared.shards_dir == screen / "shards" and prepared.dataset_root == screen
    assert (screen / "compound_targets.csv").is_file()  # what cellrep-eval's DTI benchmark reads from there
    assert load_manifest(prepared.shards_dir)["dataset"] == "rxrx1"


def test_a_held_lock_makes_the_next_holder_wait_and_say_so(tmp_path, capsys):
    from cellrep.data.shards.prepare import cache_lock

    path, order = tmp_path / ".cache.lock", []

    def hold():
        with cache_lock(path, "first", progress=False):
            held.set()
            time.sleep(0.3)
            order.append("first released")

    held = threading.Event()
    first = threading.Thread(target=hold)
    first.start()
    held.wait(10)
    with cache_lock(path, "the test cache"):  # a second open file of the lock: flock makes it wait
        order.append("second acquired")
    first.join()
    assert order == ["first released", "second acquired"]
    assert f"waiting for another process preparing the test cache (lock {path})" in capsys.readouterr().out


def test_evaluation_opens_the_source_once(make_cfg, monkeypatch):
    from cellrep.data.shards import prepare
    from cellrep.eval.checkpoint import build_eval_datamodule

    cfg = make_cfg("debug=tiny")
    ensure_shards(cfg.data, progress=False)
    opened = []
    real = prepare._open_source
    monkeypatch.setattr(prepare, "_open_source", lambda *a, **k: opened.append(1) or real(*a, **k))
    dm, shards = build_eval_datamodule(cfg.data, cfg.split, 0, batch_size=4, num_workers=0)
    assert len(opened) == 1 and dm.shards_dir == shards.shards_dir
    assert shards.dataset_root == shards.shards_dir.parent  # the synthetic screen's folder


# ------------------------------------------------------------------ data.max_corrupt
def test_max_corrupt_override_reaches_the_datamodule_and_its_loader(make_cfg, tmp_path):
    from cellrep.config import to_schema
    from cellrep.data.loading.datamodule import CellDataModule

    default = make_cfg("debug=tiny")
    shards_dir = ensure_shards(default.data).shards_dir
    assert CellDataModule.from_config(shards_dir, default.data, default.split, default.seed).max_corrupt == 100
    cfg = make_cfg("debug=tiny", "data.max_corrupt=0")
    to_schema(cfg)
    shards = tmp_path / "shards"
    shutil.copytree(ensure_shards(cfg.data, progress=False).shards_dir, shards)
    for tar in sorted(shards.glob("*.tar")):  # garble one sample per shard, keeping its size (offsets stay valid)
        with tarfile.open(tar) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith(".npy"))
        with open(tar, "r+b") as f:
            f.seek(member.offset_data)
            f.write(os.urandom(member.size))
    dm = CellDataModule.from_config(shards, cfg.data, cfg.split, cfg.seed)
    assert dm.max_corrupt == 0
    dm.setup("fit")
    with pytest.raises(CellrepError, match="more than 0 unreadable"):
        for _ in dm.train_dataloader():
            pass

    from cellrep.eval.checkpoint import build_eval_datamodule

    dm, _ = build_eval_datamodule(cfg.data, cfg.split, 0, batch_size=4, num_workers=0)
    assert dm.max_corrupt == 0  # eval too

    lenient_cfg = make_cfg("debug=tiny", "data.max_corrupt=1000")
    lenient = CellDataModule.from_config(shards, lenient_cfg.data, lenient_cfg.split, lenient_cfg.seed)
    lenient.setup("fit")
    assert lenient.max_corrupt == 1000 and len(next(iter(lenient.train_dataloader()))["label"]) > 0

    with pytest.raises(CellrepError, match="data.max_corrupt=-1"):
        to_schema(make_cfg("debug=tiny", "data.max_corrupt=-1"))


def test_manifest_json_is_unchanged_by_a_second_prepare(make_cfg):
    cfg = make_cfg("debug=tiny")
    shards = ensure_shards(cfg.data, progress=False).shards_dir
    before = (shards / "manifest.json").stat().st_mtime_ns
    assert ensure_shards(cfg.data, progress=False).shards_dir == shards
    assert (shards / "manifest.json").stat().st_mtime_ns == before
    assert json.loads((shards / "manifest.json").read_text())["num_samples"] > 0
