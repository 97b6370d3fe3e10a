"""The shard writer's bad-input report (any source), and RxRx1 fixtures through shards into
``split=official``."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
from real_formats.rxrx1 import pixels, write_rxrx1

from cellrep.data.shards.writer import load_manifest, read_index, write_shards
from cellrep.data.sources.base import UnreadableSite
from cellrep.errors import CellrepError


def flawed_source(make_source, unreadable=("HUVEC-01_1_C03_2",), problems=2):
    """A source that found ``problems`` while indexing and cannot decode the ``unreadable`` sites."""
    src = make_source(cell_types=("HUVEC",), experiments_per_type=2)  # 24 sites
    src.problems = [
        {"kind": "image_without_metadata", "item": f"HUVEC-09/Plate1/A0{i}_s1", "detail": "no row"}
        for i in range(problems)
    ]
    load = src.load

    def flaky(site_id):
        if site_id in unreadable:
            raise UnreadableSite(f"{site_id}.tif cannot be read: truncated")
        return load(site_id)

    src.load = flaky
    return src


def test_bad_input_is_skipped_counted_and_summarized(tmp_path, make_source, caplog):
    src = flawed_source(make_source)
    with caplog.at_level(logging.WARNING, logger="cellrep.data.shards.writer"):
        manifest = write_shards(src, tmp_path, samples_per_shard=5, progress=False, max_bad_fraction=0.2)
    assert manifest["bad_input"] == {
        "count": 3,
        "fraction": 3 / 26,
        "by_kind": {"image_without_metadata": 2, "unreadable_image": 1},
    }
    assert manifest["num_samples"] == 23 and sum(s["num_samples"] for s in manifest["shards"]) == 23
    index = read_index(tmp_path)
    assert "HUVEC-01_1_C03_2" not in set(index["site_id"]) and len(index) == 23
    for row in index.itertuples():  # the offsets still point at each written sample
        with open(tmp_path / row.shard, "rb") as f:
            f.seek(row.npy_offset)
            np.testing.assert_array_equal(np.load(io.BytesIO(f.read(row.npy_size))), src.images[row.site_id])
    assert "unreadable_image: 1 — HUVEC-01_1_C03_2 (HUVEC-01_1_C03_2.tif cannot be read" in caplog.text
    assert "image_without_metadata: 2 — HUVEC-09/Plate1/A00_s1" in caplog.text
    listed = json.loads((tmp_path / "problems.json").read_text())
    assert listed["total"] == 26 and len(listed["problems"]) == 3


def test_too_much_bad_input_fails_with_the_list_and_resumes_after(tmp_path, make_source):
    src = flawed_source(make_source, unreadable=("HUVEC-01_1_C03_2", "HUVEC-02_1_B02_1"), problems=0)
    with pytest.raises(
        CellrepError,
        match="(?s)more than data.max_bad_fraction=0.05.*unreadable_image: 2 — HUVEC-01_1_C03_2.*HUVEC-02_1_B02_1",
    ) as err:
        write_shards(src, tmp_path, samples_per_shard=5, progress=False, max_bad_fraction=0.05)
    assert "max_bad_fraction" in err.value.fix and not (tmp_path / "manifest.json").exists()
    written = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    assert len(written) == 6  # every shard is done: only the decision was left

    src.loads = 0
    manifest = write_shards(src, tmp_path, samples_per_shard=5, progress=False, max_bad_fraction=0.1)
    assert src.loads == 1  # the shape probe; no shard is rewritten, no bad site retried
    assert written == {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    assert manifest["num_samples"] == 22 and load_manifest(tmp_path) == manifest
    assert write_shards(src, tmp_path, samples_per_shard=5, progress=False, max_bad_fraction=0.1) == manifest


def test_index_problems_alone_fail_before_any_image_is_read(tmp_path, make_source):
    src = flawed_source(make_source, unreadable=(), problems=30)
    with pytest.raises(CellrepError, match="image_without_metadata: 30"):
        write_shards(src, tmp_path, progress=False)
    assert src.loads == 0 and not list(tmp_path.glob("*.tar"))


def test_temp_files_of_a_killed_run_are_removed(tmp_path, make_source):
    leftover = tmp_path / ".HUVEC-01-p1-0000.tar.k3j_x9.tmp"  # what atomic_open leaves behind a kill -9
    leftover.write_bytes(b"half a shard")
    write_shards(make_source(cell_types=("HUVEC",), experiments_per_type=1), tmp_path, progress=False)
    assert not leftover.exists() and not list(tmp_path.glob(".*tmp*"))


def test_first_site_unreadable_does_not_stop_the_shape_probe(tmp_path, make_source):
    first = sorted(make_source().metadata["site_id"])[0]
    src = flawed_source(make_source, unreadable=(first,), problems=0)
    manifest = write_shards(src, tmp_path, progress=False, max_bad_fraction=0.1)
    assert manifest["image_shape"] == [3, 16, 16] and manifest["bad_input"]["count"] == 1


# ------------------------------------------------------------------ RxRx1: shards and the official split
# (experiment, plate, well, well_type, sirna, sirna_id, dataset), as RxRx1 marks whole experiments test
OFFICIAL_WELLS = [
    (exp, plate, well, wt, sirna, sid, "test" if exp in ("HUVEC-03", "RPE-02") else "train")
    for exp in ("HUVEC-01", "HUVEC-02", "HUVEC-03", "RPE-01", "RPE-02")
    for plate in (1, 2)
    for well, wt, sirna, sid in (
        ("B02", "negative_control", "EMPTY", 1138),
        ("B03", "treatment", "s21721", 12),
        ("C04", "treatment", "s14729", 7),
        ("AA04", "positive_control", "s501309", 1120),
    )
]


def test_rxrx1_shards_hold_the_pngs_and_official_split_is_the_dataset_column(tmp_path, make_cfg):
    from cellrep.data.loading.datamodule import CellDataModule
    from cellrep.data.shards.prepare import ensure_shards

    root = tmp_path / "rxrx1"
    table = write_rxrx1(root, wells=OFFICIAL_WELLS)
    cfg = make_cfg(
        "data=rxrx1",
        f"data.root={root}",
        f"data.shards_dir={tmp_path}/shards",
        "split=official",
        "data.crop_size=8",
        "data.num_workers=0",
    )
    shards_dir = ensure_shards(cfg.data, progress=False).shards_dir
    for row in read_index(shards_dir).itertuples():
        with tarfile.open(shards_dir / row.shard) as tar:
            image = np.load(io.BytesIO(tar.extractfile(f"{row.key}.npy").read()))
            meta = json.loads(tar.extractfile(f"{row.key}.json").read())
        np.testing.assert_array_equal(image, np.stack([pixels(row.site_id, c) for c in range(1, 7)]))
        assert meta["dataset"] == table.set_index("site_id").loc[row.site_id, "dataset"]

    dm = CellDataModule.from_config(shards_dir, cfg.data, cfg.split, cfg.seed)
    expected = table["dataset"].value_counts().to_dict()
    assert dm.split_counts["test"] == expected["test"] == 32
    assert dm.split_counts["train"] + dm.split_counts["val"] == expected["train"] == 48
    assert dm.split_counts["val"] > 0
    by_split = dm.index.groupby("split")["site_id"].apply(set)
    assert by_split["test"] == set(table.loc[table["dataset"] == "test", "site_id"])
    assert set(dm.index.loc[dm.index["split"] == "val", "experiment"]) <= {"HUVEC-01", "HUVEC-02", "RPE-01"}
