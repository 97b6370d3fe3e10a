"""Reader for the RxRx1 on-disk format (and the synthetic screen, which uses it).

Layout: ``<root>/metadata.csv`` and ``<root>/images/<experiment>/Plate<p>/<well>_s<site>_w<c>.png``,
one 8-bit grayscale PNG per channel ``c = 1..C``. RxRx1 names perturbations in
a ``sirna`` column with ``EMPTY`` for untreated negative controls; the synthetic
screen adds ``perturbation_type``, ``concentration`` and ``target`` columns.
Problems are found at construction (missing folders, wrong channel count), not
ten thousand steps into training. A site whose PNG is missing, truncated or corrupt
raises :class:`~cellrep.data.sources.base.UnreadableSite` from ``load``: the shard writer
skips it, counts it and names it in its end-of-sharding summary (docs/architecture.md, "Bad input").
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cellrep.data.schema import NEGATIVE_CONTROL, RXRX1_CHANNELS, validate_metadata
from cellrep.data.sources.base import UnreadableSite
from cellrep.errors import CellrepError

READER_VERSION = "rxrx1/1"  # bump when the mapping onto the canonical schema changes
REQUIRED_COLUMNS = ("site_id", "cell_type", "experiment", "plate", "well", "site", "well_type", "sirna")
RXRX1_EMPTY = "EMPTY"  # RxRx1's name for untreated negative-control wells
_CHANNEL_FILE = re.compile(r"_w(\d+)\.png$")


def _to_canonical(raw: pd.DataFrame, source: str) -> pd.DataFrame:
    """Map RxRx1 columns onto the canonical schema (docs/data.md)."""
    sirna = raw["sirna"].astype("string").str.strip()
    well_type = raw["well_type"].astype("string").str.strip()
    is_control = sirna.isin([RXRX1_EMPTY, NEGATIVE_CONTROL]) | (sirna.isna() & (well_type == "negative_control"))
    out = pd.DataFrame(
        {
            "site_id": raw["site_id"],
            "experiment": raw["experiment"],
            "plate": raw["plate"],
            "well": raw["well"],
            "site": raw["site"],
            "cell_type": raw["cell_type"],
            "perturbation": sirna.mask(is_control, NEGATIVE_CONTROL),
            "well_type": well_type,
        }
    )
    if "perturbation_type" in raw.columns:  # the synthetic screen's extension
        out["perturbation_type"] = raw["perturbation_type"]
    else:  # real RxRx1: everything but untreated wells is an siRNA (positive controls too)
        out["perturbation_type"] = np.where(is_control, "control", "siRNA")
    if "concentration" in raw.columns:
        conc = raw["concentration"].astype("string").str.strip().replace("", pd.NA)
        try:
            out["concentration"] = pd.to_numeric(conc, errors="raise").astype("float64")
        except (TypeError, ValueError) as exc:
            raise CellrepError(
                f"{source}: column 'concentration' is not numeric: {exc}",
                fix="write concentrations in µM as numbers, empty for non-compounds",
            ) from None
    else:
        out["concentration"] = np.nan
    for optional in ("dataset", "target", "smiles"):
        if optional in raw.columns:
            out[optional] = raw[optional]
    return validate_metadata(out, source)


class RxRx1Source:
    """An :class:`~cellrep.data.sources.base.ImageSource` over an RxRx1-format folder."""

    name = "rxrx1"

    def __init__(
        self,
        root: str | Path,
        channel_names: tuple[str, ...] | list[str] = RXRX1_CHANNELS,
        expected_channels: int | None = None,
    ):
        self.root = Path(root).expanduser()
        self.channel_names = tuple(channel_names)
        if not self.root.is_dir():
            raise CellrepError(
                f"RxRx1 root {self.root} does not exist or is not a directory",
                fix="set data.root to the folder holding metadata.csv and images/",
            )
        metadata_path = self.root / "metadata.csv"
        if not metadata_path.is_file():
            raise CellrepError(
                f"{metadata_path} is missing",
                fix="point data.root at the RxRx1 folder that contains metadata.csv "
                "(download rxrx1 metadata alongside images/)",
            )
        metadata_bytes = metadata_path.read_bytes()
        raw = pd.read_csv(metadata_path, dtype=str)
        missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
        if missing:
            raise CellrepError(
                f"{metadata_path} lacks RxRx1 column(s) {missing}",
                fix="use the RxRx1 metadata.csv (columns site_id, well_id, cell_type, dataset, "
                "experiment, plate, well, site, well_type, sirna, sirna_id)",
            )
        self.metadata = _to_canonical(raw, str(metadata_path))
        self._rows = {sid: i for i, sid in enumerate(self.metadata["site_id"].tolist())}
        self.fingerprint = hashlib.sha256(
            metadata_bytes + "\0".join((READER_VERSION, *self.channel_names)).encode()
        ).hexdigest()[:16]
        self._check_channel_count(expected_channels)

    def _site_prefix(self, row: pd.Series) -> Path:
        return self.root / "images" / str(row["experiment"]) / f"Plate{row['plate']}" / f"{row['well']}_s{row['site']}"

    def _check_channel_count(self, expected_channels: int | None) -> None:
        """Count the first site's ``_w<c>.png`` files; they must match the configured channels."""
        expected = len(self.channel_names) if expected_channels is None else int(expected_channels)
        if expected != len(self.channel_names):
            raise CellrepError(
                f"expected_channels={expected} but {len(self.channel_names)} channel names "
                f"are configured: {list(self.channel_names)}",
                fix="give one name per channel in data.channel_names",
            )
        first = self.metadata.iloc[0]
        prefix = self._site_prefix(first)
        found = sorted(
            int(m.group(1))
            for p in prefix.parent.glob(f"{prefix.name}_w*.png")
            if (m := _CHANNEL_FILE.search(p.name)) and p.name[: -len(m.group(0))] == prefix.name
        )
        if not found:
            raise CellrepError(
                f"no channel images {prefix}_w<c>.png for the first site {first['site_id']}",
                fix=f"check data.root ({self.root}); images must be under "
                "images/<experiment>/Plate<p>/<well>_s<site>_w<c>.png",
            )
        if len(found) != expected:
            raise CellrepError(
                f"site {first['site_id']} has {len(found)} channel image(s) on disk "
                f"(w{found}), but {expected} channels are configured",
                fix=f"set data.channel_names to the {len(found)} channels of this dataset "
                "(and the model's in_chans to match)",
            )

    def load(self, site_id: str) -> np.ndarray:
        """The site's ``C×H×W`` uint8 image, channels in ``channel_names`` order."""
        try:
            row = self.metadata.iloc[self._rows[site_id]]
        except KeyError:
            raise CellrepError(
                f"site '{site_id}' is not in {self.root / 'metadata.csv'}", fix="use a site_id listed in the metadata"
            ) from None
        prefix = self._site_prefix(row)
        planes = []
        for c in range(1, len(self.channel_names) + 1):
            path = prefix.parent / f"{prefix.name}_w{c}.png"
            if not path.is_file():
                raise UnreadableSite(
                    f"channel image {path} of site {site_id} is missing",
                    fix="restore the file, or drop the site from metadata.csv",
                )
            try:
                with Image.open(path) as image:
                    mode, plane = image.mode, np.asarray(image)
            except Exception as exc:  # noqa: BLE001 — PIL raises OSError, SyntaxError, ValueError, zlib.error
                raise UnreadableSite(
                    f"channel image {path} cannot be read: {type(exc).__name__}: {exc}",
                    fix="re-download or re-export the file (8-bit grayscale PNG)",
                ) from None
            if mode != "L" or plane.dtype != np.uint8:
                raise CellrepError(
                    f"{path} is a '{mode}' image; RxRx1 channels must be 8-bit grayscale ('L')",
                    fix="convert the images to 8-bit single-channel PNG, or read 16-bit data "
                    "with the TIFF plate source",
                )
            if planes and plane.shape != planes[0].shape:
                raise CellrepError(
                    f"{path} is {plane.shape[1]}×{plane.shape[0]} but channel 1 of site {site_id} "
                    f"is {planes[0].shape[1]}×{planes[0].shape[0]}",
                    fix="all channels of a site must have the same size",
                )
            planes.append(plane)
        return np.stack(planes)
