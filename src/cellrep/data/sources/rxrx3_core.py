"""Reader for RxRx3-core as published on HuggingFace (parquet shards of JPEG 2000 channels).

Layout: ``<root>/metadata_rxrx3_core.csv`` and ``<root>/data/train-000NN-of-00035.parquet``
with columns ``__key__`` (``<experiment>/Plate<p>/<address>_s<site>_<channel>``) and ``jp2``
(one 8-bit JPEG 2000 image per row = one channel of one site). HF's ``Image`` feature stores
``jp2`` as a struct ``{bytes, path}``; a plain binary column is accepted too.

A sample is a site: the six channel rows of a well are grouped by key. Only the key
column is read at construction (cheap); images are read per row group when a site
is loaded, and the last few row groups are cached because the writer loads sites
in key order, which is the order of the parquet rows. What does not fit — keys
that do not parse, wells missing a channel row, images without a metadata row and
metadata rows without images — is left out of ``metadata`` and listed in
``problems`` for the shard writer's summary; a jp2 that does not decode raises
:class:`~cellrep.data.sources.base.UnreadableSite` (the site is skipped and counted).
``encoded_channels`` hands the jp2 bytes themselves to the writer, which stores them as they are
under ``data.encoding=jp2`` (docs/data.md, "Shards").

Metadata mapping (docs/data.md): CRISPR wells are their gene (a ``_guide_N`` suffix
is stripped: guides of one gene are one perturbation); compounds are their
``treatment`` name with ``concentration`` (µM) and ``SMILES``. ``EMPTY_control``
(gene or treatment) and ``CRISPR_control`` (the untreated wells of compound
plates) are negative controls: they anchor plate normalization and batch correction.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, features

from cellrep.data.schema import NEGATIVE_CONTROL, RXRX1_CHANNELS, make_site_id, validate_metadata
from cellrep.data.sources.base import UnreadableSite
from cellrep.errors import CellrepError

READER_VERSION = "rxrx3_core/1"  # bump when the mapping onto the canonical schema changes
METADATA_FILE = "metadata_rxrx3_core.csv"
REQUIRED_COLUMNS = (
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
)
CONTROL_NAMES = (NEGATIVE_CONTROL, "CRISPR_control")
KEY_PATTERN = r"^(?P<experiment>[^/]+)/Plate(?P<plate>\d+)/(?P<well>[A-Z]+\d+)_s(?P<site>\d+)_(?P<channel>\d+)$"
_GUIDE = r"_guide_\d+$"


def _to_canonical(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per well of ``metadata_rxrx3_core.csv`` in canonical columns (``site`` added later)."""
    gene = raw["gene"].astype("string").str.strip().replace("", pd.NA)
    treatment = raw["treatment"].astype("string").str.strip().replace("", pd.NA)
    ptype = raw["perturbation_type"].astype("string").str.strip().str.upper()
    control_name = gene.where(gene.isin(CONTROL_NAMES)).fillna(treatment.where(treatment.isin(CONTROL_NAMES)))
    is_control = control_name.notna().to_numpy(bool)
    is_crispr = (ptype == "CRISPR").fillna(False).to_numpy(bool)
    crispr_gene = gene.fillna(treatment).str.replace(_GUIDE, "", regex=True)
    perturbation = control_name.fillna(crispr_gene.where(is_crispr, treatment))
    conc = pd.to_numeric(raw["concentration"].astype("string").str.strip().replace("", pd.NA), errors="coerce")
    is_compound = ~is_crispr & ~is_control
    return pd.DataFrame(
        {
            "experiment": raw["experiment_name"].astype("string").str.strip(),
            "plate": pd.to_numeric(raw["plate"], errors="raise").astype("int64"),
            "well": raw["address"].astype("string").str.strip(),
            "cell_type": raw["cell_type"].astype("string").str.strip(),
            "perturbation": perturbation,
            "perturbation_type": np.where(is_control, "control", np.where(is_crispr, "CRISPR", "COMPOUND")),
            "concentration": conc.where(is_compound).astype("float64"),
            "well_type": np.where(is_control, "negative_control", "treatment"),
            "smiles": raw["SMILES"].astype("string").where(is_compound),
            "well_id": raw["well_id"].astype("string"),
        }
    )


class RxRx3CoreSource:
    """An :class:`~cellrep.data.sources.base.ImageSource` over the HuggingFace RxRx3-core files."""

    name = "rxrx3_core"

    def __init__(
        self,
        root: str | Path,
        channel_names: tuple[str, ...] | list[str] = RXRX1_CHANNELS,
        expected_channels: int | None = None,
        metadata: str | None = None,
        cache_row_groups: int = 4,
    ):
        self.root = Path(root).expanduser()
        self.channel_names = tuple(channel_names)
        if expected_channels is not None and int(expected_channels) != len(self.channel_names):
            raise CellrepError(
                f"expected_channels={expected_channels} but {len(self.channel_names)} channel names "
                f"are configured: {list(self.channel_names)}",
                fix="give one name per channel in data.channel_names",
            )
        if not features.check("jpg_2000"):
            raise CellrepError(
                "this Pillow cannot decode JPEG 2000 (built without OpenJPEG)",
                fix="install Pillow's PyPI wheel, which bundles OpenJPEG (pip install --force-reinstall pillow)",
            )
        if not self.root.is_dir():
            raise CellrepError(
                f"RxRx3-core root {self.root} does not exist or is not a directory",
                fix=f"set data.root to the folder holding {METADATA_FILE} and data/*.parquet",
            )
        meta_path = self.root / (metadata or METADATA_FILE)
        if not meta_path.is_file():
            raise CellrepError(
                f"{meta_path} is missing",
                fix=f"download {METADATA_FILE} from the recursionpharma/rxrx3-core dataset "
                "into data.root (or set data.metadata)",
            )
        self.files = sorted((self.root / "data").glob("*.parquet")) or sorted(self.root.glob("*.parquet"))
        if not self.files:
            raise CellrepError(
                f"no parquet files under {self.root / 'data'}",
                fix="point data.root at the rxrx3-core download (data/train-000NN-of-00035.parquet)",
            )
        self.problems: list[dict] = []
        raw = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
        missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
        if missing:
            raise CellrepError(
                f"{meta_path} lacks RxRx3-core column(s) {missing}",
                fix=f"use the RxRx3-core metadata (columns {', '.join(REQUIRED_COLUMNS)})",
            )
        self.metadata, self._locs = self._join(self._wells(raw, meta_path), self._index_keys())
        self._rows = {sid: i for i, sid in enumerate(self.metadata["site_id"].tolist())}
        sizes = "\0".join(f"{p.name}:{p.stat().st_size}" for p in self.files)
        self.fingerprint = hashlib.sha256(
            meta_path.read_bytes() + "\0".join((READER_VERSION, sizes, *self.channel_names)).encode()
        ).hexdigest()[:16]
        self.cache_row_groups = int(cache_row_groups)
        self._handles: dict = {}
        self._cache: OrderedDict = OrderedDict()

    # ------------------------------------------------------------- indexing
    def _problem(self, kind: str, item: str, detail: str = "") -> None:
        self.problems.append({"kind": kind, "item": str(item), "detail": detail})

    def _wells(self, raw: pd.DataFrame, meta_path: Path) -> pd.DataFrame:
        try:
            wells = _to_canonical(raw)
        except (TypeError, ValueError) as exc:
            raise CellrepError(
                f"{meta_path}: column 'plate' is not a plate number: {exc}", fix="use the RxRx3-core metadata unchanged"
            ) from None
        dup = wells.duplicated(["experiment", "plate", "well"])
        for wid in wells.loc[dup, "well_id"]:
            self._problem("duplicate_metadata", wid, "a second metadata row for this well (first kept)")
        return wells[~dup]

    def _index_keys(self) -> pd.DataFrame:
        """``__key__`` of every parquet row, parsed, with its location (file, row group, row).
        One column read per file and arrow's regex engine: 1.3M keys in seconds."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        keys, loc = [], []
        for f_idx, path in enumerate(self.files):
            try:
                pf = pq.ParquetFile(path)
                names = pf.schema_arrow.names
                column = pf.read(columns=["__key__"]).column("__key__") if "__key__" in names else None
            except Exception as exc:  # noqa: BLE001 — an unreadable file is named, not a traceback
                raise CellrepError(
                    f"{path} is not a readable parquet file: {exc}", fix="re-download that file"
                ) from None
            missing = [c for c in ("__key__", "jp2") if c not in names]
            if missing:
                raise CellrepError(
                    f"{path} lacks column(s) {missing} (has {names})",
                    fix="use the RxRx3-core parquet files (columns __key__ and jp2)",
                )
            sizes = [pf.metadata.row_group(rg).num_rows for rg in range(pf.num_row_groups)]
            rg = np.repeat(np.arange(len(sizes)), sizes)
            loc.append(
                np.stack(
                    [np.full(len(rg), f_idx), rg, np.arange(len(rg)) - np.repeat(np.cumsum(sizes) - sizes, sizes)], 1
                )
            )
            keys.append(column)
        column = pa.chunked_array([c for k in keys for c in k.chunks], type=pa.string())
        parsed = pc.extract_regex(column, KEY_PATTERN)  # nulls where a key does not match
        fields = ("experiment", "plate", "well", "site", "channel")
        keys = pd.DataFrame({"key": column.to_pandas(), **{f: pc.struct_field(parsed, f).to_pandas() for f in fields}})
        keys[["file", "rg", "row"]] = np.concatenate(loc) if loc else np.zeros((0, 3), np.int64)
        bad = keys["experiment"].isna()
        channel = pd.to_numeric(keys["channel"], errors="coerce")
        site_cols = ["experiment", "plate", "well", "site"]
        typical = channel[~bad].groupby([keys.loc[~bad, c] for c in site_cols]).max().mode()
        if len(typical) and int(typical.iloc[0]) != len(self.channel_names):
            raise CellrepError(
                f"RxRx3-core sites at {self.root} have {int(typical.iloc[0])} channel rows but "
                f"{len(self.channel_names)} channels are configured: {list(self.channel_names)}",
                fix=f"set data.channel_names to the {int(typical.iloc[0])} channels of this dataset",
            )
        out_of_range = ~bad & ~channel.between(1, len(self.channel_names))
        for key in keys.loc[bad, "key"]:
            self._problem("unparsable_key", key, "expected <experiment>/Plate<p>/<address>_s<site>_<channel>")
        for key in keys.loc[out_of_range, "key"]:
            self._problem("unparsable_key", key, f"channel outside 1..{len(self.channel_names)}")
        keys = keys[~bad & ~out_of_range]
        keys = keys.astype({"plate": "int64", "site": "int64", "channel": "int64"})
        dup = keys.duplicated(["experiment", "plate", "well", "site", "channel"])
        for key in keys.loc[dup, "key"]:
            self._problem("duplicate_key", key, "a second image for this channel (first kept)")
        return keys[~dup]

    def _join(self, wells: pd.DataFrame, keys: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
        """Sites = complete channel sets of wells that have metadata; the rest become problems."""
        n_ch = len(self.channel_names)
        well_cols = ["experiment", "plate", "well"]
        sites = keys.groupby(well_cols + ["site"], sort=True).size().rename("n").reset_index()
        site_cols = well_cols + ["site"]
        partial = keys.merge(sites.loc[sites["n"] != n_ch, site_cols], on=site_cols)
        for (e, p, w, site), present in partial.groupby(site_cols)["channel"].agg(sorted).items():
            self._problem("missing_channel", make_site_id(e, p, w, site), f"channels {present} of 1..{n_ch} present")
        joined = sites.merge(wells, on=well_cols, how="outer", indicator=True)
        for row in joined[joined["_merge"] == "left_only"].itertuples():
            self._problem(
                "image_without_metadata",
                f"{row.experiment}/Plate{row.plate}/{row.well}_s{int(row.site)}",
                "no row in the metadata",
            )
        for row in joined[joined["_merge"] == "right_only"].itertuples():
            self._problem("metadata_without_image", row.well_id, "no __key__ rows for this well")
        keep = joined[(joined["_merge"] == "both") & (joined["n"] == n_ch)].copy()
        keep["site"] = keep["site"].astype("int64")
        keep["site_id"] = [
            make_site_id(e, p, w, s)
            for e, p, w, s in zip(keep["experiment"], keep["plate"], keep["well"], keep["site"])
        ]
        keep = keep.sort_values("site_id", kind="stable").reset_index(drop=True)
        if keep.empty:
            raise CellrepError(
                f"RxRx3-core at {self.root}: no well has metadata and all {n_ch} channel images "
                f"({len(self.problems)} problems, e.g. {self.problems[:3]})",
                fix="check that the parquet files and the metadata CSV belong together",
            )
        loc = keys.set_index(["experiment", "plate", "well", "site", "channel"])[["file", "rg", "row"]]
        idx = pd.MultiIndex.from_arrays(
            [np.repeat(keep[c].to_numpy(), n_ch) for c in ("experiment", "plate", "well", "site")]
            + [np.tile(np.arange(1, n_ch + 1), len(keep))]
        )
        locs = loc.loc[idx].to_numpy(np.int64).reshape(len(keep), n_ch, 3)
        return validate_metadata(keep, str(self.root)), locs

    def describe(self) -> dict:
        """What was read, for the shards' manifest."""
        return {
            "reader": READER_VERSION,
            "parquet_files": [p.name for p in self.files],
            "channels": "key suffix _<c> = channel_names[c - 1]",
        }

    # ------------------------------------------------------------- reading
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # open files and cached row groups stay in this process
        state["_handles"], state["_cache"] = {}, OrderedDict()
        return state

    def _row_group(self, f_idx: int, rg: int) -> list:
        import pyarrow.parquet as pq

        key = (f_idx, rg)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if f_idx not in self._handles:
            self._handles[f_idx] = pq.ParquetFile(self.files[f_idx])
        values = self._handles[f_idx].read_row_group(rg, columns=["jp2"]).column("jp2").to_pylist()
        self._cache[key] = values
        while len(self._cache) > max(self.cache_row_groups, 1):
            self._cache.popitem(last=False)
        return values

    def _jp2_files(self, site_id: str) -> list[tuple[bytes, str]]:
        """Each channel's jp2 bytes as stored in the parquet, with where they are (for messages)."""
        try:
            locs = self._locs[self._rows[site_id]]
        except KeyError:
            raise CellrepError(
                f"site '{site_id}' is not in RxRx3-core at {self.root}", fix="use a site_id listed in the metadata"
            ) from None
        files = []
        for c, (f_idx, rg, row) in enumerate(locs.tolist(), start=1):
            value = self._row_group(f_idx, rg)[row]
            data = value.get("bytes") if isinstance(value, dict) else value
            files.append((data, f"{self.files[f_idx].name} row group {rg} row {row} (site {site_id}, channel {c})"))
        return files

    def encoded_channels(self, site_id: str, fmt: str) -> list[bytes] | None:
        """The site's jp2 files as they are (``fmt="jp2"``; else ``None``): what ``load`` decodes."""
        return [data for data, _ in self._jp2_files(site_id)] if fmt == "jp2" else None

    def load(self, site_id: str) -> np.ndarray:
        """The site's ``C×H×W`` uint8 image, channels in ``channel_names`` order."""
        planes = []
        for data, where in self._jp2_files(site_id):
            try:
                with Image.open(io.BytesIO(data)) as image:
                    mode, plane = image.mode, np.asarray(image)
            except Exception as exc:  # noqa: BLE001 — PIL raises OSError, SyntaxError, ValueError, TypeError
                raise UnreadableSite(f"jp2 in {where} cannot be decoded: {type(exc).__name__}: {exc}") from None
            if mode != "L" or plane.dtype != np.uint8:
                raise UnreadableSite(f"jp2 in {where} is a '{mode}' image, not 8-bit grayscale")
            if planes and plane.shape != planes[0].shape:
                raise UnreadableSite(f"jp2 in {where} is {plane.shape}, channel 1 is {planes[0].shape}")
            planes.append(plane)
        return np.stack(planes)
