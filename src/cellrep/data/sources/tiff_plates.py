"""Reader for TIFF plates: JUMP / Cell Painting Gallery and in-house screens.

Three layouts, one metadata table (CSV; ``.tsv``/``.txt`` tab-separated; any of them gzipped,
``.gz``; a table named ``x.csv.gz`` is also found as ``x.csv`` and the other way round):

- ``per_channel``: one TIFF per channel, found by ``pattern`` (a ``str.format`` template
  over the metadata's own columns plus ``experiment, plate, well, site, channel`` (the
  channel name) and ``channel_index`` (1-based)), e.g. ``{plate}/{well}_s{site}_w{channel_index}.tif``.
- ``multipage``: one TIFF per site holding all channels (pages, or one planar page);
  the pattern has no channel field.
- ``load_data``: a CellProfiler ``load_data.csv`` (JUMP's convention): per channel
  ``FileName_Orig<Ch>`` + ``PathName_Orig<Ch>``, and ``Metadata_Plate/Well/Site``;
  perturbations come from plate maps joined onto it (``plate_maps``).

Metadata columns map onto the canonical schema by ``columns`` (canonical -> own name)
and ``constants``; wells whose perturbation is in ``negative_controls`` are negative
controls. Plates named by strings (JUMP barcodes) are numbered 1..n within their
experiment (the names are kept in ``site_id`` and in ``describe()``); without an
experiment column every plate is its own batch.

8-bit images pass unchanged; 16-bit ones become 8-bit by ``bit_depth_rule``:
``percentile`` (clip each plate × channel at percentiles of a fixed sample of its sites,
then scale: robust to one bright artifact and comparable within a plate; the plates'
levels are computed over ``num_workers`` processes before sharding), ``max``
(``[0, max_value] -> [0, 255]``, one global scale) or ``shift`` (``value >> shift``,
for 10/12-bit cameras). The rule, its parameters and the levels used are recorded
by ``describe()`` into the shards' manifest. Decoding and the rules themselves are in
:mod:`cellrep.data.sources.tiff_pixels`.

Files missing for a metadata row, wells missing a channel, TIFFs on disk matched by the
pattern but listed nowhere, and rows without a perturbation after the joins are left out
and listed in ``problems``; a TIFF that does not decode raises ``UnreadableSite`` (skipped
and counted by the shard writer).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from itertools import repeat
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cellrep.data.schema import PERTURBATION_TYPES, make_site_id, validate_metadata
from cellrep.data.sources.base import UnreadableSite
from cellrep.data.sources.tiff_pixels import RULES, percentile_levels, raw_planes, read_tiff, to_uint8
from cellrep.errors import CellrepError

__all__ = [
    "LAYOUTS",
    "READER_VERSION",
    "RULES",
    "TiffPlateSource",
    "percentile_levels",
    "raw_planes",
    "read_tiff",
    "to_uint8",
]

READER_VERSION = "tiff/1"
LAYOUTS = ("auto", "per_channel", "multipage", "load_data")
LOAD_DATA_COLUMNS = {
    "plate": "Metadata_Plate",
    "well": "Metadata_Well",
    "site": "Metadata_Site",
    "experiment": "Metadata_Batch",
}
_TYPES = {t.lower(): t for t in PERTURBATION_TYPES}
_FIELD = re.compile(r"\{([^{}:!]*)[^{}]*\}")


def _twin(path: Path) -> Path:
    """``x.csv.gz`` for ``x.csv`` and the other way round."""
    return path.with_suffix("") if path.suffix.lower() == ".gz" else path.with_name(path.name + ".gz")


def _table_path(root: Path, name: str) -> Path:
    """``root/name``, or its gzipped (or gunzipped) twin when only that one is there."""
    path = root / name
    return _twin(path) if not path.is_file() and _twin(path).is_file() else path


def _read_table(path: Path, what: str = "metadata table", fix: str | None = None) -> pd.DataFrame:
    if not path.is_file():
        raise CellrepError(
            f"{what} {path} is missing (so is {_twin(path).name})",
            fix=fix or "set data.root and data.metadata (relative to root)",
        )
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]  # pandas gunzips by the name
    sep = "\t" if suffixes and suffixes[-1] in (".tsv", ".txt") else ","
    return pd.read_csv(path, dtype=str, keep_default_na=False, sep=sep)


class TiffPlateSource:
    """An :class:`~cellrep.data.sources.base.ImageSource` over TIFF plates (see module docstring)."""

    name = "tiff"

    def __init__(
        self,
        root: str | Path,
        metadata: str = "metadata.csv",
        pattern: str | None = None,
        channel_names=None,
        layout: str = "auto",
        columns: dict | None = None,
        constants: dict | None = None,
        negative_controls=(),
        plate_maps=(),
        path_prefixes=(),
        bit_depth_rule: str = "percentile",
        percentile=(0.1, 99.9),
        sample_sites: int = 8,
        max_value: int = 65535,
        shift: int = 8,
        num_workers: int = 0,
        progress: bool = False,
    ):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise CellrepError(
                f"TIFF root {self.root} does not exist or is not a directory",
                fix="set data.root to the folder holding the metadata table and the images",
            )
        if bit_depth_rule not in RULES:
            raise CellrepError(f"unknown bit_depth_rule '{bit_depth_rule}'", fix=f"use one of {list(RULES)}")
        self.rule, self.percentile, self.sample_sites = bit_depth_rule, tuple(percentile), int(sample_sites)
        self.max_value, self.shift = int(max_value), int(shift)
        self.num_workers, self.progress = int(num_workers), bool(progress)  # for compute_levels: not the result
        meta_path = _table_path(self.root, metadata)
        raw = _read_table(meta_path)
        digest = hashlib.sha256(meta_path.read_bytes())
        for i, pm in enumerate(plate_maps):
            raw = self._join(raw, dict(pm), i, digest)
        self.layout = self._layout(layout, raw, pattern)
        self.pattern, self.problems, self._levels, self._plate_rows = pattern, [], {}, None
        self.columns, self.constants = dict(columns or {}), dict(constants or {})
        self.negative_controls = [str(n) for n in negative_controls]
        self.path_prefixes = [tuple(pair) for pair in path_prefixes]  # [(old, new)]: s3:// -> local copy
        canon, self.plate_names = self._canonical(raw)
        self.channel_names = self._channels(raw, channel_names)
        paths = self._paths(raw, canon)
        keep = self._check(canon, paths)
        self.metadata = validate_metadata(canon[keep], str(meta_path))
        self._files = [paths[i] for i in np.flatnonzero(keep)]
        self._rows = {sid: i for i, sid in enumerate(self.metadata["site_id"])}
        settings = dict(
            layout=self.layout,
            pattern=pattern,
            columns=self.columns,
            constants=self.constants,
            negative_controls=self.negative_controls,
            path_prefixes=self.path_prefixes,
            plate_maps=[dict(pm) for pm in plate_maps],
            channels=self.channel_names,
            **self._rule(),
        )
        digest.update(json.dumps([READER_VERSION, settings], sort_keys=True, default=str).encode())
        self.fingerprint = digest.hexdigest()[:16]

    @classmethod
    def from_config(cls, root, data_cfg, progress: bool = False) -> "TiffPlateSource":
        """From a ``data`` config (data=tiff, data=jump_load_data); see ``cellrep.config.TiffConfig``.
        ``data.shard_workers`` processes also compute the 16-bit percentile levels."""
        from omegaconf import OmegaConf

        def plain(v):
            return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v

        t = {k: plain(v) for k, v in (data_cfg.get("tiff") or {}).items()}
        return cls(
            root,
            metadata=data_cfg.get("metadata") or "metadata.csv",
            pattern=data_cfg.get("pattern"),
            channel_names=plain(data_cfg.get("channel_names")),
            columns=plain(data_cfg.get("columns")),
            bit_depth_rule=plain(data_cfg.get("bit_depth_rule", "percentile")),
            num_workers=int(data_cfg.get("shard_workers") or 0),
            progress=progress,
            **t,
        )

    # ------------------------------------------------------------- indexing
    def _problem(self, kind: str, item: str, detail: str = "") -> None:
        self.problems.append({"kind": kind, "item": str(item), "detail": detail})

    def _join(self, raw: pd.DataFrame, pm: dict, i: int, digest) -> pd.DataFrame:
        """Left-join plate map ``i``. A column both tables have keeps the metadata's values; the map's
        goes in as ``<column>_platemap``, from the first map that has it (JUMP's tables all repeat
        ``Metadata_Source``)."""
        path = _table_path(self.root, pm["path"])
        table = _read_table(
            path,
            what=f"plate map data.tiff.plate_maps[{i}]",
            fix=f"set data.tiff.plate_maps[{i}].path to the table's name relative to data.root "
            f"({self.root}); docs/data.md lists JUMP's",
        )
        digest.update(path.read_bytes())
        on = list(pm.get("keys") or pm.get("on") or [c for c in table.columns if c in raw.columns])
        missing = [c for c in on if c not in raw.columns or c not in table.columns]
        if not on or missing:
            raise CellrepError(
                f"plate map {path}: join column(s) {missing or 'none shared'} not in both tables",
                fix=f"set data.tiff.plate_maps[{i}].keys to columns of both ({list(table.columns)})",
            )
        repeated = [c for c in table.columns if c not in on and c in raw.columns and f"{c}_platemap" in raw.columns]
        table = table.drop(columns=repeated).drop_duplicates(on)
        return raw.merge(table, on=on, how="left", suffixes=("", "_platemap"))

    @staticmethod
    def _layout(layout: str, raw: pd.DataFrame, pattern: str | None) -> str:
        if layout not in LAYOUTS:
            raise CellrepError(f"unknown TIFF layout '{layout}'", fix=f"use data.tiff.layout={'|'.join(LAYOUTS)}")
        if layout == "auto":
            if pattern is None and any(c.startswith("FileName_Orig") for c in raw.columns):
                return "load_data"
            layout = "multipage" if pattern and not re.search(r"\{channel", pattern) else "per_channel"
        if layout != "load_data" and not pattern:
            raise CellrepError(
                "TIFF plates need a file name pattern (or a CellProfiler load_data.csv)",
                fix="set data.pattern, e.g. '{plate}/{well}_s{site}_w{channel_index}.tif'",
            )
        return layout

    def _column(self, raw: pd.DataFrame, name: str):
        """A canonical column from ``constants``, the ``columns`` mapping, or a same-named column.
        An identity mapping (``plate: plate``, as data/tiff.yaml lists them) is optional."""
        if self.constants.get(name) is not None:
            return pd.Series([self.constants[name]] * len(raw), index=raw.index, dtype=object)
        col = self.columns.get(name) or name
        if col not in raw.columns:
            if col != name:
                raise CellrepError(
                    f"data.columns.{name}='{col}' is not a metadata column", fix=f"map it to one of {list(raw.columns)}"
                )
            col = LOAD_DATA_COLUMNS.get(name) if self.layout == "load_data" else None
        return raw[col].str.strip().replace("", pd.NA) if col in raw.columns else None

    def _canonical(self, raw: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
        got = {
            n: self._column(raw, n)
            for n in (
                "experiment",
                "plate",
                "well",
                "site",
                "cell_type",
                "perturbation",
                "perturbation_type",
                "concentration",
                "well_type",
                "smiles",
            )
        }
        for need in ("plate", "well", "cell_type", "perturbation"):
            if got[need] is None:
                raise CellrepError(
                    f"TIFF metadata has no '{need}' (columns: {list(raw.columns)[:12]}...)",
                    fix=f"map it with data.columns.{need}=<column> or set data.tiff.constants.{need}",
                )
        plate_raw = got["plate"].astype(str)
        experiment = got["experiment"].fillna(plate_raw) if got["experiment"] is not None else plate_raw
        numeric = plate_raw.str.fullmatch(r"\d+").all()
        if numeric:
            plate, names = plate_raw.astype("int64"), {}
        else:  # barcodes: numbered 1..n in sorted order within their experiment
            count, number = {}, {}
            for e, n in sorted(set(zip(experiment, plate_raw))):
                count[e] = number[(e, n)] = count.get(e, 0) + 1
            plate = pd.Series([number[k] for k in zip(experiment, plate_raw)], index=raw.index, dtype="int64")
            names = {f"{e}/{i}": n for (e, n), i in number.items()}
        site = pd.to_numeric(got["site"], errors="raise").astype("int64") if got["site"] is not None else 1
        perturbation = got["perturbation"]
        negative = perturbation.isin(self.negative_controls).fillna(False).to_numpy(bool)
        well_type = (
            got["well_type"]
            if got["well_type"] is not None
            else pd.Series(np.where(negative, "negative_control", "treatment"), index=raw.index)
        )
        ptype = got["perturbation_type"]
        if ptype is None and not negative.all():
            raise CellrepError(
                "TIFF metadata has no perturbation_type",
                fix=f"map data.columns.perturbation_type or set data.tiff.constants.perturbation_type "
                f"to one of {list(PERTURBATION_TYPES)}",
            )
        ptype = (ptype if ptype is not None else pd.Series("control", index=raw.index)).fillna("").astype(str)
        ptype = ptype.map(lambda v: _TYPES.get(v.lower(), v)).where(well_type != "negative_control", "control")
        try:
            conc = pd.to_numeric(got["concentration"]) if got["concentration"] is not None else np.nan
        except (TypeError, ValueError) as exc:
            raise CellrepError(
                f"TIFF metadata: concentration is not numeric: {exc}",
                fix="write concentrations in µM as numbers, empty for non-compounds",
            ) from None
        canon = pd.DataFrame(
            {
                "site_id": [
                    make_site_id(e, p, w, s)
                    for e, p, w, s in zip(experiment, plate_raw, got["well"], np.broadcast_to(site, len(raw)))
                ],
                "experiment": experiment,
                "plate": plate,
                "well": got["well"],
                "site": site,
                "cell_type": got["cell_type"],
                "perturbation": perturbation,
                "perturbation_type": ptype,
                "concentration": conc,
                "well_type": well_type,
            },
            index=raw.index,
        )
        if got["smiles"] is not None:
            canon["smiles"] = got["smiles"]
        return canon, names

    def _channels(self, raw: pd.DataFrame, names) -> tuple[str, ...]:
        if self.layout == "load_data":
            found = [c[len("FileName_Orig") :] for c in raw.columns if c.startswith("FileName_Orig")]
            lacking = [n for n in (names or found) if f"FileName_Orig{n}" not in raw or f"PathName_Orig{n}" not in raw]
            if lacking or not found:
                raise CellrepError(
                    f"load_data table lacks FileName_Orig/PathName_Orig columns for {lacking or 'any'} "
                    f"channel (has channels {found})",
                    fix=f"set data.channel_names to some of {found}",
                )
            return tuple(names or found)
        if names:
            return tuple(str(n) for n in names)
        if self.layout == "per_channel":
            raise CellrepError(
                "one-TIFF-per-channel plates need the channel names",
                fix="set data.channel_names=[DNA,ER,RNA,AGP,Mito] (in file order)",
            )
        return ()  # multipage: counted from the first file in _check

    def _paths(self, raw: pd.DataFrame, canon: pd.DataFrame) -> list[tuple[Path, ...]]:
        if self.layout == "load_data":
            pairs = [list(zip(raw[f"PathName_Orig{c}"], raw[f"FileName_Orig{c}"])) for c in self.channel_names]
            return [tuple(self._local(p, f) for p, f in row) for row in zip(*pairs)]
        plate_fmt = canon["plate"] if not self.plate_names else self._column(raw, "plate")
        fields = raw.assign(**{k: v for k, v in canon[["experiment", "well", "site"]].items()}, plate=plate_fmt)
        records = fields.to_dict("records")
        n = max(len(self.channel_names), 1) if self.layout == "per_channel" else 1
        try:
            return [
                tuple(
                    self.root
                    / self.pattern.format(
                        **r, channel=self.channel_names[c] if self.channel_names else "", channel_index=c + 1
                    )
                    for c in range(n)
                )
                for r in records
            ]
        except (KeyError, IndexError, ValueError) as exc:
            raise CellrepError(
                f"data.pattern '{self.pattern}' cannot be filled from the metadata: {exc!r}",
                fix=f"use fields among {list(fields.columns)[:15]}, channel, channel_index",
            ) from None

    def _local(self, path_name: str, file_name: str) -> Path:
        for old, new in self.path_prefixes:
            if path_name.startswith(old):
                path_name = new + path_name[len(old) :]
                break
        path = Path(path_name) / file_name
        return path if path.is_absolute() else self.root / path

    def _check(self, canon: pd.DataFrame, paths: list[tuple[Path, ...]]) -> np.ndarray:
        """Rows to keep; the others become problems."""
        keep = np.ones(len(canon), dtype=bool)
        exists = [[os.path.exists(p) for p in ps] for ps in paths]
        if not any(any(e) for e in exists):
            raise CellrepError(
                f"none of the {sum(map(len, paths))} image files exist, e.g. {paths[0][0]}",
                fix="check data.root, data.pattern (or data.tiff.path_prefixes for load_data)",
            )
        for i, (sid, ok) in enumerate(zip(canon["site_id"], exists)):
            if not all(ok):
                keep[i] = False
                lacking = [
                    self.channel_names[c] if self.channel_names else str(paths[i][c]) for c, e in enumerate(ok) if not e
                ]
                self._problem(
                    "metadata_without_image" if not any(ok) else "missing_channel",
                    sid,
                    f"no file {paths[i][0]}" if not any(ok) else f"missing channel(s) {lacking}",
                )
        for i in np.flatnonzero(keep & canon["perturbation"].isna().to_numpy()):
            keep[i] = False
            self._problem("image_without_metadata", canon["site_id"].iloc[i], "no perturbation (after the plate maps)")
        for i in np.flatnonzero(keep & canon["site_id"].duplicated().to_numpy()):
            keep[i] = False
            self._problem("duplicate_metadata", canon["site_id"].iloc[i], "a second row for this site (first kept)")
        if self.layout != "load_data":
            listed = {str(p) for ps in paths for p in ps}
            glob = re.sub(r"\*+", "*", _FIELD.sub("*", self.pattern))
            for p in sorted(self.root.glob(glob)):
                if p.suffix.lower() in (".tif", ".tiff") and str(p) not in listed:
                    self._problem("image_without_metadata", p.relative_to(self.root), "matches data.pattern")
        if not keep.any():
            raise CellrepError(
                f"no usable site ({len(self.problems)} problems, e.g. {self.problems[:2]})",
                fix="check that the metadata and the image files belong together",
            )
        for i in np.flatnonzero(keep)[:20] if not self.channel_names else ():  # multipage: count pages
            try:
                self.channel_names = tuple(f"ch{c + 1}" for c in range(len(raw_planes(paths[i], self.channel_names))))
                break
            except UnreadableSite:
                continue
        return keep

    # ------------------------------------------------------------- reading
    def _plate_sample(self, experiment: str, plate: int) -> list[tuple[Path, ...]]:
        """The files of a fixed, evenly spaced sample of the plate's sites (``sample_sites`` of them)."""
        if self._plate_rows is None:  # row positions per plate, in metadata order
            self._plate_rows = self.metadata.groupby(["experiment", "plate"]).indices
        on_plate = self._plate_rows[(experiment, plate)]
        pick = on_plate[
            np.unique(np.linspace(0, len(on_plate) - 1, min(len(on_plate), self.sample_sites)).round().astype(int))
        ]
        return [self._files[i] for i in pick]

    def _plate_levels(self, experiment: str, plate: int) -> list:
        """Percentile levels per channel of one plate from a fixed, evenly spaced sample of its sites."""
        key = f"{experiment}/{plate}"
        if key not in self._levels:
            self._levels[key] = percentile_levels(
                self._plate_sample(experiment, plate), self.channel_names, self.percentile
            )
        return self._levels[key]

    def compute_levels(self, num_workers: int | None = None, progress: bool | None = None) -> dict:
        """Every plate's percentile levels, over ``num_workers`` processes (0: here), with a progress bar.

        Each plate's levels depend only on its own sampled files, so the result is the same
        for any number of workers."""
        workers = self.num_workers if num_workers is None else int(num_workers)
        show = self.progress if progress is None else progress
        plates = [
            (e, int(p))
            for e, p in self.metadata[["experiment", "plate"]].drop_duplicates().itertuples(index=False)
            if f"{e}/{int(p)}" not in self._levels
        ]
        samples = [self._plate_sample(e, p) for e, p in plates]
        parallel = workers > 0 and len(plates) > 1
        with (
            ProcessPoolExecutor(min(workers, len(plates))) if parallel else nullcontext() as pool,
            tqdm(total=len(plates), desc="16-bit percentile levels", unit="plate", disable=not show) as bar,
        ):
            run = pool.map if parallel else map
            done = run(percentile_levels, samples, repeat(self.channel_names), repeat(self.percentile))
            for (e, p), levels in zip(plates, done):
                self._levels[f"{e}/{p}"] = levels
                bar.update(1)
        return self._levels

    def _rule(self) -> dict:
        params = {
            "percentile": {"percentile": list(self.percentile), "sample_sites": self.sample_sites},
            "max": {"max_value": self.max_value},
            "shift": {"shift": self.shift},
        }[self.rule]
        return {"bit_depth_rule": self.rule, **params}

    def describe(self) -> dict:
        """The reading rules for the manifest; computes every plate's levels (workers inherit them)."""
        if self.rule == "percentile":
            self.compute_levels()
        return {
            "reader": READER_VERSION,
            "layout": self.layout,
            "pattern": self.pattern,
            **self._rule(),
            "levels": dict(self._levels) if self.rule == "percentile" else None,
            "plate_names": self.plate_names,
        }

    def load(self, site_id: str) -> np.ndarray:
        """The site's ``C×H×W`` uint8 image, channels in ``channel_names`` order."""
        try:
            i = self._rows[site_id]
        except KeyError:
            raise CellrepError(f"site '{site_id}' is not in the TIFF metadata", fix="use a listed site_id") from None
        planes = raw_planes(self._files[i], self.channel_names)
        row = self.metadata.iloc[i]
        levels = self._plate_levels(row["experiment"], int(row["plate"])) if self.rule == "percentile" else None
        return np.stack(
            [
                to_uint8(p, self.rule, levels[c] if levels else None, self.max_value, self.shift)
                for c, p in enumerate(planes)
            ]
        )
