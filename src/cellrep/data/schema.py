"""The canonical data model: one sample = one imaging site.

Every source (synthetic, RxRx1, RxRx3-core, TIFF plates) maps its metadata
onto these columns (docs/data.md). Images are ``C×H×W`` uint8 arrays whose
channel order is the dataset's ``channel_names``.
"""

from __future__ import annotations

import pandas as pd

from cellrep.errors import CellrepError

CANONICAL_COLUMNS: tuple[str, ...] = (
    "site_id",  # unique id, e.g. HUVEC-01_1_B02_1
    "experiment",  # the batch (experimental run): batch-effect unit
    "plate",  # plate number (int)
    "well",  # well address, e.g. B02, AA04
    "site",  # site number within the well (int)
    "cell_type",  # HUVEC, RPE, HepG2, U2OS, ...
    "perturbation",  # gene symbol, siRNA id or compound name; controls: CONTROL_NAMES
    "perturbation_type",  # one of PERTURBATION_TYPES
    "concentration",  # µM for compounds, NaN otherwise
    "well_type",  # one of WELL_TYPES
)
# Optional columns carried through when a source has them.
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "dataset",  # RxRx1 official partition: train / test
    "smiles",  # compound structure
    "target",  # planted or annotated target gene of a compound (synthetic only)
)

PERTURBATION_TYPES = ("siRNA", "CRISPR", "COMPOUND", "control")
WELL_TYPES = ("treatment", "negative_control", "positive_control")
NEGATIVE_CONTROL = "EMPTY_control"  # reserved perturbation name of negative controls

RXRX1_CHANNELS = ("Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA")

_DTYPES = {
    "site_id": "string",
    "experiment": "string",
    "plate": "int64",
    "well": "string",
    "site": "int64",
    "cell_type": "string",
    "perturbation": "string",
    "perturbation_type": "string",
    "concentration": "float64",
    "well_type": "string",
}


def make_site_id(experiment: str, plate: int, well: str, site: int) -> str:
    return f"{experiment}_{plate}_{well}_{site}"


def validate_metadata(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check ``df`` against the canonical schema and return it with canonical dtypes.

    ``source`` names where the table came from, for the error message.
    """
    missing = [c for c in CANONICAL_COLUMNS if c not in df.columns]
    if missing:
        raise CellrepError(
            f"{source}: metadata lacks required column(s) {missing}",
            fix="add them, or map your column names onto the canonical schema "
            "(cellrep.data.schema.CANONICAL_COLUMNS) in the data config",
        )
    if df.empty:
        raise CellrepError(f"{source}: metadata has no rows", fix="point data.root at a non-empty dataset")
    out = df.copy()
    for col, dtype in _DTYPES.items():
        try:
            out[col] = out[col].astype(dtype)
        except (TypeError, ValueError) as exc:
            raise CellrepError(
                f"{source}: column '{col}' cannot be read as {dtype}: {exc}",
                fix=f"fix the values of '{col}' in the metadata",
            ) from None
    for col, allowed in (("perturbation_type", PERTURBATION_TYPES), ("well_type", WELL_TYPES)):
        bad = sorted(set(out[col].dropna()) - set(allowed))
        if bad:
            raise CellrepError(
                f"{source}: column '{col}' has unknown values {bad[:5]}",
                fix=f"use one of {list(allowed)}",
            )
    dup = out["site_id"].duplicated()
    if dup.any():
        raise CellrepError(
            f"{source}: {int(dup.sum())} duplicated site_id(s), e.g. {out.loc[dup, 'site_id'].iloc[0]}",
            fix="site_id must identify one imaging site; check for repeated metadata rows",
        )
    keep = list(CANONICAL_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in out.columns]
    return out[keep].reset_index(drop=True)
