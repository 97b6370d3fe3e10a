"""TIFF plates on small files written here: one TIFF per channel, multi-page TIFFs, uint8 and uint16,
a mapped metadata CSV, and a JUMP-style CellProfiler load_data.csv with plate maps."""

from __future__ import annotations

import io
import json
import tarfile
import zlib

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cellrep.data.shards.writer import read_index, write_shards
from cellrep.data.sources.tiff_plates import TiffPlateSource, to_uint8
from cellrep.errors import CellrepError

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")  # JUMP's five
SIZE = (20, 18)
PER_CHANNEL = "images/{batch}/P{plate}/{well}_s{site}_w{channel_index}.tif"
MULTIPAGE = "stacks/{batch}/P{plate}/{well}_s{site}.tiff"
COLUMNS = {
    "experiment": "batch",
    "cell_type": "cell_line",
    "perturbation": "compound",
    "concentration": "dose_uM",
    "perturbation_type": "pert_type",
}
WELLS = [
    ("B02", "DMSO", ""),
    ("B03", "DMSO", ""),
    ("C02", "cmpd-1", "1.0"),
    ("C03", "cmpd-2", "1.0"),
    ("C04", "cmpd-3", "0.1"),
    ("C05", "cmpd-4", "10"),
]


def raw_pixels(name: str, channel: int, dtype) -> np.ndarray:
    rng = np.random.default_rng([zlib.crc32(name.encode()), channel])
    high = 256 if dtype == np.uint8 else 4096 + 500 * channel  # 12-bit camera data in 16-bit files
    return rng.integers(0, high, size=SIZE).astype(dtype)


def site_rows(batches=("batch-A", "batch-B"), sites=2):
    return [
        dict(
            batch=b,
            plate=1,
            well=w,
            site=s,
            cell_line="U2OS",
            compound=c,
            dose_uM=d,
            pert_type="compound" if c != "DMSO" else "",
        )
        for b in batches
        for w, c, d in WELLS
        for s in range(1, sites + 1)
    ]


def write_tiffs(root, layout="per_channel", dtype=np.uint8, rows=None, channels=len(CHANNELS)):
    rows = site_rows() if rows is None else rows
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    for r in rows:
        name = f"{r['batch']}_{r['well']}_{r['site']}"
        planes = np.stack([raw_pixels(name, c, dtype) for c in range(channels)])
        if layout == "per_channel":
            for c in range(channels):
                path = root / PER_CHANNEL.format(**r, channel_index=c + 1)
                path.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(path, planes[c])
        else:
            path = root / MULTIPAGE.format(**r)
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, planes, photometric="minisblack")  # one page per channel
    return root


def source(root, layout="per_channel", **kw):
    kw.setdefault("pattern", PER_CHANNEL if layout == "per_channel" else MULTIPAGE)
    kw.setdefault("channel_names", CHANNELS)
    return TiffPlateSource(root, columns=COLUMNS, negative_controls=["DMSO"], **kw)


def shard_members(shards_dir):
    out = {}
    for row in read_index(shards_dir).itertuples():
        with tarfile.open(shards_dir / row.shard) as tar:
            out[row.site_id] = (
                np.load(io.BytesIO(tar.extractfile(f"{row.key}.npy").read())),
                json.loads(tar.extractfile(f"{row.key}.json").read()),
            )
    return out


@pytest.mark.parametrize("layout", ["per_channel", "multipage"])
def test_uint8_tiffs_shard_to_exactly_the_written_pixels(tmp_path, layout):
    root = write_tiffs(tmp_path / "screen", layout)
    src = source(root, layout)
    assert src.layout == layout and src.problems == [] and src.channel_names == CHANNELS
    manifest = write_shards(src, tmp_path / "shards", samples_per_shard=5, progress=False)
    assert manifest["channel_names"] == list(CHANNELS) and manifest["image_shape"] == [5, *SIZE]
    assert manifest["source"]["layout"] == layout and manifest["source"]["bit_depth_rule"] == "percentile"
    members = shard_members(tmp_path / "shards")
    assert len(members) == 24
    for r in site_rows():
        sid = f"{r['batch']}_1_{r['well']}_{r['site']}"
        image, meta = members[sid]
        name = f"{r['batch']}_{r['well']}_{r['site']}"
        np.testing.assert_array_equal(image, np.stack([raw_pixels(name, c, np.uint8) for c in range(5)]))
        assert (meta["experiment"], meta["plate"], meta["well"], meta["site"]) == (r["batch"], 1, r["well"], r["site"])
        assert meta["cell_type"] == "U2OS" and meta["perturbation"] == r["compound"]
        if r["compound"] == "DMSO":
            assert (meta["well_type"], meta["perturbation_type"], meta["concentration"]) == (
                "negative_control",
                "control",
                None,
            )
        else:
            assert (meta["well_type"], meta["perturbation_type"]) == ("treatment", "COMPOUND")
            assert meta["concentration"] == float(r["dose_uM"])


@pytest.mark.parametrize("layout", ["per_channel", "multipage"])
@pytest.mark.parametrize("rule", ["percentile", "max", "shift"])
def test_uint16_tiffs_follow_the_recorded_rule(tmp_path, layout, rule):
    root = write_tiffs(tmp_path / "screen", layout, dtype=np.uint16)
    src = source(root, layout, bit_depth_rule=rule, max_value=4095, shift=4, sample_sites=100)
    manifest = write_shards(
        src, tmp_path / "shards", samples_per_shard=7, num_workers=2 if rule == "max" else 0, progress=False
    )
    info = manifest["source"]
    assert info["bit_depth_rule"] == rule
    members, rows = shard_members(tmp_path / "shards"), site_rows()
    for batch in ("batch-A", "batch-B"):
        names = [f"{r['batch']}_{r['well']}_{r['site']}" for r in rows if r["batch"] == batch]
        raw = np.stack([np.stack([raw_pixels(n, c, np.uint16) for c in range(5)]) for n in names])  # S×C×H×W
        if rule == "percentile":  # every site sampled: the levels are the plate's own percentiles
            expected_levels = [np.percentile(raw[:, c], [0.1, 99.9]).tolist() for c in range(5)]
            np.testing.assert_allclose(info["levels"][f"{batch}/1"], expected_levels)
        for name, image in zip(names, raw):
            got = members[name.replace("_", "_1_", 1)][0]
            if rule == "shift":
                want = np.minimum(image >> 4, 255).astype(np.uint8)  # channels above 12 bits saturate
            elif rule == "max":
                want = np.clip(np.rint(image.astype(np.float64) * 255 / 4095), 0, 255).astype(np.uint8)
            else:
                lv = info["levels"][f"{batch}/1"]
                want = np.stack([to_uint8(image[c], "percentile", lv[c]) for c in range(5)])
                assert got.min() == 0 and got.max() == 255
            np.testing.assert_array_equal(got, want)


def test_percentile_levels_over_worker_processes_equal_the_serial_ones(tmp_path, capsys, make_cfg):
    rows = site_rows(batches=("batch-A", "batch-B", "batch-C"), sites=3)
    rows += [dict(r, plate=2) for r in rows if r["batch"] == "batch-C"]  # 4 plates, 18 sites each
    root = write_tiffs(tmp_path / "screen", dtype=np.uint16, rows=rows)
    serial = source(root, sample_sites=5)
    levels = serial.compute_levels(num_workers=0)
    capsys.readouterr()
    parallel = source(root, sample_sites=5, num_workers=3, progress=True)
    assert parallel.compute_levels() == levels and len(levels) == 4  # bit-identical floats, every plate
    bar = capsys.readouterr().err
    assert "16-bit percentile levels: 100%" in bar and "4/4" in bar  # the progress bar counted every plate
    for key, plate_levels in levels.items():  # and they are the percentiles of the 5 sampled sites
        e, p = key.split("/")
        picked = serial._plate_sample(e, int(p))
        assert len(picked) == 5
        raw = np.stack([np.stack([tifffile.imread(f) for f in files]) for files in picked])
        np.testing.assert_allclose(plate_levels, [np.percentile(raw[:, c], [0.1, 99.9]) for c in range(5)])
    first = write_shards(serial, tmp_path / "serial", samples_per_shard=7, progress=False)
    second = write_shards(parallel, tmp_path / "parallel", samples_per_shard=7, progress=False)
    assert first["source"]["levels"] == second["source"]["levels"]
    for tar in sorted((tmp_path / "serial").glob("*.tar")):
        assert (tmp_path / "parallel" / tar.name).read_bytes() == tar.read_bytes()

    from cellrep.data.shards.prepare import build_source  # cellrep-shard: data.shard_workers processes compute them

    cfg = make_cfg(
        "data=tiff",
        f"data.root={root}",
        f"data.pattern='{PER_CHANNEL}'",
        "data.shard_workers=2",
        f"data.channel_names=[{','.join(CHANNELS)}]",
        "data.tiff.negative_controls=[DMSO]",
        "data.tiff.sample_sites=5",
        *[f"data.columns.{k}={v}" for k, v in COLUMNS.items()],
        config_name="shard",
    )
    configured, _ = build_source(cfg.data, progress=False)
    assert configured.num_workers == 2 and configured.describe()["levels"] == levels


def test_rule_and_levels_change_the_fingerprint(tmp_path):
    root = write_tiffs(tmp_path / "screen", dtype=np.uint16)
    prints = {
        source(root, **kw).fingerprint
        for kw in ({}, {"bit_depth_rule": "shift"}, {"bit_depth_rule": "shift", "shift": 4}, {"percentile": (1, 99)})
    }
    assert len(prints) == 4 and source(root).fingerprint == source(root).fingerprint


def test_lzw_tiffs_are_read_without_imagecodecs(tmp_path):
    root = write_tiffs(tmp_path / "screen")
    r = site_rows()[0]
    path = root / PER_CHANNEL.format(**r, channel_index=2)
    plane = raw_pixels(f"{r['batch']}_{r['well']}_{r['site']}", 1, np.uint8)
    Image.fromarray(plane).save(path, compression="tiff_lzw")
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == 5  # LZW: tifffile alone would need imagecodecs
    np.testing.assert_array_equal(source(root).load(f"{r['batch']}_1_{r['well']}_{r['site']}")[1], plane)


def test_bad_input_is_counted_named_and_fails_above_the_threshold(tmp_path):
    rows = site_rows()
    root = write_tiffs(tmp_path / "screen", rows=rows)
    orphan = dict(rows[0], well="H12")  # on disk, in no metadata row
    for c in range(1, 6):
        (root / PER_CHANNEL.format(**orphan, channel_index=c)).write_bytes(
            (root / PER_CHANNEL.format(**rows[0], channel_index=c)).read_bytes()
        )
    (root / PER_CHANNEL.format(**rows[1], channel_index=3)).unlink()  # a missing channel
    corrupt = root / PER_CHANNEL.format(**rows[5], channel_index=4)
    corrupt.write_bytes(corrupt.read_bytes()[:100])  # truncated TIFF
    pd.DataFrame(rows + [dict(rows[0], well="P24")]).to_csv(root / "metadata.csv", index=False)  # no images
    src = source(root)
    kinds = sorted((p["kind"], p["item"]) for p in src.problems)
    assert [k for k, _ in kinds] == ["image_without_metadata"] * 5 + ["metadata_without_image", "missing_channel"]
    assert ("missing_channel", "batch-A_1_B02_2") in kinds and ("metadata_without_image", "batch-A_1_P24_1") in kinds
    assert all("H12" in item for k, item in kinds if k == "image_without_metadata")

    with pytest.raises(CellrepError, match="(?s)too much bad input.*metadata_without_image.*batch-A_1_P24_1"):
        write_shards(src, tmp_path / "strict", progress=False, max_bad_fraction=0.05)
    manifest = write_shards(src, tmp_path / "lenient", progress=False, max_bad_fraction=0.5)
    assert manifest["bad_input"]["by_kind"] == {
        "image_without_metadata": 5,
        "metadata_without_image": 1,
        "missing_channel": 1,
        "unreadable_image": 1,
    }
    bad = rows[5]
    unreadable = f"{bad['batch']}_1_{bad['well']}_{bad['site']}"
    assert unreadable not in set(read_index(tmp_path / "lenient")["site_id"])
    listed = json.loads((tmp_path / "lenient" / "problems.json").read_text())["problems"]
    assert any(p["item"] == unreadable and "w4.tif" in p["detail"] for p in listed)
    assert manifest["num_samples"] == 24 - 2


def test_configuration_mistakes_name_the_fix(tmp_path):
    root = write_tiffs(tmp_path / "screen")
    with pytest.raises(CellrepError, match="channel names") as err:
        source(root, channel_names=None)
    assert "data.channel_names" in err.value.fix
    with pytest.raises(CellrepError, match="data.columns.perturbation='cmpd'"):
        TiffPlateSource(root, pattern=PER_CHANNEL, channel_names=CHANNELS, columns={**COLUMNS, "perturbation": "cmpd"})
    with pytest.raises(CellrepError, match="no perturbation_type"):
        TiffPlateSource(
            root,
            pattern=PER_CHANNEL,
            channel_names=CHANNELS,
            columns={k: v for k, v in COLUMNS.items() if k != "perturbation_type"},
        )
    with pytest.raises(CellrepError, match="cannot be filled"):
        source(root, pattern="images/{batch}/{nope}.tif")
    with pytest.raises(CellrepError, match="none of the .* image files exist"):
        source(root, pattern="elsewhere/{batch}/{well}_{site}_w{channel_index}.tif")
    multi = source(write_tiffs(tmp_path / "multi", "multipage"), "multipage", channel_names=None)
    assert multi.channel_names == ("ch1", "ch2", "ch3", "ch4", "ch5")  # counted from the pages


# ------------------------------------------------------------------ JUMP: CellProfiler load_data.csv
PLATES = {"BR00117035": "2021_04_26_Batch1", "BR00117036": "2021_04_26_Batch1", "BR00121331": "2021_05_31_Batch2"}
WELL_JCP = {"A01": "JCP2022_033924", "A02": "JCP2022_085227", "B01": "JCP2022_033924", "B02": "JCP2022_050797"}


def write_jump(root, dtype=np.uint16, gzipped=True, batch_in_load_data=False):
    """load_data.csv with s3 PathNames (as in the Cell Painting Gallery) and the JUMP metadata tables as
    published: plate.csv.gz (the batch), well.csv.gz, compound.csv.gz (``gzipped=False``: plain .csv)."""
    ext = ".csv.gz" if gzipped else ".csv"
    load = []
    for plate, batch in PLATES.items():
        for well in WELL_JCP:
            for site in (1, 2):
                row = dict(Metadata_Source="source_4", Metadata_Plate=plate, Metadata_Well=well, Metadata_Site=site)
                if batch_in_load_data:
                    row["Metadata_Batch"] = batch
                for c, ch in enumerate(CHANNELS):
                    folder = f"s3://cellpainting-gallery/cpg0016-jump/source_4/images/{batch}/images/{plate}/Images/"
                    fname = f"r{well[1:]}c{well[0]}f{site:02d}p01-ch{c + 1}sk1fk1fl1.tiff"
                    row[f"FileName_Orig{ch}"], row[f"PathName_Orig{ch}"] = fname, folder
                    local = root / folder.replace("s3://cellpainting-gallery/", "") / fname
                    local.parent.mkdir(parents=True, exist_ok=True)
                    tifffile.imwrite(local, raw_pixels(f"{plate}_{well}_{site}", c, dtype))
                load.append(row)
    load.append(dict(load[-1], Metadata_Well="H24"))  # an image listed but absent from the plate map
    pd.DataFrame(load).to_csv(root / f"load_data{ext}", index=False)
    plates = [
        dict(Metadata_Source="source_4", Metadata_Batch=b, Metadata_Plate=p, Metadata_PlateType="COMPOUND")
        for p, b in PLATES.items()
    ]
    plates.append(dict(plates[0], Metadata_Plate="BR00999999"))  # a plate of the table not imaged here
    pd.DataFrame(plates).to_csv(root / f"plate{ext}", index=False)
    wells = [
        dict(Metadata_Source="source_4", Metadata_Plate=p, Metadata_Well=w, Metadata_JCP2022=j)
        for p in PLATES
        for w, j in WELL_JCP.items()
    ]
    pd.DataFrame(wells).to_csv(root / f"well{ext}", index=False)
    compounds = [
        ("JCP2022_033924", "IAZDPXIOMUYVGZ-UHFFFAOYSA-N", "InChI=1S/C2H6OS/c1-4(2)3/h1-2H3", "CS(C)=O"),
        (
            "JCP2022_085227",
            "BSYNRYMUTXBXSQ-UHFFFAOYSA-N",
            "InChI=1S/C9H8O4/c1-6(10)13-8-5-3-2-4-7(8)9(11)12/h2-5H,1H3,(H,11,12)",
            "CC(=O)Oc1ccccc1C(=O)O",
        ),
        ("JCP2022_050797", "LFQSCWFLJHTTHZ-UHFFFAOYSA-N", "InChI=1S/C2H6O/c1-2-3/h3H,2H2,1H3", "CCO"),
    ]
    columns = ["Metadata_JCP2022", "Metadata_InChIKey", "Metadata_InChI", "Metadata_SMILES"]
    pd.DataFrame(compounds, columns=columns).to_csv(root / f"compound{ext}", index=False)
    return root


def jump_cfg(make_cfg, root, tmp_path, *overrides):
    return make_cfg(
        "data=jump_load_data",
        f"data.root={root}",
        f"data.shards_dir={tmp_path}/shards",
        "data.tiff.path_prefixes=[[s3://cellpainting-gallery/,'']]",
        *overrides,
        config_name="shard",
    )


@pytest.mark.parametrize(
    "gzipped, batch_in_load_data",
    [(True, False), (False, True)],
    ids=["gzipped, batch from plate.csv", "plain, batch in load_data too"],
)
def test_jump_load_data_with_the_published_metadata_tables(tmp_path, make_cfg, gzipped, batch_in_load_data):
    from cellrep.data.shards.prepare import build_source

    root = write_jump(tmp_path / "jump", gzipped=gzipped, batch_in_load_data=batch_in_load_data)
    src, _ = build_source(jump_cfg(make_cfg, root, tmp_path).data, progress=False)  # metadata: load_data.csv
    assert src.layout == "load_data" and src.channel_names == CHANNELS
    assert [(p["kind"], p["item"]) for p in src.problems] == [
        ("image_without_metadata", "2021_05_31_Batch2_BR00121331_H24_2")
    ]
    meta = src.metadata.set_index("site_id")
    assert len(meta) == 24
    assert meta.groupby("experiment")["plate"].unique().map(sorted).to_dict() == {
        "2021_04_26_Batch1": [1, 2],
        "2021_05_31_Batch2": [1],
    }
    row = meta.loc["2021_04_26_Batch1_BR00117036_A02_2"]
    assert (row["plate"], row["perturbation"], row["perturbation_type"], row["cell_type"], row["smiles"]) == (
        2,
        "JCP2022_085227",
        "COMPOUND",
        "U2OS",
        "CC(=O)Oc1ccccc1C(=O)O",
    )
    ctrl = meta.loc["2021_05_31_Batch2_BR00121331_B01_1"]
    assert (ctrl["well_type"], ctrl["perturbation_type"], ctrl["smiles"]) == ("negative_control", "control", "CS(C)=O")
    manifest = write_shards(src, tmp_path / "shards", progress=False, max_bad_fraction=0.1)
    assert manifest["source"]["plate_names"] == {
        "2021_04_26_Batch1/1": "BR00117035",
        "2021_04_26_Batch1/2": "BR00117036",
        "2021_05_31_Batch2/1": "BR00121331",
    }
    image = shard_members(tmp_path / "shards")["2021_04_26_Batch1_BR00117036_A02_2"][0]
    levels = manifest["source"]["levels"]["2021_04_26_Batch1/2"]
    raw = [raw_pixels("BR00117036_A02_2", c, np.uint16) for c in range(5)]
    np.testing.assert_array_equal(image, np.stack([to_uint8(raw[c], "percentile", levels[c]) for c in range(5)]))


def test_jump_plate_map_under_another_name_says_which_setting_to_fix(tmp_path, make_cfg):
    from cellrep.data.shards.prepare import build_source

    root = write_jump(tmp_path / "jump", gzipped=False)
    (root / "well.csv").rename(root / "wells_source_4.csv")
    cfg = jump_cfg(make_cfg, root, tmp_path)
    with pytest.raises(CellrepError, match=r"plate_maps\[1\].*well\.csv\.gz is missing") as err:
        build_source(cfg.data, progress=False)
    assert "data.tiff.plate_maps[1].path" in err.value.fix and "data.metadata" not in err.value.fix
    cfg = jump_cfg(make_cfg, root, tmp_path, "data.tiff.plate_maps.1.path=wells_source_4.csv")
    assert len(build_source(cfg.data, progress=False)[0].metadata) == 24  # the fix it names works


def test_five_channel_tiff_dataset_trains_with_in_chans_5(tmp_path, make_cfg):
    import torch

    from cellrep.cli.train import train
    from cellrep.data.loading.datamodule import CellDataModule
    from cellrep.training.tasks import build_task

    root = write_tiffs(tmp_path / "screen", dtype=np.uint16)
    cfg = make_cfg(
        "data=tiff",
        f"data.root={root}",
        f"data.pattern='{PER_CHANNEL}'",
        f"data.channel_names=[{','.join(CHANNELS)}]",
        "data.tiff.negative_controls=[DMSO]",
        *[f"data.columns.{k}={v}" for k, v in COLUMNS.items()],
        "data.crop_size=16",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.samples_per_shard=8",
        "model=resnet18",
        "trainer.fast_dev_run=true",
        "trainer.enable_model_summary=false",
        "logger=csv",
    )
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"] == "tiff" and metrics["num_classes"] == 5
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    assert manifest["image_shape"][0] == 5 and manifest["channel_names"] == list(CHANNELS)
    task = build_task(cfg, CellDataModule.from_config(root / "shards", cfg.data, cfg.split, cfg.seed))
    first_conv = next(m for m in task.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 5
