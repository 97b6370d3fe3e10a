"""Small RxRx3-core datasets in the real HuggingFace format (parquet shards of JPEG 2000 channels + metadata CSV)."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

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
