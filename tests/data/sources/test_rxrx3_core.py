"""RxRx3-core reader on small files written here in the real HuggingFace format.

Parquet shards ``data/train-000NN-of-000MM.parquet`` with ``__key__`` and ``jp2`` (HF ``Image``
feature: a struct ``{bytes, path}``, or plain binary), one lossless 8-bit JPEG 2000 per row,
keys ``<experiment>/Plate<p>/<address>_s1_<channel>``, and ``metadata_rxrx3_core.csv``.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import lightning as L
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from real_formats.rxrx3_core import (
    RAPA,
    SIZE,
    WELLS,
    expected_image,
    jp2,
    pixels,
    well_key,
    write_rxrx3_core,
)

from cellrep.data.loading.datamodule import CellDataModule
from cellrep.data.schema import CANONICAL_COLUMNS
from cellrep.data.shards.writer import load_manifest, read_index, write_shards
from cellrep.data.sources.base import ImageSource
from cellrep.data.sources.rxrx3_core import RxRx3CoreSource
from cellrep.errors import CellrepError


@pytest.fixture
def rxrx3_root(tmp_path):
    return write_rxrx3_core(tmp_path / "rxrx3-core")


def test_metadata_maps_onto_the_canonical_schema(rxrx3_root):
    source = RxRx3CoreSource(rxrx3_root)
    assert isinstance(source, ImageSource) and source.problems == []
    meta = source.metadata.set_index("site_id")
    assert list(source.metadata.columns) == list(CANONICAL_COLUMNS) + ["smiles"]
    assert len(meta) == len(WELLS) and (meta["site"] == 1).all() and (meta["cell_type"] == "HUVEC").all()
    plk1 = meta.loc["gene-001_2_AA02_1"]
    assert (plk1["perturbation"], plk1["perturbation_type"], plk1["well_type"]) == ("PLK1", "CRISPR", "treatment")
    assert pd.isna(plk1["concentration"]) and pd.isna(plk1["smiles"])
    ctrl = meta.loc["gene-001_1_B04_1"]
    assert (ctrl["perturbation"], ctrl["perturbation_type"], ctrl["well_type"]) == (
        "EMPTY_control",
        "control",
        "negative_control",
    )
    assert meta.loc["compound-001_1_D07_1", "perturbation"] == "CRISPR_control"
    assert meta.loc["compound-001_1_D07_1", "well_type"] == "negative_control"
    rapa = meta.loc["compound-001_1_C05_1"]
    assert (rapa["perturbation"], rapa["perturbation_type"], rapa["well_type"]) == (
        "Rapamycin",
        "COMPOUND",
        "treatment",
    )
    assert rapa["concentration"] == 0.0025 and meta.loc["compound-001_1_C06_1", "concentration"] == 10.0
    assert rapa["smiles"] == RAPA
    assert meta["plate"].dtype == "int64"


@pytest.mark.parametrize("struct", [True, False], ids=["hf-image-struct", "binary"])
def test_shards_hold_exactly_the_written_pixels_and_metadata(tmp_path, struct):
    root = write_rxrx3_core(tmp_path / "src", struct=struct, files=3, row_group_size=5)
    source = RxRx3CoreSource(root)
    for site_id in ("gene-001_1_AA02_1", "compound-001_1_D08_1"):  # direct load, channel order
        e, p, a, _ = site_id.split("_")
        np.testing.assert_array_equal(source.load(site_id), expected_image((e, int(p), a)))
    manifest = write_shards(source, tmp_path / "shards", samples_per_shard=2, progress=False)
    assert manifest["num_samples"] == len(WELLS) and manifest["bad_input"]["count"] == 0
    assert manifest["channel_names"] == list(source.channel_names) and manifest["image_shape"] == [6, *SIZE]
    assert manifest["source"]["parquet_files"] == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    index = read_index(tmp_path / "shards")
    for row in index.itertuples():
        with tarfile.open(tmp_path / "shards" / row.shard) as tar:
            arr = np.load(io.BytesIO(tar.extractfile(f"{row.key}.npy").read()))
            meta = json.loads(tar.extractfile(f"{row.key}.json").read())
        np.testing.assert_array_equal(arr, expected_image((row.experiment, row.plate, row.well)))
        assert meta["site_id"] == row.site_id and meta["perturbation"] == row.perturbation
    assert index.set_index("site_id").loc["compound-001_1_C06_1", "smiles"] == RAPA


def test_source_pickles_and_parallel_writing_matches_serial(tmp_path, rxrx3_root):
    source = RxRx3CoreSource(rxrx3_root)
    source.load("gene-001_1_AA02_1")  # fills the row-group cache and opens files: neither is pickled
    clone = pickle.loads(pickle.dumps(source))
    assert clone._cache == {} and clone.fingerprint == source.fingerprint
    np.testing.assert_array_equal(clone.load("gene-001_2_C10_1"), source.load("gene-001_2_C10_1"))
    write_shards(source, tmp_path / "serial", samples_per_shard=3, progress=False)
    write_shards(clone, tmp_path / "parallel", samples_per_shard=3, num_workers=2, progress=False)
    for path in sorted((tmp_path / "serial").glob("*.tar")):
        assert (tmp_path / "parallel" / path.name).read_bytes() == path.read_bytes()


def test_bad_input_is_counted_named_and_fails_above_the_threshold(tmp_path):
    root = write_rxrx3_core(
        tmp_path / "src",
        drop_keys={well_key("gene-001", 1, "AA03", 4)},  # a well missing one channel row
        extra_keys={
            "gene-001/Plate1/AA02-s1-1": jp2(pixels("x")),  # a key that does not parse
            **{well_key("gene-009", 3, "A01", c): jp2(pixels("y")) for c in range(1, 7)},
        },  # no metadata
        corrupt={well_key("compound-001", 1, "C06", 2)},  # a truncated jp2
        metadata_wells=WELLS + [("gene-001", 3, "P24", "SRC", "SRC_guide_1", "", "", "CRISPR")],  # no images
    )
    source = RxRx3CoreSource(root)
    kinds = {p["kind"]: p["item"] for p in source.problems}
    assert kinds == {
        "missing_channel": "gene-001_1_AA03_1",
        "unparsable_key": "gene-001/Plate1/AA02-s1-1",
        "image_without_metadata": "gene-009/Plate3/A01_s1",
        "metadata_without_image": "gene-001_3_P24",
    }
    assert "gene-001_1_AA03_1" not in set(source.metadata["site_id"])  # reported, and left out

    with pytest.raises(CellrepError, match="(?s)too much bad input.*missing_channel.*gene-001_1_AA03_1") as err:
        write_shards(source, tmp_path / "strict", samples_per_shard=3, progress=False, max_bad_fraction=0.1)
    assert "max_bad_fraction" in err.value.fix and not (tmp_path / "strict" / "manifest.json").exists()

    manifest = write_shards(source, tmp_path / "lenient", samples_per_shard=3, progress=False, max_bad_fraction=0.5)
    assert manifest["bad_input"]["by_kind"] == {
        "missing_channel": 1,
        "unparsable_key": 1,
        "image_without_metadata": 1,
        "metadata_without_image": 1,
        "unreadable_image": 1,
    }
    assert manifest["num_samples"] == len(WELLS) - 2  # the well missing a channel and the corrupt site
    listed = json.loads((tmp_path / "lenient" / "problems.json").read_text())["problems"]
    unreadable = [p for p in listed if p["kind"] == "unreadable_image"]
    assert [p["item"] for p in unreadable] == ["compound-001_1_C06_1"] and "channel 2" in unreadable[0]["detail"]
    assert "compound-001_1_C06_1" not in set(read_index(tmp_path / "lenient")["site_id"])
    assert load_manifest(tmp_path / "lenient") == manifest


def test_channel_count_and_missing_files_are_reported(tmp_path, rxrx3_root):
    with pytest.raises(CellrepError, match="does not exist"):
        RxRx3CoreSource(tmp_path / "nowhere")
    with pytest.raises(CellrepError, match="expected_channels=5"):
        RxRx3CoreSource(rxrx3_root, expected_channels=5)
    with pytest.raises(CellrepError, match="have 6 channel rows but 5") as err:
        RxRx3CoreSource(rxrx3_root, channel_names=tuple("abcde"))
    assert "channel_names" in err.value.fix
    (rxrx3_root / "metadata_rxrx3_core.csv").unlink()
    with pytest.raises(CellrepError, match="metadata_rxrx3_core.csv"):
        RxRx3CoreSource(rxrx3_root)


@pytest.mark.parametrize("encoding", ["npy", "jp2"])
def test_shard_command_config_reads_rxrx3_core(make_cfg, tmp_path, rxrx3_root, encoding):
    from cellrep.data.shards.prepare import ensure_shards

    cfg = make_cfg(
        "data=rxrx3_core",
        f"data.root={rxrx3_root}",
        f"data.shards_dir={tmp_path}/shards",
        f"data.encoding={encoding}",
        config_name="shard",
    )
    manifest = load_manifest(ensure_shards(cfg.data, progress=False).shards_dir)
    assert manifest["dataset"] == "rxrx3_core" and manifest["num_samples"] == len(WELLS)
    assert manifest["encoding"] == encoding and manifest.get("source_files_kept", len(WELLS)) == len(WELLS)


class _MeanPixelNet(L.LightningModule):
    """The smallest real model: a linear head on each channel's mean."""

    def __init__(self, in_chans: int, num_classes: int):
        super().__init__()
        self.head = torch.nn.Linear(in_chans, num_classes)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.head(batch["image"].mean((2, 3))), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _parquet_files(root) -> dict[str, bytes]:
    """``__key__`` → ``jp2`` bytes, read straight from the parquet (not through the reader)."""
    out = {}
    for path in sorted((root / "data").glob("*.parquet")):
        table = pq.read_table(path).to_pylist()
        out |= {r["__key__"]: r["jp2"]["bytes"] if isinstance(r["jp2"], dict) else r["jp2"] for r in table}
    return out


def _codestream(array: np.ndarray) -> bytes:
    """A lossless JPEG 2000 unlike the one cellrep writes (a bare codestream, 2 resolutions): a
    re-encoded site cannot pass for a kept one."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG2000", no_jp2=True, num_resolutions=2)
    return buf.getvalue()


def test_jp2_shards_keep_the_source_files_byte_for_byte_and_train(tmp_path):
    own = {
        well_key(e, p, a, c): _codestream(pixels(well_key(e, p, a, c))) for e, p, a, *_ in WELLS for c in range(1, 7)
    }
    bad = well_key("gene-001", 2, "AA02", 5)
    own[bad] = own[bad][: len(own[bad]) // 3]  # a truncated file: the site is skipped, not kept
    root = write_rxrx3_core(tmp_path / "src", files=2, row_group_size=4, extra_keys=own)
    source = RxRx3CoreSource(root)
    kw = dict(samples_per_shard=3, progress=False, max_bad_fraction=0.5)
    manifest = write_shards(source, tmp_path / "jp2", encoding="jp2", **kw)
    assert manifest["encoding"] == "jp2" and manifest["num_samples"] == len(WELLS) - 1  # the corrupt file: skipped
    assert manifest["source_files_kept"] == manifest["num_samples"]  # every written site holds its own files
    files, index = _parquet_files(root), read_index(tmp_path / "jp2")
    assert "gene-001_2_AA02_1" not in set(index["site_id"])
    for row in index.itertuples():
        with tarfile.open(tmp_path / "jp2" / row.shard) as tar:
            member = tar.extractfile(f"{row.key}.jp2s").read()
        sizes = np.frombuffer(member, "<u4", 7, 4)[1:].tolist()
        start, stored = 4 + 4 * 7, []
        for size in sizes:
            stored.append(member[start : start + size])
            start += size
        assert start == len(member)
        assert stored == [files[well_key(row.experiment, row.plate, row.well, c)] for c in range(1, 7)]
        assert stored != [jp2(pixels(well_key(row.experiment, row.plate, row.well, c))) for c in range(1, 7)]

    npy = write_shards(source, tmp_path / "npy", **kw)
    assert npy["plate_stats"] == manifest["plate_stats"]  # statistics of the same pixels

    split = {"name": "random", "test_fraction": 0.3, "val_fraction": 0.0, "holdout": None, "shots": 0, "seed": 0}

    def datamodule(shards, workers=0):
        return CellDataModule(shards, split=split, batch_size=4, num_workers=workers, crop_size=8, seed=1)

    ev, ev_npy = (list(datamodule(d).eval_dataloader("all")) for d in (tmp_path / "jp2", tmp_path / "npy"))
    assert len(ev) == len(ev_npy) and all(torch.equal(a["image"], b["image"]) for a, b in zip(ev, ev_npy))
    dm = datamodule(tmp_path / "jp2", workers=1)  # decoded in a loader worker process
    tr, tr_npy = next(iter(dm.train_dataloader())), next(iter(datamodule(tmp_path / "npy").train_dataloader()))
    assert torch.equal(tr["image"], tr_npy["image"])
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(_MeanPixelNet(dm.in_chans, dm.num_classes), datamodule=dm)
    assert trainer.global_step == 2
