"""Shard encodings (cellrep.data.shards.codecs): lossless round trips, shards written and read in each,
old shard sets without the manifest field read as npy, and a change of encoding rewrites the shards."""

from __future__ import annotations

import cellrep  # noqa: F401

# isort: split
import importlib.util
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from cellrep.config import to_schema
from cellrep.data.loading.datamodule import CellDataModule
from cellrep.data.shards.codecs import CODECS, codec, manifest_encoding
from cellrep.data.shards.writer import MANIFEST, read_index, write_shards
from cellrep.errors import CellrepError

HAVE_ZSTD = importlib.util.find_spec("zstandard") is not None
SPLIT = {"name": "batch", "test_fraction": 0.21, "val_fraction": 0.2, "holdout": None, "shots": 0, "seed": 0}
# what this machine can write: npy_zstd only with zstandard installed (its absence is tested below)
WRITABLE = ["npy", "png"] + (["npy_zstd"] if HAVE_ZSTD else [])


def _images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (3, 20, 24), dtype=np.uint8)
    smooth = np.broadcast_to(np.arange(24, dtype=np.uint8) * 10, (5, 20, 24)).copy()
    return [noise, smooth, np.zeros((1, 7, 9), np.uint8)]


@pytest.mark.parametrize("name", WRITABLE)
def test_every_encoding_round_trips_exactly_and_refuses_another_shape(name):
    c = CODECS[name]
    for img in _images():
        data = c.encode(img)
        out = c.decode(memoryview(data), img.shape)
        assert out.dtype == np.uint8 and np.array_equal(out, img)
        with pytest.raises(ValueError, match="the manifest says"):
            c.decode(data, (img.shape[0] + 1, *img.shape[1:]))
    smooth = _images()[1]
    assert name == "npy" or len(c.encode(smooth)) < smooth.nbytes / 4  # compressing ones do compress


def test_zstd_without_its_library_is_a_config_error_naming_the_fix():
    if HAVE_ZSTD:
        assert np.array_equal(
            codec("npy_zstd").decode(codec("npy_zstd").encode(_images()[0]), (3, 20, 24)), _images()[0]
        )
        return
    with pytest.raises(CellrepError, match="needs the zstandard package") as err:
        codec("npy_zstd")
    assert "pip install zstandard" in err.value.fix
    with pytest.raises(CellrepError, match="zstandard"):
        manifest_encoding({"encoding": "npy_zstd"})


@pytest.mark.parametrize("name", [n for n in WRITABLE if n != "npy"])
def test_shards_in_an_encoding_load_the_same_pixels_as_npy(name, tiny_source, tiny_shards, tmp_path):
    manifest = write_shards(tiny_source, tmp_path, samples_per_shard=5, progress=False, encoding=name)
    assert manifest["encoding"] == name
    first = read_index(tmp_path).iloc[0]
    with tarfile.open(tmp_path / first["shard"]) as tar:
        assert f"{first['key']}.{CODECS[name].ext}" in tar.getnames()
        member = tar.extractfile(f"{first['key']}.{CODECS[name].ext}").read()
    raw = (tmp_path / first["shard"]).read_bytes()[first["npy_offset"] : first["npy_offset"] + first["npy_size"]]
    assert raw == member  # the index's byte range is the encoded member

    def batches(shards):
        dm = CellDataModule(shards, split=SPLIT, batch_size=8, num_workers=0, crop_size=12)
        dm.prepare()
        return list(dm.eval_dataloader("all")), next(iter(dm.train_dataloader()))

    (ev, tr), (ev_npy, tr_npy) = batches(tmp_path), batches(tiny_shards)
    assert len(ev) == len(ev_npy) and all(torch.equal(a["image"], b["image"]) for a, b in zip(ev, ev_npy))
    assert torch.equal(tr["image"], tr_npy["image"])  # same stream, same decoded pixels


def test_old_shard_sets_without_the_field_read_as_npy(tiny_shards, tmp_path):
    old = shutil.copytree(tiny_shards, tmp_path / "old")
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["encoding"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    dm = CellDataModule(old, split=SPLIT, batch_size=8, num_workers=0, crop_size=12)
    dm.prepare()
    assert next(iter(dm.eval_dataloader("all")))["image"].shape == (8, 3, 12, 12)
    manifest["encoding"] = "webp"
    with pytest.raises(CellrepError, match="records encoding 'webp'"):
        manifest_encoding(manifest)


def test_another_encoding_rewrites_the_shards_and_npy_keeps_old_sets_up_to_date(make_source, tmp_path):
    source = make_source()
    npy = write_shards(source, tmp_path, samples_per_shard=5, progress=False)
    source.loads = 0
    assert write_shards(source, tmp_path, samples_per_shard=5, progress=False) == npy and source.loads == 0
    png = write_shards(source, tmp_path, samples_per_shard=5, progress=False, encoding="png")
    assert png["encoding"] == "png" and png["plan_digest"] != npy["plan_digest"]
    assert source.loads >= len(source.metadata)  # every shard rewritten, none kept from the npy set
    assert png["plate_stats"] == npy["plate_stats"]  # the statistics are of the pixels, not the bytes


def test_an_unknown_encoding_is_a_config_error(make_cfg):
    with pytest.raises(CellrepError, match="data.encoding='webp' is not known"):
        to_schema(make_cfg("+debug=tiny", "data.encoding=webp", config_name="shard"))
