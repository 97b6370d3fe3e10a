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
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cellrep.data.schema import CANONICAL_COLUMNS
from cellrep.data.shards.writer import load_manifest, read_index, write_shards
from cellrep.data.sources.base import ImageSource
from cellrep.data.sources.rxrx3_core import RxRx3CoreSource
from cellrep.errors import CellrepError

META_COLUMNS = [
    "well_id",
    "experiment_name",
    "plate",
    "address",
    "gene",
    "treatment",
    "SMILES",
    "concentration",
    "perturbation_type",
    "cell_type",
]
RAPA = "C[C@@H]1CC[C@H]2C[C@@H](/C(=C/C=C/C=C/[C@H](C[C@H](C(=O)[C@@H]([C@@H](/C(=C/[C@H](C(=O)C[C@H](OC(=O)[C@@H]3"
# experiment, plate, address, gene, treatment, SMILES, concentration, perturbation_type
WELLS = [
    ("gene-001", 1, "AA02", "PLK1", "PLK1_guide_3", "", "", "CRISPR"),
    ("gene-001", 1, "AA03", "MTOR", "MTOR_guide_1", "", "", "CRISPR"),
    ("gene-001", 1, "B04", "EMPTY_control", "EMPTY_control", "", "", "CRISPR"),
    ("gene-001", 2, "AA02", "PLK1", "PLK1_guide_5", "", "", "CRISPR"),
    ("gene-001", 2, "C10", "EMPTY_control", "EMPTY_control", "", "", "CRISPR"),
    ("compound-001", 1, "C05", "", "Rapamycin", RAPA, "0.0025", "COMPOUND"),
    ("compound-001", 1, "C06", "", "Rapamycin", RAPA, "10.0", "COMPOUND"),
    ("compound-001", 1, "D07", "", "CRISPR_control", "", "", "COMPOUND"),
    ("compound-001", 1, "D08", "", "EMPTY_control", "", "", "COMPOUND"),
]
SIZE = (12, 10)  # height, width: not square, so transposes are caught


def pixels(key: str, shape=SIZE) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def jp2(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG2000")  # Pillow's default is the reversible (lossless) 5/3 path
    return buf.getvalue()


def well_key(experiment, plate, address, channel, site=1):
    return f"{experiment}/Plate{plate}/{address}_s{site}_{channel}"


def write_rxrx3_core(
    root,
    wells=WELLS,
    channels=6,
    files=2,
    row_group_size=7,
    struct=True,
    extra_keys=(),
    drop_keys=(),
    corrupt=(),
    metadata_wells=None,
    image=pixels,
):
    """Write the HF layout; ``extra_keys`` (key -> bytes) add rows, ``corrupt`` keys get truncated jp2.
    ``image(key)`` is the uint8 plane stored under a key (default: reproducible noise)."""
    rows = [
        dict(zip(META_COLUMNS, (f"{e}_{p}_{a}", e, p, a, g, t, s, c, pt, "HUVEC")))
        for e, p, a, g, t, s, c, pt in (wells if metadata_wells is None else metadata_wells)
    ]
    (root / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=META_COLUMNS).to_csv(root / "metadata_rxrx3_core.csv", index=False)
    images = {well_key(e, p, a, c): None for e, p, a, *_ in wells for c in range(1, channels + 1)}
    images = {k: jp2(image(k)) for k in images if k not in drop_keys}
    for k in corrupt:
        images[k] = images[k][: len(images[k]) // 3]
    images.update(extra_keys)
    keys = sorted(images)
    for i, chunk in enumerate(np.array_split(np.array(keys, dtype=object), files)):
        data = [images[k] for k in chunk]
        jcol = (
            pa.array(
                [{"bytes": d, "path": None} for d in data],
                type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            )
            if struct
            else pa.array(data, type=pa.binary())
        )
        table = pa.table({"__key__": pa.array(list(chunk), type=pa.string()), "jp2": jcol})
        pq.write_table(table, root / "data" / f"train-{i:05d}-of-{files:05d}.parquet", row_group_size=row_group_size)
    return root


def expected_image(site_id_parts, channels=6):
    e, p, a = site_id_parts
    return np.stack([pixels(well_key(e, p, a, c)) for c in range(1, channels + 1)])


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


def test_shard_command_config_reads_rxrx3_core(make_cfg, tmp_path, rxrx3_root):
    from cellrep.data.shards.prepare import ensure_shards

    cfg = make_cfg(
        "data=rxrx3_core", f"data.root={rxrx3_root}", f"data.shards_dir={tmp_path}/shards", config_name="shard"
    )
    manifest = load_manifest(ensure_shards(cfg.data, progress=False))
    assert manifest["dataset"] == "rxrx3_core" and manifest["num_samples"] == len(WELLS)
