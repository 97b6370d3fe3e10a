"""RxRx1 reader on small files written here in the real RxRx1 layout and columns."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from real_formats.rxrx1 import SIZE, WELLS, pixels, write_rxrx1

from cellrep.data.schema import CANONICAL_COLUMNS, NEGATIVE_CONTROL, RXRX1_CHANNELS
from cellrep.data.shards.writer import read_index, write_shards
from cellrep.data.sources.base import ImageSource, UnreadableSite
from cellrep.data.sources.rxrx1 import RxRx1Source
from cellrep.errors import CellrepError


@pytest.fixture
def rxrx1_root(tmp_path):
    root = tmp_path / "rxrx1"
    write_rxrx1(root)
    return root


def test_metadata_maps_onto_the_canonical_schema(rxrx1_root):
    source = RxRx1Source(rxrx1_root)
    assert isinstance(source, ImageSource)
    meta = source.metadata
    assert list(meta.columns) == list(CANONICAL_COLUMNS) + ["dataset"]
    assert len(meta) == 2 * len(WELLS)
    by_well = meta.drop_duplicates("well").set_index("well")
    assert by_well.loc["B03", "perturbation"] == NEGATIVE_CONTROL
    assert by_well.loc["B03", "perturbation_type"] == "control"
    assert by_well.loc["AA04", "perturbation"] == "s501309"
    assert by_well.loc["AA04", "perturbation_type"] == "siRNA"  # positive controls are siRNAs too
    assert by_well.loc["AA04", "well_type"] == "positive_control"
    assert by_well.loc["B02", "perturbation_type"] == "siRNA"
    assert by_well.loc["O23", "dataset"] == "test"
    assert by_well.loc["O23", "cell_type"] == "U2OS"
    assert meta["concentration"].isna().all()
    assert meta["plate"].dtype == "int64" and meta["site"].dtype == "int64"
    assert source.channel_names == RXRX1_CHANNELS


def test_load_returns_the_written_pixels_in_channel_order(rxrx1_root):
    source = RxRx1Source(rxrx1_root)
    for site_id in ("HUVEC-01_2_AA04_2", "U2OS-03_4_O23_1"):
        image = source.load(site_id)
        assert image.dtype == np.uint8 and image.shape == (6, *SIZE)
        expected = np.stack([pixels(site_id, c) for c in range(1, 7)])
        np.testing.assert_array_equal(image, expected)


def test_synthetic_extension_columns_are_used(tmp_path):
    wells = [
        ("HUVEC-01", 1, "B02", "treatment", "CMPD-01", 3, "train"),
        ("HUVEC-01", 1, "B03", "negative_control", NEGATIVE_CONTROL, 9, "train"),
    ]
    extra = {
        "perturbation_type": ["COMPOUND"] * 2 + ["control"] * 2,
        "concentration": [2.5, 2.5, None, None],
        "target": ["TRAF6", "TRAF6", None, None],
    }
    write_rxrx1(tmp_path, wells=wells, channels=3, extra_columns=extra)
    meta = RxRx1Source(tmp_path, channel_names=("a", "b", "c")).metadata
    assert meta["perturbation_type"].tolist() == ["COMPOUND", "COMPOUND", "control", "control"]
    assert meta["concentration"].iloc[0] == 2.5 and meta["concentration"].iloc[2:].isna().all()
    assert meta["target"].iloc[0] == "TRAF6"
    assert meta["perturbation"].iloc[2] == NEGATIVE_CONTROL


def test_fingerprint_follows_metadata_and_channel_names(rxrx1_root):
    first = RxRx1Source(rxrx1_root).fingerprint
    assert RxRx1Source(rxrx1_root).fingerprint == first
    renamed = RxRx1Source(rxrx1_root, channel_names=("DNA", "ER", "AGP", "RNA", "Mito", "WGA")).fingerprint
    assert renamed != first
    table = pd.read_csv(rxrx1_root / "metadata.csv")
    table.loc[0, "sirna"] = "s99999"
    table.to_csv(rxrx1_root / "metadata.csv", index=False)
    assert RxRx1Source(rxrx1_root).fingerprint != first


def test_missing_root_and_metadata_are_reported(tmp_path):
    with pytest.raises(CellrepError, match="does not exist"):
        RxRx1Source(tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(CellrepError, match="metadata.csv"):
        RxRx1Source(tmp_path)


@pytest.mark.parametrize("column", ["sirna", "well_type", "plate"])
def test_missing_column_is_named(tmp_path, column):
    write_rxrx1(tmp_path, drop_column=column)
    with pytest.raises(CellrepError, match=f"'{column}'") as info:
        RxRx1Source(tmp_path)
    assert info.value.fix is not None


def test_channel_count_on_disk_must_match(tmp_path):
    write_rxrx1(tmp_path, channels=5)
    with pytest.raises(CellrepError, match="5 channel image") as info:
        RxRx1Source(tmp_path)  # default: the 6 RxRx1 channels
    assert "channel_names" in info.value.fix
    with pytest.raises(CellrepError, match="5 channel image"):
        RxRx1Source(tmp_path, channel_names=tuple("abcdef"), expected_channels=6)
    five = RxRx1Source(tmp_path, channel_names=tuple("abcde"), expected_channels=5)
    assert five.load("HUVEC-01_1_B02_1").shape == (5, *SIZE)
    with pytest.raises(CellrepError, match="expected_channels=6"):
        RxRx1Source(tmp_path, channel_names=tuple("abcde"), expected_channels=6)


def test_first_site_without_images_points_at_the_layout(rxrx1_root):
    for png in (rxrx1_root / "images" / "HUVEC-01" / "Plate1").glob("B02_s1_w*.png"):
        png.unlink()
    with pytest.raises(CellrepError, match="no channel images") as info:
        RxRx1Source(rxrx1_root)
    assert "images/<experiment>/Plate<p>" in info.value.fix


def test_missing_channel_file_is_named(rxrx1_root):
    source = RxRx1Source(rxrx1_root)
    missing = rxrx1_root / "images" / "U2OS-03" / "Plate4" / "O23_s2_w4.png"
    missing.unlink()
    with pytest.raises(CellrepError, match="O23_s2_w4.png"):
        source.load("U2OS-03_4_O23_2")
    with pytest.raises(CellrepError, match="not in"):
        source.load("HUVEC-99_1_B02_1")


@pytest.mark.parametrize("mode", ["RGB", "I;16"])
def test_non_8bit_grayscale_images_are_rejected(rxrx1_root, mode):
    path = rxrx1_root / "images" / "HUVEC-01" / "Plate1" / "B03_s1_w2.png"
    if mode == "RGB":
        Image.new("RGB", (SIZE[1], SIZE[0]), (10, 20, 30)).save(path)
    else:
        Image.fromarray(np.full(SIZE, 40000, dtype=np.uint16)).save(path)
    with Image.open(path) as written:
        assert written.mode != "L"
    source = RxRx1Source(rxrx1_root)
    with pytest.raises(CellrepError, match="8-bit grayscale"):
        source.load("HUVEC-01_1_B03_1")


def test_corrupt_png_is_reported(rxrx1_root):
    path = rxrx1_root / "images" / "HUVEC-01" / "Plate1" / "B03_s2_w1.png"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(UnreadableSite, match="B03_s2_w1.png cannot be read"):
        RxRx1Source(rxrx1_root).load("HUVEC-01_1_B03_2")


def test_truncated_and_corrupt_pngs_are_skipped_counted_and_named_by_sharding(rxrx1_root, tmp_path, caplog):
    folder = rxrx1_root / "images" / "HUVEC-01" / "Plate2"
    truncated, corrupt = folder / "AA04_s1_w3.png", folder / "AA04_s2_w5.png"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # cut inside the IDAT chunk: a real half-downloaded file
    flipped = bytearray(corrupt.read_bytes())
    flipped[60] ^= 0xFF  # a flipped byte in the compressed stream
    corrupt.write_bytes(bytes(flipped))
    source = RxRx1Source(rxrx1_root)
    for sid in ("HUVEC-01_2_AA04_1", "HUVEC-01_2_AA04_2"):
        with pytest.raises(UnreadableSite):
            source.load(sid)

    with pytest.raises(
        CellrepError,
        match="(?s)too much bad input.*unreadable_image: 2 — HUVEC-01_2_AA04_1 "
        r"\(.*AA04_s1_w3.png cannot be read.*HUVEC-01_2_AA04_2",
    ) as err:
        write_shards(source, tmp_path / "strict", samples_per_shard=3, progress=False, max_bad_fraction=0.1)
    assert "max_bad_fraction" in err.value.fix and not (tmp_path / "strict" / "manifest.json").exists()

    with caplog.at_level(logging.WARNING, logger="cellrep.data.shards.writer"):
        manifest = write_shards(
            source, tmp_path / "lenient", samples_per_shard=3, progress=False, max_bad_fraction=0.25
        )
    assert manifest["bad_input"]["by_kind"] == {"unreadable_image": 2}
    assert manifest["num_samples"] == 2 * len(WELLS) - 2
    assert {"HUVEC-01_2_AA04_1", "HUVEC-01_2_AA04_2"}.isdisjoint(read_index(tmp_path / "lenient")["site_id"])
    assert "unreadable_image: 2 — HUVEC-01_2_AA04_1" in caplog.text and "AA04_s2_w5.png" in caplog.text
    listed = json.loads((tmp_path / "lenient" / "problems.json").read_text())["problems"]
    assert sorted(p["item"] for p in listed) == ["HUVEC-01_2_AA04_1", "HUVEC-01_2_AA04_2"]
