"""Shard encodings (cellrep.data.shards.codecs): lossless round trips, shards written and read in each
(one PNG / JPEG 2000 per channel, decoded in loader workers), old shard sets without the manifest field
read as npy, the retired stacked-PNG layout refused or rewritten, a corrupt member named by shard and
key, and a change of encoding rewrites the shards."""

from __future__ import annotations

import cellrep  # noqa: F401

# isort: split
import importlib.util
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, features

from cellrep.config import to_schema
from cellrep.data.loading.datamodule import CellDataModule
from cellrep.data.shards.codecs import CODECS, codec, manifest_encoding
from cellrep.data.shards.writer import MANIFEST, _digest, _sidecar_path, plan_shards, read_index, write_shards
from cellrep.errors import CellrepError

HAVE_ZSTD = importlib.util.find_spec("zstandard") is not None
SPLIT = {"name": "batch", "test_fraction": 0.21, "val_fraction": 0.2, "holdout": None, "shots": 0, "seed": 0}
HAVE_JP2 = features.check("jpg_2000")
# what this machine can write: npy_zstd only with zstandard installed (its absence is tested below), jp2 with OpenJPEG
WRITABLE = ["npy", "png"] + (["npy_zstd"] if HAVE_ZSTD else []) + (["jp2"] if HAVE_JP2 else [])
PER_CHANNEL = {"png": "PNG", "jp2": "JPEG2000"}  # the codecs that store one image file per channel


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
        for wrong in ((img.shape[0] + 1, *img.shape[1:]), (img.shape[0], img.shape[1] + 1, img.shape[2])):
            with pytest.raises(ValueError, match="the manifest says"):
                c.decode(data, wrong)
        with pytest.raises(Exception):  # a truncated member never decodes
            c.decode(data[: len(data) * 2 // 3], img.shape)
    smooth = np.broadcast_to(np.arange(128, dtype=np.uint8), (5, 128, 128)).copy()
    assert name == "npy" or len(c.encode(smooth)) < smooth.nbytes / 4  # compressing ones do compress


@pytest.mark.parametrize("name", [n for n in PER_CHANNEL if n in WRITABLE])
def test_per_channel_encodings_store_one_grayscale_file_per_channel(name):
    img = _images()[0]
    data = CODECS[name].encode(img)
    c = img.shape[0]
    table = np.frombuffer(data, "<u4", c + 1, 4)
    assert data[:4] == b"CRCH" and table[0] == c and 4 + 4 * (c + 1) + table[1:].sum() == len(data)
    start = 4 + 4 * (c + 1)
    for plane, size in zip(img, table[1:].tolist()):  # each stream is a file PIL opens on its own
        with Image.open(io.BytesIO(data[start : start + size])) as im:
            assert (im.format, im.mode) == (PER_CHANNEL[name], "L")
            assert np.array_equal(np.asarray(im), plane)
        start += size


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
    assert manifest["encoding"] == CODECS[name].tag and manifest_encoding(manifest) == name
    assert manifest.get("source_files_kept", 0) == 0  # TinySource has no files to keep: all encoded
    first = read_index(tmp_path).iloc[0]
    with tarfile.open(tmp_path / first["shard"]) as tar:
        assert f"{first['key']}.{CODECS[name].ext}" in tar.getnames()
        member = tar.extractfile(f"{first['key']}.{CODECS[name].ext}").read()
    raw = (tmp_path / first["shard"]).read_bytes()[first["npy_offset"] : first["npy_offset"] + first["npy_size"]]
    assert raw == member  # the index's byte range is the encoded member

    def batches(shards, workers=0):
        dm = CellDataModule(shards, split=SPLIT, batch_size=8, num_workers=workers, crop_size=12)
        dm.prepare()
        return list(dm.eval_dataloader("all")), next(iter(dm.train_dataloader()))

    (ev, tr), (ev_npy, tr_npy) = batches(tmp_path, workers=1), batches(tiny_shards)  # decoded in a worker
    assert len(ev) == len(ev_npy) and all(torch.equal(a["image"], b["image"]) for a, b in zip(ev, ev_npy))
    assert torch.equal(tr["image"], tr_npy["image"])  # same stream, same decoded pixels


@pytest.mark.parametrize("name", [n for n in PER_CHANNEL if n in WRITABLE])
def test_a_corrupt_member_is_one_error_naming_its_shard_and_key(name, tiny_source, tmp_path):
    write_shards(tiny_source, tmp_path, samples_per_shard=5, progress=False, encoding=name)
    index = CellDataModule(tmp_path, split=SPLIT, batch_size=8, num_workers=0, crop_size=12).index
    row = index[index["split"] == "train"].iloc[3]  # met by the train stream and by the eval of all
    with open(tmp_path / row["shard"], "r+b") as f:  # the first channel's file signature, size kept
        f.seek(int(row["npy_offset"]) + 4 + 4 * (tiny_source.images[row["site_id"]].shape[0] + 1))
        f.write(b"\0" * 12)
    for stage in ("train", "eval"):
        dm = CellDataModule(tmp_path, split=SPLIT, batch_size=8, num_workers=0, crop_size=12, max_corrupt=0)
        loader = dm.train_dataloader() if stage == "train" else dm.eval_dataloader("all")
        with pytest.raises(CellrepError, match="unreadable samples") as err:
            for _ in zip(range(20), loader):  # the train stream is resampled: 20 batches meet every shard
                pass
        assert f"{row['shard']}, sample {row['key']}: ValueError: channel 1 does not decode" in str(err.value)
        assert "cellrep-shard" in err.value.fix


def _as_written_by_stacked_png_cellrep(shards, source):
    """Rewrite a png set's records as the cellrep of the stacked layout wrote them (tag ``png``)."""
    manifest = json.loads((shards / MANIFEST).read_text())
    plan = plan_shards(source.metadata, 5)
    manifest["encoding"] = "png"
    manifest["plan_digest"] = _digest([f"{s['name']}:{_digest(s['site_ids'])}" for s in plan] + ["encoding:png"])
    (shards / MANIFEST).write_text(json.dumps(manifest))
    for s in plan:
        side = json.loads(_sidecar_path(shards, s["name"]).read_text())
        _sidecar_path(shards, s["name"]).write_text(json.dumps(side | {"encoding": "png"}))


def test_stacked_png_sets_are_refused_with_the_fix_and_resharding_rewrites_them(make_source, tmp_path):
    source = make_source()
    write_shards(source, tmp_path, samples_per_shard=5, progress=False, encoding="png")
    _as_written_by_stacked_png_cellrep(tmp_path, source)
    with pytest.raises(CellrepError, match="records encoding 'png': one stacked") as err:
        CellDataModule(tmp_path, split=SPLIT, batch_size=8, num_workers=0, crop_size=12)
    assert "re-shard" in err.value.fix and "data.encoding" in err.value.fix
    source.loads = 0
    manifest = write_shards(source, tmp_path, samples_per_shard=5, progress=False, encoding="png")
    assert manifest["encoding"] == "png_channels" and source.loads >= len(source.metadata)  # every shard anew
    dm = CellDataModule(tmp_path, split=SPLIT, batch_size=8, num_workers=0, crop_size=12)
    assert next(iter(dm.eval_dataloader("all")))["image"].shape == (8, 3, 12, 12)


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
    assert png["encoding"] == "png_channels" and png["plan_digest"] != npy["plan_digest"]
    assert source.loads >= len(source.metadata)  # every shard rewritten, none kept from the npy set
    assert png["plate_stats"] == npy["plate_stats"]  # the statistics are of the pixels, not the bytes


def test_an_unknown_encoding_is_a_config_error(make_cfg):
    with pytest.raises(CellrepError, match="data.encoding='webp' is not known"):
        to_schema(make_cfg("+debug=tiny", "data.encoding=webp", config_name="shard"))
