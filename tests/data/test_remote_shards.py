"""Shards over http (cellrep.data.shards.remote): a shard directory served on 127.0.0.1 trains a model and
is evaluated through a local mirror; a rewritten remote set, a missing URL and a failed download are clear."""

from __future__ import annotations

import functools
import json
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cellrep.cli.probe import probe
from cellrep.cli.train import train
from cellrep.data.shards.prepare import ensure_shards
from cellrep.data.shards.remote import mirror
from cellrep.errors import CellrepError


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output to the test
        pass


@pytest.fixture
def served(make_cfg, tmp_path):
    """(URL, directory) of a copy of the tiny screen's shards, served over http by a server on 127.0.0.1."""
    shards = shutil.copytree(ensure_shards(make_cfg("debug=tiny").data, progress=False).shards_dir, tmp_path / "www")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(shards)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", Path(shards)
    finally:
        server.shutdown()
        server.server_close()


def test_training_and_evaluation_read_shards_over_http(served, make_cfg, tmp_path):
    url, shards = served
    cache = tmp_path / "cache"
    remote = (f"data.shards_dir={url}", f"data.shards_cache={cache}")
    train(make_cfg("debug=tiny", "model.name=test_resnet", "trainer.max_epochs=1", "test=false", *remote))
    local = next(cache.iterdir())
    tars = sorted(p.name for p in shards.glob("*.tar"))
    assert sorted(p.name for p in local.glob("*.tar")) == tars  # every shard fetched once, whole
    assert all((local / n).read_bytes() == (shards / n).read_bytes() for n in tars)
    assert not list(local.glob(".*.part"))  # no temporary files left behind

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # evaluation with its own, empty mirror: everything it reads comes over http
    fresh = (f"data.shards_dir={url}", f"data.shards_cache={tmp_path / 'cache2'}", "use_run_config=false")
    probe_cfg = (f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}/probe", "progress=false", "probe.epochs=2")
    out = probe(make_cfg(*probe_cfg, *fresh, config_name="probe"))
    assert out["num_sites"] == json.loads((shards / "manifest.json").read_text())["num_samples"]
    assert sorted(p.name for p in next((tmp_path / "cache2").iterdir()).glob("*.tar")) == tars


def test_a_rewritten_remote_set_is_refused_not_mixed(served, tmp_path):
    url, shards = served
    local = mirror(url, tmp_path)
    (local / "manifest.json").write_text("{}")  # as if mirrored from an earlier version of the set
    with pytest.raises(CellrepError, match="changed since it was mirrored"):
        mirror(url, tmp_path)


def test_a_url_without_a_shard_set_and_a_failed_fetch_are_one_clear_error(served, tmp_path):
    url, shards = served
    with pytest.raises(CellrepError, match="manifest.json"):
        mirror(f"{url}/nothing-here", tmp_path / "a")
    lost = sorted(shards.glob("*.tar"))[2]
    lost.unlink()  # the server lacks one shard the manifest lists
    with pytest.raises(CellrepError, match=f"cannot read {url}/{lost.name}"):
        mirror(url, tmp_path / "b")
    local = next((tmp_path / "b").iterdir())
    assert not (local / lost.name).exists() and not list(local.glob(".*.part"))  # nothing looks finished
    assert not (local / "manifest.json").exists()  # an incomplete mirror is not taken for a complete one
