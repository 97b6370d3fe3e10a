"""Shard writer: exact round trip, hand-checked stats, atomic + resumable, refusals."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest

from cellrep.data.shards.writer import load_manifest, read_index, shard_key, write_shards
from cellrep.errors import CellrepError


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_round_trip_is_exact(tiny_shards, tiny_source):
    manifest, index = load_manifest(tiny_shards), read_index(tiny_shards)
    assert manifest["num_samples"] == len(index) == len(tiny_source.metadata) == 72
    assert manifest["image_shape"] == [3, 16, 16] and manifest["channel_names"] == ["ch0", "ch1", "ch2"]
    assert sum(s["num_samples"] for s in manifest["shards"]) == 72
    assert [s["name"] for s in manifest["shards"]][:3] == [f"HUVEC-01-p1-{i:04d}.tar" for i in range(3)]
    # index order = shard order, then position; sites sorted within a plate
    assert list(dict.fromkeys(index["shard"])) == [s["name"] for s in manifest["shards"]]
    seen = 0
    for spec in manifest["shards"]:
        rows = index[index["shard"] == spec["name"]]
        assert len(rows) == spec["num_samples"] and list(rows["site_id"]) == sorted(rows["site_id"])
        members = _members(tiny_shards / spec["name"])
        assert len(members) == 2 * spec["num_samples"]
        for row in rows.itertuples():
            expected = io.BytesIO()
            np.save(expected, tiny_source.images[row.site_id])
            assert members[f"{row.key}.npy"] == expected.getvalue()
            meta = json.loads(members[f"{row.key}.json"])
            assert meta["site_id"] == row.site_id and meta["plate"] == 1 and meta["concentration"] is None
            with open(tiny_shards / row.shard, "rb") as f:  # the index's byte offsets point at the .npy
                f.seek(row.npy_offset)
                assert f.read(row.npy_size) == expected.getvalue()
            seen += 1
    assert seen == 72


def test_manifest_stats_by_hand(tiny_shards, tiny_source):
    manifest, meta = load_manifest(tiny_shards), tiny_source.metadata
    for (exp, plate), grp in meta.groupby(["experiment", "plate"]):
        ctrl = grp[grp["well_type"] == "negative_control"]["site_id"]
        pix = np.stack([tiny_source.images[s] for s in ctrl]).astype(np.float64)  # N×C×H×W
        stats = manifest["plate_stats"][f"{exp}/{plate}"]
        assert stats["num_controls"] == len(ctrl) == 4
        np.testing.assert_allclose(stats["mean"], pix.mean(axis=(0, 2, 3)), rtol=1e-12)
        np.testing.assert_allclose(stats["std"], pix.std(axis=(0, 2, 3)), rtol=1e-12)
    allpix = np.stack(list(tiny_source.images.values())).astype(np.float64)
    np.testing.assert_allclose(manifest["global_stats"]["mean"], allpix.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(manifest["global_stats"]["std"], allpix.std(axis=(0, 2, 3)), rtol=1e-12)


def test_plate_without_controls_uses_all_sites(tmp_path, caplog, make_source):
    src = make_source(cell_types=("HUVEC",), experiments_per_type=2)
    no_ctrl = (src.metadata["experiment"] == "HUVEC-01") & (src.metadata["well_type"] == "negative_control")
    src.metadata = src.metadata[~no_ctrl].reset_index(drop=True)
    with caplog.at_level(logging.WARNING, logger="cellrep.data.shards.writer"):
        manifest = write_shards(src, tmp_path, samples_per_shard=4, progress=False)
    assert "HUVEC-01/1" in caplog.text and "no negative-control" in caplog.text
    stats = manifest["plate_stats"]["HUVEC-01/1"]
    pix = np.stack([src.images[s] for s in src.metadata.query("experiment == 'HUVEC-01'")["site_id"]]).astype(float)
    assert stats["num_controls"] == 0
    np.testing.assert_allclose(stats["mean"], pix.mean(axis=(0, 2, 3)), rtol=1e-12)
    assert manifest["plate_stats"]["HUVEC-02/1"]["num_controls"] == 4


def test_parallel_writing_is_byte_identical(tmp_path, tiny_shards, tiny_source):
    write_shards(tiny_source, tmp_path, samples_per_shard=5, num_workers=2, progress=False)
    for path in sorted(tiny_shards.iterdir()):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_interrupted_run_resumes_without_rewriting(tmp_path, tiny_shards, make_source):
    plan = read_index(tiny_shards)
    third_shard = plan[plan["shard"] == plan["shard"].unique()[2]]
    failing = make_source(fail_at=third_shard["site_id"].iloc[1])
    with pytest.raises(CellrepError, match=f"reading site {failing.fail_at} failed"):
        write_shards(failing, tmp_path, samples_per_shard=5, progress=False)
    names = list(plan["shard"].unique())
    done = {n: (tmp_path / n).stat() for n in names[:2]}
    assert not (tmp_path / names[2]).exists() and not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.glob(".*tmp*")), "no temp files left behind"
    with pytest.raises(CellrepError, match="(?s)incomplete.*cellrep-shard"):
        load_manifest(tmp_path)

    fixed = make_source()  # same fingerprint: the failure was transient
    manifest = write_shards(fixed, tmp_path, samples_per_shard=5, progress=False)
    for n, st in done.items():
        after = (tmp_path / n).stat()
        assert (after.st_ino, after.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{n} was rewritten"
    assert fixed.loads == 72 - 10 + 1  # the unfinished shards plus the shape probe
    assert manifest == load_manifest(tiny_shards)
    for n in names:
        assert (tmp_path / n).read_bytes() == (tiny_shards / n).read_bytes()


def test_complete_dataset_is_up_to_date(tiny_shards, make_source):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_shards.iterdir()}
    src = make_source()
    assert write_shards(src, tiny_shards, samples_per_shard=5, progress=False) == load_manifest(tiny_shards)
    assert src.loads == 0 and before == {p.name: p.stat().st_mtime_ns for p in tiny_shards.iterdir()}


def test_other_dataset_is_refused(tiny_shards, make_source):
    with pytest.raises(CellrepError, match="tiny-v1.*other-v2(.|\n)*delete") as err:
        write_shards(make_source(fingerprint="other-v2"), tiny_shards, samples_per_shard=5, progress=False)
    assert "shards_dir" in str(err.value)
    assert load_manifest(tiny_shards)["fingerprint"] == "tiny-v1"


def test_resharding_with_another_size_replaces_old_shards(tmp_path, make_source):
    src = make_source(cell_types=("HUVEC",), experiments_per_type=1)
    write_shards(src, tmp_path, samples_per_shard=5, progress=False)
    manifest = write_shards(src, tmp_path, samples_per_shard=12, progress=False)
    assert [s["name"] for s in manifest["shards"]] == ["HUVEC-01-p1-0000.tar"]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["HUVEC-01-p1-0000.tar"]
    assert len(_members(tmp_path / "HUVEC-01-p1-0000.tar")) == 24


def test_bad_images_are_refused(tmp_path, make_source):
    src = make_source(cell_types=("HUVEC",), experiments_per_type=1)
    src.channel_names = ("a", "b")
    with pytest.raises(CellrepError, match="3 channels.*names 2"):
        write_shards(src, tmp_path / "a", progress=False)
    bad = make_source(cell_types=("HUVEC",), experiments_per_type=1, bad_site="HUVEC-01_1_C03_2")
    with pytest.raises(CellrepError, match="site HUVEC-01_1_C03_2: image is uint16"):
        write_shards(bad, tmp_path / "b", progress=False)


def test_missing_shards_name_the_command(tmp_path):
    for fn in (load_manifest, read_index):
        with pytest.raises(CellrepError, match="cellrep-shard"):
            fn(tmp_path)


def test_keys_have_no_dots():
    assert shard_key("exp.1_1_B02_1") == "exp_1_1_B02_1"
