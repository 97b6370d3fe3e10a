"""Small RxRx1 datasets written in the real layout: images/<experiment>/Plate<p>/<well>_s<site>_w<c>.png + metadata.csv."""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
from PIL import Image

RXRX1_COLUMNS = [
    "site_id",
    "well_id",
    "cell_type",
    "dataset",
    "experiment",
    "plate",
    "well",
    "site",
    "well_type",
    "sirna",
    "sirna_id",
]
# (experiment, plate, well, well_type, sirna, sirna_id, dataset); two sites per well
WELLS = [
    ("HUVEC-01", 1, "B02", "treatment", "s21721", 12, "train"),
    ("HUVEC-01", 1, "B03", "negative_control", "EMPTY", 1138, "train"),
    ("HUVEC-01", 2, "AA04", "positive_control", "s501309", 1120, "train"),
    ("U2OS-03", 4, "O23", "treatment", "s14729", 7, "test"),
]
SIZE = (12, 10)  # height, width: not square, so transposes are caught


def pixels(site_id: str, channel: int, shape=SIZE) -> np.ndarray:
    """Distinct, reproducible content per site and channel."""
    rng = np.random.default_rng([zlib.crc32(site_id.encode()), channel])
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_rxrx1(root, wells=WELLS, channels=6, extra_columns=None, drop_column=None):
    """Write an RxRx1-format folder: metadata.csv + images/<exp>/Plate<p>/<well>_s<site>_w<c>.png."""
    rows = []
    for experiment, plate, well, well_type, sirna, sirna_id, dataset in wells:
        for site in (1, 2):
            site_id = f"{experiment}_{plate}_{well}_{site}"
            rows.append(
                dict(
                    site_id=site_id,
                    well_id=f"{experiment}_{plate}_{well}",
                    cell_type=experiment[:-3],
                    dataset=dataset,
                    experiment=experiment,
                    plate=plate,
                    well=well,
                    site=site,
                    well_type=well_type,
                    sirna=sirna,
                    sirna_id=sirna_id,
                )
            )
            folder = root / "images" / experiment / f"Plate{plate}"
            folder.mkdir(parents=True, exist_ok=True)
            for c in range(1, channels + 1):
                Image.fromarray(pixels(site_id, c)).save(folder / f"{well}_s{site}_w{c}.png")
    table = pd.DataFrame(rows, columns=RXRX1_COLUMNS)
    for name, values in (extra_columns or {}).items():
        table[name] = values
    if drop_column:
        table = table.drop(columns=[drop_column])
    table.to_csv(root / "metadata.csv", index=False)
    return table
