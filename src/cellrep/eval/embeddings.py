"""Well embeddings: the one table every benchmark reads (docs/benchmarks.md "Embeddings").

Per-site features of the chosen block are mean-aggregated per well and kept
as metadata columns + ``feature_0..feature_{D-1}``, written as parquet. The
same table can come from somewhere else entirely (published embeddings of a
screen): :func:`read_embeddings` loads any parquet with ``feature_*`` columns,
optionally joined to a separate metadata table, and checks that the two align
before a benchmark ever sees them.
"""

from __future__ import annotations

import io
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellrep.errors import CellrepError
from cellrep.io import atomic_write_bytes

FEATURE_PREFIX = "feature_"
WELL_KEYS = ("experiment", "plate", "well")
# What the benchmarks need: the batch (experiment), the perturbation and which wells are controls.
REQUIRED = ("experiment", "perturbation", "well_type")
NEGATIVE = "negative_control"
GENETIC = ("siRNA", "CRISPR")
_FEATURE = re.compile(rf"^{FEATURE_PREFIX}(\d+)$")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Every vector along the last axis scaled to unit L2 norm (cosine geometry); a zero vector stays zero."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


@dataclass
class Embeddings:
    """Row-aligned ``meta`` (one row per well) and ``features`` (wells × D, float32).

    Construction checks alignment, shape, finiteness and the required columns,
    so a mismatch is one clear message instead of an index error in NumPy.
    """

    meta: pd.DataFrame
    features: np.ndarray

    def __post_init__(self) -> None:
        feats = np.asarray(self.features)
        if feats.ndim != 2:
            raise CellrepError(
                f"embeddings must be a 2-D array (wells × features), got shape {feats.shape}",
                fix="pass one row of features per well",
            )
        if len(self.meta) != feats.shape[0]:
            raise CellrepError(
                f"embeddings and metadata do not align: {feats.shape[0]} feature rows but {len(self.meta)} "
                "metadata rows",
                fix="give exactly one metadata row per embedding row, in the same order",
            )
        if feats.shape[0] == 0 or feats.shape[1] == 0:
            raise CellrepError(f"embeddings are empty (shape {feats.shape})", fix="embed at least one well")
        missing = [c for c in REQUIRED if c not in self.meta.columns]
        if missing:
            raise CellrepError(
                f"embedding metadata lacks column(s) {missing} (has {list(self.meta.columns)[:12]})",
                fix="add them or map your names with rename={your_name: canonical_name}",
            )
        if self.meta[list(REQUIRED)].isna().any().any():
            bad = self.meta[list(REQUIRED)].isna().sum()
            raise CellrepError(
                f"embedding metadata has empty values: {bad[bad > 0].to_dict()}",
                fix="every well needs an experiment, a perturbation and a well_type",
            )
        finite = np.isfinite(feats).all(axis=1)
        if not finite.all():
            raise CellrepError(
                f"{int((~finite).sum())} embedding row(s) contain NaN or inf "
                f"(first: row {int(np.flatnonzero(~finite)[0])})",
                fix="drop or recompute those wells",
            )
        self.features = np.ascontiguousarray(feats, dtype=np.float32)
        self.meta = self.meta.reset_index(drop=True)

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def batch(self) -> np.ndarray:
        return self.meta["experiment"].astype(str).to_numpy()

    @property
    def is_control(self) -> np.ndarray:
        return (self.meta["well_type"].astype(str) == NEGATIVE).to_numpy()

    def with_features(self, features: np.ndarray) -> "Embeddings":
        return Embeddings(self.meta, features)

    def subset(self, mask: np.ndarray) -> "Embeddings":
        return Embeddings(self.meta.loc[mask].reset_index(drop=True), self.features[mask])

    def genetic_mask(self) -> np.ndarray:
        """Treatment wells of gene perturbations (all treatment wells when types are unknown)."""
        treated = (self.meta["well_type"].astype(str) == "treatment").to_numpy()
        if "perturbation_type" not in self.meta.columns:
            return treated
        return treated & self.meta["perturbation_type"].astype(str).isin(GENETIC).to_numpy()

    def to_frame(self) -> pd.DataFrame:
        names = [f"{FEATURE_PREFIX}{i}" for i in range(self.dim)]
        return pd.concat([self.meta, pd.DataFrame(self.features, columns=names)], axis=1)

    def write_parquet(self, path: Path | str) -> Path:
        buf = io.BytesIO()
        self.to_frame().to_parquet(buf, index=False)
        return atomic_write_bytes(path, buf.getvalue())

    def write_h5ad(self, path: Path | str, corrected: dict[str, "Embeddings"] | None = None) -> Path:
        """AnnData interchange (docs/benchmarks.md "Embeddings"): ``obs`` = the metadata, ``X`` = these
        features, ``obsm["X_<method>"]`` = each corrected table (same wells, same order).

        Written to a temporary file beside ``path`` and renamed into place, like every other output.
        """
        import anndata

        obs = self.meta.copy()
        for col in obs.columns:  # h5ad stores strings or numbers; mixed object columns become strings
            if obs[col].dtype == object:
                obs[col] = obs[col].map(lambda v: "" if v is None or (isinstance(v, float) and v != v) else str(v))
        obs.index = [str(i) for i in range(len(obs))]
        adata = anndata.AnnData(X=self.features, obs=obs)
        for method, other in (corrected or {}).items():
            if method == "none":
                continue
            if len(other) != len(self):
                raise CellrepError(
                    f"corrected table '{method}' has {len(other)} wells, the embeddings {len(self)}",
                    fix="pass corrections of these same wells",
                )
            adata.obsm[f"X_{method}"] = other.features
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            adata.write_h5ad(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def aggregate_wells(features: np.ndarray, sites: pd.DataFrame) -> Embeddings:
    """Mean of site features per well (docs/benchmarks.md "Embeddings": per site, mean-aggregated per well).

    Well metadata is each well's first site's row (sites of a well share their
    perturbation); ``n_sites`` counts the sites that were averaged.
    """
    if len(sites) != len(features):
        raise CellrepError(
            f"site features ({len(features)}) and site metadata ({len(sites)}) do not align",
            fix="pass one metadata row per feature row",
        )
    missing = [c for c in WELL_KEYS if c not in sites.columns]
    if missing:
        raise CellrepError(f"site metadata lacks well key column(s) {missing}", fix="add experiment, plate, well")
    sites = sites.reset_index(drop=True)
    group = sites.groupby(list(WELL_KEYS), sort=True, dropna=False).ngroup().to_numpy()
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])
    sums = np.add.reduceat(np.asarray(features, dtype=np.float64)[order], starts, axis=0)
    counts = np.diff(np.r_[starts, len(order)])
    drop = [c for c in ("site", "site_id", "shard", "key", "npy_offset", "npy_size", "label") if c in sites]
    meta = sites.iloc[order[starts]].drop(columns=drop).reset_index(drop=True)
    meta["n_sites"] = counts
    return Embeddings(meta, (sums / counts[:, None]).astype(np.float32))


def split_frame(frame: pd.DataFrame, source: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Separate ``feature_<i>`` columns (ordered by i) from metadata columns."""
    numbered = sorted(((int(m.group(1)), c) for c in frame.columns if (m := _FEATURE.match(str(c)))))
    if not numbered:
        raise CellrepError(
            f"{source} has no '{FEATURE_PREFIX}<i>' columns (columns: {list(frame.columns)[:8]}...)",
            fix=f"name the embedding columns {FEATURE_PREFIX}0, {FEATURE_PREFIX}1, ...",
        )
    if [i for i, _ in numbered] != list(range(len(numbered))):
        raise CellrepError(
            f"{source}: feature columns are not numbered 0..{len(numbered) - 1} without gaps",
            fix="renumber the feature columns",
        )
    cols = [c for _, c in numbered]
    meta = frame.drop(columns=cols)
    try:
        feats = frame[cols].to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise CellrepError(
            f"{source}: feature columns are not numeric: {exc}", fix="store features as floats"
        ) from None
    return meta, feats


def read_h5ad(path: Path, representation: str | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """(obs, X) of an AnnData file, or (obs, obsm[representation]) when one is named."""
    import anndata

    try:
        adata = anndata.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 — any h5py/anndata failure is a bad file to the user
        raise CellrepError(f"cannot read {path} as h5ad: {exc}", fix="give an AnnData .h5ad file") from None
    if representation is None:
        x = adata.X
    elif representation in adata.obsm:
        x = adata.obsm[representation]
    else:
        raise CellrepError(
            f"{path} has no obsm['{representation}'] (has {list(adata.obsm.keys())})",
            fix="name one of those, or none for X",
        )
    if hasattr(x, "toarray"):
        x = x.toarray()
    return adata.obs.reset_index(drop=True), np.asarray(x, dtype=np.float32)


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise CellrepError(f"no such file: {path}", fix="check the path")
    if path.suffix in (".csv", ".tsv", ".txt"):
        return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 — any pyarrow failure is a bad file to the user
        raise CellrepError(f"cannot read {path} as parquet: {exc}", fix="give a parquet (or csv) file") from None


def read_embeddings(
    path: Path | str,
    metadata: Path | str | None = None,
    join_on: str = "well_id",
    rename: dict[str, str] | None = None,
    representation: str | None = None,
) -> Embeddings:
    """Load well embeddings from a parquet (metadata columns + ``feature_*``), no checkpoint needed.

    An ``.h5ad`` file (AnnData) gives its ``obs`` as metadata and ``X`` as features, or
    ``obsm[representation]`` when named (e.g. ``X_tvn`` of a cellrep-written file).

    ``metadata``: a separate table (csv/parquet) joined on ``join_on``; every
    embedding row must find exactly one metadata row. ``rename`` maps the
    file's column names onto canonical ones (e.g. ``{"gene": "perturbation"}``).
    """
    path = Path(path).expanduser()
    if path.suffix == ".h5ad":
        if not path.is_file():
            raise CellrepError(f"no such file: {path}", fix="check the path")
        meta, feats = read_h5ad(path, representation)
        meta = meta.assign(
            **{c: meta[c].astype(str) for c in meta.columns if isinstance(meta[c].dtype, pd.CategoricalDtype)}
        )
    else:
        meta, feats = split_frame(_read_table(path), str(path))
    if metadata is not None:
        meta = _join_metadata(meta, Path(metadata).expanduser(), join_on)
    if rename:
        meta = meta.rename(columns=dict(rename))
    return Embeddings(meta, feats)


def _join_metadata(left: pd.DataFrame, path: Path, key: str) -> pd.DataFrame:
    right = _read_table(path)
    for side, frame in (("embeddings", left), (str(path), right)):
        if key not in frame.columns:
            raise CellrepError(f"{side} has no join column '{key}'", fix="set join_on to a column both tables have")
    if right[key].duplicated().any():
        raise CellrepError(
            f"{path}: {int(right[key].duplicated().sum())} duplicated '{key}' values",
            fix=f"'{key}' must identify one well in the metadata",
        )
    merged = left[[key]].astype({key: str}).merge(right.astype({key: str}), on=key, how="left", indicator=True)
    lost = merged["_merge"] != "both"
    if lost.any():
        raise CellrepError(
            f"embeddings and metadata do not align: {int(lost.sum())} of {len(left)} embedding rows "
            f"have no metadata row (e.g. {key}={merged.loc[lost, key].iloc[0]!r})",
            fix=f"give the metadata of every embedded well, matched on '{key}'",
        )
    extra = [c for c in left.columns if c != key]
    merged = merged.drop(columns="_merge")
    for c in extra:  # metadata already in the embeddings file wins only where the join has none
        if c not in merged:
            merged[c] = left[c].to_numpy()
    return merged
